"""Variational inference by Wasserstein gradient flow on Gaussian mixtures (MATH.md §15.7).

A :class:`~measureflow.GaussianMixtures` state ρ = Σₖ πₖ N(mₖ, Σₖ) descends KL(ρ | β) (Lambert, Chewi,
Bach, Bonnabel, Rigollet 2022): with g = ∇log(β/ρ) and Xₖ ~ N(mₖ, Σₖ),

    ṁₖ = E[g(Xₖ)],     Σ̇ₖ = E[g(Xₖ)(Xₖ − mₖ)ᵀ] + E[(Xₖ − mₖ)g(Xₖ)ᵀ],

and, in the Fisher–Rao / WFR geometries (``measureflow.field(..., geometry="wfr", rate=α)``),

    π̇ₖ = −απₖ(E[log(ρ/β)(Xₖ)] − Σⱼπⱼ E[log(ρ/β)(Xⱼ)])

(pure ``"fisher_rao"``: the weights move, the components stay). For K = 1 and a Gaussian β these are
MATH.md §3's closure ṁ = P(m_β − m), Σ̇ = 2I − PΣ − ΣP, and a β equal to ρ is a fixed point.

Expectations E[f(Xₖ)] = E[f(mₖ + Lₖz)], z ~ N(0, I), Σₖ = LₖLₖᵀ, use fixed nodes zᵢ with weights (an
:class:`Expectation`): ``"unscented"`` (the 2d points ±√d eᵢ, exact for polynomials of degree ≤ 3, so for
the quadratics of the K = 1 Gaussian case), ``"gauss_hermite"`` (tensor product of ``order`` nodes per
axis, exact to degree 2·order − 1; small d), or ``"samples"`` (``samples`` seeded normal draws, fixed for the
whole run so the flow stays an ODE).

A field drives a mixture state when it provides the target's ``target_log_density(x)`` (up to a constant)
and ``target_score(x)`` = ∇log β(x) (the ``kl`` field does, for targets with a density); its
``mixture_expectation`` attribute, when set (:func:`use_expectation`), picks the rule.
"""

from __future__ import annotations

import math

import attrs
import numpy as np
import torch

from .errors import CapabilityError, ParameterError

__all__ = ["Expectation", "mixture_rates", "mixture_log_density", "kl_divergence", "use_expectation",
           "check_mixture_field", "RULES"]

#: The expectation rules (module docstring).
RULES = ("unscented", "gauss_hermite", "samples")
_LOG_2PI = math.log(2 * math.pi)


@attrs.frozen
class Expectation:
    """How E[f(X)], X ~ N(m, Σ), is computed (module docstring): ``rule``, ``order`` (Gauss–Hermite nodes
    per axis), ``samples`` and ``seed`` (seeded draws)."""

    rule: str = attrs.field(default="unscented", validator=attrs.validators.in_(RULES))
    order: int = attrs.field(default=5, converter=int)
    samples: int = attrs.field(default=1000, converter=int)
    seed: int = attrs.field(default=0, converter=int)

    def __attrs_post_init__(self):
        if self.order < 1 or self.samples < 1:
            raise ParameterError(f"Expectation: order and samples must be ≥ 1; received {self.order}, {self.samples}")

    def nodes(self, d: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standard-normal nodes z (Q, d) and their weights (Q,), summing to one."""
        if self.rule == "unscented":
            eye = np.sqrt(d) * np.eye(d)
            z, w = np.concatenate([eye, -eye]), np.full(2 * d, 1.0 / (2 * d))
        elif self.rule == "gauss_hermite":
            x, w1 = np.polynomial.hermite_e.hermegauss(self.order)
            w1 = w1 / w1.sum()
            grids = np.meshgrid(*([x] * d), indexing="ij")
            z = np.stack([g.ravel() for g in grids], axis=-1)
            wg = np.meshgrid(*([w1] * d), indexing="ij")
            w = np.prod(np.stack([g.ravel() for g in wg], axis=-1), axis=-1)
        else:
            gen = torch.Generator().manual_seed(self.seed)
            zt = torch.randn(self.samples, d, generator=gen, dtype=torch.float64)
            z, w = zt.numpy(), np.full(self.samples, 1.0 / self.samples)
        return (torch.as_tensor(z, dtype=like.dtype, device=like.device),
                torch.as_tensor(w, dtype=like.dtype, device=like.device))


def _field_parts(field):
    """(base field, geometry, α, expectation) of a field, looking through a geometry wrapper."""
    geometry, alpha = getattr(field, "geometry", "wasserstein"), getattr(field, "rate", 0.0)
    base = field.field if geometry in ("fisher_rao", "wfr") else field
    expectation = getattr(field, "mixture_expectation", None) or getattr(base, "mixture_expectation", None)
    return base, geometry, float(alpha) if geometry != "wasserstein" else 0.0, expectation or Expectation()


def check_mixture_field(field) -> None:
    """Refuse a field that cannot drive a GaussianMixtures state (one-line error)."""
    base, _, _, _ = _field_parts(field)
    if not (callable(getattr(base, "target_log_density", None)) and callable(getattr(base, "target_score", None))):
        name = getattr(field, "name", type(field).__name__)
        raise CapabilityError(
            f"field {name!r} cannot move a GaussianMixtures state: it needs target_log_density(x) and target_score(x) "
            "of its target (the kl field toward a target with a density has them)"
        )
    available = getattr(base, "mixture_available", True)
    if not available:
        raise CapabilityError(
            f"field {getattr(field, 'name', '?')!r}: its target has no density (samples or Diracs), so KL(ρ | β) of a "
            "mixture state is undefined; give a Gaussian, a GaussianMixture with densities or a potential"
        )


def use_expectation(field, rule: str = "unscented", **options):
    """Set how ``field`` computes the expectations of a mixture state (an :class:`Expectation`); returns it."""
    spec = Expectation(rule, **options)
    try:
        field.mixture_expectation = spec
    except AttributeError as exc:
        raise CapabilityError(f"field {getattr(field, 'name', '?')!r} does not accept an expectation rule") from exc
    return field


def _points(state, z):
    """X = mₖ + Lₖz at every node: (R, K, Q, d), with the Cholesky factors (R, K, d, d)."""
    L, _ = torch.linalg.cholesky_ex(state.covs)
    return state.means[:, :, None, :] + torch.einsum("rkij,qj->rkqi", L, z)


def mixture_log_density(state, x: torch.Tensor, *, score: bool = False):
    """log ρ(x) for points x of shape (R, ..., d) (one mixture per replica), and ∇log ρ(x) when ``score``."""
    R, K, d = state.means.shape
    shape = x.shape
    flat = x.reshape(R, -1, d)  # (R, P, d)
    L, _ = torch.linalg.cholesky_ex(state.covs)  # (R, K, d, d)
    diff = flat[:, None, :, :] - state.means[:, :, None, :]  # (R, K, P, d)
    sol = torch.linalg.solve_triangular(L, diff.transpose(-1, -2), upper=False)  # (R, K, d, P)
    maha = (sol * sol).sum(-2)  # (R, K, P)
    logdet = 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)  # (R, K)
    comp = torch.log(state.weights)[..., None] - 0.5 * (maha + logdet[..., None] + d * _LOG_2PI)
    logp = torch.logsumexp(comp, dim=1)  # (R, P)
    if not score:
        return logp.reshape(shape[:-1])
    resp = torch.softmax(comp, dim=1)  # (R, K, P)
    # ∇log N(x; m, Σ) = −Σ⁻¹(x − m) = −L⁻ᵀ L⁻¹(x − m)
    grad_k = -torch.linalg.solve_triangular(L.transpose(-1, -2), sol, upper=True).transpose(-1, -2)  # (R, K, P, d)
    grad = (resp[..., None] * grad_k).sum(1)
    return logp.reshape(shape[:-1]), grad.reshape(shape)


def mixture_rates(field, t: float, state):
    """(π̇, ṁ, Σ̇) of the KL flow of ``field``'s target at the mixture ``state`` (module docstring)."""
    base, geometry, alpha, expectation = _field_parts(field)
    R, K, d = state.means.shape
    z, q = expectation.nodes(d, state.means)
    X = _points(state, z)  # (R, K, Q, d)
    log_rho, score_rho = mixture_log_density(state, X, score=True)
    g = base.target_score(X) - score_rho  # ∇log(β/ρ), (R, K, Q, d)
    if geometry == "fisher_rao":
        dm = torch.zeros_like(state.means)
        dS = torch.zeros_like(state.covs)
    else:
        dm = torch.einsum("q,rkqd->rkd", q, g)
        C = torch.einsum("q,rkqi,rkqj->rkij", q, g, X - state.means[:, :, None, :])
        dS = C + C.transpose(-1, -2)
    if geometry == "wasserstein":
        return torch.zeros_like(state.weights), dm, dS
    excess = torch.einsum("q,rkq->rk", q, log_rho - base.target_log_density(X))  # E_k[log ρ/β]
    pi = state.weights
    mean = (pi * excess).sum(-1, keepdim=True) / pi.sum(-1, keepdim=True)
    return -alpha * pi * (excess - mean), dm, dS


def kl_divergence(field, state, expectation: Expectation | None = None) -> torch.Tensor:
    """KL(ρ | β) = Σₖ πₖ E[log ρ(Xₖ) − log β(Xₖ)], shape (R,), up to the constant of an unnormalised
    target density; by ``expectation`` (default: the field's rule)."""
    base, _, _, default = _field_parts(field)
    expectation = expectation or default
    z, q = expectation.nodes(state.dim, state.means)
    X = _points(state, z)
    gap = mixture_log_density(state, X) - base.target_log_density(X)
    return torch.einsum("rk,q,rkq->r", state.weights, q, gap)

