"""Staging buffers kept between runs: what a writer's first frames cost on a fresh buffer.

The H5MD writer stages rows in host buffers of about 1 MiB (``STAGE_BYTES``) and appends them in
batches. A fresh buffer's pages are mapped on first write, one page fault per 4 KiB: on the virtual
machines these runs often use a fault costs several microseconds, up to tens when the host is busy
(staging 3.8 MiB into new memory took 2–30 ms, against 0.25 ms into mapped pages). The allocator
gives the memory back at a writer's close, so every run of a sweep or a notebook paid it again.
``pool.clear()`` lets the memory go.

:data:`pool` keeps the buffer sets writers are done with, by shape and dtype, for the next writer of
the same layout: at most :data:`PER_LAYOUT` sets a layout and :data:`MAX_BYTES` in all (the oldest
layout goes first), thread-safe (a background writer's thread takes and returns sets too). A set
is only ever returned once no write can still read it (after the writing thread has stopped).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

__all__ = ["MAX_BYTES", "PER_LAYOUT", "StagingPool", "pool"]

#: Most bytes of staging buffers kept between writers, all layouts together.
MAX_BYTES = 64 << 20
#: Most buffer sets kept per layout (a background writer stages into one while another is written).
PER_LAYOUT = 2


class StagingPool:
    """Buffer sets ``(values, steps, times)`` by layout ``(batch, sample_shape, dtype)`` (module docstring)."""

    def __init__(self, max_bytes: int = MAX_BYTES, per_layout: int = PER_LAYOUT):
        self.max_bytes = max_bytes
        self.per_layout = per_layout
        self._sets: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def _key(buffers) -> tuple:
        values = buffers[0]
        return values.shape, values.dtype.str

    @staticmethod
    def _size(buffers) -> int:
        return sum(a.nbytes for a in buffers)

    def take(self, batch: int, sample_shape: tuple, dtype) -> tuple | None:
        """A kept set of this layout (its pages already mapped), or None."""
        key = ((batch, *sample_shape), np.dtype(dtype).str)
        with self._lock:
            kept = self._sets.get(key)
            if not kept:
                return None
            buffers = kept.pop()
            self._bytes -= self._size(buffers)
            return buffers

    def give(self, buffers) -> None:
        """Keep ``buffers`` for a later writer, within the bounds; no writer may use them after this."""
        size = self._size(buffers)
        if size > self.max_bytes:
            return
        key = self._key(buffers)
        with self._lock:
            kept = self._sets.setdefault(key, [])
            if len(kept) >= self.per_layout:
                return
            kept.append(buffers)
            self._sets.move_to_end(key)
            self._bytes += size
            while self._bytes > self.max_bytes:  # the least recently returned layout goes first
                oldest, sets = next(iter(self._sets.items()))
                dropped = sets.pop(0)
                self._bytes -= self._size(dropped)
                if not sets:
                    del self._sets[oldest]

    def clear(self) -> None:
        with self._lock:
            self._sets.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes


#: The process's pool (the H5MD writer's).
pool = StagingPool()
