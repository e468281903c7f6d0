"""Triggers: small, picklable objects that decide on which steps something runs.

A trigger is called with the step index (0 is the initial state, before any step) and returns a
bool. ``Periodic(k)`` fires on steps 0, k, 2k, …; ``On(steps)`` on the listed steps; a bare int k
given where a trigger is expected means ``Periodic(k)``.
"""

from __future__ import annotations

import attrs

__all__ = ["Trigger", "Periodic", "On", "Never", "as_trigger"]


class Trigger:
    def __call__(self, step: int) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


@attrs.frozen
class Periodic(Trigger):
    """Fires when ``step % period == phase`` (period ≥ 1)."""

    period: int = attrs.field(validator=[attrs.validators.instance_of(int), attrs.validators.ge(1)])
    phase: int = attrs.field(default=0, validator=attrs.validators.ge(0))

    def __call__(self, step: int) -> bool:
        return step % self.period == self.phase % self.period


@attrs.frozen
class On(Trigger):
    """Fires on the listed steps."""

    steps: frozenset = attrs.field(converter=lambda s: frozenset(int(v) for v in ([s] if isinstance(s, int) else s)))

    def __call__(self, step: int) -> bool:
        return step in self.steps


@attrs.frozen
class Never(Trigger):
    def __call__(self, step: int) -> bool:
        return False


def as_trigger(value) -> Trigger:
    """Accept a Trigger, an int k (every k steps), None (never) or an iterable of steps."""
    if isinstance(value, Trigger):
        return value
    if value is None:
        return Never()
    if isinstance(value, bool):
        raise TypeError("a trigger cannot be a bool; use an int period, Periodic(k) or On([...])")
    if isinstance(value, int):
        return Periodic(value)
    if callable(value):
        return value
    try:
        return On(value)
    except TypeError as exc:
        raise TypeError(f"cannot make a trigger from {value!r}: use an int, Periodic(k) or On([...])") from exc
