"""Higher-order SDE solvers: stochastic Heun, the additive-noise Runge–Kutta SRA1 and Milstein
(MATH.md §15.3).

They integrate dXₜ = f_t(Xₜ) dt + g dWₜ for a field with a noise term (``diffusion(t)``, the
scalar g(t) of additive noise, or ``diagonal_diffusion(t, x)``, state-dependent diagonal noise),
forward in time, one step from t0 to t1 = t0 + h with ΔW (and the Lévy area H) from the run's noise
(:meth:`~measureflow.integrators.Dynamics.brownian`). With a
:class:`~measureflow.integrators.BrownianTree` as the noise, runs at different step sizes are driven
by the same Brownian path, which is how strong orders are measured.

``stochastic_heun`` (strong order 1 for additive noise)::

    x̃ = x + h f(t0, x) + g(t0) ΔW,
    x' = x + (h/2)(f(t0, x) + f(t1, x̃)) + ½(g(t0) + g(t1)) ΔW.

``sra`` — Rößler's SRA1 for additive noise (strong order 1.5, weak order 2), with
χ = I₍₁,₀₎/h = ΔW/2 + H::

    H₂ = x + (3/4) h f(t0, x) + (3/2) g(t1) χ,
    x' = x + h((1/3) f(t0, x) + (2/3) f(t0 + 3h/4, H₂)) + g(t1)(ΔW − χ) + g(t0) χ.

``milstein`` — for diagonal noise σᵢ(t, x) depending on xᵢ (strong order 1; with additive noise it is
Euler–Maruyama)::

    x'ᵢ = xᵢ + h fᵢ + σᵢ ΔWᵢ + ½ σᵢ ∂ᵢσᵢ (ΔWᵢ² − h),

∂ᵢσᵢ by autograd. Heun and SRA1 treat additive noise only (their Stratonovich and Itô solutions
agree there) and refuse a field with ``diagonal_diffusion``.

Auxiliary channels follow the deterministic part of each method. A Gaussian state is advanced by the
deterministic method on the field's closure (the law's velocity, MATH.md §15.2): Heun's tableau for
``stochastic_heun``, the drift tableau of SRA1 (nodes 0, 3/4, weights 1/3, 2/3) for ``sra`` and the
Euler pushforward for ``milstein``.
"""

from __future__ import annotations

import abc

import torch

from ..errors import CapabilityError, TimeRangeError
from ..fields import capabilities
from .base import Solver, StepResult
from .combine import combine
from .controllers import ConstantController
from .dense import LinearDense
from .dynamics import as_dynamics
from .runge_kutta import rk_stages
from .tableau import HEUN, ButcherTableau

__all__ = ["StochasticHeun", "SRA1", "Milstein", "SRA1_DRIFT"]

#: The deterministic part of SRA1 (Ralston's second-order pair of nodes 0, 3/4), used for Gaussian states.
SRA1_DRIFT = ButcherTableau(name="sra1_drift", order=2, c=(0.0, 0.75), a=((), (0.75,)), b=(1 / 3, 2 / 3))


class _SDESolver(Solver):
    """What the SDE solvers share: forward steps only, a field with noise, a constant controller."""

    adaptive = False
    stochastic = True
    additive_only = True
    gaussian_tableau: ButcherTableau | None = None

    def __init__(self, *, max_halvings: int = 10, controller=None):
        self.controller = controller if controller is not None else ConstantController(max_halvings=max_halvings)

    def uses_noise(self, field) -> bool:
        return "diffusion" in capabilities(field)

    def check(self, field, state) -> None:
        super().check(field, state)
        name = getattr(field, "name", type(field).__name__)
        if "diffusion" not in capabilities(field):
            raise CapabilityError(
                f"{self.name} integrates SDEs, but field {name!r} has no noise term (no diffusion()); use a "
                "deterministic integrator ('heun', 'rk4', 'dopri5') or give the field a noise level"
            )
        if self.additive_only and callable(getattr(field, "diagonal_diffusion", None)):
            raise CapabilityError(
                f"{self.name} handles additive noise g(t) only, and field {name!r} has state-dependent noise "
                "(diagonal_diffusion); use 'milstein' or 'euler_maruyama'"
            )

    def _forward(self, t0: float, t1: float, dt) -> float:
        h = t1 - t0 if dt is None else dt
        if h < 0:
            raise TimeRangeError(
                f"{self.name} integrates forward in time only; received t0 = {t0:.9g} > t1 = {t1:.9g}. Write the "
                "reverse-time SDE as a field running forward in its own time (flow_sde with direction='reverse')"
            )
        return h

    def _gaussian_step(self, dyn, t0: float, h: float, y0):
        if self.gaussian_tableau is None:
            return dyn.euler_pushforward(t0, y0, h)
        ks = rk_stages(self.gaussian_tableau, dyn.rate, t0, y0, h)
        return combine(y0, h, self.gaussian_tableau.b, ks)

    def step(self, dynamics, t0: float, t1: float, y, solver_state=None, *, dt: float | None = None) -> StepResult:
        """One step from (t0, y) to t0 + h, drawing from the run's noise."""
        h = self._forward(t0, t1, dt)
        dyn = as_dynamics(dynamics, y)
        y0 = dyn.pack(y)
        if dyn.kind == "gaussians":
            y1 = self._gaussian_step(dyn, t0, h, y0)
        else:
            y1 = self._particle_step(dyn, t0, h, y0)
        return StepResult(dyn.unpack(y1, y), None, LinearDense(dyn, t0, t0 + h, y0, y1, y), None)

    @abc.abstractmethod
    def _particle_step(self, dyn, t0: float, h: float, y0):
        """The channels after one step of particles from t0 to t0 + h."""


def _with_positions(y, x):
    return (x, *y[1:])


class StochasticHeun(_SDESolver):
    """Stochastic Heun (module docstring): strong order 1, weak order 1 for additive noise."""

    name = "stochastic_heun"
    order = 1
    strong_order = 1.0
    weak_order = 1.0
    gaussian_tableau = HEUN

    def _particle_step(self, dyn, t0, h, y0):
        t1 = t0 + h
        x = y0[0]
        dW = dyn.brownian(t0, t1, x).dW
        g0, g1 = dyn.noise_coefficient(t0, x), dyn.noise_coefficient(t1, x)
        k1 = dyn.rate(t0, y0)
        pred = combine(y0, h, (1.0,), (k1,))
        pred = _with_positions(pred, pred[0] + g0 * dW)
        k2 = dyn.rate(t1, pred)
        y1 = combine(y0, h, (0.5, 0.5), (k1, k2))
        return _with_positions(y1, y1[0] + (0.5 * (g0 + g1)) * dW)


class SRA1(_SDESolver):
    """Rößler's SRA1 for additive noise (module docstring): strong order 1.5, weak order 2."""

    name = "sra"
    order = 2
    strong_order = 1.5
    weak_order = 2.0
    gaussian_tableau = SRA1_DRIFT

    def _particle_step(self, dyn, t0, h, y0):
        t1 = t0 + h
        x = y0[0]
        inc = dyn.brownian(t0, t1, x, levy=True)
        chi = 0.5 * inc.dW + inc.H  # I₍₁,₀₎ / h
        g0, g1 = dyn.noise_coefficient(t0, x), dyn.noise_coefficient(t1, x)
        k1 = dyn.rate(t0, y0)
        stage = combine(y0, h, (0.75,), (k1,))
        stage = _with_positions(stage, stage[0] + (1.5 * g1) * chi)
        k2 = dyn.rate(t0 + 0.75 * h, stage)
        y1 = combine(y0, h, SRA1_DRIFT.b, (k1, k2))
        return _with_positions(y1, y1[0] + g1 * (inc.dW - chi) + g0 * chi)


class Milstein(_SDESolver):
    """Milstein for diagonal noise (module docstring): strong order 1, weak order 1."""

    name = "milstein"
    order = 1
    strong_order = 1.0
    weak_order = 1.0
    additive_only = False

    def _particle_step(self, dyn, t0, h, y0):
        x = y0[0]
        dW = dyn.brownian(t0, t0 + h, x).dW
        k1 = dyn.rate(t0, y0)
        y1 = combine(y0, h, (1.0,), (k1,))
        if not dyn.diagonal_noise:
            return _with_positions(y1, y1[0] + dyn.noise_coefficient(t0, x) * dW)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            sigma = dyn.noise_coefficient(t0, xg)
            (slope,) = torch.autograd.grad(sigma.sum(), xg)
        sigma = sigma.detach()
        correction = (0.5 * sigma * slope) * (dW * dW - h)
        return _with_positions(y1, y1[0] + sigma * dW + correction)
