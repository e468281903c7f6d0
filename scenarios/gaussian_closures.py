"""Gaussian closures of three transport dynamics between two overlapping anisotropic Gaussians.

The book's figure (MATH.md §5, §7, §9): the same source N(m₀, Σ₀) and target β = N(m₁, Σ₁), two
ellipses of axis ratio ``anisotropy`` turned ``angle`` degrees apart, moved three ways.

* **W₂ geodesic** (MATH.md §1.5, :func:`measureflow.couplings.mccann_interpolation`): the law of
  (1 − t)X + tT(X), T the Brenier map: straight mean path, covariances T_tΣ₀T_t, T_t = (1 − t)I + tT.
* **Sinkhorn-style closure** (MATH.md §7, :func:`measureflow.couplings.schrodinger_interpolation`):
  the entropic plan at ε = ``regularization`` joined by Brownian bridges of variance σ² = ε/2 (the
  Schrödinger bridge): Σ_t = (1 − t)²Σ₀ + t²Σ₁ + t(1 − t)(C_σ + C_σᵀ + σ²I), covariances inflated
  mid-way, the mean path still straight.
* **Drifting-style closure** (MATH.md §9): the self-corrected drifting field u = B_ε[β] − B_ε[μ] with
  ε = ``drift`` (the kernel's variance) on the Gaussian state, ṁ = ε(Σ₁ + εI)⁻¹(m₁ − m),
  A = ε[(Σ + εI)⁻¹ − (Σ₁ + εI)⁻¹]: the mean relaxes along the eigen-directions of Σ₁ at different
  rates, so its path is curved, and the state reaches β only as t → ∞.

The simulation the scenario returns is the particle version of the third panel: ``n`` particles of
N(m₀, Σ₀) under the drifting field (the analytic target's kernel average and the particles' own,
through the softmax reduction), recording their moment-matched mean and covariance. The report
integrates the closure on the Gaussian state beside it, draws the three panels (closure ellipses
coloured by time; particles; the moment-matched ellipses of the particles dashed: transported by T
for the geodesic, paired by POT's Sinkhorn plan of two samples and bridged for the middle panel), and
prints how far the particles' moments are from each closure, the mid-way inflation and the bend of
the drifting mean path.

    python scenarios/gaussian_closures.py
    measureflow run scenarios/gaussian_closures.py --set angle=80 --set drift=1.0
"""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np
import torch

import measureflow
from measureflow import Gaussians, Particles, Simulation, scenario
from measureflow.couplings import get as coupling, gaussian_brenier_map, mccann_interpolation, schrodinger_interpolation
from measureflow.measures import Gaussian
from measureflow.parameters import AtLeast, NonNegative, Picture, Points, PositiveFloat, Steps

DTYPE = torch.float64
#: Times at which the panels draw the ellipses, as fractions of each path's horizon.
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: The drifting closure approaches β only as t → ∞ and moves fastest early: its ellipses are drawn at
#: these fractions of the horizon (about 0, ⅓, 1, 2, 4 and 9 time units of the default run).
DRIFT_FRACTIONS = (0.0, 0.012, 0.04, 0.08, 0.15, 0.33, 1.0)


def rotation(degrees: float) -> torch.Tensor:
    a = math.radians(degrees)
    return torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=DTYPE)


def endpoints(anisotropy: float, angle: float, separation: float) -> tuple[torch.Tensor, ...]:
    """(m₀, Σ₀, m₁, Σ₁): determinant-one ellipses of axis ratio ``anisotropy`` (variances a, 1/a),
    Σ₀ along the x axis, Σ₁ turned by ``angle`` degrees; means ``separation`` apart, tilted by 20°
    so the mean displacement is an eigenvector of neither covariance."""
    if not (anisotropy >= 1 and math.isfinite(anisotropy)):
        raise measureflow.ParameterError(f"anisotropy must be a finite number ≥ 1 (the axis ratio); received {anisotropy!r}")
    if not (separation >= 0 and math.isfinite(separation)):
        raise measureflow.ParameterError(f"separation must be finite and ≥ 0; received {separation!r}")
    base = torch.diag(torch.tensor([anisotropy, 1.0 / anisotropy], dtype=DTYPE))
    R = rotation(angle)
    S1 = R @ base @ R.T
    tilt = math.radians(20.0)
    offset = 0.5 * separation * torch.tensor([math.cos(tilt), math.sin(tilt)], dtype=DTYPE)
    return -offset, base.clone(), offset, 0.5 * (S1 + S1.T)


def drifting_field(anisotropy: float, angle: float, separation: float, drift: float):
    _, _, m1, S1 = endpoints(anisotropy, angle, separation)
    return measureflow.field("drifting", target=Gaussian(m1, S1), epsilon=drift)


def drift_horizon(anisotropy: float, drift: float) -> float:
    """Three time constants of the slowest mode of the linearised closure at β: rate
    ε/(λ_max + ε) of the mean (MATH.md §9), λ_max = ``anisotropy``; the state is then within e⁻³."""
    return 3.0 * (anisotropy + drift) / drift


@scenario
def gaussian_closures(
    anisotropy: Annotated[float, AtLeast(1)] = 4.0,
    angle: float = 60.0,
    separation: Annotated[float, NonNegative()] = 2.0,
    regularization: PositiveFloat = 2.0,
    drift: float = 0.5,
    n: Points = 1000,
    steps: Steps = 120,
    seed: int = 0,
    out: str = "runs/gaussian_closures.h5",
    picture: Picture = "runs/gaussian_closures.png",
) -> Simulation:
    """Particles under the drifting field between two anisotropic Gaussians (the third panel)."""
    if not (regularization > 0 and math.isfinite(regularization)):
        raise measureflow.ParameterError(f"regularization must be positive (ε of the entropic plan); received {regularization!r}")
    m0, S0, _, _ = endpoints(anisotropy, angle, separation)
    field = drifting_field(anisotropy, angle, separation, drift)
    start = Particles(Gaussian(m0, S0).sample(n, torch.Generator().manual_seed(seed))[None])
    every = max(1, steps // 40)
    return Simulation(
        start,
        field,
        "rk4",
        t0=0.0,
        t1=drift_horizon(anisotropy, drift),
        steps=steps,
        writers=[measureflow.get_registry().writer("h5md", out, every=every)] if out else [],
        observers=["mean", "covariance"],
        observe_every=every,
        seed=seed,
    )


def drifting_closure(params: dict, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The closure on the Gaussian state (RK4 on the same grid as the particles): means (T, 2), covariances (T, 2, 2)."""
    m0, S0, _, _ = endpoints(params["anisotropy"], params["angle"], params["separation"])
    field = drifting_field(params["anisotropy"], params["angle"], params["separation"], params["drift"])
    result = Simulation(Gaussians(m0[None], S0[None]), field, "rk4", times=[float(t) for t in times],
                        observers=["mean", "covariance"], observe_every=1, progress=False).run()
    return result.observables["mean"].values[:, 0], result.observables["covariance"].values[:, 0]


def bridged_particles(params: dict, t: np.ndarray, n: int) -> np.ndarray:
    """Samples of the Schrödinger bridge from two samples: pairs from POT's entropic plan of the batches,
    then (1 − t)x₀ + t x₁ + σ√(t(1 − t)) z. Shape (len(t), n, 2)."""
    m0, S0, m1, S1 = endpoints(params["anisotropy"], params["angle"], params["separation"])
    g = torch.Generator().manual_seed(params["seed"] + 7)
    x0 = Gaussian(m0, S0).sample(n, g)
    x1 = Gaussian(m1, S1).sample(n, g)
    p0, p1 = coupling("sinkhorn", epsilon=params["regularization"])(x0, x1, generator=g)
    z = torch.randn(n, 2, generator=g, dtype=DTYPE)
    sigma = math.sqrt(0.5 * params["regularization"])
    tt = torch.as_tensor(t, dtype=DTYPE)[:, None, None]
    return ((1 - tt) * p0 + tt * p1 + sigma * torch.sqrt(tt * (1 - tt)) * z).numpy()


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(-2)
    centred = x - mean[..., None, :]
    return mean, np.einsum("...ni,...nj->...ij", centred, centred) / x.shape[-2]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _chord_bend(means: np.ndarray, start: np.ndarray, end: np.ndarray) -> float:
    """Largest distance of the mean path from the straight chord start → end, relative to its length."""
    chord = end - start
    length = float(np.linalg.norm(chord))
    if length == 0:
        return 0.0
    rel = means - start
    cross = rel[:, 0] * chord[1] - rel[:, 1] * chord[0]
    return float(np.abs(cross).max()) / length**2


def numbers(result, params) -> dict:
    m0, S0, m1, S1 = endpoints(params["anisotropy"], params["angle"], params["separation"])
    times = np.asarray(result.observables["mean"].times)
    cm, cS = drifting_closure(params, times)
    pm = result.observables["mean"].values[:, 0]
    pS = result.observables["covariance"].values[:, 0]
    fractions = np.linspace(0, 1, 41)
    _, geo = mccann_interpolation(torch.as_tensor(fractions), m0, S0, m1, S1)
    _, sb = schrodinger_interpolation(torch.as_tensor(fractions), m0, S0, m1, S1, params["regularization"])
    bridged = bridged_particles(params, np.array(FRACTIONS), params["n"])
    bm, bS = _moments(bridged)
    sbm, sbS = schrodinger_interpolation(torch.as_tensor(FRACTIONS, dtype=DTYPE), m0, S0, m1, S1, params["regularization"])
    # ellipse area ∝ √det Σ: how much larger the bridge's ellipse is than the geodesic's at the same t
    area_ratio = torch.sqrt(torch.linalg.det(sb) / torch.linalg.det(geo))
    return {
        "times": times,
        "closure_mean": cm,
        "closure_cov": cS,
        "particle_mean": pm,
        "particle_cov": pS,
        "drift_cov_error": max(_rel(pS[k], cS[k]) for k in range(len(times))),
        "drift_mean_error": float(np.abs(pm - cm).max()),
        "drift_bend": _chord_bend(cm, cm[0], m1.numpy()),
        "drift_final_w2": float(measureflow.observables.bures_w2(torch.as_tensor(cm[-1]), torch.as_tensor(cS[-1]), m1, S1)),
        "sb_inflation": float(area_ratio.max()),
        "bridged": bridged,
        "bridged_mean": bm,
        "bridged_cov": bS,
        "sb_particle_cov_error": max(_rel(bS[k], sbS[k].numpy()) for k in range(len(FRACTIONS))),
        "sb_particle_mean_error": float(np.abs(bm - sbm.numpy()).max()),
    }


@gaussian_closures.report
def report(result, params):
    if not result.ok:
        print(f"the particle run ended early: {result.status}")
        return
    num = numbers(result, params)
    n = params["n"]
    print(f"source N(m₀, Σ₀), target N(m₁, Σ₁): axis ratio {params['anisotropy']:g}, turned {params['angle']:g}°, "
          f"means {params['separation']:g} apart")
    print(f"  W₂ geodesic: straight mean path, Σ_t = T_tΣ₀T_t (closed form)")
    print(f"  Sinkhorn-style (Schrödinger bridge, ε = {params['regularization']:g}): ellipse area up to "
          f"{num['sb_inflation']:.3f}× the geodesic's; {n} bridged sample pairs from POT's plan vs the closed form: "
          f"covariance {100 * num['sb_particle_cov_error']:.1f} %, mean {num['sb_particle_mean_error']:.3f} "
          f"(sampling error ≈ {100 * math.sqrt(2 / n):.1f} %, plus the plan's finite-sample bias)")
    print(f"  drifting-style (ε = {params['drift']:g}, t ∈ [0, {num['times'][-1]:.3g}]): mean path bends "
          f"{100 * num['drift_bend']:.1f} % of its chord; W₂² to β at the end {num['drift_final_w2']:.2e}; "
          f"{n} particles vs the closure: covariance {100 * num['drift_cov_error']:.2f} %, mean "
          f"{num['drift_mean_error']:.2e} (sampling error ≈ {100 * math.sqrt(2 / n):.1f} %)")
    if params["picture"]:
        draw(result, params, num)
        print(f"wrote {params['picture']}")


def draw(result, params, num: dict) -> None:
    from pathlib import Path

    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from measureflow.plot import plot_covariance_ellipses

    m0, S0, m1, S1 = endpoints(params["anisotropy"], params["angle"], params["separation"])
    fractions = torch.as_tensor(FRACTIONS, dtype=DTYPE)
    geo_m, geo_S = mccann_interpolation(fractions, m0, S0, m1, S1)
    sb_m, sb_S = schrodinger_interpolation(fractions, m0, S0, m1, S1, params["regularization"])
    times = num["times"]
    picks = np.unique([int(np.argmin(np.abs(times - f * times[-1]))) for f in DRIFT_FRACTIONS])
    show = min(150, params["n"])
    colour = colormaps["viridis"]

    # Particles for the first two panels: the transported sample (exact Brenier map) and bridged pairs.
    g = torch.Generator().manual_seed(params["seed"])
    x = Gaussian(m0, S0).sample(show, g)
    T, shift = gaussian_brenier_map(m0, S0, m1, S1)
    moved = x @ T.T + shift
    bridged, bm, bS = num["bridged"], num["bridged_mean"], num["bridged_cov"]

    fig = Figure(figsize=(16, 5.6), layout="constrained")
    axes = [fig.add_subplot(1, 3, k + 1) for k in range(3)]
    span = np.concatenate([geo_m.numpy(), sb_m.numpy(), num["closure_mean"]])
    reach = 2.2 * math.sqrt(params["anisotropy"])
    lo, hi = span.min(0) - reach, span.max(0) + reach

    def frame(ax, title):
        plot_covariance_ellipses(m0.numpy(), S0.numpy(), ax, color="0.55", mean_path=False, linewidth=1.0)
        plot_covariance_ellipses(m1.numpy(), S1.numpy(), ax, color="black", mean_path=False, linewidth=1.4)
        ax.set_title(title, fontsize="medium")

    ax = axes[0]
    frame(ax, "exact W₂ geodesic (McCann)\nt = 0, ¼, ½, ¾, 1")
    for k, f in enumerate(FRACTIONS):
        pts = (1 - f) * x + f * moved
        ax.scatter(pts[:, 0], pts[:, 1], s=2, color=colour(f), alpha=0.5)
    plot_covariance_ellipses(geo_m.numpy(), geo_S.numpy(), ax, times=np.array(FRACTIONS), colorbar=False)

    ax = axes[1]
    frame(ax, f"Sinkhorn-style closure (Schrödinger bridge, ε = {params['regularization']:g})\nt = 0, ¼, ½, ¾, 1")
    for k in range(len(FRACTIONS)):
        ax.scatter(bridged[k, :show, 0], bridged[k, :show, 1], s=2, color=colour(FRACTIONS[k]), alpha=0.5)
    plot_covariance_ellipses(sb_m.numpy(), sb_S.numpy(), ax, times=np.array(FRACTIONS), colorbar=False)
    for k in range(len(FRACTIONS)):
        plot_covariance_ellipses(bm[k], bS[k], ax, color="0.2", mean_path=False, linewidth=0.8, alpha=0.7)
    for line in ax.collections[-len(FRACTIONS):]:
        line.set_linestyle("--")
    _, geo_mid = mccann_interpolation(0.5, m0, S0, m1, S1)
    plot_covariance_ellipses(0.5 * (m0 + m1).numpy(), geo_mid.numpy(), ax, color="red", mean_path=False, linewidth=0.9)
    ax.collections[-1].set_linestyle(":")

    ax = axes[2]
    # colours by rank: the picked times are far from evenly spaced
    rank = np.linspace(0.0, 1.0, len(picks))
    shown = ", ".join(f"{times[i]:.2g}" for i in picks)
    frame(ax, f"drifting-style closure (ε = {params['drift']:g})\nt = {shown}")
    reader = measureflow.io.open_trajectory(params["out"]) if params["out"] else None
    if reader is not None:
        with reader as traj:
            frames = np.asarray(traj.times)
            for k, i in enumerate(picks):
                nearest = int(np.argmin(np.abs(frames - times[i])))
                p = traj.positions[nearest][0, :show]
                ax.scatter(p[:, 0], p[:, 1], s=2, color=colour(rank[k]), alpha=0.5)
    ax.plot([num["closure_mean"][0, 0], m1[0]], [num["closure_mean"][0, 1], m1[1]], color="0.5", lw=0.8, ls=":")
    plot_covariance_ellipses(num["closure_mean"][picks], num["closure_cov"][picks], ax, times=rank, colorbar=False)
    ax.plot(num["closure_mean"][:, 0], num["closure_mean"][:, 1], color="black", lw=1.2)
    for i in picks:
        plot_covariance_ellipses(num["particle_mean"][i], num["particle_cov"][i], ax, color="0.2", mean_path=False,
                                 linewidth=0.8, alpha=0.7)
        ax.collections[-1].set_linestyle("--")

    for ax in axes:
        ax.set_aspect("equal", adjustable="box")
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
    handles = [
        Line2D([], [], color="0.55", label="source N(m₀, Σ₀), 2σ"),
        Line2D([], [], color="black", label="target N(m₁, Σ₁), 2σ"),
        Line2D([], [], color=colormaps["viridis"](0.5), label="closure over time (colour), with particles"),
        Line2D([], [], color="0.2", ls="--", label="moment-matched ellipse of the particles"),
        Line2D([], [], color="red", ls=":", label="geodesic at t = ½ (for comparison)"),
        Line2D([], [], color="0.5", ls=":", label="straight chord m₀ → m₁"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=6, fontsize="small")
    fig.suptitle("Gaussian closures of transport dynamics between two anisotropic Gaussians")
    Path(params["picture"]).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(params["picture"], dpi=120)


if __name__ == "__main__":
    gaussian_closures.main()
