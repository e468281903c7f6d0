"""Argument checks shared by both reductions: tensors, shapes, replicas, devices, weights.

Each check names the function (``fn``) and the argument at fault and says what to pass instead. The
checks that read numbers back from the device (weights summing to one, log-weights without NaN) run
where :attr:`ReductionConfig.check_weights <measureflow.reductions.ReductionConfig>` says.
"""

from __future__ import annotations

import math

import torch

from ..errors import ShapeError, StateError
from . import settings

__all__ = ["as_points", "as_point_sets", "check_same_place", "check_no_autograd", "common_replicas", "check_together",
           "as_weights", "as_values", "checks_enabled", "check_probability", "as_real", "as_block_size"]


def _tensor(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise StateError(f"{name} must be a torch.Tensor; received {type(value).__name__}")
    if not value.is_floating_point():
        raise StateError(f"{name} must be a floating-point tensor; received dtype {value.dtype}")
    return value


def as_points(fn: str, value, name: str, shape_name: str) -> tuple[torch.Tensor, bool]:
    """(R, n, d) or (n, d) floating points as (R or 1, n, d), and whether R was given."""
    t = _tensor(value, f"{fn}: {name}")
    if t.ndim == 2:
        return t.unsqueeze(0), False
    if t.ndim != 3:
        raise ShapeError(
            f"{fn}: {name} must have shape (R, {shape_name}, d) or ({shape_name}, d); received shape {tuple(t.shape)}"
        )
    return t, True


def as_point_sets(fn: str, x, y, names: tuple[str, str], verb: str, hint: str, source: str):
    """Query points (R, N, d) and source points (R, M, d) of one reduction, each as
    :func:`as_points` returns them, with one d and at least one point on each side.

    ``names`` are the arguments' names, ``verb`` agrees with them ("has", "have"), ``hint`` says how to
    make the dimensions agree and ``source`` names one source point in the error for an empty set.
    """
    x, bx = as_points(fn, x, names[0], "N")
    y, by = as_points(fn, y, names[1], "M")
    if x.shape[2] != y.shape[2]:
        raise ShapeError(
            f"{fn}: {names[0]} {verb} d = {x.shape[2]} (shape {tuple(x.shape)}) but {names[1]} {verb} d = {y.shape[2]} "
            f"(shape {tuple(y.shape)}); {hint}"
        )
    N, M, d = x.shape[1], y.shape[1], x.shape[2]
    if N == 0 or M == 0 or d == 0:
        raise ShapeError(
            f"{fn}: need at least one query, {source} and one dimension; received N = {N}, M = {M}, d = {d}"
        )
    return x, bx, y, by


def check_same_place(fn: str, named: dict[str, torch.Tensor]) -> None:
    """Every argument on one device and in one dtype (no silent promotion or transfer)."""
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


def check_no_autograd(fn: str, named: dict[str, torch.Tensor]) -> None:
    """Refuse arguments that require grad while grad mode is on: the reductions record no history."""
    if not torch.is_grad_enabled():
        return
    for name, t in named.items():
        if t.requires_grad:
            raise StateError(
                f"{fn}: {name} requires grad, but the streaming reduction records no autograd history "
                "(it would keep every N×M block alive). Use kernel_sum(..., gradient=True) for ∇ₓ, or pass "
                f"{name}.detach() / call it under torch.no_grad()"
            )


def common_replicas(fn: str, shapes: dict[str, int]) -> int:
    """The replica count R the arguments agree on (each gives R or 1)."""
    sizes = {n: r for n, r in shapes.items() if r != 1}
    values = set(sizes.values())
    if len(values) > 1:
        listing = ", ".join(f"{n}: R={r}" for n, r in shapes.items())
        raise ShapeError(f"{fn}: arguments disagree on the number of replicas R ({listing}); each must be R or 1")
    return values.pop() if values else 1


def check_together(fn: str, named: dict[str, torch.Tensor]) -> int:
    """The checks every reduction runs on all its tensor arguments at once: one device and dtype, no
    autograd history, one replica count R (returned)."""
    check_same_place(fn, named)
    check_no_autograd(fn, named)
    return common_replicas(fn, {n: t.shape[0] for n, t in named.items()})


def _per_source(fn: str, value, M: int, name: str, channels: bool) -> tuple[torch.Tensor | None, bool]:
    """One entry (``channels=False``: shape (R, M) or (M,)) or one row of k channels (shape (R, M, k) or
    (M, k)) per source point, with a leading replica axis added where it was left out."""
    if value is None:
        return None, False
    t = _tensor(value, f"{fn}: {name}")
    per_point = 1 if channels else 0
    if t.ndim == 1 + per_point:
        t, batched = t.unsqueeze(0), False
    elif t.ndim == 2 + per_point:
        batched = True
    else:
        shapes = "(R, M, k) or (M, k)" if channels else "(R, M) or (M,)"
        raise ShapeError(f"{fn}: {name} must have shape {shapes}; received shape {tuple(t.shape)}")
    if t.shape[1] != M:
        unit = "rows" if channels else "entries"
        raise ShapeError(
            f"{fn}: {name} has {t.shape[1]} {unit} per replica but there are M = {M} source points "
            f"(received {name} of shape {tuple(t.shape)})"
        )
    return t, batched


def as_weights(fn: str, w, M: int, name: str = "weights") -> tuple[torch.Tensor | None, bool]:
    """(R, M) or (M,) per-source weights (or log-weights) as (R or 1, M), and whether R was given."""
    return _per_source(fn, w, M, name, channels=False)


def as_values(fn: str, v, M: int, name: str = "values") -> tuple[torch.Tensor | None, bool]:
    """(R, M, k) or (M, k) per-source values as (R or 1, M, k), and whether R was given."""
    return _per_source(fn, v, M, name, channels=True)


def checks_enabled(t: torch.Tensor) -> bool:
    """Whether input checks that read back from the device run for ``t`` (see ReductionConfig)."""
    mode = settings.config.check_weights
    return mode is True or (mode == "auto" and t.device.type == "cpu")


def check_probability(fn: str, w: torch.Tensor, unnormalised_hint: str) -> None:
    """Weights are a probability vector per replica (MATH.md §0): finite, ≥ 0, summing to one.

    The tolerance is the one :class:`measureflow.Particles` uses, so every weight vector a state
    accepts is accepted here: 10⁻⁵·max(1, √M) in float32, 10⁻¹⁰·max(1, √M) in float64 (rounding 1/M
    to the dtype and summing M terms errs by about √M·ε in practice); half types, whose ε is 10⁻³
    or more, get 8ε·max(1, √M).
    """
    if not checks_enabled(w):
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


def as_real(value, name: str) -> float:
    """A finite real number (bool refused)."""
    if isinstance(value, bool):
        raise StateError(f"{name} must be a real number; received {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise StateError(f"{name} must be a real number; received {value!r}") from None
    if not math.isfinite(out):
        raise StateError(f"{name} must be finite; received {out}")
    return out


def as_block_size(fn: str, block_size) -> tuple[int, int] | None:
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

