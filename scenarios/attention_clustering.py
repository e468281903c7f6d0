"""Tokens on the sphere cluster over depth under self-attention (MATH.md §10).

n tokens drawn uniformly on S^{d−1} (d = 3 by default) follow the attention flow with Q = K = √β·I, V = I,
kept on the sphere as layer normalisation keeps them (``sphere=True``: tangent velocity, and
every integrator applies the field's projection back onto the sphere after each step):

    ẋᵢ = P_{xᵢ}( Σⱼ e^{β⟨xᵢ, xⱼ⟩} xⱼ / Σⱼ e^{β⟨xᵢ, xⱼ⟩} ),   P_x = I − xxᵀ.

Depth is time: a transformer of L layers with step τ is the Euler scheme of this flow on [0, Lτ]. The
tokens gather into a few clusters quickly and then stay there for a long time before merging (the
larger β, the more clusters and the longer they persist), the metastability described by Geshkovski,
Letrouit, Polyanskiy and Rigollet.

**Cluster count.** The connected components of the graph joining two tokens closer than ``threshold``
(Euclidean distance on the sphere): labels start as the token indices and each token repeatedly takes
the smallest label among its neighbours until nothing changes. It is recorded as the observable
``clusters`` and drawn over depth for β and two other inverse temperatures.

    python scenarios/attention_clustering.py --set beta=16
    measureflow run scenarios/attention_clustering.py --set n=128 --set steps=60
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import numpy as np
import torch

import measureflow
from measureflow import Particles, Simulation, scenario
from measureflow.io.h5md import H5MDWriter
from measureflow.parameters import Count, Picture, Points, PositiveFloat, Range, Steps
from measureflow.simulation import Observer
from measureflow_plugins.attention import AttentionField

DTYPE = torch.float64


def uniform_sphere(n: int, d: int, seed: int) -> Particles:
    """n tokens uniform on S^{d−1} (normalised Gaussian draws), one replica."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, d, generator=g, dtype=DTYPE)
    return Particles(x / x.norm(dim=-1, keepdim=True))


def cluster_labels(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Connected components of |xᵢ − xⱼ| < threshold for one cloud x (n, d): each token's label is the
    smallest index in its component (min-label propagation; at most n sweeps of an n × n mask)."""
    near = torch.cdist(x, x) < threshold
    labels = torch.arange(x.shape[0], device=x.device)
    while True:
        new = torch.minimum(labels, torch.where(near, labels[None, :], x.shape[0]).amin(1))
        if torch.equal(new, labels):
            return labels
        labels = new


def cluster_count(threshold: float):
    def clusters(state, **_):
        return torch.tensor([float(torch.unique(cluster_labels(x, threshold)).numel()) for x in state.x])

    return clusters


def make_field(beta: float, d: int) -> AttentionField:
    if beta <= 0:
        raise measureflow.ParameterError(f"beta must be positive; received {beta!r}")
    root = math.sqrt(beta) * torch.eye(d, dtype=DTYPE)
    return AttentionField(Q=root, K=root, sphere=True)


def observers(threshold: float) -> list:
    return [Observer(cluster_count(threshold), name="clusters")]


@scenario
def attention_clustering(
    n: Points = 256,
    d: Annotated[int, Range(2, 1024)] = 3,
    beta: PositiveFloat = 9.0,
    t1: PositiveFloat = 30.0,
    steps: Steps = 150,
    every: Count = 5,
    threshold: PositiveFloat = 0.05,
    compare: str = "1,4",
    seed: int = 0,
    out: str = "runs/attention_clustering.h5",
    picture: Picture = "runs/attention_clustering.png",
) -> Simulation:
    """Tokens on the sphere clustering over depth under self-attention with inverse temperature β."""
    if d < 2:
        raise measureflow.ParameterError(f"d must be at least 2 (tokens on S^(d-1)); received {d!r}")
    return Simulation(uniform_sphere(n, d, seed), make_field(beta, d), "rk4", 0.0, t1,
                      steps=steps, writers=[H5MDWriter(out, every=every)] if out else [],
                      observers=observers(threshold), observe_every=every,
                      seed=seed)


def counts(result) -> tuple[np.ndarray, np.ndarray]:
    series = result.observables["clusters"]
    return np.asarray(series.times), np.ravel(series.values).astype(int)


def variant(beta: float, params: dict):
    """Another β at the same sizes, in memory (for the comparison curve)."""
    sim = Simulation(uniform_sphere(params["n"], params["d"], params["seed"]), make_field(beta, params["d"]),
                     "rk4", 0.0, params["t1"], steps=params["steps"],
                     observers=observers(params["threshold"]), observe_every=params["every"], progress=False)
    return sim.run()


@attention_clustering.report
def report(result, params):
    times, main = counts(result)
    x = result.state.x[0]
    drift = float((x.norm(dim=-1) - 1).abs().max())
    print(f"β = {params['beta']:g}: clusters {main[0]} → {main[-1]} over depth {params['t1']:g} "
          f"(threshold {params['threshold']:g}); max ||x| − 1| = {drift:.1e}")
    if not params["picture"]:
        return
    others = {}
    for text in params["compare"].split(","):
        if text.strip():
            beta = float(text)
            others[beta] = counts(variant(beta, params))
            print(f"  β = {beta:g}: clusters {others[beta][1][0]} → {others[beta][1][-1]}")
    start = uniform_sphere(params["n"], params["d"], params["seed"]).x[0]
    frames = _frames(params)
    _draw(start, frames, result, (times, main), others, params)
    print(f"wrote {params['picture']}")


def _frames(params):
    """The main run's tokens at a few depths, read back from its trajectory file when there is one."""
    if not params["out"] or not Path(params["out"]).exists():
        return {}
    with measureflow.open(params["out"]) as traj:
        times = np.asarray(traj.times)
        picks = sorted({0, len(times) // 8, len(times) // 3, len(times) - 1})
        return {float(times[i]): np.asarray(traj.positions[i])[0] for i in picks}


def _draw(start, frames, result, main, others, params):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 7.5), layout="constrained")
    snaps = frames or {0.0: start.numpy(), params["t1"]: result.state.x[0].numpy()}
    grid = fig.add_gridspec(2, len(snaps), height_ratios=[1.5, 1])
    labels = cluster_labels(result.state.x[0], params["threshold"]).numpy()
    _, colour = np.unique(labels, return_inverse=True)
    u, v = np.mgrid[0:2 * np.pi:40j, 0:np.pi:20j]
    for i, (t, x) in enumerate(snaps.items()):
        ax = fig.add_subplot(grid[0, i], projection="3d" if params["d"] == 3 else None)
        if params["d"] == 3:
            ax.plot_wireframe(np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v), color="0.85", lw=0.4)
            ax.scatter(x[:, 0], x[:, 1], x[:, 2], s=10, c=colour, cmap="tab10", depthshade=False)
            ax.set_box_aspect((1, 1, 1), zoom=1.4)
            ax.set_axis_off()
        else:
            ax.plot(np.cos(u[:, 0]), np.sin(u[:, 0]), c="0.85", lw=0.6)
            ax.scatter(x[:, 0], x[:, 1], s=6, c=colour, cmap="tab10")
            ax.set_aspect("equal")
        found = int(np.unique(cluster_labels(torch.as_tensor(x), params["threshold"]).numpy()).size)
        ax.set_title(f"depth t = {t:.3g}: {found} cluster{'s' if found != 1 else ''}", fontsize="medium")
    ax = fig.add_subplot(grid[1, :])
    ax.step(main[0], main[1], where="post", c="C3", lw=2, label=f"β = {params['beta']:g} (tokens above)")
    for j, (beta, (t, k)) in enumerate(others.items()):
        ax.step(t, k, where="post", c=f"C{j}", label=f"β = {beta:g}")
    ax.set_yscale("log")
    ax.set_xlabel("depth t (a transformer of L layers, step τ, reaches t = Lτ)")
    ax.set_ylabel(f"clusters (components at distance < {params['threshold']:g})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.suptitle(f"{params['n']} tokens on the unit sphere of R^{params['d']} under self-attention, Q = K = √β I, V = I "
                 "(colours: clusters at the final depth; MATH.md §10)", fontsize="medium")
    Path(params["picture"]).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(params["picture"], dpi=100)


if __name__ == "__main__":
    attention_clustering.main()
