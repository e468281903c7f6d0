"""Registers the built-in writers: "h5md" (trajectory file) and "memory" (lists of numpy arrays)."""

from __future__ import annotations

from ..plugins import hookimpl
from .memory import MemoryWriter


def h5md(path, every=1, **options):
    """H5MD 1.1 trajectory file writer; see :class:`measureflow.io.h5md.H5MDWriter` for options."""
    # Imported on use so that filling the registry does not load HDF5.
    from .h5md import H5MDWriter

    return H5MDWriter(path, every, **options)


@hookimpl
def measureflow_register_writers(registry):
    registry.add_writer("h5md", h5md)
    registry.add_writer("memory", MemoryWriter)
