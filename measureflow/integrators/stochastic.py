"""Euler–Maruyama for fields with a noise term dXₜ = v_t[μₜ](Xₜ) dt + σ(t) dWₜ.

One step of h = t1 − t0 > 0:

    x' = x + h·v_{t0}[μ](x) + σ(t0)·√h·ξ,    ξ ~ N(0, I) i.i.d. per particle and coordinate,

with ξ drawn from the run's seeded noise stream (:class:`~measureflow.integrators.NoiseStream`, held
by the run's :class:`~measureflow.integrators.Dynamics`) on the state's device and dtype, so the
noise is reproducible and checkpointed with the run. Weak order 1, strong order ½. The particle path
never synchronises with the host. Auxiliary channels take an explicit Euler step.

* A field without ``diffusion`` makes this exactly explicit Euler and draws nothing.
* A field with ``diagonal_diffusion(t, x)`` (state-dependent diagonal noise) uses it for σ.
* With a :class:`~measureflow.integrators.BrownianTree` as the run's noise, √h·ξ is the tree's
  increment over the step, so runs at several step sizes share one Brownian path.
* A Gaussian state is advanced deterministically: a field's ``affine`` closure is the law's velocity
  (probability flow), so the Gaussian step is the Euler pushforward m' = m + hb,
  Σ' = (I + hA)Σ(I + hA)ᵀ, under the SPD safeguard of the constant controller.
* h < 0 is refused: a diffusion cannot be run backwards in time by flipping the step.
"""

from __future__ import annotations

import math

from ..errors import TimeRangeError
from ..fields import capabilities
from .base import Solver, StepResult
from .brownian import BrownianTree
from .controllers import ConstantController
from .dense import LinearDense
from .dynamics import as_dynamics

__all__ = ["EulerMaruyama"]


class EulerMaruyama(Solver):
    """Euler–Maruyama (see the module docstring).

    Parameters
    ----------
    max_halvings:
        Gaussian states only, as for the fixed-step Runge–Kutta methods.
    controller:
        the controller it runs under (default: one step per output interval).
    """

    name = "euler_maruyama"
    order = 1  # weak order (strong order 1/2)
    weak_order = 1.0
    strong_order = 0.5
    adaptive = False
    stochastic = True

    def __init__(self, *, max_halvings: int = 10, controller=None):
        self.controller = controller if controller is not None else ConstantController(max_halvings=max_halvings)

    def uses_noise(self, field) -> bool:
        return "diffusion" in capabilities(field)

    def step(self, dynamics, t0: float, t1: float, y, solver_state=None, *, dt: float | None = None) -> StepResult:
        """One step from (t0, y) to t1 > t0, drawing from the run's noise stream."""
        h = t1 - t0 if dt is None else dt
        if h < 0:
            raise TimeRangeError(
                f"euler_maruyama integrates forward in time only; received t0 = {t0:.9g} > t1 = {t1:.9g}. "
                "Integrate the probability-flow ODE backwards with a deterministic integrator "
                "('euler', 'rk4', 'dopri5') instead"
            )
        dyn = as_dynamics(dynamics, y)
        y0 = dyn.pack(y)
        if dyn.kind == "gaussians":
            y1 = dyn.euler_pushforward(t0, y0, h)
            return StepResult(dyn.unpack(y1, y), None, LinearDense(dyn, t0, t1, y0, y1, y), None)
        rates = dyn.rate(t0, y0)
        x, v = y0[0], rates[0]
        x_new = x + h * v
        if dyn.has_diffusion:
            sigma = dyn.noise_coefficient(t0, x)
            if isinstance(dyn.noise, BrownianTree):
                x_new = x_new + sigma * dyn.brownian(t0, t0 + h, x).dW
            else:
                xi = dyn.standard_normal(x.shape, x)
                x_new = x_new + (sigma * math.sqrt(h)) * xi
        y1 = (x_new, *[c + h * r for c, r in zip(y0[1:], rates[1:])])
        return StepResult(dyn.unpack(y1, y), None, LinearDense(dyn, t0, t1, y0, y1, y), None)
