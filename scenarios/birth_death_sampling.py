"""Birth–death Langevin: KL to a two-mode mixture with unequal masses (MATH.md §15.6, §3).

β = 0.8 N((−4, 0), I) + 0.2 N((4, 0), I); the particles start with equal masses in the two modes (half of
them around each mean). The barrier between the modes is too high for Langevin diffusion to cross in the
run, so plain Langevin (``mode="langevin"``, the Wasserstein geometry) keeps the wrong masses ½ / ½. In the
Wasserstein–Fisher–Rao geometry (``mode="wfr"``, rate α) the particles also carry weights that move by
birth–death, ẇᵢ = −αwᵢ(δF(xᵢ) − ΣⱼwⱼδF(xⱼ)) with δF = log(K_ε*μ) + V, and the mass of each mode relaxes to
β's at rate α.

The run records ``mass_left`` (the weight of the particles with x₁ < 0) and ``effective_size`` (Kish's
1/Σwᵢ²); the report runs the other mode too, prints both masses against 0.8 with the sampling standard
error √(0.8·0.2/N_eff), and draws the weighted particles.

    python scenarios/birth_death_sampling.py
    measureflow run scenarios/birth_death_sampling.py --set mode=langevin
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import torch

import measureflow
from measureflow import Particles, Simulation, scenario
from measureflow.measures import GaussianMixture
from measureflow.parameters import Count, NonNegative, Picture, Points, PositiveFloat, Steps
from measureflow.simulation import Observer

MODES = ("wfr", "langevin")
DTYPE = torch.float64
MASSES = (0.8, 0.2)


def target() -> GaussianMixture:
    means = torch.tensor([[-4.0, 0.0], [4.0, 0.0]], dtype=DTYPE)
    return GaussianMixture(torch.tensor(MASSES, dtype=DTYPE), means, torch.eye(2, dtype=DTYPE).expand(2, 2, 2))


def start(n: int, seed: int) -> Particles:
    """n particles, half around each mode (masses ½ / ½)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, 2, generator=g, dtype=DTYPE)
    x[:, : n // 2, 0] -= 4.0
    x[:, n // 2:, 0] += 4.0
    return Particles(x)


def mass_left(state, **_):
    w = state.weights_or_uniform()
    return (w * (state.x[..., 0] < 0)).sum(-1)


def effective_size(state, **_):
    w = state.weights_or_uniform()
    return w.sum(-1) ** 2 / (w * w).sum(-1)


@scenario
def birth_death_sampling(
    mode: str = "wfr",
    rate: Annotated[float, NonNegative()] = 1.0,
    epsilon: PositiveFloat = 0.2,
    n: Points = 400,
    t1: PositiveFloat = 5.0,
    steps: Steps = 500,
    every: Count = 10,
    seed: int = 0,
    out: str = "runs/birth_death_sampling.h5",
    picture: Picture = "runs/birth_death_sampling.png",
) -> Simulation:
    """Langevin vs WFR birth–death Langevin toward a two-mode mixture with masses 0.8 / 0.2."""
    if mode not in MODES:
        raise measureflow.ParameterError(f"mode must be one of {', '.join(MODES)}; received {mode!r}")
    geometry = {"geometry": "wfr", "rate": rate} if mode == "wfr" else {}
    field = measureflow.field("kl", target=target(), epsilon=epsilon, **geometry)
    return Simulation(start(n, seed), field, "euler_maruyama", 0.0, t1, steps=steps, seed=seed,
                      writers=[out] if out else [], observe_every=every,
                      observers=["energy", Observer(mass_left, name="mass_left"),
                                 Observer(effective_size, name="effective_size")])


def summary(result) -> dict:
    obs = result.observables
    mass = float(obs["mass_left"].values[-1, 0])
    n_eff = float(obs["effective_size"].values[-1, 0])
    se = (MASSES[0] * MASSES[1] / n_eff) ** 0.5
    return {"mass": mass, "n_eff": n_eff, "se": se, "x": result.state.x[0].numpy(),
            "w": result.state.weights_or_uniform()[0].numpy(), "times": np.asarray(obs["mass_left"].times),
            "masses": np.ravel(obs["mass_left"].values)}


@birth_death_sampling.report
def report(result, params):
    runs = {params["mode"]: summary(result)}
    if params["picture"]:
        other = "langevin" if params["mode"] == "wfr" else "wfr"
        sim, _ = birth_death_sampling.build({**params, "mode": other, "out": ""})
        runs[other] = summary(sim.with_options(progress=False).run())
    for mode, run in runs.items():
        print(f"{mode:<9} mass of the left mode {run['mass']:.4f} (target {MASSES[0]}, sampling error "
              f"{run['se']:.4f}, {abs(run['mass'] - MASSES[0]) / run['se']:.1f} standard errors; N_eff = {run['n_eff']:.0f})")
    if params["picture"]:
        _draw(runs, params)
        print(f"wrote {params['picture']}")


def _draw(runs: dict, params: dict) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.4), layout="constrained")
    axes = fig.subplots(1, 3, width_ratios=[1.3, 1.3, 1])
    u, v = np.linspace(-8, 8, 161), np.linspace(-4, 4, 81)
    grid = torch.tensor(np.stack(np.meshgrid(u, v), -1), dtype=DTYPE)
    density = target().log_density(grid.reshape(-1, 2)).exp().reshape(grid.shape[:2]).numpy()
    for ax, mode in zip(axes[:2], MODES):
        run = runs[mode]
        ax.contour(u, v, density, levels=6, colors="0.6", linewidths=0.8)
        ax.scatter(run["x"][:, 0], run["x"][:, 1], s=np.clip(run["w"] * len(run["w"]) * 6, 1, 40), c="C3")
        ax.set_title(f"{mode}: left-mode mass {run['mass']:.3f} (target 0.8)", fontsize="medium")
        ax.set_aspect("equal")
    ax = axes[2]
    for j, mode in enumerate(MODES):
        ax.plot(runs[mode]["times"], runs[mode]["masses"], c=f"C{j}", label=mode)
    ax.axhline(MASSES[0], c="0.4", ls="--", lw=0.8, label="β's mass")
    ax.set_xlabel("t"), ax.set_ylabel("mass of x₁ < 0"), ax.legend(fontsize="small")
    fig.suptitle("Birth–death (WFR) Langevin moves mass between modes that Langevin cannot cross (MATH.md §15.6)",
                 fontsize="medium")
    Path(params["picture"]).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(params["picture"], dpi=100)


if __name__ == "__main__":
    birth_death_sampling.main()
