"""Self-attention as a mean-field velocity: the transformer PDE (MATH.md §10).

``attention`` (:class:`AttentionField`) moves tokens x ∈ R^d by the attention of the whole measure
μ = Σⱼ wⱼ δ_{xⱼ} (a transformer layer x ↦ x + τΓ is the explicit Euler step τ = 1/T of this flow):

    Γ_θ[μ](x) = Σⱼ wⱼ e^{⟨Qx, Kxⱼ⟩} V xⱼ / Σⱼ wⱼ e^{⟨Qx, Kxⱼ⟩},     Q, K ∈ R^{r×d}, V ∈ R^{d×d},

one :func:`measureflow.reductions.softmax_average` call (``score="bilinear"``) on the queries Qx, the
keys Kxⱼ, the values Vxⱼ and the log-weights log wⱼ, never an N×N matrix.

*Heads.* Q, K of shape (H, r, d) and V of shape (H, d, d) give H heads, Γ = Σₕ Γₕ (an output projection
W_O = [W₁ … W_H] is absorbed by passing Vₕ = WₕV'ₕ). The heads are folded into the replica axis of the
reduction (R·H independent softmax averages in one call).

*Depth.* θ may depend on time: ``parameters`` = a callable t ↦ (Q, K, V) (shapes as above; called at
every evaluation and its small matrices checked on the host, so it may be any Python code), or a table
over depth, ``layer_times`` = (τ₀ < τ₁ < … < τ_{L−1}) with Q, K, V carrying a leading layer axis
(L, [H,] r, d), looked up piecewise-constantly: layer l acts on [τ_l, τ_{l+1}) (the last one on
[τ_{L−1}, ∞)). A Runge–Kutta step whose stages straddle a boundary would mix two layers; the field's
:meth:`AttentionField.pieces` names the boundaries, and every integrator cuts its steps there and runs
each piece with that layer's parameters held fixed (:class:`measureflow.integrators.Stepper`; Euler with
one step per layer is then exactly the residual update x ← x + τΓ_{θ_l}(x) of a transformer).

*Sinkhorn attention* (``normalisation="sinkhorn"``, Sinkformers): the kernel e^{⟨Qxᵢ, Kxⱼ⟩} is
normalised on both sides, π = diag(a)·(wᵢwⱼe^{⟨Qxᵢ, Kxⱼ⟩})·diag(b) with the scalings a, b > 0 that make
Σⱼπᵢⱼ = wᵢ and Σᵢπᵢⱼ = wⱼ (doubly stochastic for uniform weights), and Γ(xᵢ) = Σⱼ πᵢⱼ Vxⱼ / wᵢ. Since
⟨q, k⟩ = −½|q − k|² + ½|q|² + ½|k|², this kernel is the Gibbs kernel e^{−|q − k|²/ε} of the cost |q − k|²
at ε = 2, times factors of i alone and of j alone that the potentials absorb: π is the entropic plan
between Σwᵢδ_{Qxᵢ} and Σwⱼδ_{Kxⱼ}, solved by :func:`measureflow.reductions.sinkhorn_potentials`
(log-domain, warm-started from the previous call; its stopping test reads one number back from the
device every few sweeps, as in the ``sinkhorn`` field). With g the potential on the keys, the row of xᵢ
is softmaxⱼ(⟨Qxᵢ, Kxⱼ⟩ + log wⱼ + (gⱼ − |Kxⱼ|²)/2), and off the particles the same log-sum-exp extends it
(the c-transform): Γ(x) = softmaxⱼ(⟨Qx, Kxⱼ⟩ + log wⱼ + (gⱼ − |Kxⱼ|²)/2)·Vxⱼ.

*Sphere* (``sphere=True``, tokens on S^{d−1} as layer normalisation keeps them): the velocity is the
tangent part P_x Γ = Γ − ⟨Γ, x⟩x/|x|², so the exact flow keeps |x| = 1 and a Runge–Kutta step drifts
off by its local error only; :meth:`AttentionField.project` (x ↦ x/|x|) is applied after every output
step by every integrator (the run's :class:`measureflow.integrators.Stepper` honours a field's ``project``).

**Gaussian closure** (derived, MATH.md §10; corrects [S] (30)). Tilting N(m, Σ) by e^{⟨KᵀQx, y⟩}
gives N(m + ΣKᵀQx, Σ), so Γ(x) = V(m + ΣKᵀQx) is affine: in the convention v = b + A(x − m),

    b = Γ(m) = V(m + ΣKᵀQm),   A = ∇Γ = VΣKᵀQ,   Σ̇ = VΣKᵀQΣ + ΣQᵀKΣVᵀ,   ṁ = b

(summed over heads). Sinkhorn attention (derived): the plan between two copies of N(m, Σ) under the
kernel e^{xᵀQᵀKy} is Gaussian with cross-covariance C = Σ^{1/2}ĈΣ^{1/2}, Ĉ = Ŝ·2(I + (I + 4ŜᵀŜ)^{1/2})⁻¹,
Ŝ = Σ^{1/2}QᵀKΣ^{1/2} (the solution of Ĉ(I − ĈᵀĈ)⁻¹ = Ŝ, which makes the joint precision's
off-diagonal block −QᵀK), so E_π[y | x] = m + CᵀΣ⁻¹(x − m) and b = Vm, A = VCᵀΣ⁻¹, Σ̇ = VCᵀ + CVᵀ.
To first order in QᵀK it agrees with the softmax closure; since |Ĉ| < 1 it never blows up.

**Closed form** (:meth:`AttentionField.solution`, MATH.md §10 generalised): when every head has
Vₕ = vₕI and S̄ = Σₕ vₕKₕᵀQₕ is symmetric, Σ̇ = 2ΣS̄Σ, so Σ⁻¹ decreases linearly: with R = Σ₀^{1/2},
G = RS̄R,

    Σ(t) = R(I − 2tG)⁻¹R,   m(t) = e^{v̄t} R(I − 2tG)^{−1/2}R⁻¹ m₀,   v̄ = Σₕ vₕ

(the mean follows the centred flow map Ψ̇ = ΣS̄Ψ, Ψ = R(I − 2tG)^{−1/2}R⁻¹, times e^{v̄t}). For V = I,
KᵀQ = cI, centred: Σ(t) = Σ₀(I − 2ctΣ₀)⁻¹, and the covariance blows up at
t* = 1/(2λ_max(G)) = 1/(2cλ_max(Σ₀)) (:meth:`AttentionField.blowup_time`). A Gaussians run past t*
ends with status "blowup" (the simulation's bound on max |value|, frames kept) when the bound is read
after every step (a writer writing every step, or ``check_every=1``); the RK4 step across t* may also
leave the SPD cone, which the fixed-step integrator reports as "step_failure" (on about a third of grids);
particles never blow up (|Γ| ≤ ‖V‖ max|xⱼ|): they follow the closure until finite-N effects, of
order e^{hᵀΣh}/N in the softmax weights (MATH.md §10, "Avoid"), take over near t*.

**No energy.** Attention is not a Wasserstein gradient flow, even when V = QᵀK, where
Γ = ∇ₓ log ∫e^{⟨Qx, Ky⟩}dμ(y) is the gradient of a μ-dependent potential but no functional's first
variation; the field has no ``energy``. :meth:`AttentionField.log_partition` gives the monitor
Σₕ ∫ log ∫ e^{⟨Qₕx, Kₕy⟩}dμ(y) dμ(x) (one log-sum-exp per head on particles, the same reduction as the
velocity; closed form mᵀQᵀKm + ½tr(ΣKᵀQ(Σ + mmᵀ)QᵀK) per head on Gaussians), with no monotonicity
claimed.

The field is defined for t ≥ 0 (t ≥ τ₀ for a table).
"""

from __future__ import annotations

import bisect
import math
import warnings
from typing import Callable

import attrs
import torch

import measureflow
from measureflow.cache import DeviceCache
from measureflow.errors import CapabilityError, ParameterError, ShapeError, StateError, TimeRangeError
from measureflow.fields import Field
from measureflow.linalg import from_eigh, matrix_function, symmetrize
from measureflow.reductions import sinkhorn_potentials, softmax_average
from measureflow.state import Gaussians, Particles, as_tensor
from measureflow.targets import check_points, positive

__all__ = ["AttentionField", "LayerwiseIntegrator", "NORMALISATIONS"]

NORMALISATIONS = ("softmax", "sinkhorn")
#: ε of the cost |q − k|² whose Gibbs kernel is e^{⟨q, k⟩} up to row and column factors (module docstring).
_SINKHORN_EPS = 2.0
F64 = torch.float64


# -- parameters ---------------------------------------------------------------------------------------


def _matrices(value, name: str, layered: bool, where: str) -> torch.Tensor:
    """Q, K or V as float64 (L, H, rows, d): (rows, d) or (H, rows, d), with a leading L when ``layered``."""
    t = as_tensor(value, dtype=F64, name=f"{where}: {name}")
    # A tensor given with requires_grad stays in the autograd graph (gradients through a run).
    t = t.to("cpu", F64) if t.requires_grad else t.detach().to("cpu", F64)
    base = 3 if layered else 2
    layer = "L, " if layered else ""
    if t.ndim not in (base, base + 1):
        raise ShapeError(
            f"{where}: {name} must have shape ({layer}rows, d) for one head or ({layer}H, rows, d) for H heads; "
            f"received shape {tuple(t.shape)}"
        )
    if not bool(torch.isfinite(t).all()):
        raise ParameterError(f"{where}: {name} has non-finite entries")
    if not layered:
        t = t.unsqueeze(0)
    if t.ndim == 3:
        t = t.unsqueeze(1)
    return t.contiguous()


def _check_shapes(Q, K, V, where: str) -> None:
    """Q, K (…, H, r, d) and V (…, H, d, d) must agree on the layers, heads, r and d."""
    if Q.shape != K.shape:
        raise ShapeError(
            f"{where}: Q and K must have the same shape ([L,] [H,] r, d); received Q {tuple(Q.shape)} and "
            f"K {tuple(K.shape)}"
        )
    d = Q.shape[-1]
    if V.shape[-2:] != (d, d) or V.shape[:-2] != Q.shape[:-2]:
        want = tuple(Q.shape[:-2]) + (d, d)
        raise ShapeError(f"{where}: V must have shape {want} to match Q and K (d = {d}); received {tuple(V.shape)}")


def _identity_like(Q: torch.Tensor) -> torch.Tensor:
    d = Q.shape[-1]
    return torch.eye(d, dtype=Q.dtype, device=Q.device).expand(*Q.shape[:-2], d, d).clone()


def _positive_int(where):
    def check(instance, attribute, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ParameterError(f"{where}: {attribute.name} must be a positive integer; received {value!r}")

    return check


def _tolerance(value):
    return None if value is None else positive(value, "tol", "attention")


def _choice(instance, attribute, value):
    if value not in NORMALISATIONS:
        raise ParameterError(
            f"attention: normalisation must be one of {', '.join(NORMALISATIONS)}; received {value!r}"
        )


def _boolean(instance, attribute, value):
    if not isinstance(value, bool):
        raise ParameterError(f"attention: {attribute.name} must be True or False; received {value!r}")


# -- the field ----------------------------------------------------------------------------------------


@attrs.frozen(eq=False)
class AttentionField(Field):
    """Γ_θ[μ] (module docstring; MATH.md §10).

    Parameters
    ----------
    Q, K:
        (r, d) or (H, r, d) query and key maps; with ``layer_times``, a leading layer axis (L, [H,] r, d).
    V:
        (d, d) or (H, d, d) value maps (same leading axes as Q); ``None``: the identity in every head.
    parameters:
        instead of Q, K, V: a callable t ↦ (Q, K, V) (V may be None), shapes as above, the same at every t.
    layer_times:
        the start times τ₀ < … < τ_{L−1} of the L layers of a table (piecewise-constant lookup).
    normalisation:
        ``"softmax"`` (rows) or ``"sinkhorn"`` (rows and columns; ``tol``, ``max_iter`` as in the
        ``sinkhorn`` field: the potentials change by at most tol·ε in the last sweep).
    sphere:
        tokens live on the unit sphere: tangent velocity, :meth:`project` after each step.
    """

    name = "attention"

    Q: object = attrs.field(default=None)
    K: object = attrs.field(default=None)
    V: object = attrs.field(default=None)
    parameters: Callable | None = attrs.field(default=None)
    layer_times: tuple | None = attrs.field(default=None)
    normalisation: str = attrs.field(default="softmax", validator=_choice)
    sphere: bool = attrs.field(default=False, validator=_boolean)
    tol: float | None = attrs.field(default=1e-6, converter=_tolerance)
    max_iter: int = attrs.field(default=1000, validator=_positive_int("attention"))
    _table: tuple | None = attrs.field(init=False, default=None, repr=False)
    _dim: int | None = attrs.field(init=False, default=None, repr=False)
    _capabilities: frozenset = attrs.field(init=False, default=frozenset(), repr=False)
    _table_copies: DeviceCache | None = attrs.field(init=False, default=None, repr=False)
    _cache: dict = attrs.field(init=False, factory=dict, repr=False)

    def __attrs_post_init__(self):
        where = "attention"
        given = [n for n in ("Q", "K", "V") if getattr(self, n) is not None]
        if self.parameters is not None:
            if given or self.layer_times is not None:
                raise ParameterError(
                    f"{where}: give either Q, K, V (optionally with layer_times) or parameters=callable, not both "
                    f"(received parameters and {', '.join(given + (['layer_times'] if self.layer_times else []))})"
                )
            if not callable(self.parameters):
                raise ParameterError(f"{where}: parameters must be a callable t -> (Q, K, V); received {self.parameters!r}")
            Q, K, V = self._call(0.0)
            object.__setattr__(self, "_dim", Q.shape[-1])
            object.__setattr__(self, "time_range", (0.0, math.inf))
        else:
            if self.Q is None or self.K is None:
                raise ParameterError(f"{where}: Q and K are required (or parameters=callable t -> (Q, K, V))")
            layered = self.layer_times is not None
            times = None
            if layered:
                try:
                    times = tuple(float(t) for t in self.layer_times)
                except (TypeError, ValueError):
                    raise ParameterError(
                        f"{where}: layer_times must be a sequence of numbers; received {self.layer_times!r}"
                    ) from None
                if not times or not all(math.isfinite(t) for t in times) or any(b <= a for a, b in zip(times, times[1:])):
                    raise ParameterError(f"{where}: layer_times must be finite and strictly increasing; received {times}")
                object.__setattr__(self, "layer_times", times)
            Q = _matrices(self.Q, "Q", layered, where)
            K = _matrices(self.K, "K", layered, where)
            V = _identity_like(Q) if self.V is None else _matrices(self.V, "V", layered, where)
            _check_shapes(Q, K, V, where)
            if layered and Q.shape[0] != len(times):
                raise ShapeError(
                    f"{where}: layer_times has {len(times)} entries but Q, K, V have {Q.shape[0]} layers (leading axis)"
                )
            object.__setattr__(self, "_table", (Q, K, V))
            object.__setattr__(self, "_table_copies", DeviceCache(self._convert_table))
            object.__setattr__(self, "_dim", Q.shape[-1])
            object.__setattr__(self, "time_range", (times[0] if layered else 0.0, math.inf))
        caps = {"velocity"}
        if not self.sphere:
            caps.add("affine")
        object.__setattr__(self, "_capabilities", frozenset(caps))

    # -- θ_t --------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def heads(self) -> int:
        return self._table[0].shape[1] if self._table is not None else self._call(self.time_range[0])[0].shape[0]

    def _call(self, t: float):
        """θ_t of a callable, as float64 (H, r, d), (H, r, d), (H, d, d), checked against the first call."""
        where = "attention.parameters"
        out = self.parameters(t)
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            raise ParameterError(
                f"{where}: the callable must return (Q, K, V) (V may be None); at t = {t:g} it returned {out!r}"
            )
        Q = _matrices(out[0], "Q", False, where)[0]
        K = _matrices(out[1], "K", False, where)[0]
        V = _identity_like(Q) if out[2] is None else _matrices(out[2], "V", False, where)[0]
        _check_shapes(Q, K, V, where)
        if self._dim is not None and Q.shape[-1] != self._dim:
            raise ShapeError(f"{where}: at t = {t:g} the callable returned d = {Q.shape[-1]}; earlier d = {self._dim}")
        return Q, K, V

    def layer_index(self, t: float) -> int:
        """The layer of a table acting at time t (left-closed: τ_l ≤ t < τ_{l+1}); 0 without a table."""
        if self.layer_times is None:
            return 0
        return max(0, bisect.bisect_right(self.layer_times, float(t)) - 1)

    def theta(self, t: float, like: torch.Tensor | None = None):
        """(Q, K, V) acting at time t, shapes (H, r, d), (H, r, d), (H, d, d), in ``like``'s dtype and device."""
        self.check_time(t)
        if self._table is None:
            Q, K, V = self._call(float(t))
            return tuple(m.to(like) for m in (Q, K, V)) if like is not None else (Q, K, V)
        layer = self.layer_index(t)
        table = self._table if like is None else self._table_copies(like)
        return tuple(m[layer] for m in table)

    def _convert_table(self, like: torch.Tensor):
        """The table (Q, K, V), every layer, in ``like``'s dtype and device."""
        return tuple(m.to(like) for m in self._table)

    def trainable(self) -> dict:
        """The tensors gradients through a run may ask for: the (Q, K, V) table, each (L, H, ·, d)
        (views of the tensors given, so a given tensor with requires_grad receives its gradient)."""
        if self._table is None:
            return {}
        return dict(zip(("Q", "K", "V"), self._table))

    def pieces(self, t0: float, t1: float) -> list:
        """[(a, b, field)]: [t0, t1] cut at the layer boundaries inside it, each piece with the field whose
        parameters are that layer's, held fixed (every integrator cuts its steps there)."""
        if self.layer_times is None:
            return [(t0, t1, self)]
        lo, hi = min(t0, t1), max(t0, t1)
        cuts = [lo] + [t for t in self.layer_times if lo < t < hi] + [hi]
        spans = list(zip(cuts[:-1], cuts[1:]))
        out = [(a, b, self.layer(self.layer_index(a))) for a, b in spans]
        if t1 < t0:
            out = [(b, a, f) for a, b, f in reversed(out)]
        return out

    def layer(self, index: int) -> "AttentionField":
        """The field of layer ``index`` of a table alone (constant parameters, same options)."""
        if self.layer_times is None:
            return self
        # A layer built under no_grad holds no graph to the table: keep one per grad mode, so an adjoint
        # pass (which re-evaluates with grad after a no-grad run) reaches the table's tensors.
        key = ("layer", index, torch.is_grad_enabled())
        hit = self._cache.get(key)
        if hit is None:
            Q, K, V = (m[index] for m in self._table)
            hit = AttentionField(Q=Q, K=K, V=V, normalisation=self.normalisation, sphere=self.sphere,
                                 tol=self.tol, max_iter=self.max_iter)
            object.__setattr__(hit, "time_range", self.time_range)
            self._cache[key] = hit
        return hit

    # -- particles ------------------------------------------------------------------------------------
    def _check_particles(self, x, state, where):
        if not isinstance(state, Particles):
            raise CapabilityError(f"{where}: expected a measureflow Particles state; received {type(state).__name__}")
        if state.dim != self._dim:
            raise ShapeError(
                f"{where}: the field has d = {self._dim} (Q is r × {self._dim}) but the state has d = {state.dim}"
            )
        check_points(x, self._dim, where)
        if state.replicas not in (1, x.shape[0]):
            raise ShapeError(
                f"{where}: x has {x.shape[0]} replicas but the state has {state.replicas}; give x of shape "
                f"({state.replicas}, N', {self._dim})"
            )

    @staticmethod
    def _heads_as_replicas(points, M):
        """(R, N, d) points through H maps M (H, e, d) → (R·H, N, e), replica-major."""
        R, N, _ = points.shape
        H, e, _ = M.shape
        return torch.einsum("rnd,hed->rhne", points, M).reshape(R * H, N, e)

    def velocity(self, t, x, state: Particles):
        where = "attention.velocity"
        self._check_particles(x, state, where)
        Q, K, V = self.theta(t, x)
        H = Q.shape[0]
        R = x.shape[0]
        y = state.x.expand(R, *state.x.shape[1:])
        q = self._heads_as_replicas(x, Q)
        k = self._heads_as_replicas(y, K)
        v = self._heads_as_replicas(y, V)
        logw = self._log_weights(state, R, H)
        if self.normalisation == "sinkhorn":
            g = self._potentials(t, state, Q, K, R)
            logw = (logw if logw is not None else y.new_full((R * H, y.shape[1]), -math.log(y.shape[1])))
            logw = logw + 0.5 * (g - (k * k).sum(-1))
        if torch.is_grad_enabled() and any(m.requires_grad for m in (q, k, v)):
            # The streaming reduction records no graph: a gradient through the run (or a divergence by
            # autograd) takes the dense softmax, O(N²) memory per head.
            scores = q @ k.transpose(-1, -2)
            if logw is not None:
                scores = scores + logw[:, None, :]
            out = torch.softmax(scores, dim=-1) @ v
        else:
            out = softmax_average(q, k, v, log_weights=logw, score="bilinear")
        out = out.reshape(R, H, x.shape[1], self._dim).sum(1)
        if self.sphere:
            radial = (out * x).sum(-1, keepdim=True) / (x * x).sum(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
            out = out - radial * x
        return out

    @staticmethod
    def _log_weights(state, R, H):
        """log wⱼ per head-replica (R·H, N); None for uniform weights (the reduction's own default)."""
        if state.weights is None:
            return None
        return torch.log(state.weights).expand(R, -1).repeat_interleave(H, 0)

    def _potentials(self, t, state, Q, K, R):
        """g of the entropic plan between Σwᵢδ_{Qxᵢ} and Σwⱼδ_{Kxⱼ} at ε = 2 (module docstring), (R·H, N)."""
        y = state.x.expand(R, *state.x.shape[1:])
        H, N = Q.shape[0], y.shape[1]
        qs = self._heads_as_replicas(y, Q)
        ks = self._heads_as_replicas(y, K)
        logw = self._log_weights(state, R, H)
        if logw is None:
            logw = y.new_full((R * H, N), -math.log(N))
        key = ("sinkhorn", self.layer_index(t), R * H, N, y.dtype, y.device)
        start = self._cache.get(key, {})
        f, g, omega, sweeps, residual = sinkhorn_potentials(
            qs, logw, ks, logw, _SINKHORN_EPS, f=start.get("f"), g=start.get("g"),
            relaxation=("auto", start.get("omega", 1.0)), tol=self.tol, max_iter=self.max_iter)
        self._cache[key] = {"f": f, "g": g, "omega": omega}
        self._cache["sinkhorn_stats"] = {"sweeps": sweeps, "residual": residual}
        if self.tol is not None and residual is not None and residual > self.tol:
            warnings.warn(
                f"attention: the Sinkhorn potentials stopped after max_iter = {self.max_iter} sweeps with a change of "
                f"{residual:.2e}·ε > tol = {self.tol:.1e}; raise max_iter, or scale Q and K down (sharper kernels "
                "converge more slowly)",
                RuntimeWarning,
                stacklevel=3,
            )
        return g

    @property
    def sinkhorn_stats(self) -> dict:
        """Sweeps and last change (in units of ε) of the latest Sinkhorn solve (``normalisation="sinkhorn"``)."""
        return dict(self._cache.get("sinkhorn_stats", {}))

    def plan(self, t: float, state: Particles) -> torch.Tensor:
        """The dense attention plan πᵢⱼ (R, H, N, N) — rows sum to wᵢ; for Sinkhorn attention also columns
        to wⱼ. For checks on small N only (it is N×N)."""
        where = "attention.plan"
        self._check_particles(state.x, state, where)
        x = state.x
        R, N, _ = x.shape
        Q, K, _ = self.theta(t, x)
        H = Q.shape[0]
        q = self._heads_as_replicas(x, Q).reshape(R, H, N, -1)
        k = self._heads_as_replicas(x, K).reshape(R, H, N, -1)
        logw = torch.log(state.weights_or_uniform())[:, None, :].expand(R, H, N)
        scores = q @ k.transpose(-1, -2) + logw[:, :, None, :]
        if self.normalisation == "sinkhorn":
            g = self._potentials(t, state, Q, K, R).reshape(R, H, N)
            scores = scores + 0.5 * (g - (k * k).sum(-1))[:, :, None, :]
        return torch.softmax(scores, -1) * logw.exp()[..., None]

    def project(self, state):
        """Tokens back onto the unit sphere (x ↦ x/|x|) for ``sphere=True``; the state unchanged otherwise."""
        if not self.sphere or not isinstance(state, Particles):
            return state
        x = state.x
        return state.with_positions(x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny))

    def log_partition(self, state) -> torch.Tensor:
        """Σₕ ∫ log ∫ e^{⟨Qₕx, Kₕy⟩}dμ(y) dμ(x), shape (R,) (a monitor, not an energy; module docstring)."""
        where = "attention.log_partition"
        t = self.time_range[0] if self.layer_times is None else self.layer_times[0]
        return self.log_partition_at(t, state, where)

    def log_partition_at(self, t: float, state, where: str = "attention.log_partition") -> torch.Tensor:
        """:meth:`log_partition` with the parameters acting at time t."""
        if isinstance(state, Gaussians):
            self._check_gaussians(state, where)
            Q, K, _ = self.theta(t, state.mean)
            m, S = state.mean, state.cov
            B = torch.einsum("hri,hrj->hij", Q, K)  # QᵀK per head: ⟨Qx, Ky⟩ = xᵀBy
            second = S + m[:, :, None] * m[:, None, :]
            linear = torch.einsum("ri,hij,rj->r", m, B, m)
            tilt = torch.einsum("hki,rkl,hlj->rhij", B, second, B)  # E[hhᵀ], h = Bᵀx, per head
            return linear + 0.5 * torch.einsum("rij,rhji->r", S, tilt)
        self._check_particles(state.x, state, where)
        x = state.x
        R, N, _ = x.shape
        Q, K, _ = self.theta(t, x)
        H = Q.shape[0]
        q = self._heads_as_replicas(x, Q)
        k = self._heads_as_replicas(x, K)
        _, lse = softmax_average(q, k, k[..., :0], log_weights=self._log_weights(state, R, H), score="bilinear",
                                 return_logsumexp=True)
        w = state.weights_or_uniform()
        return (lse.reshape(R, H, N).sum(1) * w).sum(-1)

    # -- Gaussians ------------------------------------------------------------------------------------
    def _check_gaussians(self, state, where):
        if not isinstance(state, Gaussians):
            raise CapabilityError(f"{where}: expected a measureflow Gaussians state; received {type(state).__name__}")
        if state.dim != self._dim:
            raise ShapeError(
                f"{where}: the field has d = {self._dim} (Q is r × {self._dim}) but the state has d = {state.dim}"
            )

    def affine(self, t, state: Gaussians):
        where = "attention.affine"
        if self.sphere:
            raise CapabilityError(
                f"{where}: tokens on the sphere have no Gaussian closure; run sphere=True on Particles, or "
                "sphere=False on Gaussians"
            )
        self._check_gaussians(state, where)
        Q, K, V = self.theta(t, state.mean)
        m, S = state.mean, state.cov
        if self.normalisation == "softmax":
            B = torch.einsum("hri,hrj->hij", K, Q)  # KᵀQ per head
            A = torch.einsum("hij,rjk,hkl->ril", V, S, B)
            b = torch.einsum("hij,rj->ri", V, m) + torch.einsum("rij,rj->ri", A, m)
            return b, A
        evals, U = torch.linalg.eigh(symmetrize(S))
        root = from_eigh(U, evals.sqrt())
        inv_root = from_eigh(U, evals.rsqrt())
        B = torch.einsum("hri,hrj->hij", Q, K)  # QᵀK per head
        S_hat = torch.einsum("rij,hjk,rkl->rhil", root, B, root)
        gram = S_hat.transpose(-1, -2) @ S_hat
        C_hat = S_hat @ matrix_function(gram, lambda lam: 2.0 / (1.0 + torch.sqrt(1.0 + 4.0 * lam.clamp_min(0.0))))
        # A = Σₕ Vₕ CₕᵀΣ⁻¹ = Σₕ Vₕ Σ^{1/2} Ĉₕᵀ Σ^{−1/2}
        A = torch.einsum("hij,rjk,rhlk,rlm->rim", V, root, C_hat, inv_root)
        b = torch.einsum("hij,rj->ri", V, m)
        return b, A

    def _linear_layer(self, layer: int, like: torch.Tensor):
        """(v̄, S̄) of a layer whose heads all have Vₕ = vₕI and S̄ = Σₕ vₕKₕᵀQₕ symmetric (else CapabilityError)."""
        Q, K, V = (m[layer] for m in self._table)
        d = self._dim
        eye = torch.eye(d, dtype=F64)
        v = torch.diagonal(V, dim1=-2, dim2=-1).mean(-1)  # (H,)
        scale = max(1.0, float(V.abs().max()))
        if float((V - v[:, None, None] * eye).abs().max()) > 1e-12 * scale:
            raise CapabilityError(
                "attention.solution: the closed form needs V = v·I in every head (MATH.md §10); integrate the "
                "Gaussian closure with a Simulation instead"
            )
        S_bar = torch.einsum("h,hri,hrj->ij", v, K, Q)
        if float((S_bar - S_bar.T).abs().max()) > 1e-12 * max(1.0, float(S_bar.abs().max())):
            raise CapabilityError(
                "attention.solution: the closed form needs Σₕ vₕKₕᵀQₕ symmetric; integrate the Gaussian closure "
                "with a Simulation instead"
            )
        return float(v.sum()), symmetrize(S_bar).to(like)

    def _closed_form_spans(self, t0: float, t: float, where: str):
        if self._table is None:
            raise CapabilityError(f"{where}: no closed form for parameters given as a callable")
        if self.normalisation != "softmax" or self.sphere:
            raise CapabilityError(f"{where}: the closed form is for softmax attention off the sphere")
        if t < t0:
            raise TimeRangeError(f"{where}: t = {t:g} is before t0 = {t0:g}; the closed form runs forward")
        self.check_time(t0)
        return [(a, b, self.layer_index(a)) for a, b, _ in self.pieces(t0, t)] if t > t0 else []

    def solution(self, t, initial: Gaussians, t0: float = 0.0) -> Gaussians:
        """The exact Gaussian state at time t from ``initial`` at t0 (module docstring; layer by layer for a
        table). Refuses (StateError) a t at or past the blow-up time of any replica."""
        where = "attention.solution"
        self._check_gaussians(initial, where)
        m, S = initial.mean, initial.cov
        for a, b, layer in self._closed_form_spans(float(t0), float(t), where):
            v_bar, S_bar = self._linear_layer(layer, m)
            h = b - a
            evals, U = torch.linalg.eigh(symmetrize(S))
            root, inv_root = from_eigh(U, evals.sqrt()), from_eigh(U, evals.rsqrt())
            g_vals, g_vecs = torch.linalg.eigh(symmetrize(root @ S_bar @ root))
            denom = 1.0 - 2.0 * h * g_vals
            if bool((denom <= 0).any()):
                raise StateError(
                    f"{where}: the covariance blows up before t = {float(t):g} (at t* = "
                    f"{float(self.blowup_time(initial, t0).min()):.6g}); ask for an earlier time"
                )
            S = symmetrize(root @ from_eigh(g_vecs, 1.0 / denom) @ root)
            flow = root @ from_eigh(g_vecs, denom.rsqrt()) @ inv_root
            m = math.exp(v_bar * h) * torch.einsum("rij,rj->ri", flow, m)
        return Gaussians(m, S)

    def blowup_time(self, initial: Gaussians, t0: float = 0.0) -> torch.Tensor:
        """t* per replica (R,): the first time Σ(t) of the closed form (see :meth:`solution`) diverges,
        t0 + 1/(2λ_max(Σ₀^{1/2}S̄Σ₀^{1/2})) for constant parameters; inf where it never does."""
        where = "attention.blowup_time"
        self._check_gaussians(initial, where)
        self._closed_form_spans(float(t0), float(t0), where)
        starts = [float(t0)] + ([t for t in self.layer_times if t > t0] if self.layer_times else [])
        ends = starts[1:] + [math.inf]
        P = torch.linalg.inv(initial.cov)  # Σ⁻¹ decreases by 2hS̄ over a span of length h
        out = torch.full((initial.replicas,), math.inf, dtype=initial.dtype)
        for a, b in zip(starts, ends):
            _, S_bar = self._linear_layer(self.layer_index(a), P)
            evals, U = torch.linalg.eigh(symmetrize(P))
            inv_root = from_eigh(U, evals.rsqrt())
            top = torch.linalg.eigvalsh(symmetrize(inv_root @ S_bar @ inv_root))[..., -1]
            hit = torch.where(top > 0, a + 0.5 / top.clamp_min(torch.finfo(P.dtype).tiny), math.inf)
            hit = torch.where(hit <= b, hit, math.inf)
            out = torch.where(torch.isinf(out), hit, out)
            if math.isfinite(b):
                P = P - 2.0 * (b - a) * S_bar
        return out

    def describe(self):
        out = {"name": self.name, "normalisation": self.normalisation, "sphere": self.sphere, "dim": self._dim}
        if self.normalisation == "sinkhorn":
            out.update(tol=self.tol, max_iter=self.max_iter)
        if self._table is not None:
            Q, K, V = self._table
            heads = Q.shape[1]

            def as_given(m):  # drop the layer axis without a table and the head axis for one head
                m = m if self.layer_times is not None else m[0]
                return (m[:, 0] if self.layer_times is not None else m[0]) if heads == 1 else m

            out.update(Q=as_given(Q).tolist(), K=as_given(K).tolist(), V=as_given(V).tolist(), heads=heads,
                       layer_times=list(self.layer_times) if self.layer_times else None)
        else:
            out["parameters"] = getattr(self.parameters, "__qualname__", repr(self.parameters))
        return out


# -- stepping token dynamics ----------------------------------------------------------------------------


def LayerwiseIntegrator(integrator="rk4", **options):
    """The integrator itself: every integrator now cuts its steps at a field's ``pieces`` and applies
    its ``project`` after each output step (:class:`measureflow.integrators.Stepper`), so wrapping is no
    longer needed. Kept so that existing scripts run; it warns once."""
    warnings.warn(
        "LayerwiseIntegrator is no longer needed: every integrator honours a field's pieces and project; "
        "pass the integrator ('rk4', 'dopri5', …) directly",
        FutureWarning,
        stacklevel=2,
    )
    return measureflow.integrator(integrator, **options) if isinstance(integrator, str) else integrator


@measureflow.hookimpl
def measureflow_register_fields(registry):
    registry.add_field("attention", AttentionField)
