"""The run overview (``measureflow plot run.h5 -o out.png``): the state over time next to its observables."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.collections import LineCollection
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

from ..errors import ParameterError
from ..io.trajectory import Trajectory
from .common import (
    CMAP,
    CURVE_FRAMES,
    ELLIPSE_FRAMES,
    HEATMAP_FRAMES,
    LINE_FRAMES,
    MAX_OBSERVABLE_PANELS,
    axis_labels,
    chosen_replicas,
    even_indices,
    format_time,
    marker_sizes,
    particle_subset,
    run_title,
    save,
    subscript,
    time_norm,
)
from .ellipses import plot_covariance_ellipses
from .inputs import drawn_weights, frame_times, gaussian_frames, line_densities, opened, replica_positions, to_numpy
from .observables import default_observables, observable_panels

__all__ = ["plot_run"]


def _snapshot_frames(traj: Trajectory, frames) -> np.ndarray:
    n = len(traj)
    if frames is None:
        return even_indices(n, 3)
    if isinstance(frames, (int, np.integer)) and not isinstance(frames, bool):
        if frames < 1:
            raise ParameterError(f"frames must be a positive count or a list of frame indices; received {frames}")
        return np.array([n - 1]) if frames == 1 else even_indices(n, int(frames))
    if not isinstance(frames, Sequence) and not isinstance(frames, np.ndarray):
        raise ParameterError(f"frames must be a count or a list of frame indices; received {frames!r}")
    idx = []
    for f in frames:
        f = int(f)
        if not -n <= f < n:
            raise ParameterError(f"{traj.source}: frame {f} does not exist; the trajectory has {n} frame(s)")
        idx.append(f % n)
    if not idx:
        raise ParameterError("frames is empty; give at least one frame index")
    return np.unique(idx)


def _draw_particles_plane(fig, ax, traj: Trajectory, replica: int, particles: np.ndarray, snaps: np.ndarray):
    times = frame_times(traj)
    positions = traj.positions
    line_frames = np.union1d(even_indices(len(traj), LINE_FRAMES), snaps)
    dims = (0, 1)
    paths = np.stack([replica_positions(traj, positions, f, replica, particles)[:, dims] for f in line_frames],
                     axis=1)
    n = len(particles)
    if len(line_frames) > 1:
        alpha = float(np.clip(3.0 / math.sqrt(n), 0.04, 0.4))
        ax.add_collection(LineCollection(list(paths), colors="0.35", linewidths=0.5, alpha=alpha, zorder=1),
                          autolim=True)
    norm = time_norm(times[snaps])
    cmap = colormaps[CMAP]
    moving = traj.weight_frames is not None
    size = marker_sizes(drawn_weights(traj), traj.size, replica, particles, 10.0 if n <= 500 else 4.0)
    pos = {f: k for k, f in enumerate(line_frames)}
    for f in snaps:
        if moving:  # the current weights of each snapshot (Fisher–Rao / WFR runs)
            size = marker_sizes(drawn_weights(traj, int(f)), traj.size, replica, particles, 10.0 if n <= 500 else 4.0)
        xy = paths[:, pos[f]]
        ax.scatter(xy[:, 0], xy[:, 1], s=size, color=cmap(norm(times[f])), alpha=0.85, linewidths=0,
                   zorder=2, label=format_time(times[f]), gid=f"snapshot_{int(f)}")
    ax.autoscale_view()
    ax.set_aspect("equal", adjustable="datalim")
    axis_labels(ax, dims, traj.dim)
    ax.legend(fontsize="small", loc="best", markerscale=2.0)
    if n < traj.size:
        ax.text(0.01, 0.01, f"{n} of {traj.size} particles drawn", transform=ax.transAxes, fontsize="x-small",
                color="0.4", va="bottom")


def _density_over_time(fig, ax, times, grid_edges, density, label):
    """Image of densities (frames, bins) against time on the x-axis."""
    order = np.argsort(times)
    t = times[order]
    dens = density[order]
    if len(t) == 1:
        edges = np.array([t[0] - 0.5, t[0] + 0.5])
    else:
        mid = 0.5 * (t[1:] + t[:-1])
        edges = np.concatenate([[t[0] - (mid[0] - t[0])], mid, [t[-1] + (t[-1] - mid[-1])]])
    # A square-root scale keeps the spread-out early frames visible next to a concentrated late one.
    mesh = ax.pcolormesh(edges, grid_edges, dens.T, cmap="magma", shading="flat", norm=PowerNorm(0.5))
    fig.colorbar(mesh, ax=ax, label=label, shrink=0.85)
    ax.set_xlabel("t")
    ax.set_ylabel("x")


def _draw_particles_line(fig, ax, traj: Trajectory, replica: int):
    times = frame_times(traj)
    frames = even_indices(len(traj), HEATMAP_FRAMES)
    # Histograms use every particle of the replica: a frame is read whole anyway.
    xs, edges, dens, w = line_densities(traj, frames, replica, 80)
    _density_over_time(fig, ax, times[frames], edges, dens, "density")
    means = [np.average(x, weights=w) for x in xs]
    ax.plot(times[frames], means, color="white", lw=1.0, ls="--", label="mean")
    ax.legend(fontsize="small", loc="upper right")


def _draw_gaussian_density(fig, ax, traj: Trajectory, replica: int):
    times = frame_times(traj)
    frames = even_indices(len(traj), HEATMAP_FRAMES * 2)
    mean, cov = gaussian_frames(traj, frames)
    m = mean[:, replica, 0]
    s = np.sqrt(np.clip(cov[:, replica, 0, 0], 1e-300, None))
    lo, hi = float(np.nanmin(m - 3.5 * s)), float(np.nanmax(m + 3.5 * s))
    edges = np.linspace(lo, hi, 161)
    x = 0.5 * (edges[1:] + edges[:-1])
    dens = np.exp(-0.5 * ((x[None] - m[:, None]) / s[:, None]) ** 2) / (s[:, None] * math.sqrt(2 * math.pi))
    _density_over_time(fig, ax, times[frames], edges, dens, "density")
    ax.plot(times[frames], m, color="white", lw=1.0, ls="--", label="mean")
    ax.legend(fontsize="small", loc="upper right")


def _draw_gaussian_plane(fig, ax, traj: Trajectory, replicas: list[int]):
    times = frame_times(traj)
    ell = even_indices(len(traj), ELLIPSE_FRAMES)
    path = np.union1d(even_indices(len(traj), CURVE_FRAMES), ell)
    mean, cov = gaussian_frames(traj, path)
    at = np.searchsorted(path, ell)
    norm = time_norm(times[ell])
    for k, r in enumerate(replicas):
        plot_covariance_ellipses(mean[at, r], cov[at, r], ax, times=times[ell], norm=norm,
                                 mean_path=False, colorbar=k == 0)
        ax.plot(mean[:, r, 0], mean[:, r, 1], color="black", lw=0.9, alpha=0.8)
        ax.plot(mean[-1:, r, 0], mean[-1:, r, 1], "o", color="black", ms=3)
        if len(replicas) > 1:
            ax.annotate(f"r{r}", (mean[-1, r, 0], mean[-1, r, 1]), fontsize="x-small",
                        xytext=(3, 3), textcoords="offset points")
    ax.set_title((ax.get_title() + "\n" if ax.get_title() else "") + "2-σ ellipses, mean path",
                 fontsize="medium")


def _draw_mixture_plane(fig, ax, traj: Trajectory, replica: int):
    """One set of 2-σ ellipses per component over time, each with its mean path; the final weights
    label the components (MATH.md §15.7)."""
    times = frame_times(traj)
    ell = even_indices(len(traj), ELLIPSE_FRAMES)
    mean = to_numpy(traj.means[ell]).astype(float)[:, replica]  # (T, K, d)
    cov = to_numpy(traj.covs[ell]).astype(float)[:, replica]
    weights = to_numpy(traj.mixture_weights[ell]).astype(float)[:, replica]
    norm = time_norm(times[ell])
    for k in range(traj.size):
        plot_covariance_ellipses(mean[:, k], cov[:, k], ax, times=times[ell], norm=norm, mean_path=False,
                                 colorbar=k == 0)
        ax.plot(mean[:, k, 0], mean[:, k, 1], color="black", lw=0.9, alpha=0.8)
        ax.annotate(f"π={weights[-1, k]:.2f}", (mean[-1, k, 0], mean[-1, k, 1]), fontsize="x-small",
                    xytext=(3, 3), textcoords="offset points")
    ax.set_title("mixture components: 2-σ ellipses, mean paths", fontsize="medium")


def _draw_eigenvalues(ax, traj: Trajectory, replicas: list[int]):
    frames = even_indices(len(traj), CURVE_FRAMES)
    _, cov = gaussian_frames(traj, frames)
    t = frame_times(traj)[frames]
    positive = True
    for k, r in enumerate(replicas):
        c = cov[:, r]
        ok = np.isfinite(c).all(axis=(1, 2))
        ev = np.full(c.shape[:2], np.nan)
        if ok.any():
            ev[ok] = np.linalg.eigvalsh(0.5 * (c[ok] + np.swapaxes(c[ok], -1, -2)))
        positive &= bool(ok.any() and (ev[ok] > 0).all())
        color = f"C{k % 10}"
        for i in range(ev.shape[1]):
            lab = None
            if i == 0 and len(replicas) > 1:
                lab = f"replica {r}"
            elif len(replicas) == 1 and ev.shape[1] <= 6:
                lab = f"λ{subscript(i + 1)}"
            ax.plot(t[ok], ev[ok, i], color=color if len(replicas) > 1 else f"C{i % 10}", lw=1.2, label=lab)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("eigenvalues of Σ")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="best")


def plot_run(traj, out=None, *, replica=0, max_particles: int = 2000, frames=None) -> Figure:
    """Overview of a run, as ``measureflow plot run.h5 -o out.png`` draws it.

    ``traj`` is a :class:`~measureflow.io.Trajectory` (a file opened with ``measureflow.open``, a
    ``MemoryWriter``, a ``Result``, ``measureflow.io.Snapshot(state)``) or the path of a trajectory file.

    Particles
        d = 2: snapshots (initial, middle, final by default; ``frames`` = a count or a list of frame
        indices) coloured by time over faint trajectory lines (≤ 50 frames read);
        d > 2: the same for (x₁, x₂), labelled; d = 1: the density (histogram) against time.
        At most ``max_particles`` particles of replica ``replica`` are drawn.
    Gaussian mixtures
        d ≥ 2: the 2-σ ellipses of every component over time with their mean paths and final weights.
    Gaussians
        d ≥ 2: 2-σ covariance ellipses over time coloured by time with the mean path (for d > 2, the
        (x₁, x₂) marginal), and a panel of the eigenvalues of Σ over time; d = 1: the density against
        time. ``replica`` may be ``"all"`` to overlay every replica.
    Observables
        A column of panels with the energy and distances (names starting with energy, w2, bures, mmd,
        sinkhorn, kl), or every scalar observable when none of these is present; log y when positive.

    The title names the field and integrator from the run's parameters. Returns the Figure; saves
    it to ``out`` when given.
    """
    with opened(traj) as traj:
        reps = chosen_replicas(traj, replica, allow_all=traj.kind == "gaussians")
        observables = traj.observables
        names = default_observables(observables, traj.replicas, MAX_OBSERVABLE_PANELS)
        gaussian_plane = traj.kind == "gaussians" and traj.dim >= 2
        columns = 1 + int(gaussian_plane) + int(bool(names))
        widths = [1.25] + ([1.0] if gaussian_plane else []) + ([1.0] if names else [])
        fig = Figure(figsize=(1.0 + 5.0 * sum(widths), 5.2), layout="constrained")
        fig.get_layout_engine().set(wspace=0.06)  # room between a colour bar and the next panel's label
        grid = fig.add_gridspec(1, columns, width_ratios=widths)
        ax = fig.add_subplot(grid[0, 0])
        if traj.kind == "mixtures":
            if traj.dim < 2:
                raise ValueError(f"{traj.source}: a mixture run is drawn in a plane; it has d = {traj.dim}")
            _snapshot_frames(traj, frames)
            _draw_mixture_plane(fig, ax, traj, reps[0])
        elif traj.kind == "particles":
            particles = particle_subset(traj.size, int(max_particles))
            snaps = _snapshot_frames(traj, frames)
            if traj.dim == 1:
                _draw_particles_line(fig, ax, traj, reps[0])
            else:
                _draw_particles_plane(fig, ax, traj, reps[0], particles, snaps)
        else:
            _snapshot_frames(traj, frames)  # validated for a uniform interface; ellipses use their own
            if traj.dim == 1:
                _draw_gaussian_density(fig, ax, traj, reps[0])
            else:
                _draw_gaussian_plane(fig, ax, traj, reps)
                _draw_eigenvalues(fig.add_subplot(grid[0, 1]), traj, reps)
        if names:
            observable_panels(fig, grid[0, columns - 1], observables, names, reps, traj.replicas)
        fig.suptitle(run_title(traj), fontsize="medium")
    return save(fig, out)
