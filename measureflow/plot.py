"""Pictures of moving measures: run overviews, observables, covariance ellipses, quiver fields, GIFs.

Every function builds a :class:`matplotlib.figure.Figure` directly (never through ``pyplot``), so
nothing here opens a window, touches the global backend or keeps figures alive behind the caller's
back; each returns the Figure and writes it to ``out`` when given.

Inputs are read lazily. A trajectory may be given as

* a path to an H5MD file (opened with :func:`measureflow.io.reader.open_trajectory` and closed
  before returning),
* a trajectory object (the reader's ``Trajectory`` or the in-memory one): anything with ``kind``,
  ``times``, ``positions[frame] -> (R, N, d)`` or ``gaussians -> (mean, cov)``, ``observables`` and
  ``parameters``,
* a simulation result carrying such a trajectory (``result.trajectory``), or, failing that, its final
  state (one frame),
* a bare :class:`~measureflow.state.Particles` / :class:`~measureflow.state.Gaussians` state (one frame).

Only the frames a picture needs are read (at most ~50 for trajectory lines), one frame at a time, and
at most ``max_particles`` particles of one replica are drawn, chosen by a fixed-seed draw so that
the same file always gives the same picture.

Gaussian states are drawn as the k-σ ellipses {m + k Σ^{1/2} u : |u| = 1}, i.e. the level set
(x − m)ᵀ Σ⁻¹ (x − m) = k² (MATH.md §0, Gaussian state); in d > 2 the ellipse of the leading 2×2 block
is exactly the ellipse of the (x₁, x₂) marginal.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize, PowerNorm
from matplotlib.figure import Figure

__all__ = [
    "plot_run",
    "plot_observables",
    "plot_covariance_ellipses",
    "quiver",
    "animate",
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
_CMAP = "viridis"


# ------------------------------------------------------------------------------------------------
# reading trajectories of any provenance


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor, possibly on a GPU
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _read_all(arr) -> np.ndarray:
    """The whole of a (small) lazy array: observables, times, one replica's Gaussian parameters."""
    if isinstance(arr, np.ndarray):
        return arr
    try:
        return _to_numpy(arr[:])
    except (TypeError, IndexError, ValueError):
        return _to_numpy(arr)


def _take_frames(arr, idx: np.ndarray) -> np.ndarray:
    """``arr[idx]`` along the frame axis for lazy arrays that may or may not support fancy indexing."""
    idx = np.asarray(idx, dtype=np.int64)
    try:
        out = _to_numpy(arr[idx])
        if out.ndim >= 1 and out.shape[0] == len(idx):
            return out
    except (TypeError, IndexError, ValueError, KeyError):
        pass
    return np.stack([_to_numpy(arr[int(i)]) for i in idx])


class _Series:
    __slots__ = ("times", "values")

    def __init__(self, times, values):
        self.times = times
        self.values = values


class _View:
    """The one shape every picture reads from, whatever the input was."""

    def __init__(self, *, kind, replicas, size, dim, times, positions=None, weights=None,
                 gaussians=None, observables=None, parameters=None, source=""):
        self.kind = kind
        self.replicas = int(replicas)
        self.size = int(size)
        self.dim = int(dim)
        self.times = np.asarray(times, dtype=float).reshape(-1)
        self._positions = positions
        self.gaussians = gaussians
        self.observables = observables or {}
        self.parameters = parameters or {}
        self.source = source
        w = None if weights is None else _to_numpy(weights).astype(float)
        if w is not None:
            w = w.reshape(self.replicas, self.size) if w.size == self.replicas * self.size else None
        if w is not None and np.allclose(w, 1.0 / max(self.size, 1)):
            w = None  # uniform: draw plain markers
        self.weights = w

    @property
    def frames(self) -> int:
        return len(self.times)

    def positions(self, frame: int, replica: int, particles: np.ndarray | None = None) -> np.ndarray:
        """(n, d) positions of one replica at one frame (one frame read; rows ``particles`` kept)."""
        R, N, d = self.replicas, self.size, self.dim
        if R > 1:
            # Readers that index (frame, replica) read one replica's rows instead of the whole frame.
            try:
                x = _to_numpy(self._positions[int(frame), int(replica)])
            except (TypeError, IndexError, ValueError, KeyError, NotImplementedError):
                x = None
            if x is not None and x.shape == (N, d):
                return x if particles is None else x[particles]
        x = _to_numpy(self._positions[int(frame)])
        if x.ndim == 2 and x.shape[0] == R * N:  # rows stored replica after replica, as in the file
            x = x.reshape(R, N, d)
        if x.ndim == 2 and R == 1:
            x = x[None]
        if x.shape != (R, N, d):
            raise ValueError(
                f"{self.source}: frame {frame} of the positions has shape {x.shape}; expected (R, N, d) = "
                f"{(R, N, d)}"
            )
        x = x[replica]
        return x if particles is None else x[particles]

    def gaussian_frames(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean (k, R, d) and covariance (k, R, d, d) at frames ``idx`` (sorted, unique)."""
        mean, cov = self.gaussians
        return _take_frames(mean, idx).astype(float), _take_frames(cov, idx).astype(float)


def _named(obj, *names):
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None


def _parameters(raw) -> dict:
    if raw is None:
        return {}
    if isinstance(raw, bytes):
        raw = raw.decode()
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return {}
    return dict(raw) if isinstance(raw, Mapping) else {}


def _observables(raw, times) -> dict:
    out = {}
    if not isinstance(raw, Mapping):
        return out
    for name, series in raw.items():
        values = _named(series, "values", "value")
        if values is None:  # a bare array sampled with the frames
            values = series
            obs_times = _named(series, "times", "time")
            obs_times = times if obs_times is None else obs_times
        else:
            obs_times = _named(series, "times", "time")
            if obs_times is None:
                obs_times = times
        out[str(name)] = _Series(obs_times, values)
    return out


def _view_of_state(state, time: float, observables=None, parameters=None, source="state") -> _View:
    from .state import Gaussians, Particles

    if isinstance(state, Particles):
        x = _to_numpy(state.x)
        return _View(kind="particles", replicas=x.shape[0], size=x.shape[1], dim=x.shape[2],
                     times=[time], positions=x[None], weights=None if state.weights is None else state.weights,
                     observables=observables, parameters=parameters, source=source)
    if isinstance(state, Gaussians):
        m, c = _to_numpy(state.mean), _to_numpy(state.cov)
        return _View(kind="gaussians", replicas=m.shape[0], size=0, dim=m.shape[1], times=[time],
                     gaussians=(m[None], c[None]), observables=observables, parameters=parameters, source=source)
    raise TypeError(f"expected a Particles or Gaussians state, received {type(state).__name__}")


def _view_of_trajectory(traj, source: str) -> _View:
    kind = str(getattr(traj, "kind"))
    times = _named(traj, "times", "time")
    if times is None:
        raise ValueError(f"{source}: the trajectory has no times; cannot place its frames")
    times = _read_all(times)
    gaussians = getattr(traj, "gaussians", None)
    if gaussians is not None and not isinstance(gaussians, (tuple, list)):
        gaussians = (gaussians.mean, gaussians.cov)
    params = _parameters(getattr(traj, "parameters", None))
    observables = _observables(getattr(traj, "observables", None), times)
    if kind == "particles":
        positions = getattr(traj, "positions", None)
        if positions is None:
            raise ValueError(f"{source}: a particle trajectory without positions")
        replicas, size, dim = traj.replicas, traj.size, traj.dim
        weights = getattr(traj, "weights", None)
    elif kind == "gaussians":
        if gaussians is None:
            raise ValueError(f"{source}: a Gaussian trajectory without mean/covariance data")
        positions, weights = None, None
        replicas, size, dim = traj.replicas, 0, traj.dim
    else:
        raise ValueError(f"{source}: unknown trajectory kind {kind!r}; expected 'particles' or 'gaussians'")
    return _View(kind=kind, replicas=replicas, size=size, dim=dim, times=times, positions=positions,
                 weights=weights, gaussians=gaussians, observables=observables, parameters=params,
                 source=source)


@contextlib.contextmanager
def _opened(traj):
    """Yield a :class:`_View` of ``traj``; a file opened here is closed on exit."""
    traj = _resolve(traj)
    if isinstance(traj, (str, os.PathLike)):
        from .io.reader import open_trajectory

        handle = open_trajectory(traj)
        try:
            yield _checked(_view_of_trajectory(handle, os.fspath(traj)))
        finally:
            close = getattr(handle, "close", None)
            if close is not None:
                close()
        return
    yield _checked(_as_view(traj))


def _trajectory_like(obj) -> bool:
    return (obj is not None and hasattr(obj, "kind") and (hasattr(obj, "times") or hasattr(obj, "time"))
            and (hasattr(obj, "positions") or hasattr(obj, "gaussians")))


def _resolve(traj):
    """What to read for ``traj``: itself, or for a simulation result the richest record it carries.

    A result's in-memory trajectory comes first (no file access), then the file of a trajectory
    writer that exists on disk, then the result itself (its final state, one frame).
    """
    if isinstance(traj, (str, os.PathLike)) or _trajectory_like(traj):
        return traj
    inner = getattr(traj, "trajectory", None)
    if _trajectory_like(inner) or isinstance(inner, (str, os.PathLike)):
        return inner
    writers = getattr(traj, "writers", None) or ()
    for writer in writers:
        for candidate in (writer, getattr(writer, "trajectory", None)):
            if _trajectory_like(candidate):
                return candidate
    for writer in writers:
        path = getattr(writer, "path", None)
        if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
            return path
    return traj


def _as_view(traj) -> _View:
    from .state import Gaussians, Particles

    if isinstance(traj, (Particles, Gaussians)):
        return _view_of_state(traj, 0.0)
    if _trajectory_like(traj):
        return _view_of_trajectory(traj, type(traj).__name__)
    state = _named(traj, "state", "final_state")
    if isinstance(state, (Particles, Gaussians)):
        time = _named(traj, "final_time", "time", "t")
        time = float(time) if isinstance(time, (int, float, np.floating)) else math.nan
        obs = getattr(traj, "observables", None)
        return _view_of_state(state, time, _observables(obs, [time]) if isinstance(obs, Mapping) else None,
                              getattr(traj, "parameters", None), type(traj).__name__)
    raise TypeError(
        f"cannot plot a {type(traj).__name__}: expected a trajectory file path, a trajectory object "
        "(with kind, times, positions or gaussians), a simulation result, or a Particles/Gaussians state"
    )


def _checked(view: _View) -> _View:
    if view.frames == 0:
        raise ValueError(
            f"{view.source}: the trajectory has no frames, so there is nothing to draw; check that the "
            "run wrote at least one frame (its writer trigger fires on step 0 by default)"
        )
    if view.replicas < 1 or view.dim < 1 or (view.kind == "particles" and view.size < 1):
        raise ValueError(
            f"{view.source}: empty trajectory (replicas={view.replicas}, particles={view.size}, dim={view.dim})"
        )
    return view


# ------------------------------------------------------------------------------------------------
# small shared pieces


def _even(n: int, k: int) -> np.ndarray:
    """At most k indices of range(n), evenly spread, always including the first and the last."""
    if n <= k:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max(k, 2)).round().astype(np.int64))


def _subsample(n: int, k: int) -> np.ndarray:
    """k of n particle indices, sorted, from a fixed-seed draw (the same file gives the same picture).

    A draw, not a stride, so that particles laid out on a lattice are not aliased.
    """
    if k < 1:
        raise ValueError(f"max_particles must be at least 1; received {k}")
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, size=k, replace=False))


def _replicas(view: _View, replica, *, allow_all: bool) -> list[int]:
    if isinstance(replica, str) and replica == "all":
        if not allow_all:
            raise ValueError(
                f"{view.source}: replica='all' is not available for a particle picture; choose one "
                f"replica in 0..{view.replicas - 1}"
            )
        return list(range(view.replicas))
    if isinstance(replica, (bool, np.bool_)) or not isinstance(replica, (int, np.integer)):
        raise ValueError(f"replica must be an int (or 'all' where allowed); received {replica!r}")
    r = int(replica)
    if r < 0:
        r += view.replicas
    if not 0 <= r < view.replicas:
        raise ValueError(
            f"{view.source}: replica {replica} does not exist; the trajectory has {view.replicas} "
            f"replica(s), 0..{view.replicas - 1}"
        )
    return [r]


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


def _title(view: _View) -> str:
    params = view.parameters
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
    shape = f"R={view.replicas}, N={view.size}, d={view.dim}" if view.kind == "particles" else (
        f"Gaussian state, R={view.replicas}, d={view.dim}")
    parts.append(shape)
    return " · ".join(parts)


def _time_norm(times: np.ndarray) -> Normalize:
    finite = times[np.isfinite(times)]
    if finite.size == 0:
        return Normalize(0.0, 1.0)
    lo, hi = float(finite.min()), float(finite.max())
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    return Normalize(lo, hi)


def _axis_labels(ax, dims=(0, 1), dim=2):
    ax.set_xlabel(f"x{_sub(dims[0] + 1)}")
    ax.set_ylabel(f"x{_sub(dims[1] + 1)}")
    if dim > 2:
        ax.set_title(f"coordinates x{_sub(dims[0] + 1)}, x{_sub(dims[1] + 1)} of d = {dim}", fontsize="medium")


def _sub(n: int) -> str:
    return str(n).translate(str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉"))


def _fmt_t(t: float) -> str:
    return "t = ?" if not np.isfinite(t) else f"t = {t:.4g}"


def _save(fig: Figure, out, dpi=120) -> Figure:
    if out is not None:
        fig.savefig(os.fspath(out), dpi=dpi)
    return fig


def _new_figure(ax, figsize):
    if ax is None:
        fig = Figure(figsize=figsize, layout="constrained")
        return fig, fig.add_subplot()
    return ax.figure, ax


# ------------------------------------------------------------------------------------------------
# covariance ellipses


def _ellipse_vertices(mean: np.ndarray, cov2: np.ndarray, n_std: float, n_points: int) -> np.ndarray:
    """(T, n_points, 2) points m + k V Λ^{1/2} (cos θ, sin θ), the k-σ level sets of N(m, Σ)."""
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
                             cmap=_CMAP, norm=None, color=None, mean_path: bool = True,
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
    m = _to_numpy(mean).astype(float)
    c = _to_numpy(cov).astype(float)
    if m.ndim == 1:
        m = m[None]
    if c.ndim == 2:
        c = c[None]
    if m.ndim != 2 or c.ndim != 3 or c.shape != (m.shape[0], m.shape[1], m.shape[1]):
        raise ValueError(
            f"plot_covariance_ellipses expects mean of shape (T, d) and cov of shape (T, d, d); received "
            f"{m.shape} and {c.shape}"
        )
    T, d = m.shape
    if T == 0:
        raise ValueError("plot_covariance_ellipses received no Gaussians (T = 0)")
    if d < 2:
        raise ValueError(f"covariance ellipses need d ≥ 2; received d = {d} (draw a density for d = 1)")
    i, j = (int(k) for k in dims)
    if not (0 <= i < d and 0 <= j < d and i != j):
        raise ValueError(f"dims must be two distinct coordinates in 0..{d - 1}; received {tuple(dims)}")
    if not n_std > 0:
        raise ValueError(f"n_std must be positive; received {n_std}")
    sel = np.array([i, j])
    m2 = m[:, sel]
    c2 = c[:, sel][:, :, sel]
    c2 = 0.5 * (c2 + np.swapaxes(c2, -1, -2))
    fig, ax = _new_figure(ax, (5.5, 5.0))
    verts = _ellipse_vertices(m2, c2, float(n_std), int(n_points))
    ok = np.isfinite(verts).all(axis=(1, 2))
    if color is not None:
        coll = LineCollection(list(verts[ok]), colors=color, linewidths=linewidth, alpha=alpha, label=label)
    else:
        t = np.arange(T, dtype=float) if times is None else _to_numpy(times).astype(float).reshape(-1)
        if t.shape != (T,):
            raise ValueError(f"times must have shape (T,) = ({T},); received {t.shape}")
        coll = LineCollection(list(verts[ok]), cmap=cmap, norm=norm or _time_norm(t),
                              linewidths=linewidth, alpha=alpha, label=label)
        coll.set_array(t[ok])
    coll.set_gid("covariance_ellipses")
    ax.add_collection(coll, autolim=True)
    if mean_path and T > 1:
        ax.plot(m2[:, 0], m2[:, 1], color="black", lw=0.9, alpha=0.8)
        ax.plot(m2[-1:, 0], m2[-1:, 1], "o", color="black", ms=3)
    ax.autoscale_view()
    ax.set_aspect("equal", adjustable="datalim")
    _axis_labels(ax, (i, j), d)
    if colorbar is None:
        colorbar = times is not None and color is None
    if colorbar and color is None:
        fig.colorbar(coll, ax=ax, label="t", shrink=0.85)
    return _save(fig, out)


# ------------------------------------------------------------------------------------------------
# observables


def _is_scalar(series: _Series, replicas: int) -> bool:
    """One value per frame (and replica), with at least one frame recorded."""
    shape = getattr(series.values, "shape", None)
    if shape is None:
        shape = _read_all(series.values).shape
    shape = tuple(shape)
    return (len(shape) == 1 or (len(shape) == 2 and shape[1] == replicas)) and shape[0] > 0


def _default_observables(view: _View, limit: int | None) -> list[str]:
    scalar = [n for n, s in view.observables.items() if _is_scalar(s, view.replicas)]
    preferred = [n for n in scalar if n.lower().startswith(PREFERRED_OBSERVABLES)]

    def rank(name):
        low = name.lower()
        return next(k for k, p in enumerate(PREFERRED_OBSERVABLES) if low.startswith(p))

    chosen = sorted(preferred, key=rank) if preferred else scalar
    return chosen if limit is None else chosen[:limit]


def _draw_series(ax, name: str, series: _Series, replicas: list[int], total_replicas: int):
    t = _read_all(series.times).astype(float).reshape(-1)
    v = _read_all(series.values).astype(float)
    if v.shape[0] != t.shape[0]:
        raise ValueError(f"observable {name!r}: {v.shape[0]} values for {t.shape[0]} times")
    if t.shape[0] > CURVE_FRAMES * 4:  # a long run: a dense even subset draws the same curve
        keep = _even(t.shape[0], CURVE_FRAMES * 4)
        t, v = t[keep], v[keep]
    if v.ndim == 1:
        curves = [(v, None)]
    elif v.ndim == 2 and v.shape[1] == total_replicas:
        if len(replicas) > MAX_REPLICA_LINES:
            band = np.nanpercentile(np.where(np.isfinite(v), v, np.nan), [10, 50, 90], axis=1)
            ax.fill_between(t, band[0], band[2], color="C0", alpha=0.25, lw=0, label="10–90 % of replicas")
            curves = [(band[1], "median")]
        else:
            curves = [(v[:, r], f"replica {r}" if len(replicas) > 1 else None) for r in replicas]
    else:
        flat = v.reshape(v.shape[0], total_replicas, -1) if v.ndim > 2 and v.shape[1] == total_replicas else None
        if flat is None:
            flat = v.reshape(v.shape[0], 1, -1)
            replicas = [0]
        r = replicas[0]
        comps = min(flat.shape[2], 10)
        curves = [(flat[:, r, k], f"{name}[{k}]") for k in range(comps)]
    positive = True
    for y, lab in curves:
        ok = np.isfinite(y) & np.isfinite(t)
        positive &= bool(ok.any() and (y[ok] > 0).all())
        ax.plot(t[ok], y[ok], lw=1.4, label=lab)
    if positive:
        ax.set_yscale("log")
    ax.set_ylabel(name)
    ax.grid(True, which="major", alpha=0.3)
    if any(lab for _, lab in curves):
        ax.legend(fontsize="small", loc="best")


def _observable_panels(fig, spec, view: _View, names: list[str], replicas: list[int]):
    inner = spec.subgridspec(len(names), 1)
    first = None
    for k, name in enumerate(names):
        ax = fig.add_subplot(inner[k, 0], sharex=first)
        first = first or ax
        _draw_series(ax, name, view.observables[name], replicas, view.replicas)
        if k < len(names) - 1:
            ax.tick_params(labelbottom=False)
        else:
            ax.set_xlabel("t")
    return first


def plot_observables(traj, names=None, out=None, *, replica=0) -> Figure:
    """One panel per observable against time (log y-axis when every value is positive).

    ``names`` selects observables (default: every scalar one, i.e. one value per replica and
    frame); an unknown name raises ValueError listing the available ones. ``replica`` is an index or
    ``"all"`` (more than 8 replicas are then summarised by their median and 10–90 % band).
    Non-scalar observables named explicitly show their first components for the chosen replica.
    Returns the Figure; saves it to ``out`` when given.
    """
    with _opened(traj) as view:
        reps = _replicas(view, replica, allow_all=True)
        available = sorted(view.observables)
        if names is None:
            chosen = [n for n, s in view.observables.items() if _is_scalar(s, view.replicas)]
            if not chosen:
                raise ValueError(
                    f"{view.source}: the trajectory has no scalar observables to plot (available: "
                    f"{available or 'none'}); add observables to the run or name non-scalar ones explicitly"
                )
        else:
            chosen = [names] if isinstance(names, str) else list(names)
            unknown = [n for n in chosen if n not in view.observables]
            if unknown:
                raise ValueError(
                    f"{view.source}: unknown observable(s) {unknown}; available: {available or 'none'}"
                )
            if not chosen:
                raise ValueError("names is empty; give at least one observable name or None for all")
        fig = Figure(figsize=(7.0, 1.2 + 2.0 * len(chosen)), layout="constrained")
        _observable_panels(fig, fig.add_gridspec(1, 1)[0, 0], view, chosen, reps)
        fig.suptitle(_title(view), fontsize="medium")
    return _save(fig, out)


# ------------------------------------------------------------------------------------------------
# the run overview


def _snapshot_frames(view: _View, frames) -> np.ndarray:
    n = view.frames
    if frames is None:
        return _even(n, 3)
    if isinstance(frames, (int, np.integer)) and not isinstance(frames, bool):
        if frames < 1:
            raise ValueError(f"frames must be a positive count or a list of frame indices; received {frames}")
        return np.array([n - 1]) if frames == 1 else _even(n, int(frames))
    if not isinstance(frames, Sequence) and not isinstance(frames, np.ndarray):
        raise ValueError(f"frames must be a count or a list of frame indices; received {frames!r}")
    idx = []
    for f in frames:
        f = int(f)
        if not -n <= f < n:
            raise ValueError(f"{view.source}: frame {f} does not exist; the trajectory has {n} frame(s)")
        idx.append(f % n)
    if not idx:
        raise ValueError("frames is empty; give at least one frame index")
    return np.unique(idx)


def _marker_sizes(view: _View, replica: int, particles: np.ndarray, base: float):
    if view.weights is None:
        return base
    w = view.weights[replica, particles] * view.size
    return base * np.clip(w, 0.25, 4.0)


def _draw_particles_plane(fig, ax, view: _View, replica: int, particles: np.ndarray, snaps: np.ndarray):
    line_frames = np.union1d(_even(view.frames, LINE_FRAMES), snaps)
    dims = (0, 1)
    paths = np.stack([view.positions(f, replica, particles)[:, dims] for f in line_frames], axis=1)
    n = len(particles)
    if len(line_frames) > 1:
        alpha = float(np.clip(3.0 / math.sqrt(n), 0.04, 0.4))
        ax.add_collection(LineCollection(list(paths), colors="0.35", linewidths=0.5, alpha=alpha, zorder=1),
                          autolim=True)
    norm = _time_norm(view.times[snaps])
    cmap = colormaps[_CMAP]
    size = _marker_sizes(view, replica, particles, 10.0 if n <= 500 else 4.0)
    pos = {f: k for k, f in enumerate(line_frames)}
    for f in snaps:
        xy = paths[:, pos[f]]
        ax.scatter(xy[:, 0], xy[:, 1], s=size, color=cmap(norm(view.times[f])), alpha=0.85, linewidths=0,
                   zorder=2, label=_fmt_t(view.times[f]), gid=f"snapshot_{int(f)}")
    ax.autoscale_view()
    ax.set_aspect("equal", adjustable="datalim")
    _axis_labels(ax, dims, view.dim)
    ax.legend(fontsize="small", loc="best", markerscale=2.0)
    if n < view.size:
        ax.text(0.01, 0.01, f"{n} of {view.size} particles drawn", transform=ax.transAxes, fontsize="x-small",
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


def _draw_particles_line(fig, ax, view: _View, replica: int):
    frames = _even(view.frames, HEATMAP_FRAMES)
    # Histograms use every particle of the replica: a frame is read whole anyway.
    xs = [view.positions(f, replica)[:, 0] for f in frames]
    pooled = np.concatenate([x[np.isfinite(x)] for x in xs]) if xs else np.zeros(0)
    if pooled.size == 0:
        raise ValueError(f"{view.source}: every position is non-finite; nothing to draw")
    lo, hi = np.quantile(pooled, [0.002, 0.998])
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, 81)
    w = None if view.weights is None else view.weights[replica]
    dens = np.stack([np.histogram(x, bins=edges, weights=w, density=True)[0] for x in xs])
    _density_over_time(fig, ax, view.times[frames], edges, dens, "density")
    means = [np.average(x, weights=w) for x in xs]
    ax.plot(view.times[frames], means, color="white", lw=1.0, ls="--", label="mean")
    ax.legend(fontsize="small", loc="upper right")


def _draw_gaussian_density(fig, ax, view: _View, replica: int):
    frames = _even(view.frames, HEATMAP_FRAMES * 2)
    mean, cov = view.gaussian_frames(frames)
    m = mean[:, replica, 0]
    s = np.sqrt(np.clip(cov[:, replica, 0, 0], 1e-300, None))
    lo, hi = float(np.nanmin(m - 3.5 * s)), float(np.nanmax(m + 3.5 * s))
    edges = np.linspace(lo, hi, 161)
    x = 0.5 * (edges[1:] + edges[:-1])
    dens = np.exp(-0.5 * ((x[None] - m[:, None]) / s[:, None]) ** 2) / (s[:, None] * math.sqrt(2 * math.pi))
    _density_over_time(fig, ax, view.times[frames], edges, dens, "density")
    ax.plot(view.times[frames], m, color="white", lw=1.0, ls="--", label="mean")
    ax.legend(fontsize="small", loc="upper right")


def _draw_gaussian_plane(fig, ax, view: _View, replicas: list[int]):
    ell = _even(view.frames, ELLIPSE_FRAMES)
    path = np.union1d(_even(view.frames, CURVE_FRAMES), ell)
    mean, cov = view.gaussian_frames(path)
    at = np.searchsorted(path, ell)
    norm = _time_norm(view.times[ell])
    for k, r in enumerate(replicas):
        plot_covariance_ellipses(mean[at, r], cov[at, r], ax, times=view.times[ell], norm=norm,
                                 mean_path=False, colorbar=k == 0)
        ax.plot(mean[:, r, 0], mean[:, r, 1], color="black", lw=0.9, alpha=0.8)
        ax.plot(mean[-1:, r, 0], mean[-1:, r, 1], "o", color="black", ms=3)
        if len(replicas) > 1:
            ax.annotate(f"r{r}", (mean[-1, r, 0], mean[-1, r, 1]), fontsize="x-small",
                        xytext=(3, 3), textcoords="offset points")
    ax.set_title((ax.get_title() + "\n" if ax.get_title() else "") + "2-σ ellipses, mean path",
                 fontsize="medium")


def _draw_eigenvalues(ax, view: _View, replicas: list[int]):
    frames = _even(view.frames, CURVE_FRAMES)
    _, cov = view.gaussian_frames(frames)
    t = view.times[frames]
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
                lab = f"λ{_sub(i + 1)}"
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

    Particles
        d = 2: snapshots (initial, middle, final by default; ``frames`` = a count or a list of frame
        indices) coloured by time over faint trajectory lines (≤ 50 frames read);
        d > 2: the same for (x₁, x₂), labelled; d = 1: the density (histogram) against time.
        At most ``max_particles`` particles of replica ``replica`` are drawn.
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
    with _opened(traj) as view:
        reps = _replicas(view, replica, allow_all=view.kind == "gaussians")
        names = _default_observables(view, MAX_OBSERVABLE_PANELS)
        gaussian_plane = view.kind == "gaussians" and view.dim >= 2
        columns = 1 + int(gaussian_plane) + int(bool(names))
        widths = [1.25] + ([1.0] if gaussian_plane else []) + ([1.0] if names else [])
        fig = Figure(figsize=(1.0 + 5.0 * sum(widths), 5.2), layout="constrained")
        fig.get_layout_engine().set(wspace=0.06)  # room between a colour bar and the next panel's label
        grid = fig.add_gridspec(1, columns, width_ratios=widths)
        ax = fig.add_subplot(grid[0, 0])
        if view.kind == "particles":
            particles = _subsample(view.size, int(max_particles))
            snaps = _snapshot_frames(view, frames)
            if view.dim == 1:
                _draw_particles_line(fig, ax, view, reps[0])
            else:
                _draw_particles_plane(fig, ax, view, reps[0], particles, snaps)
        else:
            _snapshot_frames(view, frames)  # validated for a uniform interface; ellipses use their own
            if view.dim == 1:
                _draw_gaussian_density(fig, ax, view, reps[0])
            else:
                _draw_gaussian_plane(fig, ax, view, reps)
                _draw_eigenvalues(fig.add_subplot(grid[0, 1]), view, reps)
        if names:
            _observable_panels(fig, grid[0, columns - 1], view, names, reps)
        fig.suptitle(_title(view), fontsize="medium")
    return _save(fig, out)


# ------------------------------------------------------------------------------------------------
# velocity fields


def _one_replica(state, r: int):
    from .state import Gaussians, Particles

    if isinstance(state, Particles):
        w = None if state.weights is None else state.weights[r:r + 1]
        return Particles(state.x[r:r + 1], w)
    if isinstance(state, Gaussians):
        return Gaussians(state.mean[r:r + 1], state.cov[r:r + 1])
    raise TypeError(f"state must be a Particles or Gaussians state (or None); received {type(state).__name__}")


def _default_bounds(state, dims) -> tuple[float, float, float, float]:
    from .state import Gaussians

    if state is None:
        return (-3.0, 3.0, -3.0, 3.0)
    if isinstance(state, Gaussians):
        m = _to_numpy(state.mean[0]).astype(float)
        s = np.sqrt(np.clip(np.diag(_to_numpy(state.cov[0]).astype(float)), 1e-300, None))
        lo, hi = m - 3 * s, m + 3 * s
    else:
        x = _to_numpy(state.x[0]).astype(float)
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

    from .state import Gaussians, Particles

    if int(grid) < 2:
        raise ValueError(f"grid must be at least 2 points per side; received {grid}")
    if state is not None:
        if not isinstance(state, (Particles, Gaussians)):
            raise TypeError(f"state must be a Particles or Gaussians state (or None); received {type(state).__name__}")
        if not -state.replicas <= int(replica) < state.replicas:
            raise ValueError(f"replica {replica} does not exist; the state has {state.replicas} replica(s)")
        state = _one_replica(state, int(replica) % state.replicas)
        d, device, dtype = state.dim, state.device, state.dtype
    else:
        d, device, dtype = 2, torch.device("cpu"), torch.get_default_dtype()
    dims = tuple(int(k) for k in dims)
    if d >= 2 and not (len(dims) == 2 and all(0 <= k < d for k in dims) and dims[0] != dims[1]):
        raise ValueError(f"dims must be two distinct coordinates in 0..{d - 1}; received {dims}")
    if bounds is None:
        bounds = _default_bounds(state, dims if d >= 2 else (0, 0))
    bounds = tuple(float(b) for b in bounds)
    if len(bounds) != 4 or not (bounds[1] > bounds[0] and bounds[3] > bounds[2]):
        raise ValueError(f"bounds must be (x_min, x_max, y_min, y_max) with min < max; received {bounds}")

    g = int(grid)
    if d == 1:
        pts = np.linspace(bounds[0], bounds[1], max(g * 8, 200))[:, None]
    else:
        gx, gy = np.meshgrid(np.linspace(bounds[0], bounds[1], g), np.linspace(bounds[2], bounds[3], g))
        if state is None:
            base = np.zeros(d)
        elif isinstance(state, Gaussians):
            base = _to_numpy(state.mean[0]).astype(float)
        else:
            base = _to_numpy(state.mean()[0]).astype(float)
        pts = np.repeat(base[None], g * g, axis=0)
        pts[:, dims[0]] = gx.ravel()
        pts[:, dims[1]] = gy.ravel()
    x = torch.as_tensor(pts, dtype=dtype, device=device)[None]
    caps = getattr(field, "capabilities", None)
    if caps is None:
        from .fields import capabilities

        caps = capabilities(field)
    if isinstance(state, Gaussians) and "affine" in caps:
        b, A = field.affine(t, state)
        v = b[:, None, :] + (x - state.mean[:, None, :]) @ A.transpose(-1, -2)
    else:
        v = field.velocity(t, x, state)
    v = _to_numpy(v).astype(float)
    if v.shape != (1, pts.shape[0], d):
        raise ValueError(
            f"field {getattr(field, 'name', type(field).__name__)!r} returned velocities of shape {v.shape} "
            f"for query points of shape {(1, pts.shape[0], d)}; a velocity must have the query points' shape"
        )
    v = v[0]

    fig, ax = _new_figure(ax, (6.0, 5.2))
    name = getattr(field, "name", type(field).__name__)
    if d == 1:
        ax.axhline(0.0, color="0.6", lw=0.8)
        ax.plot(pts[:, 0], v[:, 0], color="C0", lw=1.6, label=f"v({_fmt_t(float(t))}, x)")
        if show_state and isinstance(state, Particles):
            xs = _to_numpy(state.x[0, _subsample(state.size, max_particles), 0])
            ax.plot(xs, np.zeros_like(xs), "|", color="0.3", alpha=0.4, ms=8)
        ax.set_xlabel("x")
        ax.set_ylabel("v")
        ax.legend(fontsize="small")
    else:
        if show_state and isinstance(state, Particles):
            xs = _to_numpy(state.x[0, _subsample(state.size, max_particles)]).astype(float)
            ax.scatter(xs[:, dims[0]], xs[:, dims[1]], s=3, color="0.55", alpha=0.5, linewidths=0, zorder=1,
                       gid="state")
        elif show_state and isinstance(state, Gaussians):
            plot_covariance_ellipses(_to_numpy(state.mean), _to_numpy(state.cov), ax, dims=dims, color="0.45",
                                     mean_path=False, linewidth=1.0, alpha=0.7)
        u, w = v[:, dims[0]], v[:, dims[1]]
        speed = np.hypot(u, w)
        arrows = ax.quiver(pts[:, dims[0]], pts[:, dims[1]], u, w, speed, cmap=cmap, pivot="mid", zorder=2)
        fig.colorbar(arrows, ax=ax, label="|v|", shrink=0.85)
        ax.set_xlim(bounds[0], bounds[1])
        ax.set_ylim(bounds[2], bounds[3])
        ax.set_aspect("equal", adjustable="box")
        ax.set_xlabel(f"x{_sub(dims[0] + 1)}")
        ax.set_ylabel(f"x{_sub(dims[1] + 1)}")
        if d > 2:
            ax.text(0.01, 0.01, "other coordinates at the mean", transform=ax.transAxes, fontsize="x-small",
                    color="0.4")
    ax.set_title(f"{name}, {_fmt_t(float(t))}", fontsize="medium")
    return _save(fig, out)


# ------------------------------------------------------------------------------------------------
# animations


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

    Particles: a scatter of at most ``max_particles`` particles of one replica per frame (x₁, x₂ for
    d ≥ 2, a histogram for d = 1), the initial positions in light grey. Gaussians: the 2-σ ellipse
    and the mean path so far per frame (``replica`` may be ``"all"``); for d = 1 the density.
    At most ``max_frames`` frames, evenly spread over the run, are read (one at a time) and drawn at
    ``fps`` frames per second; the axes stay fixed over the animation. Returns the Figure (left
    showing the last frame).
    """
    from matplotlib.animation import PillowWriter

    if out is None:
        raise ValueError("animate needs out=, the .gif file to write")
    if os.path.splitext(os.fspath(out))[1].lower() != ".gif":
        raise ValueError(f"animate writes GIF files; give out a .gif name (received {os.fspath(out)!r})")
    if int(max_frames) < 1 or int(fps) < 1:
        raise ValueError(f"max_frames and fps must be positive; received max_frames={max_frames}, fps={fps}")
    with _opened(traj) as view:
        frames = _even(view.frames, int(max_frames))
        times = view.times[frames]
        fig = Figure(figsize=(5.5, 5.0), layout="constrained")
        ax = fig.add_subplot()
        title = _title(view)
        fig.suptitle(title, fontsize="small")
        if view.kind == "particles":
            r = _replicas(view, replica, allow_all=False)[0]
            particles = _subsample(view.size, int(max_particles))
            if view.dim == 1:
                update = _particles_histogram_frames(ax, view, r, frames)
            else:
                update = _particles_scatter_frames(ax, view, r, particles, frames)
        else:
            reps = _replicas(view, replica, allow_all=True)
            update = (_gaussian_density_frames(ax, view, reps[0], frames) if view.dim == 1
                      else _gaussian_ellipse_frames(ax, view, reps, frames))
        writer = PillowWriter(fps=int(fps))
        with writer.saving(fig, os.fspath(out), dpi=dpi):
            for k in range(len(frames)):
                update(k)
                ax.set_title(f"{_fmt_t(times[k])}  (frame {int(frames[k]) + 1}/{view.frames})", fontsize="medium")
                writer.grab_frame()
                if k == 0:
                    # The layout of the first frame fits every frame (fixed limits); solving it again
                    # per frame would dominate the time spent writing the GIF.
                    fig.set_layout_engine("none")
    return fig


def _particles_scatter_frames(ax, view, r, particles, frames):
    xy = np.stack([view.positions(f, r, particles)[:, :2] for f in frames])
    xlim, ylim = _limits(xy.reshape(-1, 2))
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_aspect("equal", adjustable="box")
    _axis_labels(ax, (0, 1), view.dim)
    size = _marker_sizes(view, r, particles, 10.0 if len(particles) <= 500 else 4.0)
    ax.scatter(xy[0, :, 0], xy[0, :, 1], s=size, color="0.8", linewidths=0, zorder=1)
    dots = ax.scatter(xy[0, :, 0], xy[0, :, 1], s=size, color="C0", linewidths=0, zorder=2, gid="particles")

    def update(k):
        dots.set_offsets(xy[k])

    return update


def _particles_histogram_frames(ax, view, r, frames):
    xs = [view.positions(f, r)[:, 0] for f in frames]
    pooled = np.concatenate(xs)
    pooled = pooled[np.isfinite(pooled)]
    lo, hi = (np.quantile(pooled, [0.002, 0.998]) if pooled.size else (-1.0, 1.0))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, 61)
    w = None if view.weights is None else view.weights[r]
    dens = np.stack([np.histogram(x, bins=edges, weights=w, density=True)[0] for x in xs])
    ax.stairs(dens[0], edges, color="0.75", lw=1.0)
    line = ax.stairs(dens[0], edges, color="C0", lw=1.6, fill=False)
    ax.set_ylim(0, 1.05 * max(float(np.nanmax(dens)), 1e-12))
    ax.set_xlabel("x")
    ax.set_ylabel("density")

    def update(k):
        line.set_data(dens[k], edges)

    return update


def _gaussian_density_frames(ax, view, r, frames):
    mean, cov = view.gaussian_frames(frames)
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


def _gaussian_ellipse_frames(ax, view, reps, frames):
    mean, cov = view.gaussian_frames(frames)
    mean, cov = mean[:, reps][:, :, :2], cov[:, reps][:, :, :2, :2]
    c2 = 0.5 * (cov + np.swapaxes(cov, -1, -2))
    k, n = mean.shape[:2]
    verts = _ellipse_vertices(mean.reshape(k * n, 2), c2.reshape(k * n, 2, 2), 2.0, 129).reshape(k, n, 129, 2)
    xlim, ylim = _limits(verts.reshape(-1, 2))
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_aspect("equal", adjustable="box")
    _axis_labels(ax, (0, 1), view.dim)
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
