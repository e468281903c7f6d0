"""The sliced-Wasserstein gradient flow toward a fixed target, F(μ) = SW₂²(μ, β) (MATH.md §8).

``sliced_wasserstein`` (:class:`SlicedWassersteinField`)
    SW₂²(μ, β) = ∫ W₂²(θ#μ, θ#β) dσ(θ), σ the uniform probability on S^{d−1} (unhalved, MATH.md §0), and

        v(x) = 2 ∫ (T_θ(⟨θ, x⟩) − ⟨θ, x⟩) θ dσ(θ),     T_θ the monotone map θ#μ → θ#β,

    with the integral replaced by a direction set {θ_l, ω_l} (:class:`DirectionSet`):

    * ``"quadrature"`` (default): d = 2, angles φ_l = π(l + ½)/L on [0, π), ω_l = 1/L; d = 3,
      Gauss–Legendre nodes in z = cos(polar angle) times uniform azimuths on [0, π) (the integrand is
      even in θ), L = n_z·n_φ with n_φ ≈ 2n_z; d = 1, θ = 1. The integrands are analytic on the
      sphere, so these rules converge spectrally in L. There is no such product rule here for d > 3:
      use random directions.
    * ``"random"``: L directions uniform on the sphere, ω_l = 1/L (an unbiased, stochastic field),
      drawn from a CPU :class:`torch.Generator` seeded by ``seed``, either once (``resample="fixed"``)
      or afresh whenever the evaluation time changes (``resample="time"``: the set is a function of
      (seed, t), so repeated evaluations at one time — the two midpoint stages of RK4 — agree and a
      resumed run draws the same directions). A field does not see the simulation's seed: give the
      field its own ``seed`` (e.g. the same number).

*Particles* μ = Σᵢ wᵢ δ_{xᵢ}. Along θ_l, pᵢ = ⟨θ_l, xᵢ⟩ is ranked by a stable sort (ties broken by
index, so tied particles are sent to distinct quantiles, as a 1-D assignment would) and given its
mid-rank F̂ᵢ = Σ_{k before i} w_k + wᵢ/2, and

    T_l(pᵢ) = Q_{θ_l#β}(F̂ᵢ):  ⟨θ_l, m_β⟩ + (θ_lᵀΣ_βθ_l)^{1/2} Φ⁻¹(F̂ᵢ)  for a Gaussian target (no samples);
                              the weighted quantile y_(k), k = min{k : Σ_{j≤k} q_(j) ≥ F̂ᵢ}, for samples.

For N = M uniform samples this is the sorted assignment. Everything is one batched computation over
replicas, directions and particles (``torch.sort`` along the particle axis, ``torch.searchsorted``
into the target's cumulative weights); directions are processed in blocks only to bound memory.
At query points other than the particles, F̂ is the midpoint of the empirical CDF's jump,
½(μ_θ(−∞, p) + μ_θ(−∞, p]), clamped to the particles' mid-rank range.

*Gaussian state* against a Gaussian target (exact: T_θ is affine on Gaussians), with
r_θ = (θᵀΣ_βθ / θᵀΣθ)^{1/2} and the same direction set:

    b = 2 Σ_l ω_l θ_lθ_lᵀ (m_β − m)  (= (2/d)(m_β − m) for the quadratures),   A = 2 Σ_l ω_l (r_l − 1) θ_lθ_lᵀ.

For γ, A = V(C) = 2E_θ[(θᵀCθ)^{−1/2}θθᵀ] − (2/d)I; :func:`gamma_drift_matrix` gives V(C) in closed
form (elliptic integrals for d = 2, a 1-D integral for any d), so Ċ = V(C)C + CV(C) can be checked
against the quadrature closure.

*Energy*: Gaussians, Σ_l ω_l [(θ_lᵀ(m − m_β))² + ((θ_lᵀΣθ_l)^{1/2} − (θ_lᵀΣ_βθ_l)^{1/2})²]; particles, the
exact 1-D costs Σ_l ω_l W₂²(θ_l#μ, θ_l#β) (against a Gaussian, ∫ Φ⁻¹ and ∫ (Φ⁻¹)² over each
particle's quantile interval in closed form; against samples, the merged quantile levels). With
``resample="time"`` the energy uses the set drawn from ``seed`` alone, so its time series is smooth.
Convergence is about d times slower than the W₂ flow's (E θθᵀ = I/d).
"""

from __future__ import annotations

import hashlib
import math
import struct

import attrs
import numpy as np
import torch

import measureflow
from measureflow.cache import DeviceCache
from measureflow.errors import CapabilityError, ParameterError, ShapeError, StateError
from measureflow.fields import Field
from measureflow.linalg import symmetrize
from measureflow.state import Gaussians, Particles
from measureflow.targets import as_target

__all__ = ["SlicedWassersteinField", "DirectionSet", "gamma_drift_matrix"]

KINDS = ("quadrature", "random")
RESAMPLE = ("fixed", "time")
#: Default number of directions: by dimension for the quadratures, else for random sets.
DEFAULT_COUNT = {1: 1, 2: 64, 3: 200}
DEFAULT_RANDOM_COUNT = 128
# Elements of one (R, directions, points) block; bounds the memory of a velocity evaluation.
_BLOCK_ELEMENTS = 1 << 24
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# -- directions ---------------------------------------------------------------------------------------------


def _check_kind(instance, attribute, value):
    if value not in KINDS:
        raise ParameterError(f"sliced_wasserstein: directions must be one of {KINDS}; received {value!r}")


def _check_resample(instance, attribute, value):
    if value not in RESAMPLE:
        raise ParameterError(f"sliced_wasserstein: resample must be one of {RESAMPLE}; received {value!r}")


def _check_count(instance, attribute, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ParameterError(f"sliced_wasserstein: count must be a positive integer or None; received {value!r}")


def _check_seed(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ParameterError(f"sliced_wasserstein: seed must be a non-negative integer; received {value!r}")


@attrs.frozen
class DirectionSet:
    """Directions θ_l and weights ω_l (Σ ω_l = 1) standing for σ, the uniform law on S^{d−1} (module docstring)."""

    kind: str = attrs.field(default="quadrature", validator=_check_kind)
    count: int | None = attrs.field(default=None, validator=_check_count)
    resample: str = attrs.field(default="fixed", validator=_check_resample)
    seed: int = attrs.field(default=0, validator=_check_seed)

    def __attrs_post_init__(self):
        if self.kind == "quadrature" and self.resample != "fixed":
            raise ParameterError("sliced_wasserstein: resample='time' is for random directions; a quadrature is fixed")

    @property
    def varies(self) -> bool:
        return self.kind == "random" and self.resample == "time"

    def check_dim(self, d: int) -> None:
        if self.kind == "quadrature" and d > 3:
            raise ParameterError(
                f"sliced_wasserstein: quadrature directions exist for d ≤ 3 only; the state has d = {d}. "
                "Use directions='random' (with count ≫ d)"
            )
        if self.kind == "quadrature" and d == 3 and self.count is not None and self.count < 8:
            raise ParameterError(
                f"sliced_wasserstein: a d = 3 quadrature needs count ≥ 8 (two polar × four azimuthal nodes, the "
                f"least that integrates θθᵀ exactly); received count = {self.count}"
            )
        if self.kind == "quadrature" and d == 2 and self.count is not None and self.count < 2:
            raise ParameterError("sliced_wasserstein: a d = 2 quadrature needs count ≥ 2 angles")

    def nodes(self, d: int, t: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(θ (L, d), ω (L,)) in float64 on the CPU; ``t`` selects the set when ``resample="time"``."""
        self.check_dim(d)
        if self.kind == "random":
            generator = torch.Generator().manual_seed(self._seed_at(t))
            count = self.count or DEFAULT_RANDOM_COUNT
            theta = torch.randn(count, d, generator=generator, dtype=torch.float64)
            theta = theta / theta.norm(dim=1, keepdim=True)
            return theta, torch.full((count,), 1.0 / count, dtype=torch.float64)
        count = self.count or DEFAULT_COUNT[d]
        if d == 1:
            return torch.ones(1, 1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
        if d == 2:
            phi = math.pi * (torch.arange(count, dtype=torch.float64) + 0.5) / count
            return torch.stack([torch.cos(phi), torch.sin(phi)], 1), torch.full((count,), 1.0 / count, dtype=torch.float64)
        n_z = max(2, round(math.sqrt(count / 2)))
        n_phi = max(4, round(count / n_z))
        z, wz = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(n_z))
        phi = math.pi * (torch.arange(n_phi, dtype=torch.float64) + 0.5) / n_phi
        rho = torch.sqrt(1 - z * z)[:, None]
        theta = torch.stack([rho * torch.cos(phi), rho * torch.sin(phi), z[:, None].expand(n_z, n_phi)], -1)
        # z = cos(polar angle) is uniform on [−1, 1] under σ: density ½ against the Legendre weights.
        omega = (0.5 * wz)[:, None].expand(n_z, n_phi) / n_phi
        return theta.reshape(-1, 3), omega.reshape(-1).contiguous()

    def _seed_at(self, t) -> int:
        if not self.varies or t is None:
            return self.seed
        # A hash of (seed, t): the CPU generator keeps only part of a seed, so nearby times must not
        # share it.
        digest = hashlib.blake2b(struct.pack("<qd", self.seed, float(t)), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1

    def describe(self, d: int | None = None) -> dict:
        out = {"kind": self.kind, "count": self.count, "resample": self.resample, "seed": self.seed}
        if d is not None:
            out["count"] = int(self.nodes(d)[0].shape[0])
        return out


# -- 1-D pieces ----------------------------------------------------------------------------------------------


def _project(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """⟨θ_l, xᵢ⟩ for x (R, N, d), θ (L, d) → (R, L, N)."""
    return torch.einsum("rnd,ld->rln", x, theta)


def _sorted_with_mass(p: torch.Tensor, w: torch.Tensor | None):
    """Stable sort of p (R, L, N) along N with the weights in sorted order (None: uniform)."""
    values, order = torch.sort(p, dim=-1, stable=True)
    if w is None:
        return values, order, None
    return values, order, w[:, None, :].expand_as(p).gather(-1, order)


def _cumulative(mass_sorted: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Cumulative weights Σ_{k ≤ i} in sorted order, (R, L, N)."""
    if mass_sorted is None:
        N = like.shape[-1]
        return ((torch.arange(N, dtype=like.dtype, device=like.device) + 1) / N).expand_as(like)
    return torch.cumsum(mass_sorted, -1)


def _mid_ranks(p: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """F̂ᵢ = Σ_{k before i} w_k + wᵢ/2 in the stable sorted order, (R, L, N)."""
    _, order, mass = _sorted_with_mass(p, w)
    if mass is None:
        N = p.shape[-1]
        mid = ((torch.arange(N, dtype=p.dtype, device=p.device) + 0.5) / N).expand_as(p)
    else:
        mid = torch.cumsum(mass, -1) - 0.5 * mass
    return torch.empty_like(p).scatter_(-1, order, mid)


def _cdf_midpoints(p: torch.Tensor, w: torch.Tensor | None, queries: torch.Tensor) -> torch.Tensor:
    """½(μ(−∞, q) + μ(−∞, q]) of the projected particles p (R, L, N) at queries (R, L, N')."""
    values, _, mass = _sorted_with_mass(p, w)
    cum = _cumulative(mass, values)
    zero = torch.zeros_like(cum[..., :1])
    cum = torch.cat([zero, cum], -1).contiguous()
    values = values.contiguous()
    below = cum.gather(-1, torch.searchsorted(values, queries.contiguous(), right=False))
    upto = cum.gather(-1, torch.searchsorted(values, queries.contiguous(), right=True))
    first = cum[..., 1:2] if mass is None else mass[..., :1]
    last = (1 - cum[..., -2:-1]) if mass is None else mass[..., -1:]
    return (0.5 * (below + upto)).clamp(min=0.5 * first, max=1 - 0.5 * last)


def _sample_quantiles(ty_sorted: torch.Tensor, cum_q: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Weighted quantile function of the projected samples at levels u (R, L, N)."""
    R = u.shape[0]
    if ty_sorted.shape[0] != R:
        ty_sorted, cum_q = ty_sorted.expand(R, -1, -1), cum_q.expand(R, -1, -1)
    index = torch.searchsorted(cum_q.contiguous(), u.contiguous(), right=False).clamp_max(cum_q.shape[-1] - 1)
    return ty_sorted.gather(-1, index)


def _gaussian_interval_moments(a: torch.Tensor, b: torch.Tensor):
    """∫_a^b Φ⁻¹(u) du and ∫_a^b Φ⁻¹(u)² du (z = Φ⁻¹(u): ∫ zφ dz = −φ, ∫ z²φ dz = Φ − zφ)."""

    def parts(u):
        z = torch.special.ndtri(u)
        phi = torch.where(torch.isfinite(z), torch.exp(-0.5 * z * z) * _INV_SQRT_2PI, torch.zeros_like(z))
        zphi = torch.where(torch.isfinite(z), z * phi, torch.zeros_like(z))
        return phi, zphi

    phi_a, zphi_a = parts(a)
    phi_b, zphi_b = parts(b)
    return phi_a - phi_b, (b - a) - (zphi_b - zphi_a)


# -- the field ----------------------------------------------------------------------------------------------


class SlicedWassersteinField(Field):
    """v = 2E_θ[(T_θ(⟨θ, x⟩) − ⟨θ, x⟩)θ], the SW₂²(·, β) gradient flow (module docstring; MATH.md §8).

    Parameters
    ----------
    target:
        :class:`~measureflow.measures.Gaussian` (particles and Gaussians states), or samples (particles
        only): an :class:`~measureflow.measures.Empirical`, a Particles state (1 or R replicas), or points
        (M, d) / (R, M, d) with optional ``weights``.
    directions, count, resample, seed:
        the :class:`DirectionSet` (``directions`` is its kind, or pass a DirectionSet).
    """

    name = "sliced_wasserstein"

    def __init__(self, target, weights=None, *, directions="quadrature", count=None, resample="fixed", seed=0):
        if isinstance(directions, DirectionSet):
            if count is not None or resample != "fixed" or seed != 0:
                raise ParameterError("sliced_wasserstein: give count/resample/seed inside the DirectionSet, not beside it")
            self.directions = directions
        else:
            self.directions = DirectionSet(directions, count, resample, seed)
        self.target = as_target(target, "sliced_wasserstein", weights=weights, mixtures=False, arrays=True)
        self.directions.check_dim(self.target.dim)
        # the fixed direction set (the reference set of a resampled one) and the target's sorted
        # projections on it, per device and dtype: the target does not move along a flow
        self._fixed_nodes = DeviceCache(self._build_fixed_nodes)
        self._sorted_target = DeviceCache(self._build_sorted_target)

    # -- cached pieces --------------------------------------------------------------------------------
    def _build_fixed_nodes(self, like: torch.Tensor):
        theta, omega = self.directions.nodes(like.shape[-1])
        return theta.to(like), omega.to(like)

    def _build_sorted_target(self, like: torch.Tensor):
        return self._sorted_projections(self._fixed_nodes(like)[0], like)

    def _nodes(self, like: torch.Tensor, t=None, *, reference: bool = False):
        d = like.shape[-1]
        self.target.check_dim(d)
        if self.directions.varies and not reference:
            theta, omega = self.directions.nodes(d, t)
            return theta.to(like), omega.to(like)
        return self._fixed_nodes(like)

    def _sorted_projections(self, theta: torch.Tensor, like: torch.Tensor):
        """Sorted projected samples and their cumulative weights on the directions ``theta``, (Rb, L, M) each
        (callers check the state's replicas against the target's first, with ``target.samples``)."""
        y, q = self.target.tensors(like)
        values, _, mass = _sorted_with_mass(_project(y, theta), q)
        return values, _cumulative(mass, values)

    def _gaussian_slices(self, theta: torch.Tensor, like: torch.Tensor):
        """(⟨θ_l, m_β⟩, (θ_lᵀΣ_βθ_l)^{1/2}), each (L,)."""
        mb, Sb = self.target.gaussian(like)
        return theta @ mb, torch.einsum("ld,de,le->l", theta, Sb, theta).sqrt()

    def _target_block(self, theta, block, like, fixed):
        """The target's sorted projections and cumulative weights on the directions ``theta[block]``.

        With ``fixed`` (``theta`` is the fixed set) the whole set is sorted once per device and dtype and
        sliced; otherwise only the block's directions are projected.
        """
        if fixed:
            ty, cum_q = self._sorted_target(like)
            return ty[:, block], cum_q[:, block]
        return self._sorted_projections(theta[block], like)

    def _quantiles(self, u, theta, block, like, fixed):
        """Q_{θ#β}(u) for levels u (R, L_block, N) on the directions ``theta[block]``."""
        if self.target.is_gaussian:
            centre, scale = self._gaussian_slices(theta[block], like)
            return centre[:, None] + scale[:, None] * torch.special.ndtri(u)
        return _sample_quantiles(*self._target_block(theta, block, like, fixed), u)

    def _blocks(self, R: int, L: int, N: int):
        size = max(1, _BLOCK_ELEMENTS // max(1, R * N))
        return [slice(i, min(L, i + size)) for i in range(0, L, size)]

    # -- particles ----------------------------------------------------------------------------------
    def velocity(self, t, x, state):
        if not isinstance(state, Particles):
            raise CapabilityError("sliced_wasserstein: velocity() moves particles; a Gaussians state uses affine()")
        if x.ndim != 3 or x.shape[0] != state.replicas or x.shape[-1] != state.dim:
            raise ShapeError(
                f"sliced_wasserstein: query points must have shape (R, N', d) = ({state.replicas}, N', {state.dim}) "
                f"to match the state; received {tuple(x.shape)}"
            )
        theta, omega = self._nodes(x, t)
        if not self.target.is_gaussian:
            self.target.samples(x, state.replicas)  # names a replica mismatch before any work
        w = state.weights
        at_particles = x is state.x
        R, N, L = state.replicas, state.size, theta.shape[0]
        out = torch.zeros_like(x)
        for block in self._blocks(R, L, max(N, x.shape[1])):
            p = _project(state.x, theta[block])
            q = p if at_particles else _project(x, theta[block])
            u = _mid_ranks(p, w) if at_particles else _cdf_midpoints(p, w, q)
            gap = self._quantiles(u, theta, block, x, not self.directions.varies) - q
            out = out + torch.einsum("rln,l,ld->rnd", gap, omega[block], theta[block])
        return 2.0 * out

    # -- Gaussians ----------------------------------------------------------------------------------
    def affine(self, t, state):
        if not isinstance(state, Gaussians):
            raise CapabilityError("sliced_wasserstein: affine() is the closure of a Gaussians state; particles use velocity()")
        theta, omega = self._nodes(state.mean, t)
        mb, _ = self.target.gaussian(state.mean)
        _, target_scale = self._gaussian_slices(theta, state.mean)
        scale = torch.einsum("ld,rde,le->rl", theta, state.cov, theta).sqrt()
        outer = theta[:, :, None] * theta[:, None, :]  # (L, d, d)
        b = 2.0 * torch.einsum("l,lde,re->rd", omega, outer, mb - state.mean)
        A = 2.0 * torch.einsum("rl,lde->rde", (target_scale / scale - 1.0) * omega, outer)
        return b, symmetrize(A)

    # -- energy -------------------------------------------------------------------------------------
    def energy(self, state):
        """SW₂²(μ, β) on the direction set (module docstring), shape (R,)."""
        if isinstance(state, Gaussians):
            theta, omega = self._nodes(state.mean, reference=True)
            mb, _ = self.target.gaussian(state.mean)
            centre, target_scale = self._gaussian_slices(theta, state.mean)
            scale = torch.einsum("ld,rde,le->rl", theta, state.cov, theta).sqrt()
            gap = state.mean @ theta.T - centre
            return ((gap * gap + (scale - target_scale) ** 2) * omega).sum(-1)
        if not isinstance(state, Particles):
            raise StateError(
                f"sliced_wasserstein: energy needs a Particles or Gaussians state; received {type(state).__name__}"
            )
        x, w = state.x, state.weights
        theta, omega = self._nodes(x, reference=True)
        if not self.target.is_gaussian:
            self.target.samples(x, state.replicas)  # names a replica mismatch before any work
        total = torch.zeros(state.replicas, dtype=x.dtype, device=x.device)
        for block in self._blocks(state.replicas, theta.shape[0], state.size):
            values, _, mass = _sorted_with_mass(_project(x, theta[block]), w)
            # Uniform levels (k + 1)/N exactly, as for uniform target samples: equal level sets leave no
            # rounding-width slivers between them.
            upper = _cumulative(mass, values)
            if mass is None:
                mass = torch.full_like(values, 1.0 / state.size)
            if self.target.is_gaussian:
                costs = self._gaussian_slice_costs(values, mass, upper, theta[block], x)
            else:
                costs = self._sample_slice_costs(values, upper, theta, block, x)
            total = total + costs @ omega[block]
        return total

    def _gaussian_slice_costs(self, values, mass, upper, theta, like):
        """W₂² between Σᵢ wᵢ δ_{pᵢ} and N(c, s²) per direction: Σᵢ ∫ over i's quantile interval of (pᵢ − c − sΦ⁻¹)²."""
        centre, scale = self._gaussian_slices(theta, like)
        lower = (upper - mass).clamp_min(0)
        first, second = _gaussian_interval_moments(lower, upper.clamp_max(1))
        shifted = values - centre[:, None]
        per_atom = mass * shifted**2 - 2 * scale[:, None] * shifted * first + scale[:, None] ** 2 * second
        return per_atom.sum(-1)

    def _sample_slice_costs(self, values, upper, theta, block, like):
        """W₂² between two weighted 1-D point sets: ∫₀¹ (Q_μ − Q_β)² du over the merged quantile levels."""
        # The energy's directions are the fixed reference set, so the target's sort is kept.
        ty, cum_q = self._target_block(theta, block, like, True)
        if ty.shape[0] != values.shape[0]:
            ty, cum_q = ty.expand(values.shape[0], -1, -1), cum_q.expand(values.shape[0], -1, -1)
        levels, _ = torch.sort(torch.cat([upper, cum_q], -1).clamp_max(1), -1)
        widths = torch.diff(levels, dim=-1, prepend=torch.zeros_like(levels[..., :1]))
        middle = levels - 0.5 * widths
        ours = values.gather(-1, torch.searchsorted(upper.contiguous(), middle, right=False).clamp_max(values.shape[-1] - 1))
        theirs = _sample_quantiles(ty, cum_q, middle)
        return (widths * (ours - theirs) ** 2).sum(-1)

    def describe(self):
        return {
            "name": self.name,
            "target": self.target.describe(),
            "directions": self.directions.describe(self.target.dim),
        }


# -- the closed form for γ --------------------------------------------------------------------------------


def gamma_drift_matrix(cov, method: str = "auto") -> np.ndarray:
    """V(C) = 2E_θ[(θᵀCθ)^{−1/2}θθᵀ] − (2/d)I, the SW closure toward γ (MATH.md §8), float64 (d, d).

    In the eigenbasis C = U diag(λ) Uᵀ, V = U diag(v) Uᵀ with

        v_k = 2/(√(2π) E|g|) ∫₀^∞ t^{(d−1)/2} / ((t + λ_k) Πⱼ (t + λⱼ)^{1/2}) dt − 2/d,
        E|g| = √2 Γ((d + 1)/2)/Γ(d/2)                         (``method="integral"``, any d),

    and for d = 2 (λ₁ ≥ λ₂, a = √λ₁, m = 1 − λ₂/λ₁, J₀ = K(m)/a, complete elliptic integrals of
    parameter m): v₁ = (4/π)(aE(m) − λ₂J₀)/(λ₁ − λ₂) − 1, v₂ = (4/π)(λ₁J₀ − aE(m))/(λ₁ − λ₂) − 1
    (``method="elliptic"``). ``"auto"`` takes the elliptic form for d = 2 unless the eigenvalues are
    within 10⁻³ of each other, where its difference quotient loses digits. A reference for tests and
    for integrating Ċ = V(C)C + CV(C); scipy, on the host.
    """
    from scipy import integrate, special

    C = np.asarray(cov.detach().cpu() if isinstance(cov, torch.Tensor) else cov, dtype=np.float64)
    if C.ndim != 2 or C.shape[0] != C.shape[1] or C.shape[0] == 0:
        raise ShapeError(f"gamma_drift_matrix: cov must be a (d, d) matrix; received shape {C.shape}")
    if method not in ("auto", "elliptic", "integral"):
        raise ParameterError(f"gamma_drift_matrix: method must be 'auto', 'elliptic' or 'integral'; received {method!r}")
    d = C.shape[0]
    lam, U = np.linalg.eigh(0.5 * (C + C.T))
    if not lam[0] > 0:
        raise StateError(f"gamma_drift_matrix: cov must be positive definite; its smallest eigenvalue is {lam[0]:.6g}")
    lam = lam[::-1].copy()
    U = U[:, ::-1]
    close = d == 2 and (lam[0] - lam[1]) <= 1e-3 * lam[0]
    if method == "elliptic" and d != 2:
        raise ParameterError(f"gamma_drift_matrix: the elliptic form is for d = 2; received d = {d}")
    if method == "elliptic" or (method == "auto" and d == 2 and not close):
        a = math.sqrt(lam[0])
        m = 1.0 - lam[1] / lam[0]
        J0 = special.ellipk(m) / a
        E = special.ellipe(m)
        gap = lam[0] - lam[1]
        v = np.array([4 / math.pi * (a * E - lam[1] * J0) / gap - 1, 4 / math.pi * (lam[0] * J0 - a * E) / gap - 1])
    else:
        mean_abs = math.sqrt(2.0) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))
        const = 2.0 / (math.sqrt(2 * math.pi) * mean_abs)

        def integrand(t, k):
            return t ** ((d - 1) / 2) / ((t + lam[k]) * np.prod(np.sqrt(t + lam)))

        v = np.array([
            const * integrate.quad(integrand, 0.0, np.inf, args=(k,), epsabs=0.0, epsrel=1e-13, limit=400)[0] - 2.0 / d
            for k in range(d)
        ])
    return (U * v) @ U.T


@measureflow.hookimpl
def measureflow_register_fields(registry):
    registry.add_field("sliced_wasserstein", SlicedWassersteinField)
