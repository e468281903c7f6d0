"""Diagnostics of transport maps, trajectories and score fields (MATH.md §1.5, §2).

Three groups of pure functions; none of them needs a particular plugin, so they apply to any field,
any callable and any trajectory.

**Gaussian flow-matching map vs Brenier (MATH.md §1.5).** For X₀ ~ N(m₀, Σ₀) and X₁ ~ N(m₁, Σ₁)
coupled independently, the flow-matching field (1.5) transports Σ₀ to Σ₁ by the linear map
T₁^FM = Σ₀^{1/2} C^{1/2} Σ₀^{-1/2} with C = Σ₀^{-1/2} Σ₁ Σ₀^{-1/2}, whatever the scalar schedule; the
optimal (Brenier) map is T^OT = Σ₀^{-1/2} (Σ₀^{1/2} Σ₁ Σ₀^{1/2})^{1/2} Σ₀^{-1/2}. The two agree iff
Σ₀Σ₁ = Σ₁Σ₀. :func:`fm_flow_map`, :func:`fm_terminal_map`, :func:`commute`, and
:func:`brenier_map`, :func:`transport_cost` (those of :mod:`measureflow.couplings`, available here too).

**Trajectories.** :func:`path_transport_cost` and :func:`straightness` from saved frames (a tensor,
an array, or a trajectory object such as ``measureflow.open(path)`` or a ``MemoryWriter``).

**Score conservativity (MATH.md §2, after Vuong et al.).** A score s = ∇ log ρ is a gradient, so
∮ s·dx = 0 on every closed loop and its Jacobian is symmetric; an error e leaves the marginals of
the probability flow unchanged iff ∇·e + s·e = 0. :func:`loop_integral` (with :func:`circle_loops`,
:func:`brownian_bridge_loops`, and [V]'s :func:`rotation_loops` and :func:`projection_loops`), :func:`jacobian`, :func:`jacobian_asymmetry`, :func:`divergence`,
:func:`stein_residual`, :func:`conservativity_report`; :func:`as_vector_field` turns a field's
``velocity(t, x, state)`` into a callable of x alone.

A *vector field* here is any callable ``s(x)`` taking a tensor of shape (..., d) and returning the
same shape, acting point by point (the value at a point depends only on that point). Matrix
functions are spectral (``eigh``) and batched over leading dimensions. Everything keeps the dtype
and device of its inputs; float64 is recommended for the reference checks.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import torch

from .couplings import brenier_map, transport_cost
from .errors import ParameterError, ShapeError
from .linalg import check_psd, covariance_pair, from_eigh, spd_roots, symmetrize
from .state import as_tensor
from .validators import check_int

__all__ = [
    # Gaussian maps (MATH.md §1.5)
    "whitened_target",
    "fm_flow_map",
    "fm_terminal_map",
    "brenier_map",
    "transport_cost",
    "commutation_defect",
    "commute",
    # trajectories
    "PathCost",
    "path_transport_cost",
    "straightness",
    "rotation_loops",
    "projection_loops",
    # conservativity (MATH.md §2)
    "LoopIntegral",
    "as_vector_field",
    "loop_integral",
    "circle_loops",
    "brownian_bridge_loops",
    "jacobian",
    "jacobian_asymmetry",
    "divergence",
    "stein_residual",
    "conservativity_report",
]


# =====================================================================================================
# Gaussian flow-matching map vs Brenier (MATH.md §1.5)
# =====================================================================================================


def whitened_target(S0, S1) -> torch.Tensor:
    """C = Σ₀^{-1/2} Σ₁ Σ₀^{-1/2}, batched over leading dimensions (MATH.md §1.5)."""
    a, b = covariance_pair(S0, S1, "whitened_target")
    _, inv_root = spd_roots(a, "S0", "whitened_target")
    return symmetrize(inv_root @ b @ inv_root)


def _whitened(S0, S1, where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Σ₀^{1/2}, Σ₀^{-1/2}, λ, U) with C = U diag(λ) Uᵀ; λ clamped at 0 after refusing an indefinite Σ₁."""
    a, b = covariance_pair(S0, S1, where)
    check_psd(b, "S1", where)
    root, inv_root = spd_roots(a, "S0", where)
    lam, U = torch.linalg.eigh(symmetrize(inv_root @ b @ inv_root))
    return root, inv_root, lam.clamp_min(0), U


def _coefficients(t, schedule, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_t, b_t) as tensors of ``like``'s dtype/device from a schedule, a callable or a pair of numbers."""
    if schedule is None:
        tt = torch.as_tensor(t, dtype=like.dtype, device=like.device)
        return 1 - tt, tt
    if hasattr(schedule, "coefficients"):
        out = schedule.coefficients(t)
    elif callable(schedule):
        out = schedule(t)
    else:
        out = schedule
    try:
        values = tuple(out)
    except TypeError:
        values = ()
    if len(values) == 4:
        a, b = values[0], values[2]
    elif len(values) == 2:
        a, b = values
    else:
        raise ParameterError(
            "schedule must be None (linear), an object with coefficients(t) -> (a, da, b, db), a callable "
            f"t -> (a, b) or (a, da, b, db), or a pair of numbers (a_t, b_t); received {schedule!r}"
        )
    a = torch.as_tensor(a, dtype=like.dtype, device=like.device)
    b = torch.as_tensor(b, dtype=like.dtype, device=like.device)
    return a, b


def fm_flow_map(t, S0, S1, schedule=None) -> torch.Tensor:
    """Flow map T_t of the Gaussian flow-matching field (MATH.md §1.4–1.5, [B] (28)).

    With Z_t = a_t X₀ + b_t X₁, X₀ ~ N(m₀, Σ₀), X₁ ~ N(m₁, Σ₁) independent, the field (1.5) moves a
    point by x ↦ m_t + T_t (x − m₀) with m_t = a_t m₀ + b_t m₁ and

        T_t = Σ₀^{1/2} (a_t² I + b_t² C)^{1/2} Σ₀^{-1/2},   C = Σ₀^{-1/2} Σ₁ Σ₀^{-1/2}

    (the whitened path a²I + b²C; all its terms commute, which gives Ṫ_t = A_t T_t with
    A_t = (a a' Σ₀ + b b' Σ₁) Σ_t^{-1}). Linear schedule: ((1 − t)² I + t² C)^{1/2}.

    ``schedule`` is ``None`` (linear a = 1 − t, b = t), an object with ``coefficients(t) -> (a, da, b,
    db)`` (the schedules of MATH.md §1.3), a callable ``t -> (a, b)`` or ``(a, da, b, db)``, or a pair
    of numbers ``(a_t, b_t)`` already evaluated at t. ``t`` may be a tensor: its shape broadcasts with
    the leading (batch) dimensions of the covariances. Requires a_t(0) = 1, b_t(0) = 0 for T_0 = I.
    """
    root, inv_root, lam, U = _whitened(S0, S1, "fm_flow_map")
    a, b = _coefficients(t, schedule, root)
    middle = from_eigh(U, torch.sqrt(a[..., None] ** 2 + b[..., None] ** 2 * lam))
    return root @ middle @ inv_root


def fm_terminal_map(S0, S1) -> torch.Tensor:
    """T₁^FM = Σ₀^{1/2} C^{1/2} Σ₀^{-1/2}, C = Σ₀^{-1/2} Σ₁ Σ₀^{-1/2} (MATH.md §1.5, [B] (29)).

    The map the flow-matching field of independent Gaussian endpoints realises at t = 1, the same for
    every scalar schedule. Pushes Σ₀ to Σ₁ but is not symmetric (so not optimal) unless Σ₀Σ₁ = Σ₁Σ₀.
    Batched over leading dimensions; with means, T(x) = m₁ + T (x − m₀).
    """
    root, inv_root, lam, U = _whitened(S0, S1, "fm_terminal_map")
    return root @ from_eigh(U, lam.sqrt()) @ inv_root


def commutation_defect(S0, S1) -> torch.Tensor:
    """‖Σ₀Σ₁ − Σ₁Σ₀‖_F / (‖Σ₀‖_F ‖Σ₁‖_F), batched: 0 iff the covariances commute (MATH.md §1.5)."""
    a, b = covariance_pair(S0, S1, "commutation_defect")
    bracket = a @ b - b @ a
    norm = torch.linalg.matrix_norm(a) * torch.linalg.matrix_norm(b)
    return torch.linalg.matrix_norm(bracket) / norm


def commute(S0, S1, tol: float = 1e-10) -> torch.Tensor:
    """Whether Σ₀Σ₁ = Σ₁Σ₀ up to a relative tolerance, i.e. whether T^FM = T^OT (MATH.md §1.5).

    Returns a boolean tensor of the batch shape: ``commutation_defect(S0, S1) <= tol``. Choose ``tol``
    above the rounding level of the inputs (≈1e-15 for exact float64 data).
    """
    return commutation_defect(S0, S1) <= tol


# =====================================================================================================
# Trajectories: kinetic action, endpoint cost, straightness
# =====================================================================================================


class PathCost(NamedTuple):
    """Transport statistics of trajectories, weighted means over particles (one value per replica).

    ``kinetic``
        E ∫|ẋ|² dt of the piecewise-linear path through the frames: Σₖ |x_{k+1} − x_k|² / |t_{k+1} − t_k|
        (exact for paths that are straight at constant speed between frames, a lower bound otherwise).
    ``endpoint``
        E |x_last − x_first|², the cost of the coupling the flow realises.
    ``duration``
        |t_last − t_first|.

    By Cauchy–Schwarz ``endpoint ≤ duration · kinetic``, with equality iff every path is straight
    and traversed at constant speed.
    """

    kinetic: torch.Tensor
    endpoint: torch.Tensor
    duration: torch.Tensor

    @property
    def straightness(self) -> torch.Tensor:
        """endpoint / (duration · kinetic) ∈ (0, 1]; 1 iff every path is straight at constant speed."""
        return self.endpoint / (self.duration * self.kinetic)

    @property
    def excess(self) -> torch.Tensor:
        """duration · kinetic − endpoint ≥ 0 (for duration 1: Liu et al.'s E∫|ẋ − (x₁ − x₀)|² dt)."""
        return self.duration * self.kinetic - self.endpoint


# Frames read at once from a lazy file-backed array (bounded memory for long runs).
_FRAME_BUDGET = 1 << 24


def _trajectory_parts(positions, times, weights):
    """Split a trajectory object into (positions, times, weights), explicit arguments winning."""
    if hasattr(positions, "positions") and hasattr(positions, "times"):
        traj = positions
        if traj.positions is None:
            raise ParameterError(
                "the trajectory holds a Gaussian run (no particle positions); the path diagnostics need particles"
            )
        times = traj.times if times is None else times
        weights = getattr(traj, "weights", None) if weights is None else weights
        positions = traj.positions
    return positions, times, weights


def _to_torch(a, dtype=None, device=None) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.to(dtype=dtype or a.dtype, device=device or a.device)
    out = torch.as_tensor(np.asarray(a), device=device)
    return out.to(dtype) if dtype is not None else out


def path_transport_cost(positions, times=None, weights=None) -> PathCost:
    """Kinetic action E ∫|ẋ|² dt and endpoint cost E|x_T − x_0|² of saved trajectories.

    ``positions``: frames of shape (T, R, N, d) or (T, N, d) (a tensor, a numpy array, a lazy
    ``FrameArray``), or a trajectory object with ``positions`` and ``times`` (``measureflow.open(path)``,
    a ``MemoryWriter``), whose ``weights`` are used unless given. ``times``: the T frame times, strictly
    monotone (a backward run has decreasing times); ``None`` means equally spaced frames on [0, 1].
    ``weights``: (R, N), (N,) or ``None`` (uniform), normalised per replica.

    Returns a :class:`PathCost` whose fields have shape (R,) for 4-D input and () for 3-D input.
    File-backed frames are read in blocks, so long runs need not fit in memory.
    """
    positions, times, weights = _trajectory_parts(positions, times, weights)
    shape = tuple(positions.shape)
    if len(shape) not in (3, 4) or shape[0] < 2:
        raise ShapeError(
            f"positions must have shape (T, R, N, d) or (T, N, d) with T ≥ 2 frames; received {shape}"
        )
    frames = shape[0]
    lazy = not isinstance(positions, (torch.Tensor, np.ndarray))
    sample = positions[0:1] if lazy else positions
    like = _to_torch(sample)
    dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
    device = like.device

    if times is None:
        t = torch.linspace(0.0, 1.0, frames, dtype=torch.float64, device=device)
    else:
        t = _to_torch(times, dtype=torch.float64, device=device).reshape(-1)
        if t.shape[0] != frames:
            raise ShapeError(f"times must have one entry per frame ({frames}); received {tuple(t.shape)}")
    dt = t[1:] - t[:-1]
    if not (bool((dt > 0).all()) or bool((dt < 0).all())):
        raise ParameterError("times must be strictly increasing or strictly decreasing (no repeated frame times)")
    dt = dt.abs().to(dtype)

    if lazy:
        per_frame = max(1, math.prod(shape[1:]))
        block = max(1, _FRAME_BUDGET // per_frame)
        kinetic = None
        first = _to_torch(positions[0], dtype=dtype, device=device)
        prev = first
        k = 1
        while k < frames:
            chunk = _to_torch(positions[k : min(frames, k + block)], dtype=dtype, device=device)
            x = torch.cat([prev[None], chunk])
            term = _kinetic_sum(x, dt[k - 1 : k - 1 + chunk.shape[0]])
            kinetic = term if kinetic is None else kinetic + term
            prev = chunk[-1]
            k += chunk.shape[0]
        last = prev
    else:
        x = _to_torch(positions, dtype=dtype, device=device)
        kinetic = _kinetic_sum(x, dt)
        first, last = x[0], x[-1]
    endpoint = ((last - first) ** 2).sum(-1)

    w = _particle_weights(weights, kinetic.shape, dtype, device)
    duration = (t[-1] - t[0]).abs().to(dtype)
    return PathCost((w * kinetic).sum(-1), (w * endpoint).sum(-1), duration)


def _kinetic_sum(x: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """Σₖ |x_{k+1} − x_k|² / dt_k per particle for frames x (K+1, ..., N, d)."""
    step = ((x[1:] - x[:-1]) ** 2).sum(-1)  # (K, ..., N)
    return (step / dt.reshape((-1,) + (1,) * (step.ndim - 1))).sum(0)


def _particle_weights(weights, shape, dtype, device) -> torch.Tensor:
    """Weights broadcast to ``shape`` (..., N), normalised over N; uniform when None."""
    if weights is None:
        return torch.full(shape, 1.0 / shape[-1], dtype=dtype, device=device)
    w = _to_torch(weights, dtype=dtype, device=device)
    if w.shape[-1] != shape[-1] or w.ndim > len(shape):
        raise ShapeError(f"weights must have shape (R, N) or (N,) with N = {shape[-1]}; received {tuple(w.shape)}")
    w = torch.broadcast_to(w, shape)
    return w / w.sum(-1, keepdim=True)


def straightness(positions, times=None, weights=None) -> torch.Tensor:
    """Straightness S = E|x_T − x_0|² / (|t_T − t_0| · E ∫|ẋ|² dt) ∈ (0, 1] of saved trajectories.

    A normalised form of the rectified-flow straightness of Liu et al. (E ∫|ẋ − (x_T − x_0)|² dt for a
    unit duration, 0 for straight paths; :attr:`PathCost.excess`): by Cauchy–Schwarz |x_T − x_0|² ≤ |t_T − t_0| ∫|ẋ|² dt per path, so S = 1 exactly when every path
    is a straight segment traversed at constant speed, and S < 1 for curved paths or varying speed
    (a half circle at constant speed gives (2/π)² ≈ 0.405). ∫|ẋ|² dt is taken on the piecewise-linear
    path through the frames (see :class:`PathCost`); the ratio is invariant under a change of time
    unit. Expectations are weighted means over particles; shape (R,) for (T, R, N, d) input, () for
    (T, N, d). NaN when nothing moves. Arguments as in :func:`path_transport_cost`.
    """
    return path_transport_cost(positions, times, weights).straightness


# =====================================================================================================
# Score conservativity (MATH.md §2, [V])
# =====================================================================================================


class LoopIntegral(NamedTuple):
    """Result of :func:`loop_integral`, one value per loop.

    ``circulation``: ∮ s·dx (signed; positive orientation is the order of the loop's points).
    ``normaliser``: ∮ |x| |dx|. ``ratio``: |∮ s·dx| / ∮ |x| |dx| (MATH.md §2; [V] eq. (7) reports twice
    this for the stochastic sampler's drift 2s).
    """

    circulation: torch.Tensor
    normaliser: torch.Tensor
    ratio: torch.Tensor


def as_vector_field(field, t=None, state=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable x ↦ v(x) on tensors of shape (..., d) from a field or a callable.

    A plain callable is returned unchanged. An object with ``velocity(t, x, state)`` (a
    :class:`~measureflow.fields.Field`) is frozen at time ``t`` (required; checked against the field's
    time range) and ``state`` (``None`` for fields that ignore it, else a one-replica state): the query
    points are flattened to one replica (1, P, d) and the result reshaped back.
    """
    if not hasattr(field, "velocity"):
        if not callable(field):
            raise ParameterError(
                f"expected a vector field (a callable or an object with velocity()); received {field!r}"
            )
        return field
    if t is None:
        name = getattr(field, "name", type(field).__name__)
        raise ParameterError(f"field {name!r} depends on time: pass t=... to evaluate it at a fixed time")
    check = getattr(field, "check_time", None)
    if check is not None:
        check(t)
    replicas = getattr(state, "replicas", 1) if state is not None else 1
    if replicas != 1:
        raise ShapeError(
            f"the diagnostics evaluate a field against one replica; the state has R = {replicas}. "
            "Select one, e.g. Particles(state.x[r:r+1], None if state.weights is None else state.weights[r:r+1])."
        )

    def vector_field(x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        return field.velocity(t, x.reshape(1, -1, d), state).reshape(x.shape)

    return vector_field


def _points(x, name: str = "x") -> torch.Tensor:
    x = as_tensor(x, name=name)
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ShapeError(f"{name} must have shape (..., d) with d ≥ 1; received {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    return x


def loop_integral(s, loop) -> LoopIntegral:
    """∮ s·dx over closed polylines by the trapezoid (Stratonovich) sum (MATH.md §2, [V]):

        ∮ s·dx ≈ Σₖ ½ (s(x_k) + s(x_{k+1}))·(x_{k+1} − x_k),
        ∮|x||dx| ≈ Σₖ ½ (|x_k| + |x_{k+1}|) |x_{k+1} − x_k|,

    indices modulo K: ``loop`` of shape (..., K, d) lists K ≥ 3 points and the polyline closes from the
    last point back to the first (repeating the first point at the end is harmless). For a gradient
    field the exact integral vanishes; on a circle the sum is (sin h / h) × the periodic trapezoid rule
    (h = 2π/K), which is spectrally accurate, while on a Brownian bridge its error falls like the mesh.
    On a Brownian path the normaliser grows like √(number of points) (the path's length diverges), so
    ratios are comparable only between loops drawn on the same mesh ([V]: U = 9, 1000 steps).
    ``s`` is a vector field on (..., d) (see :func:`as_vector_field` for fields), evaluated once on all
    points. Returns a :class:`LoopIntegral` with fields of shape (...).
    """
    x = _points(loop, "loop")
    if x.ndim < 2 or x.shape[-2] < 3:
        raise ShapeError(f"loop must have shape (..., K, d) with K ≥ 3 points; received {tuple(x.shape)}")
    v = s(x)
    if tuple(v.shape) != tuple(x.shape):
        raise ShapeError(f"the vector field returned shape {tuple(v.shape)} for points of shape {tuple(x.shape)}")
    dx = torch.roll(x, -1, dims=-2) - x
    circulation = 0.5 * ((v + torch.roll(v, -1, dims=-2)) * dx).sum((-1, -2))
    radius = x.norm(dim=-1)
    normaliser = 0.5 * ((radius + torch.roll(radius, -1, dims=-1)) * dx.norm(dim=-1)).sum(-1)
    return LoopIntegral(circulation, normaliser, circulation.abs() / normaliser)


def circle_loops(center, radius, n_points: int = 1024, plane: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Points of circles, counter-clockwise in the coordinate plane ``plane`` = (i, j):

        x_k = c + r (cos θ_k e_i + sin θ_k e_j),   θ_k = 2πk / K,  k = 0 … K − 1.

    ``center`` (..., d) and ``radius`` (a number or a tensor broadcasting with the batch shape ...);
    returns (..., K, d) in the centre's dtype and device (float64 when given a list).
    """
    c = _points(center, "center")
    if not isinstance(center, torch.Tensor):
        c = c.to(torch.float64)
    d = c.shape[-1]
    i, j = (int(p) for p in plane)
    if d < 2 or not (0 <= i < d and 0 <= j < d and i != j):
        raise ShapeError(f"plane must name two distinct coordinates of the {d}-dimensional centre; received {plane}")
    K = check_int(n_points, "n_points", "circle_loops", minimum=3)
    r = torch.as_tensor(radius, dtype=c.dtype, device=c.device)
    theta = 2 * math.pi * torch.arange(K, dtype=c.dtype, device=c.device) / K
    offset = torch.zeros(K, d, dtype=c.dtype, device=c.device)
    offset[:, i] = torch.cos(theta)
    offset[:, j] = torch.sin(theta)
    return c[..., None, :] + r[..., None, None] * offset


def brownian_bridge_loops(x0, U: float = 9.0, steps: int = 1000, count: int = 1,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Brownian-bridge loops X_u = x₀ + W_u − (u/U) W_U, u ∈ [0, U] (MATH.md §2, [V] §3.2).

    ``steps`` equal increments of W (variance U/steps each); the loop's points are u_k = kU/steps for
    k = 0 … steps − 1 (X_U = x₀ = X_0 closes the loop, as :func:`loop_integral` expects). ``x0`` of shape
    (..., d); returns (..., count, steps, d) drawn with ``generator``. Defaults U = 9, 1000 steps, as in [V].
    """
    x = _points(x0, "x0")
    if not isinstance(x0, torch.Tensor):
        x = x.to(torch.float64)
    steps, count = int(steps), int(count)
    if steps < 3 or count < 1 or not U > 0:
        raise ParameterError(f"need steps ≥ 3, count ≥ 1 and U > 0; received steps={steps}, count={count}, U={U}")
    shape = x.shape[:-1] + (count, steps, x.shape[-1])
    dW = torch.randn(shape, generator=generator, dtype=x.dtype, device=x.device) * math.sqrt(U / steps)
    W = torch.cumsum(dW, dim=-2)  # W at u_1 … u_steps
    W = torch.cat([torch.zeros_like(W[..., :1, :]), W[..., :-1, :]], dim=-2)  # W at u_0 … u_{steps−1}
    W_U = dW.sum(-2, keepdim=True)
    u = torch.arange(steps, dtype=x.dtype, device=x.device) / steps  # u_k / U
    return x[..., None, None, :] + W - u[:, None] * W_U


def rotation_loops(x0, tau: float, count: int = 1, n_points: int = 256, sigma: float = 1.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Rotation-path loops of [V] (Fig. 1b) around the OU-noised x₀ at OU time τ:

        y(u) = x₀e^{−τ} + s_τ ε'(u),   s_τ = σ√(1 − e^{−2τ}),   u = k/K, k = 0 … K − 1,

    with ε ~ N(0, I) and its coordinates paired at random, each pair (εᵢ, εⱼ) rotated by the angle 2πu
    (all pairs at the same speed; an odd last coordinate stays fixed). |ε'(u)| = |ε|, so the loop stays
    in the typical shell of the noised law. ``x0`` (..., d); returns (..., count, K, d).
    """
    x = _points(x0, "x0")
    if not isinstance(x0, torch.Tensor):
        x = x.to(torch.float64)
    d = x.shape[-1]
    K = check_int(n_points, "n_points", "rotation_loops", minimum=3)
    count = check_int(count, "count", "rotation_loops")
    if d < 2:
        raise ShapeError(f"rotation_loops need d ≥ 2 to rotate a pair of coordinates; received d = {d}")
    eps = torch.randn(x.shape[:-1] + (count, d), generator=generator, dtype=x.dtype, device=x.device)
    perm = torch.randperm(d, generator=generator, device="cpu" if generator is None else generator.device)
    perm = perm.to(x.device)
    first, second = perm[0:d - d % 2:2], perm[1:d - d % 2:2]
    theta = 2 * math.pi * torch.arange(K, dtype=x.dtype, device=x.device) / K
    cos, sin = torch.cos(theta)[:, None], torch.sin(theta)[:, None]
    rotated = eps[..., None, :].expand(*eps.shape[:-1], K, d).clone()
    ei, ej = eps[..., None, first], eps[..., None, second]
    rotated[..., first] = cos * ei + sin * ej
    rotated[..., second] = -sin * ei + cos * ej
    scale = float(sigma) * math.sqrt(-math.expm1(-2.0 * float(tau)))
    return math.exp(-float(tau)) * x[..., None, None, :] + scale * rotated


def projection_loops(x0, tau: float, count: int = 1, corners: int = 4, points_per_side: int = 64,
                     sigma: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Projection-path loops of [V] (Fig. 1c): ``corners`` noised copies x_τ = x₀e^{−τ} + s_τ εᵢ of one x₀,
    joined in a cycle by straight segments whose points are projected radially back onto the shell
    |y − x₀e^{−τ}| = r around the clean centre, r = s_τ E|ε| ≈ s_τ√d (estimated here by the mean radius of
    the corners). ``x0`` (..., d); returns (..., count, corners·points_per_side, d).
    """
    x = _points(x0, "x0")
    if not isinstance(x0, torch.Tensor):
        x = x.to(torch.float64)
    d = x.shape[-1]
    corners = check_int(corners, "corners", "projection_loops", minimum=3)
    m = check_int(points_per_side, "points_per_side", "projection_loops")
    count = check_int(count, "count", "projection_loops")
    s_tau = float(sigma) * math.sqrt(-math.expm1(-2.0 * float(tau)))
    eps = torch.randn(x.shape[:-1] + (count, corners, d), generator=generator, dtype=x.dtype, device=x.device)
    offsets = s_tau * eps  # corners relative to the centre x₀e^{−τ}
    radius = offsets.norm(dim=-1).mean(-1, keepdim=True)  # (..., count, 1)
    nxt = torch.roll(offsets, -1, dims=-2)
    u = torch.arange(m, dtype=x.dtype, device=x.device) / m
    seg = offsets[..., :, None, :] + u[:, None] * (nxt - offsets)[..., :, None, :]  # (..., count, corners, m, d)
    seg = seg.reshape(*seg.shape[:-3], corners * m, d)
    seg = radius[..., None] * seg / seg.norm(dim=-1, keepdim=True)
    return math.exp(-float(tau)) * x[..., None, None, :] + seg


def _jacobian_jacrev(s, flat: torch.Tensor) -> torch.Tensor:
    def single(y):
        return s(y[None])[0]

    return torch.func.vmap(torch.func.jacrev(single))(flat)


def _jacobian_autograd(s, flat: torch.Tensor) -> torch.Tensor:
    # Valid because s acts point by point: the gradient of Σ_p s_i(x_p) w.r.t. x_p is row i of J(x_p).
    x = flat.detach().requires_grad_(True)
    with torch.enable_grad():
        y = s(x)
        d = x.shape[-1]
        rows = [torch.autograd.grad(y[:, i].sum(), x, retain_graph=i < d - 1)[0] for i in range(d)]
    return torch.stack(rows, dim=-2)


def _jacobian_central(s, flat: torch.Tensor, h) -> torch.Tensor:
    d = flat.shape[-1]
    if h is None:
        # Balances truncation O(h²) against rounding O(ε/h): h ≈ ε^{1/3} relative to the point's scale.
        scale = flat.abs().amax(-1, keepdim=True).clamp_min(1.0)
        h = torch.finfo(flat.dtype).eps ** (1 / 3) * scale[..., None]  # (P, 1, 1)
    shift = h * torch.eye(d, dtype=flat.dtype, device=flat.device)  # row j: h e_j
    plus = s(flat[:, None, :] + shift)  # [p, j, i] = s_i(x_p + h e_j)
    minus = s(flat[:, None, :] - shift)
    return ((plus - minus) / (2 * h)).transpose(-1, -2)


def jacobian(s, x, method: str = "auto", h: float | None = None) -> torch.Tensor:
    """J_ij(x) = ∂s_i/∂x_j of a point-wise vector field at points x (..., d); returns (..., d, d).

    ``method``:

    * ``"jacrev"`` — ``torch.func.vmap(torch.func.jacrev(s))`` (exact, one pass per output);
    * ``"autograd"`` — d reverse passes over all points at once (exact; works for callables that
      ``vmap`` cannot trace, such as code calling ``.item()``);
    * ``"auto"`` (default) — ``"jacrev"``, falling back to ``"autograd"`` when ``vmap`` refuses ``s``;
    * ``"central"`` — central differences (s(x + h e_j) − s(x − h e_j)) / 2h (MATH.md §2, [V]), for
      fields without autograd; error O(h²) + O(ε/h), default h = ε^{1/3} max(1, |x|_∞).
    """
    x = _points(x)
    flat = x.reshape(-1, x.shape[-1])
    if method == "auto":
        try:
            J = _jacobian_jacrev(s, flat)
        except (RuntimeError, NotImplementedError):
            J = _jacobian_autograd(s, flat)
    elif method == "jacrev":
        J = _jacobian_jacrev(s, flat)
    elif method == "autograd":
        J = _jacobian_autograd(s, flat)
    elif method == "central":
        J = _jacobian_central(s, flat, h)
    else:
        raise ParameterError(f"method must be 'auto', 'jacrev', 'autograd' or 'central'; received {method!r}")
    return J.detach().reshape(x.shape + (x.shape[-1],))


def jacobian_asymmetry(s, x, method: str = "auto", h: float | None = None, reduce: str = "max") -> torch.Tensor:
    """max_ij |J_ij − J_ji| of a vector field's Jacobian (MATH.md §2, differential constraint of [V]).

    Zero for a gradient field (a true score); 2|ω| for a rotation ω(−x₂, x₁) added to one. ``reduce``:
    ``"max"`` (default) — the maximum over all points, a 0-d tensor; ``"none"`` — one value per point,
    shape (...). ``method`` and ``h`` as in :func:`jacobian`.
    """
    J = jacobian(s, x, method=method, h=h)
    per_point = (J - J.transpose(-1, -2)).abs().amax((-1, -2))
    if reduce == "max":
        return per_point.amax()
    if reduce == "none":
        return per_point
    raise ParameterError(f"reduce must be 'max' or 'none'; received {reduce!r}")


def divergence(f, x, method: str = "auto", h: float | None = None) -> torch.Tensor:
    """∇·f(x) = tr J(x), the exact trace of the Jacobian (d passes; meant for small d); shape (...)."""
    return torch.diagonal(jacobian(f, x, method=method, h=h), dim1=-2, dim2=-1).sum(-1)


def stein_residual(e, score, x, method: str = "auto", h: float | None = None) -> torch.Tensor:
    """Stein residual ∇·e(x) + s(x)·e(x) of an error field e under a density with score s (MATH.md §2).

    ∇·e + s·e = ∇·(ρe)/ρ, so it vanishes everywhere iff div(ρe) = 0, i.e. iff adding e to the
    probability-flow velocity leaves every marginal unchanged ([V]'s Stein null space). For
    ρ = N(m, Σ), e(x) = ΣΩ(x − m) with Ωᵀ = −Ω is in it; e(x) = Ωx is not unless Σ ∝ I and m = 0.
    ``e``: a vector field on (..., d); ``score``: a vector field, or its values at x (same shape as x).
    The divergence is the exact Jacobian trace (``method`` as in :func:`jacobian`). Returns shape (...).
    """
    x = _points(x)
    with torch.no_grad():
        s = score(x) if callable(score) else as_tensor(score, dtype=x.dtype, device=x.device, name="score")
        ex = e(x)
    if tuple(s.shape) != tuple(x.shape):
        raise ShapeError(f"score values must have the shape of x {tuple(x.shape)}; received {tuple(s.shape)}")
    return divergence(e, x, method=method, h=h) + (s * ex).sum(-1)


def conservativity_report(field_or_callable, points, loops=None, *, t=None, state=None,
                          method: str = "auto", h: float | None = None) -> dict:
    """The conservativity numbers of MATH.md §2 for one vector field, as a dict of Python numbers.

    ``field_or_callable``: a callable on (..., d) or a field with ``velocity(t, x, state)`` (frozen at
    ``t`` and ``state``, see :func:`as_vector_field`). ``points`` (..., d): where the Jacobian is taken.
    ``loops``: a tensor (..., K, d) of closed polylines (e.g. :func:`circle_loops`,
    :func:`brownian_bridge_loops`), a list of such tensors, or ``None`` to skip the integral check.

    Keys: ``points``, ``jacobian_asymmetry_max``, ``jacobian_asymmetry_mean`` (max_ij |J − Jᵀ| per
    point), ``jacobian_scale_mean`` (mean max_ij |J_ij|, the field's own scale, to read the asymmetry
    against) and, with loops, ``loops``, ``loop_circulation_max`` (max |∮ s·dx|), ``loop_ratio_max``,
    ``loop_ratio_mean`` (|∮ s·dx| / ∮|x||dx|).
    """
    s = as_vector_field(field_or_callable, t=t, state=state)
    J = jacobian(s, points, method=method, h=h)
    J = J.reshape(-1, J.shape[-2], J.shape[-1])
    asym = (J - J.transpose(-1, -2)).abs().amax((-1, -2))
    report = {
        "points": int(J.shape[0]),
        "jacobian_asymmetry_max": float(asym.max()),
        "jacobian_asymmetry_mean": float(asym.mean()),
        "jacobian_scale_mean": float(J.abs().amax((-1, -2)).mean()),
    }
    if loops is not None:
        parts = loops if isinstance(loops, (list, tuple)) else [loops]
        with torch.no_grad():
            results = [loop_integral(s, part) for part in parts]
        circulation = torch.cat([r.circulation.reshape(-1) for r in results])
        ratio = torch.cat([r.ratio.reshape(-1) for r in results])
        report.update(
            loops=int(circulation.numel()),
            loop_circulation_max=float(circulation.abs().max()),
            loop_ratio_max=float(ratio.max()),
            loop_ratio_mean=float(ratio.mean()),
        )
    return report
