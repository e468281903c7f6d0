"""Kernel drifting and Sinkhorn drifting fields (MATH.md §9).

``drifting`` (:class:`DriftingField`)
    For a measure ν and the Gaussian kernel K_ε(x, y) = e^{−|x−y|²/(2ε)} (ε = ``epsilon``, a variance in
    units of length², MATH.md §0; its length scale is √ε) the *kernel drift* is

        B_ε[ν](x) = Σⱼ νⱼ K_ε(x, yⱼ)(yⱼ − x) / Σⱼ νⱼ K_ε(x, yⱼ) = ε ∇log(K_ε * ν)(x),

    a softmax average of the atoms minus x. The field moves particles by the raw drift B_ε[β]
    (``self_correction=False``), which carries every particle up the smoothed target density K_ε*β and
    collapses them onto its modes, or by the self-corrected drift ([B])

        u = B_ε[β] − B_ε[μ] = ε ∇log(K_ε*β / K_ε*μ),

    whose self term sums over every particle, the query's own atom included (k = i). u vanishes at μ = β
    and, on all of R^d, only there (K_ε*β = K_ε*μ ⇒ μ = β); on the particles alone u = 0 is weaker.
    Every softmax average is :func:`measureflow.reductions.softmax_average` (score "sqdist", scale
    1/(2ε), log-weights log wⱼ): streamed, no N×M matrix. An analytic target needs no samples:
    K_ε*N(m_β, Σ_β) ∝ N(m_β, Σ_β + εI), so B_ε[β](x) = ε(Σ_β + εI)⁻¹(m_β − x); for a Gaussian mixture
    Σ_c π_c N(m_c, Σ_c), B_ε[β] = ε × the score of Σ_c π_c N(m_c, Σ_c + εI) (responsibilities by
    log-sum-exp over the components; Dirac components are allowed).

    ``kernel="laplace"``: k(x, y) = e^{−|x−y|/τ} with τ = √ε (same length scale as K_ε), as in Deng et al.
    B^L[ν] = Σⱼ νⱼ k (yⱼ − x)/Σⱼ νⱼ k is computed as the ratio of two kernel sums
    (:func:`~measureflow.reductions.kernel_sum`, values (yⱼ, 1)), because the softmax average has no
    |x − y| score. This field is **not conservative**: there is no score identity B = ε∇log(k*ν), it is not
    the gradient of any potential, and it has no Gaussian closure (MATH.md §9, §14.11, §14.13). The kernel
    sums are not in the log domain: a point farther than ~700τ (float64; ~85τ in float32) from every atom
    has an underflowing denominator and gets a non-finite velocity, which ends a run with status
    "nonfinite".

    **No fixed functional** (MATH.md §9): u_t = −∇_W R_t for the frozen linear functional
    R_t(α) = −∫φ_t dα, φ_t = ε log(K_ε*β / K_ε*μ_t), which changes with μ_t; the field therefore declares no
    ``energy``. What to monitor instead: :meth:`DriftingField.monitor` = ∫|v|² dμ (zero at a stationary
    state), and an external discrepancy — the registered observables ``mmd`` and ``sinkhorn``.

    **Gaussian closure** (Gaussian kernel, Gaussian target N(m_β, Σ_β); derived ✔) on a state N(m, Σ):

        b = ε(Σ_β + εI)⁻¹(m_β − m),   A = ε[(Σ + εI)⁻¹ − (Σ_β + εI)⁻¹]   (v(x) = b + A(x − m)),

    and for the raw drift A = −ε(Σ_β + εI)⁻¹. The fixed point is exactly (m_β, Σ_β) (raw: (m_β, 0), the
    collapse). The mean obeys ṁ = b whatever Σ, so m(t) = m_β + exp(−tε(Σ_β + εI)⁻¹)(m₀ − m_β)
    (:meth:`DriftingField.mean_solution`). Raw drift: A is constant, Σ(t) = E Σ₀ E, E = exp(−tε(Σ_β + εI)⁻¹).
    Self-corrected, with Σ₀ commuting with Σ_β: the eigenbasis stays, and each eigenvalue λ of Σ with the
    target's eigenvalue s on the same vector obeys λ̇ = 2ελ(s − λ)/((λ + ε)(s + ε)), whose implicit
    solution (:func:`implicit_invariant`, :func:`eigenvalue_solution`) is

        ε log λ − (s + ε) log|s − λ| − 2εst/(s + ε) = const    (s = 1: MATH.md §9's γ row).

``sinkhorn_drifting`` (:class:`SinkhornDriftingField`)
    Two-sided entropic plans for the cost ½|x − y|² at regularisation ε (He et al.; the Gibbs kernel is
    K_ε again, and normalising it on one side only — the first Sinkhorn half-step — gives B_ε):

        u(xᵢ) = (Σⱼ Π^{μβ}ᵢⱼ yⱼ − Σₖ Π^{μμ}ᵢₖ xₖ)/wᵢ = −∇(f_μβ − f_μμ)(xᵢ),

    the exact Wasserstein gradient flow of ½S_{2ε} (MATH.md §9). The cost ½|x − y|² at ε is the cost
    |x − y|² at 2ε with the same plans and potentials halved, so the field is ½ × the Sinkhorn-divergence
    flow at 2ε: the core's :class:`~measureflow.reductions.SinkhornDivergence` (log-domain potentials by
    streamed softmax averages, over-relaxed sweeps, warm start across steps, barycentric projections,
    closure and energy), the same the ``sinkhorn`` field uses. Gaussian closure = ½ × MATH.md §7 at 2ε: b = m_β − m, toward γ
    Ċ = (4C + ε²I)^{1/2} − (4C² + ε²I)^{1/2}. Energy ½S_{2ε}(μ, β).

Both fields are autonomous (defined for every t; drifting runs forward from t = 0).
"""

from __future__ import annotations

import math
import warnings

import torch

import measureflow
from measureflow.cache import DeviceCache
from measureflow.errors import CapabilityError, ParameterError
from measureflow.fields import Field
from measureflow.linalg import matrix_function, spd_inverse, symmetrize
from measureflow.measures import GaussianMixture
from measureflow.reductions import SinkhornDivergence, kernel_sum, softmax_average
from measureflow.state import Gaussians, Particles
from measureflow.targets import as_target, check_points, check_replicas, check_state, positive
from measureflow.validators import check_int

__all__ = [
    "DriftingField",
    "SinkhornDriftingField",
    "KERNELS",
    "kernel_drift",
    "implicit_invariant",
    "eigenvalue_solution",
    "drift_norm",
]

#: Kernels of the drifting field (ε = ``epsilon``, a variance).
KERNELS = {
    "gaussian": "K_ε(x, y) = exp(−|x − y|²/(2ε)); B_ε[ν] = ε∇log(K_ε*ν)",
    "laplace": "k(x, y) = exp(−|x − y|/√ε); not a gradient field, no Gaussian closure",
}

#: Bisection sweeps of :func:`eigenvalue_solution`: halving |s − λ₀| this often reaches the float64 grid.
_BISECTIONS = 200


#: Owners whose old ``bandwidth=`` keyword has warned in this process (each warns once).
_WARNED_BANDWIDTH: set[str] = set()


def _renamed_epsilon(where: str, epsilon, bandwidth):
    """ε given as ``epsilon=`` or under its old name ``bandwidth=`` (the same value: it always was the variance ε,
    not a length). The old name warns once per process and owner; both at once is an error."""
    if bandwidth is None:
        return epsilon
    if epsilon is not None:
        raise ParameterError(
            f"{where}: give epsilon only (ε, the kernel's variance in units of length²); bandwidth is its old name"
        )
    if where not in _WARNED_BANDWIDTH:
        _WARNED_BANDWIDTH.add(where)
        warnings.warn(
            f"{where}: the keyword bandwidth= is renamed epsilon= (ε, the variance of the kernel K_ε, in units of "
            "length²; the value means the same and is used unchanged). Use epsilon=; bandwidth= will be removed.",
            FutureWarning,
            stacklevel=3,
        )
    return bandwidth


# -- the drift of a measure ---------------------------------------------------------------------------------


def kernel_drift(x, points, log_weights=None, *, epsilon: float | None = None, kernel: str = "gaussian",
                 bandwidth: float | None = None):
    """B_ε[ν](x) for ν = Σⱼ e^{ℓⱼ} δ_{yⱼ}: x (R, N, d), points (R or 1, M, d), log-weights ℓ (R or 1, M)
    (None: uniform), ε = ``epsilon`` (the kernel's variance, length²); returns (R, N, d).
    ``kernel="gaussian"``: one streamed softmax average; ``"laplace"``: the ratio of two kernel sums (see the
    module docstring). ``bandwidth`` is the old name of ``epsilon`` (same value; FutureWarning)."""
    epsilon = _renamed_epsilon("kernel_drift", epsilon, bandwidth)
    if epsilon is None:
        raise ParameterError("kernel_drift: epsilon (ε > 0, the kernel's variance in units of length²) is required")
    return _barycentre(x, points, log_weights, epsilon, kernel) - x


def _barycentre(x, points, log_weights, eps, kernel):
    """Σⱼ νⱼk(x, yⱼ) yⱼ / Σⱼ νⱼk(x, yⱼ): the kernel-weighted average of the atoms seen from x."""
    if kernel == "gaussian":
        return softmax_average(x, points, log_weights=log_weights, score="sqdist", scale=0.5 / eps)
    weights = None if log_weights is None else torch.exp(log_weights)
    values = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)
    sums = kernel_sum(x, points, values, weights, kernel="laplace", bandwidth=math.sqrt(eps))
    return sums[..., :-1] / sums[..., -1:]


# -- closed forms --------------------------------------------------------------------------------------------


def implicit_invariant(lam, t, epsilon: float, target=1.0):
    """ε log λ − (s + ε) log|s − λ| − 2εst/(s + ε), constant along λ̇ = 2ελ(s − λ)/((λ + ε)(s + ε)).

    The per-eigenvalue Gaussian closure of the self-corrected drift toward a target eigenvalue s (toward γ,
    s = 1: MATH.md §9, ε log λ − (1 + ε) log|1 − λ| − 2εt/(1 + ε) = const). Derivation: separate variables,
    (λ + ε)/(λ(s − λ)) = (ε/s)/λ + ((s + ε)/s)/(s − λ), and multiply the integral by s.
    Tensors or floats; broadcasts.
    """
    lam = torch.as_tensor(lam, dtype=torch.float64) if not isinstance(lam, torch.Tensor) else lam
    s = torch.as_tensor(target, dtype=lam.dtype, device=lam.device)
    return epsilon * torch.log(lam) - (s + epsilon) * torch.log((s - lam).abs()) - 2 * epsilon * s * t / (s + epsilon)


def eigenvalue_solution(t, lam0, epsilon: float, target=1.0):
    """λ(t) from λ(0) = λ₀ for λ̇ = 2ελ(s − λ)/((λ + ε)(s + ε)) (s = ``target``), by solving
    :func:`implicit_invariant` (λ(t), t) = (λ₀, 0) for λ.

    λ(t) stays between λ₀ and s, where the invariant's λ-part is monotone (increasing on (0, s), decreasing
    on (s, ∞), → +∞ at s), so bisection on that bracket converges to the float64 grid. Vectorised over the
    shapes of λ₀ and s (broadcast); t ≥ 0 (backwards in time λ leaves the bracket).
    """
    if not t >= 0:
        raise ParameterError(f"eigenvalue_solution: t must be ≥ 0 (time since λ₀); received {t!r}")
    lam0 = torch.as_tensor(lam0, dtype=torch.float64) if not isinstance(lam0, torch.Tensor) else lam0
    s = torch.as_tensor(target, dtype=lam0.dtype, device=lam0.device).expand_as(lam0)
    goal = implicit_invariant(lam0, 0.0, epsilon, s) + 2 * epsilon * s * t / (s + epsilon)
    far, near = lam0.clone(), s.clone()  # invariant(far) ≤ goal < invariant(near) = +∞
    for _ in range(_BISECTIONS):
        mid = 0.5 * (far + near)
        below = implicit_invariant(mid, 0.0, epsilon, s) <= goal
        far = torch.where(below, mid, far)
        near = torch.where(below, near, mid)
    return torch.where(lam0 == s, lam0, far)


# -- the kernel drifting field -------------------------------------------------------------------------------


class DriftingField(Field):
    """Kernel drifting toward β: u = B_ε[β] − B_ε[μ], or B_ε[β] alone (module docstring; MATH.md §9).

    Parameters
    ----------
    target:
        β: :class:`~measureflow.measures.Gaussian` or :class:`~measureflow.measures.GaussianMixture`
        (closed form, Gaussian kernel), :class:`~measureflow.measures.Empirical`, a Particles state, or
        samples (M, d) / (R, M, d).
    epsilon:
        ε > 0, the variance of K_ε (units of length², default 1); the Laplace kernel uses τ = √ε. The old
        keyword ``bandwidth`` still works for this value (it warns once: a bandwidth elsewhere is a length).
    kernel:
        ``"gaussian"`` (default) or ``"laplace"``.
    self_correction:
        True (default): u = B_ε[β] − B_ε[μ]; False: the raw drift B_ε[β].
    samples, seed:
        draw ``samples`` points of an analytic target once (needed by the Laplace kernel only).
    """

    name = "drifting"

    def __init__(self, target, epsilon: float | None = None, kernel: str = "gaussian", self_correction: bool = True,
                 samples: int | None = None, seed: int = 0, *, bandwidth: float | None = None):
        where = "drifting"
        epsilon = _renamed_epsilon(where, epsilon, bandwidth)
        self.epsilon = positive(1.0 if epsilon is None else epsilon, "epsilon", where)
        if not isinstance(kernel, str) or kernel not in KERNELS:
            raise ParameterError(f"{where}: unknown kernel {kernel!r}; choose 'gaussian' or 'laplace'")
        self.kernel = kernel
        if not isinstance(self_correction, bool):
            raise ParameterError(f"{where}: self_correction must be True or False; received {self_correction!r}")
        self.self_correction = self_correction
        self.target = as_target(target, where, samples=samples, seed=seed)
        self.dim = self.target.dim
        # The closed forms need the Gaussian kernel; other kernels use the samples.
        self.analytic = self.target.law is not None and kernel == "gaussian"
        if self.target.points is None and not self.analytic:
            raise ParameterError(
                f"{where}: the {kernel} kernel has no closed-form drift toward an analytic "
                f"{type(self.target.law).__name__}; pass samples=<n> to draw a fixed sample of it, or give the target "
                "as an Empirical"
            )
        caps = {"velocity"}
        if kernel == "gaussian" and self.target.is_gaussian:
            caps.add("affine")
        self._capabilities = frozenset(caps)
        # what the fixed target gives on each device and dtype, built on first use
        self._gaussian_pull = DeviceCache(self._build_gaussian_pull)
        self._smoothed_mixture = DeviceCache(self._build_smoothed_mixture)
        self._target_atoms = DeviceCache(self._build_target_atoms)

    # -- pieces -------------------------------------------------------------------------------------------------
    def _build_gaussian_pull(self, like):
        """(m_β (d,), ε(Σ_β + εI)⁻¹ (d, d)) of a Gaussian target."""
        mb, Sb = self.target.gaussian(like)
        eye = torch.eye(self.dim, dtype=like.dtype, device=like.device)
        return mb, self.epsilon * spd_inverse(Sb + self.epsilon * eye)

    def _build_smoothed_mixture(self, like):
        """K_ε*β up to a constant: Σ_c π_c N(m_c, Σ_c + εI)."""
        means, covs, pis = self.target.components(like)
        eye = torch.eye(self.dim, dtype=like.dtype, device=like.device)
        return GaussianMixture(pis, means, covs + self.epsilon * eye)

    def _build_target_atoms(self, like):
        """(y (R_β, M, d), log q (R_β, M)) of a sampled target."""
        y, q = self.target.tensors(like)
        logq = None if q is None else torch.log(q)
        return y, logq

    def target_drift(self, x):
        """B_ε[β](x) for x (R, N', d) (closed form for an analytic target and the Gaussian kernel)."""
        if self.analytic:
            if self.target.is_gaussian:
                mb, pull = self._gaussian_pull(x)
                return (mb - x) @ pull.T
            return self.epsilon * self._smoothed_mixture(x).score(x)
        y, logq = self._target_atoms(x)
        return kernel_drift(x, y, logq, epsilon=self.epsilon, kernel=self.kernel)

    def self_drift(self, x, state: Particles):
        """B_ε[μ](x) of the particle state μ (its every atom included)."""
        logw = None if state.weights is None else torch.log(state.weights)
        return kernel_drift(x, state.x, logw, epsilon=self.epsilon, kernel=self.kernel)

    # -- the protocol -------------------------------------------------------------------------------------------
    def velocity(self, t, x, state: Particles):
        where = "drifting.velocity"
        check_state(state, self.dim, where, Particles)
        check_points(x, self.dim, where)
        check_replicas(self.target, state.replicas, where)
        if not self.self_correction:
            return self.target_drift(x)
        logw = None if state.weights is None else torch.log(state.weights)
        own = _barycentre(x, state.x, logw, self.epsilon, self.kernel)
        if self.analytic:
            return self.target_drift(x) - (own - x)
        # Both averages are taken at the same x, so x cancels without rounding: at μ = β, u is the
        # difference of two equal softmax averages (summed in another order at most).
        y, logq = self._target_atoms(x)
        return _barycentre(x, y, logq, self.epsilon, self.kernel) - own

    def affine(self, t, state: Gaussians):
        """(b, A) of v(x) = b + A(x − m) on N(m, Σ): b = ε(Σ_β + εI)⁻¹(m_β − m),
        A = ε[(Σ + εI)⁻¹ − (Σ_β + εI)⁻¹] (raw drift: A = −ε(Σ_β + εI)⁻¹); MATH.md §9."""
        where = "drifting.affine"
        if self.kernel != "gaussian":
            raise CapabilityError(
                f"{where}: the {self.kernel} kernel's drift has no Gaussian closure (it is not even a gradient field; "
                "only the Gaussian kernel gives K_ε*N(m, Σ) ∝ N(m, Σ + εI), MATH.md §9). Run it on Particles, or use "
                "kernel='gaussian'"
            )
        check_state(state, self.dim, where, Gaussians)
        m, S = state.mean, state.cov
        mb, pull = self._gaussian_pull(m)  # raises for a target that is not one Gaussian
        b = (mb - m) @ pull.T
        A = -pull.expand(S.shape)
        if self.self_correction:
            eye = torch.eye(self.dim, dtype=S.dtype, device=S.device)
            A = A + self.epsilon * spd_inverse(S + self.epsilon * eye)
        return b, A

    def monitor(self, state) -> torch.Tensor:
        """∫|v|² dμ per replica, shape (R,): Σᵢ wᵢ|v(xᵢ)|² on particles, |b|² + tr(AΣAᵀ) on Gaussians.

        The drifting fields descend no fixed functional (MATH.md §9); this is the quantity to watch for
        stationarity (zero iff v = 0 μ-a.e.), next to an external distance such as the ``mmd`` or
        ``sinkhorn`` observables.
        """
        check_state(state, self.dim, "drifting.monitor")
        if isinstance(state, Gaussians):
            b, A = self.affine(0.0, state)
            return (b * b).sum(-1) + torch.einsum("rij,rjk,rik->r", A, state.cov, A)
        v = self.velocity(0.0, state.x, state)
        return (state.weights_or_uniform() * (v * v).sum(-1)).sum(-1)

    # -- closed forms -------------------------------------------------------------------------------------------
    def _closed_form_target(self, initial, where):
        if self.kernel != "gaussian" or not self.target.is_gaussian:
            raise CapabilityError(
                f"{where}: closed forms exist for the Gaussian kernel and a Gaussian target only (kernel "
                f"{self.kernel!r}, target {self.target.describe()['kind']})"
            )
        check_state(initial, self.dim, where, Gaussians)
        return self.target.gaussian(initial.mean)

    def mean_solution(self, t, initial: Gaussians, t0: float = 0.0) -> torch.Tensor:
        """m(t) = m_β + exp(−(t − t0)ε(Σ_β + εI)⁻¹)(m₀ − m_β), shape (R, d): exact for any Σ (ṁ = b does not
        depend on Σ), with or without self-correction."""
        mb, Sb = self._closed_form_target(initial, "drifting.mean_solution")
        h, eps = float(t - t0), self.epsilon
        E = matrix_function(Sb, lambda lam: torch.exp(-h * eps / (lam + eps)))
        return mb + (initial.mean - mb) @ E.T

    def solution(self, t, initial: Gaussians, t0: float = 0.0) -> Gaussians:
        """The exact Gaussian state at t from ``initial`` at t0 (module docstring).

        Raw drift: Σ(t) = EΣ₀E, E = exp(−(t − t0)ε(Σ_β + εI)⁻¹). Self-corrected: Σ₀ must commute with Σ_β
        (e.g. any Σ₀ toward γ); each common eigenvalue follows :func:`eigenvalue_solution`. A non-commuting
        start has no closed form (the eigenbasis turns): integrate the closure (``Simulation`` on Gaussians)
        and use :meth:`mean_solution` for the mean.
        """
        where = "drifting.solution"
        mb, Sb = self._closed_form_target(initial, where)
        h, eps = float(t - t0), self.epsilon
        mean = self.mean_solution(t, initial, t0)
        S0 = initial.cov
        if not self.self_correction:
            E = matrix_function(Sb, lambda lam: torch.exp(-h * eps / (lam + eps)))
            return Gaussians(mean, symmetrize(E @ S0 @ E))
        if h < 0:
            raise ParameterError(
                f"{where}: the self-corrected closed form runs forward in time; received t = {t:g} < t0 = {t0:g}"
            )
        commutator = (S0 @ Sb - Sb @ S0).abs().amax()
        scale = S0.abs().amax() * Sb.abs().amax()
        if float(commutator) > 1e-10 * float(scale):
            raise CapabilityError(
                f"{where}: the self-corrected closure has a closed-form covariance only when Σ₀ commutes with Σ_β "
                f"(here ‖Σ₀Σ_β − Σ_βΣ₀‖ = {float(commutator):.3g}); integrate the Gaussian closure with a Simulation "
                "on a Gaussians state, and use mean_solution() for the mean"
            )
        # Any generic combination has the common eigenvectors of two commuting matrices.
        _, U = torch.linalg.eigh(symmetrize(S0 + (1.0 / math.pi) * Sb))
        lam0 = torch.diagonal(U.transpose(-1, -2) @ S0 @ U, dim1=-2, dim2=-1)
        s = torch.diagonal(U.transpose(-1, -2) @ Sb @ U, dim1=-2, dim2=-1)
        lam = eigenvalue_solution(h, lam0, eps, s)
        return Gaussians(mean, symmetrize((U * lam[..., None, :]) @ U.transpose(-1, -2)))

    def describe(self):
        return {"name": self.name, "epsilon": self.epsilon, "kernel": self.kernel,
                "self_correction": self.self_correction, "target": self.target.describe()}


def drift_norm(state, *, field, target=None, t=None) -> torch.Tensor:
    """Observable ∫|v|² dμ of a drifting field (``field.monitor(state)``), shape (R,)."""
    monitor = getattr(field, "monitor", None)
    if not callable(monitor):
        raise CapabilityError(
            f"observable 'drift_norm' needs a drifting field with monitor(state); received {type(field).__name__}"
        )
    return monitor(state)


# -- Sinkhorn drifting ---------------------------------------------------------------------------------------


class SinkhornDriftingField(Field):
    """Sinkhorn drifting toward β: u = −∇(f_μβ − f_μμ) for the cost ½|x − y|² at ε (module docstring;
    MATH.md §9) — the Wasserstein gradient flow of ½S_{2ε}.

    Parameters
    ----------
    target:
        β: Gaussian (closure; with ``samples`` also particles), Empirical, Particles or samples (M, d) / (R, M, d).
    epsilon:
        ε > 0, the regularisation of the cost ½|x − y|² (Gibbs kernel e^{−|x−y|²/(2ε)} = K_ε).
    tolerance, max_iterations:
        Sinkhorn stopping rule: the potentials change by at most tolerance·ε in a sweep (None: always
        ``max_iterations`` sweeps), tested every ``check_every`` sweeps.
    relaxation, epsilon_scaling, warm_start, samples, seed:
        as for the ``sinkhorn`` field (over-relaxation ω, ε-annealing of cold solves, warm start across
        steps, a fixed sample of an analytic target).
    """

    name = "sinkhorn_drifting"

    def __init__(self, target, epsilon: float = 1.0, tolerance: float | None = 1e-6, max_iterations: int = 1000,
                 check_every: int = 2, relaxation="auto", epsilon_scaling: float | None = None,
                 warm_start: bool = True, samples: int | None = None, seed: int = 0):
        where = "sinkhorn_drifting"
        self.epsilon = positive(epsilon, "epsilon", where)
        self.tolerance = None if tolerance is None else positive(tolerance, "tolerance", where)
        self.max_iterations = check_int(max_iterations, "max_iterations", where)
        # Cost ½|x − y|² at ε ≡ cost |x − y|² at 2ε: same plans, potentials halved (MATH.md §0, §9), so the
        # field is ½ × the Sinkhorn-divergence flow at 2ε (whose tolerance is relative to its own 2ε, as ours).
        self.divergence = SinkhornDivergence(
            target, 2.0 * self.epsilon, tol=self.tolerance, max_iter=max_iterations, check_every=check_every,
            relaxation=relaxation, epsilon_scaling=epsilon_scaling, warm_start=warm_start, samples=samples, seed=seed,
            where="sinkhorn_drifting",
        )
        self.target = self.divergence.target
        self.dim = self.divergence.dim
        self._capabilities = self.divergence.capabilities

    @property
    def stats(self) -> dict:
        """Sweeps and last change (in units of 2ε) of each Sinkhorn solve, per problem."""
        return self.divergence.stats

    def reset(self) -> None:
        """Forget the warm-start potentials."""
        self.divergence.reset()

    def potentials(self, state: Particles) -> dict:
        """Potentials of the cost ½|x − y|² at ε: f_μβ (R, N), g_μβ (R, M), f_μμ (R, N) (half those of
        |x − y|² at 2ε)."""
        return {k: 0.5 * v for k, v in self.divergence.potentials(state).items()}

    def velocity(self, t, x, state: Particles):
        where = "sinkhorn_drifting.velocity"
        check_state(state, self.dim, where, Particles)
        check_points(x, self.dim, where)
        check_replicas(self.target, state.replicas, where)
        return 0.5 * self.divergence.velocity(x, state)

    def affine(self, t, state: Gaussians):
        """½ × the Sinkhorn-divergence closure at 2ε (MATH.md §7, §9): b = m_β − m, A symmetric."""
        b, A = self.divergence.affine(state)
        return 0.5 * b, 0.5 * A

    def energy(self, state) -> torch.Tensor:
        """½S_{2ε}(μ, β), shape (R,): dual formula on particles, Janati et al.'s closed form on Gaussians."""
        return 0.5 * self.divergence.energy(state)

    def describe(self):
        return {"name": self.name, "epsilon": self.epsilon, "tolerance": self.tolerance,
                "max_iterations": self.max_iterations, "target": self.target.describe()}


@measureflow.hookimpl
def measureflow_register_fields(registry):
    registry.add_field("drifting", DriftingField)
    registry.add_field("sinkhorn_drifting", SinkhornDriftingField)
