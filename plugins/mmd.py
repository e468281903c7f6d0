"""Maximum-mean-discrepancy flow toward a target (MATH.md §6).

``mmd`` (:class:`MMDField`) descends F(μ) = MMD²_k(μ, β) = ∬ k d(μ − β)^{⊗2} (unhalved, MATH.md §0). For a
symmetric kernel δF(μ)(x) = 2∫k(x, y) d(μ − β)(y), so with μ = Σₖ wₖδ_{xₖ}, β = Σⱼ qⱼδ_{yⱼ} the descent
velocity is

    v(x) = −2 Σₖ wₖ ∇₁k(x, xₖ) + 2 Σⱼ qⱼ ∇₁k(x, yⱼ),

and along it dF/dt = −Σᵢ wᵢ|v(xᵢ)|² (MATH.md eq. 0.2). Both sums, and the three sums of the energy
F = wᵀK_xx w − 2wᵀK_xy q + qᵀK_yy q, are :func:`measureflow.reductions.kernel_sum` calls (streamed; the N×M
matrix is never formed).

Kernels (``kernel``: the names of :data:`measureflow.reductions.KERNELS`, ℓ = ``bandwidth``):
``"gaussian"`` e^{−|x−y|²/(2ℓ²)} (RBF), ``"laplace"`` e^{−|x−y|/ℓ}, ``"energy"`` −|x − y| (MMD² is the
energy distance), ``"imq"`` (1 + |x−y|²/ℓ²)^{−1/2}, ``"poly2"`` ⟨x, y⟩², ``"poly2_affine"`` (1 + ⟨x, y⟩)², or
a callable ``f(r2)`` of the squared distance r² = |x − y|² (elementwise; close over its bandwidth).

**Polynomial kernels** (MATH.md §6, §14.6) are linear in the moments m = ∫x, M = ∫xxᵀ = Σ + mmᵀ:

    ⟨x,y⟩²:      MMD² = ‖M_μ − M_β‖²_F,                    v(x) = 4(M_β − M_μ)x,
    (1+⟨x,y⟩)²:  MMD² = 2|m_μ − m_β|² + ‖M_μ − M_β‖²_F,    v(x) = 4(m_β − m_μ) + 4(M_β − M_μ)x.

The field is linear in x for every μ, so Gaussians stay Gaussian and the closure is exact:
b = 4(M_β − M)m [+ 4(m_β − m)], A = 4(M_β − M). The target enters only through (m_β, M_β), so any target
with moments is accepted and replaced by the 2d points m_β ± √d fₖ (fₖ the columns of a square root of
Σ_β, weight 1/(2d) each), which have exactly these moments; the reduction evaluates polynomial kernel
sums through moments, O(N). Exact solution (:meth:`MMDField.solution`, ⟨x, y⟩², centred start): the mean
stays 0 and K = M⁻¹ obeys K̇ = 8I − 4(M_βK + KM_β), hence

    Σ(t)⁻¹ = e^{−4tM_β} Σ₀⁻¹ e^{−4tM_β} + φ_t(M_β),   φ_t(λ) = (1 − e^{−8tλ})/λ,

which for β = γ is the table row C(t) = C₀e^{8t}(I − C₀ + C₀e^{8t})⁻¹ (Ċ = 8(C − C²), MATH.md §13).
The homogeneous kernel is blind to the sign of x: it cannot move a mean toward m_β.

**Targets.** Samples — :class:`~measureflow.measures.Empirical`, a :class:`~measureflow.state.Particles`
state (one target per replica or one shared) or a tensor (M, d) / (R, M, d) with uniform weights — or an
analytic law, :class:`~measureflow.measures.Gaussian` / :class:`~measureflow.measures.GaussianMixture`.
An analytic law is exact for the polynomial kernels (moments) and for the Gaussian kernel, whose
expectation against N(m_c, Σ_c) is closed-form (MATH.md §6;
:func:`measureflow.observables.gaussian_kernel_expectation`):
Σⱼqⱼ∇₁k(x, yⱼ) becomes Σ_c π_c ∇ₓ E k(x, Y_c) = −Σ_c π_c E k(x, Y_c) (ℓ²I + Σ_c)⁻¹(x − m_c). Other
kernels need samples of it: pass ``samples=n`` (drawn once, with ``seed``) or an ``Empirical``.

**Gaussian states.** ``affine`` for the polynomial kernels only (the RBF flow does not preserve
Gaussians); ``energy`` in closed form for the polynomial and Gaussian kernels.

The field is autonomous: defined for every t.
"""

from __future__ import annotations

import math

import torch

import measureflow
from measureflow.cache import DeviceCache
from measureflow.errors import CapabilityError, ParameterError
from measureflow.fields import Field
from measureflow.linalg import matrix_function, symmetrize
from measureflow.observables import gaussian_kernel_expectation
from measureflow.reductions import KERNELS, measure_kernel_sum
from measureflow.state import Gaussians, Particles

from measureflow.targets import as_target, check_points, check_replicas, check_state, positive

__all__ = ["MMDField", "moment_points", "POLYNOMIAL"]

#: Kernels that act through the first two moments only (closure, closed-form energy, any target).
POLYNOMIAL = ("poly2", "poly2_affine")


# -- the target measure ---------------------------------------------------------------------------------------


def moment_points(mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """2d points m ± √d fₖ (Σ = FFᵀ, spectral F) whose uniform measure has mean m and covariance Σ exactly."""
    d = mean.shape[-1]
    evals, evecs = torch.linalg.eigh(symmetrize(cov))
    factor = evecs * evals.clamp_min(0).sqrt()[..., None, :]  # columns fₖ
    spread = math.sqrt(d) * factor.transpose(-1, -2)  # (R, d, d), rows √d fₖ
    return torch.cat([mean[:, None] + spread, mean[:, None] - spread], dim=1)


# -- the field ----------------------------------------------------------------------------------------------


class MMDField(Field):
    """Wasserstein gradient flow of MMD²_k(·, β) (module docstring; MATH.md §6).

    Parameters
    ----------
    target:
        β: Gaussian, GaussianMixture, Empirical, Particles (one per replica or shared) or a tensor of
        samples (M, d) / (R, M, d).
    kernel:
        ``"gaussian"`` (default), ``"laplace"``, ``"energy"``, ``"imq"``, ``"poly2"``, ``"poly2_affine"``
        or a callable f(|x − y|²) -> k applied elementwise.
    bandwidth:
        ℓ > 0 of the gaussian, laplace and imq kernels.
    samples, seed:
        draw ``samples`` points of an analytic target once (needed by the laplace, energy, imq and
        callable kernels, whose expectations against a Gaussian have no closed form here).
    """

    name = "mmd"

    def __init__(self, target, kernel="gaussian", bandwidth: float = 1.0, samples: int | None = None, seed: int = 0):
        where = "mmd"
        if callable(kernel) and not isinstance(kernel, str):
            self.kernel = kernel
        elif isinstance(kernel, str) and kernel in KERNELS:
            self.kernel = kernel
        else:
            raise ParameterError(
                f"{where}: unknown kernel {kernel!r}; choose one of {', '.join(map(repr, KERNELS))} or pass a "
                "callable f(sqdist) -> k"
            )
        self.bandwidth = positive(bandwidth, "bandwidth", where)
        self.polynomial = self.kernel in POLYNOMIAL
        self.target = as_target(target, where, samples=samples, seed=seed)
        self.dim = self.target.dim
        analytic_ok = self.polynomial or self.kernel == "gaussian"
        if self.target.points is None and not analytic_ok:
            raise ParameterError(
                f"{where}: kernel {self._kernel_name()!r} has no closed-form expectation against an analytic "
                f"{type(self.target.law).__name__} target; pass samples=<n> to draw a fixed sample of it, or give "
                "the target as an Empirical"
            )
        caps = {"velocity", "energy"}
        if self.polynomial:
            caps.add("affine")
        self._capabilities = frozenset(caps)
        # what the fixed target gives on each device and dtype, built on first use
        self._moment_points = DeviceCache(self._build_moment_points)
        self._target_self = DeviceCache(self._build_target_self)

    # -- pieces ----------------------------------------------------------------------------------------------
    def _kernel_name(self) -> str:
        return self.kernel if isinstance(self.kernel, str) else getattr(self.kernel, "__name__", "callable")

    def _sum(self, x, y, w, gradient):
        # a positive measure of any mass: the unbalanced Fisher–Rao flow changes it (MATH.md §15.6)
        return measure_kernel_sum(x, y, w, kernel=self.kernel, bandwidth=self.bandwidth, gradient=gradient)

    def _build_moment_points(self, like):
        return moment_points(*self.target.moments(like))

    def _target_points(self, like):
        """Atoms standing for β: the samples, or (polynomial kernels) the 2d moment points; weights."""
        if self.polynomial:
            return self._moment_points(like), None
        return self.target.tensors(like)

    def _analytic(self) -> bool:
        """Use the closed-form Gaussian-kernel expectation against an analytic law."""
        return not self.polynomial and self.target.law is not None and self.kernel == "gaussian"

    def _expectation_gradient(self, x):
        """Σ_c π_c ∇ₓ E k(x, Y_c) and Σ_c π_c E k(x, Y_c) for the Gaussian kernel, Y_c ~ N(m_c, Σ_c)."""
        means, covs, pis = self.target.components(x)
        d = x.shape[-1]
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        inv = torch.linalg.inv_ex(self.bandwidth**2 * eye + covs).inverse  # (K, d, d); SPD, no check (a sync on CUDA)
        diff = x[..., None, :] - means  # (R, N', K, d)
        ek = gaussian_kernel_expectation(x[..., None, :], None, means, covs, self.bandwidth)  # (R, N', K)
        grad = -torch.einsum("k,rnk,kab,rnkb->rna", pis, ek, inv, diff)
        return grad, ek @ pis

    def velocity(self, t, x, state: Particles):
        where = "mmd.velocity"
        check_state(state, self.dim, where, Particles)
        check_points(x, self.dim, where)
        check_replicas(self.target, state.replicas, where)
        own = self._sum(x, state.x, state.weights, True)
        if self._analytic():
            toward, _ = self._expectation_gradient(x)
        else:
            y, q = self._target_points(x)
            toward = self._sum(x, y, q, True)
        return 2.0 * (toward - own)

    #: MMD² is defined on positive measures: the unbalanced Fisher–Rao flow applies (MATH.md §15.6).
    positive_measures = True

    @property
    def closure_is_gradient(self) -> bool:
        """The polynomial closures are (−∇δF(m), −∇²δF) of a quadratic δF (MATH.md §15.6)."""
        return self.polynomial

    def first_variation(self, t, x, state: Particles) -> torch.Tensor:
        """δF(x) = 2Σₖwₖk(x, xₖ) − 2Σⱼqⱼk(x, yⱼ), shape (R, N') (Fisher–Rao / WFR weights, MATH.md §15.6)."""
        where = "mmd.first_variation"
        check_state(state, self.dim, where, Particles)
        check_points(x, self.dim, where)
        check_replicas(self.target, state.replicas, where)
        own = self._sum(x, state.x, state.weights, False)
        if self._analytic():
            _, toward = self._expectation_gradient(x)
        else:
            y, q = self._target_points(x)
            toward = self._sum(x, y, q, False)
        return 2.0 * (own - toward)

    def affine(self, t, state: Gaussians):
        where = "mmd.affine"
        if not self.polynomial:
            raise CapabilityError(
                f"{where}: the {self._kernel_name()!r}-kernel MMD flow does not keep Gaussians Gaussian (MATH.md §6); "
                "only kernel='poly2' or 'poly2_affine' has a Gaussian closure. Run it on Particles"
            )
        check_state(state, self.dim, where, Gaussians)
        check_replicas(self.target, state.replicas, where)
        m, S = state.mean, state.cov
        mb, Sb = self.target.moments(m)
        A = 4.0 * (Sb + mb[:, :, None] * mb[:, None, :] - S - m[:, :, None] * m[:, None, :])
        b = torch.einsum("rab,rb->ra", A, m)
        if self.kernel == "poly2_affine":
            b = b + 4.0 * (mb - m)
        return b, A

    # -- energy ---------------------------------------------------------------------------------------------
    def energy(self, state) -> torch.Tensor:
        """F = MMD²_k(μ, β), shape (R,): kernel sums on particles, closed forms on Gaussians."""
        where = "mmd.energy"
        check_state(state, self.dim, where)
        check_replicas(self.target, state.replicas, where)
        if isinstance(state, Gaussians):
            return self._gaussian_energy(state, where)
        x, w = state.x, state.weights
        wx = state.weights_or_uniform()
        own = (wx * self._sum(x, x, w, False)).sum(-1)
        if self._analytic():
            _, ek = self._expectation_gradient(x)
            cross = (wx * ek).sum(-1)
        else:
            y, q = self._target_points(x)
            cross = (wx * self._sum(x, y, q, False)).sum(-1)
        return own - 2.0 * cross + self._target_self(x)

    def _build_target_self(self, like) -> torch.Tensor:
        """qᵀK_yy q (shape (R_β,)), computed once per dtype and device."""
        if self._analytic():
            means, covs, pis = self.target.components(like)
            e = gaussian_kernel_expectation(means[:, None], covs[:, None], means[None], covs[None], self.bandwidth)
            return (pis @ e @ pis)[None]
        y, q = self._target_points(like)
        qy = torch.full(y.shape[:2], 1.0 / y.shape[1], dtype=y.dtype, device=y.device) if q is None else q
        return (qy * self._sum(y, y, q, False)).sum(-1)

    def _gaussian_energy(self, state: Gaussians, where: str) -> torch.Tensor:
        m, S = state.mean, state.cov
        if self.polynomial:
            mb, Sb = self.target.moments(m)
            gap = S + m[:, :, None] * m[:, None, :] - Sb - mb[:, :, None] * mb[:, None, :]
            out = (gap * gap).sum((-1, -2))
            if self.kernel == "poly2_affine":
                out = out + 2.0 * ((m - mb) ** 2).sum(-1)
            return out
        if self.kernel != "gaussian":
            raise CapabilityError(
                f"{where}: MMD² of a Gaussian state has a closed form only for the gaussian and polynomial kernels; "
                f"kernel {self._kernel_name()!r} needs Particles (e.g. state.sample(n))"
            )
        ell = self.bandwidth
        own = gaussian_kernel_expectation(m, S, m, S, ell)
        if self._analytic():
            means, covs, pis = self.target.components(m)
            cross = gaussian_kernel_expectation(m[:, None], S[:, None], means, covs, ell) @ pis
        else:
            y, q = self.target.tensors(m)
            qy = torch.full(y.shape[:2], 1.0 / y.shape[1], dtype=y.dtype, device=y.device) if q is None else q
            cross = (qy * gaussian_kernel_expectation(m[:, None], S[:, None], y, None, ell)).sum(-1)
        return own - 2.0 * cross + self._target_self(m)

    # -- closed form ----------------------------------------------------------------------------------------
    def solution(self, t, initial: Gaussians, t0: float = 0.0) -> Gaussians:
        """Exact Gaussian state at t for kernel ⟨x, y⟩² from a centred ``initial`` at t0 (module docstring):
        Σ(t)⁻¹ = e^{−4hM_β}Σ₀⁻¹e^{−4hM_β} + (I − e^{−8hM_β})M_β⁻¹, h = t − t0, mean 0."""
        where = "mmd.solution"
        if self.kernel != "poly2":
            raise CapabilityError(
                f"{where}: a closed-form solution exists for kernel='poly2' only (kernel is {self._kernel_name()!r}); "
                "integrate the Gaussian closure instead (Simulation on a Gaussians state)"
            )
        check_state(initial, self.dim, where, Gaussians)
        check_replicas(self.target, initial.replicas, where)
        m0, S0 = initial.mean, initial.cov
        if bool((m0.abs().amax(-1) > 1e-12 * (1.0 + S0.abs().amax((-1, -2)).sqrt())).any()):
            raise CapabilityError(
                f"{where}: the closed form needs a centred initial state (mean 0; the mean then stays 0); "
                "integrate the Gaussian closure for a non-centred start"
            )
        h = float(t - t0)
        mb, Sb = self.target.moments(m0)
        Mb = symmetrize(Sb + mb[:, :, None] * mb[:, None, :])
        E = matrix_function(Mb, lambda lam: torch.exp(-4.0 * h * lam))
        # (1 − e^{−8hλ})/λ, continued by its limit 8h at λ = 0
        phi = matrix_function(
            Mb,
            lambda lam: torch.where(lam.abs() > 0, -torch.expm1(-8.0 * h * lam) / lam, torch.full_like(lam, 8.0 * h)),
        )
        K = E @ torch.cholesky_inverse(torch.linalg.cholesky(S0)) @ E + phi
        cov = torch.cholesky_inverse(torch.linalg.cholesky(symmetrize(K)))
        return Gaussians(torch.zeros_like(m0), symmetrize(cov))

    def describe(self):
        return {"name": self.name, "kernel": self._kernel_name(), "bandwidth": self.bandwidth,
                "target": self.target.describe()}


@measureflow.hookimpl
def measureflow_register_fields(registry):
    registry.add_field("mmd", MMDField)
