"""Open HDF5 files without ever hanging, and say in one line what is wrong with a damaged one.

A plain read-only open fails at once on a damaged file (a truncated file, a bad checksum). Only a
file whose writer died while it held the file (HDF5's "open for write" flag, left by a SIGKILL in
SWMR mode) needs HDF5's single-writer/multiple-reader read mode; in that mode HDF5 retries a bad
metadata checksum up to 100 times with an exponentially growing sleep, so a damaged file would
make a reader spin for hours. :func:`open_h5` therefore falls back to SWMR-read only for that flag,
and with one read attempt (``H5Pset_metadata_read_attempts``) where the HDF5 library can be
reached; it also refuses a file shorter than its superblock's end-of-file address.

:func:`check_rows_on_disk` verifies that the chunks holding a dataset's first rows lie inside
the file: HDF5 reads a chunk past the end of a truncated file as zeros, which would pass for data.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

import h5py

from ..errors import TrajectoryFileError
from .atomic import io_failure  # noqa: F401 - re-exported: the writer's errors are built here too

__all__ = ["open_h5", "open_swmr", "damaged", "check_rows_on_disk", "first_row_off_disk", "superblock", "io_failure", "START_OVER"]

#: What to do about a file that cannot be used (the tail of every "damaged" message).
START_OVER = ("restore it from a copy, or start the run again: delete the file, or pass --restart "
              "(measureflow run) to replace it")
_OPEN_FOR_WRITE = "already open for write"
_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def damaged(path, what: str, cause: BaseException | None = None) -> TrajectoryFileError:
    """The one-line error for a damaged file: the file, what is wrong, what to do."""
    detail = f" ({_first_line(cause)})" if cause is not None else ""
    return TrajectoryFileError(f"{path}: {what}{detail}; {START_OVER}")


def superblock(path) -> tuple[int, int] | None:
    """``(status flags, end-of-file address)`` of a version 2/3 superblock (None for other
    versions or when it cannot be read). Flag bit 0 is HDF5's "open for write"; a plain open
    refuses a file shorter than the end-of-file address."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(12 + 4 * 8)
    except OSError:
        return None
    if len(head) < 12 or head[:8] != _SIGNATURE or head[8] not in (2, 3):
        return None
    size = head[9]
    if size not in (4, 8) or len(head) < 12 + 3 * size:
        return None
    fmt = "<I" if size == 4 else "<Q"
    base = struct.unpack_from(fmt, head, 12)[0]
    eof = struct.unpack_from(fmt, head, 12 + 2 * size)[0]
    return head[11], base + eof


def _hdf5_library():
    """The HDF5 shared library h5py runs on (found among the loaded libraries), or None."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                parts = line.split()
                name = os.path.basename(parts[-1]) if parts else ""
                if name.startswith("libhdf5") and "_hl" not in name and ".so" in name:
                    library = ctypes.CDLL(parts[-1])
                    function = library.H5Pset_metadata_read_attempts
                    function.argtypes = [ctypes.c_int64, ctypes.c_uint]
                    function.restype = ctypes.c_int
                    return function
    except (OSError, AttributeError):
        return None
    return None


_set_read_attempts = None
_looked_up = False


def open_swmr(path) -> h5py.File:
    """Open ``path`` in SWMR-read mode with one metadata read attempt (raises at once on damage);
    HDF5 then skips its end-of-file check, so the parts of a truncated file that remain can be read."""
    global _set_read_attempts, _looked_up
    if not _looked_up:
        _set_read_attempts, _looked_up = _hdf5_library(), True
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_fclose_degree(h5py.h5f.CLOSE_STRONG)
    if _set_read_attempts is not None:
        _set_read_attempts(fapl.id, 1)  # one try: a bad checksum is damage, not a write in progress
    fid = h5py.h5f.open(os.fsencode(Path(path)), h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ, fapl=fapl)
    return h5py.File(fid)


def open_h5(path) -> tuple[h5py.File, bool]:
    """Open ``path`` read-only; returns ``(file, unclosed)`` where ``unclosed`` is True when its
    writer never closed it (read in SWMR mode). Raises a one-line :class:`TrajectoryFileError`
    (see :func:`damaged`) for a damaged file, at once."""
    path = Path(path)
    size = os.path.getsize(path)
    block = superblock(path)
    left_open = block is not None and block[0] & 1
    # A writer killed in SWMR mode may leave allocated but unwritten space at the end of its file:
    # its length is checked row by row (check_rows_on_disk), not against the superblock.
    if block is not None and not left_open and size < block[1]:
        raise damaged(path, f"is truncated: {size} bytes of the {block[1]} its HDF5 superblock records")
    if not left_open:
        try:
            return h5py.File(path, "r"), False
        except OSError as exc:
            if _OPEN_FOR_WRITE not in str(exc):
                raise damaged(path, "is a damaged HDF5 file that cannot be opened", exc) from exc
    try:
        return open_swmr(path), True
    except Exception as exc:  # noqa: BLE001 - any failure here means damage
        raise damaged(path, "was left open by a writer that died, and is damaged", exc) from exc


def first_row_off_disk(dataset: h5py.Dataset, rows: int, path) -> int | None:
    """The first of the first ``rows`` rows of ``dataset`` whose chunk lies past the end of the file
    (a truncated file reads such chunks as zeros), or None when all lie inside it."""
    if rows <= 0 or dataset.chunks is None:
        return None
    size = os.path.getsize(path)
    bad = []

    def visit(info):
        if info.chunk_offset[0] < rows and info.byte_offset + info.size > size:
            bad.append(info.chunk_offset[0])

    try:
        if hasattr(dataset.id, "chunk_iter"):
            dataset.id.chunk_iter(visit)
        else:  # HDF5 < 1.12.3: one call per chunk
            for i in range(dataset.id.get_num_chunks()):
                visit(dataset.id.get_chunk_info(i))
    except Exception as exc:  # noqa: BLE001 - the chunk index itself is unreadable
        raise damaged(path, f"{dataset.name}: the chunk index cannot be read", exc) from exc
    return min(bad) if bad else None


def check_rows_on_disk(dataset: h5py.Dataset, rows: int, path) -> None:
    """Refuse (:func:`damaged`) when one of the first ``rows`` rows of ``dataset`` lies past the
    end of the file."""
    first = first_row_off_disk(dataset, rows, path)
    if first is not None:
        raise damaged(path, f"{dataset.name}: rows {first} … {rows - 1} lie past the end of the file "
                            f"({os.path.getsize(path)} bytes): it was cut short")
