"""Packing: the runs of one grid point — they differ only in seed — advanced as one batch.

Each run's Simulation is built exactly as it would be alone. Their initial states are stacked
along the replica axis R (run i owns a block of consecutive replicas), and the first run's
Simulation advances the whole batch on one device with

* the noise of each block drawn from that run's own seed (``Simulation.noise_blocks``), so a
  stochastic integrator gives every run the increments it would draw alone (an integrator packs
  when it draws through :func:`measureflow.integrators.stochastic.standard_normal`, as the
  built-in ones do; one that calls ``torch.randn`` with the generator itself makes the batch
  raise, and the runs go one by one);
* for each of the run's writers a :class:`PackWriter` that hands every run's writer its block of
  each frame and observable sample, opened with the run's own description (``RunInfo``), so
  each run's file is the one it writes alone;
* a checkpoint of the batch, ``DIR/pack-<key>.ckpt``, so a killed batch resumes as a batch.

Runs pack when their fields, observers, targets, time grids, integrators, state shapes and
writer schedules are the same (compared by value: tensors element by element) and the
integrator has a fixed step: an adaptive controller chooses one step for the whole batch. The
batch then equals the separate runs because a field treats replicas independently with shared
parameters (R is a batch axis for every built-in field) — the test suite checks that packed and
unpacked files are identical.

:func:`run_pack` returns the runs' outcomes, or a sentence saying why the runs were not packed
(or why the batch's result cannot stand for the separate runs: the batch failed, or a Gaussian
step was split for the whole batch because one replica needed it). The caller then runs them
one by one; files the batch wrote are replaced.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .errors import MeasureflowError
from .io.base import Writer
from .io.runinfo import RunInfo
from .state import Gaussians, Particles, state_kind

__all__ = ["run_pack", "unpackable", "PackWriter", "same_value"]

#: How deep :func:`same_value` follows attributes before it gives up (and refuses to pack).
MAX_DEPTH = 12
# Py_TPFLAGS_HEAPTYPE without Py_TPFLAGS_IMMUTABLETYPE: a class defined by a Python class statement
# (built-in and extension types lack one or have both).
_HEAP_TYPE, _IMMUTABLE_TYPE = 1 << 9, 1 << 8


def same_value(a, b, _depth: int = 0, _seen: set | None = None) -> bool:
    """Whether ``a`` and ``b`` hold the same values: tensors and arrays element by element, objects
    attribute by attribute. False whenever in doubt (the caller then does not pack)."""
    if a is b:
        return True
    if type(a) is not type(b) or _depth > MAX_DEPTH:
        return False
    if isinstance(a, torch.Tensor):
        return (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                and bool(torch.equal(a.detach(), b.detach())))
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b))
    if isinstance(a, torch.Generator):
        return a.device == b.device and bool(torch.equal(a.get_state(), b.get_state()))
    if isinstance(a, (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)):
        return a == b
    seen = set() if _seen is None else _seen
    pair = (id(a), id(b))
    if pair in seen:
        return True  # a cycle already being compared
    seen.add(pair)
    depth = _depth + 1
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y, depth, seen) for x, y in zip(a, b))
    if isinstance(a, (set, frozenset)):
        return a == b
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k], depth, seen) for k in a)
    attrs_a, attrs_b = _attributes(a), _attributes(b)
    if attrs_a is None or attrs_b is None:
        return a == b  # functions, modules, classes: the same object (checked above) or equal
    return attrs_a.keys() == attrs_b.keys() and all(same_value(attrs_a[k], attrs_b[k], depth, seen) for k in attrs_a)


def _attributes(obj) -> dict | None:
    """The attributes of an instance of a Python class; None for anything else (functions,
    classes, modules and C types, which compare with ``==``)."""
    flags = type(obj).__flags__
    if isinstance(obj, type) or not flags & _HEAP_TYPE or flags & _IMMUTABLE_TYPE:
        return None
    out = dict(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if name not in ("__dict__", "__weakref__") and hasattr(obj, name):
                out[name] = getattr(obj, name)
    return out


def unpackable(simulations) -> str | None:
    """Why these Simulations cannot advance as one batch (None when they can)."""
    lead = simulations[0]
    integrator = lead.integrator
    if getattr(integrator, "adaptive", False):
        return f"integrator {getattr(integrator, 'name', '?')!r} adapts its step to the whole batch"
    if lead.noise_blocks:
        return "the scenario sets noise_blocks itself"
    first = lead.run_parameters()
    for other in simulations[1:]:
        params = other.run_parameters()
        for part, what in (("time", "time grids"), ("integrator", "integrators")):
            if params[part] != first[part]:
                return f"their {what} differ"
        a, b = lead.state, other.state
        if (state_kind(a), getattr(a, "size", 0), a.dim, a.dtype, a.device) != (
                state_kind(b), getattr(b, "size", 0), b.dim, b.dtype, b.device):
            return f"their states differ in kind, size, dimension, dtype or device ({a!r} vs {b!r})"
        if not same_value(lead.field, other.field):
            return "their fields differ (e.g. a target drawn from the seed); a batch shares one field"
        if len(lead.observers) != len(other.observers) or not all(
                same_value(x, y) for x, y in zip(lead.observers, other.observers)):
            return "their observers differ"
        if not same_value(lead.target, other.target):
            return "their targets differ"
        if (lead.blowup, lead.wall_time, lead.check_every) != (other.blowup, other.wall_time, other.check_every):
            return "their stop conditions differ"
        if [type(w) for w in lead.writers] != [type(w) for w in other.writers] or any(
                not same_value(getattr(x, "trigger", None), getattr(y, "trigger", None))
                for x, y in zip(lead.writers, other.writers)):
            return "their writers differ"
    return None


def _stack(states):
    if state_kind(states[0]) == "gaussians":
        return Gaussians(torch.cat([s.mean for s in states]), torch.cat([s.cov for s in states]))
    x = torch.cat([s.x for s in states])
    if all(s.weights is None for s in states):
        return Particles(x)
    return Particles(x, torch.cat([s.weights_or_uniform() for s in states]))


class PackWriter(Writer):
    """Hands each run's writer its block of replicas of a batch (see the module docstring).

    ``writers[i]`` is run i's writer, ``parameters[i]`` its ``Simulation.run_parameters()``, and
    ``states[i]`` its own initial state: the template whose shape and weights its block takes.
    """

    def __init__(self, writers, parameters, states):
        self.writers = list(writers)
        self.parameters = list(parameters)
        self.states = list(states)
        self.trigger = self.writers[0].trigger
        ends = np.cumsum([s.replicas for s in self.states])
        self.blocks = list(zip([0, *ends[:-1].tolist()], ends.tolist()))
        self.total = int(ends[-1])

    def open(self, run: RunInfo) -> None:
        opened = []
        try:
            for writer, params, state in zip(self.writers, self.parameters, self.states):
                writer.open(RunInfo.from_state(state, parameters=params, observable_names=run.observable_names,
                                               resume_step=run.resume_step))
                opened.append(writer)
        except BaseException:
            for writer in opened:
                writer.close()
            raise

    def write_frame(self, step: int, time: float, state) -> None:
        for writer, template, (a, b) in zip(self.writers, self.states, self.blocks):
            if isinstance(state, Particles):
                part = template.with_positions(state.x[a:b])
            else:
                part = template.with_parameters(state.mean[a:b], state.cov[a:b])
            writer.write_frame(step, time, part)

    def write_observables(self, step: int, time: float, values: dict) -> None:
        for name, value in values.items():
            if getattr(value, "ndim", 0) < 1 or value.shape[0] != self.total:
                raise MeasureflowError(
                    f"observable {name!r} has shape {tuple(getattr(value, 'shape', ()))}; a packed batch splits "
                    f"observables per replica and needs shape (R, ...) with R = {self.total}"
                )
        for writer, (a, b) in zip(self.writers, self.blocks):
            writer.write_observables(step, time, {name: value[a:b] for name, value in values.items()})

    def set_status(self, status: str, step: int, time: float, message: str = "") -> None:
        for writer in self.writers:
            writer.set_status(status, step, time, message)

    def flush(self) -> None:
        for writer in self.writers:
            writer.flush()

    def close(self) -> None:
        errors = []
        for writer in self.writers:
            try:
                writer.close()
            except Exception as exc:  # noqa: BLE001 - close every file, then report
                errors.append(exc)
        if errors:
            raise errors[0]


def _batch(simulations, checkpoint):
    """Turn the first Simulation into the batch of all of them (see the module docstring)."""
    from .scenario import attach_checkpoint

    lead = simulations[0]
    parameters = [s.run_parameters() for s in simulations]
    states = [s.state for s in simulations]
    lead.writers = [PackWriter([s.writers[j] for s in simulations], parameters, states)
                    for j in range(len(lead.writers))]
    lead.noise_blocks = [(s.seed, s.state.replicas) for s in simulations]
    lead.state = _stack(states)
    # The batch's checkpoint must not be taken for another batch's.
    lead.parameters = {**lead.parameters, "pack": [p["seed"] for p in parameters]}
    attach_checkpoint(lead, checkpoint)
    lead.resume = Path(checkpoint).exists()
    return lead


def run_pack(scn, runs, device, dtype, checkpoint):
    """Advance ``runs`` as one batch; their outcomes, or why they were not (or must not be) packed."""
    from .sweep_run import final_observables, place, summarise

    start = time.monotonic()
    try:
        simulations = [place(scn, run, device, dtype) for run in runs]
    except Exception as exc:  # noqa: BLE001 - the runs alone will report it
        return f"building them raised {type(exc).__name__}: {exc}"
    reason = unpackable(simulations)
    if reason is not None:
        return reason
    ends = np.cumsum([s.state.replicas for s in simulations]).tolist()
    blocks = list(zip([0, *ends[:-1]], ends))
    lead = _batch(simulations, checkpoint)
    try:
        result = lead.run()
    except Exception as exc:  # noqa: BLE001
        Path(checkpoint).unlink(missing_ok=True)
        return f"the batch raised {type(exc).__name__}: {exc}"
    status = result.status
    if not status.ok and status.code not in ("terminated", "time_budget"):
        Path(checkpoint).unlink(missing_ok=True)
        return f"the batch ended {status}"
    if result.integrator_stats.get("rejected", 0):
        Path(checkpoint).unlink(missing_ok=True)
        return "the integrator split steps for the whole batch"
    if status.ok:
        Path(checkpoint).unlink(missing_ok=True)
        for run in runs:
            Path(run.file + ".ckpt").unlink(missing_ok=True)
    share = (time.monotonic() - start) / len(runs)
    return [summarise(run, status.code, status.message, share, str(device), len(runs),
                      final_observables(result.observables, slice(a, b)))
            for run, (a, b) in zip(runs, blocks)]
