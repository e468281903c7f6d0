"""Softmax-weighted averages with a streaming log-sum-exp: :func:`softmax_average` and its paths.

Σⱼ softmaxⱼ(s(qᵢ, kⱼ) + log wⱼ) vⱼ (DESIGN.md, "The numerical spine"): on torch's CPU attention kernel
(:mod:`.cpu_attention`) where it serves, the fused path (:mod:`.fused`) when compiling pays, the
blocked eager path otherwise. Every path carries a running maximum across column blocks and rescales
the partial sums, so no exponent overflows or underflows wholesale.
"""

from __future__ import annotations

import math

import torch

from ..errors import StateError
from . import cpu_attention, fused, settings
from .arguments import (
    as_block_size,
    as_point_sets,
    as_real,
    as_values,
    as_weights,
    check_probability,
    check_together,
    checks_enabled,
)
from .blocking import block_shape, sqdist_direct
from .fused_kernels import make_fused_softmax

__all__ = ["softmax_average"]

_SCORES = ("sqdist", "bilinear")


def softmax_average(
    queries,
    keys,
    values=None,
    weights=None,
    *,
    log_weights=None,
    score: str = "sqdist",
    scale: float = 1.0,
    return_logsumexp: bool = False,
    block_size: int | tuple[int, int] | None = None,
):
    r"""Softmax-weighted averages with a streaming log-sum-exp (DESIGN.md, numerical spine).

    .. math::
        \mathrm{out}_i = \sum_j \frac{e^{s(q_i, k_j) + \ell_j}}{\sum_{j'} e^{s(q_i, k_{j'}) + \ell_{j'}}}\,v_j,
        \qquad \mathrm{LSE}_i = \log\sum_j e^{s(q_i, k_j) + \ell_j},

    with s = −scale·|q − k|² (``score="sqdist"``) or scale·⟨q, k⟩ (``"bilinear"``; apply the Q and
    K matrices beforehand) and ℓⱼ = log wⱼ or the given ``log_weights`` (any per-j additive term,
    e.g. (gⱼ − …)/ε of log-domain Sinkhorn, where fᵢ = −ε·LSEᵢ). The running maximum mᵢ is carried
    across column blocks and the partial sums rescaled by e^{m_old − m_new}, so no exponent
    overflows or underflows wholesale, whatever the scale (MATH.md §1.1: "compute rᵢⱼ with
    log-sum-exp").

    Parameters
    ----------
    queries, keys:
        (R, N, d) / (R, M, d), or 2-D for one replica (broadcast over R).
    values:
        (R, M, k) or (M, k); ``None`` averages the keys themselves (posterior mean).
    weights, log_weights:
        At most one: (R, M) or (M,) weights — finite, non-negative, summing to one per replica
        (MATH.md §0; a zero excludes a point) — or any log-weights (−inf excludes a point; no
        normalisation asked, they enter LSE as given). Neither: uniform 1/M (so LSE is a log-mean-exp).
    return_logsumexp:
        Also return LSE, shape (R, N).
    block_size:
        Rows/columns per block of the blocked paths; ``None`` sizes them from :data:`config`.

    Returns
    -------
    out (R, N, k) [and LSE (R, N)], with a leading R axis unless every argument was given without one.
    A row whose log-weights are all −inf has no defined average.

    ``score="bilinear"`` in float32/float64 on the CPU with ``block_size=None`` runs on torch's own
    fused CPU attention kernel (the flash-attention loop behind
    ``torch.nn.functional.scaled_dot_product_attention``, which also returns the log-sum-exp): the
    log-weights enter as an additive mask broadcast over the queries (never an N×M tensor), queries
    and keys are zero-padded to the values' width where they differ (⟨q, k⟩ is unchanged). It is the
    same streamed online softmax as the blocked path, with its blocks held in cache, and measured
    1.2–1.9× faster (benchmarks/README.md, "Attention"). ``score="sqdist"`` with scale > 0 in float64
    takes the same kernel through −s|q − k|² = 2s⟨q, k⟩ − s|k|² − s|q|² (keys' term in the log-weights,
    queries' term a shift of LSE; both sets centred on the keys' mean first), within about 1e-13 of the
    direct differences; float32 keeps the direct path, which is a decimal digit more accurate there.
    Giving ``block_size`` selects the blocked paths.
    """
    fn = "softmax_average"
    if score not in _SCORES:
        raise StateError(f"{fn}: unknown score {score!r}; known scores are 'sqdist' and 'bilinear'")
    scale = as_real(scale, f"{fn}: scale")
    if weights is not None and log_weights is not None:
        raise StateError(f"{fn}: pass weights or log_weights, not both")
    block = as_block_size(fn, block_size)
    q, bq, k, bk = as_point_sets(fn, queries, keys, ("queries", "keys"), "have",
                                 "apply the query/key maps so both live in the same space", "one key")
    M = k.shape[1]
    w, bw = as_weights(fn, weights, M)
    lw, bl = as_weights(fn, log_weights, M, name="log_weights")
    v, bv = as_values(fn, values, M)
    named = {"queries": q, "keys": k}
    for n, t in (("weights", w), ("log_weights", lw), ("values", v)):
        if t is not None:
            named[n] = t
    R = check_together(fn, named)
    batched = bq or bk or bw or bl or bv
    N, d = q.shape[1], q.shape[2]
    if w is not None:
        check_probability(fn, w, "or pass log_weights for an unnormalised per-point term")
    if lw is not None and checks_enabled(lw) and bool(torch.isnan(lw).any()):
        raise StateError(f"{fn}: log_weights contain NaN; use −inf to exclude a point")

    with torch.no_grad():
        uniform = lw is None and w is None
        if lw is None:
            lw = torch.log(w) if w is not None else torch.full((1, M), -math.log(M), dtype=q.dtype, device=q.device)
        # A finite floor for −inf keeps every running maximum finite (no inf − inf); exp of it is 0.
        floor = -torch.finfo(q.dtype).max / 16
        lw = lw.clamp(min=floor).expand(R, M)
        q = q.expand(R, N, d)
        k = k.expand(R, M, d)
        v = k if v is None else v.expand(R, M, v.shape[2])
        out = None
        if score == "bilinear" and cpu_attention.usable(q, block):
            out = cpu_attention.bilinear_softmax(scale, q, k, v, None if uniform else lw)
        elif score == "sqdist" and scale > 0 and q.dtype == torch.float64 and cpu_attention.usable(q, block):
            out = cpu_attention.sqdist_softmax(scale, q, k, v, lw)
        poly = q.dtype == torch.float32 and q.device.type == "cpu"
        key = ("softmax", score, d, v.shape[2], scale < 0 and score == "sqdist", poly)
        if out is None and fused.use_fused(q.device, d, R * N * M, key):
            out = _fused_softmax(key, scale, q, k, v, lw, block)
        if out is None:
            out = _eager_softmax(score, scale, q, k, v, lw, block)
        avg, lse = out

    if not batched:
        avg, lse = avg[0], lse[0]
    return (avg, lse) if return_logsumexp else avg


def _fused_softmax(key, scale, q, k, v, lw, block):
    _, score, d, n_values, negate, poly = key
    R, N, _ = q.shape
    M = k.shape[1]
    if score == "sqdist":
        # s = −scale·|q − k|² = ∓|√|scale|·q − √|scale|·k|²: the kernel negates unless scale < 0
        root = math.sqrt(abs(scale))
        qs, ks = q * root, k * root
    else:
        qs, ks = q * scale, k
    qs = qs.transpose(1, 2)
    ks = ks.transpose(1, 2)
    vt = v.transpose(1, 2)
    fn = fused.compiled_kernel(key[0], key[1:], make_fused_softmax)
    avg = torch.empty(R, N, n_values, dtype=q.dtype, device=q.device)
    lse = torch.empty(R, N, dtype=q.dtype, device=q.device)
    row_spans, col_spans = fused.fused_spans(N, M, block)
    for r in range(R):
        blocks = [
            (fused.packed(ks[r, :, cols]), fused.packed(lw[r, cols]), fused.packed(vt[r, :, cols]))
            for cols in col_spans
        ]
        for rows in row_spans:
            nb = rows.stop - rows.start
            qr = fused.packed(qs[r, :, rows])
            m = torch.full((nb,), -math.inf, dtype=q.dtype, device=q.device)
            acc = torch.zeros(nb, 1 + n_values, dtype=q.dtype, device=q.device)
            for kb, lb, vb in blocks:
                res = fused.run(fn, qr, kb, lb, vb, m, acc)
                if res is None:
                    return None
                m, acc = res
            avg[r, rows] = acc[:, 1:] / acc[:, :1]
            lse[r, rows] = m + torch.log(acc[:, 0])
    return avg, lse


def _eager_softmax(score, scale, q, k, v, lw, block):
    R, N, d = q.shape
    M = k.shape[1]
    direct = score == "sqdist" and d <= settings.config.direct_max_dim
    row_term = None
    if direct:
        root = math.sqrt(abs(scale))
        sign = 1.0 if scale < 0 else -1.0
        qt = (q * root).transpose(1, 2).contiguous()
        kt = (k * root).transpose(1, 2).contiguous()
    elif score == "sqdist":
        # −scale|q − k|² = 2 scale⟨q, k⟩ − scale|k|² − scale|q|²; the last term is constant in j, so
        # it cancels in the softmax and only returns in the log-sum-exp.
        centre = k.mean(dim=1, keepdim=True)
        qc, kc = q - centre, k - centre
        qa = torch.cat([qc * (2.0 * scale), torch.ones_like(qc[..., :1])], dim=-1)
        ka = torch.cat([kc, lw[..., None] - scale * (kc * kc).sum(-1, keepdim=True)], dim=-1)
        row_term = -scale * (qc * qc).sum(-1)
    else:
        qa = torch.cat([q * scale, torch.ones_like(q[..., :1])], dim=-1)
        ka = torch.cat([k, lw[..., None]], dim=-1)
    ones_v = torch.cat([torch.ones_like(v[..., :1]), v], dim=-1)  # (R, M, 1 + C)
    n_values = v.shape[2]
    bn, bm = block_shape(block, R, N, M, q.element_size(), q.device, temporaries=3)
    avg = torch.empty(R, N, n_values, dtype=q.dtype, device=q.device)
    lse = torch.empty(R, N, dtype=q.dtype, device=q.device)
    buf = torch.empty(R, bn, bm, dtype=q.dtype, device=q.device)
    tmp = torch.empty(R, bn, bm, dtype=q.dtype, device=q.device) if direct else None
    for i in range(0, N, bn):
        rows = slice(i, min(i + bn, N))
        nb = rows.stop - rows.start
        m = torch.full((R, nb), -math.inf, dtype=q.dtype, device=q.device)
        acc = torch.zeros(R, nb, 1 + n_values, dtype=q.dtype, device=q.device)
        for j in range(0, M, bm):
            cols = slice(j, min(j + bm, M))
            mb = cols.stop - cols.start
            s = buf[:, :nb, :mb]
            if direct:
                sqdist_direct(qt[:, :, rows], kt[:, :, cols], s, tmp[:, :nb, :mb])
                if sign < 0:
                    s.neg_()
                s.add_(lw[:, None, cols])
            else:
                torch.bmm(qa[:, rows], ka[:, cols].transpose(1, 2), out=s)
            m_new = torch.maximum(m, s.amax(dim=-1))
            s.sub_(m_new[..., None]).exp_()
            acc.mul_(torch.exp(m - m_new)[..., None]).baddbmm_(s, ones_v[:, cols])
            m = m_new
        avg[:, rows] = acc[..., 1:] / acc[..., :1]
        lse[:, rows] = m + torch.log(acc[..., 0])
    if row_term is not None:
        lse = lse + row_term
    return avg, lse
