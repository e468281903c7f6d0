"""Generalised entropies: the porous-medium flow on particles by the blob method (MATH.md §15.8, [S] §5.2).

``porous_medium`` (:class:`PorousMediumField`) descends F(ρ) = ∫ ρ^m/(m − 1) dx, m > 1, whose Wasserstein
flow is ∂ₜρ = Δρ^m with velocity v = −(m/(m − 1))∇ρ^{m−1} = −mρ^{m−2}∇ρ. Particles carry no density, so
the blob method replaces ρ by ρ̃ = K_ε*μ = Σⱼ wⱼ N(·; xⱼ, εI) (ε a variance, first order in ε):

    v(x) = −m ρ̃(x)^{m−2} ∇ρ̃(x),     ρ̃ and ∇ρ̃ from one :func:`measureflow.reductions.kernel_sum` pass
                                     (Gaussian kernel of bandwidth √ε, times (2πε)^{−d/2}).

The Barenblatt profile ρ(t, x) = t^{−a}(C − κ|x|²t^{−2a/d})₊^{1/(m−1)}, a = d/(d(m − 1) + 2),
κ = a(m − 1)/(2md), is the self-similar solution; its second moment grows as t^{2a/d} exactly
(:func:`barenblatt_profile`, :func:`barenblatt_second_moment`, :func:`barenblatt_particles`).

``energy``: F̃(μ) = Σᵢ wᵢ ρ̃(xᵢ)^{m−1}/(m − 1) (the blob estimate of ∫ρ^m/(m − 1)); ``first_variation``
(m/(m − 1))ρ̃^{m−1} for the Fisher–Rao / WFR geometries (F is defined on positive measures).
Particles only; autonomous (every t).
"""

from __future__ import annotations

import math

import numpy as np
import torch

import measureflow
from measureflow.errors import CapabilityError, ParameterError
from measureflow.fields import Field
from measureflow.reductions import measure_kernel_sum
from measureflow.state import Particles
from measureflow.targets import check_points
from measureflow.validators import check_positive

__all__ = ["PorousMediumField", "barenblatt_exponent", "barenblatt_profile", "barenblatt_second_moment",
           "barenblatt_particles"]


def barenblatt_exponent(m: float, d: int) -> tuple[float, float]:
    """(a, κ) of the Barenblatt solution: a = d/(d(m − 1) + 2), κ = a(m − 1)/(2md)."""
    a = d / (d * (m - 1.0) + 2.0)
    return a, a * (m - 1.0) / (2.0 * m * d)


def _radial_mass(C: float, kappa: float, m: float, d: int) -> float:
    """∫ (C − κ|x|²)₊^{1/(m−1)} dx over ℝ^d (a Beta integral)."""
    R2 = C / kappa
    p = 1.0 / (m - 1.0)
    sphere = 2.0 * math.pi ** (d / 2) / math.gamma(d / 2)
    # ∫₀^R (C − κr²)^p r^{d−1} dr = ½ C^p R^d B(d/2, p + 1)
    beta = math.gamma(d / 2) * math.gamma(p + 1) / math.gamma(d / 2 + p + 1)
    return sphere * 0.5 * C**p * R2 ** (d / 2) * beta


def _unit_mass_constant(m: float, d: int) -> float:
    """C making the Barenblatt profile a probability density (the mass is C^{p + d/2} times a constant)."""
    _, kappa = barenblatt_exponent(m, d)
    p = 1.0 / (m - 1.0)
    return (1.0 / _radial_mass(1.0, kappa, m, d)) ** (1.0 / (p + d / 2))


def barenblatt_profile(t: float, x: torch.Tensor, m: float) -> torch.Tensor:
    """ρ(t, x) of unit mass at points x (..., d), shape x.shape[:-1]."""
    d = x.shape[-1]
    a, kappa = barenblatt_exponent(m, d)
    C = _unit_mass_constant(m, d)
    core = (C - kappa * (x * x).sum(-1) * t ** (-2 * a / d)).clamp_min(0)
    return t ** (-a) * core ** (1.0 / (m - 1.0))


def barenblatt_second_moment(t: float, m: float, d: int) -> float:
    """∫|x|²ρ(t, x)dx = M₂(1) t^{2a/d} for the unit-mass profile."""
    a, kappa = barenblatt_exponent(m, d)
    C = _unit_mass_constant(m, d)
    p = 1.0 / (m - 1.0)
    # radial law ∝ (R² − r²)^p r^{d−1} on [0, R], R² = C/κ: E r² = R² · (d/2)/(d/2 + p + 1)
    return (C / kappa) * (d / 2) / (d / 2 + p + 1) * t ** (2 * a / d)


def barenblatt_particles(n: int, m: float, d: int, t: float = 1.0, *, dtype=torch.float64) -> Particles:
    """n equal-weight particles placed at quantiles of the Barenblatt profile at time t (deterministic):
    radii at the midpoint quantiles of the radial law (d = 1: signed), directions along a Fibonacci
    spiral (d = 2) — a low-discrepancy sample, so the moments are close to the profile's."""
    a, kappa = barenblatt_exponent(m, d)
    C = _unit_mass_constant(m, d)
    R = math.sqrt(C / kappa) * t ** (a / d)
    p = 1.0 / (m - 1.0)
    grid = np.linspace(0.0, 1.0, 20001)
    if d == 1:
        s = np.linspace(-1.0, 1.0, 40001)
        cdf = np.cumsum((1.0 - s * s) ** p)
        cdf = (cdf - cdf[0]) / (cdf[-1] - cdf[0])
        x = np.interp((np.arange(n) + 0.5) / n, cdf, s)[:, None] * R
    elif d == 2:
        cdf = np.cumsum((1.0 - grid**2) ** p * grid)
        cdf = (cdf - cdf[0]) / (cdf[-1] - cdf[0])
        r = np.interp((np.arange(n) + 0.5) / n, cdf, grid) * R
        angle = np.arange(n) * math.pi * (3.0 - math.sqrt(5.0))
        x = np.stack([r * np.cos(angle), r * np.sin(angle)], axis=-1)
    else:
        raise ParameterError(f"barenblatt_particles: d must be 1 or 2; received {d}")
    return Particles(torch.as_tensor(x, dtype=dtype)[None])


class PorousMediumField(Field):
    """Wasserstein flow of ∫ρ^m/(m − 1) by the blob method (module docstring; MATH.md §15.8).

    Parameters
    ----------
    m:
        the exponent, m > 1 (m = 2: v = −2∇ρ̃).
    epsilon:
        variance ε > 0 of the blob kernel (units of length²); the scheme is first order in ε.
    """

    name = "porous_medium"
    #: F is defined on positive measures: the unbalanced Fisher–Rao flow applies (MATH.md §15.6).
    positive_measures = True

    def __init__(self, m: float = 2.0, epsilon: float = 0.01):
        self.m = check_positive(m, "m", "porous_medium")
        if self.m <= 1.0:
            raise ParameterError(f"porous_medium: the exponent m must be > 1 (m → 1 is the heat equation, field 'kl'); received {m!r}")
        self.epsilon = check_positive(epsilon, "epsilon", "porous_medium")

    def _check(self, state, where):
        if not isinstance(state, Particles):
            raise CapabilityError(
                f"{where}: field 'porous_medium' acts on Particles (the porous-medium flow does not keep Gaussians "
                f"Gaussian); received {type(state).__name__}"
            )

    def density(self, x: torch.Tensor, state: Particles, gradient: bool = False):
        """ρ̃(x) = Σⱼ wⱼ N(x; xⱼ, εI), shape (R, N'); with ``gradient`` also ∇ρ̃(x) (R, N', d)."""
        d = x.shape[-1]
        scale = (2.0 * math.pi * self.epsilon) ** (-0.5 * d)
        h = math.sqrt(self.epsilon)
        if not gradient:
            return scale * measure_kernel_sum(x, state.x, state.weights, kernel="gaussian", bandwidth=h)
        value, grad = measure_kernel_sum(x, state.x, state.weights, kernel="gaussian", bandwidth=h, gradient="both")
        return scale * value, scale * grad

    def velocity(self, t, x, state: Particles):
        """v = −m ρ̃^{m−2}∇ρ̃ at x (R, N', d)."""
        where = "porous_medium.velocity"
        self._check(state, where)
        check_points(x, state.dim, where)
        rho, grad = self.density(x, state, gradient=True)
        if self.m == 2.0:
            return -2.0 * grad
        return -self.m * rho.clamp_min(torch.finfo(rho.dtype).tiny)[..., None] ** (self.m - 2.0) * grad

    def first_variation(self, t, x, state: Particles) -> torch.Tensor:
        """δF = (m/(m − 1)) ρ̃^{m−1} at x, shape (R, N')."""
        self._check(state, "porous_medium.first_variation")
        return self.m / (self.m - 1.0) * self.density(x, state) ** (self.m - 1.0)

    def energy(self, state) -> torch.Tensor:
        """F̃ = Σᵢ wᵢ ρ̃(xᵢ)^{m−1}/(m − 1), shape (R,)."""
        self._check(state, "porous_medium.energy")
        w = state.weights_or_uniform()
        return (w * self.density(state.x, state) ** (self.m - 1.0)).sum(-1) / (self.m - 1.0)

    def describe(self):
        return {"name": self.name, "m": self.m, "epsilon": self.epsilon}


@measureflow.hookimpl
def measureflow_register_fields(registry):
    registry.add_field("porous_medium", PorousMediumField)
