"""How a run ended: the one status record of simulations, training loops, files and sweeps.

A run ends in exactly one :class:`Status`; ``code`` says how, ``step`` and ``time`` say where. The
same record is written into trajectory files (``/measureflow/status``), returned in results and
listed in sweep indexes, so a user reads one vocabulary everywhere.
"""

from __future__ import annotations

import attrs

__all__ = ["Status", "STATUS_COMPLETED", "CODES"]

STATUS_COMPLETED = "completed"

#: Every status code a run can end with, and what it means.
CODES = {
    "completed": "the run reached its last step",
    "nonfinite": "the state (or a training loss) became NaN or infinite; frames before it are kept",
    "blowup": "the state exceeded the blow-up bound; frames before it are kept",
    "step_failure": "a step could not be taken (an adaptive step fell below dt_min, a covariance left the SPD cone)",
    "time_budget": "the wall-clock budget ran out; a checkpoint lets --resume continue",
    "terminated": "SIGTERM asked the run to stop; it stopped cleanly at the end of a step",
    "stopped": "a user callback asked the run to stop",
    "event": "a terminal event fired; the last state is at the event's time",
    "interrupted": "an exception (e.g. KeyboardInterrupt) ended the run",
}


@attrs.frozen
class Status:
    """How a run ended: ``code`` is one of :data:`CODES`; ``step`` and ``time`` locate the event;
    ``resumed_from`` lists the steps a run was resumed from (files written across restarts)."""

    code: str
    step: int
    time: float
    message: str = ""
    resumed_from: tuple = attrs.field(default=(), converter=lambda steps: tuple(int(s) for s in steps), kw_only=True)

    @property
    def ok(self) -> bool:
        return self.code == STATUS_COMPLETED

    def __str__(self) -> str:
        text = f"{self.code} at step {self.step} (t = {self.time:.6g})"
        return f"{text}: {self.message}" if self.message else text
