"""Tableau-driven explicit Runge–Kutta steps: euler, heun, midpoint, rk4 and the adaptive dopri5.

One :meth:`ExplicitRungeKutta.step` is

    kᵢ = f(t + cᵢh, y + h Σ_{j<i} aᵢⱼkⱼ),   y' = y + h Σᵢ bᵢkᵢ,

on the state's integrated channels (:class:`~measureflow.integrators.Dynamics`), plus, for an
embedded pair, the error estimate h Σᵢ (bᵢ − b̂ᵢ)kᵢ. A particle step never reads a value back to
the host: stage times and coefficients are Python floats (a non-finite state is caught by the run's
health record). One-stage methods (Euler) advance a Gaussian by the pushforward
(I + hA)Σ(I + hA)ᵀ instead of Σ + h(AΣ + ΣAᵀ), which is positive semi-definite for every h.

What happens between steps — one step per output interval with the Gaussian SPD safeguard, or
error-controlled adaptive steps — is the controller's business
(:mod:`measureflow.integrators.controllers`).
"""

from __future__ import annotations

import math
from typing import Callable

import attrs
import torch

from .base import Solver, StepResult
from .combine import Tensors, combine
from .controllers import ConstantController, PIController
from .dense import HermiteDense, LinearDense, RungeKuttaDense
from .dynamics import as_dynamics
from .tableau import DOPRI5, ButcherTableau

__all__ = ["ExplicitRungeKutta", "DormandPrince5", "FirstStage", "rk_stages"]


def rk_stages(
    tableau: ButcherTableau,
    rate: Callable[[float, Tensors], Tensors],
    t: float,
    y: Tensors,
    h: float,
    k1: Tensors | None = None,
    *,
    stages: int | None = None,
) -> list[Tensors]:
    """The stage derivatives k₁ … k_s of one step (kᵢ = f(t + cᵢh, y + h Σⱼ aᵢⱼkⱼ)).

    ``k1`` may be given when f(t, y) is already known (FSAL); ``stages`` stops early (the FSAL
    stage of an embedded pair is evaluated by the caller at the new point).
    """
    n = tableau.stages if stages is None else stages
    ks = [k1 if k1 is not None else rate(t, y)]
    for i in range(1, n):
        y_i = combine(y, h, tableau.a[i], ks)
        ks.append(rate(t + tableau.c[i] * h, y_i))
    return ks


@attrs.frozen(eq=False)
class FirstStage:
    """The solver state of a first-same-as-last method: f(t, y) at the end of the last step, valid
    for a next step that starts from exactly those channels at exactly that time, with that field."""

    time: float
    field: object
    channels: tuple
    derivative: tuple

    def continues(self, field, t: float, channels) -> bool:
        return (
            self.time == t
            and self.field is field
            and len(self.channels) == len(channels)
            and all(a is b for a, b in zip(self.channels, channels))
        )


class ExplicitRungeKutta(Solver):
    """Explicit Runge–Kutta method given by a :class:`ButcherTableau` (see the module docstring).

    Parameters
    ----------
    tableau:
        the method (``EULER``, ``HEUN``, ``MIDPOINT``, ``RK4``, ``DOPRI5`` or your own).
    max_halvings:
        Gaussian states under the default constant controller: how many times a step that leaves
        the SPD cone is split in two before giving up with StepFailure (default 10, i.e. at most
        1024 substeps).
    controller:
        the step-size controller this method runs under by default:
        :class:`~measureflow.integrators.ConstantController` (one step per output interval) unless
        given; an embedded pair may take a :class:`~measureflow.integrators.PIController`.
    """

    stochastic = False

    def __init__(self, tableau: ButcherTableau, *, max_halvings: int = 10, controller=None):
        if not isinstance(tableau, ButcherTableau):
            raise TypeError(f"ExplicitRungeKutta needs a ButcherTableau; received {type(tableau).__name__}")
        self.tableau = tableau
        self.name = tableau.name
        self.order = tableau.order
        self.adaptive = tableau.embedded
        if controller is None:
            controller = ConstantController(max_halvings=max_halvings)
        elif isinstance(controller, PIController) and not tableau.embedded:
            raise ValueError(
                f"{tableau.name!r} has no embedded error estimate, so a PIController cannot adapt its step; "
                "use a ConstantController or an embedded pair such as 'dopri5'"
            )
        self.controller = controller

    @property
    def error_order(self) -> int:
        """Order of the embedded error estimate (one less than the method's)."""
        return self.tableau.order - 1

    # -- stepping -------------------------------------------------------------------------------------
    def init(self, dynamics, t0: float, y):
        """f(t0, y) for a first-same-as-last method (its first stage), else None."""
        if not self.tableau.fsal:
            return None
        dyn = as_dynamics(dynamics, y)
        channels = dyn.pack(y)
        return FirstStage(float(t0), dyn.field, channels, dyn.rate(t0, channels))

    def continues(self, dynamics, t0: float, y, solver_state) -> bool:
        """Whether ``solver_state`` is valid for a step from (t0, y)."""
        if not isinstance(solver_state, FirstStage):
            return not self.tableau.fsal
        dyn = as_dynamics(dynamics, y)
        return solver_state.continues(dyn.field, t0, dyn.pack(y))

    def stage_update(self, rate, t0: float, t1: float, h: float, y0: Tensors, k1: Tensors | None = None):
        """The tensor work of one step, ``(y', [k₁ … k_s], error)`` from the channels ``y0`` at t0
        (error None without an embedded pair). ``rate(t, y)`` evaluates the field; ``k1`` is f(t0, y0)
        when already known (FSAL). It evaluates ``rate`` ``self.evaluations(k1)`` times. Pure in its
        arguments, so :class:`~measureflow.integrators.CompiledStep` compiles it as one graph."""
        tab = self.tableau
        if tab.fsal:
            ks = rk_stages(tab, rate, t0, y0, h, k1, stages=tab.stages - 1)
            y1 = combine(y0, h, tab.b, ks)
            # The last stage sits at (t1, y'): evaluated at t1 exactly, so that a next step starting
            # from the returned state at t1 sees the bit-identical first stage.
            ks.append(rate(t1, y1))
        else:
            ks = rk_stages(tab, rate, t0, y0, h, k1)
            y1 = combine(y0, h, tab.b, ks)
        error = None
        if tab.embedded:
            error = combine(tuple(torch.zeros_like(c) for c in y0), h, tab.b_error, ks)
        return y1, ks, error

    def evaluations(self, k1=None) -> int:
        """Field evaluations of one :meth:`stage_update` (one fewer when the first stage is given)."""
        return self.tableau.stages - (k1 is not None)

    def step(self, dynamics, t0: float, t1: float, y, solver_state=None, *, dt: float | None = None,
             update=None) -> StepResult:
        """One step from (t0, y) to t1. ``dt`` is the step length when the caller computed it (the
        stage times are t0 + cᵢ·dt with the caller's rounding); by default t1 − t0. ``update``
        replaces :meth:`stage_update` with a function of the same signature less ``rate`` (a
        compiled one: :class:`~measureflow.integrators.CompiledStep`); it must count nothing."""
        dyn = as_dynamics(dynamics, y)
        h = t1 - t0 if dt is None else dt
        tab = self.tableau
        y0 = dyn.pack(y)
        if dyn.kind == "gaussians" and tab.stages == 1:
            y1 = dyn.euler_pushforward(t0, y0, h)
            return StepResult(dyn.unpack(y1, y), None, LinearDense(dyn, t0, t1, y0, y1, y), None)
        k1 = None
        if isinstance(solver_state, FirstStage) and solver_state.continues(dyn.field, t0, y0):
            k1 = solver_state.derivative
        if update is None:
            y1, ks, error = self.stage_update(dyn.rate, t0, t1, h, y0, k1)
        else:
            y1, ks, error = update(dyn, t0, t1, h, y0, k1)
            dyn.stats["nfev"] += self.evaluations(k1)
        return self.result(dyn, t0, t1, y, y0, y1, ks, error)

    def result(self, dyn, t0: float, t1: float, y, y0: Tensors, y1: Tensors, ks, error) -> StepResult:
        """The :class:`StepResult` of a step from the channels ``y0`` at t0 (state ``y``, the template
        of fixed parts) to ``y1`` at t1 with stages ``ks``: the new state, its first-same-as-last
        stage and the step's dense output."""
        tab = self.tableau
        out = dyn.unpack(y1, y)
        # Keyed on the returned state's own tensors: the next step packs exactly those.
        state = FirstStage(float(t1), dyn.field, dyn.pack(out), ks[-1]) if tab.fsal else None
        if tab.dense is not None:
            dense = RungeKuttaDense(dyn, t0, t1, y0, y1, y, ks, tab.dense)
        else:
            dense = HermiteDense(dyn, t0, t1, y0, y1, y, ks[0], ks[-1] if tab.fsal else None)
        return StepResult(out, error, dense, state)


class DormandPrince5(ExplicitRungeKutta):
    """Adaptive Dormand–Prince 5(4) ("dopri5"): fifth-order solution, fourth-order error estimate,
    first-same-as-last, under a :class:`~measureflow.integrators.PIController`.

    The keyword arguments build the controller (see :class:`PIController`): ``rtol``, ``atol``
    (defaults 1e-6, 1e-8), ``dt_min``, ``dt_max``, ``safety``, ``first_step``, ``max_steps``; or give
    ``controller=`` yourself (a :class:`ConstantController` makes it a fixed-step fifth-order method).
    """

    def __init__(
        self,
        rtol: float = 1e-6,
        atol: float = 1e-8,
        dt_min: float = 1e-10,
        dt_max: float = math.inf,
        safety: float = 0.9,
        first_step: float | None = None,
        max_steps: int = 100_000,
        *,
        tableau: ButcherTableau = DOPRI5,
        controller=None,
    ):
        if not tableau.embedded:
            raise ValueError(f"tableau {tableau.name!r} has no embedded error estimate (b_error)")
        if controller is None:
            controller = PIController(rtol=rtol, atol=atol, dt_min=dt_min, dt_max=dt_max, safety=safety,
                                      first_step=first_step, max_steps=max_steps, error_order=tableau.order - 1)
        super().__init__(tableau, controller=controller)
        self.name = "dopri5" if tableau is DOPRI5 else tableau.name
