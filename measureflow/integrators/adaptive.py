"""Dormand–Prince 5(4) with PI step-size control ("dopri5").

Each :meth:`DormandPrince5.advance` call integrates from t0 to t1 (either direction) by as many
internal steps as the controller needs; the last one is clipped so that it lands exactly on t1
(bit for bit). The controller's proposal for the next step carries over from one call to the next
and is part of :meth:`~DormandPrince5.state_dict`, so a run resumed from a checkpoint takes the
same steps as one that never stopped.

Each internal step reads its scaled error norm (and for Gaussians the SPD check) back to the
host: one device synchronisation per internal step, inherent to adaptivity. A step is rejected and
retried with a smaller h when its error norm exceeds 1, is non-finite, or (Gaussian states) a
replica's covariance left the SPD cone; when the proposal falls below ``dt_min`` the call raises
:class:`~measureflow.integrators.StepFailure`.
"""

from __future__ import annotations

import math

import torch

from .base import Integrator, StepFailure, as_time
from .controller import PIController
from .runge_kutta import combine, rk_stages
from .systems import GaussianSystem, error_norm, system_for
from .tableau import DOPRI5, ButcherTableau

__all__ = ["DormandPrince5"]

# Landing on t1: a remainder this close to the proposal (relative) is taken in one step rather
# than leaving a sliver of a step behind.
_STRETCH = 1.01


class DormandPrince5(Integrator):
    """Adaptive Dormand–Prince 5(4) integrator (fifth-order solution, fourth-order error estimate,
    first-same-as-last).

    Error norm of a step: max over replicas of RMS( (y'₅ − y'₄) / (atol + rtol·max(|y|, |y'₅|)) );
    the step is kept when it is ≤ 1. The next step size follows :class:`PIController`.

    Parameters
    ----------
    rtol, atol:
        relative and absolute tolerances (defaults 1e-6, 1e-8).
    dt_min, dt_max:
        bounds of the step size (magnitudes); a step proposal below ``dt_min`` raises StepFailure.
        Only the final step of a call, clipped to land on t1, may be shorter than ``dt_min``.
    safety:
        controller safety factor (default 0.9).
    first_step:
        initial step size; by default it is chosen from the first derivative and a trial Euler step
        (two field evaluations, once per run; the first evaluation serves as the first stage).
    max_steps:
        internal steps allowed per ``advance`` call before StepFailure (guards against stalling).
    """

    name = "dopri5"
    order = 5
    adaptive = True
    stochastic = False

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
    ):
        super().__init__()
        if not tableau.embedded:
            raise ValueError(f"tableau {tableau.name!r} has no embedded error estimate (b_error)")
        self.tableau = tableau
        self.order = tableau.order
        self.controller = PIController(
            rtol=rtol, atol=atol, dt_min=dt_min, dt_max=dt_max, safety=safety, error_order=tableau.order - 1
        )
        if first_step is not None and not (float(first_step) > 0 and math.isfinite(float(first_step))):
            raise ValueError(f"first_step must be a positive finite step size; received {first_step!r}")
        self.first_step = None if first_step is None else float(first_step)
        if int(max_steps) < 1:
            raise ValueError(f"max_steps must be >= 1; received {max_steps!r}")
        self.max_steps = int(max_steps)
        self._dt: float | None = None if first_step is None else self.controller.clamp(self.first_step)
        self._err_prev = 1.0
        # f(t, y) at the end of the previous call, reused when the next call starts from exactly
        # the state this integrator returned (FSAL across output intervals).
        self._fsal = None

    @property
    def options(self) -> dict:
        c = self.controller
        return {
            "rtol": c.rtol,
            "atol": c.atol,
            "dt_min": c.dt_min,
            "dt_max": c.dt_max if math.isfinite(c.dt_max) else None,
            "safety": c.safety,
            "first_step": self.first_step,
            "max_steps": self.max_steps,
        }

    @property
    def dt(self) -> float | None:
        """The controller's proposal for the next step size (None before the first step)."""
        return self._dt

    # -- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        out = super().state_dict()
        out.update({"dt": self._dt, "err_prev": self._err_prev})
        return out

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        dt = state.get("dt")
        self._dt = None if dt is None else float(dt)
        self._err_prev = float(state.get("err_prev", 1.0))
        self._fsal = None

    # -- stepping ------------------------------------------------------------------------------------
    def advance(self, field, state, t0: float, t1: float, generator=None):
        """Integrate from t0 to t1, landing exactly on t1 (``generator`` is unused)."""
        self.check(field, state)
        t0, t1 = as_time(t0, "t0"), as_time(t1, "t1")
        if t0 == t1:
            return state
        system = system_for(state)
        ctl = self.controller
        tab = self.tableau
        direction = 1.0 if t1 > t0 else -1.0

        def rate(s, z):
            self.stats["nfev"] += 1
            return system.rate(field, s, state, z)

        y = system.pack(state)
        fsal = self._fsal
        if fsal is not None and fsal[0] is state and fsal[1] == t0:
            k1 = fsal[2]
        else:
            k1 = rate(t0, y)
        if self._dt is None:
            self._dt = ctl.clamp(self._initial_step(rate, t0, y, k1, direction))

        t = t0
        taken = 0
        while t != t1:
            if taken >= self.max_steps:
                raise StepFailure(
                    "too many steps",
                    t,
                    f"dopri5 took {self.max_steps} internal steps between t = {t0:.9g} and {t1:.9g}; "
                    "raise max_steps, loosen rtol/atol, or check the field for stiffness",
                )
            taken += 1
            remaining = abs(t1 - t)
            dt = self._dt
            if remaining <= _STRETCH * dt:
                h, t_new, clipped = t1 - t, t1, remaining < dt
            else:
                h = direction * dt
                t_new = t + h
                clipped = False

            ks = rk_stages(tab, rate, t, y, h, k1, stages=tab.stages - 1)
            y_new = combine(y, h, tab.b, ks)
            # The FSAL stage sits at (t + h, y'): evaluate it at t_new exactly so that a later call
            # starting from the returned state at t1 sees the bit-identical first stage.
            k_last = rate(t_new, y_new)
            ks.append(k_last)
            err_vec = combine(tuple(torch.zeros_like(c) for c in y), h, tab.b_error, ks)
            err = error_norm(err_vec, y, y_new, ctl.rtol, ctl.atol)
            if system is GaussianSystem:
                inside = GaussianSystem.admissible(y_new).to(err.dtype)
                err, inside = torch.stack([err, inside]).tolist()  # one host sync per step
            else:
                err, inside = float(err), 1.0  # one host sync per step
            self.stats["steps"] += 1
            accepted = inside == 1.0 and ctl.accept(err)
            if accepted:
                self.stats["accepted"] += 1
                factor = ctl.factor(err, self._err_prev, True)
                proposal = abs(h) * factor
                if clipped:
                    # A short landing step says little about the step the dynamics allow.
                    proposal = max(proposal, dt)
                self._dt = ctl.clamp(proposal)
                self._err_prev = max(err, 1e-4)
                t, y, k1 = t_new, y_new, k_last
            else:
                self.stats["rejected"] += 1
                factor = ctl.factor(err if inside == 1.0 else math.inf, self._err_prev, False)
                proposal = abs(h) * factor
                if proposal < ctl.dt_min:
                    why = "covariance left the SPD cone" if inside != 1.0 else (
                        "non-finite error estimate" if not math.isfinite(err) else f"error norm {err:.3g} > 1"
                    )
                    raise StepFailure(
                        f"step size fell below dt_min = {ctl.dt_min:g}",
                        t,
                        f"dopri5 rejected a step of h = {abs(h):.3g} ({why}); lower dt_min, loosen "
                        "rtol/atol, or check the field for a singularity near this time",
                    )
                self._dt = min(proposal, ctl.dt_max)

        out = system.unpack(state, y)
        self._fsal = (out, t1, k1)
        return out

    def _initial_step(self, rate, t0: float, y, f0, direction: float) -> float:
        """Starting step from the size of y, f(t0, y) and a trial Euler step (Hairer, Nørsett &
        Wanner, Solving ODEs I, §II.4): h = min(100·h₀, (0.01 / max(d₁, d₂))^(1/(p+1)))."""
        if self.first_step is not None:
            return self.first_step
        ctl = self.controller
        zeros = tuple(torch.zeros_like(c) for c in y)
        d0 = float(error_norm(y, y, zeros, ctl.rtol, ctl.atol))
        d1 = float(error_norm(f0, y, zeros, ctl.rtol, ctl.atol))
        h0 = 0.01 * d0 / d1 if (d0 > 1e-5 and d1 > 1e-5 and math.isfinite(d0 / d1)) else 1e-6
        y1 = combine(y, direction * h0, (1.0,), (f0,))
        f1 = rate(t0 + direction * h0, y1)
        diff = tuple(b - a for a, b in zip(f0, f1))
        d2 = float(error_norm(diff, y, zeros, ctl.rtol, ctl.atol)) / h0
        top = max(d1, d2)
        if not math.isfinite(top):
            return h0
        h1 = (0.01 / top) ** (1.0 / (self.order + 1)) if top > 1e-15 else max(1e-6, 1e-3 * h0)
        return min(100 * h0, h1)
