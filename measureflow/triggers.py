"""Triggers: small, picklable objects that decide on which steps an operation runs (HOOMD's shape).

A trigger is called with the step index (0 is the initial state, before any step) and the step's
time, and returns a bool::

    Periodic(10)                  steps 0, 10, 20, …
    Periodic(10, phase=5)         steps 5, 15, 25, …
    On([3, 7])                    steps 3 and 7
    At([0.5, 1.0])                the first step at or past each of these times
    Before(100), After(100)       steps < 100, steps > 100
    Periodic(10) & After(100)     compose with &, |, ~ (And, Or, Not)
    Always(), Never()

A bare int k given where a trigger is expected means ``Periodic(k)``; None means ``Never()``; a list
of ints means ``On(list)``. Triggers pickle, because a distributed sweep ships them to its workers:
a lambda or a function defined inside another function cannot be pickled and is refused with a
message saying so. A module-level function ``f(step, time) -> bool`` is accepted.

Time-based triggers (:class:`At`) are resolved against the run's time grid when the run starts
(:meth:`Trigger.resolve`), so that the loop only ever compares integers.
"""

from __future__ import annotations

import abc
import math
import pickle
from typing import Callable

import attrs

from .errors import ParameterError, TriggerError

__all__ = [
    "Trigger",
    "Periodic",
    "On",
    "At",
    "Before",
    "After",
    "And",
    "Or",
    "Not",
    "Always",
    "Never",
    "FunctionTrigger",
    "as_trigger",
]


class Trigger(abc.ABC):
    """Base class of triggers (see the module docstring)."""

    @abc.abstractmethod
    def __call__(self, step: int, time: float | None = None) -> bool:
        """Whether the operation runs at ``step`` (time ``time``)."""

    @property
    def pure(self) -> bool:
        """Whether asking this trigger has no effect beyond its answer, so that a run may ask it about
        steps ahead (a compiled run sizing a chunk of steps that nothing interrupts). False unless
        the trigger says so: a subclass or a function of a user's may count its calls, and a run
        then asks it about each step once, when the step is taken."""
        return False

    def resolve(self, times) -> "Trigger":
        """This trigger for a run on the time grid ``times`` (times[k] is the time of step k);
        time-based triggers become step-based ones, others are returned unchanged."""
        return self

    def __and__(self, other) -> "Trigger":
        return And((self, as_trigger(other)))

    def __or__(self, other) -> "Trigger":
        return Or((self, as_trigger(other)))

    def __invert__(self) -> "Trigger":
        return Not(self)


def _int_at_least(low: int, what: str):
    def check(instance, attribute, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ParameterError(f"{type(instance).__name__}: {what} must be an integer >= {low}; received {value!r}")

    return check


@attrs.frozen
class Periodic(Trigger):
    """Fires when ``step % period == phase % period`` (period ≥ 1).

    >>> every_third = Periodic(3, phase=1)
    >>> [step for step in range(10) if every_third(step)]
    [1, 4, 7]
    >>> both = Periodic(2) & ~On([4])
    >>> [step for step in range(9) if both(step)]
    [0, 2, 6, 8]
    """

    pure = True  # its answer only (Trigger.pure)

    period: int = attrs.field(validator=_int_at_least(1, "period"))
    phase: int = attrs.field(default=0, validator=_int_at_least(0, "phase"))

    def __call__(self, step: int, time: float | None = None) -> bool:
        return step % self.period == self.phase % self.period


def _steps(value) -> frozenset:
    items = [value] if isinstance(value, int) else list(value)
    for v in items:
        if isinstance(v, bool) or int(v) != v:
            raise TriggerError(f"On: steps must be integers; received {v!r}")
    return frozenset(int(v) for v in items)


@attrs.frozen
class On(Trigger):
    """Fires on the listed steps.

    >>> On([0, 5])(5), On(3)(4)
    (True, False)
    """

    pure = True  # its answer only (Trigger.pure)

    steps: frozenset = attrs.field(converter=_steps)

    def __call__(self, step: int, time: float | None = None) -> bool:
        return step in self.steps


def _times(value) -> tuple:
    items = [value] if isinstance(value, (int, float)) else list(value)
    out = []
    for v in items:
        t = float(v)
        if not math.isfinite(t):
            raise TriggerError(f"At: times must be finite; received {v!r}")
        out.append(t)
    return tuple(sorted(set(out)))


@attrs.frozen
class At(Trigger):
    """Fires on the first step whose time is at or past each listed time (in the run's direction);
    a time before the run's start fires at step 0, one after its end never fires."""

    pure = True  # its answer only (Trigger.pure)

    times: tuple = attrs.field(converter=_times)

    def resolve(self, times) -> Trigger:
        grid = [float(t) for t in times]
        if len(grid) < 1:
            return Never()
        sign = 1.0 if len(grid) < 2 or grid[-1] >= grid[0] else -1.0
        steps = set()
        for tau in self.times:
            for k, t in enumerate(grid):
                if sign * (t - tau) >= -1e-12 * max(1.0, abs(tau)):
                    steps.add(k)
                    break
        return On(steps)

    def __call__(self, step: int, time: float | None = None) -> bool:
        raise TriggerError("At(times) must be resolved against a time grid first: trigger.resolve(times)")


@attrs.frozen
class Before(Trigger):
    """Fires on steps before ``step`` (step < k)."""

    pure = True  # its answer only (Trigger.pure)

    step: int = attrs.field(validator=_int_at_least(0, "step"))

    def __call__(self, step: int, time: float | None = None) -> bool:
        return step < self.step


@attrs.frozen
class After(Trigger):
    """Fires on steps after ``step`` (step > k)."""

    pure = True  # its answer only (Trigger.pure)

    step: int = attrs.field(validator=_int_at_least(0, "step"))

    def __call__(self, step: int, time: float | None = None) -> bool:
        return step > self.step


@attrs.frozen
class And(Trigger):
    """Fires when every one of ``triggers`` fires."""

    triggers: tuple = attrs.field(converter=lambda ts: tuple(as_trigger(t) for t in ts))

    @property
    def pure(self) -> bool:
        return all(t.pure for t in self.triggers)

    def resolve(self, times) -> Trigger:
        return And(tuple(t.resolve(times) for t in self.triggers))

    def __call__(self, step: int, time: float | None = None) -> bool:
        return all(t(step, time) for t in self.triggers)


@attrs.frozen
class Or(Trigger):
    """Fires when any one of ``triggers`` fires."""

    triggers: tuple = attrs.field(converter=lambda ts: tuple(as_trigger(t) for t in ts))

    @property
    def pure(self) -> bool:
        return all(t.pure for t in self.triggers)

    def resolve(self, times) -> Trigger:
        return Or(tuple(t.resolve(times) for t in self.triggers))

    def __call__(self, step: int, time: float | None = None) -> bool:
        return any(t(step, time) for t in self.triggers)


@attrs.frozen
class Not(Trigger):
    """Fires when ``trigger`` does not."""

    trigger: Trigger = attrs.field(converter=lambda t: as_trigger(t))

    @property
    def pure(self) -> bool:
        return self.trigger.pure

    def resolve(self, times) -> Trigger:
        return Not(self.trigger.resolve(times))

    def __call__(self, step: int, time: float | None = None) -> bool:
        return not self.trigger(step, time)


@attrs.frozen
class Always(Trigger):
    """Fires on every step."""

    pure = True  # its answer only (Trigger.pure)

    def __call__(self, step: int, time: float | None = None) -> bool:
        return True


@attrs.frozen
class Never(Trigger):
    """Never fires."""

    pure = True  # its answer only (Trigger.pure)

    def __call__(self, step: int, time: float | None = None) -> bool:
        return False


def _check_picklable(function: Callable) -> None:
    qualname = getattr(function, "__qualname__", "")
    name = getattr(function, "__name__", type(function).__name__)
    why = None
    if name == "<lambda>":
        why = "it is a lambda"
    elif "<locals>" in qualname:
        why = f"{qualname!r} is defined inside another function"
    else:
        try:
            pickle.dumps(function)
        except Exception as exc:  # noqa: BLE001 - any pickling failure means the same thing
            why = f"it cannot be pickled ({type(exc).__name__}: {exc})"
    if why is not None:
        raise TriggerError(
            f"cannot use {name!r} as a trigger: {why}. Triggers must pickle because a distributed sweep "
            "(Ray) ships them to its workers; use Periodic(k), On([...]), At([...]), Before/After and their "
            "combinations with & | ~, or a function defined at module level"
        )


@attrs.frozen
class FunctionTrigger(Trigger):
    """A module-level function ``function(step, time) -> bool`` used as a trigger."""

    function: Callable = attrs.field()

    @function.validator
    def _picklable(self, attribute, value):
        if not callable(value):
            raise TriggerError(f"FunctionTrigger needs a callable; received {value!r}")
        _check_picklable(value)

    def __call__(self, step: int, time: float | None = None) -> bool:
        return bool(self.function(step, time))


def as_trigger(value) -> Trigger:
    """A Trigger from a Trigger, an int k (every k steps), None (never), an iterable of steps, or a
    picklable module-level function ``f(step, time) -> bool``."""
    if isinstance(value, Trigger):
        return value
    if value is None:
        return Never()
    if isinstance(value, bool):
        raise TriggerError("a trigger cannot be a bool; use an int period, Periodic(k), On([...]), Always() or Never()")
    if isinstance(value, int):
        if value < 1:
            raise ParameterError(
                f"a trigger period (every k steps) must be a whole number ≥ 1; received {value}. Pass 1 for every "
                "step, or None to never fire"
            )
        return Periodic(value)
    if callable(value):
        return FunctionTrigger(value)
    try:
        return On(value)
    except TypeError as exc:
        raise TriggerError(
            f"cannot make a trigger from {value!r}: use an int, Periodic(k), On([...]) or At([...])"
        ) from exc
