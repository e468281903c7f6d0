"""Fisher-information flow toward a Gaussian target (MATH.md §4, row 2(C⁻¹ − C) of §13).

``fisher`` (:class:`FisherField`) descends F(μ) = ½I(μ | β), I(μ | β) = ∫|∇log(μ/β)|² dμ, with
β = N(m_β, Σ_β), P = Σ_β⁻¹ (or no target: P = 0, F = ½∫|∇log μ|²dμ). The first variation
δI = −|∇log μ|² − 2Δlog μ + |∇V|² − 2ΔV makes v = −½∇δI a fourth-order PDE; at a Gaussian δI is
quadratic, so the Gaussian closure is the *exact* flow (MATH.md §4, §14.5):

    b = −P²(m − m_β),   A = Σ⁻² − P²,   Σ̇ = 2Σ⁻¹ − P²Σ − ΣP².

``solution``: the mean solves a linear ODE, m(t) = m_β + e^{−tP²}(m₀ − m_β), for any Σ₀. When Σ₀
commutes with P (in particular for the γ row, P = I) S = Σ² solves Ṡ = 4I − 4P²S, so
Σ(t)² = e^{−4tP²}Σ₀² + (I − e^{−4tP²})P⁻² (P = 0: Σ₀² + 4tI); γ: C(t) = (I + (C₀² − I)e^{−4t})^{1/2}.
Non-commuting Σ₀ and Σ_β have no closed form: integrate the closure.

Particles: ∇log μ and Δlog μ of an empirical measure do not exist, so particles move by the moment
closure, the Gaussian field of their own weighted moments (m̂, Σ̂) (MATH.md §4):

    v(x) = Σ̂⁻²(x − m̂) − P²(x − m_β).

It is affine in x, so the particles' moments follow the Gaussian closure exactly (up to the
integrator) whatever their law; it needs Σ̂ invertible (N > d particles in general position), and
a singular Σ̂ gives non-finite velocities, which stop the run with a recorded status.

``energy``: ½tr[Σ⁻¹ − 2P + P²Σ] + ½|P(m − m_β)|² (γ: ½tr(C + C⁻¹ − 2I)); on particles the same at
their moments — the energy of the moment closure they follow, not an estimate of ½I(μ | β).

The field is autonomous (every t); small eigenvalues are stiff (λ' ≈ 2/λ).
"""

from __future__ import annotations

import torch

import measureflow
from measureflow.errors import CapabilityError, ParameterError, ShapeError
from measureflow.fields import Field
from measureflow.linalg import matrix_function, symmetrize
from measureflow.state import Gaussians, Particles

from measureflow.linalg import spd_inverse
from measureflow.targets import check_points, gaussian_target

__all__ = ["FisherField"]


class FisherField(Field):
    """Descent of ½I(μ | N(m_β, Σ_β)) (MATH.md §4); see the module docstring.

    Parameters
    ----------
    target:
        a :class:`~measureflow.measures.Gaussian` (or a one-component GaussianMixture with a density),
        or None for no potential (P = 0).
    """

    name = "fisher"

    def __init__(self, target=None):
        gauss = None if target is None else gaussian_target(target)
        if target is not None and gauss is None:
            raise ParameterError(
                "fisher: target must be a measureflow.measures Gaussian (or None, no potential); received "
                f"{type(target).__name__}. Its closure is exact only for a Gaussian target (MATH.md §4)"
            )
        self.target = gauss
        self._cache: dict = {}
        self._capabilities = frozenset({"velocity", "affine", "energy"})

    @property
    def dim(self) -> int | None:
        return None if self.target is None else self.target.dim

    def _tensors(self, like: torch.Tensor) -> dict:
        key = (like.dtype, like.device, like.shape[-1])
        hit = self._cache.get(key)
        if hit is None:
            d = like.shape[-1]
            if self.target is None:
                mean = torch.zeros(d, dtype=torch.float64)
                P = torch.zeros(d, d, dtype=torch.float64)
            else:
                mean = self.target.mean_.to(torch.float64)
                P = symmetrize(torch.cholesky_inverse(self.target.cholesky.to(torch.float64)))
            hit = {"mean": mean, "P": P, "P2": symmetrize(P @ P)}
            hit = {k: v.to(dtype=like.dtype, device=like.device) for k, v in hit.items()}
            self._cache[key] = hit
        return hit

    def _check_dim(self, d: int, where: str) -> None:
        if self.dim is not None and d != self.dim:
            raise ShapeError(f"fisher.{where}: the target has d = {self.dim} but the state has d = {d}")

    def _closure(self, m: torch.Tensor, S: torch.Tensor):
        t = self._tensors(m)
        inv = spd_inverse(S)
        return (t["mean"] - m) @ t["P2"], symmetrize(inv @ inv) - t["P2"]

    # -- the protocol ----------------------------------------------------------------------------------------
    def velocity(self, t, x, state: Particles):
        """Moment closure v(x) = Σ̂⁻²(x − m̂) − P²(x − m_β), (m̂, Σ̂) the state's weighted moments."""
        check_points(x, self.dim, "fisher.velocity")
        m = state.mean()
        b, A = self._closure(m, state.covariance())
        return b[:, None, :] + (x - m[:, None, :]) @ A

    def affine(self, t, state: Gaussians):
        """b = −P²(m − m_β), A = Σ⁻² − P² (exact; MATH.md §4)."""
        self._check_dim(state.dim, "affine")
        return self._closure(state.mean, state.cov)

    def energy(self, state) -> torch.Tensor:
        """½tr[Σ⁻¹ − 2P + P²Σ] + ½|P(m − m_β)|² at the state's (m, Σ) (particles: weighted moments)."""
        self._check_dim(state.dim, "energy")
        if isinstance(state, Gaussians):
            m, S = state.mean, state.cov
        else:
            m, S = state.mean(), state.covariance()
        t = self._tensors(m)
        inv = spd_inverse(S)
        trace = torch.diagonal(inv, dim1=-2, dim2=-1).sum(-1) - 2.0 * torch.trace(t["P"])
        trace = trace + torch.einsum("ij,rji->r", t["P2"], S)
        shift = (m - t["mean"]) @ t["P"]
        return 0.5 * (trace + (shift * shift).sum(-1))

    def solution(self, t, initial: Gaussians, t0: float = 0.0) -> Gaussians:
        """Exact law at t from ``initial`` at t0; the covariance needs Σ₀ commuting with Σ_β (module docstring)."""
        self._check_dim(initial.dim, "solution")
        h = float(t) - float(t0)
        m0, S0 = initial.mean, initial.cov
        tt = self._tensors(m0)
        P, P2 = tt["P"], tt["P2"]
        gap = (S0 @ P - P @ S0).flatten(1).norm(dim=-1)
        scale = S0.flatten(1).norm(dim=-1) * P.norm()
        tol = 1e-10 if S0.dtype == torch.float64 else 1e-5
        if bool((gap > tol * scale).any()):
            raise CapabilityError(
                "fisher.solution: Σ₀ does not commute with the target covariance, and the Fisher closure has no closed "
                "form then; integrate it with Simulation (an adaptive integrator such as 'dopri5')"
            )
        mean = tt["mean"] + (m0 - tt["mean"]) @ matrix_function(P2, lambda q: torch.exp(-h * q))
        decay = matrix_function(P2, lambda q: torch.exp(-4.0 * h * q))
        # (1 − e^{−4hq})/q, continuous at q = 0 where it is 4h (no target, or a flat direction)
        safe = lambda q: torch.where(q > 0, -torch.expm1(-4.0 * h * q) / torch.where(q > 0, q, 1.0), 4.0 * h)  # noqa: E731
        square = decay @ (S0 @ S0) + matrix_function(P2, safe)
        cov = matrix_function(square, torch.sqrt)
        return Gaussians(mean, symmetrize(cov))

    def describe(self):
        target = None if self.target is None else {"mean": self.target.mean_.tolist(), "cov": self.target.cov.tolist()}
        return {"name": self.name, "target": target}


@measureflow.hookimpl
def measureflow_register_fields(registry):
    registry.add_field("fisher", FisherField)
