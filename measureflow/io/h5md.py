"""H5MD 1.1 trajectory writer (DESIGN.md "Trajectory files"; layout in :mod:`measureflow.io.layout`).

Durability
----------
Every dataset is laid out when the file is opened, then the file switches to HDF5's single-writer /
multiple-reader (SWMR) mode, in which HDF5 orders its metadata writes so that the file on disk is
always a valid HDF5 file: a SIGKILL of the writing process loses at most the frames written since
the last flush, and the file stays readable (measureflow's reader opens it in SWMR-read mode; a
resumed run rewrites it into a plain file). Flushes happen on a schedule (every ``flush_frames``
frames or ``flush_seconds`` seconds), on :meth:`H5MDWriter.flush`, on :meth:`H5MDWriter.close`
and at interpreter exit. Each flush first makes the data durable, then records in
``/measureflow/committed`` how many rows of each element are complete, then flushes that count: a
reader never trusts a row beyond it, so a row whose data had not reached the disk is never shown.

Growth
------
The frame axis of every time-dependent dataset is unlimited and never longer than the rows written
(no over-allocated extent, no fill rows). Chunks hold about 1 MiB of frame data (several small
frames, or one large frame split into equal parts). Rows are staged in memory, up to
:data:`STAGE_BYTES` (whole chunks, at most :data:`STEP_CHUNK` rows; :func:`batch_rows`) per element, and appended as one
batch: one resize and one write of the positions (HDF5's per-call cost, not the bytes, dominates a
frame of 10⁴ particles). A batch that fills whole chunks of an unfiltered dataset goes to the file as
it is (HDF5's direct chunk write: no copy through the chunk cache); other full batches leave the
chunk cache right away (by the writing thread with ``background``), not at the next commit. After a
flush has written a partial batch, the next batch is cut short so that batches fall on chunk
boundaries again. The steps and times of the rows written wait in memory and are appended together
at the next commit or once :data:`STEP_CHUNK` rows wait (two small writes cost about what a chunk of
positions does). None of this changes what is durable at any point: the committed counts, written
only after every waiting step and time, do. Every flush appends the staged rows first, so
what is on disk after a flush, a checkpoint, a SIGTERM, an exception or exit is what writing each
row at once gives; a SIGKILL loses the rows since the last flush either way. A row of more than a
quarter of :data:`MAX_STAGE_BYTES` (a frame of 10⁵ particles) is written at once, without a staging
copy: there the bytes, not the calls, cost the time.

Interrupted writes
------------------
A row counts only once its ``value``, ``step`` and ``time`` are all written. If an exception (for
instance raised by a SIGTERM handler) interrupts a write, :meth:`flush` / :meth:`close` cut the
datasets back to the complete rows, so the file stays consistent; both are idempotent.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import json
import time as _time
import warnings
import weakref
from pathlib import Path

import attrs
import h5py
from h5py import h5s
import numpy as np
import torch

from .. import __version__
from ..errors import MeasureflowError, ParameterError, ResumeRefusedError, ShapeError, TrajectoryFileError
from . import layout as L
from . import staging
from .background import BackgroundWork, let_the_run_go_on
from .base import Writer
from .runinfo import RunInfo
from .atomic import atomic_replace
from .lock import OutputLock
from .hdf5file import START_OVER, damaged, first_row_off_disk, io_failure, open_h5, open_swmr

__all__ = ["H5MDWriter", "rebuild_file", "repair_file", "valid_rows", "STEP_CHUNK", "STAGE_BYTES", "MAX_STAGE_BYTES", "SUFFIXES"]

#: File name endings of a trajectory file: what it holds is HDF5, and its name says so.
SUFFIXES = (".h5", ".hdf5", ".h5md")
#: Free space (bytes) a flush leaves for HDF5's metadata, beyond the chunks it writes.
SPACE_MARGIN = 256 << 10
#: Files whose writer met an I/O error and whose HDF5 close failed too: HDF5 keeps them open and
#: retries (and may crash) at interpreter exit, so the command line leaves without that step.
UNCLOSED_AFTER_ERROR: set[str] = set()
#: Rows per chunk of the step and time datasets (2 KiB each).
STEP_CHUNK = 256
#: Bytes of rows an element stages in memory between two batch writes (module docstring, "Growth"):
#: one chunk of a frame of 10⁴ particles. 0 writes every row at once, as one resize and one write per
#: dataset.
STAGE_BYTES = 1 << 20
#: Bytes staged for rows of over a quarter of :data:`STAGE_BYTES`, so that a batch still holds 4 of them.
MAX_STAGE_BYTES = 4 << 20
#: Clock used by the flush schedule (replaceable in tests so that no test depends on wall time).
_clock = _time.monotonic

_OPEN_WRITERS: "weakref.WeakSet[H5MDWriter]" = weakref.WeakSet()
_atexit_installed = False


def _close_open_writers() -> None:
    for writer in list(_OPEN_WRITERS):
        try:
            writer.close()
        except Exception:  # noqa: BLE001 - at exit, keep closing the others
            pass


def _install_atexit() -> None:
    global _atexit_installed
    if not _atexit_installed:
        atexit.register(_close_open_writers)
        _atexit_installed = True


@attrs.define(eq=False)
class _Element:
    """Book-keeping of one time-dependent element: complete rows, the last step written, and the rows
    staged in memory that the next batch write appends (module docstring, "Growth")."""

    path: str
    sample_shape: tuple
    rows: int = 0  # complete rows in the datasets
    written: int = 0  # rows in the value dataset: ``rows`` and those whose step and time wait (``waiting``)
    last_step: int | None = None
    committed: int = 0  # rows the last successful flush made durable
    value: h5py.Dataset | None = None
    step: h5py.Dataset | None = None
    time: h5py.Dataset | None = None
    batch: int = 1  # rows one batch write appends (1: every row is written at once, no staging)
    dtype: np.dtype | None = None  # of the value dataset
    staged: int = 0  # rows waiting in the staging buffers
    stage_value: np.ndarray | None = None
    stage_tensor: torch.Tensor | None = None  # stage_value's memory, for copies from a tensor
    stage_step: np.ndarray | None = None
    stage_time: np.ndarray | None = None
    handed: int = 0  # rows handed to the datasets' writing (written, or queued for the writing thread)
    handed_last_step: int | None = None
    spare: list = attrs.field(factory=list)  # staging buffers the writing thread is done with
    chunks: tuple | None = None  # of the value dataset, for an element not created yet
    phase: int = 0  # rows handed over since the last multiple of ``batch`` rows (0 after whole batches)
    whole_chunks: int = 0  # rows of a value chunk that holds whole rows and no filter (0: none such)
    waiting: list = attrs.field(factory=list)  # (steps, times) of the rows ``rows`` to ``written``
    chunk_sizes: tuple = ()  # (rows, bytes) of a chunk of the value, step and time datasets, from bind()
    torch_dtype: torch.dtype | None = None  # of the value dataset, found at the first staged tensor
    held: list = attrs.field(factory=list)  # (row, tensor) of the staged rows not yet in ``stage_value``

    def bind(self, file: h5py.File) -> None:
        group = file[self.path]
        self.value, self.step, self.time = group["value"], group["step"], group["time"]
        # Kept here: staging (on the run's thread) then makes no h5py call while the writing thread makes one.
        self.dtype = self.value.dtype
        self.batch = batch_rows(self.value)
        self.phase = self.written % self.batch
        self.whole_chunks = _whole_row_chunks(self.value)
        self.chunk_sizes = tuple(_chunk_size(ds) for ds in (self.value, self.step, self.time))

    def lengths(self) -> tuple[int, int, int]:
        return self.value.shape[0], self.step.shape[0], self.time.shape[0]

    def cut(self, rows: int) -> None:
        """Keep the first ``rows`` rows (at most ``written``): the datasets end there, and the steps and
        times still waiting for rows before it stay waiting."""
        keep = max(rows - self.rows, 0)
        if keep < self.written - self.rows:
            steps, times = self.waiting_rows()
            self.waiting = [(steps[:keep], times[:keep])] if keep else []
        for ds, n in ((self.value, rows), (self.step, min(rows, self.rows)), (self.time, min(rows, self.rows))):
            if ds.shape[0] != n:
                ds.resize(n, axis=0)
        self.written = rows
        self.rows = min(rows, self.rows)

    def waiting_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Steps and times of the rows written whose step and time wait."""
        if not self.waiting:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
        if len(self.waiting) > 1:
            self.waiting = [(np.concatenate([w[0] for w in self.waiting]), np.concatenate([w[1] for w in self.waiting]))]
        return self.waiting[0]

    def step_of(self, row: int) -> int:
        """The step of row ``row`` (< ``written``), in the file or waiting."""
        if row < self.rows:
            return int(self.step[row])
        return int(self.waiting_rows()[0][row - self.rows])

    def stage(self, step: int, time: float, value, hold: bool = False) -> None:
        """Copy one row (an array, or a tensor on any device: copied straight into the buffer, with
        no host array between; a tensor may keep its own shape, of the row's size) into the staging
        buffers (a spare set, or new ones, at the first row of a batch). ``hold`` (a writing thread will
        write the batch): a host tensor of the buffer's dtype is cloned, and the thread copies the clone
        into the buffer (:func:`fill_held`)."""
        if self.stage_value is None or self.stage_value.shape[0] != self.batch:
            self.stage_value, self.stage_step, self.stage_time = self.spare.pop() if self.spare else self.buffers()
            self.stage_tensor = None
        k = self.staged
        if isinstance(value, torch.Tensor):
            if self.torch_dtype is None:
                self.torch_dtype = torch.from_numpy(np.empty(0, dtype=self.dtype)).dtype
            if hold and value.is_cpu and value.dtype is self.torch_dtype:
                # The clone lands in memory this core just freed, the buffer in memory the
                # writing thread's core last wrote: 31 against 60 µs for a row of 160 kB in a run of 10⁴
                # particles. One torch call: each lets the writing thread take the interpreter lock.
                self.held.append((k, value.clone()))
            elif not value.is_cpu:
                if self.stage_tensor is None:  # the buffer's memory as a tensor (made once per batch)
                    self.stage_tensor = torch.from_numpy(self.stage_value)
                self.stage_tensor[k].view(value.shape).copy_(value)
            else:
                # A host tensor's array is its memory (numpy's copy costs less than a tensor copy's dispatch).
                self.stage_value[k] = value.numpy().reshape(self.sample_shape)
        else:
            self.stage_value[k] = value
        self.stage_step[k] = step
        self.stage_time[k] = time
        self.staged = k + 1

    def buffers(self, touched: bool = False) -> tuple:
        """A set of staging buffers: one an earlier writer of this layout kept (:mod:`.staging`), else a
        new one; ``touched``: its pages written once already (the writing thread prepares one so that
        the run's first copies into it do not fault the pages in)."""
        kept = staging.pool.take(self.batch, self.sample_shape, self.dtype)
        if kept is not None:
            return kept
        value = np.empty((self.batch, *self.sample_shape), dtype=self.dtype)
        if touched:
            value.fill(0)
        return value, np.empty(self.batch, dtype=np.int64), np.empty(self.batch, dtype=np.float64)

    def append_rows(self, values: np.ndarray, steps: np.ndarray, times: np.ndarray) -> None:
        """Append ``len(steps)`` rows to the value dataset: one resize and one write. Their steps and times
        wait (copied: the staging buffers are used again) for :meth:`complete`, at the next commit or
        when :data:`STEP_CHUNK` rows wait: two small writes in a run's thread cost about what a chunk of
        positions does. ``written`` counts the rows once the write is done (an interruption leaves them
        out, and a flush cuts back)."""
        i, k = self.written, len(steps)
        c = self.whole_chunks
        self.value.id.set_extent((i + k, *self.sample_shape))
        let_the_run_go_on()
        if c > 1 and i % c == 0 and k % c == 0 and values.flags.c_contiguous and values.dtype == self.dtype:
            _write_whole_chunks(self.value, values, i, c)
        else:
            _write_slab(self.value, np.ascontiguousarray(values), i)
            if k == self.batch > 1:
                # A full batch fills whole chunks: write them out of HDF5's chunk cache now (on the writing
                # thread with background=True) rather than at the next commit, which is the run's close in a
                # short run (a 4 MiB cache holds a batch: the close would write it on the run's thread).
                self.value.flush()
        self.waiting.append((np.array(steps, dtype=np.int64), np.array(times, dtype=np.float64)))
        self.written = i + k
        if self.written - self.rows >= STEP_CHUNK:
            self.complete()

    def complete(self) -> None:
        """Append the waiting steps and times: every row written is then complete. An interruption
        leaves them waiting (a flush cuts the datasets back and writes them again)."""
        if self.written == self.rows:
            return
        steps, times = self.waiting_rows()
        i = self.rows
        for ds, data in ((self.step, steps), (self.time, times)):
            let_the_run_go_on()
            ds.id.set_extent((i + len(data),))
            _write_slab(ds, data, i)
        self.rows = self.written
        self.waiting = []

    def take_staged(self) -> tuple:
        """The staged rows as ``(values, steps, times, buffers, held)``, handed over: the stage starts a new
        batch (in other buffers, so that a writing thread may still read these; return them to ``spare``);
        ``held``: the rows still to be copied into ``values`` (:func:`fill_held`)."""
        k, buffers = self.staged, (self.stage_value, self.stage_step, self.stage_time)
        held, self.held = self.held, []
        self.stage_value = self.stage_step = self.stage_time = self.stage_tensor = None
        self.staged = 0
        self.handed += k
        self.phase = (self.phase + k) % self.batch
        self.handed_last_step = int(buffers[1][k - 1])
        return buffers[0][:k], buffers[1][:k], buffers[2][:k], buffers, held

    def release_buffers(self) -> None:
        """Give the staging buffers to the pool for a later writer (nothing may write or read them after)."""
        sets = list(self.spare)
        if self.stage_value is not None:
            sets.append((self.stage_value, self.stage_step, self.stage_time))
        self.spare.clear()
        self.stage_value = self.stage_step = self.stage_time = self.stage_tensor = None
        self.staged = 0
        self.held = []
        for buffers in sets:
            if buffers[0].shape[0] == self.batch > 1:
                staging.pool.give(buffers)

    def restage(self, k: int, buffers: tuple, held: list) -> None:
        """Undo :meth:`take_staged` (its ``k`` rows were not written)."""
        self.stage_value, self.stage_step, self.stage_time = buffers
        self.stage_tensor = None
        self.held = held
        self.staged = k
        self.handed -= k
        self.phase = (self.phase - k) % self.batch


def fill_held(values: np.ndarray, held: list) -> None:
    """Copy the held rows ``(row, tensor)`` of :meth:`_Element.stage` into their rows of ``values`` (a
    staging buffer's rows about to be written). One torch call for a whole batch: it runs without the
    interpreter lock, so the writing thread's copy overlaps the run's steps."""
    if not held:
        return
    target = torch.from_numpy(values)
    if len(held) == len(values) and all(row == i for i, (row, _) in enumerate(held)):
        rows = [t for _, t in held]
        torch.stack(rows, out=target.view(len(rows), *rows[0].shape))
    else:
        for row, t in held:
            target[row].view(t.shape).copy_(t)



def batch_rows(value: h5py.Dataset) -> int:
    """Rows of ``value`` one batch write appends: as many whole chunks as :data:`STAGE_BYTES` holds
    (:data:`MAX_STAGE_BYTES` for rows of over a quarter of it), at most :data:`STEP_CHUNK` rows; 1 (no
    staging) when that is fewer than 4 rows: for rows that large (over 1 MiB) the bytes, not the calls,
    cost the time, and a staging copy would cost about what the saved calls do.

    Why a batch is small (one 1 MiB chunk of a frame of 10⁴ particles, not 4 MiB): the run's thread
    copies each row into the batch's buffer, and a first write into memory not written for a while
    costs several times a copy within cache on the machines measured (a copy of 160 kB into a buffer
    of 24 rows took 32 µs, 270 µs at the 90th percentile, against 9 and 25 µs into one of 2 rows,
    6 ms of other work between copies): a few small buffers in turn stay warm."""
    return _batch(value.shape[1:], value.dtype.itemsize, value.chunks[0] if value.chunks else 1)


def _batch(sample_shape, itemsize: int, chunk_rows: int) -> int:
    """:func:`batch_rows` from the dataset's layout, before (or without) the dataset."""
    row_bytes = max(int(np.prod(sample_shape, dtype=np.int64)) * itemsize, 1)
    if STAGE_BYTES <= 0:
        return 1
    rows = min(STAGE_BYTES // row_bytes, STEP_CHUNK)
    if rows < 4:
        rows = min(max(STAGE_BYTES, MAX_STAGE_BYTES) // row_bytes, STEP_CHUNK)
    if rows >= chunk_rows:
        rows -= rows % chunk_rows
    return int(rows) if rows >= 4 else 1


def _whole_row_chunks(value: h5py.Dataset) -> int:
    """Rows of each chunk of ``value`` when its chunks hold whole rows and it has no filter (compression
    …), so that whole chunks may be written to the file as they are; 0 otherwise."""
    chunks = value.chunks
    if not chunks or tuple(chunks[1:]) != tuple(value.shape[1:]) or value.id.get_create_plist().get_nfilters():
        return 0
    return int(chunks[0])


def _chunk_size(ds: h5py.Dataset) -> tuple[int, int]:
    """(rows, bytes) of one chunk of ``ds`` (its whole extent when it is not chunked)."""
    chunk = ds.chunks or ds.shape
    return max(chunk[0], 1), int(np.prod(chunk)) * ds.dtype.itemsize


def _write_slab(ds: h5py.Dataset, rows: np.ndarray, first: int) -> None:
    """Write ``rows`` (C-contiguous; HDF5 converts their type) at row ``first`` of ``ds`` (already
    extended to hold them). HDF5's own calls: between a run's steps h5py's slicing cost several times the write (a
    resize took 160 µs and a slab write of 6 steps 260 µs in a run, 19 and 60 µs in a loop; its
    own calls, 2 and 15 µs in the loop)."""
    zeros = (0,) * (rows.ndim - 1)
    space = ds.id.get_space()
    space.select_hyperslab((first, *zeros), rows.shape)
    ds.id.write(h5s.create_simple(rows.shape), space, rows)


def _write_whole_chunks(value: h5py.Dataset, rows: np.ndarray, first: int, chunk_rows: int) -> None:
    """Write ``rows`` (whole chunks of ``chunk_rows`` rows of ``value``'s type) at row ``first``, a chunk
    boundary, to the file as they are: no copy into HDF5's chunk cache and no conversion, the same bytes
    on disk as a write through the cache (a 1 MiB chunk took 0.23 ms this way against 0.53 ms through the
    cache in a loop here; a foreground run of 10⁴ particles spent 11.4 ms in ``write_frame`` for 51
    frames, against 15.9 ms)."""
    zeros = (0,) * (rows.ndim - 1)
    for j in range(0, len(rows), chunk_rows):
        value.id.write_direct_chunk((first + j, *zeros), rows[j : j + chunk_rows])


def _plan_element(path: str, sample_shape, dtype, large: bool) -> _Element:
    """The book-keeping of an element about to be created: its layout is known before the file is
    (what lets a background writer stage rows while the writing thread creates the file)."""
    sample_shape, dtype = tuple(int(n) for n in sample_shape), np.dtype(dtype)
    el = _Element(path, sample_shape, dtype=dtype)
    el.chunks = _value_chunks(sample_shape, dtype, large)
    el.batch = _batch(sample_shape, dtype.itemsize, el.chunks[0])
    return el


def _value_chunks(sample_shape, dtype: np.dtype, large: bool) -> tuple:
    if large:
        target, frames = L.FRAME_CHUNK_BYTES, L.FRAME_CHUNK_FRAMES
    else:
        target, frames = L.SMALL_CHUNK_BYTES, L.SMALL_CHUNK_FRAMES
    return L.chunk_shape(tuple(sample_shape), dtype.itemsize, target, frames)


def _create_datasets(file: h5py.File, el: _Element, compression=None, opts=None) -> None:
    group = file.require_group(el.path)
    let_the_run_go_on()
    group.create_dataset(
        "value",
        shape=(0, *el.sample_shape),
        maxshape=(None, *el.sample_shape),
        chunks=el.chunks,
        dtype=el.dtype,
        compression=compression,
        compression_opts=opts,
    )
    let_the_run_go_on()
    group.create_dataset("step", shape=(0,), maxshape=(None,), chunks=(STEP_CHUNK,), dtype=np.int64)
    let_the_run_go_on()
    group.create_dataset("time", shape=(0,), maxshape=(None,), chunks=(STEP_CHUNK,), dtype=np.float64)
    let_the_run_go_on()


def valid_rows(file: h5py.File) -> dict[str, int]:
    """Rows of each time-dependent element of an open trajectory file that a reader may trust.

    ``file`` is an open :class:`h5py.File` (or group); the answer maps each element's path (e.g.
    ``"particles/trajectory/position"``, ``"observables/energy"``) to its count of complete rows:
    the shortest of its ``value``, ``step`` and ``time`` datasets, capped by the count the last
    flush recorded in ``/measureflow/committed`` (rows beyond it may not have reached the disk
    before a crash; see the module docstring).
    """
    committed = {}
    if L.COMMITTED in file:
        ds = file[L.COMMITTED]
        names = L.text(ds.attrs.get("elements", np.array([], dtype="S1")))
        counts = ds[()]
        committed = {name: int(n) for name, n in zip(names, counts)}
    out = {}

    def visit(name, obj):
        if L.is_element(obj):
            lengths = [obj["value"].shape[0], obj["step"].shape[0]]
            if isinstance(obj.get("time"), h5py.Dataset) and obj["time"].shape:
                lengths.append(obj["time"].shape[0])
            n = min(lengths)
            if name in committed:
                n = min(n, committed[name])
            out[name] = n

    file.visititems(visit)
    return out


def _rows_up_to(element: h5py.Group, valid: int, upto_step: int | None) -> int:
    if upto_step is None or valid == 0:
        return valid
    steps = element["step"][:valid]
    return int(np.searchsorted(steps, upto_step, side="right"))


def rebuild_file(path, upto_step: int | None = None) -> dict[str, int]:
    """Rewrite a trajectory keeping only trustworthy rows (and, if given, rows with step ≤ ``upto_step``).

    Used when a file cannot be reopened in place (its writer was killed while in SWMR mode): the
    valid content is copied into a temporary beside it, which then replaces ``path`` atomically
    (:func:`measureflow.io.atomic.atomic_replace`). Returns the rows kept per element. The result is a plain HDF5
    file that any reader opens.
    """
    path = Path(path)
    src, _ = open_h5(path)
    with atomic_replace(path) as tmp:
        with src, h5py.File(tmp, "w", libver="latest") as dst:
            keep = {name: _rows_up_to(src[name], n, upto_step) for name, n in valid_rows(src).items()}
            for key, value in src.attrs.items():
                dst.attrs.create(key, value, dtype=src.attrs.get_id(key).dtype)
            for name in src:
                src.copy(src[name], dst, name=name)
            for name, n in keep.items():
                for child in dst[name].values():
                    if isinstance(child, h5py.Dataset) and child.shape and child.shape[0] != n:
                        child.resize(n, axis=0)
            if L.COMMITTED in dst:
                ds = dst[L.COMMITTED]
                names = L.text(ds.attrs.get("elements", np.array([], dtype="S1")))
                ds[...] = np.array([keep.get(n, 0) for n in names], dtype=np.int64)
    return keep


def repair_file(path) -> int | None:
    """Make a file whose writer died (SIGKILL, power cut) readable by any HDF5 tool
    (``measureflow repair FILE``).

    Such a file still carries HDF5's "open for write" flag, which h5py, h5dump and pyh5md refuse
    (measureflow's reader opens it in SWMR-read mode). The rows of its last flush are copied into a
    plain HDF5 file that replaces it (:func:`rebuild_file`), and its provisional status ``running``
    becomes ``interrupted``. Refused while a writer holds the file. Returns the frames kept, or None
    when the file needed no repair.
    """
    path = Path(path)
    with OutputLock(path):
        f, unclosed = open_h5(path)
        f.close()
        if not unclosed:
            return None
        keep = rebuild_file(path)
        frame = L.POSITION if L.POSITION in keep else L.MIX_MEAN if L.MIX_MEAN in keep else L.MEAN
        frames = keep.get(frame, 0)
        with h5py.File(path, "r+") as f:
            status = f.require_group(L.STATUS)
            if L.text(status.attrs.get("status", b"running")) == "running":
                step = int(f[frame]["step"][frames - 1]) if frames else -1
                H5MDWriter._write_status_attrs(
                    status, "interrupted", step, float("nan"),
                    "the writer was killed; measureflow repair kept the frames of its last flush")
    return frames


class H5MDWriter(Writer):
    """Write a run to an H5MD 1.1 file (layout: :mod:`measureflow.io.layout`).

    Parameters
    ----------
    path:
        Output file (ending in .h5, .hdf5 or .h5md); an existing file is replaced unless the run is
        resumed (``RunInfo.resume_step`` is not None), in which case it is reopened and cut back to
        the resume step. A replacement is written beside the file and renamed over it at close,
        unless the run raised (status ``interrupted``) or a write failed: then the earlier file stays.
    every:
        Trigger of the steps on which frames are written (int k = every k steps).
    flush_every:
        Shorthand: an int sets ``flush_frames``, a float sets ``flush_seconds``.
    flush_frames, flush_seconds:
        Flush after this many frames or this many seconds since the last flush (either may be
        None). A due flush runs right after the step's observables are written (or at the next
        frame), so a step's frame and observables are committed together.
    compression, compression_opts:
        Passed to h5py for the value datasets (e.g. "gzip", 4); off by default for speed.
    background:
        Write on a background thread (:class:`~measureflow.io.background.BackgroundWork`): the thread
        creates a new file (:meth:`open` takes the lock, checks an existing file and plans the datasets'
        layout, then returns; an error creating the file is raised by the next call, as the one-line
        error a foreground open raises), the run's thread copies each frame off the device into the
        staging buffers (a host tensor into a copy of its own, which the writing thread copies into
        the buffers: :meth:`_Element.stage`) and goes on; full batches
        (module docstring, "Growth") and scheduled flushes are handed to the thread, which appends
        them while the run fills other buffers, at most one more batch waiting (double buffering).
        Every flush (:meth:`flush`, hence before each checkpoint), :meth:`close` (on SIGTERM, at
        exit) first waits for the thread, so the same rows are durable at the same points and the
        file's bytes are those of a foreground write. A step out of order is refused at the call; an
        I/O error of the thread is raised by the writer's next call (at the latest the next flush).
    """

    def __init__(
        self,
        path,
        every=1,
        *,
        flush_every=None,
        flush_frames: int | None = None,
        flush_seconds: float | None = 5.0,
        compression=None,
        compression_opts=None,
        background: bool = False,
    ):
        super().__init__(every)
        self.path = Path(path)
        if not self.path.name.lower().endswith(SUFFIXES):
            raise ParameterError(
                f"H5MDWriter: {str(self.path)!r} does not end in {', '.join(SUFFIXES)}; the writer writes an HDF5 "
                f"(H5MD) trajectory, so name it so, e.g. {str(self.path.with_suffix('.h5'))!r}"
            )
        if isinstance(flush_every, bool):
            raise TypeError("flush_every must be an int (frames) or a float (seconds)")
        if isinstance(flush_every, int):
            flush_frames, flush_seconds = flush_every, None
        elif isinstance(flush_every, float):
            flush_seconds = flush_every
        elif flush_every is not None:
            raise TypeError(f"flush_every must be an int (frames) or a float (seconds), got {flush_every!r}")
        if flush_frames is not None and int(flush_frames) < 1:
            raise ValueError(f"flush_frames must be ≥ 1 or None, got {flush_frames}")
        if flush_seconds is not None and float(flush_seconds) < 0:
            raise ValueError(f"flush_seconds must be ≥ 0 or None, got {flush_seconds}")
        self.flush_frames = None if flush_frames is None else int(flush_frames)
        self.flush_seconds = None if flush_seconds is None else float(flush_seconds)
        self.compression = compression
        self.compression_opts = compression_opts
        self.run: RunInfo | None = None
        self.stats = {"frames": 0, "flushes": 0, "swmr_restarts": 0}
        self._file: h5py.File | None = None
        self._frame_elements: list[_Element] = []
        self._observables: dict[str, _Element] = {}
        self._order: list[str] = []  # element paths, the order of /measureflow/committed
        self._committed: h5py.Dataset | None = None
        self._pending_rows = 0
        self._last_flush = 0.0
        self._incomplete = False  # a write was interrupted: datasets may be longer than rows
        self._status: tuple | None = None
        self._closed = False
        self._failed = False  # an I/O error happened: only closing is left
        self._lock = OutputLock(self.path)
        self._where = self.path  # where the HDF5 file is written: a temporary when replacing a file
        self._replacing = None  # the atomic_replace in progress when an existing file is replaced
        self.background = bool(background)
        self._work: BackgroundWork | None = None  # the writing thread (background=True), from open()
        self._closing = False  # the final flush of close(): the file's close flushes the count
        self._opened = False  # open() succeeded (with ``background``, the file may still be being created)

    # -- opening ----------------------------------------------------------------------------------
    def open(self, run: RunInfo) -> None:
        if not isinstance(run, RunInfo):
            raise TypeError(f"H5MDWriter.open expects a measureflow.io.RunInfo, received {type(run).__name__}")
        if self.run is not None:
            raise RuntimeError(f"H5MDWriter({self.path}) is already open; create one writer per run")
        self.run = run
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Checked before any work: a second process writing the same file is refused at once.
        self._lock = OutputLock(self.path).acquire()
        try:
            if run.resume_step is not None:
                try:
                    if self.path.exists():
                        self._verify_resumable(run)
                    else:
                        self._refuse_lost_frames(run.resume_step, None, "the file does not exist")
                except ResumeRefusedError:
                    raise
                except TrajectoryFileError as exc:
                    raise ResumeRefusedError(str(exc)) from exc
            if run.resume_step is not None and self.path.exists():
                self._reopen_for_resume(run)
                self._start_swmr()
            else:
                if self.path.exists():
                    # Never truncate an existing file: write beside it, replace it when the run ends.
                    self._replacing = atomic_replace(self.path)
                    self._where = self._replacing.__enter__()
                self._plan(run)
                if not self.background:
                    self._prepare(run)
        except BaseException:
            if self._file is not None:
                with contextlib.suppress(Exception):
                    self._file.close()
                self._file = None
            self._finish_replace(keep_new=False)
            self._lock.release()
            raise
        self._last_flush = _clock()
        if self.background:
            self._work = BackgroundWork(f"measureflow-h5md:{self.path.name}")
            if self._file is None:
                # A new file is created by the writing thread while the run starts: its rows are staged
                # meanwhile (the elements' layout is planned), and an error surfaces at the next call.
                self._work.submit(self._prepare, run)
        self._opened = True
        _OPEN_WRITERS.add(self)
        _install_atexit()

    def write_events(self, records) -> None:
        """Append located events (:class:`~measureflow.events.EventRecord`) to ``/observables/events``,
        an H5MD element after the run: ``step`` and ``time`` of each crossing, ``value`` the event's
        index in ``events=`` (its name in the ``names`` attribute), ``replica``, and the crossing
        replica's state at that time (``position`` (E, N, d) and channels, or ``mean`` and ``cov``)."""
        records = list(records)
        if not records:
            return
        columns = {
            "step": np.array([r.step for r in records], dtype=np.int64),
            "time": np.array([r.t for r in records], dtype=np.float64),
            "value": np.array([r.index for r in records], dtype=np.int64),
            "replica": np.array([r.replica for r in records], dtype=np.int64),
        }
        first = records[0].state
        if hasattr(first, "cov"):
            parts = {"mean": lambda s: s.mean[0], "cov": lambda s: s.cov[0]}
        else:
            parts = {"position": lambda s: s.x[0]}
            parts.update({name: (lambda s, n=name: s.channels[n][0]) for name in first.channels})
        for key, get in parts.items():
            columns[key] = np.stack([get(r.state).detach().cpu().numpy() for r in records])
        names = {}
        for r in records:
            names[r.index] = r.name
        with self._h5("r+") as f:
            group = f.require_group(L.OBSERVABLES + "/events")
            known = json.loads(group.attrs.get("names", "{}"))
            known.update({str(k): v for k, v in names.items()})
            group.attrs["names"] = json.dumps(known)
            for key, values in columns.items():
                if key not in group:
                    group.create_dataset(key, data=values, maxshape=(None, *values.shape[1:]),
                                         chunks=(max(1, min(len(values), 64)), *values.shape[1:]))
                else:
                    ds = group[key]
                    n = ds.shape[0]
                    ds.resize(n + len(values), axis=0)
                    ds[n:] = values

    def _h5(self, mode: str) -> h5py.File:
        return h5py.File(self._where, mode, libver="latest", rdcc_nbytes=L.CHUNK_CACHE_BYTES)

    def _finish_replace(self, keep_new: bool) -> None:
        """End the replacement of an existing file: the new file takes its place (``keep_new``), or
        is removed and the earlier file stays (a run that raised, or failed to write)."""
        replacing, self._replacing = self._replacing, None
        if replacing is None:
            return
        if keep_new:
            replacing.__exit__(None, None, None)  # fsync, rename over the old file, fsync the folder
        else:
            reason = RuntimeError("the run did not end normally: the earlier file is kept")
            replacing.__exit__(RuntimeError, reason, None)
        self._where = self.path

    def _prepare(self, run: RunInfo) -> None:
        """Create the new file of the planned elements and enter SWMR mode (on the writing thread with
        ``background``); an HDF5 error becomes one line naming the file."""
        if self._work is not None:
            for el in self._elements():
                if el.batch > 1 and not el.spare:
                    el.spare.append(el.buffers(touched=True))
        try:
            self._create(run)
            self._start_swmr()
        except BaseException as exc:
            if self._file is not None:
                with contextlib.suppress(Exception):
                    self._file.close()
                self._file = None
            if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, MeasureflowError):
                self._failed = True
                lines = str(exc).strip().splitlines()
                raise TrajectoryFileError(
                    f"{self.path}: cannot create the trajectory file ({lines[0] if lines else type(exc).__name__})"
                ) from exc
            raise

    def _create(self, run: RunInfo) -> None:
        # On a background writer's thread this runs while the run's first steps do: ``go_on`` after each
        # HDF5 call hands the interpreter lock back to the run's thread (h5py holds it in every call), so
        # it waits for one call, not for several. In turns with yields every few calls: writer share
        # 5.16 → 4.82 % and 5.03 → 4.71 % (N = 10⁴, 500 steps, 12 runs each).
        go_on = let_the_run_go_on
        f = self._file = self._h5("w")
        go_on()
        h5md = f.create_group("h5md")
        h5md.attrs.create("version", np.array(L.H5MD_VERSION, dtype=np.int32))
        go_on()
        L.set_text(f.create_group("h5md/author").attrs, "name", run.resolved_author())
        go_on()
        creator = f.create_group("h5md/creator")
        L.set_text(creator.attrs, "name", "measureflow")
        go_on()
        L.set_text(creator.attrs, "version", __version__)
        go_on()
        f.create_group("h5md/modules/measureflow").attrs.create(
            "version", np.array(L.MODULE_VERSION, dtype=np.int32)
        )
        go_on()
        params = f.require_group("parameters").create_dataset(
            "measureflow", data=json.dumps(run.parameters, sort_keys=False), dtype=h5py.string_dtype("utf-8")
        )
        go_on()
        L.set_text(params.attrs, "format", "json")
        L.set_text(params.attrs, "kind", run.kind)
        go_on()
        for key in ("replicas", "size", "dim"):
            params.attrs.create(key, np.int64(getattr(run, key)))
            go_on()
        L.set_text(params.attrs, "dtype", run.dtype)
        if run.fingerprint:
            L.set_text(params.attrs, "fingerprint", run.fingerprint)
        go_on()

        if run.kind == "particles":
            R, N, d = run.replicas, run.size, run.dim
            box = f.create_group(L.BOX)
            box.attrs.create("dimension", np.int32(d))
            go_on()
            box.attrs.create("boundary", L.fixed_strings(["none"] * d))
            go_on()
            if not run.moving_weights:
                weights = run.weights if run.weights is not None else np.full((R, N), 1.0 / N)
                f.create_dataset(L.WEIGHT, data=weights.reshape(R * N).astype(np.float64))
                go_on()
            f.create_dataset(L.REPLICA, data=np.repeat(np.arange(R, dtype=np.int32), N))
            go_on()
        for el in self._frame_elements:
            _create_datasets(f, el, self.compression, self.compression_opts)
        if run.kind == "gaussians":
            R, d = run.replicas, run.dim
            # The H5MD-standard view: each replica's mean as a "particle" position, so H5MD tools
            # see a trajectory. Soft links: one copy of the data, and element walks visit it once.
            box = f.create_group(L.GAUSSIAN_BOX)
            box.attrs.create("dimension", np.int32(d))
            box.attrs.create("boundary", L.fixed_strings(["none"] * d))
            f[L.GAUSSIAN_POSITION] = h5py.SoftLink("/" + L.MEAN)
            f[L.GAUSSIAN_COVARIANCE] = h5py.SoftLink("/" + L.COV)
            go_on()
        f.create_group(L.OBSERVABLES, track_order=True)
        go_on()
        for el in self._observables.values():
            _create_datasets(f, el, self.compression, self.compression_opts)
        self._order = [e.path for e in self._elements()]
        committed = f.create_dataset(
            L.COMMITTED, shape=(len(self._order),), maxshape=(None,), chunks=(64,), dtype=np.int64
        )
        go_on()
        committed.attrs.create("elements", L.fixed_strings(self._order))
        go_on()
        status = f.create_group(L.STATUS)
        self._write_status_attrs(status, "running", -1, float("nan"), "")
        go_on()

    def _new_element(self, f, path, sample_shape, dtype, large: bool) -> _Element:
        el = _plan_element(path, sample_shape, dtype, large)
        _create_datasets(f, el, self.compression, self.compression_opts)
        return el

    def _plan(self, run: RunInfo) -> None:
        """The elements of a new file (:func:`_plan_element`), in the order :meth:`_create` creates them."""
        if run.kind == "particles":
            R, N, d = run.replicas, run.size, run.dim
            self._frame_elements = [_plan_element(L.POSITION, (R * N, d), run.dtype, True)]
            for name, tail in run.channels.items():
                self._frame_elements.append(
                    _plan_element(f"{L.PARTICLES}/{name}", (R * N,) + tuple(tail), run.dtype, True))
            if run.moving_weights:
                # H5MD's time-dependent form of the same element: one row of weights per frame (last).
                self._frame_elements.append(_plan_element(L.WEIGHT, (R * N,), np.float64, True))
        elif run.kind == "mixtures":
            R, K, d = run.replicas, run.size, run.dim
            self._frame_elements = [
                _plan_element(L.MIX_WEIGHTS, (R, K), run.dtype, False),
                _plan_element(L.MIX_MEAN, (R, K, d), run.dtype, True),
                _plan_element(L.MIX_COV, (R, K, d, d), run.dtype, True),
            ]
        else:
            R, d = run.replicas, run.dim
            self._frame_elements = [
                _plan_element(L.MEAN, (R, d), run.dtype, True),
                _plan_element(L.COV, (R, d, d), run.dtype, True),
            ]
        for name in run.observable_names:
            if name in run.observable_shapes:
                self._observables[name] = _plan_element(
                    f"{L.OBSERVABLES}/{name}", run.observable_shapes[name], np.float64, False)

    def _elements(self) -> list[_Element]:
        return [*self._frame_elements, *self._observables.values()]

    def _reopen_for_resume(self, run: RunInfo) -> None:
        try:
            f = self._h5("r+")
        except OSError:
            # The previous writer died in SWMR mode (or mid-write): copy what is valid.
            rebuild_file(self.path, run.resume_step)
            try:
                f = self._h5("r+")
            except OSError as exc:
                raise TrajectoryFileError(f"{self.path}: cannot reopen the rebuilt trajectory ({exc})") from exc
        self._file = f
        try:
            self._check_compatible(f, run)
            valid = valid_rows(f)
            frame_paths = self._frame_paths(run)
            if run.kind == "particles":
                missing = [p for p in frame_paths if p not in f]
                if missing:
                    raise TrajectoryFileError(
                        f"{self.path}: cannot resume: the file has no {', '.join(missing)} (the run records "
                        "channels the file does not hold); resume with the original channels or write to another file"
                    )
            paths = [p for p in valid if p not in frame_paths]
            elements = {}
            for p in frame_paths + paths:
                group = f[p]
                keep = _rows_up_to(group, valid.get(p, 0), run.resume_step)
                el = _Element(p, tuple(group["value"].shape[1:]))
                el.bind(f)
                el.rows = el.written = min(el.lengths())
                el.cut(keep)
                el.last_step = int(el.step[keep - 1]) if keep else None
                elements[p] = el
            # Frames of one step must stay together (mean and cov of a Gaussian run).
            common = min(elements[p].rows for p in frame_paths)
            for p in frame_paths:
                el = elements[p]
                el.cut(common)
                el.last_step = int(el.step[common - 1]) if common else None
            self._frame_elements = [elements[p] for p in frame_paths]
            prefix = L.OBSERVABLES + "/"
            self._observables = {p[len(prefix):]: elements[p] for p in paths if p.startswith(prefix)}
            for name in run.observable_names:
                if name not in self._observables and name in run.observable_shapes:
                    self._observables[name] = self._new_element(
                        f, prefix + name, run.observable_shapes[name], np.float64, False
                    )
            self._write_order(f)
            status = f.require_group(L.STATUS)
            resumes = list(np.atleast_1d(status.attrs.get("resumed_from", np.array([], dtype=np.int64))))
            status.attrs.create("resumed_from", np.array([*resumes, run.resume_step], dtype=np.int64))
            self._write_status_attrs(status, "running", run.resume_step, float("nan"), "")
        except BaseException:
            f.close()
            self._file = None
            raise

    def _frame_paths(self, run: RunInfo) -> list[str]:
        if run.kind == "particles":
            moving = [L.WEIGHT] if run.moving_weights else []
            return [L.POSITION, *(f"{L.PARTICLES}/{name}" for name in run.channels), *moving]
        if run.kind == "mixtures":
            return [L.MIX_WEIGHTS, L.MIX_MEAN, L.MIX_COV]
        return [L.MEAN, L.COV]

    def _verify_resumable(self, run: RunInfo) -> None:
        """Before the file is touched: it holds this run (shapes, fingerprint) and every frame up to
        the resume step is present and lies inside the file; otherwise refuse, naming the steps."""
        step = run.resume_step
        try:
            f, _ = open_h5(self.path)
        except TrajectoryFileError as exc:
            lost = self._steps_cut_off(run)
            if lost is not None:
                raise TrajectoryFileError(
                    f"{self.path}: cannot resume at step {step}: the file was cut short and the frames of "
                    f"steps {lost[0]} … {lost[1]}, which the checkpoint counts as written, lie past its end; "
                    f"{START_OVER}") from exc
            raise TrajectoryFileError(f"cannot resume at step {step}: {exc}") from exc
        try:
            with f:
                self._check_compatible(f, run)
                valid = valid_rows(f)
                last = None
                for p in self._frame_paths(run):
                    if p not in f:
                        raise TrajectoryFileError(
                            f"{self.path}: cannot resume: the file has no {p} (the run records channels the "
                            "file does not hold); resume with the original channels or write to another file"
                        )
                    keep = _rows_up_to(f[p], valid.get(p, 0), step)
                    steps = f[p]["step"][:keep]
                    off = first_row_off_disk(f[p]["value"], keep, self.path)
                    if off is not None:
                        raise TrajectoryFileError(
                            f"{self.path}: cannot resume at step {step}: the frames of steps {int(steps[off])} … "
                            f"{int(steps[-1])} lie past the end of the file (it was cut short); {START_OVER}"
                        )
                    p_last = int(steps[-1]) if keep else None
                    last = p_last if last is None or p_last is None else min(last, p_last)
                    if p_last is None:
                        break
                self._refuse_lost_frames(step, last, f"the file's frames end at step {last}")
        except TrajectoryFileError:
            raise
        except Exception as exc:  # noqa: BLE001 - h5py's errors on damaged metadata
            raise damaged(self.path, f"cannot resume at step {step}: the file's metadata is damaged", exc) from exc

    def _steps_cut_off(self, run: RunInfo) -> tuple[int, int] | None:
        """For a truncated file: the first and last step (≤ the resume step) of the frames past its
        end, read from what remains of it; None when that cannot be told."""
        try:
            with open_swmr(self.path) as f:
                p = self._frame_paths(run)[0]
                # Not valid_rows: walking the whole file reads metadata a cut-off file has lost.
                committed = f[L.COMMITTED]
                names = L.text(committed.attrs.get("elements", np.array([], dtype="S1")))
                rows = min(f[p]["value"].shape[0], int(committed[list(names).index(p)]))
                off = first_row_off_disk(f[p]["value"], rows, self.path)
                steps = f[p]["step"]
                if off is None or first_row_off_disk(steps, rows, self.path) is not None:
                    return None  # the steps themselves are lost: no range to name
                steps = steps[:rows]
                kept = steps[off:][steps[off:] <= run.resume_step]
                return (int(kept[0]), int(kept[-1])) if kept.size else None
        except Exception:  # noqa: BLE001 - best effort: the caller reports the truncation anyway
            return None

    def _check_compatible(self, f: h5py.File, run: RunInfo) -> None:
        if L.PARAMETERS not in f or "h5md" not in f:
            raise TrajectoryFileError(
                f"{self.path}: cannot resume into this file: it is not a measureflow trajectory "
                "(no /parameters/measureflow); move it away or start the run without --resume"
            )
        attrs_ = f[L.PARAMETERS].attrs
        found = {
            "kind": L.text(attrs_.get("kind", b"?")),
            "replicas": int(attrs_.get("replicas", -1)),
            "size": int(attrs_.get("size", -1)),
            "dim": int(attrs_.get("dim", -1)),
            "dtype": L.text(attrs_.get("dtype", b"?")),
        }
        expected = {"kind": run.kind, "replicas": run.replicas, "size": run.size, "dim": run.dim, "dtype": run.dtype}
        if found != expected:
            raise TrajectoryFileError(
                f"{self.path}: cannot resume: the file holds a run with {found}, the resumed run has "
                f"{expected}; resume with the original parameters or write to another file"
            )
        stored = L.text(attrs_.get("fingerprint", b""))
        if run.fingerprint and stored and stored != run.fingerprint:
            raise TrajectoryFileError(
                f"{self.path}: cannot resume: the file holds another run (fingerprint {stored}, this run "
                f"{run.fingerprint}: other field, parameters, seed or grid); resume with the original "
                "parameters or write to another file"
            )

    def _refuse_lost_frames(self, resume_step: int, last: int | None, why: str) -> None:
        """Refuse a resume at ``resume_step`` when frames this writer wrote before it are missing."""
        start = 0 if last is None else last + 1
        # Bounded scan: the gap is normally a few steps; a huge gap is reported without listing.
        missing = [s for s in range(start, min(resume_step, start + 100_000) + 1) if self.trigger(s)]
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (" …" if len(missing) > 5 else "")
            raise TrajectoryFileError(
                f"{self.path}: cannot resume at step {resume_step}: {why}, so the frames at steps {shown} "
                f"(steps {missing[0]} … {missing[-1]}), which the checkpoint counts as written, are missing; "
                "start over with --restart (or delete the file and its checkpoint)"
            )

    def _write_order(self, f: h5py.File) -> None:
        self._order = [e.path for e in self._elements()]
        committed = f[L.COMMITTED] if L.COMMITTED in f else None
        if committed is None:
            committed = f.create_dataset(L.COMMITTED, shape=(0,), maxshape=(None,), chunks=(64,), dtype=np.int64)
        committed.resize(len(self._order), axis=0)
        committed[...] = np.array([e.rows for e in self._elements()], dtype=np.int64)
        committed.attrs.create("elements", L.fixed_strings(self._order))

    def _start_swmr(self) -> None:
        f = self._file
        for el in self._elements():
            el.bind(f)
        self._committed = f[L.COMMITTED]
        let_the_run_go_on()
        f.swmr_mode = True
        let_the_run_go_on()
        self._commit()

    # -- writing ----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._work is not None:
            self._work.raise_error()
        if not self._opened or self._closed:
            state = "closed" if self._closed else "not open"
            raise RuntimeError(f"H5MDWriter({self.path}) is {state}; call open(run) first")
        if self._failed:
            if self._work is not None:
                self._work.drain()  # the writing thread's own error, once it has stored it
            raise TrajectoryFileError(f"{self.path}: an earlier write failed; the file holds the rows flushed before it")

    def _append(self, el: _Element, step: int, time: float, value: np.ndarray) -> None:
        """Stage one row of ``el`` (on the run's thread); a full batch goes to the datasets."""
        if el.last_step is not None and step <= el.last_step:
            raise ValueError(
                f"{self.path}:{el.path}: step {step} is not after the last written step {el.last_step}; "
                "H5MD needs increasing steps (resume with RunInfo.resume_step to rewrite a run's tail)"
            )
        if el.batch == 1:
            # A large row (batch_rows): written at once (by the writing thread, from an array it owns).
            rows = (value[None], np.array([step], dtype=np.int64), np.array([time], dtype=np.float64))
            if self._work is None:
                self._write_rows(el, *rows)
            else:
                self._work.submit(self._write_rows, el, *rows)
            el.handed += 1
            el.handed_last_step = step
        else:
            el.stage(step, time, value, hold=self._work is not None)
            # A batch ends where a whole batch from the file's start would: after a flush handed over
            # part of one, the next is shorter, and the batches after it fill whole chunks again.
            if el.staged >= el.batch - el.phase:
                self._hand_over([el])
        el.last_step = step

    @contextlib.contextmanager
    def _writing(self):
        """Mark the datasets as possibly longer than their complete rows while appending; an earlier
        interrupted write's mark stays until :meth:`_repair` cuts back."""
        before, self._incomplete = self._incomplete, True
        yield
        self._incomplete = before

    def _write_rows(self, el: _Element, values, steps, times, buffers=None, held=()) -> None:
        """Append rows to ``el``'s datasets (on the writing thread with ``background``); ``buffers``: the
        staging buffers they came from, given back to ``el`` afterwards; ``held``: rows still to be copied
        into ``values`` (:func:`fill_held`)."""
        fill_held(values, held)
        with self._io("write a frame"), self._writing():
            el.append_rows(values, steps, times)
        if buffers is not None and len(el.spare) < 2:
            el.spare.append(buffers)

    def _write_batches(self, batches: list, commit: bool = False) -> None:
        """Append staged batches, then (``commit``) make the rows durable: a flush's work on the writing thread."""
        for el, *rows in batches:
            self._write_rows(el, *rows)
        if commit and not self._failed:
            self._commit_rows()

    def _hand_over(self, elements, commit: bool = False) -> None:
        """Hand the staged rows of ``elements`` to the datasets: written now, or queued as one call of the
        writing thread (the run's thread goes on filling other buffers: double buffering)."""
        batches = [(el, *el.take_staged()) for el in elements if el.staged]
        if self._work is not None:
            if batches or commit:
                self._work.submit(self._write_batches, batches, commit)
            return
        for i, (el, *rows) in enumerate(batches):
            try:
                self._write_rows(el, *rows)
            except BaseException:
                for late, values, _, _, buffers, held in batches[i:]:  # kept staged, appended by the next flush
                    late.restage(len(values), buffers, held)
                raise
        if commit:
            self._commit_rows()

    def _align_staged(self) -> None:
        """Drop a frame's rows staged for some of its elements only (an interruption between two)."""
        totals = [el.handed + el.staged for el in self._frame_elements]
        if len(set(totals)) > 1:
            common = min(totals)
            for el in self._frame_elements:
                el.staged -= min(el.staged, el.handed + el.staged - common)
                el.held = [(row, t) for row, t in el.held if row < el.staged]
                # Rows already handed over beyond the common count are cut back by _repair.
                el.last_step = int(el.stage_step[el.staged - 1]) if el.staged else el.handed_last_step

    def write_frame(self, step: int, time: float, state) -> None:
        """Append the state at (step, time); the only place where positions leave the device."""
        self._check_open()
        step, time = int(step), float(time)
        with self._io("write a frame"):
            self._maybe_flush()
            # A staged row is copied from the tensor into the staging buffer; the writing thread writes a
            # large row (batch_rows) from the array itself: a copy it owns.
            staged = [el.batch > 1 for el in self._frame_elements]
            self._write_frame_arrays(step, time, self._frame_arrays(state, copy=self._work is not None, staged=staged))

    def _frame_arrays(self, state, copy: bool = False, staged=()) -> list:
        """The frame's rows, one per frame element, checked against the run's shapes: the tensor itself
        where ``staged[i]`` (the staging buffer copies it, off the device included), else a host array;
        ``copy``: the caller owns the arrays (a host state's tensors share memory with them otherwise)."""
        run = self.run

        def host(t: torch.Tensor, i: int, shape: tuple):
            """``t`` (of ``shape``'s size) where it is staged (which copies it, in its own shape: a reshape is
            one more torch call), else a host array of ``shape``."""
            if i < len(staged) and staged[i]:
                return t.detach() if t.requires_grad else t
            # .cpu() of a device tensor is already a new host copy; a host tensor's array is its memory
            a = t.detach().cpu().numpy().reshape(shape)
            return np.array(a) if copy and t.is_cpu else a

        if run.kind == "particles":
            x = getattr(state, "x", None)
            if x is None or tuple(x.shape) != (run.replicas, run.size, run.dim):
                raise ShapeError(
                    f"{self.path}: expected a Particles state of shape (R, N, d) = "
                    f"{(run.replicas, run.size, run.dim)}, received {state!r}"
                )
            arrays = [host(x, 0, (run.rows, run.dim))]
            if run.channels:
                held = getattr(state, "channels", {})
                for name, tail in run.channels.items():
                    value = held.get(name)
                    if value is None or tuple(value.shape) != (run.replicas, run.size, *tail):
                        got = None if value is None else tuple(value.shape)
                        raise ShapeError(
                            f"{self.path}: channel {name!r} must have shape {(run.replicas, run.size, *tail)} in "
                            f"every frame; received {got}"
                        )
                    arrays.append(host(value.to(x.dtype), len(arrays), (run.rows, *tail)))
            if run.moving_weights:
                arrays.append(host(state.weights_or_uniform().to(torch.float64), len(arrays), (run.rows,)))
            return arrays
        if run.kind == "mixtures":
            R, K, d = run.replicas, run.size, run.dim
            means = getattr(state, "means", None)
            if means is None or tuple(means.shape) != (R, K, d):
                raise ShapeError(f"{self.path}: expected a GaussianMixtures state with means (R, K, d) = "
                                 f"{(R, K, d)}, received {state!r}")
            # One device→host transfer for the three parameters (a new tensor: the arrays own their memory).
            flat = torch.cat([state.weights.detach().reshape(R, K).to(means.dtype), means.detach().reshape(R, K * d),
                              state.covs.detach().reshape(R, K * d * d).to(means.dtype)], dim=1).cpu().numpy()
            return [np.ascontiguousarray(flat[:, :K]), np.ascontiguousarray(flat[:, K:K + K * d]).reshape(R, K, d),
                    np.ascontiguousarray(flat[:, K + K * d:]).reshape(R, K, d, d)]
        mean, cov = getattr(state, "mean", None), getattr(state, "cov", None)
        R, d = run.replicas, run.dim
        if mean is None or tuple(mean.shape) != (R, d) or tuple(cov.shape) != (R, d, d):
            raise ShapeError(
                f"{self.path}: expected a Gaussians state with mean (R, d) = {(R, d)} and cov "
                f"{(R, d, d)}, received {state!r}"
            )
        # One device→host transfer for both parameters (a new tensor: the arrays own their memory).
        flat = torch.cat([mean.detach().reshape(R, d), cov.detach().reshape(R, d * d).to(mean.dtype)], dim=1)
        flat = flat.cpu().numpy()
        return [np.ascontiguousarray(flat[:, :d]), np.ascontiguousarray(flat[:, d:]).reshape(R, d, d)]

    def _write_frame_arrays(self, step: int, time: float, arrays: list[np.ndarray]) -> None:
        """Append one frame's arrays (staged on the run's thread; see :meth:`_append`)."""
        for el, value in zip(self._frame_elements, arrays):
            self._append(el, step, time, value)
        self.stats["frames"] += 1
        self._pending_rows += 1
        if not self._observables and not self.run.observable_names:
            self._maybe_flush()

    def write_observables(self, step: int, time: float, values: dict) -> None:
        """Append one sample of each observable (each (R,) or (R, ...)); values leave the device here."""
        self._check_open()
        step, time = int(step), float(time)
        with self._io("write observables"):
            self._write_observable_arrays(step, time, _to_host(values))

    def _write_observable_arrays(self, step: int, time: float, host: dict) -> None:
        missing = {name: arr.shape for name, arr in host.items() if name not in self._observables}
        if missing:
            self._add_observables(missing)
        for name, arr in host.items():
            el = self._observables[name]
            if arr.shape != el.sample_shape:
                raise ShapeError(
                    f"{self.path}: observable {name!r} has shape {el.sample_shape} per sample in this file, "
                    f"received {arr.shape}"
                )
            self._append(el, step, time, arr if self._work is None or el.batch > 1 else np.array(arr))
        self._maybe_flush()

    def _add_observables(self, shapes: dict) -> None:
        # New datasets cannot be created safely in SWMR mode: leave it (a clean close), add them,
        # and enter it again. Giving RunInfo.observable_shapes avoids this (a run always does).
        self.stats["swmr_restarts"] += 1
        self.flush()
        self._file.close()
        self._file = f = self._h5("r+")
        for name, shape in shapes.items():
            if not name or name.startswith("/") or "//" in name:
                raise ValueError(f"{self.path}: {name!r} is not a valid observable name")
            self._observables[name] = self._new_element(
                f, f"{L.OBSERVABLES}/{name}", shape, np.float64, False
            )
        self._write_order(f)
        self._start_swmr()

    # -- flushing and closing ---------------------------------------------------------------------
    def _maybe_flush(self) -> None:
        if self._pending_rows == 0:
            return
        due = self.flush_frames is not None and self._pending_rows >= self.flush_frames
        if not due and self.flush_seconds is not None:
            due = _clock() - self._last_flush >= self.flush_seconds
        if due:
            if self._work is None:
                self.flush()
            else:
                # The writing thread appends the staged rows and commits them; the run goes on.
                self._work.raise_error()
                self._align_staged()
                self._hand_over(self._elements(), commit=True)
                self._pending_rows = 0
                self._last_flush = _clock()

    def _repair(self) -> None:
        """Cut datasets back to complete rows after an interrupted write."""
        if self._incomplete:
            for el in self._elements():
                el.cut(el.written)
            self._incomplete = False
        rows = [el.written for el in self._frame_elements]
        if len(set(rows)) > 1:  # a Gaussian frame with its mean but not its cov
            common = min(rows)
            for el in self._frame_elements:
                el.cut(common)
                el.last_step = el.step_of(common - 1) if common else None

    def _commit(self) -> None:
        # Data first, then the count of trustworthy rows, each made durable by a flush (at close, the
        # file's close flushes the count: a kill before it leaves the earlier count, which is safe).
        with self._writing():
            for el in self._elements():
                el.complete()
        self._file.flush()
        let_the_run_go_on()
        self._committed[...] = np.array([el.rows for el in self._elements()], dtype=np.int64)
        if not self._closing:
            self._file.flush()
        for el in self._elements():
            el.committed = el.rows

    def _check_space(self) -> None:
        """Refuse a flush the disk cannot hold, before HDF5 writes anything: an HDF5 file whose
        write failed midway cannot be closed cleanly (HDF5 retries at exit, and may crash)."""
        try:
            st = os.statvfs(self.path.parent)
        except (AttributeError, OSError):  # no statvfs (Windows), or it failed: let HDF5 try
            return
        free = st.f_bavail * st.f_frsize
        need = SPACE_MARGIN
        for el in self._elements():
            pending = el.written + el.staged - el.committed
            if pending <= 0:
                continue
            # Every chunk the pending rows touch is written whole; the first may already have its place.
            # (Sizes kept from bind(): asking h5py for each dataset's layout here took 0.5–0.8 ms of a close.)
            for rows, size in el.chunk_sizes:
                need += (pending // rows + 1) * size
        if free < need:
            self._failed = True
            raise io_failure(self.path, f"flush the trajectory ({need} bytes needed, {free} free)",
                             OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    @contextlib.contextmanager
    def _io(self, doing: str):
        """Turn an I/O error of HDF5 (disk full, a vanished disk) into one line naming the file and the
        cause; after one, the writer only closes its file (the rows committed before stay valid)."""
        try:
            yield
        except MeasureflowError:
            raise
        except (OSError, RuntimeError) as exc:
            self._failed = True
            raise io_failure(self.path, doing, exc) from exc

    def flush(self) -> None:
        """Make every complete row durable; safe after an interrupted write and when closed."""
        if self._work is not None:
            self._work.drain()  # the rows handed to the writing thread first
        if self._file is None:
            return
        if self._failed:
            # Never let a checkpoint be saved after rows that did not reach the file.
            raise TrajectoryFileError(f"{self.path}: an earlier write failed; the file holds the rows flushed before it")
        self._align_staged()
        self._hand_over(self._elements(), commit=True)
        if self._work is not None:
            self._work.drain()
        self._pending_rows = 0
        self._last_flush = _clock()

    def _commit_rows(self) -> None:
        """Cut back an interrupted write, then make the rows durable (module docstring, "Durability")."""
        if self._failed:
            raise TrajectoryFileError(f"{self.path}: an earlier write failed; the file holds the rows flushed before it")
        with self._io("flush the trajectory"):
            self._repair()
            # Nothing new since the last commit (a flush right before close): the file already says it all.
            if any(el.written != el.committed for el in self._elements()):
                self._check_space()
                self._commit()
        self.stats["flushes"] += 1

    def set_status(self, status: str, step: int, time: float, message: str = "") -> None:
        """Record the run's final status in /measureflow/status (written at close)."""
        self._status = (str(status), int(step), float(time), str(message))
        if self._file is None and self._closed:
            self._store_status()

    @staticmethod
    def _write_status_attrs(group, status, step, time, message) -> None:
        L.set_text(group.attrs, "status", status)
        group.attrs.create("step", np.int64(step))
        group.attrs.create("time", np.float64(time))
        L.set_text(group.attrs, "message", message)

    def _store_status(self) -> None:
        status = self._status
        if status is None:
            last = self._frame_elements[0] if self._frame_elements else None
            step = -1 if last is None or last.last_step is None else last.last_step
            status = ("closed", step, float("nan"), "the writer was closed without a run status")
        # No chunk cache: the status is a few attributes (a 4 MiB cache is set up per open).
        with h5py.File(self._where, "r+", libver="latest", rdcc_nbytes=0) as f:
            group = f.get(L.STATUS)
            self._write_status_attrs(group if group is not None else f.create_group(L.STATUS), *status)

    def close(self) -> None:
        """Flush, leave SWMR mode, record the status; idempotent."""
        if self._closed:
            return
        pending, work = None, self._work
        if work is not None:
            # Everything handed to the writing thread is written first (also on SIGTERM and at exit).
            # An I/O error of the thread has set _failed (close then writes nothing more); any other error
            # (e.g. a step out of order) left the rows before it, which close commits, as a foreground write would.
            pending, self._work = work.stop(), None
        self._closed = True
        _OPEN_WRITERS.discard(self)
        try:
            self._close()
        finally:
            if work is None or not work.running:  # no write can read the staging buffers any more
                for el in self._elements():
                    el.release_buffers()
            if pending is not None:
                raise pending

    def _close(self) -> None:
        f = self._file
        if f is None:
            # Never opened, or the writing thread failed to create it: an earlier file stays.
            with contextlib.suppress(Exception):
                self._finish_replace(keep_new=False)
            self._lock.release()
            return
        try:
            if self._failed:
                # An I/O error already happened: close without writing more, and record the status if
                # the disk takes it (the rows committed before the error stay the file's content).
                # Rows after the last flush are dropped first, so that closing writes only chunks
                # that already have their place in the file.
                with contextlib.suppress(Exception):
                    for el in self._elements():
                        el.staged = 0
                        el.cut(el.committed)
                self._file = None
                try:
                    f.close()
                except Exception:  # noqa: BLE001 - HDF5 keeps the file open and retries at exit
                    UNCLOSED_AFTER_ERROR.add(str(self._where))
                    return
                with contextlib.suppress(Exception):
                    self._store_status()
                return
            with self._io("close the trajectory"):
                try:
                    self._closing = True
                    self.flush()
                finally:
                    self._file = None
                    f.close()
                self._store_status()
                # A run that raised is recorded "interrupted": it does not replace an earlier file.
                self._finish_replace(keep_new=self._status is None or self._status[0] != "interrupted")
        finally:
            with contextlib.suppress(Exception):
                self._finish_replace(keep_new=False)
            self._lock.release()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass

    @property
    def frames(self) -> int:
        """Frames written (complete rows of the position / mean dataset)."""
        if self._work is not None:
            self._work.drain()
        if not self._frame_elements:
            return 0
        el = self._frame_elements[0]
        return el.written + el.staged

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self._file is not None else "new")
        return f"H5MDWriter({str(self.path)!r}, {state}, frames={self.frames})"


def _to_host(values: dict) -> dict[str, np.ndarray]:
    """Observables as float64 host arrays, with one device→host copy per (device, dtype) group."""
    out: dict[str, np.ndarray] = {}
    groups: dict[tuple, list[str]] = {}
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            if value.is_complex():
                raise TypeError(f"observable {name!r} is complex; store its real and imaginary parts separately")
            groups.setdefault((value.device, value.dtype), []).append(name)
        else:
            out[name] = np.asarray(value, dtype=np.float64)
    for (device, _), names in groups.items():
        tensors = [values[n].detach() for n in names]
        if device.type == "cpu" or len(tensors) == 1:
            arrays = [t.cpu().numpy() for t in tensors]
        else:
            flat = torch.cat([t.reshape(-1) for t in tensors]).cpu().numpy()
            arrays, start = [], 0
            for t in tensors:
                arrays.append(flat[start : start + t.numel()].reshape(t.shape))
                start += t.numel()
        for name, arr in zip(names, arrays):
            out[name] = np.ascontiguousarray(arr, dtype=np.float64)
    return {name: out[name] for name in values}
