"""Trajectory I/O: the H5MD writer and reader, the in-memory writer, checkpoints.

* :class:`RunInfo` — what a writer is told before the first frame.
* :class:`H5MDWriter` (registered as "h5md") and :class:`MemoryWriter` ("memory").
* :func:`open_trajectory` (``measureflow.open``) — lazy reader, :class:`Trajectory`.
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

_LAZY = {
    "H5MDWriter": "measureflow.io.h5md",
    "rebuild_file": "measureflow.io.h5md",
    "open_trajectory": "measureflow.io.reader",
    "Trajectory": "measureflow.io.reader",
    "FrameArray": "measureflow.io.reader",
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
    "RunInfo",
    "Writer",
    "Series",
    "MemoryWriter",
    "H5MDWriter",
    "rebuild_file",
    "open_trajectory",
    "Trajectory",
    "FrameArray",
    "save_checkpoint",
    "load_checkpoint",
    "default_versions",
    "to_jsonable",
]
