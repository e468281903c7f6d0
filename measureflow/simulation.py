"""Simulation: state + field + integrator + time grid + operations + stop policy, checked once.

A :class:`Simulation` is a specification: built and validated in its constructor, never changed
afterwards (``with_state``, ``with_device``, ``with_checkpoint``, ``with_options`` and
:meth:`Simulation.stack` return new, re-checked objects). :meth:`Simulation.run` hands it to the one
run loop (:mod:`measureflow.run.loop`, which documents the per-step order) as a
:class:`SimulationProcess` — a fresh one per run, holding everything the run accumulates (the
integration :class:`~measureflow.integrators.Stepper`, the noise stream), so the same Simulation,
and the same integrator object, can run any number of times with identical results.
"""

from __future__ import annotations

import contextlib
import numbers
import os
from pathlib import Path
from typing import Any, Sequence

import attrs
import numpy as np
import torch

from . import __version__
from .errors import CapabilityError, MeasureflowError, ParameterError, StepFailure, TimeRangeError
from .density import LogDensity, check_log_density
from .events import Event, EventMonitor
from .fields import capabilities, field_parts, keep_graph
from .gradients import AdjointPlan, attach_adjoint, check_gradient, differentiable_parameters
from .integrators import BrownianTree, NoiseStream, Stepper, compilable, compile_available
from .io.base import Series
from .io.runinfo import run_fingerprint
from .jsonable import to_jsonable_lenient
from .io.memory import MemoryWriter
from .io.trajectory import Snapshot, Trajectory
from .packing import stack_simulations
from .plugins import get_registry
from .run import (
    Callback,
    Checkpointing,
    Observer,
    Operation,
    Process,
    Record,
    RunLoop,
    StopPolicy,
    TimeGrid,
    observer_list,
)
from .state import Particles, state_from_tensors, state_kind
from .status import Status
from .validators import check_finite_tensor, check_int

__all__ = ["Simulation", "Result", "Status", "Observer", "Series", "Callback", "SimulationProcess", "Recording"]

CHECKPOINT_FORMAT = "measureflow-checkpoint-2"


def _resolve_integrator(integrator):
    if isinstance(integrator, str):
        return get_registry().integrator(integrator)
    if not callable(getattr(integrator, "step", None)) or not callable(getattr(integrator, "check", None)):
        raise CapabilityError(
            "expected an integrator name or a measureflow.integrators.Solver (an object with "
            f"step(dynamics, t0, t1, y, solver_state) and check(field, state)); received {type(integrator).__name__}"
        )
    return integrator


def check_compilable(solver, gradient) -> None:
    """Refuse ``compile=True`` where it cannot apply, with a one-line reason."""
    if not compile_available():
        raise ParameterError("Simulation: compile=True needs torch.compile, which this torch does not support")
    if not compilable(solver):
        raise ParameterError(
            f"Simulation: compile=True compiles explicit Runge–Kutta steps (euler, heun, midpoint, rk4, dopri5); "
            f"integrator {getattr(solver, 'name', type(solver).__name__)!r} is not one"
        )
    if gradient is not None:
        raise ParameterError(f"Simulation: compile=True does not combine with gradient={gradient!r}; drop one")


def _resolve_writer(writer):
    if isinstance(writer, (str, os.PathLike)) and str(writer).endswith((".h5", ".hdf5", ".h5md")):
        return get_registry().writer("h5md", writer)
    if isinstance(writer, str):
        return get_registry().writer(writer)
    for method in ("open", "write_frame", "write_observables", "close"):
        if not callable(getattr(writer, method, None)):
            raise CapabilityError(f"writer {writer!r} has no {method}() method; see measureflow.io.Writer for the protocol")
    return writer


def _field_owners(field, registry) -> dict[str, str]:
    """Plugin name → version for every registered class that makes up ``field``."""
    found = {}
    for f in field_parts(field):
        for entry in registry.entries("fields"):
            if entry.obj is type(f):
                found[entry.owner] = entry.version
    return found


@attrs.frozen(eq=False)
class Recording:
    """What a run records: ``writers`` (trajectory sinks), ``observers`` (measured on their
    triggers), ``target`` (handed to distance observables), ``callbacks`` and any other
    ``operations`` (each with its trigger)."""

    writers: tuple = ()
    observers: tuple = ()
    target: Any = None
    callbacks: tuple = ()
    operations: tuple = ()


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
        ``"dopri5"``, ``"euler_maruyama"``…) or a :class:`~measureflow.integrators.Solver`. Default
        ``"rk4"``, or ``"euler_maruyama"`` for a field with a diffusion term on particles. Its
        controller (``measureflow.integrator("dopri5", controller=PIController(...))``) decides the
        steps between output times.
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
        seeds the run's noise stream (stochastic integrators) through
        :func:`~measureflow.integrators.noise_seed`, so the noise never replays a draw made with
        ``torch.Generator().manual_seed(seed)``. The stream is saved in checkpoints, so a resumed run
        draws the same noise.
    target:
        default target measure handed to distance observables.
    blowup, wall_time, check_every:
        the stop policy (:class:`~measureflow.run.StopPolicy`): stop when max |value| of the state
        exceeds ``blowup`` (None: never); after ``wall_time`` seconds (status ``time_budget``); also
        read the health record every ``check_every`` steps.
    checkpoint, checkpoint_every, resume:
        a checkpoint path, its trigger (default: every ``max(1, n // 10)`` steps), and whether
        :meth:`run` continues from an existing checkpoint.
    callbacks:
        :class:`~measureflow.run.Callback` objects or functions ``f(step, time, state)`` (called every
        step); a true result stops the run (status ``stopped``).
    operations:
        any other :class:`~measureflow.run.Operation` objects, each with its trigger.
    channels:
        auxiliary :class:`~measureflow.integrators.Channel` rules integrated with the particles.
    log_density, probes, probe:
        integrate the log-density channel d log ρ/dt = −∇·v with the particles (MATH.md §15.1,
        :mod:`measureflow.density`): ``"exact"`` (the field's declared ``divergence``, else the
        autograd trace) or ``"hutchinson"`` with ``probes`` probes per particle (``probe`` =
        ``"rademacher"`` or ``"gaussian"``) drawn from the run's noise stream. Read it as
        ``result.state.log_density`` (R, N); it starts from the state's ``log_density`` channel, or 0.
    gradient:
        ``"backprop"`` keeps the autograd graph through the solver; ``"adjoint"`` ties the final
        positions to the initial ones and to the field's trainable tensors by the continuous adjoint
        (memory independent of the number of steps). Then ``torch.autograd.grad(loss, A)`` works on
        ``result.state`` for any tensor A given to the field with ``requires_grad=True``
        (:mod:`measureflow.gradients`, MATH.md §15.5).
    compile:
        run each solver step compiled: its stages, field evaluations and update as one
        ``torch.compile`` graph (inductor on CPU, CUDA graphs on a GPU;
        :class:`~measureflow.integrators.CompiledStep`). Explicit Runge–Kutta integrators (``euler``,
        ``heun``, ``midpoint``, ``rk4``, ``dopri5``) only. Results equal eager steps up to rounding; a
        run compiles once (seconds) and later runs in the process reuse it; a field that fails to
        compile warns once and runs eagerly. Worth it where a step is many small operations (a small
        network, few particles); recorded in the run's parameters, so a compiled run resumes compiled.
        A fixed-step run of particles (no adaptive controller, events, channels, log-density or
        adjoint) takes up to 8 steps per compiled graph wherever no observer, writer, checkpoint,
        callback or health check is due in between: the same steps, frames and checkpoints, each
        step's times the grid's; a wall-clock budget or SIGTERM is then honoured at the end of such
        a chunk, and a run that goes non-finite inside one names its first bad step as before.
    events:
        :class:`~measureflow.Event` objects (``fn(t, state) -> (R,)``): sign changes are located on
        each step's dense output and listed in ``result.events``; a terminal one ends the run with
        status ``event`` at its time (:mod:`measureflow.events`).
    progress:
        None → a tqdm bar when stderr is a terminal (never under CI=true); True/False force it.
    parameters, description:
        scenario parameters and a one-line description, recorded in the trajectory file.
    noise_blocks:
        ``[(seed, replicas), …]``: the state's replicas form consecutive blocks, each drawing its
        noise from its own seed exactly as a run of those replicas with that seed would. Set by
        :meth:`stack`; None: one stream from ``seed``.
    brownian_depth:
        None (default): the noise is a stream of fresh normals. An integer k: the noise is one fixed
        Brownian path on [t0, t1] (:class:`~measureflow.integrators.BrownianTree`, seeded like the
        stream) resolved on 2^k equal intervals, so runs with the same seed and any step count
        dividing 2^k are driven by the same path (strong errors); every step boundary must lie on
        that grid.
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
        callbacks: Sequence = (),
        operations: Sequence = (),
        channels: Sequence = (),
        noise_blocks: Sequence | None = None,
        brownian_depth: int | None = None,
        log_density: str | None = None,
        probes: int = 1,
        probe: str = "rademacher",
        events: Sequence = (),
        gradient: str | None = None,
        compile: bool = False,
    ):
        arguments = dict(locals())
        arguments.pop("self")
        kind = state_kind(state)
        registry = get_registry()
        if isinstance(field, str):
            field = registry.field(field)
        caps = capabilities(field)
        if integrator is None:
            integrator = "euler_maruyama" if ("diffusion" in caps and kind == "particles") else "rk4"
        solver = _resolve_integrator(integrator)
        solver.check(field, state)

        grid = TimeGrid.from_arguments(t0, t1, steps, dt, times)
        for t in (grid.t0, grid.t1):
            field.check_time(t) if hasattr(field, "check_time") else None
        if grid.t1 < grid.t0 and "diffusion" in caps and kind == "particles":
            raise TimeRangeError(
                f"field {getattr(field, 'name', '?')!r} is stochastic and cannot be integrated backwards "
                f"(t1 = {grid.t1:g} < t0 = {grid.t0:g}); write the reverse-time SDE as its own field"
            )

        for name, every in (("observe_every", observe_every), ("checkpoint_every", checkpoint_every)):
            if isinstance(every, numbers.Number):  # a trigger object or a list of steps is checked as a trigger
                check_int(every, name, "Simulation", advice="Pass a whole number of steps ≥ 1, or a trigger.")
        default_every = observe_every if observe_every is not None else max(1, grid.steps // 100)
        recording = Recording(
            writers=tuple(_resolve_writer(w) for w in writers),
            observers=tuple(observer_list(observers, default_every)),
            target=check_finite_tensor(target, "target", "Simulation"),
            callbacks=tuple(c if isinstance(c, Callback) else Callback(c) for c in callbacks),
            operations=tuple(operations),
        )
        for op in recording.operations:
            if not isinstance(op, Operation):
                raise MeasureflowError(f"operations must be measureflow.run.Operation objects; received {op!r}")
        stop = StopPolicy(blowup=blowup, wall_time=wall_time, check_every=check_every)
        if resume and checkpoint is None:
            raise MeasureflowError("resume=True needs a checkpoint path (checkpoint='run.ckpt')")
        checkpointing = Checkpointing(
            path=checkpoint,
            every=(max(1, grid.steps // 10) if checkpoint_every is None else checkpoint_every) if checkpoint else None,
            resume=bool(resume),
        )
        if noise_blocks is not None:
            noise_blocks = tuple((int(s), int(r)) for s, r in noise_blocks)
            if sum(r for _, r in noise_blocks) != state.replicas:
                raise MeasureflowError(
                    f"noise_blocks cover {sum(r for _, r in noise_blocks)} replicas but the state has {state.replicas}"
                )

        if log_density is not None:
            check_log_density(field, state, log_density, probes, probe)
            if any(getattr(c, "name", None) == LogDensity.name for c in channels):
                raise MeasureflowError("log_density= adds the 'log_density' channel; drop it from channels=")

        events = tuple(events)
        for event in events:
            if not isinstance(event, Event):
                raise MeasureflowError(
                    f"events must be measureflow.Event(fn, terminal=..., direction=...) objects; received {event!r}")

        if gradient is not None:
            check_gradient(gradient, field, state, solver, log_density=log_density, events=events, resume=resume)
        if not isinstance(compile, bool):
            raise ParameterError(f"Simulation: compile must be True or False; received {compile!r}")
        if compile:
            check_compilable(solver, gradient)

        self._arguments = arguments
        self.state = state
        self.field = field
        self.integrator = solver
        self.grid = grid
        self.recording = recording
        self.stop = stop
        self.checkpointing = checkpointing
        self.seed = int(seed)
        self.channels = tuple(channels)
        self.progress = progress
        self.parameters = dict(parameters or {})
        self.description = description
        self.noise_blocks = noise_blocks
        self.brownian_depth = None if brownian_depth is None else check_int(
            brownian_depth, "brownian_depth", "Simulation", minimum=0)
        if self.brownian_depth is not None:
            path = BrownianTree(min(grid.t0, grid.t1), max(grid.t0, grid.t1), self.brownian_depth)
            for t in grid.all():
                path.grid_index(t)  # refuses a step boundary off the path's grid, before any step
        self.log_density = None if log_density is None else {"mode": log_density, "probes": int(probes),
                                                             "probe": probe}
        self.events = events
        self.gradient = gradient
        self.compile = compile
        self._loop = None
        self._checked = True

    def __setattr__(self, name, value):
        if getattr(self, "_checked", False) and name != "_loop":
            raise AttributeError(
                f"a Simulation is fixed once checked; cannot set {name!r}. Build a new one with "
                "with_state(), with_device(), with_checkpoint() or with_options()"
            )
        object.__setattr__(self, name, value)

    # -- derived views -------------------------------------------------------------------------------
    @property
    def t0(self) -> float:
        return self.grid.t0

    @property
    def t1(self) -> float:
        return self.grid.t1

    @property
    def n_steps(self) -> int:
        return self.grid.steps

    @property
    def writers(self) -> tuple:
        return self.recording.writers

    @property
    def observers(self) -> tuple:
        return self.recording.observers

    @property
    def target(self):
        return self.recording.target

    @property
    def blowup(self):
        return self.stop.blowup

    @property
    def wall_time(self):
        return self.stop.wall_time

    @property
    def check_every(self):
        return self.stop.check_every

    @property
    def checkpoint_path(self) -> Path | None:
        return self.checkpointing.path

    @property
    def checkpoint_trigger(self):
        return self.checkpointing.every

    @property
    def resume(self) -> bool:
        return self.checkpointing.resume

    def time_at(self, step: int) -> float:
        """tₖ computed from k (never accumulated, so the grid ends exactly at t1)."""
        return self.grid.time_at(step)

    # -- new, re-checked simulations -------------------------------------------------------------------
    def _replace(self, **changes) -> "Simulation":
        arguments = {**self._arguments, "field": self.field, "integrator": self.integrator,
                     "writers": self.recording.writers, "observers": self.recording.observers, **changes}
        return Simulation(**arguments)

    def with_state(self, state) -> "Simulation":
        """The same simulation from another initial state (checked again)."""
        return self._replace(state=state)

    def with_device(self, device=None, dtype=None) -> "Simulation":
        """The same simulation with its state (and target, when it has ``to``) on ``device`` / ``dtype``;
        fields move their own parameters to the state's device and dtype when they evaluate."""
        state = self.state.to(device=device, dtype=dtype)
        target = self.recording.target
        if target is not None and callable(getattr(target, "to", None)):
            target = target.to(device=device, dtype=dtype)
        return self._replace(state=state, target=target)

    def with_checkpoint(self, path, every=None, resume: bool | None = None) -> "Simulation":
        """The same simulation saving its checkpoint to ``path`` every ``every`` steps (default: a
        tenth of the run), resuming from it when ``resume``."""
        return self._replace(checkpoint=path, checkpoint_every=every,
                             resume=self.checkpointing.resume if resume is None else bool(resume))

    def with_options(self, **options) -> "Simulation":
        """The same simulation with other constructor arguments (``progress``, ``parameters``,
        ``description``, ``wall_time``, ``blowup``, ``callbacks``, ``writers``, ``state``…), checked
        again: any argument of the constructor."""
        unknown = set(options) - set(self._arguments)
        if unknown:
            raise MeasureflowError(f"with_options: unknown options {sorted(unknown)}; use Simulation's keywords")
        return self._replace(**options)

    @classmethod
    def stack(cls, simulations, *, parameters: dict | None = None) -> "Simulation":
        """One simulation advancing ``simulations`` — identical but for their seeds and initial
        states — as one batch of replicas: run i owns a block of consecutive replicas, draws its
        noise from its own seed, and each of its writers receives its own block of every frame, so
        every file is the one the run writes alone. Raises :class:`~measureflow.MeasureflowError`
        saying why when they cannot be stacked (see :func:`measureflow.packing.why_not_stackable`).
        The batch has no checkpoint of its own: give it one with :meth:`with_checkpoint`."""
        return stack_simulations(list(simulations), parameters=parameters)

    # -- what the file records --------------------------------------------------------------------------
    def run_parameters(self) -> dict:
        """What the trajectory file records under /parameters/measureflow."""
        registry = get_registry()
        describe = getattr(self.field, "describe", None)
        state = self.state
        out = {
            "parameters": self.parameters,
            "description": self.description,
            "seed": self.seed,
            "field": describe() if callable(describe) else {"name": getattr(self.field, "name", "?")},
            "integrator": {
                "name": getattr(self.integrator, "name", type(self.integrator).__name__),
                "options": to_jsonable_lenient(getattr(self.integrator, "options", {})),
            },
            "time": self.grid.describe(),
            "state": {"kind": state_kind(state), "replicas": state.replicas, "dim": state.dim,
                      "size": getattr(state, "size", 0), "dtype": str(state.dtype).replace("torch.", "")},
            "observables": [o.name for o in self.observers],
            "versions": {
                "measureflow": __version__,
                "torch": torch.__version__,
                "plugins": dict(sorted(registry.plugins.items())),
                "field_plugins": _field_owners(self.field, registry),
            },
        }
        if self.channels:
            out["channels"] = [c.describe() for c in self.channels]
        if self.brownian_depth is not None:
            out["brownian_depth"] = self.brownian_depth
        if self.log_density is not None:
            out["log_density"] = dict(self.log_density)
        if self.events:
            out["events"] = [e.describe() for e in self.events]
        if self.gradient is not None:
            out["gradient"] = self.gradient
        if self.compile:  # rounding differs from eager steps: a compiled run resumes compiled
            out["compile"] = True
        return out

    def fingerprint(self) -> str:
        """Hash of what determines the run's numbers (:func:`measureflow.io.runinfo.run_fingerprint`):
        a checkpoint or a finished file with another fingerprint belongs to another run."""
        return run_fingerprint(self.run_parameters())

    # -- running -------------------------------------------------------------------------------------------
    def operations(self) -> list[Operation]:
        """The run's operations: observers, writers, callbacks and the others, each with its trigger."""
        rec = self.recording
        return [*rec.observers, *(Record(w) for w in rec.writers), *rec.callbacks, *rec.operations]

    def run(self) -> "Result":
        """Run to t1 (or until a stop condition) and return a :class:`Result`."""
        process = SimulationProcess(self)
        loop = RunLoop(process, self.operations(), stop=self.stop, checkpointing=self.checkpointing,
                       progress=self.progress)
        self._loop = loop
        if self.gradient == "backprop":
            grad_mode = contextlib.ExitStack()
            grad_mode.enter_context(torch.enable_grad())
            grad_mode.enter_context(keep_graph())
        elif self.gradient == "adjoint":
            grad_mode = torch.no_grad()
        else:
            grad_mode = contextlib.nullcontext()
        try:
            with grad_mode:
                outcome = loop.run()
        finally:
            self._loop = None
            if process.events is not None and process.events.records:
                for writer in self.writers:
                    if callable(getattr(writer, "write_events", None)):
                        writer.write_events(process.events.records)
        state = outcome.state
        if process.adjoint is not None:
            state = state.with_positions(attach_adjoint(process.adjoint, self.state.x, state.x))
        return Result(
            state=state,
            status=outcome.status,
            grid=np.array(self.grid.all()),
            steps_done=outcome.steps_done,
            observables=_to_series(outcome.history),
            wall_time=outcome.wall_time,
            integrator_stats=dict(process.stepper.stats),
            writers=tuple(self.writers),
            parameters=self.run_parameters(),
            events=tuple(process.events.records) if process.events is not None else (),
        )

    def request_stop(self) -> None:
        """Ask a running :meth:`run` to end cleanly at the end of the current step (as SIGTERM does)."""
        loop = self._loop
        if loop is not None:
            loop.request_stop()

    def __repr__(self) -> str:
        return (f"Simulation({self.state!r}, field={getattr(self.field, 'name', '?')!r}, "
                f"integrator={getattr(self.integrator, 'name', '?')!r}, t0={self.t0:g}, t1={self.t1:g}, "
                f"steps={self.n_steps})")


class SimulationProcess(Process):
    """A :class:`Simulation` as the run loop drives it: a fresh stepper and noise stream per run."""

    unit = "step"
    checkpoint_format = CHECKPOINT_FORMAT
    differs = "other field, parameters, seed or grid"

    def __init__(self, simulation: Simulation):
        self.simulation = simulation
        self.n_steps = simulation.n_steps
        self.label = f"measureflow {getattr(simulation.field, 'name', '')}".strip()
        state = simulation.state
        depth = simulation.brownian_depth
        lo, hi = sorted((simulation.grid.t0, simulation.grid.t1))
        if simulation.noise_blocks:
            self.noise = (NoiseStream.for_blocks(simulation.noise_blocks, state.device) if depth is None else
                          BrownianTree.for_blocks(simulation.noise_blocks, lo, hi, depth, state.device))
        elif depth is None:
            self.noise = NoiseStream.for_run(simulation.seed, state.device)
        else:
            self.noise = BrownianTree.for_run(simulation.seed, lo, hi, depth, state.device)
        channels = simulation.channels
        self.log_density = None
        if simulation.log_density is not None:
            # A fresh channel per run: it holds the run's current Hutchinson probes.
            self.log_density = LogDensity(**simulation.log_density, noise=self.noise,
                                          create_graph=simulation.gradient == "backprop")
            channels = (*channels, self.log_density)
        self.stepper = Stepper(simulation.integrator, simulation.field, state, noise=self.noise,
                               channels=channels, compile=simulation.compile)
        self._is_gaussian = state_kind(state) == "gaussians"
        self._is_mixture = state_kind(state) == "mixtures"
        self._times = simulation.grid.all()
        self.events = EventMonitor(simulation.events) if simulation.events else None
        self._stop = None
        self.adjoint = None
        if simulation.gradient == "adjoint":
            self.adjoint = AdjointPlan(simulation.field, state, simulation.integrator.tableau,
                                       differentiable_parameters(simulation.field))

    def time_at(self, step: int) -> float:
        return self._times[step]

    def times(self) -> list[float]:
        return list(self._times)

    def start(self):
        state = self.simulation.state
        if self.stepper.dynamics.channels or self.stepper.dynamics.moving_weights:
            # The channels' initial values, so that step 0 is recorded with them.
            dynamics = self.stepper.dynamics
            state = dynamics.unpack(dynamics.pack(state), state)
        return state

    def advance(self, state, step: int):
        if self.log_density is not None:
            self.log_density.draw(state.x)
        t0, t1 = self._times[step], self._times[step + 1]
        events = self.events
        if events is not None and events.waiting:
            events.start(t0, state)
        self._stop = None
        try:
            new = self.stepper.advance(state, t0, t1)
        except StepFailure as exc:
            # A terminal event among the steps kept before the failure (a blow-up the event
            # anticipates) still ends the run cleanly at its time.
            hit = None if events is None else events.after(self.stepper.carry.dense, None, step + 1)
            if hit is None:
                # A step that failed on non-finite values from a finite state: when the field's own
                # output at the step's times is already non-finite, say so instead of advising a smaller step.
                verdict = None
                for t in (t0, exc.time, t1) if "non-finite" in exc.reason else ():
                    verdict = verdict or self._field_verdict(state, t)
                if verdict is None:
                    raise
                raise StepFailure(exc.reason, exc.time, verdict) from None
            new = None
        else:
            hit = None if events is None else events.after(self.stepper.carry.dense, new, step + 1)
        if self.adjoint is not None:
            self.adjoint.record(self.stepper.carry.dense)
        if events is not None:
            if hit is not None:
                t_event, new = hit
                names = sorted({r.name for r in events.records if r.terminal})
                self._stop = Status("event", step + 1, t_event, f"terminal event {', '.join(names)} at t = {t_event:.12g}")
        return new

    def steps_at_once(self, step: int) -> int:
        # Several steps in one compiled graph only where each step is the solver's step alone:
        # no events to locate, no Hutchinson probes to draw, no adjoint to record per step.
        if self.events is not None or self.log_density is not None or self.adjoint is not None:
            return 1
        return self.stepper.steps_at_once

    def advance_steps(self, state, step: int, k: int):
        """The state at step + k (``k`` ≤ :meth:`steps_at_once`) and |x|'s peak after each step."""
        return self.stepper.advance_steps(state, self._times[step: step + k + 1])

    def stop_request(self):
        return self._stop

    def health(self, state):
        if self._is_gaussian:
            return torch.cat([state.mean.flatten(), state.cov.flatten()])
        if self._is_mixture:
            w = torch.where(state.weights >= 0, state.weights, torch.full_like(state.weights, float("nan")))
            return torch.cat([w.flatten(), state.means.flatten(), state.covs.flatten()])
        if self.stepper.dynamics.moving_weights:
            # A negative weight is no measure: it counts as a non-finite value (MATH.md §15.6).
            w = state.weights
            w = torch.where(w >= 0, w, torch.full_like(w, float("nan")))
            return torch.cat([state.x.flatten(), w.flatten()])
        return state.x

    def observe_args(self) -> dict:
        return {"field": self.simulation.field, "target": self.simulation.target}

    def diagnose(self, bad_step: int, state, before=None) -> str:
        """Names the non-finite parts of ``state`` and, from the finite state ``before`` the first bad
        step, whether the field's output was already non-finite (the field's inputs are at fault) or
        one step turned finite values non-finite (the step size is)."""
        parts = {"mean": state.mean, "covariance": state.cov} if self._is_gaussian else {
            "positions": state.x, **({} if state.weights is None else {"weights": state.weights}),
            **{f"channel {k!r}": v for k, v in state.channels.items()}}
        bad = [name for name, value in parts.items()
               if value.is_floating_point() and not bool(torch.isfinite(value).all())]
        text = f"the state's {' and '.join(bad) or 'values'} became non-finite (NaN or inf) at step {bad_step}"
        if before is None:
            return (f"{text}; pass check_every=1 to learn whether the field's output or the step size is at fault "
                    "(the state before that step is no longer held)")
        t = self.time_at(bad_step - 1)
        verdict = self._field_verdict(before, t)
        if verdict is not None:
            return f"{text}: {verdict}"
        output = "affine closure (b, A)" if self._is_gaussian else "velocity"
        return (f"{text}: one step from a finite state, with a finite {output} of the field {self._field_name()!r} at "
                f"t = {t:.6g}, went non-finite; the step is too large there: try more steps or an adaptive integrator")

    def _field_name(self) -> str:
        return getattr(self.simulation.field, "name", type(self.simulation.field).__name__)

    def _field_verdict(self, state, t: float) -> str | None:
        """Why the field is to blame at (t, state), a finite state: its output is non-finite there,
        or it raises; None when its output is finite. Host reads: called only once a run has failed."""
        field = self._field_name()
        dynamics = self.stepper.dynamics
        try:
            rates = dynamics.rate(t, dynamics.pack(state))
        except Exception as exc:  # noqa: BLE001 - a diagnosis, not a run: report what the field said
            return f"the field {field!r} fails on the state at t = {t:.6g} ({type(exc).__name__}: {exc})"
        if all(bool(torch.isfinite(r).all()) for r in rates):
            return None
        output = "affine closure (b, A)" if self._is_gaussian else "velocity"
        values = dynamics.pack(state)
        largest = max(float(v.abs().max()) for v in values)
        if largest > torch.finfo(values[0].dtype).max ** 0.5:  # a square of it overflows
            return (f"the field {field!r} overflowed on a state already diverging (largest |value| {largest:.3g} at "
                    f"t = {t:.6g}); the flow blows up or the step is too large: try more steps, or a blowup= bound "
                    "to stop earlier")
        return (f"the field {field!r} returned a non-finite {output} at t = {t:.6g} from a finite state, so a smaller "
                "step will not help; check the field's parameters and target")

    def run_info(self, state, observable_shapes: dict, resume_step):
        from .io.runinfo import RunInfo

        weights = None
        if isinstance(state, Particles) and state.weights is not None:
            weights = state.weights.detach().cpu().numpy()
        return RunInfo(
            kind=state_kind(state),
            replicas=state.replicas,
            size=getattr(state, "size", 0),
            dim=state.dim,
            dtype=str(state.dtype).replace("torch.", ""),
            weights=weights,
            parameters=self.simulation.run_parameters(),
            observable_names=[o.name for o in self.simulation.observers],
            observable_shapes=observable_shapes,
            channels={k: tuple(v.shape[2:]) for k, v in getattr(state, "channels", {}).items()},
            resume_step=resume_step,
            fingerprint=self.fingerprint(),
            moving_weights=self.stepper.dynamics.moving_weights,
        )

    def fingerprint(self) -> str:
        return self.simulation.fingerprint()

    def state_dict(self, state) -> dict:
        return {
            "kind": state_kind(state),
            "tensors": {k: v.detach().cpu() for k, v in state.tensors().items()},
            "noise": self.noise.get_state(),
            "integrator": self.stepper.state_dict(),
        }

    def load_state_dict(self, saved: dict):
        template = self.simulation.state
        device, dtype = template.device, template.dtype
        tensors = {k: v.to(device=device, dtype=dtype) for k, v in saved["tensors"].items()}
        state = state_from_tensors(saved["kind"], tensors)
        self.noise.set_state(saved["noise"])
        self.stepper.load_state_dict(saved["integrator"])
        return state


@attrs.frozen
class Result(Trajectory):
    """What :meth:`Simulation.run` returns: the final ``state`` (at ``steps_done``), the ``status``,
    the time ``grid`` t_0 … t_n, the ``observables`` (name → :class:`~measureflow.io.Series`), the
    ``wall_time``, the integration counters, the run's writers and its recorded ``parameters``.

    A Result is a :class:`~measureflow.io.Trajectory`, so pictures and analyses take it directly: its
    frames are those of the run's first in-memory writer (``"memory"``), or else the final state as
    one frame.
    """

    state: Any
    status: Status
    grid: np.ndarray  # the time grid t0 … t1 (n + 1 values)
    steps_done: int
    observables: dict  # name -> Series (host numpy)
    wall_time: float
    integrator_stats: dict
    writers: tuple = ()
    parameters: dict = attrs.field(factory=dict)
    events: tuple = ()  # EventRecord objects, in time order (measureflow.events)

    @property
    def ok(self) -> bool:
        return self.status.ok

    @property
    def final_time(self) -> float:
        if self.status.code == "event":
            return float(self.status.time)
        return float(self.grid[self.steps_done])

    # -- the trajectory protocol ---------------------------------------------------------------------
    def _frames(self) -> Trajectory:
        for writer in self.writers:
            if isinstance(writer, MemoryWriter) and len(writer):
                return writer
        return Snapshot(self.state, time=self.final_time, step=self.steps_done)

    @property
    def kind(self) -> str:
        return state_kind(self.state)

    @property
    def replicas(self) -> int:
        return self.state.replicas

    @property
    def size(self) -> int:
        return getattr(self.state, "size", 0)

    @property
    def dim(self) -> int:
        return self.state.dim

    @property
    def steps(self) -> np.ndarray:
        return self._frames().steps

    @property
    def times(self) -> np.ndarray:
        return self._frames().times

    @property
    def positions(self):
        return self._frames().positions

    @property
    def weights(self):
        return self._frames().weights

    @property
    def channels(self) -> dict:
        return self._frames().channels

    @property
    def weight_frames(self):
        return self._frames().weight_frames

    @property
    def mixture_weights(self):
        return self._frames().mixture_weights

    @property
    def means(self):
        return self._frames().means

    @property
    def covs(self):
        return self._frames().covs

    def __len__(self) -> int:
        return len(self._frames())

    def __repr__(self) -> str:
        obs = ", ".join(self.observables) or "none"
        return f"Result(status={self.status}, state={self.state!r}, observables=[{obs}], wall_time={self.wall_time:.3g}s)"


def _to_series(history) -> dict:
    out = {}
    for name, entries in history.items():
        if not entries:
            out[name] = Series(name, np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0))
            continue
        steps = np.array([s for s, _, _ in entries], dtype=np.int64)
        times = np.array([t for _, t, _ in entries], dtype=np.float64)
        values = torch.stack([v.to(torch.float64) if v.is_floating_point() else v for _, _, v in entries])
        out[name] = Series(name, steps, times, values.cpu().numpy())
    return out

