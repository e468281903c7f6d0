"""The tuning knobs of both reductions: :class:`ReductionConfig` and its process-wide instance.

Every module of the package reads the knobs as ``settings.config`` at call time, so assigning a new
instance (``measureflow.reductions.config = ReductionConfig(...)``, which the package forwards here)
or changing one attribute takes effect on the next call.
"""

from __future__ import annotations

import os

import attrs

from ..errors import StateError

__all__ = ["ReductionConfig", "config"]

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
