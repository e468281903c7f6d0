"""States seen as ODE systems y' = f(t, y), y a tuple of tensors.

* Particles: y = (x,), f = (v_t[μ_y](x),) where μ_y = state.with_positions(x) is the stage's own
  measure (a mean-field field sees the intermediate particles, not the step's starting ones).
* Gaussians: y = (m, Σ), f = (b, AΣ + ΣAᵀ) with (b, A) = field.affine(t, N(m, Σ)) (MATH.md eq. 0.1).

The rate AΣ + ΣAᵀ is formed as P + Pᵀ with P = AΣ, which is bitwise symmetric; every Runge–Kutta
combination of bitwise-symmetric matrices is again bitwise symmetric, so a symmetric Σ₀ stays
exactly symmetric through any tableau.

Nothing here reads a value back to the host except :meth:`GaussianSystem.admissible`, which the
caller converts to a Python bool when it must decide whether to keep a step.
"""

from __future__ import annotations

import torch

from ..errors import ShapeError
from ..state import Gaussians, Particles, state_kind

__all__ = ["ParticleSystem", "GaussianSystem", "system_for", "symmetrize", "error_norm"]


def symmetrize(S: torch.Tensor) -> torch.Tensor:
    """(S + Sᵀ)/2 (a no-op, bit for bit, on an already symmetric matrix)."""
    return 0.5 * (S + S.transpose(-1, -2))


def _field_name(field) -> str:
    return getattr(field, "name", type(field).__name__)


class ParticleSystem:
    """Particles as y = (x,) (see the module docstring)."""

    kind = "particles"

    @staticmethod
    def pack(state: Particles) -> tuple[torch.Tensor, ...]:
        return (state.x,)

    @staticmethod
    def unpack(state: Particles, y) -> Particles:
        return state.with_positions(y[0])

    @staticmethod
    def rate(field, t: float, state: Particles, y) -> tuple[torch.Tensor, ...]:
        x = y[0]
        v = field.velocity(t, x, state.with_positions(x))
        if v.shape != x.shape:
            raise ShapeError(
                f"field {_field_name(field)!r}: velocity() must return the shape of its query points "
                f"{tuple(x.shape)}; it returned {tuple(v.shape)}"
            )
        return (v,)

    @staticmethod
    def admissible(y) -> torch.Tensor:
        """All entries finite (a 0-dim bool tensor on the state's device)."""
        return torch.isfinite(y[0]).all()


class GaussianSystem:
    """Gaussians as y = (m, Σ) (see the module docstring)."""

    kind = "gaussians"

    @staticmethod
    def pack(state: Gaussians) -> tuple[torch.Tensor, ...]:
        return (state.mean, state.cov)

    @staticmethod
    def unpack(state: Gaussians, y) -> Gaussians:
        return state.with_parameters(y[0], symmetrize(y[1]))

    @staticmethod
    def closure(field, t: float, state: Gaussians, m: torch.Tensor, S: torch.Tensor):
        """(b, A) of the field at N(m, Σ), broadcast to (R, d) and (R, d, d)."""
        b, A = field.affine(t, state.with_parameters(m, S))
        try:
            b = torch.broadcast_to(b, m.shape)
            A = torch.broadcast_to(A, S.shape)
        except RuntimeError:
            raise ShapeError(
                f"field {_field_name(field)!r}: affine() must return b of shape {tuple(m.shape)} and A of "
                f"shape {tuple(S.shape)}; it returned {tuple(b.shape)} and {tuple(A.shape)}"
            ) from None
        return b, A

    @classmethod
    def rate(cls, field, t: float, state: Gaussians, y) -> tuple[torch.Tensor, ...]:
        m, S = y
        b, A = cls.closure(field, t, state, m, S)
        P = A @ S
        return (b, P + P.transpose(-1, -2))

    @classmethod
    def euler_pushforward(cls, field, t: float, state: Gaussians, y, h: float):
        """One Euler step as the pushforward of N(m, Σ) by x ↦ x + h(b + A(x − m)):
        m' = m + hb, Σ' = (I + hA) Σ (I + hA)ᵀ (symmetrised), positive semi-definite for any h."""
        m, S = y
        b, A = cls.closure(field, t, state, m, S)
        M = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device) + h * A
        return (m + h * b, symmetrize(M @ S @ M.transpose(-1, -2)))

    @staticmethod
    def admissible(y) -> torch.Tensor:
        """Every replica finite with a Cholesky-factorisable (SPD) covariance: 0-dim bool tensor.

        Reading it on the host is a device synchronisation (one per Gaussian step).
        """
        m, S = y
        _, info = torch.linalg.cholesky_ex(S)
        return (info == 0).all() & torch.isfinite(m).all() & torch.isfinite(S).all()


def system_for(state):
    """The ODE view of ``state``."""
    return GaussianSystem if state_kind(state) == "gaussians" else ParticleSystem


def error_norm(err, y0, y1, rtol: float, atol: float) -> torch.Tensor:
    """max over replicas r of RMS_r( err / (atol + rtol·max(|y0|, |y1|)) ), a 0-dim tensor.

    Replicas share one time grid, so a step is kept only when every replica meets the tolerance;
    the RMS runs over all of a replica's components (for Gaussians: the d mean entries and the d²
    covariance entries together).
    """
    total = None
    count = 0
    for e, a, b in zip(err, y0, y1):
        scale = atol + rtol * torch.maximum(a.abs(), b.abs())
        sq = (e / scale).square().reshape(e.shape[0], -1)
        part = sq.sum(dim=1)
        total = part if total is None else total + part
        count += sq.shape[1]
    return (total / count).sqrt().amax()
