"""Events: stop or record exactly when a scalar of the state changes sign (MATH.md §15.4).

An :class:`Event` wraps ``fn(t, state) -> (R,)``, one value per replica. After every accepted solver
step the run evaluates it at the step's end; where the sign changed inside the step (in the requested
``direction``) the crossing time is found by root-finding (Brent's method) on the step's dense
output (:mod:`measureflow.integrators.dense`: the Dormand–Prince interpolant, cubic Hermite for the
other Runge–Kutta methods), to ``tol`` in time. The dense output is what the solver computed anyway,
so locating an event costs evaluations of ``fn`` and of the interpolant, never a field evaluation
beyond one per step for Hermite's end slope.

* A recorded event is listed in ``result.events`` (an :class:`EventRecord` with ``.t``,
  ``.replica``, ``.state`` — that replica's state at ``t`` — ``.name`` and ``.value`` of the other
  events there) and stored in the H5MD file under ``/observables/events``.
* A ``terminal`` event ends the run at the first crossing of any replica (replicas share one time
  grid): the final state is the whole batch at that time and the status is ``event``.

Built-ins: :func:`crossing` (an observable crossing a level, e.g. MMD to the target falling below a
tolerance) and :func:`eigenvalue_above` (the largest covariance eigenvalue passing a bound: the
attention blow-up of MATH.md §10).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import attrs
import torch

from .errors import MeasureflowError, ShapeError
from .state import Gaussians, Particles, state_kind

__all__ = ["Event", "EventRecord", "EventMonitor", "crossing", "eigenvalue_above", "replica_of"]


def _direction(value) -> int:
    if value not in (-1, 0, 1):
        raise MeasureflowError(f"Event direction must be -1 (falling), 0 (either) or +1 (rising); received {value!r}")
    return int(value)


def _positive_tol(instance, attribute, value):
    if not (value > 0 and math.isfinite(value)):
        raise MeasureflowError(f"Event tol must be a positive time tolerance; received {value!r}")


@attrs.frozen(eq=False)
class Event:
    """A sign change of ``fn(t, state) -> (R,)`` to locate during a run (module docstring).

    Parameters
    ----------
    fn:
        one value per replica, shape (R,), of the time and the state (Particles or Gaussians).
    terminal:
        stop the run at the first crossing (status ``event``).
    direction:
        +1: only crossings from negative to positive; −1: from positive to negative; 0: both.
    tol:
        the time tolerance of the root-finding (default 1e-12).
    name:
        the name in ``result.events`` and the file (default: fn's name).
    """

    fn: Callable = attrs.field()
    terminal: bool = attrs.field(default=False, converter=bool)
    direction: int = attrs.field(default=0, converter=_direction)
    tol: float = attrs.field(default=1e-12, converter=float, validator=_positive_tol)
    name: str = attrs.field(default="")

    def __attrs_post_init__(self):
        if not callable(self.fn):
            raise MeasureflowError(f"Event needs a function fn(t, state) -> (R,); received {type(self.fn).__name__}")
        if not self.name:
            object.__setattr__(self, "name", getattr(self.fn, "__name__", "event").strip("<>") or "event")

    def values(self, t: float, state) -> torch.Tensor:
        """fn at (t, state), checked to be one real value per replica."""
        out = self.fn(t, state)
        R = state.replicas
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (R,):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ShapeError(f"event {self.name!r}: fn(t, state) must return one value per replica, shape ({R},); "
                             f"it returned {got}")
        return out.detach()

    def describe(self) -> dict:
        return {"name": self.name, "terminal": self.terminal, "direction": self.direction, "tol": self.tol}


@attrs.frozen(eq=False)
class EventRecord:
    """One located crossing: event ``name`` (index ``index`` in ``events=``), time ``t``, the
    ``replica`` that crossed, its ``state`` at t (one replica), whether it ended the run, and the
    output ``step`` whose interval holds t."""

    name: str
    index: int
    t: float
    replica: int
    state: Any
    terminal: bool = False
    step: int = 0  # the output step whose interval holds t

    def __repr__(self) -> str:
        return f"EventRecord({self.name!r}, t={self.t:.12g}, replica={self.replica}{', terminal' if self.terminal else ''})"


def replica_of(state, r: int):
    """Replica r of a state, as a state with one replica."""
    if isinstance(state, Gaussians):
        return state.with_parameters(state.mean[r:r + 1], state.cov[r:r + 1])
    if isinstance(state, Particles):
        w = None if state.weights is None else state.weights[r:r + 1]
        out = Particles(state.x[r:r + 1], w)
        return out.with_channels({k: v[r:r + 1] for k, v in state.channels.items()})
    raise MeasureflowError(f"replica_of: unknown state {type(state).__name__}")


def _crosses(g0: float, g1: float, direction: int) -> bool:
    if not (math.isfinite(g0) and math.isfinite(g1)) or g0 == 0.0:
        return False
    if g0 < 0.0 <= g1:
        return direction >= 0
    if g0 > 0.0 >= g1:
        return direction <= 0
    return False


def _brent(f, a: float, b: float, fa: float, fb: float, tol: float, max_iter: int = 200) -> float:
    """A root of f in [a, b] (fa·fb ≤ 0) to |interval| ≤ tol: Brent's method (inverse quadratic
    interpolation, secant, bisection), on host floats."""
    if fb == 0.0:
        return b
    c, fc = a, fa
    d = e = b - a
    for _ in range(max_iter):
        if (fb > 0) == (fc > 0):
            c, fc = a, fa
            d = e = b - a
        if abs(fc) < abs(fb):
            a, b, c = b, c, b
            fa, fb, fc = fb, fc, fb
        m = 0.5 * (c - b)
        tol1 = 2.0 * 2.2e-16 * abs(b) + 0.5 * tol
        if abs(m) <= tol1 or fb == 0.0:
            return b
        if abs(e) >= tol1 and abs(fa) > abs(fb):
            s = fb / fa
            if a == c:
                p, q = 2.0 * m * s, 1.0 - s
            else:
                q, r = fa / fc, fb / fc
                p = s * (2.0 * m * q * (q - r) - (b - a) * (r - 1.0))
                q = (q - 1.0) * (r - 1.0) * (s - 1.0)
            if p > 0:
                q = -q
            p = abs(p)
            if 2.0 * p < min(3.0 * m * q - abs(tol1 * q), abs(e * q)):
                e, d = d, p / q
            else:
                d = e = m
        else:
            d = e = m
        a, fa = b, fb
        b += d if abs(d) > tol1 else math.copysign(tol1, m)
        fb = f(b)
    return b


class EventMonitor:
    """The events of one run: values at the last accepted step, crossings located on dense output."""

    def __init__(self, events):
        self.events = tuple(events)
        for e in self.events:
            if not isinstance(e, Event):
                raise MeasureflowError(f"events must be measureflow.Event objects; received {e!r}")
        self.records: list[EventRecord] = []
        self._last = None

    @property
    def waiting(self) -> bool:
        """True before :meth:`start` (a fresh or resumed run's first step)."""
        return self._last is None

    def start(self, t: float, state) -> None:
        """Values at the start of the run (checks every fn's shape before any step)."""
        self._last = [e.values(t, state).tolist() for e in self.events]

    def after(self, denses, end_state, step: int = 0):
        """Locate the crossings inside the accepted steps ``denses`` (oldest first) whose last one
        ends at ``end_state`` (None: read it from the dense output). Returns (t*, state at t*) of the
        first terminal crossing, or None."""
        if self._last is None:
            raise MeasureflowError("EventMonitor.after called before start")
        for k, dense in enumerate(denses):
            t1 = dense.t1
            at_end = k == len(denses) - 1 and end_state is not None
            state1 = end_state if at_end else dense(t1)
            now = [e.values(t1, state1).tolist() for e in self.events]
            found = []
            for i, event in enumerate(self.events):
                for r, (g0, g1) in enumerate(zip(self._last[i], now[i])):
                    if _crosses(g0, g1, event.direction):
                        t = self._locate(event, dense, r, g0, g1)
                        found.append((t, i, r))
            self._last = now
            if not found:
                continue
            found.sort()
            stop_at = next((t for t, i, _ in found if self.events[i].terminal), None)
            for t, i, r in found:
                if stop_at is not None and t > stop_at:
                    break
                event = self.events[i]
                state = state1 if t == t1 else dense(t)
                self.records.append(EventRecord(event.name, i, t, r, replica_of(state, r),
                                                terminal=event.terminal and t == stop_at, step=step))
            if stop_at is not None:
                return stop_at, (state1 if stop_at == t1 else dense(stop_at))
        return None

    @staticmethod
    def _locate(event: Event, dense, r: int, g0: float, g1: float) -> float:
        t0, t1 = dense.t0, dense.t1

        def f(t):
            return float(event.values(t, dense(t))[r])

        return _brent(f, t0, t1, g0, g1, event.tol)


# -- built-in events --------------------------------------------------------------------------------------------
def crossing(observable, level: float, *, direction: int = -1, terminal: bool = False, tol: float = 1e-12,
             name: str | None = None, **arguments) -> Event:
    """An observable crossing ``level``: fn = observable(state) − level.

    ``observable`` is a callable ``f(state, **arguments) -> (R,)`` or a registered observable name
    (e.g. ``"mmd"`` with ``target=...``); ``direction=-1`` (default) fires when it falls below the
    level (a distance to the target under a tolerance).
    """
    level = float(level)
    if isinstance(observable, str):
        from .plugins import get_registry

        func = get_registry().get("observables", observable)
        label = observable
    elif callable(observable):
        func, label = observable, getattr(observable, "__name__", "observable")
    else:
        raise MeasureflowError(f"crossing: observable must be a callable or a registered name; received {observable!r}")

    def fn(t, state):
        value = func(state, t=t, **arguments) if isinstance(observable, str) else func(state, **arguments)
        return value.reshape(state.replicas) - level

    return Event(fn, terminal=terminal, direction=direction, tol=tol, name=name or f"{label}_crosses_{level:g}")


def _covariance(state) -> torch.Tensor:
    if state_kind(state) == "gaussians":
        return state.cov
    return state.covariance()


def eigenvalue_above(bound: float, *, terminal: bool = True, tol: float = 1e-12, name: str | None = None) -> Event:
    """The largest covariance eigenvalue passing ``bound`` (the attention blow-up, MATH.md §10).

    fn = 1/bound − 1/λ_max(Σ): the same zero as λ_max − bound, but smooth up to a blow-up (for Σ̇ = 2cΣ²,
    1/λ_max falls linearly, so the crossing is t* − 1/(2c·bound) with t* = 1/(2cλ_max(Σ₀))).
    """
    bound = float(bound)
    if not (bound > 0 and math.isfinite(bound)):
        raise MeasureflowError(f"eigenvalue_above: bound must be positive and finite; received {bound!r}")

    def fn(t, state):
        top = torch.linalg.eigvalsh(_covariance(state))[..., -1]
        return 1.0 / bound - 1.0 / top

    return Event(fn, terminal=terminal, direction=1, tol=tol, name=name or f"eigenvalue_above_{bound:g}")
