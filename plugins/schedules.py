"""The built-in interpolation schedules (a_t, b_t) of MATH.md §1.3, noising convention.

| name | aₜ | bₜ | a = 0 | b = 0 |
|---|---|---|---|---|
| ``linear`` | 1 − t | t | t = 1 | t = 0 |
| ``cosine`` | cos(πt/2) | sin(πt/2) | t = 1 | t = 0 |
| ``overshoot`` | (1 − t)(1 − 2t) | t | t = ½, 1 | t = 0 |
| ``vp`` (OU, own time τ ∈ (0, ∞)) | e^{−τ} | √(1 − e^{−2τ}) | τ = ∞ | τ = 0 |
| ``lipman`` (σ_min) | 1 − t | σ_min + (1 − σ_min)t | t = 1 | none |

plus the generic ``reparametrised`` (a monotone time change λ of another schedule) and ``custom``
(two callables, derivatives by autograd) of :mod:`measureflow.schedules`.
"""

from __future__ import annotations

import math

import torch

import measureflow
from measureflow.schedules import CustomSchedule, ReparametrisedSchedule, Schedule
from measureflow.validators import check_probability

__all__ = ["LinearSchedule", "CosineSchedule", "OvershootSchedule", "VPSchedule", "LipmanSchedule"]

_HALF_PI = 0.5 * math.pi


class LinearSchedule(Schedule):
    """aₜ = 1 − t, bₜ = t on [0, 1] (MATH.md §1.3): the straight-line bridge."""

    name = "linear"
    time_range = (0.0, 1.0)
    singular = {"a_zero": (1.0,), "b_zero": (0.0,)}

    def _coefficients(self, t):
        one = torch.ones_like(t)
        return 1 - t, -one, t.clone(), one


class CosineSchedule(Schedule):
    """aₜ = cos(πt/2), bₜ = sin(πt/2) on [0, 1] (MATH.md §1.3).

    a is evaluated as sin(π(1 − t)/2) so that a₁ = 0 exactly and aₜ keeps full relative accuracy
    near t = 1; a' = −(π/2) bₜ, b' = (π/2) aₜ. It is the variance-preserving schedule after the
    time change τ = −log cos(πt/2).
    """

    name = "cosine"
    time_range = (0.0, 1.0)
    singular = {"a_zero": (1.0,), "b_zero": (0.0,)}

    def _coefficients(self, t):
        a = torch.sin(_HALF_PI * (1 - t))
        b = torch.sin(_HALF_PI * t)
        return a, -_HALF_PI * b, b, _HALF_PI * a


class OvershootSchedule(Schedule):
    """aₜ = (1 − t)(1 − 2t), bₜ = t on [0, 1] (MATH.md §1.3).

    a vanishes at t = ½ and t = 1; for t ∈ (½, 1) it is negative, so the mixture centres aₜcⱼ
    are reflected through 0. Not a time change of the linear bridge.
    """

    name = "overshoot"
    time_range = (0.0, 1.0)
    singular = {"a_zero": (0.5, 1.0), "b_zero": (0.0,)}

    def _coefficients(self, t):
        one = torch.ones_like(t)
        return (1 - t) * (1 - 2 * t), 4 * t - 3, t.clone(), one


class VPSchedule(Schedule):
    """Variance preserving (Ornstein–Uhlenbeck) in its own time τ ∈ (0, ∞) (MATH.md §1.3, §2):
    a = e^{−τ}, b = √(1 − e^{−2τ}), a' = −e^{−τ}, b' = e^{−2τ}/b.

    b is formed as √(−expm1(−2τ)) (no cancellation at small τ); b' ∼ (2τ)^{−1/2} blows up at the
    data end τ = 0, and a → 0 only as τ → ∞ (generation starts at a finite τ_max).
    """

    name = "vp"
    time_range = (0.0, math.inf)
    singular = {"a_zero": (math.inf,), "b_zero": (0.0,)}

    def _coefficients(self, t):
        a = torch.exp(-t)
        b = torch.sqrt(-torch.expm1(-2 * t))
        return a, -a, b, a * a / b


class LipmanSchedule(Schedule):
    """Lipman et al.'s optimal-transport path in the noising convention (MATH.md §1.3):
    aₜ = 1 − t, bₜ = σ_min + (1 − σ_min)t on [0, 1], 0 < σ_min < 1.

    b never vanishes (b₀ = σ_min: the data end is smoothed by N(0, σ_min²σ²I)), so the field is
    regular down to t = 0 even for atomic data. (Original form: Z_s = (1 − (1 − σ_min)s)Y + sX, s = 1 − t.)
    """

    name = "lipman"
    time_range = (0.0, 1.0)
    singular = {"a_zero": (1.0,), "b_zero": ()}

    def __init__(self, sigma_min: float = 1e-4):
        self.sigma_min = check_probability(
            sigma_min, "sigma_min", "schedule 'lipman'", open_interval=True,
            advice="b₀ = σ_min smooths the data end: pass a small number strictly between 0 and 1, such as 1e-4.",
        )

    def _coefficients(self, t):
        one = torch.ones_like(t)
        s = self.sigma_min
        return 1 - t, -one, s + (1 - s) * t, (1 - s) * one

    def describe(self):
        return {"name": self.name, "sigma_min": self.sigma_min}


@measureflow.hookimpl
def measureflow_register_schedules(registry) -> None:
    registry.add_schedule("linear", LinearSchedule)
    registry.add_schedule("cosine", CosineSchedule)
    registry.add_schedule("overshoot", OvershootSchedule)
    registry.add_schedule("vp", VPSchedule)
    registry.add_schedule("lipman", LipmanSchedule)
    registry.add_schedule("reparametrised", ReparametrisedSchedule)
    registry.add_schedule("custom", CustomSchedule)
