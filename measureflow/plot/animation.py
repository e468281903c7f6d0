"""Animated GIFs of a run: the state frame by frame over fixed axes."""

from __future__ import annotations

import math
import os

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from ..errors import ParameterError
from ..io.trajectory import Trajectory
from .common import axis_labels, chosen_replicas, even_indices, format_time, marker_sizes, particle_subset, run_title
from .ellipses import ellipse_vertices
from .inputs import drawn_weights, frame_times, gaussian_frames, line_densities, opened, replica_positions

__all__ = ["animate"]


def _limits(points: np.ndarray, pad=0.05):
    finite = points[np.isfinite(points).all(axis=-1)]
    if finite.size == 0:
        return (-1.0, 1.0), (-1.0, 1.0)
    lo, hi = finite.min(axis=0), finite.max(axis=0)
    span = np.maximum(hi - lo, 1e-9)
    lo, hi = lo - pad * span, hi + pad * span
    return (lo[0], hi[0]), (lo[1], hi[1])


def animate(traj, out, *, replica=0, max_particles: int = 2000, fps: int = 10, max_frames: int = 200,
            dpi: int = 80) -> Figure:
    """Write a GIF of the run to ``out`` (``.gif``) with matplotlib's PillowWriter.

    ``traj`` is a :class:`~measureflow.io.Trajectory` or the path of a trajectory file.
    Particles: a scatter of at most ``max_particles`` particles of one replica per frame (x₁, x₂ for
    d ≥ 2, a histogram for d = 1), the initial positions in light grey. Gaussians: the 2-σ ellipse
    and the mean path so far per frame (``replica`` may be ``"all"``); for d = 1 the density.
    At most ``max_frames`` frames, evenly spread over the run, are read (one at a time) and drawn at
    ``fps`` frames per second; the axes stay fixed over the animation. Returns the Figure (left
    showing the last frame).
    """
    from matplotlib.animation import PillowWriter

    if out is None:
        raise ParameterError("animate needs out=, the .gif file to write")
    if os.path.splitext(os.fspath(out))[1].lower() != ".gif":
        raise ParameterError(f"animate writes GIF files; give out a .gif name (received {os.fspath(out)!r})")
    if int(max_frames) < 1 or int(fps) < 1:
        raise ParameterError(f"max_frames and fps must be positive; received max_frames={max_frames}, fps={fps}")
    with opened(traj) as traj:
        frames = even_indices(len(traj), int(max_frames))
        times = frame_times(traj)[frames]
        fig = Figure(figsize=(5.5, 5.0), layout="constrained")
        ax = fig.add_subplot()
        title = run_title(traj)
        fig.suptitle(title, fontsize="small")
        if traj.kind == "particles":
            r = chosen_replicas(traj, replica, allow_all=False)[0]
            particles = particle_subset(traj.size, int(max_particles))
            if traj.dim == 1:
                update = _particles_histogram_frames(ax, traj, r, frames)
            else:
                update = _particles_scatter_frames(ax, traj, r, particles, frames)
        else:
            reps = chosen_replicas(traj, replica, allow_all=True)
            update = (_gaussian_density_frames(ax, traj, reps[0], frames) if traj.dim == 1
                      else _gaussian_ellipse_frames(ax, traj, reps, frames))
        writer = PillowWriter(fps=int(fps))
        with writer.saving(fig, os.fspath(out), dpi=dpi):
            for k in range(len(frames)):
                update(k)
                ax.set_title(f"{format_time(times[k])}  (frame {int(frames[k]) + 1}/{len(traj)})", fontsize="medium")
                writer.grab_frame()
                if k == 0:
                    # The layout of the first frame fits every frame (fixed limits); solving it again
                    # per frame would dominate the time spent writing the GIF.
                    fig.set_layout_engine("none")
    return fig


def _particles_scatter_frames(ax, traj: Trajectory, r, particles, frames):
    positions = traj.positions
    xy = np.stack([replica_positions(traj, positions, f, r, particles)[:, :2] for f in frames])
    xlim, ylim = _limits(xy.reshape(-1, 2))
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_aspect("equal", adjustable="box")
    axis_labels(ax, (0, 1), traj.dim)
    size = marker_sizes(drawn_weights(traj), traj.size, r, particles, 10.0 if len(particles) <= 500 else 4.0)
    ax.scatter(xy[0, :, 0], xy[0, :, 1], s=size, color="0.8", linewidths=0, zorder=1)
    dots = ax.scatter(xy[0, :, 0], xy[0, :, 1], s=size, color="C0", linewidths=0, zorder=2, gid="particles")

    def update(k):
        dots.set_offsets(xy[k])

    return update


def _particles_histogram_frames(ax, traj: Trajectory, r, frames):
    _, edges, dens, _ = line_densities(traj, frames, r, 60)
    ax.stairs(dens[0], edges, color="0.75", lw=1.0)
    line = ax.stairs(dens[0], edges, color="C0", lw=1.6, fill=False)
    ax.set_ylim(0, 1.05 * max(float(np.nanmax(dens)), 1e-12))
    ax.set_xlabel("x")
    ax.set_ylabel("density")

    def update(k):
        line.set_data(dens[k], edges)

    return update


def _gaussian_density_frames(ax, traj: Trajectory, r, frames):
    mean, cov = gaussian_frames(traj, frames)
    m = mean[:, r, 0]
    s = np.sqrt(np.clip(cov[:, r, 0, 0], 1e-300, None))
    x = np.linspace(np.nanmin(m - 3.5 * s), np.nanmax(m + 3.5 * s), 400)
    dens = np.exp(-0.5 * ((x[None] - m[:, None]) / s[:, None]) ** 2) / (s[:, None] * math.sqrt(2 * math.pi))
    ax.plot(x, dens[0], color="0.75", lw=1.0)
    (line,) = ax.plot(x, dens[0], color="C0", lw=1.6)
    ax.set_ylim(0, 1.05 * float(np.nanmax(dens)))
    ax.set_xlabel("x")
    ax.set_ylabel("density")

    def update(k):
        line.set_ydata(dens[k])

    return update


def _gaussian_ellipse_frames(ax, traj: Trajectory, reps, frames):
    mean, cov = gaussian_frames(traj, frames)
    mean, cov = mean[:, reps][:, :, :2], cov[:, reps][:, :, :2, :2]
    c2 = 0.5 * (cov + np.swapaxes(cov, -1, -2))
    k, n = mean.shape[:2]
    verts = ellipse_vertices(mean.reshape(k * n, 2), c2.reshape(k * n, 2, 2), 2.0, 129).reshape(k, n, 129, 2)
    xlim, ylim = _limits(verts.reshape(-1, 2))
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_aspect("equal", adjustable="box")
    axis_labels(ax, (0, 1), traj.dim)
    ax.add_collection(LineCollection(list(verts[0]), colors="0.8", linewidths=1.0))
    ellipses = LineCollection(list(verts[0]), colors=[f"C{i % 10}" for i in range(n)], linewidths=1.6,
                              gid="covariance_ellipses")
    ax.add_collection(ellipses)
    paths = [ax.plot(mean[:1, i, 0], mean[:1, i, 1], color="black", lw=0.9)[0] for i in range(n)]

    def update(j):
        ellipses.set_segments(list(verts[j]))
        for i, p in enumerate(paths):
            p.set_data(mean[: j + 1, i, 0], mean[: j + 1, i, 1])

    return update
