"""What a writer is told about a run before its first frame (DESIGN.md "Trajectory files").

:class:`RunInfo` fixes the shapes every frame will have, the weights (fixed in time unless they move), the run
parameters that go to ``/parameters/measureflow`` as JSON, the observables to expect and, for a
resumed run, the step after which frames already in the file are dropped.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

import attrs
import numpy as np
import torch

from ..errors import ParameterError, ShapeError, StateError
from ..jsonable import to_jsonable  # re-exported: it lived here, callers still import it from here

__all__ = ["RunInfo", "to_jsonable", "default_versions", "run_fingerprint", "KINDS"]

KINDS = ("particles", "gaussians", "mixtures")

#: Scenario parameters that say where files go, not what the numbers are: left out of fingerprints.
LOCATION_PARAMETERS = ("out", "picture", "output", "checkpoint")
#: A parameter whose value is a string ending so names a file, and is left out of fingerprints too.
FILE_SUFFIXES = (".h5", ".hdf5", ".h5md", ".png", ".pdf", ".svg", ".gif", ".csv", ".json", ".ckpt", ".txt")


def run_fingerprint(run_parameters: dict) -> str:
    """Hash of what determines a run's numbers, from what its file records under
    ``/parameters/measureflow`` (:meth:`measureflow.Simulation.run_parameters`): the field,
    integrator, time grid, seed, state shape and scenario parameters — not the versions, the
    description, or where files live (``out``, ``picture``, any parameter naming a file), so a
    finished run's folder can be moved and still resumed or recognised as done."""
    import hashlib
    import json

    from ..jsonable import to_jsonable_lenient

    params = to_jsonable_lenient(dict(run_parameters))
    params.pop("versions", None)
    params.pop("description", None)
    scenario = params.get("parameters")
    if isinstance(scenario, dict):
        params["parameters"] = {
            k: v for k, v in scenario.items()
            if k not in LOCATION_PARAMETERS and not (isinstance(v, str) and v.lower().endswith(FILE_SUFFIXES))
        }
    text = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_versions(registry=None) -> dict[str, Any]:
    """Versions to record with a run: measureflow, torch, numpy, h5py, Python and loaded plugins."""
    from .. import __version__

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    out: dict[str, Any] = {
        "measureflow": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "h5py": version("h5py"),
        "python": platform.python_version(),
    }
    if registry is not None:
        out["plugins"] = dict(sorted(registry.plugins.items()))
    return out


def _dtype_name(value) -> str:
    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    try:
        dtype = np.dtype(value)
    except TypeError as exc:
        raise StateError(f"RunInfo.dtype: {value!r} is not a dtype (use e.g. 'float32' or torch.float64)") from exc
    if dtype.kind != "f":
        raise StateError(f"RunInfo.dtype must be a floating-point dtype, received {dtype}")
    return dtype.name


def _weights(value):
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(value, dtype=np.float64))


def _shapes(value) -> dict[str, tuple[int, ...]]:
    if value is None:
        return {}
    return {str(k): tuple(int(n) for n in v) for k, v in dict(value).items()}


def _resume(value):
    if value is None:
        return None
    step = int(value)
    if step < 0:
        raise ParameterError(f"RunInfo.resume_step must be ≥ 0 or None, received {value!r}")
    return step


@attrs.frozen(eq=False)
class RunInfo:
    """The fixed facts of a run, given to :meth:`Writer.open`.

    Parameters
    ----------
    kind:
        "particles", "gaussians" or "mixtures" (Gaussian mixtures; ``size`` is then K, the components).
    replicas, size, dim:
        R, N (0 for Gaussian runs) and d.
    dtype:
        Storage dtype of positions / Gaussian parameters (e.g. "float32").
    weights:
        (R, N) host array, or None for uniform weights 1/N.
    parameters:
        JSON-able dict: scenario parameters, seed, field, integrator, ``versions`` (see
        :func:`default_versions`). Converted by :func:`to_jsonable`.
    observable_names:
        Observables the run will write, in order.
    observable_shapes:
        Optional shape of one sample of each observable, e.g. ``(R,)`` or ``(R, d)``. Known shapes
        let the file writer lay out every dataset before writing starts (the crash-safe mode);
        observables without a shape are laid out at their first write.
    channels:
        Auxiliary per-particle channels written with every frame (particle runs only): name → the
        shape of one particle's value (``()`` for a scalar such as a log-density), stored as
        ``/particles/trajectory/<name>`` with value [frames][R·N]....
    moving_weights:
        the weights change during the run (Fisher–Rao / WFR geometries, MATH.md §15.6): writers
        store them with every frame (``/particles/trajectory/weight/{step, time, value[frames][R·N]}``).
    resume_step:
        None for a fresh run; otherwise the step of the checkpoint being resumed: frames and
        observable samples with a larger step are dropped from the existing file.
    author:
        Stored in ``/h5md/author/name``; defaults to $MEASUREFLOW_AUTHOR or the login name.
    fingerprint:
        Hash of what determines the run's numbers (:func:`run_fingerprint`), stored with the
        parameters; a resume into a file with another fingerprint is refused ("" : not checked).
    """

    kind: str = attrs.field(validator=attrs.validators.in_(KINDS))
    replicas: int = attrs.field(converter=int, validator=attrs.validators.ge(1))
    size: int = attrs.field(converter=int, validator=attrs.validators.ge(0))
    dim: int = attrs.field(converter=int, validator=attrs.validators.ge(1))
    dtype: str = attrs.field(default="float64", converter=_dtype_name)
    weights: np.ndarray | None = attrs.field(default=None, converter=_weights)
    parameters: dict = attrs.field(factory=dict, converter=lambda p: to_jsonable(dict(p or {})))
    observable_names: tuple[str, ...] = attrs.field(default=(), converter=lambda v: tuple(str(n) for n in v))
    observable_shapes: dict[str, tuple[int, ...]] = attrs.field(factory=dict, converter=_shapes)
    channels: dict[str, tuple[int, ...]] = attrs.field(factory=dict, converter=_shapes)
    resume_step: int | None = attrs.field(default=None, converter=_resume)
    moving_weights: bool = attrs.field(default=False, converter=bool, kw_only=True)
    author: str | None = attrs.field(default=None)
    fingerprint: str = attrs.field(default="", converter=str)

    def __attrs_post_init__(self):
        if self.kind == "mixtures" and self.size < 1:
            raise ShapeError(f"RunInfo: a mixture run needs K ≥ 1 components (size), received {self.size}")
        if self.kind == "particles" and self.size < 1:
            raise ShapeError(f"RunInfo: a particle run needs size N ≥ 1, received {self.size}")
        if self.kind == "gaussians" and self.size != 0:
            raise ShapeError(f"RunInfo: a Gaussian run has size 0 (no particles), received {self.size}")
        if self.weights is not None:
            if self.kind != "particles":
                raise StateError("RunInfo: weights only apply to particle runs")
            if self.weights.shape != (self.replicas, self.size):
                raise ShapeError(
                    f"RunInfo.weights must have shape (R, N) = {(self.replicas, self.size)}; "
                    f"received {self.weights.shape}"
                )
        if self.moving_weights and self.kind != "particles":
            raise StateError("RunInfo: moving weights apply to particle runs only")
        if self.channels and self.kind != "particles":
            raise StateError("RunInfo: channels apply to particle runs only")
        for name in self.channels:
            if not name.isidentifier() or name in ("position", "weight", "replica", "box", "image", "velocity"):
                raise ParameterError(f"RunInfo: {name!r} cannot name a channel (an identifier, not a particle group member)")
        if len(set(self.observable_names)) != len(self.observable_names):
            raise ParameterError(f"RunInfo.observable_names has duplicates: {list(self.observable_names)}")
        for name in self.observable_names:
            if not name or name.startswith("/") or name.endswith("/") or "//" in name or name in (".", ".."):
                raise ParameterError(f"RunInfo: {name!r} is not a valid observable name (use e.g. 'energy')")

    @classmethod
    def from_state(cls, state, **kwargs) -> "RunInfo":
        """Describe a run that starts from ``state`` (Particles or Gaussians); kwargs as the class."""
        from ..state import state_kind

        kind = state_kind(state)
        if kind == "particles":
            R, N, d = state.x.shape
            kwargs.setdefault("weights", state.weights)
            kwargs.setdefault("channels", {k: tuple(v.shape[2:]) for k, v in state.channels.items()})
        elif kind == "mixtures":
            R, N, d = state.means.shape
        else:
            (R, d), N = state.mean.shape, 0
        return cls(kind=kind, replicas=R, size=N, dim=d, dtype=state.dtype, **kwargs)

    @property
    def rows(self) -> int:
        """R·N: rows of the position dataset in one frame."""
        return self.replicas * self.size

    def resolved_author(self) -> str:
        if self.author:
            return self.author
        env = os.environ.get("MEASUREFLOW_AUTHOR")
        if env:
            return env
        try:
            import getpass

            return getpass.getuser()
        except Exception:  # noqa: BLE001 - no login name in some containers
            return "unknown"
