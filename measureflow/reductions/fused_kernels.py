"""The loop nests of the fused path, written for ``torch.compile``.

Each maker returns a function of one replica and one column block that evaluates distance, kernel
(or score) and every weighted sum without writing an N×M temporary; :mod:`.fused` compiles it once
per static configuration. Called outside a compile (torch.compile gave up on the frame) they return
None instead of running the broadcast form eagerly.
"""

from __future__ import annotations

import torch

__all__ = ["exp32", "make_fused_kernel_sum", "make_fused_softmax", "make_fused_shifted_sum"]


def exp32(x: torch.Tensor) -> torch.Tensor:
    """exp for float32 inside the fused kernels: 2ⁿ·p(r), r ∈ [−ln2/2, ln2/2].

    p is a degree-5 near-minimax polynomial (relative error 7.5·10⁻⁸ on the interval, 2.2·10⁻⁷
    including float32 evaluation) — as accurate as the float32 sums it feeds, and cheaper than the
    vectorised library exp (the fused Gaussian kernel sum ran ≈ 1.4× faster with it on AVX2).
    Arguments below −87 return exactly 0 (they would be subnormal); arguments must be ≤ 88 (every
    caller passes a non-positive exponent).
    """
    xc = torch.clamp(x, min=-87.0)
    n = torch.floor(xc * 1.4426950408889634 + 0.5)
    r = xc - n * 0.693359375 + n * 2.12194440e-4  # Cody–Waite split of ln 2
    p = r * 0.008297654273587793 + 0.04191538194777505
    p = p * r + 0.16667574740735497
    p = p * r + 0.4999889485174218
    p = p * r + 0.999999691987992
    p = p * r + 1.000000071654605
    two_n = ((n.to(torch.int32) + 127) << 23).view(torch.float32)
    return torch.where(x < -87.0, 0.0, p * two_n)


def make_fused_kernel_sum(kernel: str, d: int, n_values: int, grad: bool, poly_exp: bool):
    """The kernel-sum loop nest for one static configuration (named kernel, d, value channels, gradient or
    not, polynomial exp or not), to be compiled by :func:`.fused.compiled_kernel`."""
    exp = exp32 if poly_exp else torch.exp

    def fused_kernel_sum(xs, ys, v, w, acc):
        # One replica, one column block: xs (d, n), ys (d, b), v (C, b) (C = 0: value Σ w k),
        # w (b,), acc (n, [1 or C] + [d]). Coordinates are already in the kernel's natural units.
        if not torch.compiler.is_compiling():
            # torch.compile gave up on this frame: never run the broadcast form eagerly (n×b×d).
            return None
        diffs = [xs[c, :, None] - ys[c, None, :] for c in range(d)]
        r2 = diffs[0] * diffs[0]
        for c in range(1, d):
            r2 = r2 + diffs[c] * diffs[c]
        if kernel == "gaussian":
            k = exp(-r2)
        elif kernel == "laplace":
            r = torch.sqrt(r2)
            k = exp(-r)
        elif kernel == "energy":
            r = torch.sqrt(r2)
            k = -r
        else:  # imq
            k = torch.rsqrt(1.0 + r2)
        wk = k * w[None, :]
        if n_values:
            sums = [(wk * v[c, None, :]).sum(-1) for c in range(n_values)]
        else:
            sums = [wk.sum(-1)]
        if grad:
            # Σⱼ gᵢⱼ (xᵢ − yⱼ) with g = w·(−∂k/∂r)/r in natural units; the caller applies the sign/scale
            if kernel == "gaussian":
                g = wk
            elif kernel == "laplace":
                g = torch.where(r > 0, wk / r, 0.0)
            elif kernel == "energy":
                g = torch.where(r > 0, w[None, :] / r, 0.0)
            else:
                g = wk * k * k
            sums += [(g * diffs[c]).sum(-1) for c in range(d)]
        if len(sums) == 1:
            # A lone sum is returned bare and added by the caller: fused with the add, inductor
            # stores every k·w into a per-thread row buffer and the kernel ran ≈ 1.4× slower.
            return sums[0]
        return acc + torch.stack(sums, -1)

    return fused_kernel_sum


def make_fused_softmax(score: str, d: int, n_values: int, negate: bool, poly_exp: bool):
    """The softmax-average loop nest (one column block: new running maximum and rescaled sums) for one
    static configuration (score, d, value channels, sign of the scale, polynomial exp or not)."""
    exp = exp32 if poly_exp else torch.exp

    def fused_softmax(qs, ks, lw, v, m, acc):
        # One replica, one column block: qs (d, n), ks (d, b), lw (b,), v (C, b), m (n,), acc (n, 1 + C)
        if not torch.compiler.is_compiling():
            return None
        if score == "sqdist":
            diff = qs[0, :, None] - ks[0, None, :]
            s = diff * diff
            for c in range(1, d):
                diff = qs[c, :, None] - ks[c, None, :]
                s = s + diff * diff
            s = s if negate else -s
        else:
            s = qs[0, :, None] * ks[0, None, :]
            for c in range(1, d):
                s = s + qs[c, :, None] * ks[c, None, :]
        s = s + lw[None, :]
        m_new = torch.maximum(m, s.amax(-1))
        p = exp(s - m_new[:, None])
        sums = [p.sum(-1)] + [(p * v[c, None, :]).sum(-1) for c in range(n_values)]
        rescale = torch.exp(m - m_new)
        return m_new, acc * rescale[:, None] + torch.stack(sums, -1)

    return fused_softmax




def make_fused_shifted_sum(d: int, poly_exp: bool):
    """The one-pass shifted exponential sum Σⱼ e^{ℓⱼ − |qᵢ − kⱼ|² − bᵢ} (one column block) of
    :func:`~measureflow.reductions.logsumexp.shifted_logsumexp`, for one static configuration (d, polynomial
    exp or not). The exponent is capped at 88 (exp32's domain): a capped row is beyond the trusted range
    anyway and is recomputed by the caller."""
    exp = exp32 if poly_exp else torch.exp

    def fused_shifted_sum(qs, ks, lw, bound):
        # One replica, one column block: qs (d, n), ks (d, b) in units of √scale, lw (b,), bound (n,)
        if not torch.compiler.is_compiling():
            return None
        diff = qs[0, :, None] - ks[0, None, :]
        r2 = diff * diff
        for c in range(1, d):
            diff = qs[c, :, None] - ks[c, None, :]
            r2 = r2 + diff * diff
        s = (lw[None, :] - bound[:, None]) - r2
        return exp(torch.clamp(s, max=88.0)).sum(-1)

    return fused_shifted_sum
