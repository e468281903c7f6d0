"""The Wasserstein-2 gradient flow toward a fixed target, F(μ) = W₂²(μ, β) (MATH.md §5).

``w2`` (:class:`W2Field`)
    δF = f, the Kantorovich potential of the unhalved cost |x − y|², ∇f(x) = 2(x − T(x)) with T the
    optimal transport map μ → β, so

        v(x) = 2 (T(x) − x)                          (``halved=True``: F = ½W₂², v = T(x) − x).

*Particles* μ = Σᵢ wᵢ δ_{xᵢ} need target **samples** β = Σⱼ qⱼ δ_{yⱼ} (an
:class:`~measureflow.measures.Empirical`, a tensor of points (M, d) or one set per replica (R, M, d),
or a :class:`~measureflow.state.Particles` state). The map at the atoms is the barycentric projection
of a discrete plan Π, T(xᵢ) = Σⱼ Πᵢⱼ yⱼ / Σⱼ Πᵢⱼ:

* N·M ≤ ``exact_max_pairs`` (default 3000 × 3000): the exact optimal plan, POT's network simplex
  ``ot.emd`` (through :class:`measureflow.couplings.ExactOTCoupling`, float64 on the host). For
  N = M with uniform weights Π is a permutation (an assignment) and T moves each particle to one
  target atom; the plan then stays optimal along the flow, whose trajectory is McCann's
  interpolation xᵢ(t) = T(xᵢ) + e^{−2t}(xᵢ − T(xᵢ)) (s(t) = 1 − e^{−2t}). Plans that split mass
  merge particles under the barycentric projection (MATH.md §5, "Avoid").
* beyond it: the entropic plan Π_ε = argmin ⟨Π, C⟩ + ε KL(Π | w ⊗ q), C = |x − y|² unhalved,
  ε = ``epsilon`` in units of length² (default 0.1), by POT's log-domain (stabilised) Sinkhorn
  ``ot.bregman.sinkhorn_log`` in float64 (numpy at the edge for CPU states, where POT's numpy
  backend is the faster; its torch backend on an accelerator, keeping the work on the device),
  warm-started from the previous call's potentials, and T_ε(xᵢ) = Σⱼ Π_ε,ᵢⱼ yⱼ / Σⱼ Π_ε,ᵢⱼ = E_Π[y | xᵢ].
  The solver holds N×M matrices, so it is refused beyond ``sinkhorn_max_pairs``. **T_ε is biased by
  O(ε)**: it contracts toward the target's mean (for Gaussians its slope is that of the entropic
  cross-covariance, not T_Σ; MATH.md §7), so read ε against the squared distances of the problem.

Each replica has its own plan: one network-simplex or Sinkhorn solve per replica in a Python loop,
because POT solves one problem at a time (the network simplex is sequential C++ on the CPU). Both
paths synchronise with the host (exact: the plan is solved there; entropic: POT's convergence
checks), the price of an exact or stabilised solver. An exact plan in which every particle goes to
a single atom is kept while the particles move along the segments toward their images, where it is
provably still optimal (see :class:`_Assignment`), so a run of this field alone costs one solve.

A particle without mass (wᵢ = 0) has no mass to transport: its velocity is 0.
The map is defined only at the atoms, so ``velocity`` must be evaluated at the state's own particles.

An analytic :class:`~measureflow.measures.Gaussian` target gives no map for particles: the closed
Gaussian map is the OT map only from a *Gaussian* μ. For particles pass samples, e.g.
``W2Field(Empirical(target.sample(M, generator)))``.

*Gaussian state* N(m, Σ) against a Gaussian target N(m_β, Σ_β) (the closure is exact: the flow stays
Gaussian):

    b = 2 (m_β − m),   A = 2 (T_Σ − I),   T_Σ = Σ_β^{1/2} (Σ_β^{1/2} Σ Σ_β^{1/2})^{−1/2} Σ_β^{1/2}

(the Brenier map, equal to Σ^{−1/2}(Σ^{1/2}Σ_βΣ^{1/2})^{1/2}Σ^{−1/2} of MATH.md §5; this form needs
only Σ_β^{1/2}, computed once). Exact solution (:meth:`W2Field.solution`): McCann's interpolation at
s = 1 − e^{−2t},

    Σ(t) = M_s Σ₀ M_s,   M_s = (1 − s) I + s T_{Σ₀},   m(t) = (1 − s) m₀ + s m_β,

so W₂(μ_t, β) = e^{−2t} W₂(μ₀, β) (target γ: C(t)^{1/2} = I + e^{−2t}(C₀^{1/2} − I); MATH.md §13 row
4(C^{1/2} − C)). Halved: rates halve, s = 1 − e^{−t}.

*Energy*: Bures W₂² for Gaussians (:func:`measureflow.observables.bures_w2`); for particles the
discrete OT cost (:func:`measureflow.observables.w2`, exact) or, beyond ``exact_max_pairs``, the
transport cost ⟨Π_ε, C⟩ of the entropic plan (≥ W₂², biased by O(ε)). Halved: × ½.
"""

from __future__ import annotations

import math
import warnings

import attrs
import numpy as np
import torch

import measureflow
from measureflow.couplings import ExactOTCoupling, mccann_interpolation
from measureflow.errors import CapabilityError, ParameterError, StateError, TimeRangeError
from measureflow.fields import Field
from measureflow.linalg import matrix_function, spd_roots, symmetrize
from measureflow.observables import bures_w2, w2 as discrete_w2
from measureflow.state import Gaussians, Particles
from measureflow.targets import as_target
from measureflow.validators import integer, positive

__all__ = ["W2Field", "TransportSolver"]

#: Default bound on N·M for the exact network simplex (about 3000 particles against 3000 atoms).
DEFAULT_EXACT_MAX_PAIRS = 3000 * 3000
#: Default entropic regularisation (units of length², unhalved cost).
DEFAULT_EPSILON = 0.1


# -- solver settings ----------------------------------------------------------------------------------------


@attrs.frozen
class TransportSolver:
    """How :class:`W2Field` computes the discrete OT map.

    ``exact_max_pairs``: the network simplex is used while N·M ≤ this; ``max_iter``: its iteration
    bound. ``epsilon`` (length², unhalved cost), ``sinkhorn_max_iter``, ``tol`` (the norm of the
    marginal error at which POT's Sinkhorn stops) and ``sinkhorn_max_pairs`` (its N×M memory bound):
    the entropic path beyond ``exact_max_pairs``.
    """

    exact_max_pairs: int = attrs.field(default=DEFAULT_EXACT_MAX_PAIRS, validator=integer("w2"))
    max_iter: int = attrs.field(default=1_000_000, validator=integer("w2"))
    epsilon: float = attrs.field(default=DEFAULT_EPSILON, validator=positive("w2"))
    sinkhorn_max_iter: int = attrs.field(default=10_000, validator=integer("w2"))
    tol: float = attrs.field(default=1e-9, validator=positive("w2"))
    sinkhorn_max_pairs: int = attrs.field(default=25_000_000, validator=integer("w2"))

    def exact(self, N: int, M: int) -> bool:
        return N * M <= self.exact_max_pairs


# -- the field ----------------------------------------------------------------------------------------------


def _barycentric(plan: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """T(xᵢ) = Σⱼ Πᵢⱼ yⱼ / Σⱼ Πᵢⱼ (= E_Π[y | xᵢ] whatever the solver's last marginal error); xᵢ where row i is empty."""
    mass = plan.sum(1, keepdim=True)
    image = (plan @ y) / mass.clamp_min(torch.finfo(plan.dtype).tiny)
    return torch.where(mass > 0, image, x)


@attrs.frozen(eq=False)
class _Assignment:
    """The last exact solve of one replica: positions ``origin`` (N, d), their images T (N, d).

    When every row of the plan sits on a single atom (always so for N = M with uniform weights), the
    plan stays optimal for every point (1 − α)·origin + α·T with α ∈ [0, 1] (MATH.md §5): if ψ, φ are
    the dual potentials of the gain ⟨x, y⟩, then (1 − α)ψᵢ + α|T(xᵢ)|²/2, (1 − α)φⱼ + α|yⱼ|²/2 are dual
    potentials for the moved points, since ⟨T(xᵢ), yⱼ⟩ ≤ |T(xᵢ)|²/2 + |yⱼ|²/2 with equality on the
    plan. Every stage of an explicit Runge–Kutta step of this field lies on that segment, so a whole
    run costs one solve; any other motion (a sum with another field, noise) fails the test below and
    is solved afresh.
    """

    origin: torch.Tensor
    image: torch.Tensor
    weights: torch.Tensor | None
    is_map: bool

    def certifies(self, x: torch.Tensor, weights) -> bool:
        if not self.is_map or weights is not self.weights or x.shape != self.origin.shape:
            return False
        step = self.image - self.origin
        moved = x - self.origin
        norm = (step * step).sum()
        alpha = (moved * step).sum() / norm.clamp_min(torch.finfo(x.dtype).tiny)
        residual = (moved - alpha * step).abs().amax()
        # Round-off of the positions along the integration, relative to the coordinates' size.
        scale = torch.maximum(self.origin.abs().amax(), self.image.abs().amax())
        tol = 1e3 * torch.finfo(x.dtype).eps * scale
        return bool((residual <= tol) & (alpha >= 0) & (alpha <= 1))


class W2Field(Field):
    """v = 2(T(x) − x), the W₂²(·, β) gradient flow (module docstring; MATH.md §5).

    Parameters
    ----------
    target:
        :class:`~measureflow.measures.Gaussian` (Gaussians states), or samples for particles: an
        :class:`~measureflow.measures.Empirical`, a :class:`~measureflow.state.Particles` state with 1
        or R replicas, or points (M, d) / (R, M, d) with optional ``weights`` (M,) / (R, M).
    halved:
        descend ½W₂² instead (v = T − x, s = 1 − e^{−t}).
    exact_max_pairs, max_iter, epsilon, sinkhorn_max_iter, tol, sinkhorn_max_pairs:
        see :class:`TransportSolver`.
    """

    name = "w2"

    #: Why gradients cannot flow through its particle velocity (``Simulation(gradient=...)``).
    not_differentiable_because = "its particle velocity solves the transport plan with POT (exact network simplex or numpy Sinkhorn) on the host"

    def differentiable(self, state) -> bool:
        """Gradients through a run: the Gaussian closure is torch throughout; the particle map is not."""
        return isinstance(state, Gaussians)

    def __init__(self, target, weights=None, *, halved: bool = False, **solver):
        if not isinstance(halved, bool):
            raise ParameterError(f"w2: halved must be True or False; received {halved!r}")
        try:
            self.solver = TransportSolver(**solver)
        except TypeError:
            known = [f.name for f in attrs.fields(TransportSolver)]
            unknown = sorted(set(solver) - set(known))
            raise ParameterError(f"w2: unknown parameter(s) {unknown}; the solver parameters are {known}") from None
        self.target = as_target(target, "w2", weights=weights, mixtures=False, arrays=True)
        self.halved = halved
        self.rate = 1.0 if halved else 2.0
        if self.target.is_gaussian:
            # Σ_β^{1/2}, once: the closure then needs one eigendecomposition per evaluation, no inverse of Σ.
            self._target_root = spd_roots(self.target.gaussian_law.covariance(), "the target covariance", "w2")[0]
        self._potentials: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._assignments: dict[int, _Assignment] = {}

    # -- particles ----------------------------------------------------------------------------------
    def velocity(self, t, x, state):
        if x is not state.x:
            raise CapabilityError(
                "w2: the transport map of a discrete measure is known only at its atoms; evaluate the field at "
                "the state's own particles, velocity(t, state.x, state)"
            )
        return self.rate * (self.transport_map(state) - x)

    def transport_map(self, state: Particles) -> torch.Tensor:
        """T(xᵢ) = Σⱼ Πᵢⱼ yⱼ / Σⱼ Πᵢⱼ for every particle, shape (R, N, d) (exact or entropic plan)."""
        if not isinstance(state, Particles):
            raise CapabilityError("w2: transport_map needs a Particles state; a Gaussians state uses affine()")
        x = state.x
        R, N, _ = x.shape
        y, q = self.target.samples(x, R)
        if self.solver.exact(N, y.shape[1]):
            return self._exact_map(x, state.weights, y, q)
        return self._entropic_map(x, state.weights_or_uniform(), y, q)

    def _exact_map(self, x, weights, y, q):
        w = weights if weights is not None else torch.full(x.shape[:2], 1.0 / x.shape[1], dtype=x.dtype, device=x.device)
        coupling = ExactOTCoupling(max_iter=self.solver.max_iter)
        maps = []
        for r in range(x.shape[0]):
            cached = self._assignments.get(r)
            if cached is not None and cached.certifies(x[r], weights):
                maps.append(cached.image)
                continue
            yr, qr = y[r % y.shape[0]], q[r % q.shape[0]]
            plan = coupling.plan(x[r], yr, w[r], qr).to(device=x.device)  # float64 (N, M)
            image = _barycentric(plan, x[r].to(plan.dtype), yr.to(plan.dtype)).to(x.dtype)
            is_map = bool(((plan > 0).sum(1) <= 1).all())
            self._assignments[r] = _Assignment(x[r].clone(), image, weights, is_map)
            maps.append(image)
        return torch.stack(maps)

    def _entropic_plans(self, x, w, y, q):
        """The entropic plans Π_ε (one per replica, float64 (N, M)) by POT's log-domain Sinkhorn."""
        import ot

        N, M = x.shape[1], y.shape[1]
        if N * M > self.solver.sinkhorn_max_pairs:
            raise ParameterError(
                f"w2: N·M = {N}·{M} exceeds sinkhorn_max_pairs = {self.solver.sinkhorn_max_pairs} (the entropic "
                "solver holds N×M matrices); subsample the target, use the sliced_wasserstein field, or raise "
                "sinkhorn_max_pairs"
            )
        eps = self.solver.epsilon
        # POT's numpy backend is several times faster than its torch one on the CPU; on an
        # accelerator the torch backend keeps the N×M work on the device.
        host = x.device.type == "cpu"
        for r in range(x.shape[0]):
            xr, wr = x[r].to(torch.float64), w[r].to(torch.float64)
            yr, qr = y[r % y.shape[0]].to(torch.float64), q[r % q.shape[0]].to(torch.float64)
            problem = [v.detach().numpy() if host else v for v in (xr, wr, yr, qr)]
            previous = self._potentials.get(r)
            fits = previous is not None and type(previous[0]) is type(problem[0]) and previous[0].shape == (N,)
            warm = previous if fits and previous[1].shape == (M,) else None
            # A massless particle or atom enters as log 0 = −inf, which the log-domain iterations handle.
            with np.errstate(divide="ignore"):
                plan, log = ot.bregman.sinkhorn_log(
                    problem[1], problem[3], ot.dist(problem[0], problem[2]), eps,
                    numItermax=self.solver.sinkhorn_max_iter, stopThr=self.solver.tol, log=True, warn=False,
                    warmstart=warm,
                )
            error = float(log["err"][-1]) if len(log.get("err", ())) else 0.0
            if not error <= self.solver.tol:
                warnings.warn(
                    f"w2: Sinkhorn (epsilon = {eps:g}) stopped at marginal error {error:.3g} > tol = "
                    f"{self.solver.tol:g} after {self.solver.sinkhorn_max_iter} iterations; raise sinkhorn_max_iter "
                    "or epsilon, or raise exact_max_pairs to use the exact solver",
                    RuntimeWarning,
                    stacklevel=4,
                )
            self._potentials[r] = (log["log_u"], log["log_v"])
            yield torch.as_tensor(plan, device=x.device), xr, yr

    def _entropic_map(self, x, w, y, q):
        maps = []
        for plan, xr, yr in self._entropic_plans(x, w, y, q):
            maps.append(_barycentric(plan, xr, yr))
        return torch.stack(maps).to(x.dtype)

    def _entropic_cost(self, x, w, y, q):
        """⟨Π_ε, C⟩ per replica, the transport part of the entropic objective (≥ W₂²)."""
        import ot

        costs = [(plan * ot.dist(xr, yr)).sum() for plan, xr, yr in self._entropic_plans(x, w, y, q)]
        return torch.stack(costs).to(x.dtype)

    # -- Gaussians ----------------------------------------------------------------------------------
    def brenier_matrix(self, cov: torch.Tensor) -> torch.Tensor:
        """T_Σ = Σ_β^{1/2}(Σ_β^{1/2} Σ Σ_β^{1/2})^{−1/2}Σ_β^{1/2}, batched over leading dimensions."""
        self.target.gaussian(cov)
        root = self._target_root.to(cov)
        middle = matrix_function(root @ cov @ root, torch.rsqrt)
        return symmetrize(root @ middle @ root)

    def affine(self, t, state):
        if not isinstance(state, Gaussians):
            raise CapabilityError("w2: affine() is the closure of a Gaussians state; particles use velocity()")
        mb, _ = self.target.gaussian(state.mean)
        eye = torch.eye(state.dim, dtype=state.dtype, device=state.device)
        return self.rate * (mb - state.mean), self.rate * (self.brenier_matrix(state.cov) - eye)

    def solution(self, t, initial: Gaussians, t0: float = 0.0) -> Gaussians:
        """The exact Gaussian state at t ≥ t0: McCann's interpolation at s = 1 − e^{−2(t − t0)} (halved: e^{−(t − t0)})."""
        if not isinstance(initial, Gaussians):
            raise CapabilityError("w2: solution() is the closed form for a Gaussians initial state")
        h = float(t) - float(t0)
        if not h >= 0:
            raise TimeRangeError(f"w2: solution() runs forward from t0 = {t0:g}; received t = {t:g} < t0")
        mb, Sb = self.target.gaussian(initial.mean)
        s = -math.expm1(-self.rate * h)
        mean, cov = mccann_interpolation(s, initial.mean, initial.cov, mb, Sb)
        return Gaussians(mean, cov)

    # -- energy -------------------------------------------------------------------------------------
    def energy(self, state):
        """F = W₂²(μ, β) (halved: ½W₂²), shape (R,): Bures for Gaussians, the discrete OT cost for particles."""
        factor = 0.5 if self.halved else 1.0
        if isinstance(state, Gaussians):
            mb, Sb = self.target.gaussian(state.mean)
            return factor * bures_w2(state.mean, state.cov, mb, Sb)
        if not isinstance(state, Particles):
            raise StateError(f"w2: energy needs a Particles or Gaussians state; received {type(state).__name__}")
        x = state.x
        y, q = self.target.samples(x, state.replicas)
        if self.solver.exact(state.size, y.shape[1]):
            image = self._exact_map(x, state.weights, y, q)
            if all(self._assignments[r].is_map for r in range(state.replicas)):
                # Each particle goes whole to one atom: ⟨Π, C⟩ = Σᵢ wᵢ|xᵢ − T(xᵢ)|², no second solve.
                cost = (state.weights_or_uniform() * ((x - image) ** 2).sum(-1)).sum(-1)
            else:
                cost = discrete_w2(state, target=Particles(y, q), max_pairs=self.solver.exact_max_pairs,
                                   max_iter=self.solver.max_iter)
        else:
            cost = self._entropic_cost(x, state.weights_or_uniform(), y, q)
        return factor * cost

    def describe(self):
        solver = attrs.asdict(self.solver)
        solver["entropic"] = (
            f"beyond N·M = {self.solver.exact_max_pairs}: entropic barycentric map, epsilon = {self.solver.epsilon:g} "
            "(length², unhalved cost), biased by O(epsilon)"
        )
        return {"name": self.name, "halved": self.halved, "target": self.target.describe(), "solver": solver}


@measureflow.hookimpl
def measureflow_register_fields(registry):
    registry.add_field("w2", W2Field)
