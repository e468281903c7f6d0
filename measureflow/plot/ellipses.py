"""Covariance ellipses: the k-σ level sets of Gaussians N(m, Σ) in a coordinate plane (MATH.md §0)."""

from __future__ import annotations

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from ..errors import ParameterError
from .common import CMAP, axis_labels, new_figure, save, time_norm
from .inputs import to_numpy

__all__ = ["plot_covariance_ellipses", "ellipse_vertices"]


def ellipse_vertices(mean: np.ndarray, cov2: np.ndarray, n_std: float, n_points: int) -> np.ndarray:
    """(T, n_points, 2) points m + k V Λ^{1/2} (cos θ, sin θ), the k-σ level sets of N(m, Σ).

    ``mean`` (T, 2) and ``cov2`` (T, 2, 2) symmetric; a Gaussian with non-finite parameters gets NaN
    vertices (no ellipse).
    """
    # A run that blew up leaves non-finite frames: they get no ellipse (NaN) instead of failing eigh.
    ok = np.isfinite(cov2).all(axis=(1, 2)) & np.isfinite(mean).all(axis=1)
    root = np.full(cov2.shape, np.nan)
    if ok.any():
        evals, evecs = np.linalg.eigh(cov2[ok])
        # Round-off can leave a tiny negative eigenvalue on a nearly singular Σ; draw it as flat.
        root[ok] = evecs * np.sqrt(np.clip(evals, 0.0, None))[:, None, :]
    theta = np.linspace(0.0, 2.0 * np.pi, n_points)
    circle = np.stack([np.cos(theta), np.sin(theta)], axis=-1)
    return mean[:, None, :] + n_std * np.einsum("tij,kj->tki", root, circle)


def plot_covariance_ellipses(mean, cov, ax=None, *, n_std: float = 2.0, times=None, dims=(0, 1),
                             cmap=CMAP, norm=None, color=None, mean_path: bool = True,
                             colorbar: bool | None = None, linewidth: float = 1.2, alpha: float = 0.9,
                             n_points: int = 129, label: str | None = None, out=None) -> Figure:
    """Draw the k-σ ellipses of N(m_t, Σ_t) for a sequence of Gaussians.

    The ellipse is {m + k Σ^{1/2} u : |u| = 1}, the level set (x − m)ᵀ Σ⁻¹ (x − m) = k² (MATH.md §0);
    its semi-axes are k √λᵢ along the eigenvectors of Σ. In the plane it holds a mass 1 − e^{−k²/2}
    (86.5 % for the default k = 2). For d > 2 the block Σ[dims][:, dims] is used: it is exactly the
    covariance of the (x_i, x_j) marginal, so the picture is the marginal's ellipse.

    Parameters
    ----------
    mean, cov:
        Arrays (numpy or torch) of shape (T, d) and (T, d, d), or one Gaussian as (d,) and (d, d).
    ax:
        Axes to draw into; a new figure is made when omitted.
    n_std:
        k, the number of standard deviations (2 draws the 2-σ ellipse).
    times:
        Optional (T,) values that colour the ellipses through ``cmap``/``norm`` (default: the index).
    color:
        One colour for every ellipse instead of the colour map.
    mean_path:
        Also draw the path of the means (black line, dot at the end) when T > 1.
    colorbar:
        Add a colour bar for ``times`` (default: when ``times`` is given and no ``color``).

    The ellipses form one :class:`~matplotlib.collections.LineCollection` with gid
    ``"covariance_ellipses"``. Returns the Figure; saves it to ``out`` when given.
    """
    m = to_numpy(mean).astype(float)
    c = to_numpy(cov).astype(float)
    if m.ndim == 1:
        m = m[None]
    if c.ndim == 2:
        c = c[None]
    if m.ndim != 2 or c.ndim != 3 or c.shape != (m.shape[0], m.shape[1], m.shape[1]):
        raise ParameterError(
            f"plot_covariance_ellipses expects mean of shape (T, d) and cov of shape (T, d, d); received "
            f"{m.shape} and {c.shape}"
        )
    T, d = m.shape
    if T == 0:
        raise ParameterError("plot_covariance_ellipses received no Gaussians (T = 0)")
    if d < 2:
        raise ParameterError(f"covariance ellipses need d ≥ 2; received d = {d} (draw a density for d = 1)")
    i, j = (int(k) for k in dims)
    if not (0 <= i < d and 0 <= j < d and i != j):
        raise ParameterError(f"dims must be two distinct coordinates in 0..{d - 1}; received {tuple(dims)}")
    if not n_std > 0:
        raise ParameterError(f"n_std must be positive; received {n_std}")
    sel = np.array([i, j])
    m2 = m[:, sel]
    c2 = c[:, sel][:, :, sel]
    c2 = 0.5 * (c2 + np.swapaxes(c2, -1, -2))
    fig, ax = new_figure(ax, (5.5, 5.0))
    verts = ellipse_vertices(m2, c2, float(n_std), int(n_points))
    ok = np.isfinite(verts).all(axis=(1, 2))
    if color is not None:
        coll = LineCollection(list(verts[ok]), colors=color, linewidths=linewidth, alpha=alpha, label=label)
    else:
        t = np.arange(T, dtype=float) if times is None else to_numpy(times).astype(float).reshape(-1)
        if t.shape != (T,):
            raise ParameterError(f"times must have shape (T,) = ({T},); received {t.shape}")
        coll = LineCollection(list(verts[ok]), cmap=cmap, norm=norm or time_norm(t),
                              linewidths=linewidth, alpha=alpha, label=label)
        coll.set_array(t[ok])
    coll.set_gid("covariance_ellipses")
    ax.add_collection(coll, autolim=True)
    if mean_path and T > 1:
        ax.plot(m2[:, 0], m2[:, 1], color="black", lw=0.9, alpha=0.8)
        ax.plot(m2[-1:, 0], m2[-1:, 1], "o", color="black", ms=3)
    ax.autoscale_view()
    ax.set_aspect("equal", adjustable="datalim")
    axis_labels(ax, (i, j), d)
    if colorbar is None:
        colorbar = times is not None and color is None
    if colorbar and color is None:
        fig.colorbar(coll, ax=ax, label="t", shrink=0.85)
    return save(fig, out)
