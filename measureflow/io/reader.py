"""Read measureflow H5MD trajectories lazily (``measureflow.open(path)``).

Opening a file reads only its metadata (groups, attributes, dataset shapes, the row counts of
``/measureflow/committed``); frames are read when indexed::

    with measureflow.open("run.h5") as traj:
        traj.kind, traj.replicas, traj.size, traj.dim, len(traj)
        x_last = traj.positions[-1]              # (R, N, d) numpy array: reads one frame
        energy = traj.observables["energy"].values[:]  # (frames, R)

:class:`TrajectoryFile` implements the trajectory protocol
(:class:`~measureflow.io.trajectory.Trajectory`). A file whose writer was killed is opened in
SWMR-read mode and shows the rows its last flush committed (see :mod:`measureflow.io.h5md`); its
status is the writer's provisional ``running`` (see :data:`FILE_STATUS_CODES`).
"""

from __future__ import annotations

import json
import math
import json
import os
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from ..errors import TrajectoryFileError
from ..status import STATUS_COMPLETED, Status
from . import layout as L
from .base import Series
from .h5md import valid_rows
from .hdf5file import check_rows_on_disk, damaged, open_h5
from .trajectory import ShapedTrajectory, Trajectory

__all__ = ["open_trajectory", "TrajectoryFile", "FrameArray", "completed_status", "FILE_STATUS_CODES"]

#: Status codes that only a trajectory file records, besides the run's :data:`measureflow.status.CODES`.
FILE_STATUS_CODES = {
    "running": "the writer opened the file and recorded no final status: the run is still writing, or "
               "its process was killed (then the file is ``unclosed``); the file holds the rows of the last flush",
    "closed": "the writer was closed without being told how the run ended",
    "unknown": "the file's status group has no status attribute",
}


class FrameArray:
    """A lazy [frames, ...] view of an HDF5 dataset; indexing reads only the selected frames.

    ``frame_shape`` may regroup the stored sample (positions are stored [frames][R·N][d] and shown
    as [frames][R][N][d]). Only the first ``frames`` rows are visible (rows after the last committed
    flush of a crashed run are hidden).
    """

    def __init__(self, dataset: h5py.Dataset, frames: int, frame_shape: tuple[int, ...] | None = None):
        self.dataset = dataset
        self.frames = int(frames)
        self.frame_shape = tuple(frame_shape) if frame_shape is not None else tuple(dataset.shape[1:])
        if math.prod(self.frame_shape) != math.prod(dataset.shape[1:]):
            raise ValueError(f"frame shape {self.frame_shape} does not match stored {dataset.shape[1:]}")

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.frames, *self.frame_shape)

    @property
    def dtype(self) -> np.dtype:
        return self.dataset.dtype

    @property
    def ndim(self) -> int:
        return 1 + len(self.frame_shape)

    def __len__(self) -> int:
        return self.frames

    def _read(self, rows) -> np.ndarray:
        empty = np.zeros((0, *self.dataset.shape[1:]), self.dtype)
        if isinstance(rows, slice):
            data = self.dataset[rows] if rows.start != rows.stop else empty
        else:
            # h5py wants increasing, unique indices: read those, then put them back in order.
            unique, inverse = np.unique(rows, return_inverse=True)
            data = self.dataset[unique.tolist()][inverse] if unique.size else empty
        return data.reshape((data.shape[0], *self.frame_shape))

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        first, rest = key[0], key[1:]
        if first is Ellipsis:
            first, rest = slice(None), (Ellipsis, *rest)
        if isinstance(first, (int, np.integer)):
            i = int(first)
            if not -self.frames <= i < self.frames:
                raise IndexError(f"frame {i} out of range for {self.frames} frames")
            out = self._read(slice(i % self.frames, i % self.frames + 1))[0]
            return out[rest] if rest else out
        elif isinstance(first, slice):
            start, stop, step = first.indices(self.frames)
            if step == 1:
                out = self._read(slice(start, max(start, stop)))
            else:
                out = self._read(np.arange(start, stop, step))
        else:
            idx = np.asarray(first)
            if idx.dtype == bool:
                if idx.shape != (self.frames,):
                    raise IndexError(f"boolean frame mask must have shape ({self.frames},)")
                idx = np.flatnonzero(idx)
            idx = idx.astype(np.int64).reshape(-1)
            if idx.size and (idx.min() < -self.frames or idx.max() >= self.frames):
                raise IndexError(f"frame index out of range for {self.frames} frames")
            out = self._read(idx % self.frames if self.frames else idx)
        # The frame axis is kept: the remaining indices apply to each frame.
        return out[(slice(None), *rest)] if rest else out

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def __iter__(self):
        for i in range(self.frames):
            yield self[i]

    def __repr__(self) -> str:
        return f"FrameArray(shape={self.shape}, dtype={self.dtype}, dataset={self.dataset.name!r})"


def _fail(path: Path, what: str) -> TrajectoryFileError:
    return TrajectoryFileError(f"{path}: {what}")


def open_trajectory(path) -> "TrajectoryFile":
    """Open a trajectory written by measureflow; raises TrajectoryFileError for other files."""
    return TrajectoryFile(path)


def completed_status(path) -> Status | None:
    """The :class:`~measureflow.status.Status` of the trajectory file at ``path`` when it records a
    completed run; None when the file is missing, unreadable, or records any other status (a run
    that failed, was interrupted, or is still ``running``)."""
    if not Path(path).exists():
        return None
    try:
        with open_trajectory(path) as traj:
            status = traj.status
    except Exception:  # noqa: BLE001 - an unreadable file simply is not "completed"
        return None
    return status if status is not None and status.code == STATUS_COMPLETED else None


class TrajectoryFile(ShapedTrajectory):
    """A measureflow H5MD trajectory opened for reading (lazy; use as a context manager).

    Implements :class:`~measureflow.io.trajectory.Trajectory`: ``positions``, ``means``, ``covs``
    and observable values are lazy :class:`FrameArray` views that read only the frames indexed.
    ``unclosed`` is True when the writer did not close the file (killed, or still writing).
    """

    def __init__(self, path):
        self.path = Path(path)
        path = self.path
        if not path.exists():
            raise _fail(path, "no such file (expected an H5MD trajectory written by measureflow)")
        if path.is_dir():
            raise _fail(path, "is a directory, not a trajectory file")
        try:
            is_hdf5 = h5py.is_hdf5(path)
        except OSError as exc:
            raise _fail(path, f"cannot be read ({exc})") from exc
        if not is_hdf5:
            raise _fail(path, "is not an HDF5 file (expected an H5MD trajectory written by measureflow)")
        self.file, self.unclosed = open_h5(path)  # unclosed: the writer did not close the file
        try:
            self._check()
        except TrajectoryFileError:
            self.file.close()
            raise
        except Exception as exc:  # noqa: BLE001 - h5py's errors on damaged metadata
            self.file.close()
            raise damaged(path, "has damaged HDF5 metadata", exc) from exc
        except BaseException:
            self.file.close()
            raise

    def _check(self) -> None:
        f, path = self.file, self.path
        if "h5md" not in f or "version" not in f["h5md"].attrs:
            raise _fail(path, "is an HDF5 file but not an H5MD file (no /h5md group with a version attribute)")
        version = tuple(int(v) for v in np.atleast_1d(f["h5md"].attrs["version"]))
        if version[:1] != (1,):
            raise _fail(path, f"uses H5MD version {version}; measureflow reads H5MD 1.x")
        if L.PARAMETERS not in f:
            raise _fail(
                path,
                "is an H5MD file but was not written by measureflow (no /parameters/measureflow); "
                "open it with h5py or pyh5md instead",
            )
        attrs = f[L.PARAMETERS].attrs
        kind = L.text(attrs.get("kind", b""))
        if kind not in ("particles", "gaussians", "mixtures"):
            kind = ("particles" if L.POSITION in f else "gaussians" if L.MEAN in f
                    else "mixtures" if L.MIX_MEAN in f else "")
        if not kind:
            raise _fail(path, "has /parameters/measureflow but neither particle positions nor Gaussian parameters")
        self._kind = kind
        frame = f[{"particles": L.POSITION, "gaussians": L.MEAN, "mixtures": L.MIX_MEAN}[kind]]
        shape = frame["value"].shape
        if kind == "mixtures":
            self._replicas, self._size, self._dim = shape[1], shape[2], shape[3]
        elif kind == "particles":
            self._replicas = int(attrs.get("replicas", 1))
            self._size = shape[1] // self._replicas
            self._dim = shape[2]
        else:
            self._replicas, self._dim = shape[1], shape[2]
            self._size = 0
        self.dtype = frame["value"].dtype
        self._rows = valid_rows(self.file)
        if kind == "particles":
            self._frame_count = self._rows.get(L.POSITION, 0)
        elif kind == "mixtures":
            self._frame_count = min(self._rows.get(p, 0) for p in (L.MIX_WEIGHTS, L.MIX_MEAN, L.MIX_COV))
        else:
            self._frame_count = min(self._rows.get(L.MEAN, 0), self._rows.get(L.COV, 0))
        frames = {"particles": [L.POSITION], "gaussians": [L.MEAN, L.COV],
                  "mixtures": [L.MIX_WEIGHTS, L.MIX_MEAN, L.MIX_COV]}[kind]
        for name in frames:
            for member in ("value", "step", "time"):
                if member in f[name]:
                    check_rows_on_disk(f[name][member], self._frame_count, path)

    # -- context ------------------------------------------------------------------------------------
    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __len__(self) -> int:
        return self._frame_count

    @property
    def source(self) -> str:
        return str(self.path)

    # -- metadata -----------------------------------------------------------------------------------
    @cached_property
    def parameters(self) -> dict:
        raw = self.file[L.PARAMETERS][()]
        try:
            parameters = json.loads(L.text(raw))
        except json.JSONDecodeError as exc:
            raise _fail(self.path, f"/parameters/measureflow is not valid JSON ({exc})") from exc
        if not isinstance(parameters, dict):
            raise _fail(self.path, f"/parameters/measureflow is not a JSON object (it holds a {type(parameters).__name__})")
        return parameters

    @property
    def fingerprint(self) -> str:
        """Hash of what determines the run's numbers, as its writer recorded it ("" when not recorded;
        see :func:`measureflow.io.runinfo.run_fingerprint`)."""
        return L.text(self.file[L.PARAMETERS].attrs.get("fingerprint", b""))

    @property
    def versions(self) -> dict:
        return dict(self.parameters.get("versions", {}))

    @cached_property
    def status(self) -> Status | None:
        """The status recorded in ``/measureflow/status`` (None if the file has none).

        A finished run records one of :data:`measureflow.status.CODES`. While the writer holds the
        file the code is ``running`` (step −1, or the step a resumed run restarted from; time NaN),
        and it stays so when the writer was killed: ``unclosed`` then tells the two apart (True:
        the file was not closed). ``closed`` means the writer was closed without a status (see
        :data:`FILE_STATUS_CODES`). ``resumed_from`` lists the steps the run was resumed from.
        """
        if L.STATUS not in self.file:
            return None
        a = self.file[L.STATUS].attrs
        resumed = [int(s) for s in np.atleast_1d(a["resumed_from"])] if "resumed_from" in a else ()
        return Status(
            L.text(a.get("status", b"unknown")),
            int(a.get("step", -1)),
            float(a.get("time", float("nan"))),
            L.text(a.get("message", b"")),
            resumed_from=resumed,
        )

    @property
    def h5md_version(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.file["h5md"].attrs["version"])

    # -- time axis ----------------------------------------------------------------------------------
    def _frame_group(self) -> h5py.Group:
        return self.file[{"particles": L.POSITION, "gaussians": L.MEAN, "mixtures": L.MIX_MEAN}[self.kind]]

    @cached_property
    def steps(self) -> np.ndarray:
        return self._frame_group()["step"][: self._frame_count]

    @cached_property
    def times(self) -> np.ndarray:
        return self._frame_group()["time"][: self._frame_count]

    # -- data ---------------------------------------------------------------------------------------
    @property
    def positions(self) -> FrameArray | None:
        """Lazy positions, shape (frames, R, N, d); None for a Gaussian run."""
        if self.kind != "particles":
            return None
        return FrameArray(self.file[L.POSITION]["value"], self._frame_count, (self._replicas, self._size, self._dim))

    @property
    def channels(self) -> dict:
        """Lazy auxiliary channels (name → (frames, R, N, ...)), the particle group's time-dependent
        members other than position."""
        if self.kind != "particles":
            return {}
        out = {}
        group = self.file[L.PARTICLES]
        for name, obj in group.items():
            if name not in L.RESERVED_CHANNELS and L.is_element(obj):
                tail = tuple(obj["value"].shape[2:])
                out[name] = FrameArray(obj["value"], self._frame_count, (self._replicas, self._size, *tail))
        return out

    @cached_property
    def weights(self) -> np.ndarray | None:
        """Weights, shape (R, N) (the first frame's when they move); None for a Gaussian run."""
        if self.kind != "particles" or L.WEIGHT not in self.file:
            return None
        moving = self.weight_frames
        if moving is not None:
            return np.asarray(moving[0]) if len(moving) else None
        return self.file[L.WEIGHT][()].reshape(self.replicas, self.size)

    @property
    def weight_frames(self) -> FrameArray | None:
        """Lazy weights of every frame, shape (frames, R, N), when they move (MATH.md §15.6); else None."""
        if self.kind != "particles" or not L.is_element(self.file.get(L.WEIGHT)):
            return None
        return FrameArray(self.file[L.WEIGHT]["value"], self._frame_count, (self._replicas, self._size))

    @property
    def means(self) -> FrameArray | None:
        """Lazy Gaussian means, shape (frames, R, d) (mixtures: (frames, R, K, d)); None for a particle run."""
        if self.kind == "particles":
            return None
        return FrameArray(self.file[L.MEAN if self.kind == "gaussians" else L.MIX_MEAN]["value"], self._frame_count)

    @property
    def covs(self) -> FrameArray | None:
        """Lazy Gaussian covariances, shape (frames, R, d, d) (mixtures: (frames, R, K, d, d)); None for particles."""
        if self.kind == "particles":
            return None
        return FrameArray(self.file[L.COV if self.kind == "gaussians" else L.MIX_COV]["value"], self._frame_count)

    @property
    def mixture_weights(self) -> FrameArray | None:
        """Lazy component weights of a mixture run, shape (frames, R, K); None otherwise."""
        if self.kind != "mixtures":
            return None
        return FrameArray(self.file[L.MIX_WEIGHTS]["value"], self._frame_count)

    @cached_property
    def observables(self) -> dict[str, Series]:
        """Observables by name; values are lazy arrays of shape (samples, R, ...)."""
        out: dict[str, Series] = {}
        if L.OBSERVABLES not in self.file:
            return out
        root = self.file[L.OBSERVABLES]
        prefix = L.OBSERVABLES + "/"

        def visit(group, base):
            # Iterating the group (not visititems) keeps the writer's order (creation order).
            for key, obj in group.items():
                name = base + key
                if L.is_element(obj):
                    n = self._rows.get(prefix + name, obj["value"].shape[0])
                    time = obj["time"][:n] if "time" in obj else np.full(n, np.nan)
                    out[name] = Series(name, obj["step"][:n], time, FrameArray(obj["value"], n))
                elif isinstance(obj, h5py.Group):
                    visit(obj, name + "/")

        visit(root, "")
        return out

    @property
    def events(self) -> dict:
        """The located events (``/observables/events``, written by ``Simulation(events=...)``): numpy
        arrays ``name``, ``step``, ``time``, ``replica``, ``index`` and the crossing replica's state
        (``position`` and channels, or ``mean`` and ``cov``), one row per crossing; empty when none."""
        path = L.OBSERVABLES + "/events"
        if path not in self.file:
            return {}
        group = self.file[path]
        names = json.loads(group.attrs.get("names", "{}"))
        out = {key: group[key][()] for key in group if key != "value"}
        out["index"] = group["value"][()]
        out["name"] = np.array([names.get(str(int(i)), str(int(i))) for i in out["index"]], dtype=object)
        return out

    @property
    def file_size(self) -> int:
        return os.path.getsize(self.path)

    # -- summary ------------------------------------------------------------------------------------
    def summary(self) -> str:
        """A short human-readable description (``measureflow info run.h5``)."""
        p = self.parameters
        lines = [f"{self.path}  ({_size(self.file_size)}, H5MD {'.'.join(map(str, self.h5md_version))})"]
        if self.kind == "particles":
            shape = f"R={self.replicas} replicas × N={self.size} particles, d={self.dim}"
        elif self.kind == "mixtures":
            shape = f"R={self.replicas} replicas × K={self.size} components, d={self.dim}"
        else:
            shape = f"R={self.replicas} replicas, d={self.dim}"
        lines.append(f"  kind         {self.kind} ({shape}, {self.dtype})")
        if self.frames:
            steps, times = self.steps, self.times
            span = f"steps {steps[0]} … {steps[-1]}, t = {times[0]:.6g} … {times[-1]:.6g}"
            lines.append(f"  frames       {self.frames} ({span})")
        else:
            lines.append("  frames       0")
        for key in ("field", "integrator", "seed"):
            if key in p:
                lines.append(f"  {key:<12} {_describe(p[key])}")
        status = self.status
        if status is not None:
            text = status.code
            if text == "running":
                text = (
                    "running — the file was not closed (the run was killed or is still writing)"
                    if self.unclosed
                    else "running (no final status recorded)"
                )
            elif status.step >= 0:
                text += f" at step {status.step}"
                if math.isfinite(status.time):
                    text += f" (t = {status.time:.6g})"
            if status.message:
                text += f": {status.message}"
            if status.resumed_from:
                text += f" [resumed from step {', '.join(map(str, status.resumed_from))}]"
            lines.append(f"  status       {text}")
        obs = self.observables
        if obs:
            parts = [f"{name} {list(s.values.shape)}" for name, s in obs.items()]
            lines.append(f"  observables  {', '.join(parts)}")
        versions = self.versions
        if versions:
            shown = ", ".join(f"{k} {v}" for k, v in versions.items() if isinstance(v, str))
            lines.append(f"  versions     {shown}")
        # Text from the file (parameters, messages, even its name) is shown escaped: a control
        # character in it can neither fake a line nor send the terminal an escape sequence.
        return "\n".join(_escape(line) for line in lines)

    def __repr__(self) -> str:
        return (
            f"TrajectoryFile({str(self.path)!r}, kind={self.kind}, R={self.replicas}, N={self.size}, "
            f"d={self.dim}, frames={self.frames})"
        )


def _escape(text: str) -> str:
    """``text`` with every non-printable character written as a Python escape (\\x1b, \\n, …)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _describe(value) -> str:
    if isinstance(value, dict):
        name = value.get("name")
        rest = {k: v for k, v in value.items() if k != "name"}
        body = json.dumps(rest, sort_keys=True)
        if len(body) > 100:
            body = body[:97] + "…"
        return f"{name} {body}" if name else body
    return str(value)
