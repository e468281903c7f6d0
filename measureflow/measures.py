"""Reference laws used as sources and targets: :class:`Gaussian`, :class:`GaussianMixture`, :class:`Empirical`.

A measure is not a simulation state: it has no replica dimension and never moves. It can

* draw samples, reproducibly from an explicit seeded :class:`torch.Generator`
  (``sample(n, generator, replicas=None)`` → (n, d) or (R, n, d); ``particles(n, generator, replicas=1)``
  → :class:`~measureflow.state.Particles`);
* evaluate its log-density and score ∇ log p in closed form where a density exists;
* report its mean and covariance (population moments, MATH.md §0).

Mixture components may be Diracs (zero covariance, MATH.md §1.1: "Dirac atoms are Pᵢ = 0"); such a
mixture samples and has moments, but no density, so ``log_density``/``score`` refuse it.

Validation happens at construction; every method afterwards is pure tensor work on the measure's
device and dtype (no device→host synchronisation), so a field may call ``score`` inside a step.
"""

from __future__ import annotations

import abc

import math

import attrs
import torch

from .errors import CapabilityError, ShapeError, StateError
from .linalg import symmetrize
from .state import Gaussians, Particles, as_tensor
from .validators import check_int

__all__ = ["Measure", "Gaussian", "GaussianMixture", "Empirical"]

# torch.multinomial refuses more categories than this; beyond it we invert the CDF instead.
_MULTINOMIAL_MAX_CATEGORIES = 2**24


# -- validation helpers -------------------------------------------------------------------------------


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


def _common(*values, names):
    """Convert to tensors on one device with one floating dtype (promoted), or say which disagree."""
    tensors = [as_tensor(v, name=n) for v, n in zip(values, names)]
    devices = {t.device for v, t in zip(values, tensors) if isinstance(v, torch.Tensor)}
    if len(devices) > 1:
        where = ", ".join(f"{n} on {t.device}" for n, t in zip(names, tensors))
        raise StateError(f"{where}: put every parameter on the same device")
    device = devices.pop() if devices else tensors[0].device
    dtype = tensors[0].dtype if tensors[0].is_floating_point() else torch.get_default_dtype()
    for t in tensors[1:]:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(device=device, dtype=dtype) for t in tensors]


def _check_shape(t: torch.Tensor, expected: tuple, name: str, meaning: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ShapeError(f"{name} must have shape {meaning} = {tuple(expected)}; received {tuple(t.shape)}")


def _check_symmetric(c: torch.Tensor, name: str) -> torch.Tensor:
    asym = (c - c.transpose(-1, -2)).abs().amax(dim=(-1, -2))
    scale = c.abs().amax(dim=(-1, -2)).clamp_min(1e-30)
    bad = asym > _tolerance(c.dtype) * scale
    if bool(bad.any()):
        where = f"component {int(bad.reshape(-1).nonzero()[0, 0])} " if c.ndim == 3 else ""
        worst = float(asym.reshape(-1)[bad.reshape(-1)][0])
        raise StateError(
            f"{name} must be symmetric; {where}has max |Σ − Σᵀ| = {worst:.3g}. Symmetrise it with (S + S.T) / 2."
        )
    return symmetrize(c)


def _check_weights(w: torch.Tensor, name: str) -> None:
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise StateError(f"{name} must be finite and non-negative; received {w.tolist() if w.numel() <= 8 else w}")
    total = float(w.sum())
    if abs(total - 1.0) > _tolerance(w.dtype) * max(1.0, w.numel() ** 0.5):
        raise StateError(
            f"{name} must sum to one; they sum to {total:.10g}. Normalise them with w / w.sum()."
        )


def _check_generator(generator, device: torch.device, where: str) -> None:
    if generator is not None and torch.device(generator.device).type != device.type:
        raise StateError(
            f"{where}: the generator is on {generator.device} but the measure is on {device}; "
            f"create it with torch.Generator(device={str(device)!r}).manual_seed(seed)"
        )


def _check_points(x: torch.Tensor, d: int, where: str) -> None:
    if x.ndim < 1 or x.shape[-1] != d:
        raise ShapeError(f"{where}: x must have shape (..., d) with d = {d}; received {tuple(x.shape)}")


def _draw_indices(weights: torch.Tensor | None, size: int, count: int, generator, device) -> torch.Tensor:
    """``count`` i.i.d. indices in [0, size) with probabilities ``weights`` (uniform when None)."""
    if weights is None:
        return torch.randint(size, (count,), generator=generator, device=device)
    if size <= _MULTINOMIAL_MAX_CATEGORIES:
        return torch.multinomial(weights, count, replacement=True, generator=generator)
    # Inverse CDF: same law as multinomial, any number of categories.
    cdf = torch.cumsum(weights.to(torch.float64), 0)
    u = torch.rand(count, generator=generator, device=device, dtype=torch.float64) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp_max(size - 1)


def _sample_shape(n: int, replicas: int | None) -> tuple[int, ...]:
    n = check_int(n, "sample size n", error=ShapeError)
    if replicas is None:
        return (n,)
    return (check_int(replicas, "replicas", advice="Pass a whole number ≥ 1, or None for one unbatched set.",
                      error=ShapeError), n)


def _gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """log N(x; m, LLᵀ) for x (P, d) and K components: mean (K, d), chol (K, d, d) → (K, P)."""
    d = mean.shape[-1]
    diff = (x[None, :, :] - mean[:, None, :]).transpose(-1, -2)  # (K, d, P)
    z = torch.linalg.solve_triangular(chol, diff, upper=False)
    half_logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (K,)
    return -0.5 * (z * z).sum(-2) - half_logdet[:, None] - 0.5 * d * math.log(2 * math.pi)


def _gaussian_score(x: torch.Tensor, mean: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """−Σₖ⁻¹(x − mₖ) for x (P, d), K components → (K, P, d)."""
    diff = (x[None, :, :] - mean[:, None, :]).transpose(-1, -2)  # (K, d, P)
    return -torch.cholesky_solve(diff, chol).transpose(-1, -2)


# -- the measures --------------------------------------------------------------------------------------


class Measure(abc.ABC):
    """Common interface of reference laws (see the module docstring); every concrete law
    (Gaussian, GaussianMixture, Empirical) implements each abstract member."""

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """The dimension d of the space."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """The torch device of the law's tensors."""

    @property
    @abc.abstractmethod
    def dtype(self) -> torch.dtype:
        """The floating dtype of the law's tensors."""

    @abc.abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None, replicas: int | None = None) -> torch.Tensor:
        """n i.i.d. draws, shape (n, d), or (R, n, d) when ``replicas`` is given; reproducible from ``generator``."""

    def particles(self, n: int, generator: torch.Generator | None = None, replicas: int = 1) -> Particles:
        """n i.i.d. samples per replica as a uniformly weighted :class:`Particles` state (R, n, d)."""
        return Particles(self.sample(n, generator, replicas=replicas))

    @abc.abstractmethod
    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) for x (..., d), shape (...)."""

    @abc.abstractmethod
    def score(self, x: torch.Tensor) -> torch.Tensor:
        """∇ log p(x) for x (..., d), same shape as x."""

    @abc.abstractmethod
    def mean(self) -> torch.Tensor:
        """E[X], shape (d,)."""

    @abc.abstractmethod
    def covariance(self) -> torch.Tensor:
        """Cov[X], shape (d, d)."""


@attrs.frozen(eq=False)
class Gaussian(Measure):
    """N(m, Σ) with Σ symmetric positive definite.

    * ``log_density(x) = −½|L⁻¹(x − m)|² − log det L − (d/2) log 2π`` with Σ = LLᵀ (Cholesky);
    * ``score(x) = −Σ⁻¹(x − m)``;
    * ``sample``: x = m + Lz, z ~ N(0, I) drawn by ``torch.randn(generator=...)``.

    Parameters are converted to tensors (numpy and lists are accepted) on one device and one
    floating dtype; ``to(device, dtype)`` moves the measure.

    At its mean, the standard normal in d = 2 has log-density −log 2π:

    >>> import math, torch
    >>> standard = Gaussian(mean=torch.zeros(2, dtype=torch.float64), cov=torch.eye(2, dtype=torch.float64))
    >>> round(float(standard.log_density(torch.zeros(1, 2, dtype=torch.float64))[0]), 12) == round(-math.log(2 * math.pi), 12)
    True
    >>> standard.score(torch.tensor([[1.0, -2.0]], dtype=torch.float64))
    tensor([[-1.,  2.]], dtype=torch.float64)
    """

    mean_: torch.Tensor = attrs.field(alias="mean")
    cov: torch.Tensor = attrs.field()
    _chol: torch.Tensor = attrs.field(init=False, default=None, repr=False)

    def __attrs_post_init__(self):
        m, c = _common(self.mean_, self.cov, names=("Gaussian.mean", "Gaussian.cov"))
        if m.ndim != 1 or m.shape[0] == 0:
            raise ShapeError(f"Gaussian.mean must have shape (d,); received {tuple(m.shape)}")
        d = m.shape[0]
        _check_shape(c, (d, d), "Gaussian.cov", "(d, d)")
        if not (bool(torch.isfinite(m).all()) and bool(torch.isfinite(c).all())):
            raise StateError("Gaussian.mean and Gaussian.cov must be finite")
        c = _check_symmetric(c, "Gaussian.cov")
        chol, info = torch.linalg.cholesky_ex(c)
        if int(info) != 0:
            smallest = float(torch.linalg.eigvalsh(c)[0])
            raise StateError(
                f"Gaussian.cov must be positive definite; its smallest eigenvalue is {smallest:.6g}. "
                "Add a small multiple of the identity, or use GaussianMixture with a zero covariance "
                "for a Dirac."
            )
        object.__setattr__(self, "mean_", m.contiguous())
        object.__setattr__(self, "cov", c.contiguous())
        object.__setattr__(self, "_chol", chol)

    @property
    def dim(self) -> int:
        return self.mean_.shape[0]

    @property
    def device(self) -> torch.device:
        return self.mean_.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mean_.dtype

    @property
    def cholesky(self) -> torch.Tensor:
        """Lower-triangular L with Σ = LLᵀ."""
        return self._chol

    def to(self, device=None, dtype=None) -> "Gaussian":
        return Gaussian(self.mean_.to(device=device, dtype=dtype), self.cov.to(device=device, dtype=dtype))

    def sample(self, n: int, generator: torch.Generator | None = None, replicas: int | None = None) -> torch.Tensor:
        """x = m + Lz; shape (n, d), or (R, n, d) with ``replicas=R``."""
        _check_generator(generator, self.device, "Gaussian.sample")
        shape = _sample_shape(n, replicas) + (self.dim,)
        z = torch.randn(shape, generator=generator, dtype=self.dtype, device=self.device)
        return self.mean_ + z @ self._chol.transpose(-1, -2)

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """log N(x; m, Σ) for x of shape (..., d); returns shape (...)."""
        _check_points(x, self.dim, "Gaussian.log_density")
        flat = x.reshape(-1, self.dim)
        out = _gaussian_log_density(flat, self.mean_[None], self._chol[None])[0]
        return out.reshape(x.shape[:-1])

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """∇ log N(x; m, Σ) = −Σ⁻¹(x − m) for x of shape (..., d); returns shape (..., d)."""
        _check_points(x, self.dim, "Gaussian.score")
        flat = x.reshape(-1, self.dim)
        return _gaussian_score(flat, self.mean_[None], self._chol[None])[0].reshape(x.shape)

    def mean(self) -> torch.Tensor:
        """m, shape (d,)."""
        return self.mean_

    def covariance(self) -> torch.Tensor:
        """Σ, shape (d, d)."""
        return self.cov

    def as_state(self, replicas: int = 1) -> Gaussians:
        """The Gaussian as a :class:`~measureflow.state.Gaussians` state with R identical replicas."""
        R = int(replicas)
        return Gaussians(self.mean_.expand(R, -1).clone(), self.cov.expand(R, -1, -1).clone())

    def as_mixture(self) -> "GaussianMixture":
        """The same law as a one-component :class:`GaussianMixture`."""
        one = torch.ones(1, dtype=self.dtype, device=self.device)
        return GaussianMixture(one, self.mean_[None], self.cov[None])

    def __repr__(self) -> str:
        return f"Gaussian(d={self.dim}, dtype={self.dtype}, device={self.device})"


@attrs.frozen(eq=False)
class GaussianMixture(Measure):
    """Σₖ wₖ N(mₖ, Σₖ) with Σₖ symmetric positive *semi*-definite (Σₖ = 0 is a Dirac at mₖ).

    * ``mean = Σₖ wₖ mₖ``; ``covariance`` by the law of total covariance,
      Σ = Σₖ wₖ (Σₖ + mₖmₖᵀ) − mmᵀ = Σₖ wₖ Σₖ + Σₖ wₖ (mₖ − m)(mₖ − m)ᵀ;
    * ``log_density(x) = logsumexpₖ (log wₖ + log N(x; mₖ, Σₖ))``;
    * ``score(x) = Σₖ rₖ(x) (−Σₖ⁻¹(x − mₖ))``, rₖ = softmaxₖ(log wₖ + log N(x; mₖ, Σₖ)), with the
      responsibilities formed through ``torch.logsumexp`` so far-away points do not underflow
      (MATH.md §1.1–1.2: "compute rᵢⱼ with log-sum-exp");
    * ``sample``: component indices by ``torch.multinomial(weights, generator=...)``, then
      x = m_k + F_k z with F_k F_kᵀ = Σ_k (a spectral square root, so singular Σ_k are fine).

    log-density and score need every Σₖ positive definite; a mixture with a Dirac (or any singular)
    component raises :class:`~measureflow.errors.CapabilityError` there, while sampling and moments work.
    """

    weights: torch.Tensor = attrs.field()
    means: torch.Tensor = attrs.field()
    covs: torch.Tensor = attrs.field()
    _factor: torch.Tensor = attrs.field(init=False, default=None, repr=False)
    _chol: torch.Tensor | None = attrs.field(init=False, default=None, repr=False)
    _singular: tuple = attrs.field(init=False, default=(), repr=False)

    def __attrs_post_init__(self):
        w, m, c = _common(
            self.weights, self.means, self.covs,
            names=("GaussianMixture.weights", "GaussianMixture.means", "GaussianMixture.covs"),
        )
        if m.ndim != 2 or 0 in m.shape:
            raise ShapeError(f"GaussianMixture.means must have shape (K, d); received {tuple(m.shape)}")
        K, d = m.shape
        _check_shape(w, (K,), "GaussianMixture.weights", "(K,)")
        _check_shape(c, (K, d, d), "GaussianMixture.covs", "(K, d, d)")
        if not (bool(torch.isfinite(m).all()) and bool(torch.isfinite(c).all())):
            raise StateError("GaussianMixture.means and GaussianMixture.covs must be finite")
        _check_weights(w, "GaussianMixture.weights")
        c = _check_symmetric(c, "GaussianMixture.covs")
        evals, evecs = torch.linalg.eigh(c)
        scale = evals.abs().amax(dim=-1).clamp_min(1.0)
        negative = evals[:, 0] < -_tolerance(c.dtype) * scale * d
        if bool(negative.any()):
            k = int(negative.nonzero()[0, 0])
            raise StateError(
                f"GaussianMixture.covs must be positive semi-definite; component {k} has smallest "
                f"eigenvalue {float(evals[k, 0]):.6g}. Fix that covariance (zero is allowed: a Dirac)."
            )
        factor = evecs * evals.clamp_min(0).sqrt()[:, None, :]
        chol, info = torch.linalg.cholesky_ex(c)
        singular = tuple(int(k) for k in (info != 0).nonzero().reshape(-1).tolist())
        object.__setattr__(self, "weights", w.contiguous())
        object.__setattr__(self, "means", m.contiguous())
        object.__setattr__(self, "covs", c.contiguous())
        object.__setattr__(self, "_factor", factor.contiguous())
        object.__setattr__(self, "_chol", None if singular else chol)
        object.__setattr__(self, "_singular", singular)

    @classmethod
    def diracs(cls, points, weights=None) -> "GaussianMixture":
        """Σⱼ wⱼ δ_{yⱼ} written as a mixture with zero covariances (MATH.md §1.1: Pᵢ = 0)."""
        y = as_tensor(points, name="GaussianMixture.diracs points")
        if y.ndim != 2:
            raise ShapeError(f"points must have shape (M, d); received {tuple(y.shape)}")
        M, d = y.shape
        if weights is None:
            weights = torch.full((M,), 1.0 / M, dtype=y.dtype, device=y.device)
        return cls(weights, y, torch.zeros(M, d, d, dtype=y.dtype, device=y.device))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def components(self) -> int:
        """Number of components K."""
        return self.means.shape[0]

    @property
    def device(self) -> torch.device:
        return self.means.device

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    @property
    def has_density(self) -> bool:
        """True when every component covariance is positive definite."""
        return not self._singular

    def to(self, device=None, dtype=None) -> "GaussianMixture":
        return GaussianMixture(
            self.weights.to(device=device, dtype=dtype),
            self.means.to(device=device, dtype=dtype),
            self.covs.to(device=device, dtype=dtype),
        )

    def sample(self, n: int, generator: torch.Generator | None = None, replicas: int | None = None) -> torch.Tensor:
        """Shape (n, d), or (R, n, d) with ``replicas=R``. Draws component labels first, then normals."""
        _check_generator(generator, self.device, "GaussianMixture.sample")
        shape = _sample_shape(n, replicas)
        count = math.prod(shape)
        k = _draw_indices(self.weights, self.components, count, generator, self.device)
        z = torch.randn((count, self.dim), generator=generator, dtype=self.dtype, device=self.device)
        x = self.means[k] + torch.einsum("pij,pj->pi", self._factor[k], z)
        return x.reshape(shape + (self.dim,))

    def _require_density(self, what: str) -> None:
        if self._singular:
            raise CapabilityError(
                f"GaussianMixture.{what}: component(s) {list(self._singular)} have a singular covariance "
                "(a Dirac when zero), so the mixture has no density and no score. Give every component a "
                "positive-definite covariance (e.g. add ε·I), or use the fields' closed forms, which "
                "smooth Diracs by the noise (MATH.md §1.2)."
            )

    def _component_log_densities(self, flat: torch.Tensor) -> torch.Tensor:
        """log wₖ + log N(x; mₖ, Σₖ), shape (K, P)."""
        return torch.log(self.weights)[:, None] + _gaussian_log_density(flat, self.means, self._chol)

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) = logsumexpₖ(log wₖ + log N(x; mₖ, Σₖ)) for x (..., d); returns shape (...)."""
        self._require_density("log_density")
        _check_points(x, self.dim, "GaussianMixture.log_density")
        flat = x.reshape(-1, self.dim)
        return torch.logsumexp(self._component_log_densities(flat), dim=0).reshape(x.shape[:-1])

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior component probabilities rₖ(x), shape (..., K)."""
        self._require_density("responsibilities")
        _check_points(x, self.dim, "GaussianMixture.responsibilities")
        flat = x.reshape(-1, self.dim)
        logp = self._component_log_densities(flat)
        r = torch.exp(logp - torch.logsumexp(logp, dim=0, keepdim=True))
        return r.transpose(0, 1).reshape(x.shape[:-1] + (self.components,))

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """∇ log p(x) = Σₖ rₖ(x)(−Σₖ⁻¹(x − mₖ)) for x (..., d); returns shape (..., d)."""
        self._require_density("score")
        _check_points(x, self.dim, "GaussianMixture.score")
        flat = x.reshape(-1, self.dim)
        logp = self._component_log_densities(flat)  # (K, P)
        r = torch.exp(logp - torch.logsumexp(logp, dim=0, keepdim=True))
        s = _gaussian_score(flat, self.means, self._chol)  # (K, P, d)
        return (r[:, :, None] * s).sum(0).reshape(x.shape)

    def mean(self) -> torch.Tensor:
        """Σₖ wₖ mₖ, shape (d,)."""
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """Law of total covariance Σₖ wₖ Σₖ + Σₖ wₖ (mₖ − m)(mₖ − m)ᵀ, shape (d, d)."""
        centred = self.means - self.mean()
        within = torch.einsum("k,kij->ij", self.weights, self.covs)
        between = torch.einsum("k,ki,kj->ij", self.weights, centred, centred)
        return within + between

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.components}, d={self.dim}, dtype={self.dtype}, device={self.device})"


@attrs.frozen(eq=False)
class Empirical(Measure):
    """Σⱼ qⱼ δ_{yⱼ}: points (M, d) with weights (M,) summing to one (uniform 1/M when None).

    It has no density: ``log_density``/``score`` raise :class:`~measureflow.errors.CapabilityError`.
    ``sample`` resamples atoms i.i.d. with probabilities q (``torch.multinomial`` with the generator);
    ``as_state`` gives the atoms themselves as a :class:`~measureflow.state.Particles` state.
    """

    points: torch.Tensor = attrs.field()
    weights: torch.Tensor | None = attrs.field(default=None)

    def __attrs_post_init__(self):
        if self.weights is None:
            (y,) = _common(self.points, names=("Empirical.points",))
            w = None
        else:
            y, w = _common(self.points, self.weights, names=("Empirical.points", "Empirical.weights"))
        if y.ndim != 2 or 0 in y.shape:
            raise ShapeError(f"Empirical.points must have shape (M, d); received {tuple(y.shape)}")
        if not bool(torch.isfinite(y).all()):
            raise StateError("Empirical.points must be finite")
        if w is not None:
            _check_shape(w, (y.shape[0],), "Empirical.weights", "(M,)")
            _check_weights(w, "Empirical.weights")
            w = w.contiguous()
        object.__setattr__(self, "points", y.contiguous())
        object.__setattr__(self, "weights", w)

    @property
    def dim(self) -> int:
        return self.points.shape[1]

    @property
    def size(self) -> int:
        """Number of atoms M."""
        return self.points.shape[0]

    @property
    def device(self) -> torch.device:
        return self.points.device

    @property
    def dtype(self) -> torch.dtype:
        return self.points.dtype

    def weights_or_uniform(self) -> torch.Tensor:
        if self.weights is not None:
            return self.weights
        return torch.full((self.size,), 1.0 / self.size, dtype=self.dtype, device=self.device)

    def to(self, device=None, dtype=None) -> "Empirical":
        w = None if self.weights is None else self.weights.to(device=device, dtype=dtype)
        return Empirical(self.points.to(device=device, dtype=dtype), w)

    def sample(self, n: int, generator: torch.Generator | None = None, replicas: int | None = None) -> torch.Tensor:
        """Weighted resampling of the atoms; shape (n, d), or (R, n, d) with ``replicas=R``."""
        _check_generator(generator, self.device, "Empirical.sample")
        shape = _sample_shape(n, replicas)
        idx = _draw_indices(self.weights, self.size, math.prod(shape), generator, self.device)
        return self.points[idx].reshape(shape + (self.dim,))

    def as_state(self, replicas: int = 1) -> Particles:
        """The atoms and weights themselves as a Particles state (R identical replicas)."""
        R = int(replicas)
        x = self.points.expand(R, -1, -1).clone()
        w = None if self.weights is None else self.weights.expand(R, -1).clone()
        return Particles(x, w)

    def as_mixture(self) -> GaussianMixture:
        """The same law as a mixture of Diracs (zero covariances)."""
        return GaussianMixture.diracs(self.points, self.weights_or_uniform())

    def _no_density(self, what: str):
        raise CapabilityError(
            f"Empirical.{what}: an empirical measure is a sum of Diracs and has no density or score. "
            "Smooth it first (e.g. GaussianMixture(weights, points, covs=ε·I)), or use a field that "
            "works with samples (MATH.md §3(c), §9)."
        )

    def log_density(self, x):
        self._no_density("log_density")

    def score(self, x):
        self._no_density("score")

    def mean(self) -> torch.Tensor:
        """Σⱼ qⱼ yⱼ, shape (d,)."""
        return self.weights_or_uniform() @ self.points

    def covariance(self) -> torch.Tensor:
        """Σⱼ qⱼ (yⱼ − m)(yⱼ − m)ᵀ (population covariance), shape (d, d)."""
        centred = self.points - self.mean()
        return torch.einsum("j,ji,jk->ik", self.weights_or_uniform(), centred, centred)

    def __repr__(self) -> str:
        weighted = "weighted" if self.weights is not None else "uniform"
        return f"Empirical(M={self.size}, d={self.dim}, {weighted}, dtype={self.dtype}, device={self.device})"
