"""Three particle samplers of a 2-D Gaussian mixture: Langevin, blob and SVGD (MATH.md §3, §9).

Particles drawn from a Gaussian blob descend KL(μ | β) toward β, a mixture of three Gaussians in the
plane (weights 0.5, 0.3, 0.2, non-isotropic components), by

* ``langevin``: dX = ∇log β(X) dt + √2 dW, Euler–Maruyama (stochastic; bias O(h));
* ``blob``: the deterministic kernel-density scheme v = ∇log β − ∇log(K_ε*μ) (RK4);
* ``svgd``: Stein variational gradient descent with the kernel e^{−|x−y|²/(2ε_svgd)} (RK4); it
  descends KL in the Stein geometry, so dF/dt = −∫|v|² dμ does not hold, but F still decreases.

The run records the field's energy and, as one yardstick for the three modes, the same kernel-density
KL estimator Σᵢ wᵢ[log(K_ε*μ)(xᵢ) − log β(xᵢ)] with ε = ``epsilon`` for all (``kl_estimate``), and the
RBF MMD² (ℓ = 1) to ``m`` samples of β. The report runs the two other modes at the same size, prints
the distances and draws the particles over the density's contours and the curves.

    python scenarios/kl_samplers.py --set mode=svgd
    measureflow run scenarios/kl_samplers.py --set mode=blob --set n=200
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import torch

import measureflow
from measureflow import Particles, Simulation, scenario
from measureflow.measures import GaussianMixture
from measureflow.observables import mmd
from measureflow.parameters import Count, OneOf, Picture, Points, PositiveFloat, Steps, Threads
from measureflow.simulation import Observer

MODES = ("langevin", "blob", "svgd")
DTYPE = torch.float64


def mixture() -> GaussianMixture:
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=DTYPE)
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5]], dtype=DTYPE)
    covs = torch.stack([
        torch.tensor([[0.5, 0.2], [0.2, 0.4]], dtype=DTYPE),
        torch.tensor([[0.3, -0.1], [-0.1, 0.6]], dtype=DTYPE),
        0.25 * torch.eye(2, dtype=DTYPE),
    ])
    return GaussianMixture(weights, means, covs)


def target_samples(m: int, seed: int) -> torch.Tensor:
    return mixture().sample(m, torch.Generator().manual_seed(seed + 1))


def blob(n: int, seed: int) -> Particles:
    """n particles of N((0, −2), 0.5² I): below all three modes, nearest none of them."""
    g = torch.Generator().manual_seed(seed)
    return Particles(0.5 * torch.randn(1, n, 2, generator=g, dtype=DTYPE) + torch.tensor([0.0, -2.0], dtype=DTYPE))


def make_field(mode: str, epsilon: float, svgd_epsilon: float):
    if mode not in MODES:
        raise measureflow.ParameterError(f"mode must be one of {', '.join(MODES)}; received {mode!r}")
    eps = svgd_epsilon if mode == "svgd" else epsilon
    return measureflow.field("kl", target=mixture(), mode=mode, epsilon=eps)


def observers(epsilon: float, samples: torch.Tensor) -> list:
    estimator = measureflow.field("kl", target=mixture(), mode="blob", epsilon=epsilon)

    def kl_estimate(state, **_):
        return estimator.energy(state)

    return ["energy", Observer(kl_estimate, name="kl_estimate"),
            Observer("mmd", name="mmd_to_samples", target=samples, params={"bandwidth": 1.0})]


@scenario
def kl_samplers(
    mode: Annotated[str, OneOf(*MODES)] = "langevin",
    epsilon: PositiveFloat = 0.1,
    svgd_epsilon: PositiveFloat = 1.0,
    n: Points = 300,
    m: Points = 1000,
    t1: PositiveFloat = 5.0,
    steps: Steps = 200,
    every: Count = 5,
    seed: int = 0,
    threads: Threads = 0,
    out: str = "runs/kl_samplers.h5",
    picture: Picture = "runs/kl_samplers.png",
) -> Simulation:
    """A Gaussian blob sampling a three-component Gaussian mixture by Langevin, blob or SVGD."""
    if threads > 0:
        # For the rest of the process. Every tensor here is small (a few hundred points): a second
        # intra-op thread gains nothing, and on a shared machine its fork-join stalls every kernel
        # sum (measured: the default run took 5× the CPU time with two threads on a busy two-core box).
        torch.set_num_threads(threads)
    field = make_field(mode, epsilon, svgd_epsilon)
    integrator = "euler_maruyama" if mode == "langevin" else "rk4"
    return Simulation(blob(n, seed), field, integrator, 0.0, t1, steps=steps, writers=[out] if out else [],
                      observers=observers(epsilon, target_samples(m, seed)), observe_every=every, seed=seed)


def summary(result, params) -> dict:
    """Curves and start/final RBF MMD² (ℓ = 1) to the target samples."""
    obs = result.observables
    samples = target_samples(params["m"], params["seed"])
    return {
        "x": result.state.x[0].numpy(),
        "times": np.asarray(obs["energy"].times),
        "energy": np.ravel(obs["energy"].values),
        "kl_estimate": np.ravel(obs["kl_estimate"].values),
        "start_mmd": float(mmd(blob(params["n"], params["seed"]), target=samples, bandwidth=1.0)[0]),
        "final_mmd": float(mmd(result.state, target=samples, bandwidth=1.0)[0]),
    }


def variant(mode: str, params: dict) -> dict:
    sim, _ = kl_samplers.build({**params, "mode": mode, "out": ""})
    return summary(sim.with_options(progress=False).run(), params)


@kl_samplers.report
def report(result, params):
    main = summary(result, params)
    print(f"{params['mode']}: KL estimate {main['kl_estimate'][0]:.4g} → {main['kl_estimate'][-1]:.4g}; "
          f"MMD² (RBF, ℓ = 1) to {params['m']} target samples {main['start_mmd']:.4g} → {main['final_mmd']:.4g}")
    if not params["picture"]:
        return
    runs = {mode: main if mode == params["mode"] else variant(mode, params) for mode in MODES}
    for mode, run in runs.items():
        print(f"  {mode:<9} KL estimate {run['kl_estimate'][-1]:8.4f}   MMD² to samples {run['final_mmd']:.5f}")
    _draw(runs, params)
    print(f"wrote {params['picture']}")


def _draw(runs: dict, params: dict) -> None:
    from matplotlib.figure import Figure

    u = np.linspace(-4.5, 4.5, 181)
    v = np.linspace(-3.5, 4.5, 161)
    grid = torch.tensor(np.stack(np.meshgrid(u, v), -1), dtype=DTYPE)
    density = mixture().log_density(grid.reshape(-1, 2)).exp().reshape(grid.shape[:2]).numpy()
    start = blob(params["n"], params["seed"]).x[0].numpy()
    labels = {"langevin": "Langevin (Euler–Maruyama)", "blob": f"blob (ε = {params['epsilon']:g})",
              "svgd": f"SVGD (ε = {params['svgd_epsilon']:g})"}

    fig = Figure(figsize=(16, 4.4), layout="constrained")
    axes = fig.subplots(1, len(runs) + 1, width_ratios=[1] * len(runs) + [1.3])
    for ax, (mode, run) in zip(axes, runs.items()):
        ax.contour(u, v, density, levels=8, colors="0.6", linewidths=0.8)
        ax.scatter(start[:, 0], start[:, 1], s=4, c="C0", alpha=0.35, label="t = 0")
        ax.scatter(run["x"][:, 0], run["x"][:, 1], s=5, c="C3", label=f"t = {params['t1']:g}")
        ax.set_title(f"{labels[mode]}\nMMD² to samples {run['start_mmd']:.3f} → {run['final_mmd']:.4f}",
                     fontsize="medium")
        ax.set_aspect("equal")
        ax.set_xlim(u[0], u[-1]), ax.set_ylim(v[0], v[-1])
    axes[0].legend(loc="upper left", fontsize="x-small", markerscale=2)
    ax = axes[-1]
    for j, (mode, run) in enumerate(runs.items()):
        ax.plot(run["times"], run["kl_estimate"], c=f"C{j}", label=labels[mode])
    ax.set_yscale("symlog", linthresh=0.1)
    ax.axhline(0.0, c="0.5", lw=0.6)
    ax.set_xlabel("t")
    ax.set_title(f"KL estimate (kernel density, ε = {params['epsilon']:g})", fontsize="medium")
    ax.legend(fontsize="x-small")
    fig.suptitle("KL(μ | β) to a three-component Gaussian mixture (contours of β): three samplers (MATH.md §3)",
                 fontsize="medium")
    Path(params["picture"]).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(params["picture"], dpi=100)


if __name__ == "__main__":
    kl_samplers.main()
