"""softmax_average on torch's fused CPU attention kernel.

The flash-attention loop behind ``torch.nn.functional.scaled_dot_product_attention`` on the CPU is
the same streamed online softmax as the blocked path, with its blocks held in cache, and returns the
log-sum-exp too: bilinear scores run on it directly, squared-distance scores in float64 through
−s|q − k|² = 2s⟨q, k⟩ − s|k|² − s|q|² (benchmarks/README.md, "Attention"). A refusal warns once and
leaves every later call of the process to the blocked paths (:data:`failure`).
"""

from __future__ import annotations

import math
import warnings

import torch

__all__ = ["failure", "attention_op", "usable", "bilinear_softmax", "sqdist_softmax"]

#: Why torch's kernel refused a call (it is not tried again in this process), or None.
failure: str | None = None


def attention_op():
    """torch's fused CPU attention kernel (output and log-sum-exp), or None where this torch has none."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def usable(q: torch.Tensor, block) -> bool:
    """Bilinear scores on the CPU in float32/float64, no explicit blocks, the kernel present and not failed."""
    return (
        block is None
        and q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.float64)
        and failure is None
        and attention_op() is not None
    )


def bilinear_softmax(scale, q, k, v, lw):
    """Bilinear softmax average and LSE through torch's fused CPU attention kernel.

    The kernel computes softmax(scale·q kᵀ + mask)·v per (batch, head) with a streaming maximum and
    returns the log-sum-exp of the masked scores; replicas are its batch axis (one head). ``lw`` =
    None means uniform weights: no mask, and LSE − log M is the log-mean-exp. The kernel wants one
    head width for q, k and v, so the narrower side is zero-padded (the scores and the averages of
    the real channels are unchanged). Returns None after warning once when the kernel refuses the
    call, and the blocked paths serve this and every later call.
    """
    global failure
    R, N, d = q.shape
    M, C = k.shape[1], v.shape[2]
    width = max(d, C, 1)

    def head(t):
        if t.shape[2] == width:
            return t.contiguous()[:, None]
        return torch.nn.functional.pad(t, (0, width - t.shape[2]))[:, None]

    mask = None if lw is None else lw[:, None, None, :]
    try:
        out, lse = attention_op()(head(q), head(k), head(v), attn_mask=mask, scale=scale)
    except Exception as exc:  # noqa: BLE001 - any refusal means "use the blocked paths"
        failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        warnings.warn(
            "measureflow.reductions: torch's CPU attention kernel refused a bilinear softmax_average "
            f"({failure}); using the blocked path from now on",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    avg = out[:, 0, :, :C].contiguous()
    lse = lse[:, 0].to(q.dtype)
    if lw is None:
        lse = lse - math.log(M)
    return avg, lse


def sqdist_softmax(scale, q, k, v, lw):
    """The squared-distance softmax through the bilinear kernel (float64 only).

    −s|q − k|² = 2s⟨q, k⟩ − s|k|² − s|q|²: the key term joins the log-weights, the query term is
    constant along each row, so the average is unchanged and LSE shifts by −s|q|². Both sets are
    first centred on the keys' mean (differences are unchanged), which bounds the cancellation by
    s·|x − c|². In float64 the result stays within about 1e-13 of the direct differences; in
    float32 the cancellation costs a decimal digit, so float32 keeps the direct path.
    """
    centre = k.mean(dim=1, keepdim=True)
    qc, kc = q - centre, k - centre
    out = bilinear_softmax(2.0 * scale, qc, kc, v, lw - scale * (kc * kc).sum(-1))
    if out is None:
        return None
    avg, lse = out
    return avg, lse - scale * (qc * qc).sum(-1)


