"""Running the runs of a sweep where an executor puts them: in the driver's process, or a Ray worker.

A :class:`Job` is plain data (the scenario file, the runs, the device and dtype); each run ends
in one :class:`Outcome`. :func:`run_one` runs one run and never raises — a run that fails is an
outcome with status ``failed`` and its traceback. (:func:`measureflow.sweep.driver.execute`, the
function executors call, runs a job's runs one by one here or as one batch through
:mod:`measureflow.sweep.pack`.)

Placement. ``device="auto"`` becomes CUDA when one is visible where the job executes (under
Ray, the GPU that Ray assigned to the task), else the CPU. A scenario that declares a ``device``
(or ``dtype``) parameter receives it; otherwise :func:`place` builds the scenario's Simulation and
asks for a copy on that device and dtype (``Simulation.with_device``); fields take their own
parameters to the state's device and dtype when they evaluate.

Final observables. For each observable of the run's Result (or of its file, for a run found
completed on disk), the last sample — one value per replica, shape (R, ...); a packed run's own
block of replicas — is averaged over the replicas; a scalar observable gives one number under
its name, a small array (at most :data:`MAX_COMPONENTS` entries, e.g. a mean or covariance) one
number per entry, named ``mean[0]``, ``covariance[0][1]``; larger ones are left out.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

import attrs
import numpy as np
import torch

from ..errors import MeasureflowError, ParameterError, ResumeRefusedError
from ..scenario import choose_scenario, load_scenarios, output_path, with_run_checkpoint

__all__ = [
    "Job",
    "Outcome",
    "resolve_device",
    "load_scenario",
    "place",
    "final_observables",
    "summarise",
    "run_one",
    "file_completed",
    "file_done",
    "MAX_COMPONENTS",
]

MAX_COMPONENTS = 16
_SCENARIOS: dict[tuple, object] = {}


@attrs.frozen
class Job:
    """Work for one executor call: one run, or (``pack=True``) the runs of one grid point.

    ``runs`` are :class:`~measureflow.sweep.grid.RunSpec` objects; ``checkpoint`` is the packed
    batch's own checkpoint file (None for a single run, whose checkpoint lies beside its file).
    """

    scenario: str
    name: str
    runs: tuple
    device: str = "auto"
    dtype: str | None = None
    pack: bool = False
    checkpoint: str | None = None


@attrs.frozen
class Outcome:
    """How one run ended, as the executor reports it to the driver."""

    key: str
    status: str
    message: str = ""
    wall_time: float | None = None
    observables: dict = attrs.field(factory=dict, eq=False)
    error: str | None = None
    device: str = ""
    pack: int = 1

    @classmethod
    def failure(cls, key: str, message: str, error: str | None = None, device: str = "") -> "Outcome":
        return cls(key, "failed", message, None, {}, error or message, device)

    @classmethod
    def from_exception(cls, key: str, exc: BaseException, device: str = "") -> "Outcome":
        """The failure of a run that raised ``exc`` (call it inside the ``except`` block: the
        traceback being handled is recorded)."""
        return cls.failure(key, f"{type(exc).__name__}: {exc}", traceback.format_exc(), device)

    def record(self) -> dict:
        """The fields of the run's index record."""
        return {"status": self.status, "message": self.message, "wall_time": self.wall_time,
                "observables": self.observables, "error": self.error, "device": self.device, "pack": self.pack}


def resolve_device(spec: str) -> torch.device:
    """``auto`` → CUDA where visible, else CPU; ``cuda:N`` is checked against the visible devices."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.index or 0
        if index >= visible:
            shown = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
            raise ParameterError(
                f"--device {spec}: {visible} CUDA device(s) visible here (CUDA_VISIBLE_DEVICES={shown}); "
                "use --device auto (under Ray each run sees only its own GPU, as cuda:0) or cpu"
            )
    return device


def load_scenario(path: str, name: str):
    """The scenario ``name`` of the file at ``path``, imported once per process and file version."""
    stat = os.stat(path)
    key = (path, name, stat.st_mtime_ns, stat.st_size)
    if key not in _SCENARIOS:
        _SCENARIOS[key] = choose_scenario(load_scenarios(path), path, name)
    return _SCENARIOS[key]


def place(scn, run, device: torch.device, dtype: str | None):
    """The run's Simulation on ``device`` / ``dtype``, quiet, with the checkpoint beside its file
    (resumed from when it exists).

    The scenario is built with the run's parameters (and ``device``, when it declares one); a
    scenario that does not take the device or dtype itself gets a copy of its Simulation moved
    there (``with_device``). Refuses a Simulation that does not write the run's file."""
    overrides = dict(run.parameters)
    if "device" in scn.parameters:
        overrides["device"] = str(device)
    simulation, _ = scn.build(overrides)
    move_device = "device" not in scn.parameters and simulation.state.device != device
    move_dtype = dtype is not None and "dtype" not in scn.parameters
    if move_device or move_dtype:
        simulation = simulation.with_device(device if move_device else None,
                                            getattr(torch, dtype) if move_dtype else None)
    h5_path = output_path(simulation)
    if h5_path is None or Path(h5_path).absolute() != Path(run.file):
        raise MeasureflowError(
            f"scenario {scn.name!r} did not write its `out` parameter: its Simulation writes "
            f"{h5_path or 'no H5MD file'} instead of {run.file}; pass `out` to its h5md writer"
        )
    simulation = simulation.with_options(progress=False)
    checkpoint = simulation.checkpoint_path or Path(run.file + ".ckpt")
    return with_run_checkpoint(simulation, checkpoint, resume=Path(checkpoint).exists())


def final_observables(observables: dict, replicas: slice = slice(None)) -> dict[str, float]:
    """Last sample of each observable series (of the ``replicas`` block), averaged over its replicas
    (see the module docstring)."""
    out: dict[str, float] = {}
    for name, series in observables.items():
        if len(series) == 0:
            continue
        last = np.asarray(series.values[-1], dtype=np.float64)
        value = last[replicas].mean(axis=0) if last.ndim >= 1 else last
        if value.ndim == 0:
            out[name] = float(value)
        elif value.size <= MAX_COMPONENTS:
            for idx in np.ndindex(value.shape):
                out[name + "".join(f"[{i}]" for i in idx)] = float(value[idx])
    return out


def summarise(run, status: str, message: str, wall_time: float | None, device: str, pack: int = 1,
              observables: dict | None = None) -> Outcome:
    """The outcome of a run that ended with ``status``; its final observables from ``observables``
    (name → final value) or, when None, read from its file."""
    if observables is None:
        from ..io.reader import open_trajectory  # h5py loads on first use

        observables = {}
        if Path(run.file).exists():
            with open_trajectory(run.file) as traj:
                observables = final_observables(traj.observables)
    return Outcome(run.key, status, message, wall_time, observables, None, device, pack)


def file_completed(path) -> bool:
    """Whether the trajectory file at ``path`` records that its run completed (False when the file
    is missing, unreadable or records another status)."""
    from ..io import completed_status  # h5py loads on first use

    return completed_status(path) is not None


#: Parameters that say where a run writes or runs, not what it computes.
PLACEMENT_PARAMETERS = ("out", "picture", "device")


def file_done(run) -> bool:
    """Whether ``run``'s file holds it, completed: readable, status ``completed``, its committed
    frames inside the file, and the scenario parameters it recorded equal to the run's (the sweep
    decides from the file, never from its index alone)."""
    from ..io.outputs import inspect_output  # h5py loads on first use

    report = inspect_output(run.file)
    if not report.completed or report.frames == 0:
        return False
    recorded = report.parameters.get("parameters", {})
    return all(recorded.get(k) == v for k, v in run.parameters.items() if k not in PLACEMENT_PARAMETERS)


def run_one(scn, run, device: torch.device, dtype: str | None) -> Outcome:
    """Run (or resume, from the checkpoint beside its file) one run; never raises."""
    start = time.monotonic()
    try:
        simulation = place(scn, run, device, dtype)
        try:
            result = simulation.run()
        except ResumeRefusedError as exc:
            # The sweep owns its files: a run whose file cannot be continued starts over.
            print(f"measureflow sweep: {run.key}: {exc}; starting the run over", file=sys.stderr)
            simulation.checkpoint_path.unlink(missing_ok=True)
            simulation = place(scn, run, device, dtype)
            result = simulation.run()
        if result.status.ok:
            simulation.checkpoint_path.unlink(missing_ok=True)
        return summarise(run, result.status.code, result.status.message, time.monotonic() - start, str(device),
                         observables=final_observables(result.observables))
    except Exception as exc:  # noqa: BLE001 - recorded in the index; the other runs go on
        return Outcome.from_exception(run.key, exc, str(device))
