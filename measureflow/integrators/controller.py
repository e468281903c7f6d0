"""Step-size control for embedded Runge–Kutta pairs: a PI controller (Gustafsson's form).

With the scaled error norm ‖e‖ (≤ 1 means "within tolerance") of a step of size h and the norm
‖e_prev‖ of the previous accepted step, the next step size is

    h_new = h · clip( safety · ‖e‖^(−α) · ‖e_prev‖^(β),  min_factor,  max_factor ),
    β = 0.2 / k,   α = 1/k − 0.75 β,   k = (order of the error estimate) + 1

(for Dormand–Prince 5(4), k = 5: α = 0.17, β = 0.04, the values of Hairer–Nørsett–Wanner's DOPRI5).
On a smooth problem the step sizes settle where safety · ‖e‖^(β − α) = 1, i.e. at an error
‖e‖ = safety^(1/(α − β)) ≈ 0.44 of the tolerance: the integral part smooths the step-size sequence
without making the steady error much smaller than asked (a larger β, e.g. Gustafsson's
β = 0.4/k with α = 0.7/k, settles at 0.9^(1/0.06) ≈ 0.17 of the tolerance and takes more steps).

After a rejected step the proportional part alone is used and the step never grows. The controller
is a frozen spec: what changes from step to step (the proposed h and ‖e_prev‖) is kept by the
integrator, which saves it in its state_dict so a resumed run takes the same steps.
"""

from __future__ import annotations

import math

import attrs

__all__ = ["PIController"]


def _positive(instance, attribute, value):
    if not (value > 0):
        raise ValueError(f"{attribute.name} must be > 0; received {value!r}")


def _nonnegative(instance, attribute, value):
    if not (value >= 0):
        raise ValueError(f"{attribute.name} must be >= 0; received {value!r}")


@attrs.frozen
class PIController:
    """PI step-size controller (see the module docstring).

    Parameters: ``rtol``, ``atol`` (error scale atol + rtol·max(|y|, |y'|)); ``dt_min`` (a proposal
    below it is a step failure), ``dt_max``; ``safety`` factor; ``min_factor``/``max_factor`` bound
    the change per step; ``error_order`` is the order of the embedded error estimate (4 for
    Dormand–Prince 5(4)).
    """

    rtol: float = attrs.field(default=1e-6, converter=float, validator=_nonnegative)
    atol: float = attrs.field(default=1e-8, converter=float, validator=_nonnegative)
    dt_min: float = attrs.field(default=1e-10, converter=float, validator=_nonnegative)
    dt_max: float = attrs.field(default=math.inf, converter=float, validator=_positive)
    safety: float = attrs.field(default=0.9, converter=float, validator=_positive)
    min_factor: float = attrs.field(default=0.2, converter=float, validator=_positive)
    max_factor: float = attrs.field(default=10.0, converter=float, validator=_positive)
    error_order: int = attrs.field(default=4, converter=int, validator=_positive)

    def __attrs_post_init__(self):
        if self.rtol == 0 and self.atol == 0:
            raise ValueError("rtol and atol cannot both be 0 (the error scale atol + rtol·|y| would vanish)")
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min = {self.dt_min:g} must not exceed dt_max = {self.dt_max:g}")
        if not (self.min_factor < 1 < self.max_factor):
            raise ValueError(
                f"need min_factor < 1 < max_factor; received min_factor = {self.min_factor:g}, "
                f"max_factor = {self.max_factor:g}"
            )
        if not (self.safety <= 1):
            raise ValueError(f"safety must lie in (0, 1]; received {self.safety:g}")

    @property
    def alpha(self) -> float:
        return 1.0 / (self.error_order + 1) - 0.75 * self.beta

    @property
    def beta(self) -> float:
        return 0.2 / (self.error_order + 1)

    def clamp(self, dt: float) -> float:
        """dt limited to [dt_min, dt_max]."""
        return min(max(dt, self.dt_min), self.dt_max)

    def accept(self, err: float) -> bool:
        return math.isfinite(err) and err <= 1.0

    def factor(self, err: float, err_prev: float, accepted: bool) -> float:
        """Multiplier of the step size after a step with scaled error ``err``."""
        if not math.isfinite(err):
            return self.min_factor
        if err == 0.0:
            return self.max_factor if accepted else self.min_factor
        if accepted:
            f = self.safety * err ** (-self.alpha) * err_prev**self.beta
            return min(self.max_factor, max(self.min_factor, f))
        # Rejected: proportional control only, and never grow.
        f = self.safety * err ** (-1.0 / (self.error_order + 1))
        return min(1.0, max(self.min_factor, f))
