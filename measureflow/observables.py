"""Observables: numbers computed from a state, one per replica (DESIGN.md "writer / observer").

Each observable is a plain function ``obs(state, *, field=None, target=None, t=None, **params)`` that
returns a tensor of shape (R,) or (R, …) on the state's device. They are registered under their names
through :func:`measureflow_register_observables`:

============  =====================================================================================
name          value (MATH.md §0 normalisations: everything unhalved)
============  =====================================================================================
mean          m, shape (R, d)
covariance    Σ (population covariance for particles), shape (R, d, d)
energy        ``field.energy(state)``, the functional the field descends, shape (R,)
w2            W₂²(μ, β) = min_π ∫|x − y|² dπ, shape (R,)
mmd           MMD²_k(μ, β) = ∬ k d(μ − β)^{⊗2}, shape (R,)
sinkhorn      S_ε(μ, β) = OT_ε(μ, β) − ½OT_ε(μ, μ) − ½OT_ε(β, β), shape (R,)
============  =====================================================================================

``target`` (the β of the distances) may be a :class:`~measureflow.measures.Gaussian`,
:class:`~measureflow.measures.GaussianMixture` or :class:`~measureflow.measures.Empirical`, a
:class:`~measureflow.state.Particles` or :class:`~measureflow.state.Gaussians` state with 1 or R
replicas (one target per replica), or a tensor of points (M, d) / (R, M, d) with uniform weights.

**How each pair is computed.**

* Gaussian vs Gaussian: closed forms — Bures for ``w2`` (MATH.md §5/§12), the Gaussian-kernel
  expectation for ``mmd`` (MATH.md §6), Janati et al.'s entropic formula for ``sinkhorn`` (MATH.md §7).
  All batched over R with ``eigh``/Cholesky on the device.
* ``mmd`` with the Gaussian kernel is also exact against any Gaussian mixture (Diracs included), so
  particles vs a Gaussian or mixture target needs no sampling.
* Point clouds vs point clouds: ``w2`` by POT's exact network simplex (``ot.emd2``), ``sinkhorn`` by
  POT's log-domain Sinkhorn (``ot.solve``), ``mmd`` by blocked kernel sums on the device.
* Anything else (a point cloud against an analytic law without a closed form for that pair, e.g.
  ``w2`` between particles and a Gaussian) **replaces each analytic side by a sample drawn with a
  fixed seed**: ``law.sample(n, torch.Generator(device=state.device).manual_seed(seed))`` (a
  ``Gaussians`` state by ``state.sample(n, generator)``), with n = ``samples`` or, by default, the
  size of the point cloud on the other side (1024 when both sides are analytic; then the state is
  sampled first and the target next from the same generator). Because the seed is fixed, every call
  compares against the *same* sample, so a time series of the observable is smooth rather than
  jittering; the price is a bias of the order of the sampling error (for W₂² between a law and an
  n-sample, O(n^{-1/2}) in d ≤ 3 and O(n^{-2/d}) above), which sets the floor the observable can
  reach. Pass ``target=law.particles(M, generator)`` yourself to control it.

POT runs on the CPU for ``w2`` (its network simplex is CPU-only) and, for ``sinkhorn``, on the
state's device through POT's torch backend; those calls are the only place these functions leave the
device or synchronise it. Both solvers hold an N×M cost matrix, so they refuse N·M above
``max_pairs`` with a message saying what to use instead.
"""

from __future__ import annotations

import warnings

import attrs
import torch

from .errors import CapabilityError, ParameterError, ShapeError, StateError
from .fields import capabilities
from .measures import Empirical, Gaussian, GaussianMixture, Measure
from .linalg import matrix_function, symmetrize
from .plugins import hookimpl
from .reductions import kernel_sum
from .state import Gaussians, Particles, state_kind
from .validators import check_int, check_positive

__all__ = [
    "mean",
    "covariance",
    "energy",
    "w2",
    "mmd",
    "sinkhorn",
    "bures_w2",
    "gaussian_sinkhorn_divergence",
    "gaussian_kernel_expectation",
    "KERNELS",
    "OBSERVABLES",
    "measureflow_register_observables",
]

#: Kernels of :func:`mmd`; ℓ is ``bandwidth``.
KERNELS = {
    "gaussian": "k(x, y) = exp(−|x − y|² / (2ℓ²))",
    "laplace": "k(x, y) = exp(−|x − y| / ℓ)",
    "energy": "k(x, y) = −|x − y| (MMD² = energy distance; ℓ unused)",
}


# -- moments and energy ---------------------------------------------------------------------------------


def mean(state, *, field=None, target=None, t=None) -> torch.Tensor:
    """Mean m = Σᵢ wᵢ xᵢ (particles) or the Gaussian's m; shape (R, d)."""
    if state_kind(state) == "particles":
        return state.mean()
    return state.mean


def covariance(state, *, field=None, target=None, t=None) -> torch.Tensor:
    """Covariance Σᵢ wᵢ (xᵢ − m)(xᵢ − m)ᵀ (particles, population) or the Gaussian's Σ; shape (R, d, d)."""
    state_kind(state)
    return state.covariance()


def energy(state, *, field=None, target=None, t=None) -> torch.Tensor:
    """The functional F(μ) the field descends, ``field.energy(state)``, shape (R,) (MATH.md eq. 0.2)."""
    if field is None:
        raise ParameterError("observable 'energy' needs the field: call it with field=<the simulation's field>")
    if not callable(getattr(field, "energy", None)) or "energy" not in capabilities(field):
        name = getattr(field, "name", type(field).__name__)
        raise CapabilityError(
            f"observable 'energy': field {name!r} ({type(field).__name__}) has no energy(state); "
            "drop this observable or use a field that descends a known functional"
        )
    return field.energy(state)


# -- the two sides of a distance ------------------------------------------------------------------------


@attrs.frozen(eq=False)
class _Cloud:
    """Weighted points, x (R, N, d), w (R, N); R may be 1 (shared by every replica)."""

    x: torch.Tensor
    w: torch.Tensor


@attrs.frozen(eq=False)
class _Mixture:
    """Σₖ wₖ N(mₖ, Σₖ): means (R, K, d), covs (R, K, d, d), weights (R, K); R may be 1.

    ``source`` samples the law: ``source(n, generator) -> (R, n, d)``.
    """

    means: torch.Tensor
    covs: torch.Tensor
    weights: torch.Tensor
    gaussian: bool  # exactly one positive-definite component per replica
    source: object

    def sample(self, n: int, generator: torch.Generator) -> _Cloud:
        x = self.source(n, generator)
        w = torch.full(x.shape[:2], 1.0 / n, dtype=x.dtype, device=x.device)
        return _Cloud(x, w)


def _side(obj, *, like: torch.Tensor, role: str, observable: str):
    """Normalise a state, measure or tensor to a _Cloud or a _Mixture on ``like``'s device/dtype."""
    device, dtype = like.device, like.dtype
    if isinstance(obj, Particles):
        obj = obj.to(device=device, dtype=dtype)
        return _Cloud(obj.x, obj.weights_or_uniform())
    if isinstance(obj, Gaussians):
        obj = obj.to(device=device, dtype=dtype)
        R = obj.replicas
        ones = torch.ones(R, 1, dtype=dtype, device=device)
        return _Mixture(obj.mean[:, None], obj.cov[:, None], ones, True, lambda n, g: obj.sample(n, g).x)
    if isinstance(obj, Measure):
        if obj.device != device or obj.dtype != dtype:
            obj = obj.to(device=device, dtype=dtype)
        if isinstance(obj, Empirical):
            return _Cloud(obj.points[None], obj.weights_or_uniform()[None])
        if isinstance(obj, Gaussian):
            ones = torch.ones(1, 1, dtype=dtype, device=device)
            return _Mixture(obj.mean()[None, None], obj.cov[None, None], ones, True,
                            lambda n, g: obj.sample(n, g, replicas=1))
        if isinstance(obj, GaussianMixture):
            gaussian = obj.components == 1 and obj.has_density
            return _Mixture(obj.means[None], obj.covs[None], obj.weights[None], gaussian,
                            lambda n, g: obj.sample(n, g, replicas=1))
    if isinstance(obj, torch.Tensor):
        x = obj.to(device=device, dtype=dtype)
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3:
            raise ShapeError(
                f"observable {observable!r}: a {role} given as a tensor must have shape (M, d) or (R, M, d); "
                f"received {tuple(obj.shape)}"
            )
        w = torch.full(x.shape[:2], 1.0 / x.shape[1], dtype=dtype, device=device)
        return _Cloud(x, w)
    if obj is None:
        raise ParameterError(
            f"observable {observable!r} needs a target: pass target=<Gaussian, GaussianMixture, Empirical, "
            "Particles, Gaussians or a tensor of points>"
        )
    raise StateError(
        f"observable {observable!r}: cannot use a {type(obj).__name__} as the {role}; expected a "
        "measureflow Gaussian, GaussianMixture, Empirical, Particles, Gaussians or a tensor of points"
    )


def _replicas(side) -> int:
    return side.x.shape[0] if isinstance(side, _Cloud) else side.means.shape[0]


def _dim(side) -> int:
    return side.x.shape[-1] if isinstance(side, _Cloud) else side.means.shape[-1]


def _sides(state, target, observable):
    kind = state_kind(state)
    like = state.x if kind == "particles" else state.mean
    a = _side(state, like=like, role="state", observable=observable)
    b = _side(target, like=like, role="target", observable=observable)
    if _dim(a) != _dim(b):
        raise ShapeError(
            f"observable {observable!r}: the target has dimension {_dim(b)} but the state has {_dim(a)}"
        )
    R, Rb = _replicas(a), _replicas(b)
    if Rb not in (1, R):
        raise ShapeError(
            f"observable {observable!r}: the target has {Rb} replicas but the state has {R}; give one "
            "target shared by all replicas or exactly one per replica"
        )
    return a, b, like


def _as_clouds(a, b, *, seed: int, samples: int | None, device):
    """Replace analytic sides by fixed-seed samples (see the module docstring)."""
    if isinstance(a, _Cloud) and isinstance(b, _Cloud):
        return a, b
    if samples is None:
        cloud = a if isinstance(a, _Cloud) else b if isinstance(b, _Cloud) else None
        n = cloud.x.shape[1] if cloud is not None else 1024
    else:
        n = check_int(samples, "samples")
    generator = torch.Generator(device=device).manual_seed(int(seed))
    if isinstance(a, _Mixture):
        a = a.sample(n, generator)
    if isinstance(b, _Mixture):
        b = b.sample(n, generator)
    return a, b


def _check_pairs(a: _Cloud, b: _Cloud, max_pairs: int, observable: str, instead: str) -> None:
    N, M = a.x.shape[1], b.x.shape[1]
    if N * M > max_pairs:
        raise ParameterError(
            f"observable {observable!r}: N·M = {N}·{M} = {N * M} exceeds max_pairs = {max_pairs} "
            f"(POT holds an N×M cost matrix). {instead}, subsample the target, or raise max_pairs."
        )


def _to_numpy_problem(a: _Cloud, b: _Cloud, r: int, dtype=torch.float64):
    """Replica r's points and weights in float64, with zero-weight atoms dropped (POT's KL needs mass)."""
    ra = r if a.x.shape[0] > 1 else 0
    rb = r if b.x.shape[0] > 1 else 0
    xa, wa = a.x[ra].to(dtype), a.w[ra].to(dtype)
    xb, wb = b.x[rb].to(dtype), b.w[rb].to(dtype)
    keep_a, keep_b = wa > 0, wb > 0
    xa, wa, xb, wb = xa[keep_a], wa[keep_a], xb[keep_b], wb[keep_b]
    return xa, wa / wa.sum(), xb, wb / wb.sum()


# -- matrix functions -----------------------------------------------------------------------------------


def _sqrtm(a: torch.Tensor) -> torch.Tensor:
    """Spectral square root of symmetric PSD matrices (negative rounding eigenvalues clamped to 0)."""
    return matrix_function(a, lambda e: e.clamp_min(0).sqrt())


def _cross_eigenvalues(cov1: torch.Tensor, cov2: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of Σ₂^{1/2} Σ₁ Σ₂^{1/2} (clamped at 0), batched."""
    root2 = _sqrtm(cov2)
    return torch.linalg.eigvalsh(symmetrize(root2 @ cov1 @ root2)).clamp_min(0)


# -- W2 ---------------------------------------------------------------------------------------------------


def bures_w2(mean1, cov1, mean2, cov2) -> torch.Tensor:
    """Squared W₂ between Gaussians (MATH.md §5, §12), batched over leading dimensions:

    W₂² = |m₁ − m₂|² + tr(Σ₁ + Σ₂ − 2(Σ₂^{1/2} Σ₁ Σ₂^{1/2})^{1/2}),

    with the matrix square roots taken spectrally (``eigh``). Rounding can leave a value a few ulps
    below zero when the Gaussians coincide; it is not clamped.
    """
    mu = _cross_eigenvalues(cov1, cov2)
    trace = torch.diagonal(cov1, dim1=-2, dim2=-1).sum(-1) + torch.diagonal(cov2, dim1=-2, dim2=-1).sum(-1)
    return ((mean1 - mean2) ** 2).sum(-1) + trace - 2 * mu.sqrt().sum(-1)


def w2(state, *, field=None, target=None, t=None, seed: int = 0, samples: int | None = None,
       max_pairs: int = 4_000_000, max_iter: int = 1_000_000) -> torch.Tensor:
    """Squared Wasserstein-2 distance W₂²(μ, β) = min_π ∫|x − y|² dπ (unhalved, MATH.md §0); shape (R,).

    * Gaussians state vs a Gaussian target: :func:`bures_w2` (exact, on the device).
    * point clouds: POT's exact solver ``ot.emd2`` per replica, on the CPU in float64; refused when
      N·M > ``max_pairs`` (use the ``sinkhorn`` observable instead). ``max_iter`` bounds the network
      simplex; a RuntimeWarning says when it stopped before optimality.
    * other pairs (e.g. particles vs a Gaussian or a mixture): the analytic side is replaced by a
      sample drawn with the fixed ``seed`` (size ``samples``, default the other side's N); see the
      module docstring for the resulting bias.
    """
    import ot

    a, b, like = _sides(state, target, "w2")
    if isinstance(a, _Mixture) and isinstance(b, _Mixture) and a.gaussian and b.gaussian:
        return bures_w2(a.means[:, 0], a.covs[:, 0], b.means[:, 0], b.covs[:, 0]).expand(
            max(_replicas(a), _replicas(b)))
    a, b = _as_clouds(a, b, seed=seed, samples=samples, device=like.device)
    _check_pairs(a, b, max_pairs, "w2", "Use the 'sinkhorn' observable (entropic, debiased)")
    values = []
    for r in range(max(_replicas(a), _replicas(b))):
        xa, wa, xb, wb = (v.detach().cpu().numpy() for v in _to_numpy_problem(a, b, r))
        cost, log = ot.emd2(wa, wb, ot.dist(xa, xb), numItermax=int(max_iter), log=True)
        if log.get("warning"):
            warnings.warn(
                f"observable 'w2', replica {r}: POT's network simplex stopped early ({log['warning']}); "
                f"the value is an upper bound. Raise max_iter (now {max_iter}).",
                RuntimeWarning,
                stacklevel=2,
            )
        values.append(float(cost))
    return torch.tensor(values, dtype=like.dtype, device=like.device)


# -- MMD --------------------------------------------------------------------------------------------------


def gaussian_kernel_expectation(mean1, cov1, mean2, cov2, bandwidth: float) -> torch.Tensor:
    """E k(X, Y) for independent X ~ N(m₁, Σ₁), Y ~ N(m₂, Σ₂) and k = exp(−|x − y|²/(2ℓ²)) (MATH.md §6):

    E k = det(I + (Σ₁ + Σ₂)/ℓ²)^{−1/2} exp(−½ Δmᵀ(ℓ²I + Σ₁ + Σ₂)⁻¹Δm) = ℓᵈ det(ℓ²I + Σ₁ + Σ₂)^{−1/2} e^{…}.

    Arguments broadcast over leading dimensions; ``cov1``/``cov2`` may be ``None`` for a Dirac
    (zero covariance). Singular (even zero) covariances are fine since ℓ²I keeps G positive definite.
    """
    d = mean1.shape[-1]
    eye = torch.eye(d, dtype=mean1.dtype, device=mean1.device)
    g = eye
    for c in (cov1, cov2):
        if c is not None:
            g = g + c / bandwidth**2
    chol = torch.linalg.cholesky_ex(symmetrize(g)).L  # SPD by construction; the checked form syncs on CUDA
    diff = ((mean1 - mean2) / bandwidth)[..., None]
    chol = chol.expand(diff.shape[:-2] + chol.shape[-2:]) if chol.ndim < diff.ndim else chol
    z = torch.linalg.solve_triangular(chol, diff, upper=False)[..., 0]
    half_logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return torch.exp(-half_logdet - 0.5 * (z * z).sum(-1))


def _gaussian_inner(a, b, bandwidth: float) -> torch.Tensor:
    """⟨a, b⟩_k = ∬ k da db for the Gaussian kernel when a or b is a mixture (exact); shape (R,)."""
    if isinstance(a, _Cloud):  # Diracs: Σ = 0, one "component" per particle
        ma, ca, wa = a.x, None, a.w
    else:
        ma, ca, wa = a.means, a.covs, a.weights
    if isinstance(b, _Cloud):
        mb, cb, wb = b.x, None, b.w
    else:
        mb, cb, wb = b.means, b.covs, b.weights
    value = gaussian_kernel_expectation(
        ma[:, :, None, :], None if ca is None else ca[:, :, None],
        mb[:, None, :, :], None if cb is None else cb[:, None, :],
        bandwidth,
    )  # (R, P, Q)
    return torch.einsum("rp,rpq,rq->r", wa.expand(value.shape[0], -1), value, wb.expand(value.shape[0], -1))


def _cloud_inner(a: _Cloud, b: _Cloud, kernel: str, bandwidth: float) -> torch.Tensor:
    if a.x.shape[0] < b.x.shape[0]:
        a, b = b, a
    # The streamed kernel sum of measureflow.reductions (explicit differences in low d, so the
    # cancellation in MMD² near the diagonal keeps full relative accuracy).
    sums = kernel_sum(a.x, b.x, weights=b.w, kernel=kernel, bandwidth=bandwidth)
    return (a.w * sums).sum(-1)


def mmd(state, *, field=None, target=None, t=None, kernel: str = "gaussian", bandwidth: float = 1.0,
        seed: int = 0, samples: int | None = None) -> torch.Tensor:
    """Squared maximum mean discrepancy MMD²_k(μ, β) = ∬ k d(μ − β)^{⊗2} (unhalved, MATH.md §0, §6); shape (R,).

    MMD² = ⟨μ, μ⟩_k − 2⟨μ, β⟩_k + ⟨β, β⟩_k with ⟨α, β⟩_k = ∬ k(x, y) dα(x) dβ(y); for weighted points
    this is wᵀK_xx w − 2wᵀK_xy q + qᵀK_yy q (V-statistic: self pairs included). Kernels: see
    :data:`KERNELS` (ℓ = ``bandwidth``).

    * Gaussian kernel: exact for every combination of point clouds, Gaussians and Gaussian mixtures
      (:func:`gaussian_kernel_expectation` for every term touching an analytic law).
    * Laplace / energy kernels with an analytic side: that side is sampled with the fixed ``seed``
      (module docstring).

    Rounding can leave a value slightly below zero when μ = β; it is not clamped.
    """
    if kernel not in KERNELS:
        raise ParameterError(f"observable 'mmd': unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    bandwidth = check_positive(bandwidth, "bandwidth", "observable 'mmd'")
    a, b, like = _sides(state, target, "mmd")
    if kernel != "gaussian":
        a, b = _as_clouds(a, b, seed=seed, samples=samples, device=like.device)

    def inner(u, v):
        if isinstance(u, _Cloud) and isinstance(v, _Cloud):
            return _cloud_inner(u, v, kernel, bandwidth)
        return _gaussian_inner(u, v, bandwidth)

    R = max(_replicas(a), _replicas(b))
    return (inner(a, a) - 2 * inner(a, b) + inner(b, b)).expand(R)


# -- Sinkhorn divergence ----------------------------------------------------------------------------------


def gaussian_sinkhorn_divergence(mean1, cov1, mean2, cov2, epsilon: float) -> torch.Tensor:
    """S_ε between N(m₁, A) and N(m₂, B), cost |x − y|², regularisation ε·KL (MATH.md §0, §7), batched.

    From Janati et al.'s OT_ε with σ² = ε/2, D_{AB} = (4A^{1/2}BA^{1/2} + σ⁴I)^{1/2}:
    OT_ε = |m₁ − m₂|² + tr(A + B − D_{AB}) + dσ²(1 − log 2σ²) + σ² log det(D_{AB} + σ²I). In the
    debiased combination the traces of A and B and the constant cancel, leaving, with μₖ the
    eigenvalues of A^{1/2}BA^{1/2} and λₖ those of A (resp. B), u = (4μ + σ⁴)^{1/2}, w = (4λ² + σ⁴)^{1/2}:

    S_ε = |m₁ − m₂|² − Σu + σ²Σ log(u + σ²) + ½Σ_{A,B} [Σw − σ²Σ log(w + σ²)].
    """
    s2 = 0.5 * float(epsilon)
    s4 = s2 * s2

    def self_term(cov):
        lam = torch.linalg.eigvalsh(symmetrize(cov)).clamp_min(0)
        w = torch.sqrt(4 * lam * lam + s4)
        return 0.5 * (w.sum(-1) - s2 * torch.log(w + s2).sum(-1))

    mu = _cross_eigenvalues(cov2, cov1)  # eigenvalues of A^{1/2} B A^{1/2}
    u = torch.sqrt(4 * mu + s4)
    cross = ((mean1 - mean2) ** 2).sum(-1) - u.sum(-1) + s2 * torch.log(u + s2).sum(-1)
    return cross + self_term(cov1) + self_term(cov2)


def _entropic_ot(ot, xa, wa, xb, wb, epsilon, max_iter, tol):
    """OT_ε = min_π ⟨π, C⟩ + ε KL(π | a⊗b) with C = |x − y|² (POT's reg_type="KL", log-domain Sinkhorn)."""
    cost = ot.dist(xa, xb)  # squared Euclidean, unhalved
    res = ot.solve(cost, wa, wb, reg=epsilon, reg_type="KL", max_iter=max_iter, tol=tol)
    return res.value


def sinkhorn(state, *, field=None, target=None, t=None, epsilon: float = 1.0, seed: int = 0,
             samples: int | None = None, max_pairs: int = 25_000_000, max_iter: int = 20_000,
             tol: float = 1e-9) -> torch.Tensor:
    """Debiased Sinkhorn divergence S_ε(μ, β) = OT_ε(μ, β) − ½OT_ε(μ, μ) − ½OT_ε(β, β); shape (R,).

    OT_ε(α, β) = min_π ∫|x − y|² dπ + ε KL(π | α⊗β) (cost unhalved, MATH.md §0). ε is in units of
    length². Replacing ε KL(π|α⊗β) by −ε H(π) changes each OT_ε by −ε(H(α) + H(β)), which cancels in
    S_ε; POT's ``sinkhorn2``/``empirical_sinkhorn_divergence`` instead return the transport term
    ⟨π, C⟩ alone, a different ("sharp") quantity, so they are not used here.

    * Gaussians vs a Gaussian target: :func:`gaussian_sinkhorn_divergence` (closed form, on the device).
    * point clouds: POT's log-domain Sinkhorn (``ot.solve(..., reg_type="KL")``, float64, on the
      state's device through POT's torch backend), three solves per replica, ``max_iter`` iterations at
      most to marginal error ``tol`` (POT warns when it stops early); refused when N·M > ``max_pairs``.
    * other pairs: analytic sides sampled with the fixed ``seed`` (module docstring).
    """
    import ot

    epsilon = check_positive(epsilon, "epsilon", "observable 'sinkhorn'")
    a, b, like = _sides(state, target, "sinkhorn")
    R = max(_replicas(a), _replicas(b))
    if isinstance(a, _Mixture) and isinstance(b, _Mixture) and a.gaussian and b.gaussian:
        return gaussian_sinkhorn_divergence(a.means[:, 0], a.covs[:, 0], b.means[:, 0], b.covs[:, 0],
                                            epsilon).expand(R)
    a, b = _as_clouds(a, b, seed=seed, samples=samples, device=like.device)
    _check_pairs(a, b, max_pairs, "sinkhorn", "Use a larger epsilon with fewer particles")
    values = []
    self_b = None
    for r in range(R):
        xa, wa, xb, wb = (v.detach() for v in _to_numpy_problem(a, b, r))
        ab = _entropic_ot(ot, xa, wa, xb, wb, epsilon, max_iter, tol)
        aa = _entropic_ot(ot, xa, wa, xa, wa, epsilon, max_iter, tol)
        if self_b is None or b.x.shape[0] > 1:
            self_b = _entropic_ot(ot, xb, wb, xb, wb, epsilon, max_iter, tol)
        values.append(ab - 0.5 * aa - 0.5 * self_b)
    return torch.stack(values).to(dtype=like.dtype)


# -- registration -----------------------------------------------------------------------------------------

#: The built-in observables by registry name.
OBSERVABLES = {
    "mean": mean,
    "covariance": covariance,
    "energy": energy,
    "w2": w2,
    "mmd": mmd,
    "sinkhorn": sinkhorn,
}


@hookimpl
def measureflow_register_observables(registry) -> None:
    """Register the built-in observables under the names of :data:`OBSERVABLES`."""
    for name, function in OBSERVABLES.items():
        registry.add_observable(name, function)
