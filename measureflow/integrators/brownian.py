"""Brownian increments for SDE steps, and a Brownian path that can be refined (MATH.md §15.3).

An SDE step from t0 to t1 = t0 + h needs the Brownian increment ΔW = W(t1) − W(t0) ~ N(0, hI) and,
for the order-1.5 additive-noise methods, the *space-time Lévy area*

    H = (1/h) ∫_{t0}^{t1} (W(r) − W(t0) − (r − t0)/h · ΔW) dr  ~  N(0, (h/12) I), independent of ΔW,

from which the iterated integral I₍₁,₀₎ = ∫_{t0}^{t1} (W(r) − W(t0)) dr = h(ΔW/2 + H) follows.

Two sources answer :func:`brownian_increment`:

* a :class:`~measureflow.integrators.NoiseStream` (or a ``torch.Generator``): fresh normals on every
  call, ΔW = √h ξ, H = √(h/12) ξ' — what runs draw by default;
* a :class:`BrownianTree`: one fixed Brownian path on [t_start, t_end], resolved on the dyadic grid
  t_start + k(t_end − t_start)/2^depth. Any interval of that grid gets the increment *of the same
  path*: coarse increments are the sums of the fine ones (to rounding), so strong errors of a solver
  at several step sizes are measured against one path. The path is a pure function of its seed
  (every node of the tree draws from a generator seeded by the node's position), so a resumed run
  draws exactly what an uninterrupted one does.

The tree bisects an interval [s, t] of length h with known (W, H) by the exact conditional law of
its two halves (derived from W₁ + W₂ = W, H = (H₁ + H₂)/2 + (W₁ − W₂)/4, halves independent
N(0, h/2), N(0, h/24)):

    D = W₁ − W₂ = 3H + √(h/4) z₁,   W₁,₂ = (W ± D)/2,
    S = H₁ + H₂ = 2H − D/2,         E = H₁ − H₂ = √(h/12) z₂,   H₁,₂ = (S ± E)/2,

with z₁, z₂ standard normal (Foster's bisection of the Brownian path with its Lévy area).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from typing import NamedTuple

import torch

from ..errors import ParameterError
from ..validators import check_int
from .noise import noise_seed, standard_normal

__all__ = ["BrownianIncrement", "BrownianTree", "brownian_increment", "join_increments"]

# Nodes of a tree kept in memory: a walk along the time axis touches O(depth) nodes per step.
_CACHE_NODES = 256
# Relative tolerance for a query time to count as a grid point of the tree.
_GRID_TOL = 1e-9


class BrownianIncrement(NamedTuple):
    """ΔW = W(t1) − W(t0) and the space-time Lévy area H of the step (None when not asked for)."""

    dW: torch.Tensor
    H: torch.Tensor | None

    def iterated_integral(self, h: float) -> torch.Tensor:
        """I₍₁,₀₎ = ∫_{t0}^{t1} (W(r) − W(t0)) dr = h(ΔW/2 + H)."""
        return h * (0.5 * self.dW + self.H)


def join_increments(first: BrownianIncrement, h1: float, second: BrownianIncrement, h2: float) -> BrownianIncrement:
    """(ΔW, H) of two adjacent intervals of lengths h1 then h2, joined into one of length h1 + h2.

    ΔW = ΔW₁ + ΔW₂ and ∫(W − W(t0)) dr = h1(ΔW₁/2 + H₁) + h2 ΔW₁ + h2(ΔW₂/2 + H₂), from which
    H = ∫(W − W(t0)) dr / h − ΔW/2."""
    h = h1 + h2
    dW = first.dW + second.dW
    integral = h1 * (0.5 * first.dW + first.H) + h2 * first.dW + h2 * (0.5 * second.dW + second.H)
    return BrownianIncrement(dW, integral / h - 0.5 * dW)


def brownian_increment(noise, t0: float, t1: float, like: torch.Tensor, levy: bool = False) -> BrownianIncrement:
    """The Brownian increment of the step [t0, t1] (t1 > t0), shaped like ``like``.

    ``noise`` is a :class:`BrownianTree` (increments of its fixed path), a
    :class:`~measureflow.integrators.NoiseStream` or ``torch.Generator`` (fresh normals, drawn in
    the order ΔW then H), or None (torch's global stream). ``levy`` asks for H as well.
    """
    if isinstance(noise, BrownianTree):
        inc = noise.increment(t0, t1, like)
        return inc if levy else BrownianIncrement(inc.dW, None)
    h = t1 - t0
    dW = math.sqrt(h) * standard_normal(like.shape, like, noise)
    H = math.sqrt(h / 12.0) * standard_normal(like.shape, like, noise) if levy else None
    return BrownianIncrement(dW, H)


def _node_seed(seed: int, level: int, index: int) -> int:
    digest = hashlib.sha256(f"measureflow.brownian:{int(seed)}:{level}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class BrownianTree:
    """A fixed Brownian path (with its space-time Lévy areas) on [t_start, t_end], refined on demand
    (module docstring).

    Parameters
    ----------
    t_start, t_end:
        the interval the path covers (t_start < t_end).
    depth:
        the finest level: query times must lie on the grid t_start + k(t_end − t_start)/2^depth.
    seeds, replicas:
        as for :class:`~measureflow.integrators.NoiseStream`: block i (``replicas[i]`` consecutive
        replicas along the first axis) is an independent path seeded with ``seeds[i]``.
    device:
        where the normals are drawn (the increments are moved to the state's device).

    ``BrownianTree.for_run(seed, t_start, t_end, depth)`` is a single run's path, seeded from the
    run's seed like its noise stream. Pass it wherever a noise stream goes (``Stepper(noise=...)``,
    ``solver.advance(..., noise=...)``); ``get_state``/``set_state`` exist for checkpoints and hold
    nothing, since the path is a function of its seeds alone.
    """

    def __init__(self, t_start: float, t_end: float, depth: int = 20, *, seeds=(0,), replicas=(None,), device="cpu"):
        t_start, t_end = float(t_start), float(t_end)
        if not (math.isfinite(t_start) and math.isfinite(t_end) and t_start < t_end):
            raise ParameterError(
                f"BrownianTree needs finite t_start < t_end; received t_start = {t_start!r}, t_end = {t_end!r}"
            )
        self.t_start, self.t_end = t_start, t_end
        self.depth = check_int(depth, "depth", "BrownianTree", minimum=0)
        if self.depth > 52:
            raise ParameterError(f"BrownianTree: depth {self.depth} exceeds float64 time resolution; use depth <= 52")
        seeds, replicas = list(seeds), [None if r is None else int(r) for r in replicas]
        if len(seeds) != len(replicas) or not seeds or (len(seeds) > 1 and None in replicas):
            raise ParameterError(
                "BrownianTree needs one seed per block and, with several blocks, the replicas of each; received "
                f"seeds = {seeds}, replicas = {replicas}"
            )
        self.seeds = tuple(int(s) for s in seeds)
        self.replicas = tuple(replicas)
        self.device = torch.device(device)
        self._cache: OrderedDict = OrderedDict()

    @classmethod
    def for_run(cls, seed: int, t_start: float, t_end: float, depth: int = 20, device="cpu") -> "BrownianTree":
        """The path of one run with seed ``seed`` (seeded through :func:`~measureflow.integrators.noise_seed`)."""
        return cls(t_start, t_end, depth, seeds=(noise_seed(seed),), replicas=(None,), device=device)

    @classmethod
    def for_blocks(cls, blocks, t_start: float, t_end: float, depth: int = 20, device="cpu") -> "BrownianTree":
        """Paths of runs packed as blocks ``[(seed, replicas), …]``, each as it would run alone."""
        seeds, replicas = zip(*blocks)
        return cls(t_start, t_end, depth, seeds=[noise_seed(s) for s in seeds], replicas=replicas, device=device)

    @property
    def resolution(self) -> float:
        """The finest time step (t_end − t_start)/2^depth."""
        return (self.t_end - self.t_start) / (1 << self.depth)

    # -- grid ---------------------------------------------------------------------------------------
    def grid_index(self, t: float) -> int:
        """k with t = t_start + k·resolution; refuses a time that is not on the tree's grid."""
        span = self.t_end - self.t_start
        n = 1 << self.depth
        k = (float(t) - self.t_start) / span * n
        kr = round(k)
        if not (0 <= kr <= n) or abs(k - kr) > _GRID_TOL * max(1.0, kr):
            raise ParameterError(
                f"Brownian refinement does not nest: t = {float(t):.12g} is not on the tree's grid t_start + "
                f"k·{self.resolution:.6g} in [{self.t_start:g}, {self.t_end:g}] (depth {self.depth}); put step "
                "boundaries on that grid (a step count dividing 2^depth) or build the tree deeper"
            )
        return int(kr)

    # -- the path -------------------------------------------------------------------------------------
    def increment(self, t0: float, t1: float, like: torch.Tensor) -> BrownianIncrement:
        """(ΔW, H) of the path over [t0, t1] (grid points, t0 < t1), shaped and typed like ``like``."""
        k0, k1 = self.grid_index(t0), self.grid_index(t1)
        if k1 <= k0:
            raise ParameterError(
                f"BrownianTree.increment needs t0 < t1 on the grid; received t0 = {float(t0):.12g}, t1 = {float(t1):.12g}"
            )
        shape, dtype = tuple(like.shape), like.dtype
        parts = []
        for level, index in _dyadic_cover(k0, k1, self.depth):
            parts.append((self._node(level, index, shape, dtype), (self.t_end - self.t_start) / (1 << level)))
        inc, h = parts[0]
        for nxt, hn in parts[1:]:
            inc = join_increments(inc, h, nxt, hn)
            h += hn
        if inc.dW.device != like.device:
            inc = BrownianIncrement(inc.dW.to(like.device, non_blocking=True), inc.H.to(like.device, non_blocking=True))
        return inc

    def _normals(self, level: int, index: int, shape, dtype) -> torch.Tensor:
        """Two standard normals of ``shape`` for node (level, index), stacked: one generator per block."""
        outs = []
        for seed, r in zip(self.seeds, self.replicas):
            generator = torch.Generator(device=self.device)
            generator.manual_seed(_node_seed(seed, level, index))
            block = shape if r is None else (r, *shape[1:])
            outs.append(torch.randn((2, *block), generator=generator, dtype=dtype, device=self.device))
        if len(outs) == 1:
            return outs[0]
        if shape[0] != sum(self.replicas):
            raise ParameterError(
                f"BrownianTree holds paths for {sum(self.replicas)} replicas {self.replicas}; a draw of shape "
                f"{shape} asks for {shape[0]}"
            )
        return torch.cat(outs, dim=1)

    def _node(self, level: int, index: int, shape, dtype) -> BrownianIncrement:
        key = (level, index, shape, dtype)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        h = (self.t_end - self.t_start) / (1 << level)
        if level == 0:
            z = self._normals(0, 0, shape, dtype)
            node = BrownianIncrement(math.sqrt(h) * z[0], math.sqrt(h / 12.0) * z[1])
        else:
            parent = self._node(level - 1, index // 2, shape, dtype)
            W, H = parent.dW, parent.H
            hp = 2.0 * h  # the parent's length
            z = self._normals(level, index // 2, shape, dtype)
            D = 3.0 * H + math.sqrt(hp / 4.0) * z[0]
            S = 2.0 * H - 0.5 * D
            E = math.sqrt(hp / 12.0) * z[1]
            left = BrownianIncrement(0.5 * (W + D), 0.5 * (S + E))
            right = BrownianIncrement(0.5 * (W - D), 0.5 * (S - E))
            self._remember((level, index - index % 2, shape, dtype), left)
            self._remember((level, index - index % 2 + 1, shape, dtype), right)
            return left if index % 2 == 0 else right
        self._remember(key, node)
        return node

    def _remember(self, key, node) -> None:
        self._cache[key] = node
        self._cache.move_to_end(key)
        while len(self._cache) > _CACHE_NODES:
            self._cache.popitem(last=False)

    # -- checkpoints (the path is a function of its seeds) ---------------------------------------------
    def get_state(self) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.uint8)

    def set_state(self, state) -> None:
        return None

    def __repr__(self) -> str:
        return (f"BrownianTree([{self.t_start:g}, {self.t_end:g}], depth={self.depth}, blocks={len(self.seeds)}, "
                f"device={self.device})")


def _dyadic_cover(k0: int, k1: int, depth: int):
    """The maximal dyadic intervals [index·2^(depth−level), (index + 1)·2^(depth−level)) covering
    [k0, k1) of the finest grid, left to right, as (level, index) pairs."""
    out = []
    k = k0
    while k < k1:
        size = k & -k if k else 1 << depth
        while size > k1 - k:
            size >>= 1
        level = depth - (size.bit_length() - 1)
        out.append((level, k // size))
        k += size
    return out

