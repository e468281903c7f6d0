"""Streaming kernel sums and softmax-weighted averages: the engine's numerical spine.

Two reductions between query points xᵢ (N of them) and source points yⱼ (M of them), batched over
R replicas (DESIGN.md, "The numerical spine"; weights follow MATH.md §0: a probability vector per
replica, uniform = 1/M):

* :func:`kernel_sum`      Sᵢ = Σⱼ wⱼ k(xᵢ, yⱼ) vⱼ   and its gradient Gᵢ = Σⱼ wⱼ ∇ₓk(xᵢ, yⱼ);
* :func:`softmax_average` Σⱼ softmaxⱼ(s(qᵢ, kⱼ) + log wⱼ) vⱼ   and its log-sum-exp.

Every field that needs one of them calls these functions, so a speed-up here lands everywhere.
Memory stays O((N + M)·d + block²) per replica on any device: the N×M matrix is never formed.

Two execution paths compute the same numbers:

* **fused** (``torch.compile``): one generated loop nest per (replica, column block) evaluates
  distance, kernel and every weighted sum in registers, without writing any N×M temporary. Used for
  d ≤ ``config.fused_max_dim`` and named kernels when compiling is allowed (``MEASUREFLOW_COMPILE``,
  see :class:`ReductionConfig`). One compile serves every N, M and R (shapes are symbolic and the
  replica loop runs in Python), so a process pays it once per static configuration (reduction,
  kernel or score, d, number of value channels, gradient or not, dtype). float32 on CPU uses a
  polynomial exp accurate to ~2·10⁻⁷ relative (float32 rounding), otherwise ``torch.exp``; the
  CPU code is compiled with FMA contraction.
* **blocked eager**: (bn × bm) blocks sized from a memory budget, GEMMs for the value sums, the
  exp evaluated in place, a streaming max/rescale across column blocks for the softmax.

Accuracy notes (why the code forms differences where it does): for d ≤ ``config.direct_max_dim``,
and always for the non-smooth kernels ("laplace", "energy"), squared distances are formed from
explicit differences, so k(x, x) is exact and near-diagonal values keep full relative accuracy
(MMD² differences of nearly equal sums need this; for r = |x − y| the GEMM identity would leave an
error of order √ε·|x| at r = 0). Otherwise the eager path uses the GEMM identity
|x − y|² = |x|² + |y|² − 2⟨x, y⟩ after centring both point sets on the sources' mean; its absolute
error is about ε·(|x − c|² + |y − c|²)/h² in the exponent.

Neither reduction records autograd history (that would keep every block alive); use
``gradient=True`` for ∇ₓ of a kernel sum.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import types
import warnings
from typing import Callable

import attrs
import torch

from .errors import ShapeError, StateError

__all__ = [
    "kernel_sum",
    "softmax_average",
    "KERNELS",
    "ReductionConfig",
    "config",
]

#: Named kernels of :func:`kernel_sum`, with r = |x − y| and h the bandwidth.
KERNELS: dict[str, str] = {
    "gaussian": "exp(−r²/(2h²))",
    "laplace": "exp(−r/h)",
    "energy": "−r (bandwidth unused; ∇ₓ = −(x − y)/r, 0 at x = y)",
    "imq": "(1 + r²/h²)^(−1/2)",
    "poly2": "⟨x, y⟩² (bandwidth unused; closed form through second moments)",
    "poly2_affine": "(1 + ⟨x, y⟩)² (bandwidth unused; closed form through moments)",
}

_RADIAL = ("gaussian", "laplace", "energy", "imq")
_SINGULAR = ("laplace", "energy")
_POLY = ("poly2", "poly2_affine")
_SCORES = ("sqdist", "bilinear")
_MiB = 1 << 20


def _env_compile() -> str:
    raw = os.environ.get("MEASUREFLOW_COMPILE", "").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in ("1", "true", "yes", "on"):
        return "on"
    if raw in ("0", "false", "no", "off"):
        return "off"
    raise StateError(f"MEASUREFLOW_COMPILE must be 0, 1 or auto; received {raw!r}")


def _env_budget() -> int:
    raw = os.environ.get("MEASUREFLOW_REDUCTION_MEMORY_MIB", "").strip()
    if not raw:
        return 128 * _MiB
    try:
        value = float(raw)
    except ValueError:
        raise StateError(f"MEASUREFLOW_REDUCTION_MEMORY_MIB must be a number of MiB; received {raw!r}") from None
    if value <= 0:
        raise StateError(f"MEASUREFLOW_REDUCTION_MEMORY_MIB must be positive; received {raw!r}")
    return int(value * _MiB)


@attrs.define
class ReductionConfig:
    """Tuning knobs of both reductions (module-level instance :data:`config`).

    Attributes
    ----------
    memory_budget:
        Bytes of temporaries one block of the eager path may use (default 128 MiB, environment
        ``MEASUREFLOW_REDUCTION_MEMORY_MIB``). On CPU blocks are further capped at
        ``cpu_block_elements`` so that a block stays in cache.
    compile:
        ``"auto"`` (default): use the fused ``torch.compile`` path for a call whose pairs (R·N·M)
        reach ``compile_min_pairs`` — large enough that a run of such calls repays the one-off
        compile (seconds, cached on disk by torch) — and the eager path below. The choice depends
        on the call's size only, never on what ran before in the process: the two paths round
        differently, and a run must give the same bits whether it is resumed in a fresh process or
        not. ``"on"``: whenever possible; ``"off"``: never. Environment ``MEASUREFLOW_COMPILE`` =
        ``auto`` | ``1`` | ``0``. A failed compile warns once and falls back to the eager path for
        the rest of the process.
    fused_columns:
        Source points per call of the fused kernel (CPU: keep the block in L2).
    fused_max_dim:
        Largest d for the fused path (its loop unrolls over coordinates).
    direct_max_dim:
        Largest d for which the eager path forms explicit differences instead of the GEMM identity
        for the smooth kernels ("gaussian", "imq"); the non-smooth ones always use differences.
    check_weights:
        Check that ``weights`` are finite, non-negative and sum to one per replica, and that
        ``log_weights`` hold no NaN (MATH.md §0). The check reads numbers back from the device, so
        ``"auto"`` (default) checks tensors on the CPU only, where that costs nothing, and leaves
        accelerator data on the device (fields get weights that :class:`~measureflow.Particles`
        already validated); ``True`` always checks, ``False`` never.
    """

    memory_budget: int = attrs.field(factory=_env_budget)
    compile: str = attrs.field(factory=_env_compile, validator=attrs.validators.in_(("auto", "on", "off")))
    compile_min_pairs: int = 1 << 22
    cpu_block_elements: int = 1 << 20
    fused_columns: int = 4096
    fused_max_dim: int = 8
    direct_max_dim: int = 4
    check_weights: bool | str = attrs.field(default="auto", validator=attrs.validators.in_((True, False, "auto")))


config = ReductionConfig()


# ------------------------------------------------------------------------------------------------
# argument handling
# ------------------------------------------------------------------------------------------------


def _tensor(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise StateError(f"{name} must be a torch.Tensor; received {type(value).__name__}")
    if not value.is_floating_point():
        raise StateError(f"{name} must be a floating-point tensor; received dtype {value.dtype}")
    return value


def _points(fn: str, value, name: str, shape_name: str) -> tuple[torch.Tensor, bool]:
    t = _tensor(value, f"{fn}: {name}")
    if t.ndim == 2:
        return t.unsqueeze(0), False
    if t.ndim != 3:
        raise ShapeError(
            f"{fn}: {name} must have shape (R, {shape_name}, d) or ({shape_name}, d); received shape {tuple(t.shape)}"
        )
    return t, True


def _same_place(fn: str, named: dict[str, torch.Tensor]) -> None:
    first_name, first = next(iter(named.items()))
    for name, t in named.items():
        if t.device != first.device:
            raise StateError(
                f"{fn}: {name} is on {t.device} but {first_name} is on {first.device}; move every argument "
                "to the same device"
            )
        if t.dtype != first.dtype:
            raise StateError(
                f"{fn}: {name} has dtype {t.dtype} but {first_name} has dtype {first.dtype}; convert them to "
                "one floating dtype (no silent promotion)"
            )


def _no_autograd(fn: str, named: dict[str, torch.Tensor]) -> None:
    if not torch.is_grad_enabled():
        return
    for name, t in named.items():
        if t.requires_grad:
            raise StateError(
                f"{fn}: {name} requires grad, but the streaming reduction records no autograd history "
                "(it would keep every N×M block alive). Use kernel_sum(..., gradient=True) for ∇ₓ, or pass "
                f"{name}.detach() / call it under torch.no_grad()"
            )


def _replicas(fn: str, shapes: dict[str, int]) -> int:
    sizes = {n: r for n, r in shapes.items() if r != 1}
    values = set(sizes.values())
    if len(values) > 1:
        listing = ", ".join(f"{n}: R={r}" for n, r in shapes.items())
        raise ShapeError(f"{fn}: arguments disagree on the number of replicas R ({listing}); each must be R or 1")
    return values.pop() if values else 1


def _weights(fn: str, w, M: int, name: str = "weights") -> tuple[torch.Tensor | None, bool]:
    if w is None:
        return None, False
    w = _tensor(w, f"{fn}: {name}")
    if w.ndim == 1:
        w, batched = w.unsqueeze(0), False
    elif w.ndim == 2:
        batched = True
    else:
        raise ShapeError(f"{fn}: {name} must have shape (R, M) or (M,); received shape {tuple(w.shape)}")
    if w.shape[1] != M:
        raise ShapeError(
            f"{fn}: {name} has {w.shape[1]} entries per replica but there are M = {M} source points "
            f"(received {name} of shape {tuple(w.shape)})"
        )
    return w, batched


def _checking(t: torch.Tensor) -> bool:
    """Whether input checks that read back from the device run for ``t`` (see ReductionConfig)."""
    mode = config.check_weights
    return mode is True or (mode == "auto" and t.device.type == "cpu")


def _check_probability(fn: str, w: torch.Tensor, unnormalised_hint: str) -> None:
    """Weights are a probability vector per replica (MATH.md §0): finite, ≥ 0, summing to one.

    The tolerance is the one :class:`measureflow.Particles` uses, so every weight vector a state
    accepts is accepted here: 10⁻⁵·max(1, √M) in float32, 10⁻¹⁰·max(1, √M) in float64 (rounding 1/M
    to the dtype and summing M terms errs by about √M·ε in practice); half types, whose ε is 10⁻³
    or more, get 8ε·max(1, √M).
    """
    if not _checking(w):
        return
    M = w.shape[1]
    with torch.no_grad():
        # sum in float64 (float32 where the device has none) so the check adds no rounding of its own
        wide = torch.float32 if w.device.type == "mps" else torch.float64
        sums = w.sum(dim=1, dtype=wide)
        # one read-back for the three checks: count of negative entries, of non-finite ones, worst sum
        stats = torch.stack([(w < 0).sum().double(), (~torch.isfinite(w)).sum().double(), (sums - 1).abs().max()])
        negative, nonfinite, worst = stats.tolist()
    if nonfinite:
        raise StateError(
            f"{fn}: weights contain {int(nonfinite)} non-finite entries (NaN or inf); weights must be a finite "
            "probability vector per replica"
        )
    if negative:
        raise StateError(
            f"{fn}: weights contain {int(negative)} negative entries; weights must be non-negative and sum to one "
            f"per replica ({unnormalised_hint})"
        )
    base = 1e-10 if w.dtype == torch.float64 else 1e-5
    tol = max(base, 8 * torch.finfo(w.dtype).eps) * max(1.0, math.sqrt(M))
    if worst > tol:
        r = int(((sums - 1).abs() > tol).nonzero()[0, 0])
        raise StateError(
            f"{fn}: weights must sum to one in every replica (MATH.md §0); replica {r} sums to "
            f"{float(sums[r]):.10g} (tolerance {tol:.1e}). Normalise them with w / w.sum(-1, keepdim=True), "
            f"{unnormalised_hint}"
        )


def _values(fn: str, v, M: int, name: str = "values") -> tuple[torch.Tensor | None, bool]:
    if v is None:
        return None, False
    v = _tensor(v, f"{fn}: {name}")
    if v.ndim == 2:
        v, batched = v.unsqueeze(0), False
    elif v.ndim == 3:
        batched = True
    else:
        raise ShapeError(f"{fn}: {name} must have shape (R, M, k) or (M, k); received shape {tuple(v.shape)}")
    if v.shape[1] != M:
        raise ShapeError(
            f"{fn}: {name} has {v.shape[1]} rows per replica but there are M = {M} source points "
            f"(received {name} of shape {tuple(v.shape)})"
        )
    return v, batched


def _number(value, name: str) -> float:
    if isinstance(value, bool):
        raise StateError(f"{name} must be a real number; received {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise StateError(f"{name} must be a real number; received {value!r}") from None
    if not math.isfinite(out):
        raise StateError(f"{name} must be finite; received {out}")
    return out


def _block_arg(fn: str, block_size) -> tuple[int, int] | None:
    """Validate ``block_size`` (int or (rows, cols), positive) once, for both paths."""
    if block_size is None:
        return None
    pair = (block_size, block_size) if not isinstance(block_size, (tuple, list)) else tuple(block_size)
    ok = len(pair) == 2 and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in pair)
    if not ok:
        raise ShapeError(
            f"{fn}: block_size must be a positive int or a (rows, cols) pair of positive ints; received {block_size!r}"
        )
    return pair


def _blocks(block: tuple[int, int] | None, R: int, N: int, M: int, itemsize: int, device: torch.device,
            temporaries: int):
    """(rows, cols) of one eager block: explicit, or the largest fitting the memory budget."""
    if block is not None:
        return min(block[0], N), min(block[1], M)
    elements = config.memory_budget // max(1, itemsize * temporaries * R)
    if device.type == "cpu":
        elements = min(elements, max(1, config.cpu_block_elements // R))
    elements = max(elements, 64 * 64)
    bm = min(M, max(64, math.isqrt(elements)))
    bn = min(N, max(1, elements // bm))
    return bn, bm


def _spans(n: int, size: int) -> list[slice]:
    """Split range(n) into ⌈n/size⌉ near-equal slices of at most ``size`` (no tiny tail block)."""
    count = -(-n // max(1, size))
    step = -(-n // count)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


# ------------------------------------------------------------------------------------------------
# fused (compiled) path
# ------------------------------------------------------------------------------------------------

_compile_lock = threading.Lock()
_compiled: dict[tuple, Callable] = {}
_compile_failure: str | None = None


def _exp32(x: torch.Tensor) -> torch.Tensor:
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


def _specialise(fn: Callable, tag: str) -> Callable:
    # torch.compile caches graphs on the code object and stops compiling after a few variants;
    # one code object per static configuration keeps the variants from crowding each other out.
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _make_fused_kernel_sum(kernel: str, d: int, n_values: int, grad: bool, poly_exp: bool):
    exp = _exp32 if poly_exp else torch.exp

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


def _make_fused_softmax(score: str, d: int, n_values: int, negate: bool, poly_exp: bool):
    exp = _exp32 if poly_exp else torch.exp

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


def _fused(kind: str, key: tuple, make: Callable) -> Callable:
    full = (kind,) + key
    fn = _compiled.get(full)
    if fn is None:
        with _compile_lock:
            fn = _compiled.get(full)
            if fn is None:
                tag = "_".join(str(int(k) if isinstance(k, bool) else k) for k in key)
                fn = torch.compile(_specialise(make(*key), tag), dynamic=True, fullgraph=True, options=_options())
                _compiled[full] = fn
    return fn


def _options() -> dict:
    """Inductor options of the fused kernels.

    The C++ backend compiles with -ffp-contract=off by default, so every a·b + c of the distance,
    the exp polynomial and the weighted sums costs two instructions; allowing contraction into
    FMAs makes the CPU kernels ≈ 1.6× faster and rounds once instead of twice (never less
    accurate). Ignored by the GPU backend; left out where this torch has no such option.
    """
    try:
        from torch._inductor import config as inductor_config
    except ImportError:
        return {}
    if hasattr(inductor_config, "cpp") and hasattr(inductor_config.cpp, "enable_floating_point_contract_flag"):
        return {"cpp.enable_floating_point_contract_flag": "fast"}
    return {}


def _shape_options():
    """Symbolic-shape settings under which the fused kernels are traced and called.

    By default dynamo "duck-sizes" (n and b equal at the first call get one symbol, and a later
    call with n ≠ b recompiles) and specialises sizes 0 and 1 (a one-row call recompiles). Both
    cost a compile of several seconds for nothing here: no kernel relies on a size relation.
    """
    try:
        from torch.fx.experimental import _config as fx_config
    except ImportError:  # an older torch: keep its defaults (more recompiles, same results)
        return contextlib.nullcontext()
    wanted = {"use_duck_shape": False, "backed_size_oblivious": True}
    known = {k: v for k, v in wanted.items() if hasattr(fx_config, k)}
    return fx_config.patch(**known) if known else contextlib.nullcontext()


def _use_fused(device: torch.device, d: int, pairs: int, key: tuple) -> bool:
    if config.compile == "off" or _compile_failure is not None or d > config.fused_max_dim:
        return False
    if device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            return False
    elif device.type != "cpu":
        return False
    if config.compile == "on":
        return True
    return pairs >= config.compile_min_pairs


def _run_fused(fn: Callable, *args):
    """Call a compiled kernel; on a compile failure warn once and report None (caller goes eager)."""
    global _compile_failure
    try:
        with _shape_options():
            out = fn(*args)
    except Exception as exc:  # noqa: BLE001 - any backend failure means "use the eager path"
        _compile_failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        warnings.warn(
            "measureflow.reductions: torch.compile of the fused reduction failed "
            f"({_compile_failure}); using the blocked eager path from now on. Set MEASUREFLOW_COMPILE=0 "
            "to skip the attempt.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return out


def _packed(t: torch.Tensor) -> torch.Tensor:
    """t with exactly the row-major strides of its shape (a copy only when they differ).

    ``Tensor.contiguous`` keeps the strides of size-1 dimensions as they were, and dynamo guards on
    strides: a one-row block would recompile. Fresh row-major strides avoid that.
    """
    expected, acc = [], 1
    for size in reversed(t.shape):
        expected.append(acc)
        acc *= size
    if tuple(reversed(expected)) == t.stride():
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def _fused_spans(N: int, M: int, block: tuple[int, int] | None) -> tuple[list[slice], list[slice]]:
    """Row and column slices of the fused path: all rows at once (the kernel parallelises over
    them), columns in blocks of ``config.fused_columns`` that stay in cache."""
    rows = _spans(N, block[0]) if block is not None else [slice(0, N)]
    cols = _spans(M, block[1] if block is not None else config.fused_columns)
    return rows, cols


# ------------------------------------------------------------------------------------------------
# kernel sum
# ------------------------------------------------------------------------------------------------


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
    h = _number(bandwidth, f"{fn}: bandwidth")
    if h <= 0:
        raise StateError(f"{fn}: bandwidth must be positive; received {h}")
    block = _block_arg(fn, block_size)
    x, bx = _points(fn, x, "x", "N")
    y, by = _points(fn, y, "y", "M")
    if x.shape[2] != y.shape[2]:
        raise ShapeError(
            f"{fn}: x has d = {x.shape[2]} (shape {tuple(x.shape)}) but y has d = {y.shape[2]} "
            f"(shape {tuple(y.shape)}); both point sets must live in the same space"
        )
    M = y.shape[1]
    w, bw = _weights(fn, weights, M)
    v, bv = _values(fn, values, M)
    if v is not None and gradient is True:
        raise StateError(f"{fn}: gradient=True returns Σⱼ wⱼ ∇ₓk(xᵢ, yⱼ) and takes no values; pass values=None")
    if v is not None and gradient == "both":
        raise StateError(f"{fn}: gradient='both' takes no values; call kernel_sum twice for weighted values")
    named = {"x": x, "y": y}
    if w is not None:
        named["weights"] = w
    if v is not None:
        named["values"] = v
    _same_place(fn, named)
    _no_autograd(fn, named)
    R = _replicas(fn, {n: t.shape[0] for n, t in named.items()})
    batched = bx or by or bw or bv
    N, d = x.shape[1], x.shape[2]
    if N == 0 or M == 0 or d == 0:
        raise ShapeError(
            f"{fn}: need at least one query, one source point and one dimension; received N = {N}, M = {M}, d = {d}"
        )
    if w is not None:
        _check_probability(fn, w, "or put unnormalised per-point factors into values")

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
            if _use_fused(x.device, d, R * N * M, key):
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
    fn = _fused(key[0], key[1:], _make_fused_kernel_sum)
    width = max(1, n_values) + (d if want_grad else 0)
    out = torch.empty(R, N, width, dtype=x.dtype, device=x.device)
    row_spans, col_spans = _fused_spans(N, M, block)
    # One replica and one contiguous block per call: every call then has the same layout (only the
    # sizes differ, and those are symbolic), so the compiled kernel is reused, never re-specialised.
    for r in range(R):
        blocks = [
            (
                _packed(ys[r, :, cols]),
                _packed(vt[r, :, cols]) if vt is not None else x.new_empty(0, cols.stop - cols.start),
                _packed(w[r, cols]),
            )
            for cols in col_spans
        ]
        for rows in row_spans:
            xr = _packed(xs[r, :, rows])
            acc = torch.zeros(rows.stop - rows.start, width, dtype=x.dtype, device=x.device)
            for yb, vb, wb in blocks:
                res = _run_fused(fn, xr, yb, vb, wb, acc)
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


def _sqdist_direct(xt, yt, out, tmp):
    """|xᵢ − yⱼ|² from explicit differences; xt (R, d, bn), yt (R, d, bm) → out (R, bn, bm)."""
    torch.sub(xt[:, 0, :, None], yt[:, 0, None, :], out=out)
    out.mul_(out)
    for c in range(1, xt.shape[1]):
        torch.sub(xt[:, c, :, None], yt[:, c, None, :], out=tmp)
        out.addcmul_(tmp, tmp)
    return out


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
    direct = singular or d <= config.direct_max_dim
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
    bn, bm = _blocks(block, R, N, M, itemsize, x.device, temporaries=3)
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
                _sqdist_direct(xt[:, :, rows], yt[:, :, cols], k, t)  # r² (natural units)
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
    bn, bm = _blocks(block, R, N, M, x.element_size(), x.device, temporaries=6)
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
            r2 = _sqdist_direct(
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


# ------------------------------------------------------------------------------------------------
# softmax average
# ------------------------------------------------------------------------------------------------


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
    scale = _number(scale, f"{fn}: scale")
    if weights is not None and log_weights is not None:
        raise StateError(f"{fn}: pass weights or log_weights, not both")
    block = _block_arg(fn, block_size)
    q, bq = _points(fn, queries, "queries", "N")
    k, bk = _points(fn, keys, "keys", "M")
    if q.shape[2] != k.shape[2]:
        raise ShapeError(
            f"{fn}: queries have d = {q.shape[2]} (shape {tuple(q.shape)}) but keys have d = {k.shape[2]} "
            f"(shape {tuple(k.shape)}); apply the query/key maps so both live in the same space"
        )
    M = k.shape[1]
    w, bw = _weights(fn, weights, M)
    lw, bl = _weights(fn, log_weights, M, name="log_weights")
    v, bv = _values(fn, values, M)
    named = {"queries": q, "keys": k}
    for n, t in (("weights", w), ("log_weights", lw), ("values", v)):
        if t is not None:
            named[n] = t
    _same_place(fn, named)
    _no_autograd(fn, named)
    R = _replicas(fn, {n: t.shape[0] for n, t in named.items()})
    batched = bq or bk or bw or bl or bv
    N, d = q.shape[1], q.shape[2]
    if N == 0 or M == 0 or d == 0:
        raise ShapeError(
            f"{fn}: need at least one query, one key and one dimension; received N = {N}, M = {M}, d = {d}"
        )
    if w is not None:
        _check_probability(fn, w, "or pass log_weights for an unnormalised per-point term")
    if lw is not None and _checking(lw) and bool(torch.isnan(lw).any()):
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
        if score == "bilinear" and _use_attention_kernel(q, block):
            out = _attention_kernel_softmax(scale, q, k, v, None if uniform else lw)
        elif score == "sqdist" and scale > 0 and q.dtype == torch.float64 and _use_attention_kernel(q, block):
            out = _sqdist_on_attention_kernel(scale, q, k, v, lw)
        poly = q.dtype == torch.float32 and q.device.type == "cpu"
        key = ("softmax", score, d, v.shape[2], scale < 0 and score == "sqdist", poly)
        if out is None and _use_fused(q.device, d, R * N * M, key):
            out = _fused_softmax(key, scale, q, k, v, lw, block)
        if out is None:
            out = _eager_softmax(score, scale, q, k, v, lw, block)
        avg, lse = out

    if not batched:
        avg, lse = avg[0], lse[0]
    return (avg, lse) if return_logsumexp else avg


_attention_kernel_failure: str | None = None


def _attention_op():
    """torch's fused CPU attention kernel (output and log-sum-exp), or None where this torch has none."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _use_attention_kernel(q: torch.Tensor, block) -> bool:
    """Bilinear scores on the CPU in float32/float64, no explicit blocks, the kernel present and not failed."""
    return (
        block is None
        and q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.float64)
        and _attention_kernel_failure is None
        and _attention_op() is not None
    )


def _attention_kernel_softmax(scale, q, k, v, lw):
    """Bilinear softmax average and LSE through torch's fused CPU attention kernel.

    The kernel computes softmax(scale·q kᵀ + mask)·v per (batch, head) with a streaming maximum and
    returns the log-sum-exp of the masked scores; replicas are its batch axis (one head). ``lw`` =
    None means uniform weights: no mask, and LSE − log M is the log-mean-exp. The kernel wants one
    head width for q, k and v, so the narrower side is zero-padded (the scores and the averages of
    the real channels are unchanged). Returns None after warning once when the kernel refuses the
    call, and the blocked paths serve this and every later call.
    """
    global _attention_kernel_failure
    R, N, d = q.shape
    M, C = k.shape[1], v.shape[2]
    width = max(d, C, 1)

    def head(t):
        if t.shape[2] == width:
            return t.contiguous()[:, None]
        return torch.nn.functional.pad(t, (0, width - t.shape[2]))[:, None]

    mask = None if lw is None else lw[:, None, None, :]
    try:
        out, lse = _attention_op()(head(q), head(k), head(v), attn_mask=mask, scale=scale)
    except Exception as exc:  # noqa: BLE001 - any refusal means "use the blocked paths"
        _attention_kernel_failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        warnings.warn(
            "measureflow.reductions: torch's CPU attention kernel refused a bilinear softmax_average "
            f"({_attention_kernel_failure}); using the blocked path from now on",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    avg = out[:, 0, :, :C].contiguous()
    lse = lse[:, 0].to(q.dtype)
    if lw is None:
        lse = lse - math.log(M)
    return avg, lse


def _sqdist_on_attention_kernel(scale, q, k, v, lw):
    """The squared-distance softmax through the bilinear kernel (float64 only).

    −s|q − k|² = 2s⟨q, k⟩ − s|k|² − s|q|²: the key term joins the log-weights, the query term is
    constant along each row, so the average is unchanged and LSE shifts by −s|q|². Both sets are
    first centred on the keys' mean (differences are unchanged), which bounds the cancellation by
    s·|x − c|². In float64 the result stays within about 1e-13 of the direct differences; in
    float32 the cancellation costs a decimal digit, so float32 keeps the direct path.
    """
    centre = k.mean(dim=1, keepdim=True)
    qc, kc = q - centre, k - centre
    out = _attention_kernel_softmax(2.0 * scale, qc, kc, v, lw - scale * (kc * kc).sum(-1))
    if out is None:
        return None
    avg, lse = out
    return avg, lse - scale * (qc * qc).sum(-1)


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
    fn = _fused(key[0], key[1:], _make_fused_softmax)
    avg = torch.empty(R, N, n_values, dtype=q.dtype, device=q.device)
    lse = torch.empty(R, N, dtype=q.dtype, device=q.device)
    row_spans, col_spans = _fused_spans(N, M, block)
    for r in range(R):
        blocks = [
            (_packed(ks[r, :, cols]), _packed(lw[r, cols]), _packed(vt[r, :, cols]))
            for cols in col_spans
        ]
        for rows in row_spans:
            nb = rows.stop - rows.start
            qr = _packed(qs[r, :, rows])
            m = torch.full((nb,), -math.inf, dtype=q.dtype, device=q.device)
            acc = torch.zeros(nb, 1 + n_values, dtype=q.dtype, device=q.device)
            for kb, lb, vb in blocks:
                res = _run_fused(fn, qr, kb, lb, vb, m, acc)
                if res is None:
                    return None
                m, acc = res
            avg[r, rows] = acc[:, 1:] / acc[:, :1]
            lse[r, rows] = m + torch.log(acc[:, 0])
    return avg, lse


def _eager_softmax(score, scale, q, k, v, lw, block):
    R, N, d = q.shape
    M = k.shape[1]
    direct = score == "sqdist" and d <= config.direct_max_dim
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
    bn, bm = _blocks(block, R, N, M, q.element_size(), q.device, temporaries=3)
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
                _sqdist_direct(qt[:, :, rows], kt[:, :, cols], s, tmp[:, :nb, :mb])
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
