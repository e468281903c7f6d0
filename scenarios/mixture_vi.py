"""Variational inference by Wasserstein gradient flow on Gaussian mixtures (MATH.md §15.7).

A :class:`~measureflow.GaussianMixtures` state with three components (equal weights, unit covariances, means
between the origin and the modes) descends KL(ρ | β) toward β, a three-component mixture in the plane. Each component
moves by ṁₖ = E[∇log(β/ρ)(Xₖ)], Σ̇ₖ = E[∇log(β/ρ)(Xₖ)(Xₖ − mₖ)ᵀ] + (·)ᵀ (Lambert et al. 2022); with
``geometry="wfr"`` the weights also move by Fisher–Rao, π̇ₖ = −απₖ(E[log(ρ/β)(Xₖ)] − Σⱼπⱼ E[log(ρ/β)(Xⱼ)]).
Expectations use Gauss–Hermite cubature with ``order`` nodes per axis.

The run records the KL (the field's energy, by the same cubature); the report prints it at the start and the
end with the final weights and draws the components' ellipses over β's contours and the KL curve.

    python scenarios/mixture_vi.py
    measureflow run scenarios/mixture_vi.py --set geometry=wasserstein
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import torch

import measureflow
from measureflow import GaussianMixtures, Simulation, scenario
from measureflow.measures import GaussianMixture
from measureflow.mixtures import use_expectation
from measureflow.parameters import Count, NonNegative, Picture, PositiveFloat, Range, Steps

DTYPE = torch.float64
GEOMETRIES = ("wfr", "wasserstein")


def target() -> GaussianMixture:
    return GaussianMixture(torch.tensor([0.5, 0.2, 0.3], dtype=DTYPE),
                           torch.tensor([[-3.0, 0.0], [3.0, 1.0], [0.0, 3.0]], dtype=DTYPE),
                           torch.stack([0.7 * torch.eye(2, dtype=DTYPE), torch.eye(2, dtype=DTYPE),
                                        torch.tensor([[1.0, 0.4], [0.4, 0.6]], dtype=DTYPE)]))


def start() -> GaussianMixtures:
    """Three components between the origin and β's modes, equal weights, unit covariances. (KL is not convex
    in the mixture's parameters: from means on a circle around the origin the flow settles in a local
    minimum where one wide component covers two modes.)"""
    means = torch.tensor([[-2.0, -0.5], [2.0, 0.0], [0.0, 2.0]], dtype=DTYPE)
    return GaussianMixtures(torch.full((3,), 1.0 / 3, dtype=DTYPE), means, torch.eye(2, dtype=DTYPE).expand(3, 2, 2))


@scenario
def mixture_vi(
    geometry: str = "wfr",
    rate: Annotated[float, NonNegative()] = 1.0,
    order: Annotated[int, Range(1, 1024)] = 8,
    t1: PositiveFloat = 8.0,
    steps: Steps = 80,
    every: Count = 1,
    out: str = "runs/mixture_vi.h5",
    picture: Picture = "runs/mixture_vi.png",
) -> Simulation:
    """A Gaussian mixture converging to a three-mode target by KL descent (VI as a gradient flow)."""
    if geometry not in GEOMETRIES:
        raise measureflow.ParameterError(f"geometry must be one of {', '.join(GEOMETRIES)}; received {geometry!r}")
    extra = {"geometry": "wfr", "rate": rate} if geometry == "wfr" else {}
    field = use_expectation(measureflow.field("kl", target=target(), **extra), "gauss_hermite", order=order)
    return Simulation(start(), field, "rk4", 0.0, t1, steps=steps, writers=[out] if out else [],
                      observers=["energy"], observe_every=every)


@mixture_vi.report
def report(result, params):
    kl = np.ravel(result.observables["energy"].values)
    weights = result.state.weights[0].numpy()
    print(f"KL(ρ | β): {kl[0]:.4g} → {kl[-1]:.4g} (non-increasing: {bool(np.all(np.diff(kl) <= 1e-12))}); "
          f"weights {np.round(weights, 4).tolist()} (β: {target().weights.tolist()})")
    if not params["picture"] or not params["out"]:
        return
    from matplotlib.figure import Figure

    from measureflow.plot.ellipses import plot_covariance_ellipses

    fig = Figure(figsize=(11, 4.6), layout="constrained")
    ax, ax_kl = fig.subplots(1, 2, width_ratios=[1.3, 1])
    u, v = np.linspace(-6, 6, 161), np.linspace(-3.5, 6, 141)
    grid = torch.tensor(np.stack(np.meshgrid(u, v), -1), dtype=DTYPE)
    density = target().log_density(grid.reshape(-1, 2)).exp().reshape(grid.shape[:2]).numpy()
    ax.contour(u, v, density, levels=8, colors="0.6", linewidths=0.8)
    with measureflow.open(params["out"]) as traj:
        frames = np.unique(np.linspace(0, len(traj) - 1, 9).astype(int))
        means, covs, times = np.asarray(traj.means[frames])[:, 0], np.asarray(traj.covs[frames])[:, 0], traj.times[frames]
    for k in range(means.shape[1]):
        plot_covariance_ellipses(means[:, k], covs[:, k], ax, times=times, colorbar=k == 0)
        ax.annotate(f"π={weights[k]:.2f}", means[-1, k], fontsize="small", xytext=(4, 4), textcoords="offset points")
    ax.set_aspect("equal")
    ax.set_title(f"components ({params['geometry']}), 2-σ ellipses over time", fontsize="medium")
    ax_kl.semilogy(result.observables["energy"].times, kl)
    ax_kl.set_xlabel("t"), ax_kl.set_title("KL(ρₜ | β) (Gauss–Hermite cubature)", fontsize="medium")
    fig.suptitle("Variational inference by Wasserstein gradient flow on Gaussian mixtures (MATH.md §15.7)",
                 fontsize="medium")
    Path(params["picture"]).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(params["picture"], dpi=100)
    print(f"wrote {params['picture']}")


if __name__ == "__main__":
    mixture_vi.main()
