"""Drifting trajectories of a small particle generator, raw vs self-corrected (MATH.md §9; [B]'s figure).

A few dozen particles start in a small blob at the centre of a 2-D target β that no Gaussian describes:
``m`` samples of four Gaussian blobs of unequal weights. They move by the kernel drift with the Gaussian
kernel K_ε (ε = ``epsilon``, a variance in units of length²), either

* raw, ẋ = B_ε[β](x) = ε∇log(K_ε*β)(x): each particle climbs the smoothed target density to the nearest of
  its modes and stops there — the particles *collapse* onto a few points, whatever the blobs' spread; or
* self-corrected, ẋ = u = B_ε[β](x) − B_ε[μ](x) = ε∇log(K_ε*β / K_ε*μ)(x): the particles' own drift pushes
  them apart, so they *spread* over all the blobs (the MMD² to the target falls by a factor ≈ 25 with the
  defaults, while the raw drift's stays at ⅔ of its start).

This is the particle ODE behind a one-step generator's update G⁺(z) = G(z) + τ u(G(z)) [B] (the explicit
Euler step). The run records ∫|v|²dμ of the field that moves the particles (``drift_norm``; neither field
descends a fixed functional, so this, not an energy, says when they stop) and the RBF MMD² (ℓ = ``mmd_bandwidth``)
to the target samples. Both flows come to rest; only the self-corrected one comes to rest *at* β.

The scenario runs ``self_correction`` (default: the self-corrected drift) into ``out``; the report runs the
other one in memory, prints both final MMD² and how many distinct points the particles end on (within
10⁻²), and draws the trajectories over the target samples, one panel each, beside the
two curves.

    python scenarios/drifting_trajectories.py
    measureflow run scenarios/drifting_trajectories.py --set self_correction=false --set epsilon=0.2
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import measureflow
from measureflow import Particles, Simulation, scenario
from measureflow.measures import GaussianMixture
from measureflow.observables import mmd
from measureflow.parameters import Count, Picture, Points, PositiveFloat, Steps, Threads
from measureflow.simulation import Observer
from measureflow_plugins.drifting import drift_norm

DTYPE = torch.float64
#: The target's blobs: centres, standard deviations and weights.
CENTRES = ((2.0, 0.5), (-1.5, 1.8), (-1.2, -1.7), (1.0, -2.2))
SPREADS = (0.45, 0.35, 0.4, 0.3)
WEIGHTS = (0.35, 0.25, 0.25, 0.15)
LABELS = {True: "self-corrected  u = B_ε[β] − B_ε[μ]", False: "raw drift  B_ε[β]"}


def blobs() -> GaussianMixture:
    """The four-blob target law."""
    covs = torch.stack([s * s * torch.eye(2, dtype=DTYPE) for s in SPREADS])
    return GaussianMixture(torch.tensor(WEIGHTS, dtype=DTYPE), torch.tensor(CENTRES, dtype=DTYPE), covs)


def target_samples(m: int, seed: int) -> torch.Tensor:
    """m samples of the target (the only thing the field sees of it), shape (m, 2)."""
    return blobs().sample(m, torch.Generator().manual_seed(seed + 1))


def start(n: int, seed: int) -> Particles:
    """n particles of N((0.2, 0), 0.25² I): a small blob between the modes."""
    g = torch.Generator().manual_seed(seed)
    return Particles(0.25 * torch.randn(1, n, 2, generator=g, dtype=DTYPE) + torch.tensor([0.2, 0.0], dtype=DTYPE))


def make_field(self_correction: bool, epsilon: float, samples: torch.Tensor):
    return measureflow.field("drifting", target=samples, epsilon=epsilon, self_correction=self_correction)


def observers(samples: torch.Tensor, mmd_bandwidth: float) -> list:
    # The MMD field's energy is the same RBF MMD² as the ``mmd`` observable, with the target's own term
    # Σ qⱼqₖk(yⱼ, yₖ) computed once instead of at every sample.
    estimator = measureflow.field("mmd", target=samples, kernel="gaussian", bandwidth=mmd_bandwidth)

    def mmd_to_target(state, **_):
        return estimator.energy(state)

    return [Observer(drift_norm, name="drift_norm"), Observer(mmd_to_target, name="mmd")]


@scenario
def drifting_trajectories(
    self_correction: bool = True,
    epsilon: PositiveFloat = 0.5,
    n: Points = 40,
    m: Points = 600,
    t1: PositiveFloat = 12.0,
    steps: Steps = 120,
    every: Count = 1,
    mmd_bandwidth: PositiveFloat = 0.5,
    seed: int = 0,
    threads: Threads = 0,
    out: str = "runs/drifting_trajectories.h5",
    picture: Picture = "runs/drifting_trajectories.png",
) -> Simulation:
    """Particles from a small blob drifting toward four Gaussian blobs, raw or self-corrected."""
    if threads > 0:
        # For the rest of the process: every tensor here is tiny (tens of particles, hundreds of samples),
        # and a second intra-op thread only adds fork-join stalls on a shared machine.
        torch.set_num_threads(threads)
    samples = target_samples(m, seed)
    field = make_field(self_correction, epsilon, samples)
    return Simulation(start(n, seed), field, "rk4", 0.0, t1, steps=steps, writers=[out] if out else [],
                      observers=observers(samples, mmd_bandwidth), observe_every=every, seed=seed)


# -- numbers ------------------------------------------------------------------------------------------------


def distinct_points(x: np.ndarray, tol: float = 1e-2) -> int:
    """How many distinct places the particles occupy: particles farther than ``tol`` from every earlier one
    (a collapse onto k modes gives k)."""
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    earlier = np.tril(np.ones_like(d, dtype=bool), k=-1)
    return int(np.sum(np.all((d > tol) | ~earlier, axis=1)))


def summary(paths: np.ndarray, series: dict, params: dict) -> dict:
    """Numbers of one run from its frames (frames, n, 2) and observable series."""
    samples = target_samples(params["m"], params["seed"])
    final = Particles(torch.as_tensor(paths[-1], dtype=DTYPE)[None])
    return {
        "paths": paths,
        "times": np.asarray(series["mmd"].times),
        "mmd": np.ravel(series["mmd"].values),
        "drift_norm": np.ravel(series["drift_norm"].values),
        "start_mmd": float(mmd(start(params["n"], params["seed"]), target=samples, bandwidth=params["mmd_bandwidth"])[0]),
        "final_mmd": float(mmd(final, target=samples, bandwidth=params["mmd_bandwidth"])[0]),
        "distinct": distinct_points(paths[-1]),
    }


def main_run(result, params) -> dict:
    """The scenario's own run: frames from its H5MD file (in memory when it wrote none)."""
    if params["out"]:
        with measureflow.open(params["out"]) as traj:
            paths = np.stack([np.asarray(traj.positions[k])[0] for k in range(len(traj))])
    else:
        return other_run(params["self_correction"], params)
    return summary(paths, result.observables, params)


def other_run(self_correction: bool, params: dict) -> dict:
    """The same particles and target under the other field, in memory."""
    samples = target_samples(params["m"], params["seed"])
    memory = measureflow.get_registry().writer("memory", every=params["every"])
    result = Simulation(start(params["n"], params["seed"]), make_field(self_correction, params["epsilon"], samples),
                        "rk4", 0.0, params["t1"], steps=params["steps"], writers=[memory],
                        observers=observers(samples, params["mmd_bandwidth"]), observe_every=params["every"],
                        seed=params["seed"], progress=False).run()
    return summary(memory.positions[:, 0], result.observables, params)


@drifting_trajectories.report
def report(result, params):
    runs = {params["self_correction"]: main_run(result, params)}
    runs[not params["self_correction"]] = other_run(not params["self_correction"], params)
    for corrected in (False, True):
        run = runs[corrected]
        print(f"{LABELS[corrected]:<38} MMD² {run['start_mmd']:.4f} → {run['final_mmd']:.4f}; "
              f"∫|v|²dμ {run['drift_norm'][0]:.3g} → {run['drift_norm'][-1]:.3g}; "
              f"{run['distinct']} distinct end points of {params['n']}")
    if params["picture"]:
        draw(runs, params)
        print(f"wrote {params['picture']}")


def draw(runs: dict, params: dict) -> None:
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    samples = target_samples(params["m"], params["seed"]).numpy()
    fig = Figure(figsize=(15, 5.4), layout="constrained")
    grid = fig.add_gridspec(2, 3, width_ratios=[1, 1, 0.9])
    lo, hi = samples.min(0) - 0.5, samples.max(0) + 0.5
    for col, corrected in enumerate((False, True)):
        run = runs[corrected]
        ax = fig.add_subplot(grid[:, col])
        ax.scatter(samples[:, 0], samples[:, 1], s=4, c="0.8", label=f"target samples (m = {len(samples)})")
        lines = np.transpose(run["paths"], (1, 0, 2))  # (n, frames, 2)
        ax.add_collection(LineCollection(lines, colors="C0" if corrected else "C3", linewidths=0.8, alpha=0.7))
        ax.scatter(*run["paths"][0].T, s=10, c="k", zorder=3, label="start")
        ax.scatter(*run["paths"][-1].T, s=22, marker="x", c="C0" if corrected else "C3", zorder=4,
                   label=f"t = {params['t1']:g}")
        ax.set_xlim(lo[0], hi[0]), ax.set_ylim(lo[1], hi[1])
        ax.set_aspect("equal")
        verdict = "spreads over the blobs" if corrected else "collapses onto the modes"
        ax.set_title(f"{LABELS[corrected]}: {verdict}\nMMD² {run['start_mmd']:.3f} → {run['final_mmd']:.4f}",
                     fontsize="medium")
        ax.set_xlabel("x₁"), ax.set_ylabel("x₂")
        ax.legend(loc="lower left", fontsize="x-small", markerscale=1.5)
    for row, (key, title) in enumerate((("drift_norm", "∫|v|²dμ of the field that moves the particles"),
                                         ("mmd", f"MMD² to the target samples (RBF, ℓ = {params['mmd_bandwidth']:g})"))):
        ax = fig.add_subplot(grid[row, 2])
        for corrected in (False, True):
            run = runs[corrected]
            ax.semilogy(run["times"], np.maximum(run[key], 1e-16), c="C0" if corrected else "C3",
                        label=LABELS[corrected])
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("t")
        if row == 0:
            ax.legend(fontsize="x-small")
    fig.suptitle(f"Kernel drifting of n = {params['n']} particles toward four Gaussian blobs, "
                 f"ε = {params['epsilon']:g} (MATH.md §9)", fontsize="medium")
    Path(params["picture"]).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(params["picture"], dpi=100)


if __name__ == "__main__":
    drifting_trajectories.main()
