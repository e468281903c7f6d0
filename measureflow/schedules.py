"""Interpolation schedules Zₜ = aₜX₀ + bₜX₁ (MATH.md §0 time conventions, §1.3).

Schedules are written in the book's *noising* convention: X₀ = data at t = 0, X₁ = noise at t = 1,
``a`` multiplies the data and ``b`` the noise. Every schedule answers

* ``coefficients(t) -> (a, da, b, db)`` with da = a'(t), db = b'(t); ``t`` a Python number or a
  tensor of any shape, each output a tensor of the same shape (float64 for a Python number,
  otherwise t's floating dtype and device);
* ``time_range`` — the closed interval ``(lo, hi)`` where the coefficients are defined
  (``(0, inf)`` for the variance-preserving schedule, which runs in its own time τ);
* ``singular`` — ``{"a_zero": (...), "b_zero": (...)}``, the times where a = 0 (the score form of
  the flow-matching field is 0/0 there, a removable singularity) and where b = 0 (for atomic or
  low-rank data the field itself is singular there: MATH.md §1.3, "Singularities/time ranges");
* ``name`` and ``describe()`` (a JSON-friendly dict written to trajectory parameters).

The closed-form schedules (linear, cosine, overshoot, vp, lipman) are registered by the built-in
plugin ``measureflow_plugins.schedules``; this module holds the base class and the two generic
constructions a user builds their own schedule from:

* :class:`ReparametrisedSchedule` — any monotone time change λ of another schedule,
  aₜ = a_{λ(t)}, a'ₜ = λ'(t) a'_{λ(t)} (so vₜ = λ'(t) v_{λ(t)}, MATH.md §1.3);
* :class:`CustomSchedule` — two callables a(t), b(t) whose derivatives come from autograd.

Both evaluate their callables on tensors (write them with torch functions: ``torch.cos``, not
``math.cos``), vectorised over t: the derivative of an elementwise function is the gradient of its
sum. Build any registered schedule by name with :func:`get` (or ``registry.schedule(name, **params)``),
or normalise a user's choice with :func:`as_schedule`.
"""

from __future__ import annotations

import abc
import math
from typing import Callable, Mapping

import torch

from .errors import ParameterError, ShapeError, TimeRangeError

__all__ = [
    "Schedule",
    "ReparametrisedSchedule",
    "CustomSchedule",
    "get",
    "as_schedule",
    "autograd_derivative",
]

#: Points of the grid on which user callables are checked (monotonicity, finiteness, sign changes).
_CHECK_POINTS = 2049


def _time_tensor(t) -> torch.Tensor:
    """t as a floating tensor: float64 for Python numbers and integer tensors, else t's own dtype."""
    if isinstance(t, torch.Tensor):
        return t if t.is_floating_point() else t.to(torch.float64)
    if isinstance(t, bool):
        raise ParameterError(f"a schedule time must be a real number or a tensor; received {t!r}")
    try:
        return torch.tensor(float(t), dtype=torch.float64)
    except (TypeError, ValueError):
        raise ParameterError(f"a schedule time must be a real number or a tensor; received {t!r}") from None


def _range(value, where: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ParameterError(f"{where}: time_range must be a pair (lo, hi) of numbers; received {value!r}") from None
    if math.isnan(lo) or math.isnan(hi) or not lo < hi:
        raise ParameterError(f"{where}: time_range must satisfy lo < hi; received {value!r}")
    return lo, hi


class Schedule(abc.ABC):
    """Base class of interpolation schedules (module docstring; MATH.md §1.3).

    A subclass sets ``name``, ``time_range`` and ``singular`` and implements
    ``_coefficients(t)`` for a floating tensor t. :meth:`coefficients` converts the time, refuses a
    Python-number time outside ``time_range`` (a tensor of times is not checked, which would read
    it back from its device) and calls it.
    """

    name: str = "schedule"
    time_range: tuple[float, float] = (0.0, 1.0)
    singular: dict = {"a_zero": (), "b_zero": ()}

    def coefficients(self, t):
        """(aₜ, a'ₜ, bₜ, b'ₜ), each shaped like t (Zₜ = aₜX₀ + bₜX₁, X₀ = data)."""
        if not isinstance(t, torch.Tensor):
            self.check_time(t)
        return self._coefficients(_time_tensor(t))

    @abc.abstractmethod
    def _coefficients(self, t: torch.Tensor):
        """(a, a', b, b') at the floating tensor of times ``t`` (no range check: :meth:`coefficients` did it)."""

    def check_time(self, t) -> None:
        """Refuse a number outside ``time_range`` with a :class:`TimeRangeError` naming the range."""
        lo, hi = self.time_range
        value = float(t)
        if not (lo <= value <= hi):
            raise TimeRangeError(
                f"schedule {self.name!r} is defined for t in [{lo:g}, {hi:g}]; received t = {value:g}"
            )

    def interpolant(self, t, x0: torch.Tensor, x1: torch.Tensor):
        """(Zₜ, Żₜ) = (aₜx₀ + bₜx₁, a'ₜx₀ + b'ₜx₁) for paired samples (the regression pair of MATH.md §1).

        ``t`` is a number, or a tensor with one time per sample (shape (B,) for x0 of shape (B, d));
        trailing axes are added to the coefficients to broadcast against x0.
        """
        coeffs = []
        for c in self.coefficients(t):
            c = c.to(dtype=x0.dtype, device=x0.device)
            while 0 < c.ndim < x0.ndim:
                c = c.unsqueeze(-1)
            coeffs.append(c)
        a, da, b, db = coeffs
        return a * x0 + b * x1, da * x0 + db * x1

    def describe(self) -> dict:
        """JSON-friendly description (name and parameters)."""
        return {"name": self.name}

    def __repr__(self) -> str:
        params = {k: v for k, v in self.describe().items() if k != "name"}
        inner = ", ".join(f"{k}={v!r}" for k, v in params.items())
        return f"{type(self).__name__}({self.name!r}{', ' if inner else ''}{inner})"


# -- autograd derivatives and zero finding ---------------------------------------------------------------


def autograd_derivative(fn: Callable, t: torch.Tensor, what: str = "f"):
    """(f(t), f'(t)) for an elementwise callable f, vectorised over t by one backward pass.

    f' is the gradient of Σₖ f(tₖ) with respect to t, which equals f'(tₖ) entry by entry when
    each output depends only on its own time. A callable that returns a constant (a number, or a
    tensor without autograd history) has derivative 0.
    """
    t = _time_tensor(t)
    with torch.enable_grad():
        tt = t.detach().clone().requires_grad_(True)
        try:
            y = fn(tt)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ParameterError(
                f"{what}(t) failed on a tensor of times ({exc}); write it with torch functions "
                "(torch.cos, torch.exp, ...), which accept tensors and carry autograd"
            ) from exc
        if not isinstance(y, torch.Tensor):
            try:
                y = torch.full_like(tt, float(y))
            except (TypeError, ValueError):
                raise ParameterError(f"{what}(t) must return a tensor (or a number); received {type(y).__name__}") from None
        if y.shape != tt.shape:
            if y.numel() == 1:
                y = y.reshape(()).expand(tt.shape)
            else:
                raise ShapeError(
                    f"{what}(t) must act elementwise: for t of shape {tuple(tt.shape)} it returned shape "
                    f"{tuple(y.shape)}"
                )
        y = y.to(tt.dtype)
        if y.requires_grad:
            (grad,) = torch.autograd.grad(y.sum(), tt, allow_unused=True)
        else:
            grad = None
    if grad is None:
        grad = torch.zeros_like(tt)
    return y.detach(), grad.detach()


def _check_grid(lo: float, hi: float) -> torch.Tensor:
    """A float64 grid on [lo, hi]; an infinite end is approached through a geometric tail."""
    if math.isfinite(lo) and math.isfinite(hi):
        return torch.linspace(lo, hi, _CHECK_POINTS, dtype=torch.float64)
    if math.isfinite(lo):
        return lo + torch.logspace(-6, 6, _CHECK_POINTS, dtype=torch.float64)
    if math.isfinite(hi):
        return hi - torch.logspace(6, -6, _CHECK_POINTS, dtype=torch.float64)
    tail = torch.logspace(-6, 6, _CHECK_POINTS // 2, dtype=torch.float64)
    return torch.cat([-tail.flip(0), tail])


def _bisect(f: Callable[[float], float], lo: float, hi: float) -> float:
    """A root of f in [lo, hi] where f(lo) and f(hi) have opposite signs (to the last bit)."""
    flo = f(lo)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        fm = f(mid)
        if fm == 0:
            return mid
        if (fm < 0) == (flo < 0):
            lo, flo = mid, fm
        else:
            hi = mid
    return lo if abs(f(lo)) <= abs(f(hi)) else hi


def _zeros_on(fn: Callable[[torch.Tensor], torch.Tensor], lo: float, hi: float, scale: float = 1.0) -> tuple:
    """Times in [lo, hi] where a scalar function vanishes: exact zeros on the check grid (and at
    finite ends, up to rounding), plus a bisected root inside every sign change. A zero that
    touches without changing sign strictly between grid points is not seen."""
    grid = _check_grid(lo, hi)
    values = fn(grid)
    tol = 64 * torch.finfo(torch.float64).eps * max(1.0, scale)
    found = []
    near = (values.abs() <= tol).nonzero().reshape(-1).tolist()
    found.extend(float(grid[i]) for i in near)
    sign = torch.sign(values)
    change = ((sign[:-1] * sign[1:]) < 0).nonzero().reshape(-1).tolist()

    def scalar(s: float) -> float:
        return float(fn(torch.tensor(s, dtype=torch.float64)))

    for i in change:
        found.append(_bisect(scalar, float(grid[i]), float(grid[i + 1])))
    out = []
    for z in sorted(found):
        if not out or abs(z - out[-1]) > 1e-9 * max(1.0, abs(z)):
            out.append(z)
    return tuple(out)


# -- generic constructions --------------------------------------------------------------------------------


class ReparametrisedSchedule(Schedule):
    """aₜ = a_{λ(t)}, bₜ = b_{λ(t)} for a monotone time change λ of a base schedule (MATH.md §1.3).

    Derivatives by the chain rule, a'ₜ = λ'(t)·a'_{λ(t)}, so the flow-matching field of the new
    schedule is vₜ = λ'(t)·v_{λ(t)} of the base one (same spatial curves, new clock). λ' is taken
    by autograd unless ``lam_prime`` is given.

    Parameters
    ----------
    base:
        a :class:`Schedule`, a registered name, or a mapping ``{"name": ..., **params}``.
    lam, lam_prime:
        λ(t) (elementwise, torch functions) and optionally λ'(t).
    time_range:
        the interval of the new time t (default (0, 1)); λ must map it monotonically into the
        base schedule's range (an end may map to an infinite end of the base range, e.g.
        τ = −log cos(πt/2) takes (0, 1) onto the variance-preserving (0, ∞): that is cosine).

    ``singular`` holds the times where a∘λ (b∘λ) vanishes, for the kinds of singularity the base
    schedule has (grid search and bisection, as for :class:`CustomSchedule`). At a time where λ is
    infinite the derivatives are limits this class does not take (they come out as nan).
    """

    def __init__(self, base="linear", lam: Callable | None = None, lam_prime: Callable | None = None,
                 time_range=(0.0, 1.0), name: str = "reparametrised"):
        where = "schedule 'reparametrised'"
        if lam is None or not callable(lam):
            raise ParameterError(f"{where}: lam must be a callable λ(t) (torch functions); received {lam!r}")
        if lam_prime is not None and not callable(lam_prime):
            raise ParameterError(f"{where}: lam_prime must be a callable λ'(t) or None; received {lam_prime!r}")
        self.base = as_schedule(base)
        self.lam = lam
        self.lam_prime = lam_prime
        self.name = str(name)
        self.time_range = _range(time_range, where)
        lo, hi = self.time_range
        grid = _check_grid(lo, hi)
        values, _ = autograd_derivative(lam, grid, "lam")
        blo, bhi = self.base.time_range
        if bool(torch.isnan(values).any()):
            raise ParameterError(f"{where}: λ(t) is NaN somewhere on [{lo:g}, {hi:g}]")
        if bool(((values < blo) | (values > bhi)).any()):
            bad = int(((values < blo) | (values > bhi)).nonzero()[0, 0])
            raise ParameterError(
                f"{where}: λ maps t = {float(grid[bad]):.6g} to {float(values[bad]):.6g}, outside the range "
                f"[{blo:g}, {bhi:g}] of the base schedule {self.base.name!r}"
            )
        steps = values[1:] - values[:-1]
        increasing = bool((steps >= 0).all())
        decreasing = bool((steps <= 0).all())
        if not (increasing or decreasing) or bool((values == values[0]).all()):
            raise ParameterError(
                f"{where}: λ must be monotone and not constant on [{lo:g}, {hi:g}] (checked on "
                f"{_CHECK_POINTS} points); received values from {float(values.min()):.6g} to {float(values.max()):.6g}"
            )
        self.singular = {key: self._preimages(key) for key in ("a_zero", "b_zero")}

    def _preimages(self, key: str) -> tuple:
        """Zeros of a∘λ (key "a_zero") or b∘λ ("b_zero") on the time range; found on the composite
        coefficient rather than by inverting λ, so that a base singularity at an infinite time
        (a = e^{−τ} → 0) is seen where λ reaches the range where a rounds to zero."""
        if not self.base.singular.get(key):
            return ()
        index = 0 if key == "a_zero" else 2
        lo, hi = self.time_range

        def composite(g):
            return self.base.coefficients(autograd_derivative(self.lam, g, "lam")[0])[index]

        return _zeros_on(composite, lo, hi)

    def _coefficients(self, t):
        if self.lam_prime is None:
            s, ds = autograd_derivative(self.lam, t, "lam")
        else:
            s = self.lam(t)
            s = s if isinstance(s, torch.Tensor) else torch.full_like(t, float(s))
            ds = self.lam_prime(t)
            ds = ds if isinstance(ds, torch.Tensor) else torch.full_like(t, float(ds))
        a, da, b, db = self.base.coefficients(s)
        return a, da * ds, b, db * ds

    def describe(self):
        return {
            "name": self.name,
            "base": self.base.describe(),
            "lam": _callable_name(self.lam),
            "time_range": list(self.time_range),
        }


class CustomSchedule(Schedule):
    """A schedule from two callables a(t), b(t) (torch functions, elementwise); a' and b' by autograd.

    Parameters
    ----------
    a, b:
        the coefficients of data and noise (noising convention, MATH.md §0).
    time_range:
        default (0, 1).
    singular:
        ``{"a_zero": (...), "b_zero": (...)}``; when omitted the zeros are found on a grid of
        2049 points (exact zeros and sign changes, refined by bisection). A zero that touches 0
        without a sign change between grid points is missed: state such zeros explicitly.
    """

    def __init__(self, a: Callable | None = None, b: Callable | None = None, time_range=(0.0, 1.0),
                 singular: Mapping | None = None, name: str = "custom"):
        where = "schedule 'custom'"
        for label, fn in (("a", a), ("b", b)):
            if fn is None or not callable(fn):
                raise ParameterError(f"{where}: {label} must be a callable {label}(t) (torch functions); received {fn!r}")
        self.a, self.b = a, b
        self.name = str(name)
        self.time_range = _range(time_range, where)
        lo, hi = self.time_range
        grid = _check_grid(lo, hi)
        for label, fn in (("a", a), ("b", b)):
            values, slope = autograd_derivative(fn, grid, label)
            if not bool(torch.isfinite(values).all()):
                bad = int((~torch.isfinite(values)).nonzero()[0, 0])
                raise ParameterError(f"{where}: {label}(t) is not finite at t = {float(grid[bad]):.6g}")
            varies = bool((values != values[0]).any())
            if varies and not bool((slope != 0).any()):
                raise ParameterError(
                    f"{where}: {label}(t) varies with t but autograd sees no dependence on t; write it with "
                    "torch functions (math/numpy functions drop the autograd history)"
                )
        if singular is None:
            self.singular = {
                "a_zero": _zeros_on(lambda g: autograd_derivative(a, g)[0], lo, hi),
                "b_zero": _zeros_on(lambda g: autograd_derivative(b, g)[0], lo, hi),
            }
        else:
            unknown = set(singular) - {"a_zero", "b_zero"}
            if unknown:
                raise ParameterError(f"{where}: singular has unknown keys {sorted(unknown)}; use 'a_zero' and 'b_zero'")
            self.singular = {k: tuple(sorted(float(v) for v in singular.get(k, ()))) for k in ("a_zero", "b_zero")}

    def _coefficients(self, t):
        a, da = autograd_derivative(self.a, t, "a")
        b, db = autograd_derivative(self.b, t, "b")
        return a, da, b, db

    def describe(self):
        return {
            "name": self.name,
            "a": _callable_name(self.a),
            "b": _callable_name(self.b),
            "time_range": list(self.time_range),
            "singular": {k: list(v) for k, v in self.singular.items()},
        }


def _callable_name(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


# -- lookup -------------------------------------------------------------------------------------------------


def get(name: str, /, **params) -> Schedule:
    """Build the registered schedule ``name`` (``registry.schedule(name, **params)``)."""
    from .plugins import get_registry

    return get_registry().schedule(name, **params)


def as_schedule(spec) -> Schedule:
    """A :class:`Schedule` from a schedule, a registered name, or ``{"name": ..., **params}``."""
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, str):
        return get(spec)
    if isinstance(spec, Mapping):
        params = dict(spec)
        name = params.pop("name", None)
        if not isinstance(name, str):
            raise ParameterError(f"a schedule mapping needs a 'name' key naming a registered schedule; received {spec!r}")
        return get(name, **params)
    if all(callable(getattr(spec, m, None)) for m in ("coefficients",)) and hasattr(spec, "time_range"):
        return spec  # a third-party object following the protocol
    raise ParameterError(
        f"expected a schedule (a Schedule, a registered name or {{'name': ..., **params}}); received {spec!r}"
    )
