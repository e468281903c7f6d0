"""The solver protocol: one step as a function (DESIGN.md "integrator").

A solver takes one step and returns what it computed, keeping nothing about the run::

    y1, error, dense, solver_state = solver.step(dynamics, t0, t1, y0, solver_state)

* ``dynamics`` is the field bound to a run (:class:`~measureflow.integrators.Dynamics`): it packs a
  state into its integrated channels, evaluates their rates, draws the run's noise and counts the
  evaluations. A plain field is accepted too and bound on the spot (no noise, throwaway counters).
* ``y0`` and ``y1`` are states (:class:`~measureflow.Particles` or :class:`~measureflow.Gaussians`).
* ``error`` is the local error estimate as a tuple of tensors shaped like the channels (None for a
  method without an embedded estimate); an adaptive loop turns it into a scaled norm.
* ``dense`` is the step's dense output (:mod:`measureflow.integrators.dense`): ``dense(t)`` gives
  the state anywhere in [t0, t1] (events locate sign changes on it).
* ``solver_state`` is whatever the method carries from one step to the next (the first-same-as-last
  stage of Dormand–Prince); ``solver.init(...)`` gives the first one, and None is always valid.

Because the instance holds only its configuration (tableau, default controller, options), one solver
object can serve any number of runs, even at the same time, with identical results. What a run
accumulates — the step-size proposal, counters, the solver state — lives in its
:class:`~measureflow.integrators.Stepper`.

Particles follow ẋ = v_t[μ](x), the mean-field argument μ being the stage's own particles; Gaussians
follow ṁ = b, Σ̇ = AΣ + ΣAᵀ with (b, A) = field.affine(t, N(m, Σ)) (MATH.md §0, eq. 0.1).
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

from ..errors import StepFailure
from ..fields import check_compatible
from .dynamics import STAT_KEYS
from .stepper import Stepper, as_time

__all__ = ["Solver", "StepResult", "StepFailure", "STAT_KEYS", "as_time"]

class StepResult(NamedTuple):
    """What :meth:`Solver.step` returns: unpack it as ``y1, error, dense, solver_state``."""

    y: Any
    error: Any
    dense: Any
    solver_state: Any


class Solver(abc.ABC):
    """Base class of every integrator (built-in or third party).

    Class attributes: ``name`` (registry name); ``order`` (convergence order of a deterministic
    method); ``strong_order`` / ``weak_order`` (for a method that draws noise); ``adaptive`` (it gives
    an error estimate an adaptive controller can use); ``stochastic`` (it integrates a diffusion
    term); ``needs`` (what it uses of a field on a Gaussian state, when not ``affine``).

    ``controller`` is the step-size controller the method runs under when the caller gives none
    (:class:`~measureflow.integrators.ConstantController` for fixed-step methods).
    """

    name: str = "solver"
    order: int = 0
    strong_order: float | None = None
    weak_order: float | None = None
    adaptive: bool = False
    stochastic: bool = False
    needs: frozenset | None = None
    controller: Any = None

    @abc.abstractmethod
    def step(self, dynamics, t0: float, t1: float, y, solver_state=None) -> StepResult:
        """One step from ``y`` at ``t0`` to ``t1`` (t1 < t0 steps backwards where the method allows)."""

    def init(self, dynamics, t0: float, y) -> Any:
        """The solver state before the first step (None: nothing carried)."""
        return None

    def check(self, field, state) -> None:
        """Refuse a field/state combination this method cannot run (no device access); called once
        when a run is assembled."""
        check_compatible(field, state, stochastic_integrator=self.stochastic, needs=self.needs)

    def uses_noise(self, field) -> bool:
        """Whether a step of ``field`` draws from the run's noise stream."""
        return False

    @property
    def options(self) -> dict:
        """The constructor keyword arguments, JSON-serialisable (written to trajectory parameters):
        by default its controller's options."""
        controller = self.controller
        return dict(controller.options) if controller is not None else {}

    @property
    def max_halvings(self) -> int | None:
        """How many times a Gaussian step leaving the SPD cone is halved (its constant controller's)."""
        return getattr(self.controller, "max_halvings", None)

    def advance(self, field, state, t0: float, t1: float, noise=None):
        """Integrate ``state`` from t0 to t1 with a fresh run (a one-off :class:`Stepper`) and
        return the new state: a convenience for scripts. A loop over intervals should keep one
        Stepper instead, so that counters, the step-size proposal and FSAL stages carry over."""
        return Stepper(self, field, state, noise=noise).advance(state, t0, t1)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({self.name!r}{', ' if opts else ''}{opts})"
