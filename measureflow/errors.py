"""Exceptions a user can cause; each message says what was wrong, where, and what to do."""

from __future__ import annotations


class MeasureflowError(Exception):
    """Base class of every error measureflow raises on bad input."""


class ShapeError(MeasureflowError, ValueError):
    """A tensor has the wrong shape (the message names the expected and the received shape)."""


class StateError(MeasureflowError, ValueError):
    """A state or measure is invalid (non-SPD covariance, weights not summing to one, mixed devices)."""


class CapabilityError(MeasureflowError, TypeError):
    """A field lacks what the run needs (e.g. no Gaussian closure for a Gaussian state)."""


class TimeRangeError(MeasureflowError, ValueError):
    """A time lies outside a field's range; the message names the safe range."""


class PluginError(MeasureflowError):
    """Registration problem: duplicate names, broken plugins."""


class UnknownPluginError(PluginError, KeyError):
    """A name that no plugin registered; the message lists the registered names."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class TrajectoryFileError(MeasureflowError, OSError):
    """A file that is unreadable or not a measureflow/H5MD trajectory."""


class ResumeRefusedError(TrajectoryFileError):
    """A resume that would lose or invent data: the file is damaged, holds another run, or lacks
    frames its checkpoint counts as written (the message names them and says how to start over)."""


class ParameterError(MeasureflowError, ValueError):
    """A scenario parameter is unknown or cannot be converted to its declared type."""


class StepFailure(MeasureflowError, RuntimeError):
    """A step could not be taken: the state went non-finite, a covariance left the SPD cone after
    the maximum number of step reductions, or an adaptive step fell below ``dt_min``.

    ``reason`` is a short phrase (e.g. ``"covariance left the SPD cone"``); ``time`` is the time at
    which the failing step started. A run records both as its status (``step_failure``).
    """

    def __init__(self, reason: str, time: float, detail: str = ""):
        self.reason = str(reason)
        self.time = float(time)
        self.detail = str(detail)
        message = f"step failure at t = {self.time:.9g}: {self.reason}"
        if self.detail:
            message += f" ({self.detail})"
        super().__init__(message)

    def __reduce__(self):  # keep reason/time when pickled across processes
        return (type(self), (self.reason, self.time, self.detail))


class TriggerError(MeasureflowError, TypeError):
    """A trigger that cannot be used: not callable as trigger(step, time), or not picklable."""
