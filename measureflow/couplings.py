"""Couplings of two mini-batches, and the Brenier map and McCann interpolation of Gaussians.

A coupling pairs the rows of two mini-batches x0 (B0, d) and x1 (B1, d), optionally weighted
(w0 (B0,), w1 (B1,), each a probability vector; uniform when omitted, MATH.md §0):

    coupling(x0, x1, generator=None, w0=None, w1=None) -> (x0_paired, x1_paired)   # both (B0, d)

Row k of both outputs is one pair (X0, X1) ~ π, where π is a coupling of the two weighted batches
(MATH.md §1: the joint law of the endpoints of the interpolant). ``coupling.pairs(...)`` returns the
index tensors (i, j) instead (for particles that carry their pair label, MATH.md §1.1);
``coupling.plan(...)`` the (B0, B1) plan π itself.

* ``independent`` — the product coupling π = w0 ⊗ w1. Without weights and with B0 = B1 the rows are
  paired as given, (k, k): two independently drawn batches are already a sample of the product.
* ``exact_ot`` — the optimal plan of the batch, π = argmin Σᵢⱼ πᵢⱼ Cᵢⱼ over the plans with marginals
  (w0, w1), for the unhalved squared-Euclidean cost Cᵢⱼ = |x0ᵢ − x1ⱼ|² (MATH.md §0; POT ``ot.emd``).
  Its cost is W₂² of the two weighted batches. For uniform weights and B0 = B1 the plan is a
  permutation (a vertex of the Birkhoff polytope) and the pairs are that permutation.
* ``sinkhorn`` — the entropic plan π_ε = argmin ⟨π, C⟩ + ε KL(π | w0 ⊗ w1) (MATH.md §0, unhalved cost,
  ε in units of length²; POT ``ot.sinkhorn``). POT regularises with −H(π) instead, which differs from
  KL(π | w0 ⊗ w1) by a constant on the plans with marginals (w0, w1), so the plan is the same.
  π_ε → the optimal plan as ε → 0, and → w0 ⊗ w1 as ε → ∞.

Pairs from a plan (``exact_ot``, ``sinkhorn``; ``independent`` alike, see its docstring): without w0 every
row of x0 is kept once, in order, and its partner is drawn from the row's conditional law
j | i ~ πᵢ· / Σⱼ πᵢⱼ (rows stratified: the x0 side of the pairs is exactly uniform); with w0 the
rows too are drawn, i ~ Σⱼ πᵢⱼ. Either way pair k has law π; draws use ``generator`` (a
``torch.Generator``, whose device they run on), so a seeded generator reproduces the pairs.

Plans are computed in float64 on the host (one synchronisation per mini-batch, outside any field);
the index tensors are on x0's device.

Gaussians (MATH.md §1.5): :func:`brenier_map` (T^OT), :func:`gaussian_brenier_map` (T^OT and the
shift of the affine map), :func:`mccann_interpolation` (the displacement interpolation),
:func:`transport_cost` (E|T(X) − X|²); entropic (MATH.md §7): :func:`entropic_cross_covariance` (the
cross-covariance of the entropic plan) and :func:`schrodinger_interpolation` (its Brownian-bridge
interpolation, the Schrödinger bridge).
"""

from __future__ import annotations

import abc
import math
import warnings

import attrs
import numpy as np
import torch

from .errors import ParameterError, ShapeError, StateError
from .linalg import check_psd, covariance_pair, matrix_function, spd_roots, symmetrize
from .state import as_tensor
from .validators import check_positive, integer, to_positive

__all__ = [
    "Coupling",
    "IndependentCoupling",
    "ExactOTCoupling",
    "SinkhornCoupling",
    "COUPLINGS",
    "get",
    "squared_distances",
    "brenier_map",
    "gaussian_brenier_map",
    "mccann_interpolation",
    "entropic_cross_covariance",
    "schrodinger_interpolation",
    "transport_cost",
]


# -- argument checks ------------------------------------------------------------------------------------


def _batch(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise StateError(f"coupling: {name} must be a torch.Tensor of shape (B, d); received {type(x).__name__}")
    if x.ndim != 2 or 0 in x.shape:
        raise ShapeError(
            f"coupling: {name} must have shape (B, d) with B, d >= 1 (one mini-batch); received {tuple(x.shape)}. "
            "A coupling pairs one batch at a time: pass x[r] for replica r."
        )
    if not x.is_floating_point():
        raise StateError(f"coupling: {name} must be floating point; received dtype {x.dtype}")
    return x


def _probability(w, size: int, name: str) -> torch.Tensor | None:
    """The weights as a float64 host probability vector, renormalised to sum to one exactly."""
    if w is None:
        return None
    w = torch.as_tensor(w)
    if tuple(w.shape) != (size,):
        raise ShapeError(f"coupling: {name} must have shape ({size},) to match its batch; received {tuple(w.shape)}")
    host = w.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(host).all()) or bool((host < 0).any()):
        raise StateError(f"coupling: {name} must be finite and non-negative")
    total = float(host.sum())
    # Summation round-off of the caller's dtype: ~ε per term, growing like √size for random-sign errors.
    tol = (1e-10 if w.dtype == torch.float64 else 1e-5) * max(1.0, math.sqrt(size))
    if abs(total - 1.0) > tol:
        raise StateError(f"coupling: {name} must sum to one; they sum to {total:.10g}. Normalise them with w / w.sum().")
    # POT refuses marginals whose totals differ, so the round-off allowed above is removed here.
    return host / total


def _inputs(x0, x1, w0, w1):
    x0, x1 = _batch(x0, "x0"), _batch(x1, "x1")
    if x0.shape[1] != x1.shape[1]:
        raise ShapeError(
            f"coupling: x0 and x1 must have the same dimension d; received x0 {tuple(x0.shape)} and x1 {tuple(x1.shape)}"
        )
    if x0.device != x1.device:
        raise StateError(f"coupling: x0 is on {x0.device} but x1 is on {x1.device}; move both to one device")
    return x0, x1, _probability(w0, x0.shape[0], "w0"), _probability(w1, x1.shape[0], "w1")


def _uniform(size: int) -> torch.Tensor:
    return torch.full((size,), 1.0 / size, dtype=torch.float64)


def squared_distances(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Cᵢⱼ = |x0ᵢ − x1ⱼ|² (unhalved, MATH.md §0), float64 (B0, B1) on the host.

    Computed as |x0ᵢ − c|² + |x1ⱼ − c|² − 2 (x0ᵢ − c)·(x1ⱼ − c) about the joint mean c (the cost is
    translation invariant; centring keeps the cancellation small), clamped at 0: O(B0 B1) memory
    whatever d, absolute error of order d ε (|x0ᵢ − c|² + |x1ⱼ − c|²).
    """
    a = x0.detach().to("cpu", torch.float64)
    b = x1.detach().to("cpu", torch.float64)
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        raise StateError("coupling: x0 and x1 must be finite; the batch holds NaN or infinite coordinates")
    centre = torch.cat([a, b]).mean(0)
    a, b = a - centre, b - centre
    cost = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return cost.clamp_min_(0.0)


def _sample_pairs(plan: torch.Tensor, keep_rows: bool, generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """B0 index pairs of law π (module docstring); rows kept in order when ``keep_rows``."""
    B0 = plan.shape[0]
    draw_on = generator.device if generator is not None else torch.device("cpu")
    p = plan.to(draw_on)
    if keep_rows:
        i = torch.arange(B0, device=draw_on)
        rows = p
    else:
        i = torch.multinomial(p.sum(1), B0, replacement=True, generator=generator)
        rows = p[i]
    if bool(((rows > 0).sum(1) == 1).all()):
        # Every conditional is a point mass (a permutation plan, say): no randomness to spend.
        j = rows.argmax(1)
    else:
        j = torch.multinomial(rows, 1, replacement=True, generator=generator)[:, 0]
    return i.to(device), j.to(device)


# -- couplings -----------------------------------------------------------------------------------------


class Coupling(abc.ABC):
    """Base class: subclasses implement :meth:`plan` and :meth:`pairs`; calling gathers the rows."""

    name = "coupling"

    @abc.abstractmethod
    def plan(self, x0, x1, w0=None, w1=None) -> torch.Tensor:
        """The plan π (B0, B1), float64 on the host, with marginals (w0, w1)."""

    @abc.abstractmethod
    def pairs(self, x0, x1, generator=None, w0=None, w1=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Index tensors (i, j), each (B0,), on x0's device: pair k is (x0[i[k]], x1[j[k]])."""

    def __call__(self, x0, x1, generator=None, w0=None, w1=None) -> tuple[torch.Tensor, torch.Tensor]:
        i, j = self.pairs(x0, x1, generator=generator, w0=w0, w1=w1)
        return x0[i], x1[j]

    def describe(self) -> dict:
        """The name and parameters, JSON-able."""
        return {"name": self.name, **attrs.asdict(self)} if attrs.has(type(self)) else {"name": self.name}


@attrs.frozen
class IndependentCoupling(Coupling):
    """The product coupling π = w0 ⊗ w1 (MATH.md §1.1; module docstring).

    Pairs: each side keeps its rows in order when it has no weights and B0 rows, and is otherwise
    drawn i.i.d. from its weights (uniform when omitted), independently of the other side.
    """

    name = "independent"

    def plan(self, x0, x1, w0=None, w1=None) -> torch.Tensor:
        x0, x1, w0, w1 = _inputs(x0, x1, w0, w1)
        a = _uniform(x0.shape[0]) if w0 is None else w0
        b = _uniform(x1.shape[0]) if w1 is None else w1
        return a[:, None] * b[None, :]

    def pairs(self, x0, x1, generator=None, w0=None, w1=None):
        x0, x1, w0, w1 = _inputs(x0, x1, w0, w1)
        B0 = x0.shape[0]
        draw_on = generator.device if generator is not None else torch.device("cpu")

        def side(weights, size):
            if weights is None and size == B0:
                return torch.arange(B0, device=x0.device)
            p = (_uniform(size) if weights is None else weights).to(draw_on)
            return torch.multinomial(p, B0, replacement=True, generator=generator).to(x0.device)

        return side(w0, B0), side(w1, x1.shape[0])


class _PlanCoupling(Coupling):
    """A coupling given by a plan solved on the cost Cᵢⱼ = |x0ᵢ − x1ⱼ|²; subclasses provide :meth:`_solve`."""

    @abc.abstractmethod
    def _solve(self, a: np.ndarray, b: np.ndarray, cost: np.ndarray) -> np.ndarray:
        """The plan for marginals a, b (positive, summing to one) and the cost matrix."""

    def _advice(self) -> str:
        """What to change when the solver returns something that is not a plan."""
        return "this is a solver failure; please report it with the batch"

    def _check_converged(self, plan: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
        """Called with a valid plan; iterative solvers warn here when they stopped short of their tolerance."""

    def plan(self, x0, x1, w0=None, w1=None) -> torch.Tensor:
        x0, x1, w0, w1 = _inputs(x0, x1, w0, w1)
        return self._plan(x0, x1, w0, w1)

    def pairs(self, x0, x1, generator=None, w0=None, w1=None):
        x0, x1, w0, w1 = _inputs(x0, x1, w0, w1)
        return _sample_pairs(self._plan(x0, x1, w0, w1), w0 is None, generator, x0.device)

    def _plan(self, x0, x1, w0, w1) -> torch.Tensor:
        a = (_uniform(x0.shape[0]) if w0 is None else w0).numpy()
        b = (_uniform(x1.shape[0]) if w1 is None else w1).numpy()
        # Solved on the supports: zero weights make the log-domain solvers take log 0.
        rows, cols = a > 0, b > 0
        full = bool(rows.all() and cols.all())  # the usual case: no B0×B1 copies in and out
        cost = squared_distances(x0, x1).numpy()
        if not full:
            cost = cost[np.ix_(rows, cols)]
            a, b = a[rows], b[cols]
        with np.errstate(all="ignore"):  # overflow and underflow surface as an invalid plan, refused below
            inner = np.asarray(self._solve(a, b, cost), dtype=np.float64)
        if not (np.isfinite(inner.sum()) and inner.min() >= 0) or (inner.sum(1) <= 0).any():
            raise StateError(
                f"{self.name} coupling: the solver returned no valid plan (non-finite, negative or with an empty "
                f"row) for costs up to {cost.max():.3g}; {self._advice()}"
            )
        self._check_converged(inner, a, b)
        if full:
            return torch.from_numpy(inner)
        plan = np.zeros((rows.shape[0], cols.shape[0]))
        plan[np.ix_(rows, cols)] = inner
        return torch.from_numpy(plan)


@attrs.frozen
class ExactOTCoupling(_PlanCoupling):
    """Mini-batch optimal transport, POT ``ot.emd`` on Cᵢⱼ = |x0ᵢ − x1ⱼ|² (MATH.md §0, §1.1; module docstring).

    π = argmin_{π ∈ Π(w0, w1)} Σᵢⱼ πᵢⱼ Cᵢⱼ, whose value is W₂² of the weighted batches. ``max_iter`` is
    POT's ``numItermax`` (network-simplex iterations); a solve that reaches it raises ParameterError,
    since the simplex stopped early returns a point that is not a plan.
    """

    name = "exact_ot"
    max_iter: int = attrs.field(default=1_000_000, validator=integer("exact_ot coupling"))

    def _solve(self, a, b, cost):
        import ot

        plan, log = ot.emd(a, b, cost, numItermax=int(self.max_iter), log=True)
        if log.get("result_code") != 1:
            raise ParameterError(
                f"exact_ot coupling: POT's network simplex stopped on a {cost.shape[0]}×{cost.shape[1]} batch "
                f"({log.get('warning')}); raise max_iter (now {self.max_iter})"
            )
        return plan


_SINKHORN_METHODS = ("sinkhorn", "sinkhorn_log", "greenkhorn", "sinkhorn_stabilized", "sinkhorn_epsilon_scaling")


@attrs.frozen
class SinkhornCoupling(_PlanCoupling):
    """Entropic OT plan, POT ``ot.sinkhorn`` (MATH.md §0; module docstring):

        π_ε = argmin_{π ∈ Π(w0, w1)} Σᵢⱼ πᵢⱼ Cᵢⱼ + ε KL(π | w0 ⊗ w1),   Cᵢⱼ = |x0ᵢ − x1ⱼ|².

    Parameters: ``epsilon`` (> 0, length², for the unhalved cost: read it against the typical Cᵢⱼ;
    ε ≪ Cᵢⱼ approaches the exact plan but needs many more iterations), ``method`` (POT's solver, the
    log-domain ``"sinkhorn_log"`` by default, stable for small ε), ``max_iter``, ``tol`` (POT's
    ``numItermax`` and ``stopThr``: the Euclidean norm of the marginal violation at which to stop).
    A plan whose marginals are still off by more than ``tol`` after ``max_iter`` iterations is used,
    with a RuntimeWarning.
    """

    name = "sinkhorn"
    epsilon: float = attrs.field(
        default=0.1, converter=to_positive("sinkhorn coupling", advice="Pass a finite ε > 0 (units of length²).")
    )
    method: str = attrs.field(default="sinkhorn_log")
    max_iter: int = attrs.field(default=1000, validator=integer("sinkhorn coupling"))
    tol: float = attrs.field(default=1e-6, converter=to_positive("sinkhorn coupling"))

    @method.validator
    def _check_method(self, attribute, value):
        if value not in _SINKHORN_METHODS:
            raise ParameterError(f"sinkhorn coupling: unknown method {value!r}; use one of {list(_SINKHORN_METHODS)}")

    def _advice(self) -> str:
        alternative = "" if self.method == "sinkhorn_log" else "method='sinkhorn_log' or "
        return f"epsilon = {self.epsilon:g} is too small for this cost with method {self.method!r}: use {alternative}a larger epsilon"

    def _solve(self, a, b, cost):
        import ot

        return ot.sinkhorn(a, b, cost, reg=self.epsilon, method=self.method, numItermax=int(self.max_iter),
                           stopThr=self.tol, warn=False)

    def _check_converged(self, plan, a, b):
        violation = max(np.linalg.norm(plan.sum(1) - a), np.linalg.norm(plan.sum(0) - b))
        if violation > self.tol:
            # One text per parameter set, so that the default filter shows it once, not every batch.
            warnings.warn(
                f"sinkhorn coupling: the marginals did not reach tol = {self.tol:g} within max_iter = {self.max_iter} "
                f"iterations (epsilon = {self.epsilon:g}); raise max_iter or epsilon, or loosen tol",
                RuntimeWarning,
                stacklevel=2,
            )


#: The couplings by name.
COUPLINGS = {
    "independent": IndependentCoupling,
    "exact_ot": ExactOTCoupling,
    "sinkhorn": SinkhornCoupling,
}


def get(name: str, **params) -> Coupling:
    """Build the coupling ``name`` (one of :data:`COUPLINGS`) with ``params``; a Coupling passes through."""
    if isinstance(name, Coupling):
        if params:
            raise ParameterError("couplings.get: parameters given with a coupling object; build it with them instead")
        return name
    try:
        cls = COUPLINGS[name]
    except (KeyError, TypeError):
        raise ParameterError(f"unknown coupling {name!r}; known couplings are {sorted(COUPLINGS)}") from None
    try:
        return cls(**params)
    except TypeError as exc:
        fields = [f.name for f in attrs.fields(cls)]
        raise ParameterError(f"coupling {name!r}: {exc}; its parameters are {fields or 'none'}") from None


# -- Gaussians -----------------------------------------------------------------------------------------


def _vector(m, name: str, like: torch.Tensor, where: str) -> torch.Tensor:
    """A mean (..., d) in ``like``'s dtype, on its device, with its d."""
    if isinstance(m, torch.Tensor) and m.device != like.device:
        raise StateError(f"{where}: {name} is on {m.device} but the covariances are on {like.device}; use one device")
    v = as_tensor(m, dtype=like.dtype, device=like.device, name=name)
    if v.ndim < 1 or v.shape[-1] != like.shape[-1]:
        raise ShapeError(f"{where}: {name} must have shape (..., {like.shape[-1]}) to match the covariances; received {tuple(v.shape)}")
    if not bool(torch.isfinite(v).all()):
        raise StateError(f"{where}: {name} has non-finite entries")
    return v


def _brenier(S0: torch.Tensor, S1: torch.Tensor, where: str) -> torch.Tensor:
    check_psd(S1, "S1", where)
    root, inv_root = spd_roots(S0, "S0", where)
    middle = matrix_function(root @ S1 @ root, lambda e: e.clamp_min(0).sqrt())
    return symmetrize(inv_root @ middle @ inv_root)


def brenier_map(S0, S1) -> torch.Tensor:
    """T^OT = Σ₀^{-1/2} (Σ₀^{1/2} Σ₁ Σ₀^{1/2})^{1/2} Σ₀^{-1/2} (MATH.md §1.5, [B] (30), [S] Prop 4.3).

    The optimal (Brenier) linear map from N(·, Σ₀) to N(·, Σ₁): symmetric positive (semi)definite,
    T Σ₀ T = Σ₁, with cost tr((T − I) Σ₀ (T − I)ᵀ) = W₂² (Bures; :func:`transport_cost`). Spectral
    matrix functions, batched over leading dimensions. Σ₀ must be positive definite; Σ₁ may be
    singular. MATH.md reference: Σ₀ = diag(2, 0.5), Σ₁ = [[1, .8], [.8, 1.2]] give
    T^OT = [[0.67893, 0.39525], [0.39525, 1.33233]].
    """
    a, b = covariance_pair(S0, S1, "brenier_map")
    return _brenier(a, b, "brenier_map")


def gaussian_brenier_map(m0, S0, m1, S1) -> tuple[torch.Tensor, torch.Tensor]:
    """The optimal (Brenier) map between N(m₀, Σ₀) and N(m₁, Σ₁) as T(x) = T x + shift (MATH.md §1.5):

        T(x) = m₁ + T^OT (x − m₀),   i.e. T = T^OT (:func:`brenier_map`),  shift = m₁ − T^OT m₀.

    Batched over leading dimensions (means (..., d), covariances (..., d, d), broadcasting).
    Returns (T (..., d, d), shift (..., d)).
    """
    a, b = covariance_pair(S0, S1, "gaussian_brenier_map")
    m0 = _vector(m0, "m0", a, "gaussian_brenier_map")
    m1 = _vector(m1, "m1", a, "gaussian_brenier_map")
    T = _brenier(a, b, "gaussian_brenier_map")
    return T, m1 - (T @ m0[..., None])[..., 0]


def mccann_interpolation(t, m0, S0, m1, S1) -> tuple[torch.Tensor, torch.Tensor]:
    """McCann's displacement interpolation of N(m₀, Σ₀) and N(m₁, Σ₁) at t ∈ [0, 1] (MATH.md §1.1, §1.5):

        T_t = (1 − t) I + t T^OT,   m_t = (1 − t) m₀ + t m₁,   Σ_t = T_t Σ₀ T_tᵀ,

    the law of (1 − t) X + t T(X), X ~ N(m₀, Σ₀): the W₂ geodesic, W₂(μ₀, μ_t) = t W₂(μ₀, μ₁).
    ``t`` is a number or a tensor broadcasting against the leading dimensions (a tensor of times
    with unbatched Gaussians gives one interpolant per time). Returns (m_t (..., d), Σ_t (..., d, d)).
    """
    a, b = covariance_pair(S0, S1, "mccann_interpolation")
    m0 = _vector(m0, "m0", a, "mccann_interpolation")
    m1 = _vector(m1, "m1", a, "mccann_interpolation")
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device)
    if not bool(((t >= 0) & (t <= 1)).all()):
        raise ParameterError(
            f"mccann_interpolation: t must lie in [0, 1]; received values from {float(t.min()):g} to {float(t.max()):g}"
        )
    T = _brenier(a, b, "mccann_interpolation")
    eye = torch.eye(T.shape[-1], dtype=T.dtype, device=T.device)
    Tt = (1 - t)[..., None, None] * eye + t[..., None, None] * T
    mean = (1 - t)[..., None] * m0 + t[..., None] * m1
    return mean, symmetrize(Tt @ a @ Tt.transpose(-1, -2))


def _entropic_cross(a: torch.Tensor, b: torch.Tensor, epsilon: float, where: str) -> torch.Tensor:
    s2 = 0.5 * epsilon
    root, inv_root = spd_roots(a, "S0", where)
    D = matrix_function(4.0 * root @ b @ root, lambda e: torch.sqrt(e.clamp_min(0) + s2 * s2))
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return 0.5 * (root @ D @ inv_root - s2 * eye)


#: What to do about ε ≤ 0 in the Gaussian entropic formulas.
_EPSILON_ADVICE = (
    "Pass ε > 0 (units of length²); ε → 0 is the unregularised problem: use the Brenier map / mccann_interpolation."
)


def entropic_cross_covariance(S0, S1, epsilon) -> torch.Tensor:
    """Cov(X, Y) under the entropic plan between N(·, Σ₀) and N(·, Σ₁) (MATH.md §7, Janati et al. 2020).

    For the plan π_ε = argmin ⟨π, |x − y|²⟩ + ε KL(π | μ₀ ⊗ μ₁) (unhalved cost, MATH.md §0), with
    σ² = ε/2 and D = (4 Σ₀^{1/2} Σ₁ Σ₀^{1/2} + σ⁴ I)^{1/2}, the plan is Gaussian and

        C_σ(Σ₀, Σ₁) = ½ (Σ₀^{1/2} D Σ₀^{-1/2} − σ² I).

    It tends to Σ₀ T^OT (the optimal plan's, :func:`brenier_map`) as ε → 0 and to 0 (the product
    coupling) as ε → ∞; it does not depend on the means. Batched over leading dimensions; Σ₀ must be
    positive definite. Returns (..., d, d), not symmetric in general.
    """
    where = "entropic_cross_covariance"
    eps = check_positive(epsilon, "epsilon", where, advice=_EPSILON_ADVICE)
    a, b = covariance_pair(S0, S1, where)
    return _entropic_cross(a, b, eps, where)


def schrodinger_interpolation(t, m0, S0, m1, S1, epsilon) -> tuple[torch.Tensor, torch.Tensor]:
    """The entropic (Schrödinger-bridge) interpolation of N(m₀, Σ₀) and N(m₁, Σ₁) at t ∈ [0, 1] (MATH.md §7).

    (X₀, X₁) ~ π_ε, the entropic plan of :func:`entropic_cross_covariance`, joined by a Brownian
    bridge whose reference transition e^{−|x − y|²/ε} is the Gibbs kernel of the cost, i.e. a
    Brownian motion of variance σ² = ε/2 per unit time:

        X_t = (1 − t) X₀ + t X₁ + σ B_t,   B a standard Brownian bridge (Var B_t = t(1 − t)),
        m_t = (1 − t) m₀ + t m₁,
        Σ_t = (1 − t)² Σ₀ + t² Σ₁ + t(1 − t) (C_σ + C_σᵀ + σ² I).

    The intermediate covariances are inflated relative to the W₂ geodesic
    (:func:`mccann_interpolation`, the limit ε → 0): in 1-D with Σ₀ = Σ₁ = 1,
    Σ_t = 1 + t(1 − t)(√(4 + σ⁴) − 2). ``t`` is a number or a tensor broadcasting against the leading
    dimensions. Returns (m_t (..., d), Σ_t (..., d, d)).
    """
    where = "schrodinger_interpolation"
    eps = check_positive(epsilon, "epsilon", where, advice=_EPSILON_ADVICE)
    a, b = covariance_pair(S0, S1, where)
    m0 = _vector(m0, "m0", a, where)
    m1 = _vector(m1, "m1", a, where)
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device)
    if not bool(((t >= 0) & (t <= 1)).all()):
        raise ParameterError(f"{where}: t must lie in [0, 1]; received values from {float(t.min()):g} to {float(t.max()):g}")
    C = _entropic_cross(a, b, eps, where)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    s, u = (1 - t)[..., None, None], t[..., None, None]
    cov = s * s * a + u * u * b + s * u * (C + C.transpose(-1, -2) + 0.5 * eps * eye)
    mean = (1 - t)[..., None] * m0 + t[..., None] * m1
    return mean, symmetrize(cov)


def transport_cost(T, S0, m0=None, m1=None, *, shift=None) -> torch.Tensor:
    """E|T(X) − X|² for X ~ N(m₀, Σ₀) and an affine map T (MATH.md §1.5), batched; returns shape (...).

    With ``m1`` the map is T(x) = m₁ + T (x − m₀) (the convention of MATH.md §1.5) and

        E|T(X) − X|² = tr((T − I) Σ₀ (T − I)ᵀ) + |m₁ − m₀|²;

    with ``shift`` (as returned by :func:`gaussian_brenier_map`) it is T(x) = T x + shift and the mean
    term is |(T − I) m₀ + shift|². Omitted means are 0. For T = :func:`brenier_map` this is W₂²
    (unhalved, MATH.md §0): 0.651957 for the MATH.md §1.5 reference pair, against 0.817144 for the
    flow-matching map (``measureflow.diagnostics.fm_terminal_map``).
    """
    T = as_tensor(T, name="T")
    if not T.is_floating_point():
        T = T.to(torch.get_default_dtype())
    S0 = as_tensor(S0, dtype=T.dtype, device=T.device, name="S0")
    if T.ndim < 2 or T.shape[-1] != T.shape[-2] or S0.ndim < 2 or S0.shape[-2:] != T.shape[-2:]:
        raise ShapeError(
            "transport_cost: T and S0 must both have shape (..., d, d) with the same d; "
            f"received {tuple(T.shape)} and {tuple(S0.shape)}"
        )
    if m1 is not None and shift is not None:
        raise ParameterError("transport_cost: give either m1 (T(x) = m1 + T(x − m0)) or shift (T(x) = T x + shift), not both")
    D = T - torch.eye(T.shape[-1], dtype=T.dtype, device=T.device)
    cost = ((D @ S0) * D).sum((-1, -2))
    if m0 is None and m1 is None and shift is None:
        return cost
    zero = torch.zeros(T.shape[-1], dtype=T.dtype, device=T.device)
    m0 = zero if m0 is None else _vector(m0, "m0", T, "transport_cost")
    if shift is not None:
        offset = (D @ m0[..., None])[..., 0] + _vector(shift, "shift", T, "transport_cost")
    else:
        offset = (zero if m1 is None else _vector(m1, "m1", T, "transport_cost")) - m0
    return cost + (offset**2).sum(-1)
