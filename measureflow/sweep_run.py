"""Executing sweep jobs where an executor puts them: in the driver's process, or a Ray worker.

:func:`execute` is the one function executors call. It takes a :class:`Job` (plain data: the
scenario file, the runs, the device and dtype) and returns one :class:`Outcome` per run; it
never raises — a run that fails is an outcome with status ``failed`` and its traceback.

Placement. ``device="auto"`` becomes CUDA when one is visible where the job executes (under
Ray, the GPU that Ray assigned to the task), else the CPU. A scenario that declares a ``device``
(or ``dtype``) parameter receives it; otherwise the sweep builds the scenario's Simulation and
moves its initial state (``Particles.to`` / ``Gaussians.to``); fields take their own parameters
to the state's device and dtype when they evaluate.

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

from .errors import MeasureflowError, ParameterError

__all__ = ["Job", "Outcome", "execute", "resolve_device", "final_observables", "summarise", "place", "run_one"]

MAX_COMPONENTS = 16
_SCENARIOS: dict[tuple, object] = {}


@attrs.frozen
class Job:
    """Work for one executor call: one run, or (``pack=True``) the runs of one grid point.

    ``checkpoint`` is the packed batch's own checkpoint file (None for a single run, whose
    checkpoint lies beside its file).
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

    def record(self) -> dict:
        """The fields of the run's index record."""
        return {"status": self.status, "message": self.message, "wall_time": self.wall_time,
                "observables": self.observables, "error": self.error, "device": self.device, "pack": self.pack}


def resolve_device(spec: str):
    """``auto`` → CUDA where visible, else CPU; ``cuda:N`` is checked against the visible devices."""
    import torch

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
    from .scenario import choose_scenario, load_scenarios

    stat = os.stat(path)
    key = (path, name, stat.st_mtime_ns, stat.st_size)
    if key not in _SCENARIOS:
        _SCENARIOS[key] = choose_scenario(load_scenarios(path), path, name)
    return _SCENARIOS[key]


def place(scn, run, device, dtype: str | None):
    """Build the run's Simulation (quietly, with its checkpoint attached) on ``device`` / ``dtype``."""
    import torch

    from .scenario import attach_checkpoint

    overrides = dict(run.parameters)
    if "device" in scn.parameters:
        overrides["device"] = str(device)
    simulation, _ = scn.build(overrides)
    moves = {}
    if "device" not in scn.parameters and simulation.state.device != device:
        moves["device"] = device
    if dtype is not None and "dtype" not in scn.parameters:
        moves["dtype"] = getattr(torch, dtype)
    if moves:
        simulation.state = simulation.state.to(**moves)
    h5_path = attach_checkpoint(simulation)
    if h5_path is None or Path(h5_path).absolute() != Path(run.file):
        raise MeasureflowError(
            f"scenario {scn.name!r} did not write its `out` parameter: its Simulation writes "
            f"{h5_path or 'no H5MD file'} instead of {run.file}; pass `out` to its h5md writer"
        )
    simulation.progress = False
    return simulation


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
        from .io.reader import open_trajectory

        observables = {}
        if Path(run.file).exists():
            with open_trajectory(run.file) as traj:
                observables = final_observables(traj.observables)
    return Outcome(run.key, status, message, wall_time, observables, None, device, pack)


def _failed(run, exc: BaseException, device: str) -> Outcome:
    return Outcome.failure(run.key, f"{type(exc).__name__}: {exc}", traceback.format_exc(), device)


def run_one(scn, run, device, dtype: str | None) -> Outcome:
    """Run (or resume, from the checkpoint beside its file) one run."""
    start = time.monotonic()
    try:
        simulation = place(scn, run, device, dtype)
        simulation.resume = simulation.checkpoint_path.exists()
        result = simulation.run()
        if result.status.ok:
            simulation.checkpoint_path.unlink(missing_ok=True)
        return summarise(run, result.status.code, result.status.message, time.monotonic() - start, str(device),
                         observables=final_observables(result.observables))
    except Exception as exc:  # noqa: BLE001 - recorded in the index; the other runs go on
        return _failed(run, exc, str(device))


def execute(job: Job) -> list[Outcome]:
    """Run a job and return one outcome per run (never raises)."""
    try:
        device = resolve_device(job.device)
        scn = load_scenario(job.scenario, job.name)
    except Exception as exc:  # noqa: BLE001
        return [_failed(run, exc, job.device) for run in job.runs]
    if job.pack and len(job.runs) > 1:
        from .sweep_pack import run_pack

        packed = run_pack(scn, job.runs, device, job.dtype, job.checkpoint)
        if not isinstance(packed, str):
            return packed
        print(f"measureflow sweep: {len(job.runs)} runs not packed ({packed}); running them one by one",
              file=sys.stderr)
    return [run_one(scn, run, device, job.dtype) for run in job.runs]
