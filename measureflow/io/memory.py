"""In-memory trajectory: frames kept as host numpy arrays (tests, notebooks, small runs).

Exposes the same names as the file reader (:class:`~measureflow.io.reader.Trajectory`) where they
apply: ``steps``, ``times``, ``positions`` (frames × R × N × d), ``weights``, ``means`` / ``covs``
(Gaussian runs), ``observables`` (name → :class:`~measureflow.io.base.Series`), ``parameters`` and
``status``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ShapeError
from .base import Series, Writer
from .runinfo import RunInfo

__all__ = ["MemoryWriter"]


def _host(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy().copy()
    return np.array(t, dtype=np.float64)


class MemoryWriter(Writer):
    """Keep every written frame and observable sample in lists of numpy arrays."""

    def __init__(self, every=1):
        super().__init__(every)
        self.run: RunInfo | None = None
        self.status: dict | None = None
        self._steps: list[int] = []
        self._times: list[float] = []
        self._frames: list[tuple[np.ndarray, ...]] = []
        self._obs: dict[str, tuple[list, list, list]] = {}
        self.closed = False

    def open(self, run: RunInfo) -> None:
        self.run = run
        self.closed = False
        for name in run.observable_names:
            self._obs.setdefault(name, ([], [], []))
        if run.resume_step is not None:
            # Same rule as the file writer: drop what lies after the resumed step.
            keep = sum(1 for s in self._steps if s <= run.resume_step)
            del self._steps[keep:], self._times[keep:], self._frames[keep:]
            for steps, times, values in self._obs.values():
                keep = sum(1 for s in steps if s <= run.resume_step)
                del steps[keep:], times[keep:], values[keep:]

    def write_frame(self, step: int, time: float, state) -> None:
        if self.run is None:
            raise RuntimeError("MemoryWriter: call open(run) before writing")
        if self.run.kind == "particles":
            x = state.x
            expected = (self.run.replicas, self.run.size, self.run.dim)
            if tuple(x.shape) != expected:
                raise ShapeError(f"MemoryWriter: expected positions of shape {expected}, received {tuple(x.shape)}")
            frame = (_host(x),)
        else:
            frame = (_host(state.mean), _host(state.cov))
        self._steps.append(int(step))
        self._times.append(float(time))
        self._frames.append(frame)

    def write_observables(self, step: int, time: float, values: dict) -> None:
        for name, value in values.items():
            steps, times, samples = self._obs.setdefault(name, ([], [], []))
            steps.append(int(step))
            times.append(float(time))
            samples.append(_host(value).astype(np.float64, copy=False))

    def set_status(self, status: str, step: int, time: float, message: str = "") -> None:
        self.status = {"status": str(status), "step": int(step), "time": float(time), "message": str(message)}

    def close(self) -> None:
        self.closed = True

    # -- trajectory view --------------------------------------------------------------------------
    @property
    def kind(self) -> str | None:
        return None if self.run is None else self.run.kind

    @property
    def replicas(self) -> int:
        return self.run.replicas

    @property
    def size(self) -> int:
        return self.run.size

    @property
    def dim(self) -> int:
        return self.run.dim

    @property
    def parameters(self) -> dict:
        return {} if self.run is None else self.run.parameters

    @property
    def frames(self) -> int:
        return len(self._steps)

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def steps(self) -> np.ndarray:
        return np.array(self._steps, dtype=np.int64)

    @property
    def times(self) -> np.ndarray:
        return np.array(self._times, dtype=np.float64)

    def _stack(self, index: int, tail: tuple) -> np.ndarray:
        if not self._frames:
            dtype = np.dtype(self.run.dtype) if self.run is not None else np.float64
            return np.zeros((0, *tail), dtype=dtype)
        return np.stack([f[index] for f in self._frames])

    @property
    def positions(self) -> np.ndarray | None:
        """Positions, shape (frames, R, N, d); None for a Gaussian run."""
        if self.kind != "particles":
            return None
        return self._stack(0, (self.run.replicas, self.run.size, self.run.dim))

    @property
    def weights(self) -> np.ndarray | None:
        if self.kind != "particles":
            return None
        if self.run.weights is not None:
            return self.run.weights
        return np.full((self.run.replicas, self.run.size), 1.0 / self.run.size)

    @property
    def means(self) -> np.ndarray | None:
        """Gaussian means, shape (frames, R, d); None for a particle run."""
        if self.kind != "gaussians":
            return None
        return self._stack(0, (self.run.replicas, self.run.dim))

    @property
    def covs(self) -> np.ndarray | None:
        """Gaussian covariances, shape (frames, R, d, d); None for a particle run."""
        if self.kind != "gaussians":
            return None
        return self._stack(1, (self.run.replicas, self.run.dim, self.run.dim))

    @property
    def gaussians(self) -> tuple[np.ndarray, np.ndarray] | None:
        return None if self.kind != "gaussians" else (self.means, self.covs)

    @property
    def observables(self) -> dict[str, Series]:
        out = {}
        for name, (steps, times, values) in self._obs.items():
            arr = np.stack(values) if values else np.zeros((0,))
            out[name] = Series(name, np.array(steps, dtype=np.int64), np.array(times, dtype=np.float64), arr)
        return out

    def __repr__(self) -> str:
        return f"MemoryWriter(kind={self.kind}, frames={self.frames}, observables={list(self._obs)})"
