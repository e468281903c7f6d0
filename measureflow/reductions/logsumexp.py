"""The squared-distance log-sum-exp in one pass, each row shifted by a bound known beforehand.

    LSEᵢ = log Σⱼ e^{ℓⱼ − s|qᵢ − kⱼ|²} = bᵢ + log Σⱼ e^{ℓⱼ − s|qᵢ − kⱼ|² − bᵢ}.

The streaming softmax (:mod:`.softmax`) finds each row's maximum as it goes and rescales its partial
sums; when a good bound bᵢ of LSEᵢ is known before the pass — in log-domain Sinkhorn the previous
sweep's potential, since LSEᵢ = −fᵢ/ε at the fixed point (MATH.md §7) — the sum needs no maximum and no
rescaling: it is one weighted exponential sum, the cost of a Gaussian :func:`~measureflow.reductions.kernel_sum`.
A row whose shifted sum leaves the range where it is exact to working precision (log of it beyond
±:data:`TRUSTED_LOG_RANGE`: overflow, or terms lost below the smallest normal number) is recomputed by
the two-pass :func:`~measureflow.reductions.softmax_average`, so the result never depends on how good
the bound was, only the cost does.
"""

from __future__ import annotations

import math

import torch

from ..errors import StateError
from . import fused, settings
from .arguments import as_block_size, as_point_sets, as_real, as_weights, check_together
from .blocking import block_shape, sqdist_direct
from .fused_kernels import make_fused_shifted_sum
from .softmax import softmax_average

__all__ = ["shifted_logsumexp", "TRUSTED_LOG_RANGE"]

#: |log Σⱼ e^{… − bᵢ}| above which a row is recomputed in two passes, by dtype. Within it no term
#: overflows, and terms below the smallest normal number (e^{−87} in float32, e^{−708} in float64),
#: which the one pass drops, weigh at most M·e^{−87 + 40} (float32) or M·e^{−708 + 300} (float64)
#: relative to the sum: below rounding for any M that fits in memory.
TRUSTED_LOG_RANGE = {torch.float32: 40.0, torch.float64: 300.0, torch.float16: 4.0, torch.bfloat16: 40.0}


def shifted_logsumexp(queries, keys, log_weights, bound, *, scale: float, block_size=None):
    r"""LSEᵢ = log Σⱼ exp(ℓⱼ − scale·|qᵢ − kⱼ|²) in one pass, shifted row by row by ``bound`` (module docstring).

    .. math:: \mathrm{LSE}_i = b_i + \log\sum_j e^{\ell_j - s|q_i - k_j|^2 - b_i}

    queries (R, N, d), keys (R or 1, M, d), log_weights (R or 1, M) (−inf excludes a point),
    bound (R, N) finite: ideally close to LSE (e.g. −f/ε of the previous Sinkhorn sweep, MATH.md §7);
    scale > 0. Rows whose shifted sum leaves e^{±TRUSTED_LOG_RANGE} fall back to the two-pass
    :func:`~measureflow.reductions.softmax_average`. Returns LSE (R, N). No autograd history is recorded.
    """
    fn = "shifted_logsumexp"
    scale = as_real(scale, f"{fn}: scale")
    if scale <= 0:
        raise StateError(f"{fn}: scale must be > 0; received {scale}")
    block = as_block_size(fn, block_size)
    q, _, k, _ = as_point_sets(fn, queries, keys, ("queries", "keys"), "have", "give both in one space", "one key")
    M = k.shape[1]
    lw, _ = as_weights(fn, log_weights, M, name="log_weights")
    if lw is None:
        raise StateError(f"{fn}: log_weights are required (shape (R, M) or (M,))")
    R = check_together(fn, {"queries": q, "keys": k, "log_weights": lw, "bound": bound})
    N, d = q.shape[1], q.shape[2]
    if bound.shape[-1] != N:
        raise StateError(f"{fn}: bound must have shape (R, N) = ({R}, {N}); received {tuple(bound.shape)}")
    with torch.no_grad():
        floor = -torch.finfo(q.dtype).max / 16  # as in softmax_average: −inf stays finite, exp of it is 0
        lw = lw.clamp(min=floor).expand(R, M)
        q = q.expand(R, N, d)
        k = k.expand(R, M, d)
        shift = bound.reshape(-1, N).expand(R, N)
        total = None
        poly = q.dtype == torch.float32 and q.device.type == "cpu"
        key = ("shifted_lse", d, poly)
        if fused.use_fused(q.device, d, R * N * M, key):
            total = _fused_sum(key, scale, q, k, lw, shift, block)
        if total is None:
            total = _eager_sum(scale, q, k, lw, shift, block)
        log_total = torch.log(total)
        lse = shift + log_total
        # also NaN, ±inf (a zero sum or an overflow), and a bound that is no number at all
        redo = ~(log_total.abs() <= TRUSTED_LOG_RANGE.get(q.dtype, 40.0)) | ~torch.isfinite(shift)
        if bool(redo.any()):
            lse = lse.clone()
            for r in range(R):  # only the rows the bound missed; none once the potentials settle
                rows = redo[r].nonzero().squeeze(1)
                if rows.numel():
                    _, again = softmax_average(q[r, rows], k[r], log_weights=lw[r], scale=scale,
                                               return_logsumexp=True, block_size=block_size)
                    lse[r, rows] = again
    return lse


def _fused_sum(key, scale, q, k, lw, shift, block):
    R, N, _ = q.shape
    M = k.shape[1]
    root = math.sqrt(scale)
    qs = (q * root).transpose(1, 2)
    ks = (k * root).transpose(1, 2)
    fn = fused.compiled_kernel(key[0], key[1:], make_fused_shifted_sum)
    total = torch.empty(R, N, dtype=q.dtype, device=q.device)
    row_spans, col_spans = fused.fused_spans(N, M, block)
    for r in range(R):
        blocks = [(fused.packed(ks[r, :, cols]), fused.packed(lw[r, cols])) for cols in col_spans]
        for rows in row_spans:
            qr = fused.packed(qs[r, :, rows])
            br = fused.packed(shift[r, rows])
            acc = torch.zeros(rows.stop - rows.start, dtype=q.dtype, device=q.device)
            for kb, lb in blocks:
                part = fused.run(fn, qr, kb, lb, br)
                if part is None:
                    return None
                acc += part
            total[r, rows] = acc
    return total


def _eager_sum(scale, q, k, lw, shift, block):
    R, N, d = q.shape
    M = k.shape[1]
    direct = d <= settings.config.direct_max_dim
    if direct:
        root = math.sqrt(scale)
        qt = (q * root).transpose(1, 2).contiguous()
        kt = (k * root).transpose(1, 2).contiguous()
    else:
        # −s|q − k|² = 2s⟨q, k⟩ − s|k|² − s|q|² after centring on the keys' mean (as softmax_average does);
        # the row term joins the shift.
        centre = k.mean(dim=1, keepdim=True)
        qc, kc = q - centre, k - centre
        qa = qc * (2.0 * scale)
        kc_t = kc.transpose(1, 2)
        lw = lw - scale * (kc * kc).sum(-1)
        shift = shift + scale * (qc * qc).sum(-1)
    bn, bm = block_shape(block, R, N, M, q.element_size(), q.device, temporaries=2)
    total = torch.zeros(R, N, dtype=q.dtype, device=q.device)
    buf = torch.empty(R, bn, bm, dtype=q.dtype, device=q.device)
    tmp = torch.empty(R, bn, bm, dtype=q.dtype, device=q.device) if direct else None
    for i in range(0, N, bn):
        rows = slice(i, min(i + bn, N))
        nb = rows.stop - rows.start
        for j in range(0, M, bm):
            cols = slice(j, min(j + bm, M))
            s = buf[:, :nb, : cols.stop - cols.start]
            if direct:
                sqdist_direct(qt[:, :, rows], kt[:, :, cols], s, tmp[:, :nb, : cols.stop - cols.start])
                s.neg_()
            else:
                torch.bmm(qa[:, rows], kc_t[:, :, cols], out=s)
            s.add_(lw[:, None, cols]).sub_(shift[:, rows, None]).exp_()
            total[:, rows] += s.sum(-1)
    return total
