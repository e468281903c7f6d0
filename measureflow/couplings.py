"""Couplings of two mini-batches, and the Brenier map and McCann interpolation of Gaussians.

A coupling pairs the rows of two mini-batches x0 (B0, d) and x1 (B1, d), optionally weighted
(w0 (B0,), w1 (B1,), each a probability vector; uniform when omitted, MATH.md §0):

    coupling(x0, x1, generator=None, w0=None, w1=None) -> (x0_paired, x1_paired)   # both (B0, d)

Row i of both outputs is one pair (X0, X1) ~ π. ``coupling.pairs(...)`` returns the index tensors
(i, j) instead (for particles that carry their pair label, MATH.md §1.1); ``coupling.plan(...)``
the (B0, B1) plan itself where there is one.

* ``independent`` — the product coupling: the rows as given (i, i) for equal sizes without weights
  (the batches are independent draws already); otherwise B0 pairs drawn from w0 ⊗ w1.
* ``exact_ot`` — the optimal plan of the batch for the unhalved squared-Euclidean cost
  Cᵢⱼ = |x0ᵢ − x1ⱼ|² (POT ``ot.emd``). For uniform weights and B0 = B1 the plan is a permutation
  (a vertex of the Birkhoff polytope) and is used as such (deterministic); otherwise B0 pairs are
  drawn i.i.d. from π with the generator.
* ``sinkhorn`` — the entropic plan argmin ⟨π, C⟩ + ε KL(π | w0 ⊗ w1) (POT ``ot.sinkhorn``; the entropy
  −H(π) that POT uses differs from KL(π | w0 ⊗ w1) by a constant on the transport polytope, so the
  plan is the same), ε in units of length² with the cost unhalved (MATH.md §0); B0 pairs drawn from π.

Plans are computed in float64 on the host (one synchronisation per mini-batch, outside any field)
and the pairs are returned on the inputs' device and dtype.

Gaussians (MATH.md §1.5): :func:`gaussian_brenier_map` (T^OT and its shift),
:func:`mccann_interpolation` (the displacement interpolation), :func:`transport_cost`.
"""

from __future__ import annotations

import math

import attrs
import numpy as np
import torch

from .errors import ParameterError, ShapeError, StateError

__all__ = [
    "Coupling",
    "IndependentCoupling",
    "ExactOTCoupling",
    "SinkhornCoupling",
    "COUPLINGS",
    "get",
    "squared_distances",
    "gaussian_brenier_map",
    "mccann_interpolation",
    "transport_cost",
]


# -- argument checks ------------------------------------------------------------------------------------


def _batch(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise StateError(f"coupling: {name} must be a torch.Tensor of shape (B, d); received {type(x).__name__}")
    if x.ndim != 2 or 0 in x.shape:
        raise ShapeError(f"coupling: {name} must have shape (B, d) with B, d >= 1; received {tuple(x.shape)}")
    if not x.is_floating_point():
        raise StateError(f"coupling: {name} must be floating point; received dtype {x.dtype}")
    return x


def _probability(w, size: int, name: str, like: torch.Tensor) -> torch.Tensor | None:
    if w is None:
        return None
    w = torch.as_tensor(w)
    if tuple(w.shape) != (size,):
        raise ShapeError(f"coupling: {name} must have shape ({size},) to match its batch; received {tuple(w.shape)}")
    host = w.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(host).all()) or bool((host < 0).any()):
        raise StateError(f"coupling: {name} must be finite and non-negative")
    total = float(host.sum())
    tol = (1e-10 if w.dtype == torch.float64 else 1e-5) * max(1.0, math.sqrt(size))
    if abs(total - 1.0) > tol:
        raise StateError(f"coupling: {name} must sum to one; they sum to {total:.10g}. Normalise them with w / w.sum().")
    return host


def _inputs(x0, x1, w0, w1):
    x0, x1 = _batch(x0, "x0"), _batch(x1, "x1")
    if x0.shape[1] != x1.shape[1]:
        raise ShapeError(
            f"coupling: x0 and x1 must have the same dimension d; received x0 {tuple(x0.shape)} and x1 {tuple(x1.shape)}"
        )
    if x0.device != x1.device:
        raise StateError(f"coupling: x0 is on {x0.device} but x1 is on {x1.device}; move both to one device")
    return x0, x1, _probability(w0, x0.shape[0], "w0", x0), _probability(w1, x1.shape[0], "w1", x1)


def _uniform(size: int) -> torch.Tensor:
    return torch.full((size,), 1.0 / size, dtype=torch.float64)


def squared_distances(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Cᵢⱼ = |x0ᵢ − x1ⱼ|² (unhalved, MATH.md §0), from explicit differences so Cᵢᵢ = 0 exactly, float64."""
    a = x0.detach().to("cpu", torch.float64)
    b = x1.detach().to("cpu", torch.float64)
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def _draw_from_plan(plan: torch.Tensor, count: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` i.i.d. index pairs (i, j) with probability πᵢⱼ (π normalised to total mass one)."""
    device = generator.device if generator is not None else torch.device("cpu")
    flat = plan.reshape(-1).clamp_min(0).to(device)
    k = torch.multinomial(flat / flat.sum(), count, replacement=True, generator=generator)
    return k // plan.shape[1], k % plan.shape[1]


# -- couplings -----------------------------------------------------------------------------------------


class Coupling:
    """Base class: subclasses implement :meth:`pairs`; calling the coupling gathers the rows."""

    name = "coupling"

    def pairs(self, x0, x1, generator=None, w0=None, w1=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Index tensors (i, j), each (B0,), on x0's device: pair k is (x0[i[k]], x1[j[k]])."""
        raise NotImplementedError

    def __call__(self, x0, x1, generator=None, w0=None, w1=None) -> tuple[torch.Tensor, torch.Tensor]:
        i, j = self.pairs(x0, x1, generator=generator, w0=w0, w1=w1)
        return x0[i], x1[j]

    def describe(self) -> dict:
        return {"name": self.name, **attrs.asdict(self)} if attrs.has(type(self)) else {"name": self.name}


@attrs.frozen
class IndependentCoupling(Coupling):
    """The product coupling π = w0 ⊗ w1 (module docstring)."""

    name = "independent"

    def plan(self, x0, x1, w0=None, w1=None) -> torch.Tensor:
        """w0 ⊗ w1, float64 (B0, B1) on the host."""
        x0, x1, w0, w1 = _inputs(x0, x1, w0, w1)
        a = _uniform(x0.shape[0]) if w0 is None else w0
        b = _uniform(x1.shape[0]) if w1 is None else w1
        return a[:, None] * b[None, :]

    def pairs(self, x0, x1, generator=None, w0=None, w1=None):
        x0, x1, w0, w1 = _inputs(x0, x1, w0, w1)
        B0, B1 = x0.shape[0], x1.shape[0]
        if w0 is None and w1 is None and B0 == B1:
            idx = torch.arange(B0, device=x0.device)
            return idx, idx
        device = generator.device if generator is not None else torch.device("cpu")
        a = (_uniform(B0) if w0 is None else w0).to(device)
        b = (_uniform(B1) if w1 is None else w1).to(device)
        i = torch.multinomial(a, B0, replacement=True, generator=generator)
        j = torch.multinomial(b, B0, replacement=True, generator=generator)
        return i.to(x0.device), j.to(x0.device)


@attrs.frozen
class ExactOTCoupling(Coupling):
    """Mini-batch optimal transport, POT ``ot.emd`` on Cᵢⱼ = |x0ᵢ − x1ⱼ|² (module docstring).

    ``max_iter`` is POT's ``numItermax`` (network-simplex iterations).
    """

    name = "exact_ot"
    max_iter: int = attrs.field(default=1_000_000, validator=attrs.validators.gt(0))

    def plan(self, x0, x1, w0=None, w1=None) -> torch.Tensor:
        """The optimal plan π (B0, B1), float64 on the host; its cost Σπᵢⱼ Cᵢⱼ is W₂² of the batches."""
        x0, x1, w0, w1 = _inputs(x0, x1, w0, w1)
        return self._plan(x0, x1, w0, w1)

    def _plan(self, x0, x1, w0, w1) -> torch.Tensor:
        import ot

        a = (_uniform(x0.shape[0]) if w0 is None else w0).numpy()
        b = (_uniform(x1.shape[0]) if w1 is None else w1).numpy()
        cost = squared_distances(x0, x1).numpy()
        plan = ot.emd(a, b, cost, numItermax=int(self.max_iter))
        return torch.from_numpy(np.ascontiguousarray(plan))

    def pairs(self, x0, x1, generator=None, w0=None, w1=None):
        x0, x1, w0, w1 = _inputs(x0, x1, w0, w1)
        plan = self._plan(x0, x1, w0, w1)
        B0, B1 = plan.shape
        if w0 is None and w1 is None and B0 == B1:
            # A vertex of the Birkhoff polytope: one entry 1/B per row and column. Checked, since a
            # solver stopped early (max_iter) could return a non-vertex point.
            j = plan.argmax(dim=1)
            if torch.equal(torch.sort(j).values, torch.arange(B0)) and bool((plan[torch.arange(B0), j] > 0.5 / B0).all()):
                return torch.arange(B0, device=x0.device), j.to(x0.device)
        i, j = _draw_from_plan(plan, B0, generator)
        return i.to(x0.device), j.to(x0.device)


@attrs.frozen
class SinkhornCoupling(Coupling):
    """Entropic OT plan, POT ``ot.sinkhorn`` (module docstring).

    Parameters: ``epsilon`` (> 0, length², cost |x − y|² unhalved), ``method`` (POT's solver name;
    the log-domain ``"sinkhorn_log"`` by default, stable for small ε), ``max_iter``, ``tol`` (POT's
    ``numItermax``, ``stopThr``: marginal violation at which to stop).
    """

    name = "sinkhorn"
    epsilon: float = attrs.field(default=0.1, converter=float)
    method: str = attrs.field(default="sinkhorn_log")
    max_iter: int = attrs.field(default=10_000, validator=attrs.validators.gt(0))
    tol: float = attrs.field(default=1e-9, converter=float)

    @epsilon.validator
    def _check_epsilon(self, attribute, value):
        if not (value > 0 and math.isfinite(value)):
            raise ParameterError(f"sinkhorn coupling: epsilon must be positive and finite (units of length²); received {value!r}")

    def plan(self, x0, x1, w0=None, w1=None) -> torch.Tensor:
        """The entropic plan π_ε (B0, B1), float64 on the host."""
        x0, x1, w0, w1 = _inputs(x0, x1, w0, w1)
        return self._plan(x0, x1, w0, w1)

    def _plan(self, x0, x1, w0, w1) -> torch.Tensor:
        import ot

        a = (_uniform(x0.shape[0]) if w0 is None else w0).numpy()
        b = (_uniform(x1.shape[0]) if w1 is None else w1).numpy()
        cost = squared_distances(x0, x1).numpy()
        plan = ot.sinkhorn(a, b, cost, reg=self.epsilon, method=self.method, numItermax=int(self.max_iter),
                           stopThr=self.tol)
        plan = np.asarray(plan)
        if not np.isfinite(plan).all() or plan.sum() <= 0:
            raise StateError(
                f"sinkhorn coupling: the plan is not finite (epsilon = {self.epsilon:g} is too small for the "
                f"cost scale {cost.max():.3g} with method {self.method!r}); use method='sinkhorn_log' or a larger epsilon"
            )
        return torch.from_numpy(np.ascontiguousarray(plan))

    def pairs(self, x0, x1, generator=None, w0=None, w1=None):
        x0, x1, w0, w1 = _inputs(x0, x1, w0, w1)
        plan = self._plan(x0, x1, w0, w1)
        i, j = _draw_from_plan(plan, x0.shape[0], generator)
        return i.to(x0.device), j.to(x0.device)


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


def _sym(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.transpose(-1, -2))


def _spectral(a: torch.Tensor, fn) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(_sym(a))
    return (evecs * fn(evals)[..., None, :]) @ evecs.transpose(-1, -2)


def _gaussian_args(m0, S0, m1, S1, where: str):
    m0, S0, m1, S1 = (torch.as_tensor(v) for v in (m0, S0, m1, S1))
    dtype = torch.promote_types(torch.promote_types(m0.dtype, S0.dtype), torch.promote_types(m1.dtype, S1.dtype))
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    m0, S0, m1, S1 = (v.to(dtype) for v in (m0, S0, m1, S1))
    for m, S, k in ((m0, S0, 0), (m1, S1, 1)):
        if m.ndim < 1 or S.ndim < 2 or S.shape[-1] != S.shape[-2] or S.shape[-1] != m.shape[-1]:
            raise ShapeError(
                f"{where}: m{k} must have shape (..., d) and S{k} shape (..., d, d) with the same d; received "
                f"{tuple(m.shape)} and {tuple(S.shape)}"
            )
    if m0.shape[-1] != m1.shape[-1]:
        raise ShapeError(f"{where}: both Gaussians must have the same dimension; received d = {m0.shape[-1]} and {m1.shape[-1]}")
    return m0, S0, m1, S1


def gaussian_brenier_map(m0, S0, m1, S1) -> tuple[torch.Tensor, torch.Tensor]:
    """The optimal (Brenier) map between N(m0, S0) and N(m1, S1), T(x) = T x + shift (MATH.md §1.5):

        T = S0^{−1/2} (S0^{1/2} S1 S0^{1/2})^{1/2} S0^{−1/2}   ([B (30)], [S Prop 4.3]),  shift = m1 − T m0,

    symmetric positive (semi)definite, pushing S0 to S1 (T S0 T = S1). Matrix functions are spectral
    (eigh); batched over leading dimensions. S0 must be positive definite; S1 may be singular.
    Returns (T (..., d, d), shift (..., d)).
    """
    m0, S0, m1, S1 = _gaussian_args(m0, S0, m1, S1, "gaussian_brenier_map")
    evals = torch.linalg.eigvalsh(_sym(S0))
    if bool((evals[..., 0] <= 0).any()):
        raise StateError(
            f"gaussian_brenier_map: S0 must be positive definite (smallest eigenvalue {float(evals[..., 0].min()):.3g}); "
            "there is no map from a degenerate Gaussian"
        )
    root = _spectral(S0, torch.sqrt)
    inv_root = _spectral(S0, torch.rsqrt)
    middle = _spectral(root @ S1 @ root, lambda e: e.clamp_min(0).sqrt())
    T = _sym(inv_root @ middle @ inv_root)
    shift = m1 - (T @ m0[..., None])[..., 0]
    return T, shift


def mccann_interpolation(t, m0, S0, m1, S1) -> tuple[torch.Tensor, torch.Tensor]:
    """McCann's displacement interpolation of N(m0, S0) and N(m1, S1) at t ∈ [0, 1] (MATH.md §1.5):

        T_t = (1 − t) I + t T^OT,   m_t = (1 − t) m0 + t m1,   S_t = T_t S0 T_t,

    the W₂ geodesic (the law of (1 − t)X + tT(X), X ~ N(m0, S0)). ``t`` is a float or a tensor
    broadcasting against the leading dimensions. Returns (m_t (..., d), S_t (..., d, d)).
    """
    m0, S0, m1, S1 = _gaussian_args(m0, S0, m1, S1, "mccann_interpolation")
    T, _ = gaussian_brenier_map(m0, S0, m1, S1)
    t = torch.as_tensor(t, dtype=T.dtype, device=T.device)
    if bool(((t < 0) | (t > 1)).any()):
        raise ParameterError(f"mccann_interpolation: t must lie in [0, 1]; received {t.tolist()}")
    eye = torch.eye(T.shape[-1], dtype=T.dtype, device=T.device)
    Tt = (1 - t)[..., None, None] * eye + t[..., None, None] * T
    mean = (1 - t)[..., None] * m0 + t[..., None] * m1
    return mean, _sym(Tt @ S0 @ Tt.transpose(-1, -2))


def transport_cost(T, shift, m0, S0) -> torch.Tensor:
    """E|T X + shift − X|² for X ~ N(m0, S0): tr((T − I) S0 (T − I)ᵀ) + |(T − I) m0 + shift|² (batched).

    For T^OT this is W₂²; MATH.md §1.5: 0.651957 (OT) vs 0.817144 (flow-matching map) for the reference pair.
    """
    T, shift, m0, S0 = (torch.as_tensor(v) for v in (T, shift, m0, S0))
    eye = torch.eye(T.shape[-1], dtype=T.dtype, device=T.device)
    D = T - eye
    mean_part = (D @ m0[..., None])[..., 0] + shift
    return torch.diagonal(D @ S0 @ D.transpose(-1, -2), dim1=-2, dim2=-1).sum(-1) + (mean_part**2).sum(-1)
