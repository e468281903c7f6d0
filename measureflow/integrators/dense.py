"""Dense output: the state anywhere inside the last step, from what the step computed.

Every solver step returns a :class:`DenseOutput` over [t0, t1]; ``dense(t)`` is the interpolated
state at t and ``dense.channels(t)`` its channels as a tuple. Nothing is computed until asked, so
a run that never asks pays nothing (no extra field evaluation, no device work).

* :class:`HermiteDense` — the cubic Hermite interpolant through (t0, y0, f0) and (t1, y1, f1), third
  order; f1 is evaluated on first use (one field evaluation) when the step did not compute it.
* :class:`RungeKuttaDense` — a tableau's own continuous extension y(t0 + θh) = y0 + h Σᵢ bᵢ(θ)kᵢ
  (Shampine's fourth-order interpolant for Dormand–Prince 5(4)); no field evaluation.
* :class:`LinearDense` — straight lines between the end points (Euler–Maruyama paths, Euler
  pushforwards of Gaussians), first order.
"""

from __future__ import annotations

import abc

import torch

from .combine import combine

__all__ = ["DenseOutput", "HermiteDense", "RungeKuttaDense", "LinearDense"]


class DenseOutput(abc.ABC):
    """The interpolated state of one step from ``t0`` to ``t1`` (either direction)."""

    def __init__(self, dynamics, t0: float, t1: float, y0, y1, like):
        self.dynamics = dynamics
        self.t0, self.t1 = float(t0), float(t1)
        self.y0, self.y1 = tuple(y0), tuple(y1)
        self._like = like

    def theta(self, t: float) -> float:
        """The step fraction θ = (t − t0)/(t1 − t0) of time t; refuses a t outside the step."""
        lo, hi = min(self.t0, self.t1), max(self.t0, self.t1)
        if not (lo <= t <= hi):
            raise ValueError(f"dense output covers t in [{lo:.9g}, {hi:.9g}]; received t = {t:.9g}")
        h = self.t1 - self.t0
        return 0.0 if h == 0 else (t - self.t0) / h

    @abc.abstractmethod
    def channels(self, t: float) -> tuple[torch.Tensor, ...]:
        """The integrated channels at time t."""

    def __call__(self, t: float):
        """The state at time t."""
        return self.dynamics.unpack(self.channels(t), self._like)


class LinearDense(DenseOutput):
    """y(θ) = (1 − θ) y0 + θ y1."""

    def channels(self, t):
        th = self.theta(t)
        return tuple(torch.lerp(a, b, th) for a, b in zip(self.y0, self.y1))


class HermiteDense(DenseOutput):
    """Cubic Hermite interpolation: y(θ) = h₀₀y0 + h₁₀·h·f0 + h₀₁y1 + h₁₁·h·f1 with the Hermite basis
    h₀₀ = 2θ³ − 3θ² + 1, h₁₀ = θ³ − 2θ² + θ, h₀₁ = −2θ³ + 3θ², h₁₁ = θ³ − θ²."""

    def __init__(self, dynamics, t0, t1, y0, y1, like, f0, f1=None):
        super().__init__(dynamics, t0, t1, y0, y1, like)
        self.f0 = tuple(f0)
        self._f1 = None if f1 is None else tuple(f1)

    @property
    def f1(self):
        if self._f1 is None:
            self._f1 = tuple(self.dynamics.rate(self.t1, self.y1))
        return self._f1

    def channels(self, t):
        th = self.theta(t)
        h = self.t1 - self.t0
        h00 = 2 * th**3 - 3 * th**2 + 1
        h10 = th**3 - 2 * th**2 + th
        h01 = -2 * th**3 + 3 * th**2
        h11 = th**3 - th**2
        return tuple(
            h00 * a + (h10 * h) * fa + h01 * b + (h11 * h) * fb
            for a, b, fa, fb in zip(self.y0, self.y1, self.f0, self.f1)
        )


class RungeKuttaDense(DenseOutput):
    """A tableau's continuous extension (see :class:`~measureflow.integrators.ButcherTableau`)."""

    def __init__(self, dynamics, t0, t1, y0, y1, like, stages, coefficients):
        super().__init__(dynamics, t0, t1, y0, y1, like)
        self.stages = list(stages)
        self.coefficients = coefficients

    def channels(self, t):
        th = self.theta(t)
        weights = [sum(c * th ** (j + 1) for j, c in enumerate(row)) for row in self.coefficients]
        return combine(self.y0, self.t1 - self.t0, weights, self.stages)
