"""MMD flow of a Gaussian blob onto a ring, with three kernels (MATH.md §6).

Particles drawn from a small Gaussian blob descend F(μ) = MMD²_k(μ, β) toward β, 2-D samples of a
noisy ring of radius 2 (a target no Gaussian closure can reach), under

* ``gaussian``: k = e^{−|x−y|²/(2ℓ²)} (RBF),
* ``laplace``: k = e^{−|x−y|/ℓ},
* ``energy``: k = −|x − y| (MMD² is the energy distance; no length scale).

The run records F (the field's energy, non-increasing along the exact flow: dF/dt = −Σᵢ wᵢ|v(xᵢ)|²)
and, as one yardstick common to the three kernels, the energy distance to the target. The report
runs the other kernels at a smaller size, plus the RBF with ``stall_bandwidth`` (ℓ much smaller than
the blob–ring distance: the attraction e^{−r²/2ℓ²} vanishes and the far particles stall — MATH.md §6,
"Avoid"), prints the final distances and draws the particles over the target and the curves.

    python scenarios/mmd_kernels.py --set kernel=laplace
    measureflow run scenarios/mmd_kernels.py --set n=300 --set steps=100
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import numpy as np
import torch

import measureflow
from measureflow import Particles, Simulation, scenario
from measureflow.observables import mmd
from measureflow.parameters import Count, OneOf, Picture, Points, PositiveFloat, Steps, Threads
from measureflow.simulation import Observer

KERNELS = ("gaussian", "laplace", "energy")
DTYPE = torch.float64


def ring_samples(m: int, seed: int) -> torch.Tensor:
    """m points of a ring of radius 2 with radial noise 0.15, shape (m, 2)."""
    g = torch.Generator().manual_seed(seed + 1)
    angle = 2 * math.pi * torch.rand(m, generator=g, dtype=DTYPE)
    radius = 2.0 + 0.15 * torch.randn(m, generator=g, dtype=DTYPE)
    return torch.stack([radius * angle.cos(), radius * angle.sin()], -1)


def blob(n: int, seed: int) -> Particles:
    """n particles of N((1, 0.5), 0.5² I), off-centre so the flow has to both spread and recentre."""
    g = torch.Generator().manual_seed(seed)
    x = 0.5 * torch.randn(1, n, 2, generator=g, dtype=DTYPE) + torch.tensor([1.0, 0.5], dtype=DTYPE)
    return Particles(x)


def make_field(kernel: str, bandwidth: float, target: torch.Tensor):
    if kernel not in KERNELS:
        raise measureflow.ParameterError(f"kernel must be one of {', '.join(KERNELS)}; received {kernel!r}")
    return measureflow.field("mmd", target=target, kernel=kernel, bandwidth=bandwidth)


def observers(target: torch.Tensor) -> list:
    return ["energy", Observer("mmd", name="energy_distance", target=target, params={"kernel": "energy"})]


@scenario
def mmd_kernels(
    kernel: Annotated[str, OneOf(*KERNELS)] = "gaussian",
    bandwidth: PositiveFloat = 1.0,
    stall_bandwidth: PositiveFloat = 0.2,
    n: Points = 300,
    m: Points = 400,
    t1: PositiveFloat = 20.0,
    steps: Steps = 150,
    every: Count = 5,
    seed: int = 0,
    threads: Threads = 0,
    out: str = "runs/mmd_kernels.h5",
    picture: Picture = "runs/mmd_kernels.png",
) -> Simulation:
    """A Gaussian blob flowing onto a ring under MMD² with a Gaussian, Laplace or energy-distance kernel."""
    if threads > 0:
        # For the rest of the process. Every tensor here is small (a few hundred points): a second
        # intra-op thread gains nothing, and on a shared machine its fork-join stalls every kernel
        # sum (measured: the default run took 5× the CPU time with two threads on a busy two-core box).
        torch.set_num_threads(threads)
    target = ring_samples(m, seed)
    field = make_field(kernel, bandwidth, target)
    return Simulation(blob(n, seed), field, "rk4", 0.0, t1, steps=steps, writers=[out] if out else [],
                      observers=observers(target), observe_every=every, seed=seed)


def variant(kernel: str, bandwidth: float, params: dict) -> dict:
    """Run one more kernel in memory, same sizes, no file (for the side-by-side figure)."""
    n = params["n"]
    target = ring_samples(params["m"], params["seed"])
    sim = Simulation(blob(n, params["seed"]), make_field(kernel, bandwidth, target), "rk4", 0.0, params["t1"],
                     steps=params["steps"], observers=observers(target), observe_every=params["every"],
                     seed=params["seed"], progress=False)
    return _summary(sim.run(), target, blob(n, params["seed"]))


def _summary(result, target, start) -> dict:
    obs = result.observables
    return {
        "x": result.state.x[0].numpy(),
        "times": np.asarray(obs["energy"].times),
        "energy": np.ravel(obs["energy"].values),
        "distance": np.ravel(obs["energy_distance"].values),
        "start_distance": float(mmd(start, target=target, kernel="energy")[0]),
        "final_distance": float(mmd(result.state, target=target, kernel="energy")[0]),
    }


def final_numbers(result, params) -> dict:
    """Energy and energy distance of the main run, first and last, and whether F never increased."""
    target = ring_samples(params["m"], params["seed"])
    return _summary(result, target, blob(params["n"], params["seed"]))


@mmd_kernels.report
def report(result, params):
    main = final_numbers(result, params)
    print(f"{params['kernel']} (ℓ = {params['bandwidth']:g}): MMD² {main['energy'][0]:.4g} → {main['energy'][-1]:.4g}; "
          f"energy distance to the ring {main['start_distance']:.4g} → {main['final_distance']:.4g}")
    if not params["picture"]:
        return
    runs = {}
    for kernel in KERNELS:
        label = f"{kernel}" + ("" if kernel == "energy" else f", ℓ = {params['bandwidth']:g}")
        runs[label] = main if kernel == params["kernel"] else variant(kernel, params["bandwidth"], params)
    stall = f"gaussian, ℓ = {params['stall_bandwidth']:g}"
    runs[stall] = variant("gaussian", params["stall_bandwidth"], params)
    for label, run in runs.items():
        print(f"  {label:<22} energy distance to the ring: {run['start_distance']:.4f} → {run['final_distance']:.4f}")
    _draw(runs, ring_samples(params["m"], params["seed"]).numpy(), params)
    print(f"wrote {params['picture']}")


def _draw(runs: dict, target: np.ndarray, params: dict) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 6.6), layout="constrained")
    grid = fig.add_gridspec(2, len(runs) + 1, width_ratios=[1] * len(runs) + [1.25])
    start = blob(params["n"], params["seed"]).x[0].numpy()
    for i, (label, run) in enumerate(runs.items()):
        ax = fig.add_subplot(grid[0, i])
        ax.scatter(target[:, 0], target[:, 1], s=4, c="0.75", label="target (ring)")
        ax.scatter(run["x"][:, 0], run["x"][:, 1], s=5, c="C3", label="particles, t = t₁")
        ax.set_title(label + (" (stalls: ℓ too small)" if label.endswith(f"ℓ = {params['stall_bandwidth']:g}") else ""),
                     fontsize="medium")
        ax.set_aspect("equal")
        ax.set_xlim(-3, 3), ax.set_ylim(-3, 3)
        if i == 0:
            ax.legend(loc="lower left", fontsize="x-small", markerscale=2)
        ax2 = fig.add_subplot(grid[1, i])
        ax2.scatter(target[:, 0], target[:, 1], s=4, c="0.75")
        ax2.scatter(start[:, 0], start[:, 1], s=5, c="C0", label="particles, t = 0")
        ax2.set_aspect("equal")
        ax2.set_xlim(-3, 3), ax2.set_ylim(-3, 3)
        ax2.text(0.02, 0.02, f"energy distance\n{run['start_distance']:.3f} → {run['final_distance']:.3f}",
                 transform=ax2.transAxes, fontsize="small", va="bottom")
        if i == 0:
            ax2.legend(loc="upper left", fontsize="x-small", markerscale=2)
    ax = fig.add_subplot(grid[0, -1])
    for j, (label, run) in enumerate(runs.items()):
        ax.semilogy(run["times"], run["energy"] / run["energy"][0], c=f"C{j}", label=label)
    ax.set_title("F/F(0), F = MMD²ₖ (own kernel)", fontsize="medium")
    ax.set_xlabel("t")
    ax.legend(fontsize="x-small")
    ax = fig.add_subplot(grid[1, -1])
    for j, (label, run) in enumerate(runs.items()):
        ax.semilogy(run["times"], run["distance"], c=f"C{j}", label=label)
    ax.set_title("energy distance to the ring", fontsize="medium")
    ax.set_xlabel("t")
    fig.suptitle("MMD flow of a Gaussian blob onto a ring: top, particles at t₁; bottom, at t = 0 (MATH.md §6)",
                 fontsize="medium")
    Path(params["picture"]).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(params["picture"], dpi=100)


if __name__ == "__main__":
    mmd_kernels.main()
