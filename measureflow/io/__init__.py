"""Trajectory I/O: the trajectory protocol, the H5MD writer and reader, the in-memory writer, checkpoints.

* :class:`Trajectory` — the one protocol every trajectory answers (kind, shapes, frames,
  observables, status, parameters); :class:`RecordedTrajectory` holds frames in memory and
  :class:`Snapshot` makes a one-frame trajectory of a bare state.
* :class:`Series` — an observable's samples; :class:`Writer` — the writer protocol.
* :class:`RunInfo` — what a writer is told before the first frame.
* :class:`H5MDWriter` (registered as "h5md") and :class:`MemoryWriter` ("memory").
* :func:`open_trajectory` (``measureflow.open``) — the lazy reader, a :class:`TrajectoryFile`.
* :func:`completed_status` — the status of a file that records a completed run (else None);
  :func:`valid_rows` — the rows of each element of an open file that a reader may trust.
* :func:`save_checkpoint` / :func:`load_checkpoint` — atomic checkpoint files.

Modules that need HDF5 load on first use.
"""

from __future__ import annotations

import importlib

from .base import Series, Writer
from .checkpoint import load_checkpoint, save_checkpoint
from .memory import MemoryWriter
from ..jsonable import to_jsonable
from .runinfo import RunInfo, default_versions
from .trajectory import RecordedTrajectory, Snapshot, Trajectory

_LAZY = {
    "H5MDWriter": "measureflow.io.h5md",
    "rebuild_file": "measureflow.io.h5md",
    "valid_rows": "measureflow.io.h5md",
    "open_trajectory": "measureflow.io.reader",
    "TrajectoryFile": "measureflow.io.reader",
    "FrameArray": "measureflow.io.reader",
    "completed_status": "measureflow.io.reader",
}


def __getattr__(name):
    try:
        module = importlib.import_module(_LAZY[name])
    except KeyError:
        raise AttributeError(f"module 'measureflow.io' has no attribute {name!r}") from None
    value = getattr(module, name)
    globals()[name] = value
    return value


__all__ = [
    "Trajectory",
    "RecordedTrajectory",
    "Snapshot",
    "RunInfo",
    "Writer",
    "Series",
    "MemoryWriter",
    "H5MDWriter",
    "rebuild_file",
    "valid_rows",
    "open_trajectory",
    "TrajectoryFile",
    "FrameArray",
    "completed_status",
    "save_checkpoint",
    "load_checkpoint",
    "default_versions",
    "to_jsonable",
]
