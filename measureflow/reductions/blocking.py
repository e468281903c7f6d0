"""How the reductions cut the N×M pairs into blocks, and the block both eager paths start from.

The eager paths walk (rows × cols) blocks sized from the memory budget of
:class:`~measureflow.reductions.ReductionConfig` (and a cache-sized cap on the CPU), so memory stays
O((N + M)·d + block²) whatever N and M (DESIGN.md, "The numerical spine").
"""

from __future__ import annotations

import math

import torch

from . import settings

__all__ = ["block_shape", "spans", "sqdist_direct"]


def block_shape(block: tuple[int, int] | None, R: int, N: int, M: int, itemsize: int, device: torch.device,
                temporaries: int):
    """(rows, cols) of one eager block: explicit, or the largest fitting the memory budget."""
    config = settings.config
    if block is not None:
        return min(block[0], N), min(block[1], M)
    elements = config.memory_budget // max(1, itemsize * temporaries * R)
    if device.type == "cpu":
        elements = min(elements, max(1, config.cpu_block_elements // R))
    elements = max(elements, 64 * 64)
    bm = min(M, max(64, math.isqrt(elements)))
    bn = min(N, max(1, elements // bm))
    return bn, bm


def spans(n: int, size: int) -> list[slice]:
    """Split range(n) into ⌈n/size⌉ near-equal slices of at most ``size`` (no tiny tail block)."""
    count = -(-n // max(1, size))
    step = -(-n // count)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def sqdist_direct(xt, yt, out, tmp):
    """|xᵢ − yⱼ|² from explicit differences; xt (R, d, bn), yt (R, d, bm) → out (R, bn, bm).

    Exact at coincident points and accurate near the diagonal, unlike the GEMM identity
    |x|² + |y|² − 2⟨x, y⟩ (see the package docstring, "Accuracy notes").
    """
    torch.sub(xt[:, 0, :, None], yt[:, 0, None, :], out=out)
    out.mul_(out)
    for c in range(1, xt.shape[1]):
        torch.sub(xt[:, c, :, None], yt[:, c, None, :], out=tmp)
        out.addcmul_(tmp, tmp)
    return out
