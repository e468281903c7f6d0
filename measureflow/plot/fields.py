"""Velocity fields drawn on a lattice: arrows v_t[μ](x) coloured by speed, the state underneath."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from ..errors import ParameterError
from .common import format_time, new_figure, particle_subset, save, subscript
from .ellipses import plot_covariance_ellipses
from .inputs import to_numpy

__all__ = ["quiver"]


def _one_replica(state, r: int):
    from ..state import Gaussians, Particles

    if isinstance(state, Particles):
        w = None if state.weights is None else state.weights[r:r + 1]
        return Particles(state.x[r:r + 1], w)
    if isinstance(state, Gaussians):
        return Gaussians(state.mean[r:r + 1], state.cov[r:r + 1])
    raise TypeError(f"state must be a Particles or Gaussians state (or None); received {type(state).__name__}")


def _default_bounds(state, dims) -> tuple[float, float, float, float]:
    from ..state import Gaussians

    if state is None:
        return (-3.0, 3.0, -3.0, 3.0)
    if isinstance(state, Gaussians):
        m = to_numpy(state.mean[0]).astype(float)
        s = np.sqrt(np.clip(np.diag(to_numpy(state.cov[0]).astype(float)), 1e-300, None))
        lo, hi = m - 3 * s, m + 3 * s
    else:
        x = to_numpy(state.x[0]).astype(float)
        x = x[np.isfinite(x).all(axis=1)]
        lo, hi = np.quantile(x, 0.005, axis=0), np.quantile(x, 0.995, axis=0)
        pad = 0.15 * np.maximum(hi - lo, 1e-9)
        lo, hi = lo - pad, hi + pad
    (i, j) = dims
    out = [lo[i], hi[i], lo[j], hi[j]] if len(lo) > 1 else [lo[0], hi[0], -1.0, 1.0]
    for k in (0, 2):
        if not out[k + 1] > out[k]:
            out[k], out[k + 1] = out[k] - 1.0, out[k + 1] + 1.0
    return tuple(float(v) for v in out)


def quiver(field, t: float, state=None, ax=None, bounds=None, grid: int = 25, *, replica: int = 0,
           dims=(0, 1), show_state: bool = True, max_particles: int = 2000, cmap: str = "plasma",
           out=None) -> Figure:
    """Draw the velocity field v_t[μ](x) of a measureflow field on a grid × grid lattice.

    The field is evaluated once, as ``field.velocity(t, X[None], state)`` with X the lattice points
    (grid², d) on the state's device and dtype; for a Gaussian state whose field has a closure the
    affine field v(x) = b + A(x − m) of ``field.affine(t, state)`` is drawn (MATH.md eq. 0.1). Only
    replica ``replica`` of the state is used. For d > 2 the lattice spans coordinates ``dims`` and
    every other coordinate is held at the replica's mean (a slice, labelled); for d = 1 the curve
    v(x) is drawn instead of arrows. ``state=None`` passes None through (fields that ignore the
    measure), with a 2-D lattice over ``bounds`` (default [−3, 3]²).

    ``bounds`` = (x_min, x_max, y_min, y_max) (default: the state's 0.5–99.5 % range, or m ± 3σ).
    Arrows are coloured by speed |v|; the state is drawn faintly underneath when ``show_state``.
    Returns the Figure; saves it to ``out`` when given.
    """
    import torch

    from ..state import Gaussians, Particles

    if int(grid) < 2:
        raise ParameterError(f"grid must be at least 2 points per side; received {grid}")
    if state is not None:
        if not isinstance(state, (Particles, Gaussians)):
            raise TypeError(f"state must be a Particles or Gaussians state (or None); received {type(state).__name__}")
        if not -state.replicas <= int(replica) < state.replicas:
            raise ParameterError(f"replica {replica} does not exist; the state has {state.replicas} replica(s)")
        state = _one_replica(state, int(replica) % state.replicas)
        d, device, dtype = state.dim, state.device, state.dtype
    else:
        d, device, dtype = 2, torch.device("cpu"), torch.get_default_dtype()
    dims = tuple(int(k) for k in dims)
    if d >= 2 and not (len(dims) == 2 and all(0 <= k < d for k in dims) and dims[0] != dims[1]):
        raise ParameterError(f"dims must be two distinct coordinates in 0..{d - 1}; received {dims}")
    if bounds is None:
        bounds = _default_bounds(state, dims if d >= 2 else (0, 0))
    bounds = tuple(float(b) for b in bounds)
    if len(bounds) != 4 or not (bounds[1] > bounds[0] and bounds[3] > bounds[2]):
        raise ParameterError(f"bounds must be (x_min, x_max, y_min, y_max) with min < max; received {bounds}")

    g = int(grid)
    if d == 1:
        pts = np.linspace(bounds[0], bounds[1], max(g * 8, 200))[:, None]
    else:
        gx, gy = np.meshgrid(np.linspace(bounds[0], bounds[1], g), np.linspace(bounds[2], bounds[3], g))
        if state is None:
            base = np.zeros(d)
        elif isinstance(state, Gaussians):
            base = to_numpy(state.mean[0]).astype(float)
        else:
            base = to_numpy(state.mean()[0]).astype(float)
        pts = np.repeat(base[None], g * g, axis=0)
        pts[:, dims[0]] = gx.ravel()
        pts[:, dims[1]] = gy.ravel()
    x = torch.as_tensor(pts, dtype=dtype, device=device)[None]
    caps = getattr(field, "capabilities", None)
    if caps is None:
        from ..fields import capabilities

        caps = capabilities(field)
    if isinstance(state, Gaussians) and "affine" in caps:
        b, A = field.affine(t, state)
        v = b[:, None, :] + (x - state.mean[:, None, :]) @ A.transpose(-1, -2)
    else:
        v = field.velocity(t, x, state)
    v = to_numpy(v).astype(float)
    if v.shape != (1, pts.shape[0], d):
        raise ParameterError(
            f"field {getattr(field, 'name', type(field).__name__)!r} returned velocities of shape {v.shape} "
            f"for query points of shape {(1, pts.shape[0], d)}; a velocity must have the query points' shape"
        )
    v = v[0]

    fig, ax = new_figure(ax, (6.0, 5.2))
    name = getattr(field, "name", type(field).__name__)
    if d == 1:
        ax.axhline(0.0, color="0.6", lw=0.8)
        ax.plot(pts[:, 0], v[:, 0], color="C0", lw=1.6, label=f"v({format_time(float(t))}, x)")
        if show_state and isinstance(state, Particles):
            xs = to_numpy(state.x[0, particle_subset(state.size, max_particles), 0])
            ax.plot(xs, np.zeros_like(xs), "|", color="0.3", alpha=0.4, ms=8)
        ax.set_xlabel("x")
        ax.set_ylabel("v")
        ax.legend(fontsize="small")
    else:
        if show_state and isinstance(state, Particles):
            xs = to_numpy(state.x[0, particle_subset(state.size, max_particles)]).astype(float)
            ax.scatter(xs[:, dims[0]], xs[:, dims[1]], s=3, color="0.55", alpha=0.5, linewidths=0, zorder=1,
                       gid="state")
        elif show_state and isinstance(state, Gaussians):
            plot_covariance_ellipses(to_numpy(state.mean), to_numpy(state.cov), ax, dims=dims, color="0.45",
                                     mean_path=False, linewidth=1.0, alpha=0.7)
        u, w = v[:, dims[0]], v[:, dims[1]]
        speed = np.hypot(u, w)
        arrows = ax.quiver(pts[:, dims[0]], pts[:, dims[1]], u, w, speed, cmap=cmap, pivot="mid", zorder=2)
        fig.colorbar(arrows, ax=ax, label="|v|", shrink=0.85)
        ax.set_xlim(bounds[0], bounds[1])
        ax.set_ylim(bounds[2], bounds[3])
        ax.set_aspect("equal", adjustable="box")
        ax.set_xlabel(f"x{subscript(dims[0] + 1)}")
        ax.set_ylabel(f"x{subscript(dims[1] + 1)}")
        if d > 2:
            ax.text(0.01, 0.01, "other coordinates at the mean", transform=ax.transAxes, fontsize="x-small",
                    color="0.4")
    ax.set_title(f"{name}, {format_time(float(t))}", fontsize="medium")
    return save(fig, out)
