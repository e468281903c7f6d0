"""What the trajectory pictures read: a :class:`~measureflow.io.Trajectory`, or the path of a file.

The pictures read the protocol's members directly; the functions here open a path, refuse other
inputs with a message that says what to pass instead, and read frames in the form the drawing code
wants (host float arrays of one replica, a few frames at a time).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np

from ..errors import ParameterError, TrajectoryFileError
from ..io.trajectory import KINDS, Trajectory

__all__ = [
    "opened",
    "to_numpy",
    "read_all",
    "frame_times",
    "drawn_weights",
    "replica_positions",
    "gaussian_frames",
    "line_densities",
]


def to_numpy(value) -> np.ndarray:
    """A numpy view of an array, or a host copy of a tensor (possibly on a GPU)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def read_all(arr) -> np.ndarray:
    """The whole of a (small) possibly lazy array: observable values and times."""
    if isinstance(arr, np.ndarray):
        return arr
    return to_numpy(arr[:])


@contextlib.contextmanager
def opened(traj) -> Iterator[Trajectory]:
    """Yield the trajectory to draw: ``traj`` itself, or the file at path ``traj`` (closed on exit).

    Raises TypeError for anything but a :class:`~measureflow.io.Trajectory` or a path, and
    ValueError for a trajectory with nothing to draw.
    """
    if isinstance(traj, (str, os.PathLike)):
        from ..io.reader import open_trajectory

        with open_trajectory(traj) as handle:
            yield _checked(handle)
        return
    if not isinstance(traj, Trajectory):
        raise TypeError(
            f"cannot plot a {type(traj).__name__}: expected a measureflow.io.Trajectory (a file opened with "
            "measureflow.open, a MemoryWriter, a simulation Result, a measureflow.io.Snapshot) or the path of "
            "a trajectory file; wrap a bare Particles or Gaussians state as measureflow.io.Snapshot(state)"
        )
    yield _checked(traj)


def _checked(traj: Trajectory) -> Trajectory:
    source = traj.source
    if traj.kind not in KINDS:
        raise ParameterError(f"{source}: unknown trajectory kind {traj.kind!r}; expected one of {KINDS}")
    if len(traj) == 0:
        raise ParameterError(
            f"{source}: the trajectory has no frames, so there is nothing to draw; check that the "
            "run wrote at least one frame (its writer trigger fires on step 0 by default)"
        )
    if traj.replicas < 1 or traj.dim < 1 or (traj.kind == "particles" and traj.size < 1):
        raise ParameterError(
            f"{source}: empty trajectory (replicas={traj.replicas}, particles={traj.size}, dim={traj.dim})"
        )
    return traj


def frame_times(traj: Trajectory) -> np.ndarray:
    """(F,) frame times as floats."""
    return np.asarray(read_all(traj.times), dtype=float).reshape(-1)


def drawn_weights(traj: Trajectory, frame: int | None = None) -> np.ndarray | None:
    """(R, N) particle weights to scale markers by (those of ``frame`` when the weights move); None when
    uniform (plain markers) or absent."""
    weights = traj.weights if frame is None else traj.weights_at(frame)
    R, N = traj.replicas, traj.size
    w = None if weights is None else to_numpy(weights).astype(float)
    if w is not None:
        w = w.reshape(R, N) if w.size == R * N else None
    if w is not None and not (np.isfinite(w).all() and (w >= 0).all()):
        raise TrajectoryFileError(f"{traj.source}: the particle weights hold NaN, inf or negative values; the file "
                                  "is damaged (a run never writes such weights)")
    if w is not None and np.allclose(w, 1.0 / max(N, 1)):
        w = None
    return w


def replica_positions(traj: Trajectory, positions, frame: int, replica: int,
                      particles: np.ndarray | None = None) -> np.ndarray:
    """(n, d) positions of one replica at one frame of ``positions = traj.positions`` (one frame read).

    ``positions`` is passed in (read once per picture): an in-memory trajectory stacks its frames
    each time the member is read. ``particles`` keeps those rows only.
    """
    x = to_numpy(positions[int(frame), int(replica)])
    if x.shape != (traj.size, traj.dim):
        raise ParameterError(
            f"{traj.source}: replica {replica} of frame {frame} of the positions has shape {x.shape}; expected "
            f"(N, d) = {(traj.size, traj.dim)}"
        )
    return x if particles is None else x[particles]


def gaussian_frames(traj: Trajectory, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Means (k, R, d) and covariances (k, R, d, d) at frames ``idx`` (sorted, unique), as floats."""
    idx = np.asarray(idx, dtype=np.int64)
    return to_numpy(traj.means[idx]).astype(float), to_numpy(traj.covs[idx]).astype(float)


def line_densities(traj: Trajectory, frames, replica: int, bins: int):
    """(xs, edges, densities, w) of a 1-D particle replica over ``frames``: the positions of each frame,
    ``bins`` equal bins spanning the 0.2–99.8 % quantiles of all of them, the weighted histogram
    densities (frames, bins) and the replica's weights (None when uniform). Raises ValueError when
    every position is non-finite."""
    positions = traj.positions
    xs = [replica_positions(traj, positions, f, replica)[:, 0] for f in frames]
    pooled = np.concatenate([x[np.isfinite(x)] for x in xs]) if xs else np.zeros(0)
    if pooled.size == 0:
        raise ParameterError(f"{traj.source}: every position is non-finite; nothing to draw")
    lo, hi = np.quantile(pooled, [0.002, 0.998])
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    weights = drawn_weights(traj)
    w = None if weights is None else weights[replica]
    dens = np.stack([np.histogram(x, bins=edges, weights=w, density=True)[0] for x in xs])
    return xs, edges, dens, w

