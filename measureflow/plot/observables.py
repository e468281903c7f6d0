"""Observables against time: one panel per observable, one curve per replica (or a band)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure

from ..errors import ParameterError
from ..io.base import Series
from .common import (
    CURVE_FRAMES,
    MAX_REPLICA_LINES,
    PREFERRED_OBSERVABLES,
    chosen_replicas,
    even_indices,
    run_title,
    save,
)
from .inputs import opened, read_all

__all__ = ["plot_observables", "observable_panels", "default_observables", "is_scalar"]


def is_scalar(series: Series, replicas: int) -> bool:
    """One value per sample (and replica), with at least one sample recorded."""
    shape = getattr(series.values, "shape", None)
    if shape is None:
        shape = read_all(series.values).shape
    shape = tuple(shape)
    return (len(shape) == 1 or (len(shape) == 2 and shape[1] == replicas)) and shape[0] > 0


def default_observables(observables: Mapping[str, Series], replicas: int, limit: int | None) -> list[str]:
    """The observables an overview shows: the preferred ones (energy, distances) in that order when
    present, else every scalar one; at most ``limit``."""
    scalar = [n for n, s in observables.items() if is_scalar(s, replicas)]
    preferred = [n for n in scalar if n.lower().startswith(PREFERRED_OBSERVABLES)]

    def rank(name):
        low = name.lower()
        return next(k for k, p in enumerate(PREFERRED_OBSERVABLES) if low.startswith(p))

    chosen = sorted(preferred, key=rank) if preferred else scalar
    return chosen if limit is None else chosen[:limit]


def _draw_series(ax, name: str, series: Series, replicas: list[int], total_replicas: int):
    t = read_all(series.times).astype(float).reshape(-1)
    v = read_all(series.values).astype(float)
    if v.shape[0] != t.shape[0]:
        raise ParameterError(f"observable {name!r}: {v.shape[0]} values for {t.shape[0]} times")
    if t.shape[0] > CURVE_FRAMES * 4:  # a long run: a dense even subset draws the same curve
        keep = even_indices(t.shape[0], CURVE_FRAMES * 4)
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


def observable_panels(fig, spec, observables: Mapping[str, Series], names: list[str], replicas: list[int],
                      total_replicas: int):
    """A column of panels (one per name, shared t axis) in grid cell ``spec``; returns the first axes."""
    inner = spec.subgridspec(len(names), 1)
    first = None
    for k, name in enumerate(names):
        ax = fig.add_subplot(inner[k, 0], sharex=first)
        first = first or ax
        _draw_series(ax, name, observables[name], replicas, total_replicas)
        if k < len(names) - 1:
            ax.tick_params(labelbottom=False)
        else:
            ax.set_xlabel("t")
    return first


def plot_observables(traj, names=None, out=None, *, replica=0) -> Figure:
    """One panel per observable against time (log y-axis when every value is positive).

    ``traj`` is a :class:`~measureflow.io.Trajectory` or the path of a trajectory file. ``names``
    selects observables (default: every scalar one, i.e. one value per replica and frame); an
    unknown name raises ValueError listing the available ones. ``replica`` is an index or
    ``"all"`` (more than 8 replicas are then summarised by their median and 10–90 % band).
    Non-scalar observables named explicitly show their first components for the chosen replica.
    Returns the Figure; saves it to ``out`` when given.
    """
    with opened(traj) as traj:
        reps = chosen_replicas(traj, replica, allow_all=True)
        observables = traj.observables
        available = sorted(observables)
        if names is None:
            chosen = [n for n, s in observables.items() if is_scalar(s, traj.replicas)]
            if not chosen:
                raise ParameterError(
                    f"{traj.source}: the trajectory has no scalar observables to plot (available: "
                    f"{available or 'none'}); add observables to the run or name non-scalar ones explicitly"
                )
        else:
            chosen = [names] if isinstance(names, str) else list(names)
            unknown = [n for n in chosen if n not in observables]
            if unknown:
                raise ParameterError(
                    f"{traj.source}: unknown observable(s) {unknown}; available: {available or 'none'}"
                )
            if not chosen:
                raise ParameterError("names is empty; give at least one observable name or None for all")
        fig = Figure(figsize=(7.0, 1.2 + 2.0 * len(chosen)), layout="constrained")
        observable_panels(fig, fig.add_gridspec(1, 1)[0, 0], observables, chosen, reps, traj.replicas)
        fig.suptitle(run_title(traj), fontsize="medium")
    return save(fig, out)
