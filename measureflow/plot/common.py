"""Pieces the pictures share: how many frames to read, which particles and replicas to draw,
titles, labels, colour scales and saving."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from ..errors import ParameterError
from ..io.trajectory import Trajectory

#: The limits a user may tune (re-exported by :mod:`measureflow.plot`).
LIMITS = (
    "PREFERRED_OBSERVABLES",
    "LINE_FRAMES",
    "ELLIPSE_FRAMES",
    "CURVE_FRAMES",
    "HEATMAP_FRAMES",
    "MAX_REPLICA_LINES",
    "MAX_OBSERVABLE_PANELS",
)

__all__ = [
    *LIMITS,
    "LIMITS",
    "CMAP",
    "even_indices",
    "particle_subset",
    "chosen_replicas",
    "marker_sizes",
    "run_title",
    "time_norm",
    "axis_labels",
    "subscript",
    "format_time",
    "save",
    "new_figure",
]

#: Observables the overview shows first when present (matched as prefixes of lower-cased names).
PREFERRED_OBSERVABLES = ("energy", "w2", "wasserstein", "bures", "mmd", "sinkhorn", "kl")
#: Frames read for trajectory lines, ellipses and curves in one picture.
LINE_FRAMES = 50
ELLIPSE_FRAMES = 12
CURVE_FRAMES = 500
HEATMAP_FRAMES = 100
#: At most this many replicas are drawn one by one; more are summarised by median and 10–90 % band.
MAX_REPLICA_LINES = 8
MAX_OBSERVABLE_PANELS = 6
#: Colour map of time.
CMAP = "viridis"


def even_indices(n: int, k: int) -> np.ndarray:
    """At most k indices of range(n), evenly spread, always including the first and the last."""
    if n <= k:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max(k, 2)).round().astype(np.int64))


def particle_subset(n: int, k: int) -> np.ndarray:
    """k of n particle indices, sorted, from a fixed-seed draw (the same file gives the same picture).

    A draw, not a stride, so that particles laid out on a lattice are not aliased.
    """
    if k < 1:
        raise ParameterError(f"max_particles must be at least 1; received {k}")
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, size=k, replace=False))


def chosen_replicas(traj: Trajectory, replica, *, allow_all: bool) -> list[int]:
    """The replica indices to draw: ``replica`` (an int, negative counting from the end) or ``"all"``."""
    if isinstance(replica, str) and replica == "all":
        if not allow_all:
            raise ParameterError(
                f"{traj.source}: replica='all' is not available for a particle picture; choose one "
                f"replica in 0..{traj.replicas - 1}"
            )
        return list(range(traj.replicas))
    if isinstance(replica, (bool, np.bool_)) or not isinstance(replica, (int, np.integer)):
        raise ParameterError(f"replica must be an int (or 'all' where allowed); received {replica!r}")
    r = int(replica)
    if r < 0:
        r += traj.replicas
    if not 0 <= r < traj.replicas:
        raise ParameterError(
            f"{traj.source}: replica {replica} does not exist; the trajectory has {traj.replicas} "
            f"replica(s), 0..{traj.replicas - 1}"
        )
    return [r]


def marker_sizes(weights: np.ndarray | None, size: int, replica: int, particles: np.ndarray, base: float):
    """Marker areas: ``base`` for uniform weights, else ``base`` · N wᵢ clipped to [¼, 4]."""
    if weights is None:
        return base
    w = weights[replica, particles] * size
    return base * np.clip(w, 0.25, 4.0)


def _name_of(entry) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, Mapping):
        if entry.get("name") == "sum" and isinstance(entry.get("terms"), list):
            names = [_name_of(t) or "?" for t in entry["terms"]]
            return " + ".join(names)
        if entry.get("name") == "scaled" and "field" in entry:
            return f"{entry.get('factor', '?'):g}·{_name_of(entry['field'])}" if isinstance(
                entry.get("factor"), (int, float)) else _name_of(entry["field"])
        name = entry.get("name")
        return str(name) if name is not None else None
    return None


def _lookup(params: Mapping, key: str):
    if key in params:
        return params[key]
    for value in params.values():  # one level down: {"simulation": {"field": ...}}
        if isinstance(value, Mapping) and key in value:
            return value[key]
    return None


def run_title(traj: Trajectory) -> str:
    """The title "scenario · field: … · integrator: … · R, N, d" from the run's parameters and shape."""
    params = traj.parameters
    parts = []
    scenario = _name_of(_lookup(params, "scenario"))
    if scenario:
        parts.append(scenario)
    field = _name_of(_lookup(params, "field"))
    if field:
        parts.append(f"field: {field}")
    integrator = _name_of(_lookup(params, "integrator"))
    if integrator:
        parts.append(f"integrator: {integrator}")
    shape = f"R={traj.replicas}, N={traj.size}, d={traj.dim}" if traj.kind == "particles" else (
        f"Gaussian state, R={traj.replicas}, d={traj.dim}")
    parts.append(shape)
    return " · ".join(parts)


def time_norm(times: np.ndarray) -> Normalize:
    """Colour scale over the finite times (a unit interval around a single time)."""
    finite = times[np.isfinite(times)]
    if finite.size == 0:
        return Normalize(0.0, 1.0)
    lo, hi = float(finite.min()), float(finite.max())
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    return Normalize(lo, hi)


def axis_labels(ax, dims=(0, 1), dim=2):
    """Label the axes x_i, x_j; in d > 2 the title says which coordinates are shown."""
    ax.set_xlabel(f"x{subscript(dims[0] + 1)}")
    ax.set_ylabel(f"x{subscript(dims[1] + 1)}")
    if dim > 2:
        ax.set_title(f"coordinates x{subscript(dims[0] + 1)}, x{subscript(dims[1] + 1)} of d = {dim}",
                     fontsize="medium")


def subscript(n: int) -> str:
    return str(n).translate(str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉"))


def format_time(t: float) -> str:
    return "t = ?" if not np.isfinite(t) else f"t = {t:.4g}"


def save(fig: Figure, out, dpi=120) -> Figure:
    """Write ``fig`` to ``out`` when given; return it."""
    if out is not None:
        fig.savefig(os.fspath(out), dpi=dpi)
    return fig


def new_figure(ax, figsize):
    """``(figure, axes)``: those of ``ax``, or a new figure with one axes."""
    if ax is None:
        fig = Figure(figsize=figsize, layout="constrained")
        return fig, fig.add_subplot()
    return ax.figure, ax
