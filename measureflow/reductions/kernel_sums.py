"""Kernel sums against a weighted empirical measure: :func:`kernel_sum` and its three paths.

Sᵢ = Σⱼ wⱼ k(xᵢ, yⱼ) vⱼ and Gᵢ = Σⱼ wⱼ ∇ₓk(xᵢ, yⱼ) (DESIGN.md, "The numerical spine"): the fused
path (:mod:`.fused`) for the named radial kernels when compiling pays, the blocked eager path
otherwise, closed forms through moments for the polynomial kernels, and blocked autograd for a
callable kernel.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import ShapeError, StateError
from . import fused, settings
from .arguments import as_block_size, as_point_sets, as_real, as_values, as_weights, check_probability, check_together
from .blocking import block_shape, sqdist_direct
from .fused_kernels import make_fused_kernel_sum

__all__ = ["kernel_sum", "KERNELS"]

#: Named kernels of :func:`kernel_sum`, with r = |x − y| and h the bandwidth.
KERNELS: dict[str, str] = {
    "gaussian": "exp(−r²/(2h²))",
    "laplace": "exp(−r/h)",
    "energy": "−r (bandwidth unused; ∇ₓ = −(x − y)/r, 0 at x = y)",
    "imq": "(1 + r²/h²)^(−1/2)",
    "poly2": "⟨x, y⟩² (bandwidth unused; closed form through second moments)",
    "poly2_affine": "(1 + ⟨x, y⟩)² (bandwidth unused; closed form through moments)",
}

_SINGULAR = ("laplace", "energy")
_POLY = ("poly2", "poly2_affine")


def kernel_sum(
    x,
    y,
    values=None,
    weights=None,
    *,
    kernel: str | Callable = "gaussian",
    bandwidth: float = 1.0,
    gradient: bool | str = False,
    block_size: int | tuple[int, int] | None = None,
):
    r"""Kernel sums against a weighted empirical measure Σⱼ wⱼ δ_{yⱼ} (DESIGN.md, numerical spine).

    .. math::  S_i = \sum_j w_j\,k(x_i, y_j)\,v_j, \qquad G_i = \sum_j w_j\,\nabla_x k(x_i, y_j).

    S with vⱼ = 1 is the kernel mean embedding of the source measure evaluated at xᵢ, G its gradient
    (MMD and SVGD fields, MATH.md §6; kernel density estimates).

    Parameters
    ----------
    x:
        Query points, shape (R, N, d) or (N, d).
    y:
        Source points, shape (R, M, d) or (M, d); a single set (R = 1) is shared by every replica.
    values:
        Optional (R, M, k) or (M, k) values vⱼ; ``None`` means vⱼ = 1. Unnormalised per-point
        factors belong here, not in ``weights``.
    weights:
        (R, M) or (M,) weights wⱼ: finite, non-negative, summing to one in each replica
        (MATH.md §0; checked, see :attr:`ReductionConfig.check_weights`). ``None`` means uniform 1/M.
    kernel:
        A name of :data:`KERNELS` (r = |x − y|, h = ``bandwidth``): ``"gaussian"`` exp(−r²/(2h²)),
        ``"laplace"`` exp(−r/h), ``"energy"`` −r (energy distance; ∇ₓ = −(x − y)/r, 0 at x = y),
        ``"imq"`` (1 + r²/h²)^(−1/2), ``"poly2"`` ⟨x, y⟩², ``"poly2_affine"`` (1 + ⟨x, y⟩)² (the last two
        through moments, e.g. Σⱼ wⱼ⟨x, yⱼ⟩² = xᵀ(Σⱼ wⱼ yⱼyⱼᵀ)x, with no N×M work at all).
        Or a callable ``f(sqdist) -> k`` of the squared distance |x − y|², applied elementwise
        (bandwidth not applied: close over it); its gradient comes from autograd inside each block.
    bandwidth:
        h > 0 (unused by "energy", "poly2", "poly2_affine" and callables).
    gradient:
        ``False``: return S (shape (R, N, k), or (R, N) when ``values`` is None);
        ``True``: return G (shape (R, N, d); ``values`` must be None);
        ``"both"``: return (S, G) from one pass (the kernel is evaluated once per pair).
    block_size:
        Rows/columns per block (int or (rows, cols)); ``None`` sizes blocks from
        :data:`config` (memory budget, cache size).

    Returns
    -------
    Tensors on the inputs' device and dtype, with a leading R axis unless every argument was given
    without one.
    """
    fn = "kernel_sum"
    if not (gradient is True or gradient is False or gradient == "both"):
        raise StateError(f"{fn}: gradient must be False, True or 'both'; received {gradient!r}")
    want_value = gradient is not True
    want_grad = gradient is not False
    if callable(kernel) and not isinstance(kernel, str):
        name = None
    elif isinstance(kernel, str) and kernel in KERNELS:
        name = kernel
    else:
        known = ", ".join(repr(k) for k in KERNELS)
        raise StateError(
            f"{fn}: unknown kernel {kernel!r}; known kernels are {known}, or pass a callable f(sqdist) -> k"
        )
    h = as_real(bandwidth, f"{fn}: bandwidth")
    if h <= 0:
        raise StateError(f"{fn}: bandwidth must be positive; received {h}")
    block = as_block_size(fn, block_size)
    x, bx, y, by = as_point_sets(fn, x, y, ("x", "y"), "has", "both point sets must live in the same space",
                                 "one source point")
    M = y.shape[1]
    w, bw = as_weights(fn, weights, M)
    v, bv = as_values(fn, values, M)
    if v is not None and gradient is True:
        raise StateError(f"{fn}: gradient=True returns Σⱼ wⱼ ∇ₓk(xᵢ, yⱼ) and takes no values; pass values=None")
    if v is not None and gradient == "both":
        raise StateError(f"{fn}: gradient='both' takes no values; call kernel_sum twice for weighted values")
    named = {"x": x, "y": y}
    if w is not None:
        named["weights"] = w
    if v is not None:
        named["values"] = v
    R = check_together(fn, named)
    batched = bx or by or bw or bv
    N, d = x.shape[1], x.shape[2]
    if w is not None:
        check_probability(fn, w, "or put unnormalised per-point factors into values")

    if w is None:
        w = torch.full((1, M), 1.0 / M, dtype=x.dtype, device=x.device)
    x = x.expand(R, N, d)
    y = y.expand(R, M, d)
    w = w.expand(R, M)
    if v is not None:
        v = v.expand(R, M, v.shape[2])

    with torch.no_grad():
        if name in _POLY:
            value, grad = _poly_sum(name, x, y, v, w, want_value, want_grad)
        elif name is None:
            value, grad = _callable_sum(kernel, x, y, v, w, want_value, want_grad, block)
        else:
            out = None
            poly = x.dtype == torch.float32 and x.device.type == "cpu"
            n_values = 0 if v is None else v.shape[2]
            key = ("kernel_sum", name, d, n_values, want_grad, poly)
            if fused.use_fused(x.device, d, R * N * M, key):
                out = _fused_kernel_sum(key, h, x, y, v, w, want_value, want_grad, block)
            if out is None:
                out = _eager_kernel_sum(name, h, x, y, v, w, want_value, want_grad, block)
            value, grad = out

    if value is not None and v is None:
        value = value[..., 0]
    if not batched:
        value = value[0] if value is not None else None
        grad = grad[0] if grad is not None else None
    if gradient is True:
        return grad
    if gradient == "both":
        return value, grad
    return value


def _scaled_points(name: str, h: float, x, y):
    """Points in the kernel's natural units and the factor turning Σ g·Δ into the gradient.

    gaussian: x/(h√2), so k = exp(−|Δ|²) and ∇ₓk = −(√2/h)·k·Δ; laplace and imq: x/h, so
    ∇ₓk = −(1/h)·(k/r)·Δ resp. −(1/h)·k³·Δ; energy: unscaled, ∇ₓ(−r) = −Δ/r.
    """
    if name == "gaussian":
        s = 1.0 / (h * math.sqrt(2.0))
        return x * s, y * s, -math.sqrt(2.0) / h
    if name == "energy":
        return x, y, -1.0
    return x / h, y / h, -1.0 / h  # laplace, imq


def _value_channels(v, w):
    """(R, M, C) weighted value channels: wⱼ vⱼ, or wⱼ alone."""
    return w[..., None] if v is None else v * w[..., None]


def _fused_kernel_sum(key, h, x, y, v, w, want_value, want_grad, block):
    _, name, d, n_values, grad_flag, poly = key
    R, N, _ = x.shape
    M = y.shape[1]
    xs, ys, factor = _scaled_points(name, h, x, y)
    xs = xs.transpose(1, 2)
    ys = ys.transpose(1, 2)
    vt = v.transpose(1, 2) if v is not None else None
    fn = fused.compiled_kernel(key[0], key[1:], make_fused_kernel_sum)
    width = max(1, n_values) + (d if want_grad else 0)
    out = torch.empty(R, N, width, dtype=x.dtype, device=x.device)
    row_spans, col_spans = fused.fused_spans(N, M, block)
    # One replica and one contiguous block per call: every call then has the same layout (only the
    # sizes differ, and those are symbolic), so the compiled kernel is reused, never re-specialised.
    for r in range(R):
        blocks = [
            (
                fused.packed(ys[r, :, cols]),
                fused.packed(vt[r, :, cols]) if vt is not None else x.new_empty(0, cols.stop - cols.start),
                fused.packed(w[r, cols]),
            )
            for cols in col_spans
        ]
        for rows in row_spans:
            xr = fused.packed(xs[r, :, rows])
            acc = torch.zeros(rows.stop - rows.start, width, dtype=x.dtype, device=x.device)
            for yb, vb, wb in blocks:
                res = fused.run(fn, xr, yb, vb, wb, acc)
                if res is None:
                    return None
                if res.ndim == 1:
                    acc[:, 0] += res
                else:
                    acc = res
            out[r, rows] = acc
    nv = max(1, n_values)
    value = out[..., :nv] if want_value else None
    grad = out[..., nv:] * factor if want_grad else None
    return value, grad



def _gemm_operands(x, y, sign: float = 1.0):
    """Augmented operands with A·Bᵀ = sign·(|x|² + |y|² − 2⟨x, y⟩) (points already centred)."""
    one_x = torch.full_like(x[..., :1], sign)
    one_y = torch.ones_like(y[..., :1])
    xa = torch.cat([x * (-2.0 * sign), sign * (x * x).sum(-1, keepdim=True), one_x], dim=-1)
    ya = torch.cat([y, one_y, (y * y).sum(-1, keepdim=True)], dim=-1)
    return xa, ya


def _eager_kernel_sum(name, h, x, y, v, w, want_value, want_grad, block):
    R, N, d = x.shape
    M = y.shape[1]
    xs, ys, factor = _scaled_points(name, h, x, y)
    singular = name in _SINGULAR
    direct = singular or d <= settings.config.direct_max_dim
    # Centre both sets on the sources' mean (differences are unchanged): it bounds the GEMM
    # identity's error and the cancellation in xᵢ Σ g − Σ g y below by |x − c| instead of |x|.
    centre = ys.mean(dim=1, keepdim=True)
    xs, ys = xs - centre, ys - centre
    if not direct:
        # gaussian: the GEMM yields the exponent −r² itself (no negation pass); rounding can make it
        # +O(ε·|x − c|²) for coincident points, i.e. k = 1 + O(ε) — the same error the identity has anyway
        xa, ya = _gemm_operands(xs, ys, -1.0 if name == "gaussian" else 1.0)
    # coordinate-major copies for the explicit differences (the GEMM path needs none)
    xt = xs.transpose(1, 2).contiguous() if direct else None
    yt = ys.transpose(1, 2).contiguous() if direct else None
    smooth_grad = want_grad and not singular
    if smooth_grad:
        # Σⱼ gᵢⱼ(xᵢ − yⱼ) = xᵢ Σⱼ gᵢⱼ − Σⱼ gᵢⱼ yⱼ: one GEMM instead of d passes (smooth kernels only).
        wy = torch.cat([w[..., None], w[..., None] * ys], dim=-1)
    # gaussian without values: Σⱼ wⱼ kᵢⱼ is column 0 of that GEMM, no second GEMM needed
    shared = smooth_grad and name == "gaussian" and v is None
    wv = _value_channels(v, w) if want_value and not shared else None
    itemsize = x.element_size()
    bn, bm = block_shape(block, R, N, M, itemsize, x.device, temporaries=3)
    n_values = 1 if v is None else v.shape[2]
    value = torch.empty(R, N, n_values, dtype=x.dtype, device=x.device) if want_value else None
    grad = torch.empty(R, N, d, dtype=x.dtype, device=x.device) if want_grad else None
    buf = torch.empty(R, bn, bm, dtype=x.dtype, device=x.device)
    tmp = torch.empty(R, bn, bm, dtype=x.dtype, device=x.device) if direct else None
    aux = torch.empty(R, bn, bm, dtype=x.dtype, device=x.device) if singular and want_grad else None
    for i in range(0, N, bn):
        rows = slice(i, min(i + bn, N))
        nb = rows.stop - rows.start
        acc_v = torch.zeros(R, nb, n_values, dtype=x.dtype, device=x.device) if wv is not None else None
        acc_g = torch.zeros(R, nb, d, dtype=x.dtype, device=x.device) if want_grad and singular else None
        acc_s = torch.zeros(R, nb, d + 1, dtype=x.dtype, device=x.device) if smooth_grad else None
        for j in range(0, M, bm):
            cols = slice(j, min(j + bm, M))
            mb = cols.stop - cols.start
            k = buf[:, :nb, :mb]
            t = tmp[:, :nb, :mb] if tmp is not None else None
            # turn the block into the kernel in place
            if direct:
                sqdist_direct(xt[:, :, rows], yt[:, :, cols], k, t)  # r² (natural units)
                if name == "gaussian":
                    k.neg_().exp_()
                elif name == "imq":
                    k.add_(1.0).rsqrt_()
                else:
                    k.sqrt_()
                    if want_grad:
                        r = aux[:, :nb, :mb]
                        r.copy_(k)
                    if name == "laplace":
                        k.neg_().exp_()
                    else:
                        k.neg_()
            else:
                torch.bmm(xa[:, rows], ya[:, cols].transpose(1, 2), out=k)
                if name == "gaussian":
                    k.exp_()
                else:  # imq
                    k.clamp_(min=0.0).add_(1.0).rsqrt_()
            if wv is not None:
                acc_v.baddbmm_(k, wv[:, cols])
            if not want_grad:
                continue
            if name == "gaussian":
                acc_s.baddbmm_(k, wy[:, cols])
            elif name == "imq":
                acc_s.baddbmm_(k.pow_(3), wy[:, cols])
            else:
                # g = k/r (laplace) or 1/r (energy: ∇ₓ(−r) = −Δ/r, the sign is in factor), 0 at r = 0
                g = k
                if name == "laplace":
                    g.div_(r)
                else:
                    torch.reciprocal(r, out=g)
                g.masked_fill_(r == 0, 0.0).mul_(w[:, None, cols])
                for c in range(d):
                    torch.sub(xt[:, c, rows, None], yt[:, c, None, cols], out=t)
                    acc_g[..., c] += t.mul_(g).sum(-1)
        if want_value:
            value[:, rows] = acc_s[..., :1] if shared else acc_v
        if want_grad:
            if smooth_grad:
                acc_g = xs[:, rows] * acc_s[..., :1] - acc_s[..., 1:]
            grad[:, rows] = acc_g * factor
    return value, grad


def _poly_sum(name, x, y, v, w, want_value, want_grad):
    """poly2 / poly2_affine through moments: (1 + ⟨x, y⟩)² = ⟨x̃, ỹ⟩² with x̃ = (x, 1)."""
    d = x.shape[2]
    if name == "poly2_affine":
        x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
        y = torch.cat([y, torch.ones_like(y[..., :1])], dim=-1)
    value = grad = None
    if want_value:
        wv = _value_channels(v, w)  # (R, M, C)
        # Σⱼ wⱼ vⱼ꜀ yⱼyⱼᵀ for each channel c: (R, C, D, D)
        moments = torch.einsum("rmc,rma,rmb->rcab", wv, y, y)
        value = torch.einsum("rna,rcab,rnb->rnc", x, moments, x)
    if want_grad:
        second = torch.einsum("rm,rma,rmb->rab", w, y, y)
        grad = 2.0 * torch.einsum("rab,rnb->rna", second, x)[..., :d]
    return value, grad


def _callable_sum(f, x, y, v, w, want_value, want_grad, block):
    R, N, d = x.shape
    M = y.shape[1]
    xt = x.transpose(1, 2).contiguous()
    yt = y.transpose(1, 2).contiguous()
    wv = _value_channels(v, w) if want_value else None
    bn, bm = block_shape(block, R, N, M, x.element_size(), x.device, temporaries=6)
    n_values = wv.shape[-1] if want_value else 0
    value = torch.empty(R, N, n_values, dtype=x.dtype, device=x.device) if want_value else None
    grad = torch.empty(R, N, d, dtype=x.dtype, device=x.device) if want_grad else None
    for i in range(0, N, bn):
        rows = slice(i, min(i + bn, N))
        nb = rows.stop - rows.start
        acc_v = torch.zeros(R, nb, n_values, dtype=x.dtype, device=x.device) if want_value else None
        acc_g = torch.zeros(R, nb, d, dtype=x.dtype, device=x.device) if want_grad else None
        for j in range(0, M, bm):
            cols = slice(j, min(j + bm, M))
            mb = cols.stop - cols.start
            r2 = sqdist_direct(
                xt[:, :, rows], yt[:, :, cols],
                torch.empty(R, nb, mb, dtype=x.dtype, device=x.device),
                torch.empty(R, nb, mb, dtype=x.dtype, device=x.device),
            )
            if want_grad:
                with torch.enable_grad():
                    r2.requires_grad_(True)
                    k = _call_kernel(f, r2)
                    # a kernel that ignores its argument (a constant) has f' = 0 and no graph at all
                    dk = None
                    if k.requires_grad:
                        (dk,) = torch.autograd.grad(
                            k, r2, grad_outputs=w[:, None, cols].expand_as(k), allow_unused=True
                        )
                k = k.detach()
                if dk is not None:
                    # ∇ₓ f(|x − y|²) = 2 f'(r²)(x − y)
                    for c in range(d):
                        diff = xt[:, c, rows, None] - yt[:, c, None, cols]
                        acc_g[..., c] += (dk * diff).sum(-1) * 2.0
            else:
                k = _call_kernel(f, r2)
            if want_value:
                acc_v.baddbmm_(k, wv[:, cols])
        if want_value:
            value[:, rows] = acc_v
        if want_grad:
            grad[:, rows] = acc_g
    return value, grad


def _call_kernel(f, r2):
    k = f(r2)
    if not isinstance(k, torch.Tensor) or k.shape != r2.shape:
        got = tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__
        raise ShapeError(
            f"kernel_sum: a callable kernel must map the squared-distance block elementwise to a tensor of "
            f"the same shape {tuple(r2.shape)}; received {got}"
        )
    if k.dtype != r2.dtype:
        k = k.to(r2.dtype)
    return k




def measure_kernel_sum(x, y, weights=None, **options):
    """:func:`kernel_sum` against a positive measure Σⱼ wⱼ δ_{yⱼ} of any total mass |w| = Σⱼ wⱼ:
    |w| · kernel_sum(x, y, weights=w/|w|) (the unbalanced Fisher–Rao flows of MATH.md §15.6 change the
    mass). ``weights=None`` is the uniform probability 1/M; ``options`` are kernel_sum's keywords."""
    if weights is None:
        return kernel_sum(x, y, weights=None, **options)
    mass = weights.sum(-1, keepdim=True)
    out = kernel_sum(x, y, weights=weights / mass, **options)
    if isinstance(out, tuple):
        return tuple(_times_mass(o, mass, x) for o in out)
    return _times_mass(out, mass, x)


def _times_mass(out, mass, x):
    if mass.ndim == 1:  # one weight vector (M,): a scalar mass
        return out * mass
    # (R, M) weights: the output's leading axis is R (broadcast over the rest)
    return out * mass.reshape(mass.shape[0], *([1] * (out.ndim - 1)))
