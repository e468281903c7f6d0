"""Pictures of moving measures: run overviews, observables, covariance ellipses, quiver fields, GIFs.

Every function builds a :class:`matplotlib.figure.Figure` directly (never through ``pyplot``), so
nothing here opens a window, touches the global backend or keeps figures alive behind the caller's
back; each returns the Figure and writes it to ``out`` when given.

A trajectory is given as

* a :class:`measureflow.io.Trajectory`: a file opened with ``measureflow.open``, a
  :class:`~measureflow.io.MemoryWriter`, a simulation ``Result``, or a one-frame
  :class:`measureflow.io.Snapshot` of a bare :class:`~measureflow.state.Particles` /
  :class:`~measureflow.state.Gaussians` state;
* or the path of an H5MD trajectory file (opened with ``measureflow.open`` and closed before
  returning).

Anything else raises TypeError. Only the frames a picture needs are read (at most ~50 for
trajectory lines), one frame at a time, and at most ``max_particles`` particles of one replica are
drawn, chosen by a fixed-seed draw so that the same file always gives the same picture.

Gaussian states are drawn as the k-σ ellipses {m + k Σ^{1/2} u : |u| = 1}, i.e. the level set
(x − m)ᵀ Σ⁻¹ (x − m) = k² (MATH.md §0, Gaussian state); in d > 2 the ellipse of the leading 2×2 block
is exactly the ellipse of the (x₁, x₂) marginal.

Modules: :mod:`~measureflow.plot.overview` (:func:`plot_run`), :mod:`~measureflow.plot.observables`
(:func:`plot_observables`), :mod:`~measureflow.plot.ellipses` (:func:`plot_covariance_ellipses`),
:mod:`~measureflow.plot.fields` (:func:`quiver`), :mod:`~measureflow.plot.animation`
(:func:`animate`); :mod:`~measureflow.plot.inputs` reads trajectories and
:mod:`~measureflow.plot.common` holds the pieces the pictures share.
"""

from __future__ import annotations

from . import common
from .animation import animate
from .common import (
    CURVE_FRAMES,
    ELLIPSE_FRAMES,
    HEATMAP_FRAMES,
    LINE_FRAMES,
    MAX_OBSERVABLE_PANELS,
    MAX_REPLICA_LINES,
    PREFERRED_OBSERVABLES,
)
from .ellipses import plot_covariance_ellipses
from .fields import quiver
from .observables import plot_observables
from .overview import plot_run

__all__ = [
    "plot_run",
    "plot_observables",
    "plot_covariance_ellipses",
    "quiver",
    "animate",
    *common.LIMITS,
]
