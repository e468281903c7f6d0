"""The one trajectory protocol: what pictures, summaries and analyses read from a run.

A trajectory is the sequence of frames one run recorded, with the observables measured along it.
Shapes below use R replicas, N particles per replica, d dimensions and F frames (``len(traj)``).
Every implementation answers the same members (:class:`Trajectory`):

* :class:`~measureflow.io.reader.TrajectoryFile` — an H5MD file read lazily (``measureflow.open``);
* :class:`~measureflow.io.memory.MemoryWriter` — frames recorded in memory during a run;
* :class:`RecordedTrajectory` — frames held in memory, filled with :meth:`~RecordedTrajectory.record_frame`
  (the storage a class that keeps a list of frames can reuse);
* :class:`Snapshot` — one frame made from a bare :class:`~measureflow.state.Particles` or
  :class:`~measureflow.state.Gaussians` state, so that a state can be drawn like a run;
* :class:`measureflow.simulation.Result`.

Frame arrays are numpy arrays or lazy arrays (:class:`~measureflow.io.reader.FrameArray`) indexed
along the frame axis first: ``traj.positions[k]`` is frame k, ``traj.positions[k, r]`` its replica r,
``traj.means[idx]`` the frames of an index array; a lazy array reads only what is indexed.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping

import numpy as np
import torch

from ..errors import ParameterError, ShapeError
from ..state import state_kind
from ..status import Status
from .base import Series

__all__ = ["Trajectory", "ShapedTrajectory", "RecordedTrajectory", "Snapshot", "KINDS"]

#: The kinds of trajectory: weighted particles, or Gaussian parameters (mean, covariance).
KINDS = ("particles", "gaussians", "mixtures")


class Trajectory(abc.ABC):
    """The frames of one run and what was measured along them (shapes: see the module docstring).

    Subclasses implement the abstract members; :attr:`frames`, :attr:`gaussians` and :attr:`source`
    are derived from them. Only the members of the run's kind hold data: a particle trajectory has
    ``means = covs = None``, a Gaussian one ``positions = weights = None``.
    """

    @property
    @abc.abstractmethod
    def kind(self) -> str:
        """``"particles"`` or ``"gaussians"``."""

    @property
    @abc.abstractmethod
    def replicas(self) -> int:
        """R, the number of independent replicas simulated side by side."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """N, particles per replica (0 for a Gaussian trajectory)."""

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """d, the dimension of the space the measures live in."""

    @property
    @abc.abstractmethod
    def steps(self) -> np.ndarray:
        """(F,) integer step of each frame, increasing."""

    @property
    @abc.abstractmethod
    def times(self) -> np.ndarray:
        """(F,) float time of each frame."""

    @property
    @abc.abstractmethod
    def positions(self):
        """(F, R, N, d) particle positions (numpy or lazy array); None for a Gaussian trajectory."""

    @property
    @abc.abstractmethod
    def weights(self) -> np.ndarray | None:
        """(R, N) particle weights, each replica summing to one; None for Gaussians. When the weights
        move (:attr:`weight_frames` is not None) these are the first frame's."""

    @property
    @abc.abstractmethod
    def means(self):
        """(F, R, d) Gaussian means m (numpy or lazy array); None for a particle trajectory."""

    @property
    @abc.abstractmethod
    def covs(self):
        """(F, R, d, d) Gaussian covariances Σ (numpy or lazy array); None for a particle trajectory."""

    @property
    @abc.abstractmethod
    def observables(self) -> Mapping[str, Series]:
        """Observables by name, in recording order; each a :class:`~measureflow.io.base.Series` with
        values of shape (samples, R, ...), sampled on steps of their own (not necessarily the frames')."""

    @property
    @abc.abstractmethod
    def status(self) -> Status | None:
        """How the run ended (:class:`~measureflow.status.Status`); None when nothing was recorded."""

    @property
    @abc.abstractmethod
    def parameters(self) -> dict:
        """The run's parameters (JSON-able: scenario parameters, seed, field, integrator, versions)."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """F, the number of frames."""

    @property
    def channels(self) -> dict:
        """Auxiliary per-particle channels recorded with every frame (a log-density, …): name →
        (F, R, N, ...) array; empty when the run recorded none (always for Gaussians)."""
        return {}

    @property
    def weight_frames(self):
        """(F, R, N) weights of every frame when they move (Fisher–Rao / WFR geometries, MATH.md
        §15.6); None when they are fixed in time (then :attr:`weights` holds them)."""
        return None

    @property
    def mixture_weights(self):
        """(F, R, K) component weights of a Gaussian-mixture trajectory (kind ``"mixtures"``, whose ``means``
        are (F, R, K, d) and ``covs`` (F, R, K, d, d)); None for other kinds."""
        return None

    def weights_at(self, frame: int) -> np.ndarray | None:
        """(R, N) weights of frame ``frame`` (the fixed weights when they do not move); None for Gaussians."""
        moving = self.weight_frames
        return self.weights if moving is None else np.asarray(moving[frame])

    # -- derived ------------------------------------------------------------------------------------
    @property
    def frames(self) -> int:
        """F, the number of frames (``len(traj)``)."""
        return len(self)

    @property
    def gaussians(self):
        """``(means, covs)`` of a Gaussian trajectory, shapes (F, R, d) and (F, R, d, d); None for particles."""
        if self.kind != "gaussians":
            return None
        return self.means, self.covs

    @property
    def source(self) -> str:
        """Where the trajectory comes from, for messages: a file's path, otherwise the class name."""
        return type(self).__name__


def _host(value) -> np.ndarray:
    """A host numpy copy of a tensor (any device) or array."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().copy()
    return np.array(value, dtype=np.float64)


class ShapedTrajectory(Trajectory):
    """A trajectory whose kind and shapes are fixed attributes (``_kind``, ``_replicas``, ``_size``,
    ``_dim``), set once when it learns them: the common part of the file reader and the in-memory
    trajectories."""

    _kind: str | None = None
    _replicas: int = 0
    _size: int = 0
    _dim: int = 0

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def replicas(self) -> int:
        return self._replicas

    @property
    def size(self) -> int:
        return self._size

    @property
    def dim(self) -> int:
        return self._dim


class RecordedTrajectory(ShapedTrajectory):
    """A trajectory held in memory as host numpy arrays, one entry per recorded frame.

    Fill it with :meth:`record_frame` and :meth:`record_observables`; :meth:`drop_after` cuts it
    back to a step (a resumed run). ``positions`` / ``means`` / ``covs`` stack the frames into fresh
    arrays on each access (keep the result when reading it several times). ``weights`` of a particle
    trajectory default to the uniform 1/N. ``status`` may be assigned.

    Parameters
    ----------
    kind, replicas, size, dim:
        ``"particles"`` or ``"gaussians"``, R, N (0 for Gaussians) and d.
    dtype:
        dtype of the empty arrays returned before the first frame.
    weights:
        (R, N) particle weights (tensor or array), or None for uniform weights.
    parameters:
        The run's parameters (dict).
    status:
        How the run ended, when known.
    """

    def __init__(self, kind: str, replicas: int, size: int, dim: int, *, dtype="float64", weights=None,
                 parameters: dict | None = None, status: Status | None = None):
        self._start_empty()
        self._describe(kind, replicas, size, dim, dtype=dtype, weights=weights, parameters=parameters)
        self._status = status

    def _start_empty(self) -> None:
        """No frames, no observables, no status (and, until :meth:`_describe`, no kind)."""
        self._kind: str | None = None
        self._replicas = self._size = self._dim = 0
        self._dtype = np.dtype(np.float64)
        self._weights: np.ndarray | None = None
        self._parameters: dict = {}
        self._status: Status | None = None
        self._steps: list[int] = []
        self._times: list[float] = []
        self._frames: list[tuple[np.ndarray, ...]] = []
        self._channels: dict[str, list[np.ndarray]] = {}
        self._moving_weights = False
        self._weight_list: list[np.ndarray] = []
        self._obs: dict[str, tuple[list, list, list]] = {}

    def _describe(self, kind, replicas, size, dim, *, dtype="float64", weights=None, parameters=None,
                  moving_weights: bool = False) -> None:
        """Fix the trajectory's kind and shapes (also used by writers that learn them in ``open``);
        ``moving_weights`` records the weights with every frame."""
        self._moving_weights = bool(moving_weights) and kind == "particles"
        if kind not in KINDS:
            raise ParameterError(f"{type(self).__name__}: kind must be one of {KINDS}, received {kind!r}")
        self._kind = kind
        self._replicas, self._size, self._dim = int(replicas), int(size), int(dim)
        self._dtype = np.dtype(str(dtype).removeprefix("torch."))
        shape = (self._replicas, self._size)
        if weights is not None:
            weights = _host(weights).astype(np.float64, copy=False)
            if kind != "particles" or weights.shape != shape:
                raise ShapeError(
                    f"{type(self).__name__}: weights must have shape (R, N) = {shape} for a particle trajectory; "
                    f"received {weights.shape} for kind {kind!r}"
                )
        self._weights = weights
        self._parameters = dict(parameters or {})

    # -- recording ----------------------------------------------------------------------------------
    def record_frame(self, step: int, time: float, state) -> None:
        """Append ``state`` (Particles, or Gaussians) as the frame at ``step``, ``time`` (copied to the host)."""
        label = type(self).__name__
        R, N, d = self.replicas, self.size, self.dim
        if self._kind == "particles":
            x = getattr(state, "x", None)
            if x is None or tuple(x.shape) != (R, N, d):
                got = tuple(x.shape) if x is not None else type(state).__name__
                raise ShapeError(f"{label}: expected positions of shape {(R, N, d)}, received {got}")
            frame = (_host(x),)
            if self._moving_weights:
                self._weight_list.append(_host(state.weights_or_uniform()).astype(np.float64, copy=False))
            held = getattr(state, "channels", {})
            for name in held:
                self._channels.setdefault(name, [])
            for name, values in self._channels.items():
                if name not in held:
                    raise ShapeError(f"{label}: channel {name!r} is missing from the frame at step {step}")
                values.append(_host(held[name]))
        elif self._kind == "mixtures":
            means = getattr(state, "means", None)
            if means is None or tuple(means.shape) != (R, N, d):
                raise ShapeError(f"{label}: expected a GaussianMixtures state with means {(R, N, d)}, received {state!r}")
            frame = (_host(means), _host(state.covs), _host(state.weights))
        else:
            mean, cov = getattr(state, "mean", None), getattr(state, "cov", None)
            if mean is None or cov is None or tuple(mean.shape) != (R, d) or tuple(cov.shape) != (R, d, d):
                got = type(state).__name__ if mean is None or cov is None else (tuple(mean.shape), tuple(cov.shape))
                raise ShapeError(
                    f"{label}: expected a Gaussian state with mean {(R, d)} and cov {(R, d, d)}, received {got}"
                )
            frame = (_host(mean), _host(cov))
        self._steps.append(int(step))
        self._times.append(float(time))
        self._frames.append(frame)

    def declare_observables(self, names) -> None:
        """List observables before their first sample (they then appear, empty, in ``observables``)."""
        for name in names:
            self._obs.setdefault(str(name), ([], [], []))

    def record_observables(self, step: int, time: float, values: Mapping) -> None:
        """Append one sample of each observable (name → tensor or array of shape (R, ...)), as float64."""
        for name, value in values.items():
            steps, times, samples = self._obs.setdefault(str(name), ([], [], []))
            steps.append(int(step))
            times.append(float(time))
            samples.append(_host(value).astype(np.float64, copy=False))

    def drop_after(self, step: int) -> None:
        """Forget the frames and observable samples recorded after ``step`` (steps are increasing)."""
        keep = sum(1 for s in self._steps if s <= step)
        del self._steps[keep:], self._times[keep:], self._frames[keep:], self._weight_list[keep:]
        for values in self._channels.values():
            del values[keep:]
        for steps, times, values in self._obs.values():
            keep = sum(1 for s in steps if s <= step)
            del steps[keep:], times[keep:], values[keep:]

    # -- the protocol -------------------------------------------------------------------------------
    @property
    def parameters(self) -> dict:
        return self._parameters

    @property
    def status(self) -> Status | None:
        return self._status

    @status.setter
    def status(self, status: Status | None) -> None:
        if status is not None and not isinstance(status, Status):
            raise TypeError(f"status must be a measureflow.status.Status or None, received {type(status).__name__}")
        self._status = status

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
            return np.zeros((0, *tail), dtype=self._dtype)
        return np.stack([f[index] for f in self._frames])

    @property
    def positions(self) -> np.ndarray | None:
        if self._kind != "particles":
            return None
        return self._stack(0, (self._replicas, self._size, self._dim))

    @property
    def weights(self) -> np.ndarray | None:
        if self._kind != "particles":
            return None
        if self._moving_weights and self._weight_list:
            return self._weight_list[0]
        if self._weights is not None:
            return self._weights
        return np.full((self._replicas, self._size), 1.0 / self._size)

    @property
    def channels(self) -> dict:
        return {name: np.stack(values) for name, values in self._channels.items() if values}

    @property
    def weight_frames(self) -> np.ndarray | None:
        if not self._moving_weights:
            return None
        if not self._weight_list:
            return np.zeros((0, self._replicas, self._size))
        return np.stack(self._weight_list)

    @property
    def means(self) -> np.ndarray | None:
        if self._kind == "mixtures":
            return self._stack(0, (self._replicas, self._size, self._dim))
        if self._kind != "gaussians":
            return None
        return self._stack(0, (self._replicas, self._dim))

    @property
    def covs(self) -> np.ndarray | None:
        if self._kind == "mixtures":
            return self._stack(1, (self._replicas, self._size, self._dim, self._dim))
        if self._kind != "gaussians":
            return None
        return self._stack(1, (self._replicas, self._dim, self._dim))

    @property
    def mixture_weights(self) -> np.ndarray | None:
        if self._kind != "mixtures":
            return None
        return self._stack(2, (self._replicas, self._size))

    @property
    def observables(self) -> dict[str, Series]:
        out = {}
        for name, (steps, times, values) in self._obs.items():
            arr = np.stack(values) if values else np.zeros((0,))
            out[name] = Series(name, np.array(steps, dtype=np.int64), np.array(times, dtype=np.float64), arr)
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kind={self._kind}, R={self._replicas}, N={self._size}, d={self._dim}, "
                f"frames={len(self)}, observables={list(self._obs)})")


class Snapshot(RecordedTrajectory):
    """A one-frame trajectory made from a bare state, so that a state goes wherever a trajectory goes.

    ``measureflow.plot.plot_run(Snapshot(state))`` draws a :class:`~measureflow.state.Particles` or
    :class:`~measureflow.state.Gaussians` state as the single frame at ``time`` (step ``step``).

    Parameters
    ----------
    state:
        The state (tensors on any device; copied to the host).
    time, step:
        Where the frame sits on the run's time axis.
    observables:
        Optional mapping name → :class:`~measureflow.io.base.Series` (kept as given, e.g. a
        result's observables over the whole run) or name → one sample of shape (R, ...) taken at
        this frame.
    parameters:
        Optional run parameters (titles of pictures name the field and integrator found there).
    """

    def __init__(self, state, time: float = 0.0, step: int = 0, observables: Mapping | None = None,
                 parameters: dict | None = None):
        kind = state_kind(state)
        if kind == "particles":
            R, N, d = state.x.shape
            weights = state.weights
        elif kind == "mixtures":
            (R, N, d), weights = state.means.shape, None
        else:
            (R, d), N = state.mean.shape, 0
            weights = None
        super().__init__(kind, R, N, d, dtype=state.dtype, weights=weights, parameters=parameters)
        self.record_frame(step, time, state)
        self._given: dict[str, Series | None] = {}  # in the given order; None: one sample recorded here
        for name, value in (observables or {}).items():
            if isinstance(value, Series):
                self._given[str(name)] = value
            else:
                self._given[str(name)] = None
                self.record_observables(step, time, {name: value})

    @property
    def observables(self) -> dict[str, Series]:
        recorded = super().observables
        return {name: recorded[name] if series is None else series for name, series in self._given.items()}
