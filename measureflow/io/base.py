"""The writer protocol and the time series container shared by writers and the reader.

A writer is told once what the run looks like (:class:`~measureflow.io.runinfo.RunInfo`), then
receives frames and observables on the steps its :attr:`Writer.trigger` selects. Data leaves the
device only inside :meth:`Writer.write_frame` and :meth:`Writer.write_observables`.
"""

from __future__ import annotations

from typing import Any

import attrs

from ..triggers import Periodic, Trigger, as_trigger

__all__ = ["Writer", "Series"]


class Writer:
    """Base class of trajectory sinks (HDF5 file, in-memory lists).

    Call order: ``open(run)``, then any number of ``write_frame`` / ``write_observables``, optional
    ``flush()``, ``set_status(...)``, and ``close()``. ``flush`` and ``close`` are idempotent and safe
    to call after an exception interrupted a write (e.g. from a SIGTERM handler that raises).
    """

    trigger: Trigger = Periodic(1)

    def __init__(self, every=1):
        self.trigger = as_trigger(every)

    def open(self, run) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def write_frame(self, step: int, time: float, state) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def write_observables(self, step: int, time: float, values: dict) -> None:  # pragma: no cover
        raise NotImplementedError

    def set_status(self, status: str, step: int, time: float, message: str = "") -> None:
        """Record how the run ended (e.g. "completed", "failed", "interrupted")."""

    def flush(self) -> None:
        """Make what was written so far durable (no-op for writers that hold data in memory)."""

    def close(self) -> None:
        """Flush and release resources; calling it twice is harmless."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


@attrs.frozen(eq=False)
class Series:
    """A sampled quantity: ``values[i]`` was taken at ``steps[i]`` (integer step) and ``times[i]``.

    ``values`` is a numpy array or a lazy array (reader) of shape (samples, R, ...).
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
