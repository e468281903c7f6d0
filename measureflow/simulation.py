"""The simulation loop: state + field + integrator + time grid + writers + observers.

Per-step order (documented contract; writers and observers may rely on it):

* **step 0** (before any integration): observers triggered at step 0 measure the initial state,
  then writers triggered at step 0 write it.
* **step k = 1 … n**, advancing from tₖ₋₁ to tₖ = t0 + k·(t1 − t0)/n:

  1. the integrator advances the state (adaptive integrators take as many internal steps as their
     controller needs and land exactly on tₖ);
  2. the health flags are updated on the device (non-finite values, the blow-up bound) without
     a host synchronisation; the first offending step is remembered on the device;
  3. on a *check* step (every step where a writer writes or a checkpoint is saved, the last step,
     and every ``check_every`` steps when that is set) the flags are read — the only host
     synchronisation of a fixed-step particle run; an unhealthy state ends the run
     with status ``nonfinite`` or ``blowup`` naming the first offending step and time, and that
     state is neither observed nor written;
  4. triggered observers measure the state (values stay on the device);
  5. triggered writers write the frame and the observables measured at this step (the only place
     data leaves the device);
  6. a triggered checkpoint flushes the writers, then atomically replaces the checkpoint file;
  7. stop requests are honoured: the wall-clock budget, and SIGTERM (which ends the run cleanly at
     the end of the current step, with a checkpoint when one is configured).

Observers and writers always also fire on the last step, so a run's final state is always in its
file and in its :class:`Result`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time as _time
from pathlib import Path
from typing import Any, Callable, Sequence

import attrs
import numpy as np
import torch

from . import __version__
from .errors import CapabilityError, MeasureflowError, TimeRangeError
from .fields import capabilities, check_compatible
from .plugins import get_registry
from .state import Particles, state_from_tensors, state_kind
from .status import STATUS_COMPLETED, Status
from .triggers import as_trigger

__all__ = ["Simulation", "Result", "Status", "Observer", "Series"]



@attrs.frozen
class Series:
    """An observable's samples: ``values[i]`` was measured at ``steps[i]``, time ``times[i]``."""

    steps: np.ndarray
    times: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.steps)


@attrs.define
class Observer:
    """Measures ``function(state, field=..., target=..., t=..., **params)`` on triggered steps.

    ``function`` is a callable or the name of a registered observable (``"mean"``, ``"covariance"``,
    ``"energy"``, ``"w2"``, ``"mmd"``, ``"sinkhorn"`` …). ``every`` is a trigger (an int k means
    every k steps).
    """

    function: Any
    name: str | None = None
    every: Any = None
    target: Any = None
    params: dict = attrs.field(factory=dict)

    def resolve(self, default_every) -> "Observer":
        function = self.function
        name = self.name
        if isinstance(function, str):
            name = name or function
            function = get_registry().get("observables", function)
        elif name is None:
            name = getattr(function, "__name__", "observable")
        every = as_trigger(self.every if self.every is not None else default_every)
        return Observer(function, name, every, self.target, dict(self.params))


@attrs.frozen
class Result:
    """What :meth:`Simulation.run` returns."""

    state: Any
    status: Status
    times: np.ndarray  # the time grid t0 … t1 (n + 1 values)
    steps_done: int
    observables: dict  # name -> Series (host numpy)
    wall_time: float
    integrator_stats: dict
    writers: tuple = ()

    @property
    def ok(self) -> bool:
        return self.status.ok

    @property
    def final_time(self) -> float:
        return float(self.times[self.steps_done])

    def __repr__(self) -> str:
        obs = ", ".join(self.observables) or "none"
        return f"Result(status={self.status}, state={self.state!r}, observables=[{obs}], wall_time={self.wall_time:.3g}s)"


class _StopRequested(Exception):
    def __init__(self, status: Status):
        super().__init__(str(status))
        self.status = status


def _resolve_integrator(integrator):
    if isinstance(integrator, str):
        return get_registry().integrator(integrator)
    if not callable(getattr(integrator, "advance", None)):
        raise CapabilityError(
            f"expected an integrator name or an object with advance(field, state, t0, t1, generator); "
            f"received {type(integrator).__name__}"
        )
    return integrator


def _resolve_writer(writer):
    if isinstance(writer, (str, os.PathLike)) and str(writer).endswith((".h5", ".hdf5", ".h5md")):
        return get_registry().writer("h5md", writer)
    if isinstance(writer, str):
        return get_registry().writer(writer)
    for method in ("open", "write_frame", "close"):
        if not callable(getattr(writer, method, None)):
            raise CapabilityError(f"writer {writer!r} has no {method}() method; see measureflow.io for the protocol")
    return writer


def _field_owners(field, registry) -> dict[str, str]:
    """Plugin name → version for every registered class that makes up ``field``."""
    found = {}
    stack = [field]
    while stack:
        f = stack.pop()
        stack.extend(getattr(f, "terms", ()))
        inner = getattr(f, "field", None)
        if inner is not None and inner is not f:
            stack.append(inner)
        for entry in registry.entries("fields"):
            if entry.obj is type(f):
                found[entry.owner] = entry.version
    return found


class _Health:
    """The run's health record, kept on the state's device (no host synchronisation per step).

    Each step stores one number, the state's largest |value| (``inf``-norm: NaN if any value is NaN,
    inf if any is infinite), into a block of ``block`` slots; a full block is folded into two device
    scalars, the first offending step and its kind (1 non-finite, 2 beyond the blow-up bound).
    :meth:`first_bad` folds what is pending and reads the scalars back: the only synchronisation,
    made when the run writes, checkpoints, checks or ends.
    """

    def __init__(self, bound: float | None, device, block: int = 64):
        self.bound = bound
        self.block = block
        self.peaks = None
        self.steps = torch.empty(block, dtype=torch.long, device=device)
        self.filled = 0
        self.first = torch.full((), -1, dtype=torch.long, device=device)
        self.kind = torch.zeros((), dtype=torch.long, device=device)
        self.host_steps: list[int] = []

    def record(self, state, step: int) -> None:
        tensors = state.tensors()
        values = tensors["x"] if "x" in tensors else torch.cat([tensors["mean"].flatten(), tensors["cov"].flatten()])
        if self.peaks is None or self.peaks.dtype != values.dtype:
            self._fold()
            self.peaks = torch.empty(self.block, dtype=values.dtype, device=values.device)
        torch.linalg.vector_norm(values.detach(), ord=math.inf, out=self.peaks[self.filled])
        self.host_steps.append(step)
        self.filled += 1
        if self.filled == self.block:
            self._fold()

    def _fold(self) -> None:
        if not self.filled:
            return
        peaks = self.peaks[: self.filled]
        kind = torch.where(torch.isfinite(peaks), 0, 1)
        if self.bound is not None:
            kind = torch.where((kind == 0) & (peaks > self.bound), 2, kind)
        bad = kind > 0
        # first offending slot of the block (argmax of a bool picks the first True)
        slot = torch.argmax(bad.to(torch.uint8))
        steps = torch.as_tensor(self.host_steps, dtype=torch.long).to(self.first.device, non_blocking=True)
        fresh = (self.first < 0) & bad.any()
        self.first.copy_(torch.where(fresh, steps[slot], self.first))
        self.kind.copy_(torch.where(fresh, kind[slot], self.kind))
        self.filled = 0
        self.host_steps = []

    def first_bad(self) -> tuple[int, int] | None:
        self._fold()
        bad = int(self.first)
        return None if bad < 0 else (bad, int(self.kind))


class Simulation:
    """Advance a measure under a field and record what happens.

    Parameters
    ----------
    state:
        :class:`~measureflow.Particles` or :class:`~measureflow.Gaussians`.
    field:
        a field object (see :mod:`measureflow.fields`) or a registered field name.
    integrator:
        a registered integrator name (``"euler"``, ``"heun"``, ``"midpoint"``, ``"rk4"``,
        ``"dopri5"``, ``"euler_maruyama"``) or an integrator object. Default ``"rk4"``, or
        ``"euler_maruyama"`` for a field with a diffusion term on particles.
    t0, t1:
        start and end time; t1 < t0 integrates backwards (deterministic fields only).
    steps, dt, times:
        the time grid: ``steps`` equal intervals, a step ``dt`` dividing t1 − t0, or explicit
        ``times`` (strictly monotone, first = t0 and last = t1; t0/t1 may then be left out) — e.g. the
        geometric grid a flow-matching field's ``generation_times`` gives near a singular end.
    writers:
        writer objects, registered writer names, or paths ending in .h5 (an H5MD writer).
    observers:
        :class:`Observer` objects or registered observable names (measured every ``observe_every``).
    seed:
        seeds the run's torch.Generator (noise of stochastic integrators) through :func:`noise_seed`,
        so the noise never replays a draw made with ``torch.Generator().manual_seed(seed)``. The
        generator is saved in checkpoints, so a resumed run draws the same noise.
    target:
        default target measure handed to distance observables.
    blowup:
        stop when max |value| of the state exceeds this bound (None: never).
    wall_time:
        stop after this many seconds (status ``time_budget``).
    checkpoint, checkpoint_every, resume:
        a checkpoint path, its trigger (default: every ``max(1, n // 10)`` steps), and whether
        :meth:`run` continues from an existing checkpoint.
    check_every:
        also read the health flags every this many steps (a host synchronisation; by default they
        are read only where data leaves the device anyway: writes, checkpoints, the last step).
    progress:
        None → a tqdm bar when stderr is a terminal; True/False force it.
    parameters:
        scenario parameters recorded in the trajectory file.

    The attribute ``noise_blocks`` (default None) may be set to ``[(seed, replicas), …]`` before
    :meth:`run`: the state's replicas then form consecutive blocks, each drawing its noise from
    its own seed exactly as a run of those replicas with that seed would (how a sweep packs runs
    that differ only in seed).
    """

    def __init__(
        self,
        state,
        field,
        integrator=None,
        t0: float = 0.0,
        t1: float = 1.0,
        steps: int | None = None,
        dt: float | None = None,
        writers: Sequence = (),
        observers: Sequence = (),
        seed: int = 0,
        *,
        target=None,
        observe_every=None,
        blowup: float | None = 1e12,
        wall_time: float | None = None,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every=None,
        resume: bool = False,
        check_every: int | None = None,
        progress: bool | None = None,
        parameters: dict | None = None,
        description: str = "",
        times: Sequence[float] | None = None,
    ):
        kind = state_kind(state)
        registry = get_registry()
        if isinstance(field, str):
            field = registry.field(field)
        self.state = state
        self.field = field
        caps = capabilities(field)
        if integrator is None:
            integrator = "euler_maruyama" if ("diffusion" in caps and kind == "particles") else "rk4"
        self.integrator = _resolve_integrator(integrator)
        stochastic = bool(getattr(self.integrator, "stochastic", False))
        check_compatible(field, state, stochastic_integrator=stochastic, needs=getattr(self.integrator, "needs", None))
        check = getattr(self.integrator, "check", None)
        if callable(check):
            check(field, state)

        self._times = None
        if times is not None:
            t0, t1 = self._explicit_grid(times, steps, dt, t0, t1)
        self.t0, self.t1 = float(t0), float(t1)
        if not (math.isfinite(self.t0) and math.isfinite(self.t1)) or self.t0 == self.t1:
            raise TimeRangeError(f"need finite t0 != t1; received t0 = {t0!r}, t1 = {t1!r}")
        self.n_steps = len(self._times) - 1 if self._times is not None else self._grid_size(steps, dt)
        for t in (self.t0, self.t1):
            field.check_time(t) if hasattr(field, "check_time") else None
        if self.t1 < self.t0 and "diffusion" in caps and kind == "particles":
            raise TimeRangeError(
                f"field {field.name!r} is stochastic and cannot be integrated backwards "
                f"(t1 = {self.t1:g} < t0 = {self.t0:g}); write the reverse-time SDE as its own field"
            )

        self.seed = int(seed)
        self.target = target
        self.blowup = None if blowup is None else float(blowup)
        self.wall_time = None if wall_time is None else float(wall_time)
        self.check_every = None if check_every is None else max(1, int(check_every))
        self.progress = progress
        self.parameters = dict(parameters or {})
        self.description = description

        default_every = observe_every if observe_every is not None else max(1, self.n_steps // 100)
        self.observers = [self._as_observer(o).resolve(default_every) for o in observers]
        names = [o.name for o in self.observers]
        if len(set(names)) != len(names):
            raise MeasureflowError(f"observer names must be unique; received {names}")
        self.writers = [_resolve_writer(w) for w in writers]

        self.checkpoint_path = Path(checkpoint) if checkpoint is not None else None
        if checkpoint_every is None:
            checkpoint_every = max(1, self.n_steps // 10)
        self.checkpoint_trigger = as_trigger(checkpoint_every) if self.checkpoint_path else as_trigger(None)
        self.resume = bool(resume)
        if self.resume and self.checkpoint_path is None:
            raise MeasureflowError("resume=True needs a checkpoint path (checkpoint='run.ckpt')")
        self._stop_flag = threading.Event()
        # ((seed, replicas), …): consecutive blocks of replicas drawing noise from their own seeds,
        # as each would alone (set by packed sweeps; None: one stream from ``seed``).
        self.noise_blocks = None

    # -- set-up helpers ---------------------------------------------------------------------------
    def _grid_size(self, steps, dt) -> int:
        span = self.t1 - self.t0
        if (steps is None) == (dt is None):
            raise MeasureflowError("give exactly one of steps (number of intervals) or dt (step size)")
        if steps is not None:
            if int(steps) != steps or int(steps) < 1:
                raise MeasureflowError(f"steps must be a positive integer; received {steps!r}")
            return int(steps)
        dt = float(dt)
        if dt <= 0 or not math.isfinite(dt):
            raise MeasureflowError(f"dt must be positive and finite; received {dt!r} (the sign follows t1 − t0)")
        n = round(abs(span) / dt)
        if n < 1 or abs(n * dt - abs(span)) > 1e-9 * max(1.0, abs(span)):
            raise MeasureflowError(
                f"dt = {dt:g} does not divide t1 − t0 = {span:g}; use steps= instead, or a dt that divides the span"
            )
        return n

    def _explicit_grid(self, times, steps, dt, t0, t1) -> tuple[float, float]:
        """Validate an explicit time grid; returns its ends (t0/t1 given beside it must agree)."""
        if steps is not None or dt is not None:
            raise MeasureflowError("give one of steps, dt or times, not several")
        try:
            grid = [float(t) for t in times]
        except (TypeError, ValueError):
            raise MeasureflowError(f"times must be a sequence of numbers; received {times!r}") from None
        if len(grid) < 2 or not all(math.isfinite(t) for t in grid):
            raise MeasureflowError(f"times must hold at least two finite times; received {len(grid)}")
        gaps = [b - a for a, b in zip(grid[:-1], grid[1:])]
        if not (all(g > 0 for g in gaps) or all(g < 0 for g in gaps)):
            raise MeasureflowError("times must be strictly increasing or strictly decreasing")
        # t0 = 0, t1 = 1 are the signature defaults: only explicit values that disagree are an error
        for name, given, end, default in (("t0", t0, grid[0], 0.0), ("t1", t1, grid[-1], 1.0)):
            if float(given) != default and float(given) != end:
                raise MeasureflowError(f"{name} = {given:g} disagrees with times ({name} = {end:g}); leave {name} out")
        self._times = grid
        return grid[0], grid[-1]

    def _as_observer(self, obs) -> Observer:
        if isinstance(obs, Observer):
            return obs
        if isinstance(obs, str) or callable(obs):
            return Observer(obs)
        raise MeasureflowError(f"an observer is an Observer, a registered observable name or a callable; received {obs!r}")

    def time_at(self, step: int) -> float:
        """tₖ computed from k (never accumulated, so the grid ends exactly at t1)."""
        if self._times is not None:
            return self._times[step]
        if step == self.n_steps:
            return self.t1
        return self.t0 + (self.t1 - self.t0) * step / self.n_steps

    def run_parameters(self) -> dict:
        """What the trajectory file records under /parameters/measureflow."""
        registry = get_registry()
        describe = getattr(self.field, "describe", None)
        return {
            "parameters": self.parameters,
            "description": self.description,
            "seed": self.seed,
            "field": describe() if callable(describe) else {"name": getattr(self.field, "name", "?")},
            "integrator": {
                "name": getattr(self.integrator, "name", type(self.integrator).__name__),
                "options": _jsonable(getattr(self.integrator, "options", {})),
            },
            "time": {"t0": self.t0, "t1": self.t1, "steps": self.n_steps,
                     **({"times": list(self._times)} if self._times is not None else {})},
            "state": {"kind": state_kind(self.state), "replicas": self.state.replicas, "dim": self.state.dim,
                      "size": getattr(self.state, "size", 0), "dtype": str(self.state.dtype).replace("torch.", "")},
            "observables": [o.name for o in self.observers],
            "versions": {
                "measureflow": __version__,
                "torch": torch.__version__,
                "plugins": dict(sorted(registry.plugins.items())),
                "field_plugins": _field_owners(self.field, registry),
            },
        }

    def fingerprint(self) -> str:
        """Hash of what determines the run (to refuse resuming a different run's checkpoint)."""
        params = self.run_parameters()
        params.pop("versions")
        text = json.dumps(params, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> Result:
        """Run to t1 (or until a stop condition) and return a :class:`Result`."""
        from .io.runinfo import RunInfo

        start = _time.monotonic()
        state = self.state
        generator = self._noise_generator(state.device)
        step = 0
        history: dict[str, list] = {o.name: [] for o in self.observers}
        state_step = 0  # the grid step that `state` is at
        health = _Health(self.blowup, state.device)

        resumed = None
        if self.resume and self.checkpoint_path is not None and self.checkpoint_path.exists():
            resumed = self._load_checkpoint()
            state = resumed["state"]
            step = state_step = resumed["step"]
            generator.set_state(resumed["generator"])
            load = getattr(self.integrator, "load_state_dict", None)
            if callable(load) and resumed["integrator"] is not None:
                load(resumed["integrator"])
            history = resumed["history"]

        weights = None
        if isinstance(state, Particles) and state.weights is not None:
            weights = state.weights.detach().cpu().numpy()
        info = RunInfo(
            kind=state_kind(state),
            replicas=state.replicas,
            size=getattr(state, "size", 0),
            dim=state.dim,
            dtype=str(state.dtype).replace("torch.", ""),
            weights=weights,
            parameters=self.run_parameters(),
            observable_names=[o.name for o in self.observers],
            resume_step=step if resumed is not None else None,
        )
        opened = []
        status = None
        bar = None
        restore_signal = self._install_sigterm()
        try:
            for writer in self.writers:
                writer.open(info)
                opened.append(writer)
            if resumed is None:
                self._observe_and_write(0, state, history)

            bar = _progress_bar(self.n_steps, step, self.progress, self.field)
            while step < self.n_steps:
                t_prev, t_next = self.time_at(step), self.time_at(step + 1)
                try:
                    new_state = self.integrator.advance(self.field, state, t_prev, t_next, generator)
                except MeasureflowError as exc:
                    if type(exc).__name__ == "StepFailure":
                        # A state that already went bad (blow-up, NaN) is the cause; the failed step its symptom.
                        status = self._read_health(health) or Status(
                            "step_failure", step + 1, float(getattr(exc, "time", t_next)), str(exc)
                        )
                        break
                    raise
                step += 1
                health.record(new_state, step)
                last = step == self.n_steps
                writes = any(_fires(w, step, last) for w in self.writers)
                checkpoints = self.checkpoint_trigger(step)
                periodic = self.check_every is not None and step % self.check_every == 0
                if last or writes or checkpoints or periodic:
                    status = self._read_health(health)
                    if status is not None:
                        break
                state, state_step = new_state, step
                self._observe_and_write(step, state, history, last=last)
                if checkpoints and not last:
                    self._save_checkpoint(state, step, generator, history)
                if bar is not None:
                    bar.update(1)
                stop = None
                if self.wall_time is not None and _time.monotonic() - start > self.wall_time:
                    stop = Status("time_budget", step, t_next, f"wall-clock budget of {self.wall_time:g} s reached")
                if self._stop_flag.is_set():
                    stop = Status("terminated", step, t_next, "SIGTERM received; stopped cleanly")
                if stop is not None:
                    # Never checkpoint a state that went bad since the last check.
                    status = self._read_health(health) or stop
                    break
            if status is None:
                status = Status(STATUS_COMPLETED, step, self.time_at(step))
            elif status.code in ("terminated", "time_budget"):
                self._flush(opened)
                if self.checkpoint_path is not None:
                    self._save_checkpoint(state, state_step, generator, history)
        except KeyboardInterrupt:
            status = Status("interrupted", state_step, self.time_at(state_step), "KeyboardInterrupt")
            raise
        finally:
            if bar is not None:
                bar.close()
            restore_signal()
            for writer in opened:
                set_status = getattr(writer, "set_status", None)
                if status is not None and callable(set_status):
                    with contextlib.suppress(Exception):
                        set_status(status.code, status.step, status.time, status.message)
                writer.close()

        stats = dict(getattr(self.integrator, "stats", {}) or {})
        grid = np.array([self.time_at(k) for k in range(self.n_steps + 1)])
        return Result(
            state=state,
            status=status,
            times=grid,
            steps_done=state_step,
            observables=_to_series(history),
            wall_time=_time.monotonic() - start,
            integrator_stats=stats,
            writers=tuple(self.writers),
        )

    def _noise_generator(self, device):
        if self.noise_blocks:
            from .integrators.stochastic import ReplicaNoise

            seeds, replicas = zip(*self.noise_blocks)
            return ReplicaNoise([noise_seed(s) for s in seeds], replicas, device)
        generator = torch.Generator(device=device)
        generator.manual_seed(noise_seed(self.seed))
        return generator

    # -- pieces of a step --------------------------------------------------------------------------------
    def _observe_and_write(self, step, state, history, last=False):
        t = self.time_at(step)
        measured = {}
        for obs in self.observers:
            if obs.every(step) or last:
                value = obs.function(state, field=self.field, target=obs.target if obs.target is not None else self.target,
                                     t=t, **obs.params)
                value = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
                history[obs.name].append((step, t, value))
                measured[obs.name] = value
        for writer in self.writers:
            if _fires(writer, step, last):
                writer.write_frame(step, t, state)
                if measured:
                    writer.write_observables(step, t, measured)

    def _read_health(self, health: "_Health") -> Status | None:
        found = health.first_bad()
        if found is None:
            return None
        bad, kind = found
        t = self.time_at(bad)
        if kind == 1:
            return Status("nonfinite", bad, t, "the state has non-finite values (NaN or inf); try a smaller step")
        return Status("blowup", bad, t, f"max |value| exceeded the blow-up bound {self.blowup:g}")

    def _flush(self, writers):
        for writer in writers:
            flush = getattr(writer, "flush", None)
            if callable(flush):
                flush()

    # -- checkpoints -------------------------------------------------------------------------------------
    def _save_checkpoint(self, state, step, generator, history):
        from .io.checkpoint import save_checkpoint

        self._flush(self.writers)
        integrator_state = getattr(self.integrator, "state_dict", None)
        payload = {
            "format": "measureflow-checkpoint-1",
            "fingerprint": self.fingerprint(),
            "kind": state_kind(state),
            "tensors": {k: v.detach().cpu() for k, v in state.tensors().items()},
            "step": int(step),
            "time": float(self.time_at(step)),
            "generator": generator.get_state(),
            "integrator": integrator_state() if callable(integrator_state) else None,
            "history": {
                name: [(int(s), float(t), v.detach().cpu()) for s, t, v in entries]
                for name, entries in history.items()
            },
        }
        save_checkpoint(self.checkpoint_path, payload)

    def _load_checkpoint(self):
        from .io.checkpoint import load_checkpoint

        payload = load_checkpoint(self.checkpoint_path)
        if payload.get("fingerprint") != self.fingerprint():
            raise MeasureflowError(
                f"checkpoint {self.checkpoint_path} belongs to a different run (other field, parameters, "
                "seed or grid); delete it or point checkpoint= elsewhere"
            )
        device, dtype = self.state.device, self.state.dtype
        tensors = {k: v.to(device=device, dtype=dtype) for k, v in payload["tensors"].items()}
        state = state_from_tensors(payload["kind"], tensors)
        history = {o.name: [] for o in self.observers}
        for name, entries in payload["history"].items():
            history[name] = [(s, t, v.to(device)) for s, t, v in entries]
        return {
            "state": state,
            "step": int(payload["step"]),
            "generator": payload["generator"],
            "integrator": payload["integrator"],
            "history": history,
        }

    def _install_sigterm(self) -> Callable[[], None]:
        return install_sigterm(self._stop_flag)

    def request_stop(self) -> None:
        """Ask the loop to end cleanly at the end of the current step (as SIGTERM does)."""
        self._stop_flag.set()


def noise_seed(seed: int) -> int:
    """The seed of a run's noise stream, derived from the run's ``seed`` by a hash.

    Scripts commonly draw their initial particles with ``torch.Generator().manual_seed(seed)`` and
    pass the same ``seed`` to the Simulation; seeding the noise with ``seed`` itself would then
    replay the initial draw's normals as the first noise increments, correlating noise and state.
    """
    digest = hashlib.sha256(f"measureflow.noise:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def install_sigterm(flag: threading.Event) -> Callable[[], None]:
    """Make SIGTERM set ``flag`` (a loop polling it can end cleanly at the end of its current step);
    returns the function that puts the previous handler back. Outside the main thread, where
    handlers cannot be installed, nothing is changed."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        flag.set()

    try:
        signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        return lambda: None

    def restore():
        with contextlib.suppress(Exception):
            signal.signal(signal.SIGTERM, previous)

    return restore


def _fires(writer, step, last) -> bool:
    trigger = getattr(writer, "trigger", None)
    if trigger is None:
        return True
    return last or bool(trigger(step))


def _to_series(history) -> dict:
    out = {}
    for name, entries in history.items():
        if not entries:
            out[name] = Series(np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0))
            continue
        steps = np.array([s for s, _, _ in entries], dtype=np.int64)
        times = np.array([t for _, t, _ in entries], dtype=np.float64)
        values = torch.stack([v.to(torch.float64) if v.is_floating_point() else v for _, _, v in entries])
        out[name] = Series(steps, times, values.cpu().numpy())
    return out


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return json.loads(json.dumps(value, default=str))


def _progress_bar(total, initial, progress, field):
    if progress is False:
        return None
    from tqdm.auto import tqdm

    disable = None if progress is None else not progress
    if progress is None and os.environ.get("CI"):
        disable = True
    return tqdm(
        total=total,
        initial=initial,
        disable=disable,
        desc=f"measureflow {getattr(field, 'name', '')}".strip(),
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
    )
