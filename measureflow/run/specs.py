"""Small frozen specs a run is made of: its time grid, its stop policy, its checkpointing."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import attrs

from ..errors import MeasureflowError, ParameterError, TimeRangeError
from ..triggers import as_trigger

__all__ = ["TimeGrid", "StopPolicy", "Checkpointing"]


@attrs.frozen
class TimeGrid:
    """The output times t_0 … t_n of a run: ``steps`` equal intervals from ``t0`` to ``t1``, or the
    explicit strictly monotone ``times`` (t_0 = t0, t_n = t1). t1 < t0 runs backwards. Build one
    with :meth:`from_arguments`, which checks what a user gave."""

    t0: float
    t1: float
    steps: int
    times: tuple | None = None

    @classmethod
    def from_arguments(cls, t0=0.0, t1=1.0, steps=None, dt=None, times=None) -> "TimeGrid":
        """From the keyword arguments a user gives: exactly one of ``steps``, ``dt`` (dividing
        t1 − t0) or ``times``."""
        if times is not None:
            if steps is not None or dt is not None:
                raise MeasureflowError("give one of steps, dt or times, not several")
            try:
                grid = [float(t) for t in times]
            except (TypeError, ValueError):
                raise MeasureflowError(f"times must be a sequence of numbers; received {times!r}") from None
            if len(grid) < 2 or not all(math.isfinite(t) for t in grid):
                raise MeasureflowError(f"times must hold at least two finite times; received {len(grid)}")
            gaps = [b - a for a, b in zip(grid[:-1], grid[1:])]
            if not (all(g > 0 for g in gaps) or all(g < 0 for g in gaps)):
                raise MeasureflowError("times must be strictly increasing or strictly decreasing")
            # t0 = 0, t1 = 1 are the signature defaults: only explicit values that disagree are an error
            for name, given, end, default in (("t0", t0, grid[0], 0.0), ("t1", t1, grid[-1], 1.0)):
                if float(given) != default and float(given) != end:
                    raise MeasureflowError(f"{name} = {given:g} disagrees with times ({name} = {end:g}); leave {name} out")
            return cls(grid[0], grid[-1], len(grid) - 1, tuple(grid))
        try:
            t0, t1 = float(t0), float(t1)
        except (TypeError, ValueError):
            raise MeasureflowError(f"t0 and t1 must be numbers; received t0 = {t0!r}, t1 = {t1!r}") from None
        if not (math.isfinite(t0) and math.isfinite(t1)) or t0 == t1:
            raise TimeRangeError(f"need finite t0 != t1; received t0 = {t0!r}, t1 = {t1!r}")
        span = t1 - t0
        if (steps is None) == (dt is None):
            raise MeasureflowError("give exactly one of steps (number of intervals) or dt (step size)")
        if steps is not None:
            if isinstance(steps, bool) or int(steps) != steps or int(steps) < 1:
                raise MeasureflowError(f"steps must be a positive integer; received {steps!r}")
            return cls(t0, t1, int(steps))
        dt = float(dt)
        if dt <= 0 or not math.isfinite(dt):
            raise MeasureflowError(f"dt must be positive and finite; received {dt!r} (the sign follows t1 − t0)")
        n = round(abs(span) / dt)
        if n < 1 or abs(n * dt - abs(span)) > 1e-9 * max(1.0, abs(span)):
            raise MeasureflowError(
                f"dt = {dt:g} does not divide t1 − t0 = {span:g}; use steps= instead, or a dt that divides the span"
            )
        return cls(t0, t1, n)

    def time_at(self, step: int) -> float:
        """tₖ computed from k (never accumulated, so the grid ends exactly at t1)."""
        if self.times is not None:
            return self.times[step]
        if step == self.steps:
            return self.t1
        return self.t0 + (self.t1 - self.t0) * step / self.steps

    def all(self) -> list[float]:
        """t_0 … t_n."""
        return [self.time_at(k) for k in range(self.steps + 1)]

    def describe(self) -> dict:
        out = {"t0": self.t0, "t1": self.t1, "steps": self.steps}
        if self.times is not None:
            out["times"] = list(self.times)
        return out


def _optional_positive(name):
    def check(instance, attribute, value):
        if value is not None and not (value > 0):
            raise ParameterError(f"{name} must be > 0 or None; received {value!r}")

    return check


@attrs.frozen
class StopPolicy:
    """When a run stops early: ``blowup`` (stop when the state's largest |value| exceeds it; None:
    never), ``wall_time`` (seconds), ``check_every`` (also read the health record every this many
    steps; by default only where data leaves the device anyway), ``sigterm`` (SIGTERM ends the run
    cleanly at the end of the current step)."""

    blowup: float | None = attrs.field(default=1e12, converter=attrs.converters.optional(float),
                                       validator=_optional_positive("blowup"))
    wall_time: float | None = attrs.field(default=None, converter=attrs.converters.optional(float),
                                          validator=_optional_positive("wall_time"))
    check_every: int | None = attrs.field(default=None, converter=attrs.converters.optional(lambda v: max(1, int(v))))
    sigterm: bool = True


@attrs.frozen
class Checkpointing:
    """Where and when a run saves what a resumed run needs: ``path`` (None: never), ``every`` (a
    trigger; never on the last step), ``resume`` (continue from an existing file at ``path``),
    ``at_end`` (also save when the run completes, so that it can later be continued further)."""

    path: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    every: Any = attrs.field(default=None, converter=as_trigger)
    resume: bool = False
    at_end: bool = False
