"""The fused path's machinery: when a call takes it, compiling and caching its kernels, calling them.

The kernels themselves (:mod:`.fused_kernels`) are loop nests that ``torch.compile`` turns into one
generated kernel per (replica, column block). One compile serves every N, M and R (the shapes are
symbolic and the replica loop runs in Python), and torch's on-disk caches, kept in a lasting
directory (:mod:`.compile_cache`), serve it to later processes: a machine pays it once per torch
version, dtype and static configuration; a fresh process traces the kernel and loads it.
A failed compile or call warns once and turns the fused path off for the rest of the process
(:data:`failure`); the callers then take the blocked eager path.
"""

from __future__ import annotations

import contextlib
import threading
import types
import warnings
from typing import Callable

import torch

from . import compile_cache, settings
from .blocking import spans

__all__ = ["kernels", "failure", "compiled_kernel", "use_fused", "run", "packed", "fused_spans"]

_compile_lock = threading.Lock()

#: The compiled kernels of this process, by (reduction, static configuration).
kernels: dict[tuple, Callable] = {}

#: Why the fused path is off for the rest of the process (the first compile or call that failed), or None.
failure: str | None = None


def _specialise(fn: Callable, tag: str) -> Callable:
    # torch.compile caches graphs on the code object and stops compiling after a few variants;
    # one code object per static configuration keeps the variants from crowding each other out.
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def compiled_kernel(kind: str, key: tuple, make: Callable) -> Callable:
    """The compiled ``make(*key)`` for reduction ``kind``, compiled on first use (one per process and
    threading mode).

    Inductor's CPU code is parallel (an OpenMP loop that takes torch's thread count when it runs) only
    when torch had more than one thread at compile time; compiled under one thread it stays serial.
    So the serial and the parallel variants are separate kernels: a process that raises
    ``torch.set_num_threads`` after its first call compiles the parallel one instead of keeping one core.
    """
    parallel = torch.get_num_threads() > 1
    full = (kind,) + key + (parallel,)
    fn = kernels.get(full)
    if fn is None:
        with _compile_lock:
            fn = kernels.get(full)
            if fn is None:
                compile_cache.use_lasting_directory()
                tag = "_".join(str(int(k) if isinstance(k, bool) else k) for k in key) + ("_par" if parallel else "")
                fn = torch.compile(_specialise(make(*key), tag), dynamic=True, fullgraph=True, options=_options())
                kernels[full] = fn
    return fn


def _options() -> dict:
    """Inductor options of the fused kernels.

    The C++ backend compiles with -ffp-contract=off by default, so every a·b + c of the distance,
    the exp polynomial and the weighted sums costs two instructions; allowing contraction into
    FMAs makes the CPU kernels ≈ 1.6× faster and rounds once instead of twice (never less
    accurate). Ignored by the GPU backend; left out where this torch has no such option.

    No precompiled header: with one, every process that loads a cached kernel first preprocesses
    and hashes torch's headers again (a ``g++ -E``, ≈ 0.3 s on a loaded 2-core machine) to find
    the header's key; the kernels are compiled once per machine, so what the header saves a
    compile never repays that. The same source and flags build the same code either way.
    """
    try:
        from torch._inductor import config as inductor_config
    except ImportError:
        return {}
    options = {}
    if hasattr(inductor_config, "cpp") and hasattr(inductor_config.cpp, "enable_floating_point_contract_flag"):
        options["cpp.enable_floating_point_contract_flag"] = "fast"
    if hasattr(inductor_config, "cpp_cache_precompile_headers"):
        options["cpp_cache_precompile_headers"] = False
    return options


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


def use_fused(device: torch.device, d: int, pairs: int, key: tuple) -> bool:
    """Whether a call of this device, d and size takes the fused path (:class:`ReductionConfig`, "compile")."""
    config = settings.config
    if config.compile == "off" or failure is not None or d > config.fused_max_dim:
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


def run(fn: Callable, *args):
    """Call a compiled kernel; on a compile failure warn once and report None (caller goes eager)."""
    global failure
    try:
        with _shape_options():
            out = fn(*args)
    except Exception as exc:  # noqa: BLE001 - any backend failure means "use the eager path"
        failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        warnings.warn(
            "measureflow.reductions: torch.compile of the fused reduction failed "
            f"({failure}); using the blocked eager path from now on. Set MEASUREFLOW_COMPILE=0 "
            "to skip the attempt.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return out


def packed(t: torch.Tensor) -> torch.Tensor:
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


def fused_spans(N: int, M: int, block: tuple[int, int] | None) -> tuple[list[slice], list[slice]]:
    """Row and column slices of the fused path: all rows at once (the kernel parallelises over
    them), columns in blocks of ``config.fused_columns`` that stay in cache."""
    rows = spans(N, block[0]) if block is not None else [slice(0, N)]
    cols = spans(M, block[1] if block is not None else settings.config.fused_columns)
    return rows, cols


