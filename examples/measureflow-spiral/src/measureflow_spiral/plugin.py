"""The ``spiral`` field, registered through measureflow's plugin hook.

v(x) = (ω J − γ I)(x − c) with J = [[0, −1], [1, 0]]: particles turn at angular speed ω while
contracting at rate γ towards c. Gaussian closure (measureflow's MATH.md eq. 0.1):
b = (ωJ − γI)(m − c), A = ωJ − γI, hence m(t) − c = e^{−γt} R(ωt)(m₀ − c) and
Σ(t) = e^{−2γt} R(ωt) Σ₀ R(ωt)ᵀ, R(θ) the rotation by θ.
"""

from __future__ import annotations

import math

import torch

import measureflow
from measureflow import Field, Gaussians


class SpiralField(Field):
    """Damped rotation in the plane (see the module docstring)."""

    name = "spiral"

    def __init__(self, omega: float = 1.0, damping: float = 0.1, center=(0.0, 0.0)):
        self.omega = float(omega)
        self.damping = float(damping)
        self.center = torch.as_tensor(center, dtype=torch.float64)

    def _matrix(self, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(
            [[-self.damping, -self.omega], [self.omega, -self.damping]], dtype=like.dtype, device=like.device
        )

    def _check(self, d: int) -> None:
        if d != 2:
            raise measureflow.ShapeError(f"field 'spiral' lives in the plane (d = 2); the state has d = {d}")

    def velocity(self, t, x, state):
        self._check(x.shape[-1])
        c = self.center.to(x)
        return (x - c) @ self._matrix(x).T

    def affine(self, t, state):
        self._check(state.dim)
        A = self._matrix(state.mean)
        c = self.center.to(state.mean)
        return (state.mean - c) @ A.T, A.expand(state.replicas, -1, -1)

    def solution(self, t: float, initial: Gaussians) -> Gaussians:
        """Exact Gaussian state at time t from ``initial`` at time 0."""
        c, s = math.cos(self.omega * t), math.sin(self.omega * t)
        decay = math.exp(-self.damping * t)
        R = torch.tensor([[c, -s], [s, c]], dtype=initial.dtype, device=initial.device)
        centre = self.center.to(initial.mean)
        mean = centre + decay * (initial.mean - centre) @ R.T
        cov = decay**2 * (R @ initial.cov @ R.T)
        return Gaussians(mean, 0.5 * (cov + cov.transpose(-1, -2)))

    def describe(self):
        return {"name": self.name, "omega": self.omega, "damping": self.damping, "center": self.center.tolist()}


@measureflow.hookimpl
def measureflow_register_fields(registry):
    registry.add_field("spiral", SpiralField)
