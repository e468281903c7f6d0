"""A run's integration: a solver under a controller, and what the run carries between intervals.

:class:`Stepper` is what a run loop (or a script) holds to cross its output intervals::

    stepper = Stepper(measureflow.integrator("dopri5"), field, state, noise=noise)
    for t0, t1 in zip(grid[:-1], grid[1:]):
        state = stepper.advance(state, t0, t1)
    stepper.stats          # {"nfev": …, "steps": …, "accepted": …, "rejected": …}

The solver and the controller are specs shared freely; everything that changes during a run — the
solver state (a first-same-as-last stage), the controller state (the step-size proposal), the
counters, the dense outputs of the last interval's steps — lives here, and
:meth:`Stepper.state_dict` holds what a resumed run needs to take the same steps.

Two optional members of a field are honoured for every solver:

* ``field.pieces(t0, t1) -> [(a, b, piece_field), …]`` cuts an interval where the field's
  parameters jump (a layer table of attention): each piece is integrated with its own field, so no
  step straddles a jump;
* ``field.project(state) -> state`` maps the state back onto a constraint set (tokens on the sphere)
  after every output interval.
"""

from __future__ import annotations

import math

import attrs

from ..errors import TimeRangeError
from . import compiled
from .compiled import CompiledStep
from .controllers import ConstantController
from .dynamics import STAT_KEYS, Dynamics

__all__ = ["Stepper", "Carry", "as_time"]


@attrs.define(eq=False)
class Carry:
    """What a run carries from one interval to the next: the solver's and the controller's state,
    and the dense outputs of the last interval's accepted steps (oldest first)."""

    solver_state: object = None
    controller_state: dict = attrs.field(factory=dict)
    dense: tuple = ()


class Stepper:
    """``solver`` advancing ``field`` from ``state`` under ``controller`` (see the module docstring).

    Parameters
    ----------
    solver:
        a :class:`~measureflow.integrators.Solver`.
    field:
        the velocity field.
    state:
        the run's initial state (its kind and fixed parts, e.g. weights).
    controller:
        the step-size controller; by default the solver's own (``solver.controller``).
    noise:
        the run's noise stream (a :class:`~measureflow.integrators.NoiseStream` or torch.Generator).
    channels:
        auxiliary :class:`~measureflow.integrators.Channel` rules integrated with the particles.
    compile:
        run each step compiled (:class:`~measureflow.integrators.CompiledStep`: stages, field
        evaluations and update as one ``torch.compile`` graph; CUDA graphs on a GPU). Explicit
        Runge–Kutta solvers only.
    """

    def __init__(self, solver, field, state, *, controller=None, noise=None, channels=(), compile: bool = False):
        solver.check(field, state)
        if compile:
            solver = CompiledStep(solver)
        self.solver = solver
        self.controller = controller or getattr(solver, "controller", None) or ConstantController()
        self.dynamics = Dynamics(field, state, noise=noise, channels=channels)
        self.carry = Carry(controller_state=self.controller.initial_state())
        self._pieces = getattr(field, "pieces", None) if callable(getattr(field, "pieces", None)) else None
        self._project = getattr(field, "project", None) if callable(getattr(field, "project", None)) else None

    @property
    def field(self):
        return self.dynamics.field

    @property
    def stats(self) -> dict:
        """Counters of the run's integration: field evaluations ("nfev"), steps attempted ("steps"),
        kept ("accepted"), discarded ("rejected"), and any a solver adds."""
        return self.dynamics.stats

    def advance(self, state, t0: float, t1: float):
        """The state at t1, from ``state`` at t0 (lands on t1 exactly)."""
        if type(t0) is not float or type(t1) is not float or not math.isfinite(t0 + t1):
            t0, t1 = as_time(t0, "t0"), as_time(t1, "t1")
        self.carry.dense = ()  # never left holding the previous interval's steps when this one fails
        if self._pieces is None:
            state = self.controller.integrate(self.solver, self.dynamics, t0, t1, state, self.carry)
        else:
            denses = []
            for a, b, piece in self._pieces(t0, t1):
                state = self.controller.integrate(self.solver, self.dynamics.bind(piece), a, b, state, self.carry)
                denses.extend(self.carry.dense)
            self.carry.dense = tuple(denses)
        return self._project(state) if self._project is not None else state

    @property
    def steps_at_once(self) -> int:
        """How many fixed-size steps :meth:`advance_steps` may take in one call: up to
        :data:`~measureflow.integrators.compiled.max_steps_at_once` for a compiled explicit
        Runge–Kutta solver under the plain :class:`~measureflow.integrators.ConstantController`
        (one step per interval) on particles without auxiliary channels, moving weights, pieces or
        a projection; 1 otherwise."""
        solver = self.solver
        if (isinstance(solver, CompiledStep) and solver.failure is None and type(self.controller) is ConstantController
                and self.dynamics.kind == "particles" and not self.dynamics.channels
                and not self.dynamics.moving_weights and self._pieces is None and self._project is None):
            return compiled.max_steps_at_once
        return 1

    def advance_steps(self, state, times):
        """The state at ``times[-1]`` from ``state`` at ``times[0]``, one step per interval of
        ``times`` taken as one compiled graph (only where :attr:`steps_at_once` allows as many), and
        the largest |x| after each step (on the device). Leaves the counters, the solver state and
        the dense output (the last step's) as :meth:`advance` over each interval would."""
        if len(times) - 1 > self.steps_at_once:
            raise ValueError(f"this stepper takes at most {self.steps_at_once} steps at once; asked {len(times) - 1}")
        times = [as_time(t, "t") for t in times]
        result, peaks = self.solver.steps(self.dynamics, times, state, self.carry.solver_state)
        n = len(times) - 1
        self.stats["steps"] += n
        self.stats["accepted"] += n
        self.carry.solver_state = result.solver_state
        self.carry.dense = (result.dense,)
        return result.y, peaks

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a resumed run needs to take the same steps (numbers only; the solver state, a
        derivative the next step can recompute, is not kept)."""
        return {"stats": dict(self.stats), "controller": dict(self.carry.controller_state)}

    def load_state_dict(self, saved: dict) -> None:
        stats = dict(saved.get("stats", {}))
        missing = set(STAT_KEYS) - set(stats)
        if missing:
            raise ValueError(f"saved integration state lacks the counters {sorted(missing)}")
        self.dynamics.stats.clear()
        self.dynamics.stats.update(stats)
        self.carry = Carry(controller_state={**self.controller.initial_state(), **dict(saved.get("controller", {}))})


def as_time(value, what: str) -> float:
    """A finite Python float (times stay on the host: stage times never touch the device)."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a real number; received {value!r}") from None
    if not math.isfinite(t):
        raise TimeRangeError(f"{what} must be finite; received {value!r}")
    return t

