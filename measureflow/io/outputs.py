"""What to do with a run's existing output file: continue it, leave it (done), replace it, or refuse.

The file is the authority (never an index or a leftover checkpoint alone). :func:`inspect_output`
reads what a file says — readable or damaged (one line why), its status, the fingerprint of the
run it holds (:func:`measureflow.io.runinfo.run_fingerprint`), its frames — and :func:`plan_output`
turns that, the checkpoint beside it and the user's choice (``resume``, ``restart``,
``overwrite``) into one of :data:`FRESH`, :data:`RESUME`, :data:`DONE`, or a one-line refusal
(:class:`~measureflow.errors.TrajectoryFileError`) that says how to go on:

=========================  ===============  =====================================================
file                       checkpoint       decision
=========================  ===============  =====================================================
missing                    missing          fresh run
missing                    present          resume (the writer refuses: the frames are gone)
completed, same run        any              done: nothing to resume, never rewritten
completed, another run     any              refused unless ``overwrite`` / ``restart``
unfinished or damaged      present          resume (the writer verifies every committed frame)
unfinished or damaged      missing          refused unless ``restart`` (no way to continue it)
any existing, no --resume  any              fresh run, written beside the file; it replaces the
                                            file when it ends (never when it raised: the earlier
                                            file stays; :class:`~measureflow.io.H5MDWriter`)
=========================  ===============  =====================================================

``restart`` (and ``overwrite``) delete the checkpoint and let the run replace the file.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from ..errors import TrajectoryFileError
from ..status import STATUS_COMPLETED, Status

__all__ = ["FileReport", "inspect_output", "plan_output", "FRESH", "RESUME", "DONE"]

FRESH, RESUME, DONE = "fresh", "resume", "done"


@attrs.frozen
class FileReport:
    """What a trajectory file says: ``exists``; ``problem`` (one line, "" when readable);
    ``status``; ``fingerprint`` of the run it holds ("" when not recorded); ``frames``; the
    ``parameters`` its run recorded (:meth:`measureflow.Simulation.run_parameters`)."""

    path: Path
    exists: bool
    problem: str = ""
    status: Status | None = None
    fingerprint: str = ""
    frames: int = 0
    parameters: dict = attrs.field(factory=dict, eq=False)

    @property
    def completed(self) -> bool:
        return not self.problem and self.status is not None and self.status.code == STATUS_COMPLETED

    def matches(self, fingerprint: str) -> bool:
        """Whether the file holds the run with ``fingerprint`` (True when either is unknown)."""
        return not fingerprint or not self.fingerprint or fingerprint == self.fingerprint

    def describe(self) -> str:
        if not self.exists:
            return "does not exist"
        if self.problem:
            return self.problem
        code = self.status.code if self.status is not None else "no status"
        return f"holds a run with status {code} ({self.frames} frames)"


def inspect_output(path) -> FileReport:
    """Read what the trajectory file at ``path`` says (never raises for a damaged file)."""
    from .reader import open_trajectory  # h5py loads on first use

    path = Path(path)
    if not path.exists():
        return FileReport(path, False)
    try:
        with open_trajectory(path) as traj:
            return FileReport(path, True, "", traj.status, traj.fingerprint, len(traj), dict(traj.parameters))
    except Exception as exc:  # noqa: BLE001 - a file that cannot be read is reported, not raised
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return FileReport(path, True, text or "cannot be read")


def plan_output(path, checkpoint, fingerprint: str, *, resume: bool, restart: bool = False,
                overwrite: bool = False) -> str:
    """The decision for a run writing ``path`` with its ``checkpoint`` beside it (module docstring)."""
    path = Path(path)
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    has_checkpoint = checkpoint is not None and checkpoint.exists()
    if restart or (overwrite and not resume):
        if checkpoint is not None:
            checkpoint.unlink(missing_ok=True)
        return FRESH
    if not resume:
        return FRESH
    report = inspect_output(path)
    if not report.exists:
        return RESUME if has_checkpoint else FRESH
    if report.completed:
        if report.matches(fingerprint):
            return DONE
        if overwrite:
            if checkpoint is not None:
                checkpoint.unlink(missing_ok=True)
            return FRESH
        raise TrajectoryFileError(
            f"{path}: holds a completed run of other parameters (fingerprint {report.fingerprint}, this run "
            f"{fingerprint}: field, parameters, seed or grid differ); run without --resume (or add --overwrite) to "
            "replace it, or write to another output"
        )
    if has_checkpoint:
        return RESUME
    raise TrajectoryFileError(
        f"{path}: cannot resume: there is no checkpoint ({checkpoint}) and the file {report.describe()}; "
        "start over with --restart (it replaces the file), or delete the file"
    )
