"""In-memory trajectory: frames kept as host numpy arrays (tests, notebooks, small runs).

:class:`MemoryWriter` is a writer and a :class:`~measureflow.io.trajectory.Trajectory`: after (or
during) a run it answers ``steps``, ``times``, ``positions`` (frames × R × N × d), ``weights``,
``means`` / ``covs`` (Gaussian runs), ``observables`` (name → :class:`~measureflow.io.base.Series`),
``parameters`` and ``status`` like a trajectory file does.
"""

from __future__ import annotations

from ..status import Status
from .base import Writer
from .runinfo import RunInfo
from .trajectory import RecordedTrajectory

__all__ = ["MemoryWriter"]


class MemoryWriter(Writer, RecordedTrajectory):
    """Keep every written frame and observable sample in lists of numpy arrays.

    Before :meth:`open` it is an empty trajectory whose ``kind`` is None. Opening it again with
    ``RunInfo.resume_step`` set drops what lies after that step, as the file writer does.
    ``status`` is the :class:`~measureflow.status.Status` given to :meth:`set_status` (None before).
    """

    def __init__(self, every=1):
        Writer.__init__(self, every)
        self._start_empty()
        self.run: RunInfo | None = None
        self.closed = False

    def open(self, run: RunInfo) -> None:
        self.run = run
        self.closed = False
        self._describe(run.kind, run.replicas, run.size, run.dim, dtype=run.dtype, weights=run.weights,
                       moving_weights=run.moving_weights,
                       parameters=run.parameters)
        self.declare_observables(run.observable_names)
        if run.resume_step is not None:
            self.drop_after(run.resume_step)

    def write_frame(self, step: int, time: float, state) -> None:
        if self.run is None:
            raise RuntimeError("MemoryWriter: call open(run) before writing")
        self.record_frame(step, time, state)

    def write_observables(self, step: int, time: float, values: dict) -> None:
        self.record_observables(step, time, values)

    def set_status(self, status: str, step: int, time: float, message: str = "") -> None:
        """Record how the run ended; read back as ``self.status``, a :class:`~measureflow.status.Status`."""
        self.status = Status(str(status), int(step), float(time), str(message))

    def close(self) -> None:
        self.closed = True

    def __repr__(self) -> str:
        return f"MemoryWriter(kind={self.kind}, frames={self.frames}, observables={list(self._obs)})"
