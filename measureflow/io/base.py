"""The writer protocol and the one time-series type shared by writers, readers and results.

A writer is told once what the run looks like (:class:`~measureflow.io.runinfo.RunInfo`), then
receives frames and observables on the steps its :attr:`Writer.trigger` selects. Data leaves the
device only inside :meth:`Writer.write_frame` and :meth:`Writer.write_observables`.
"""

from __future__ import annotations

import abc
from typing import Any

import attrs

from ..triggers import Periodic, Trigger, as_trigger

__all__ = ["Writer", "Series"]


class Writer(abc.ABC):
    """A trajectory sink (an H5MD file, in-memory lists, a fan-out to several writers).

    Call order: ``open(run)``, then any number of ``write_frame`` / ``write_observables``, optional
    ``flush()``, ``set_status(...)``, and ``close()``. ``flush`` and ``close`` are idempotent and safe
    to call after an exception interrupted a write (e.g. from a SIGTERM handler that raises).
    ``trigger`` selects the steps on which the run calls the writer (an int k = every k steps).
    """

    trigger: Trigger = Periodic(1)

    def __init__(self, every=1):
        self.trigger = as_trigger(every)

    @abc.abstractmethod
    def open(self, run) -> None:
        """Prepare for a run described by ``run`` (a :class:`~measureflow.io.runinfo.RunInfo`).

        With ``run.resume_step`` set, what was written after that step is dropped and writing
        continues after it.
        """

    @abc.abstractmethod
    def write_frame(self, step: int, time: float, state) -> None:
        """Record the state (Particles (R, N, d) or Gaussians (R, d), (R, d, d)) at ``step``, ``time``."""

    @abc.abstractmethod
    def write_observables(self, step: int, time: float, values: dict) -> None:
        """Record one sample of each observable (name → tensor or array of shape (R, ...))."""

    def set_status(self, status: str, step: int, time: float, message: str = "") -> None:
        """Record how the run ended (a :data:`measureflow.status.CODES` code, where, and why).

        Does nothing by default: a writer that keeps no record of the run's end need not override it.
        """

    def flush(self) -> None:
        """Make what was written so far durable; does nothing by default (writers holding data in memory)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush and release resources; calling it twice is harmless."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


@attrs.frozen(eq=False)
class Series:
    """A sampled quantity: ``values[i]`` was taken at integer step ``steps[i]``, time ``times[i]``.

    The one series type of measureflow: observables of a trajectory file, of an in-memory
    trajectory and of a simulation result are all ``Series``.

    Attributes
    ----------
    name:
        The quantity's name (the observable's name, e.g. ``"energy"`` or ``"w2"``).
    steps:
        (samples,) integer steps.
    times:
        (samples,) float times (NaN where a file stored no time).
    values:
        (samples, R, ...) samples, one row per step: a numpy array, or a lazy
        :class:`~measureflow.io.reader.FrameArray` (a file's observables) that reads the rows it
        is indexed with; ``values[:]`` reads all of them.

    Compared by identity (``eq=False``): its arrays have no single truth value.
    """

    name: str
    steps: Any
    times: Any
    values: Any

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        shape = tuple(getattr(self.values, "shape", ()))
        return f"Series({self.name!r}, samples={len(self)}, shape={shape})"
