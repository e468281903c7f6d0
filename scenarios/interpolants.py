"""Interpolation between two empirical measures under three couplings (MATH.md §1.1, [B] Fig. "interpolants").

Source α = (1/n) Σᵢ δ_{xᵢ}, a Gaussian blob; target β = (1/m) Σⱼ δ_{yⱼ}, points on a ring; both drawn
with the run's seed. A coupling π of (α, β) and a schedule (aₜ, bₜ) give the interpolant

    αₜ = Σᵢⱼ πᵢⱼ δ_{aₜxᵢ + bₜyⱼ},   t ∈ [0, 1],

whose flow-matching field exists only on the atoms: each particle carries its pair (i, j) and moves
with a'ₜxᵢ + b'ₜyⱼ (field ``pair_interpolation``, MATH.md §1.1). The three couplings:

* ``product`` — π = α ⊗ β, all n·m pairs with the linear schedule: straight rays that cross;
* ``ot`` — the exact optimal plan of the squared distance (POT ``ot.emd`` through
  ``measureflow.couplings``) with the linear schedule: McCann's displacement interpolation, straight
  non-crossing rays of the lowest cost W₂²(α, β);
* ``curved`` — the same optimal pairs with a curved scalar bridge (``bridge``, default the cosine
  schedule aₜ = cos(πt/2), bₜ = sin(πt/2), MATH.md §1.3). This is the book's "curved bridge": same
  endpoints and same pairs as ``ot``, different path geometry. The cosine bridge is not
  translation-equivariant (its paths bulge away from the origin), which is why both clouds sit
  off-centre.

The run integrates the chosen coupling (``coupling``) with RK4 and writes an H5MD trajectory. The
report prints, for every coupling (the two that were not run are evaluated from their closed form on
the same time grid):

* the coupling cost E|Z₁ − Z₀|² = Σ πᵢⱼ|xᵢ − yⱼ|² (W₂²(α, β) by POT ``emd2`` for ``ot``),
* the kinetic action E∫₀¹|Żₜ|² dt and the straightness (cost / action; 1 iff every path is a straight
  segment at constant speed: :func:`measureflow.diagnostics.path_transport_cost`),
* W₂²(α_½, α₁) / W₂²(α₀, α₁), which is exactly 1/4 along a W₂ geodesic (McCann),

and draws one panel per coupling with the particles at t = 0, ¼, ½, ¾, 1.

    python scenarios/interpolants.py
    measureflow run scenarios/interpolants.py --set coupling=curved --set bridge=overshoot
"""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np
import torch

import measureflow
from measureflow import Simulation, scenario
from measureflow.diagnostics import path_transport_cost
from measureflow.parameters import Count, OneOf, Picture, Size, Steps
from measureflow_plugins.flow_matching import PairedEndpoints, pair_particles

COUPLINGS = ("product", "ot", "curved")
#: Times at which the figure shows the particles.
SNAPSHOTS = (0.0, 0.25, 0.5, 0.75, 1.0)
SOURCE_CENTRE = (-2.2, 2.4)
SOURCE_SPREAD = 0.45
RING_CENTRE = (2.2, 2.4)
RING_RADIUS = 1.1


def endpoints(n: int, m: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (n, 2), y (m, 2)): a Gaussian blob and a noisy ring, drawn with ``seed``."""
    if n < 2 or m < 2:
        raise measureflow.ParameterError(f"need n >= 2 and m >= 2 points; received n = {n}, m = {m}")
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor(SOURCE_CENTRE, dtype=dtype) + SOURCE_SPREAD * torch.randn(n, 2, generator=g, dtype=dtype)
    angle = 2 * math.pi * torch.rand(m, generator=g, dtype=dtype)
    radius = RING_RADIUS + 0.08 * torch.randn(m, generator=g, dtype=dtype)
    y = torch.tensor(RING_CENTRE, dtype=dtype) + radius[:, None] * torch.stack([angle.cos(), angle.sin()], -1)
    return x, y


def schedule_of(coupling: str, bridge: str) -> str:
    """The schedule of a coupling's interpolant: the curved bridge for ``curved``, else linear."""
    return bridge if coupling == "curved" else "linear"


def make_pairs(coupling: str, x: torch.Tensor, y: torch.Tensor) -> PairedEndpoints:
    """The pairs (xᵢ, yⱼ) with weights πᵢⱼ of the coupling (MATH.md §1.1)."""
    if coupling == "product":
        return pair_particles(x, None, y, None)
    if coupling in ("ot", "curved"):
        plan = measureflow.couplings.get("exact_ot").plan(x, y)
        return pair_particles(x, None, y, None, coupling=plan)
    raise measureflow.ParameterError(f"coupling must be one of {COUPLINGS}; received {coupling!r}")


@scenario
def interpolants(
    coupling: Annotated[str, OneOf(*COUPLINGS)] = "ot",
    bridge: str = "cosine",
    n: Annotated[int, Size(minimum=2, bytes_each=8, times=("m",))] = 64,
    m: Annotated[int, Size(minimum=2)] = 64,
    steps: Steps = 100,
    every: Count = 5,
    seed: int = 0,
    out: str = "runs/interpolants.h5",
    picture: Picture = "runs/interpolants.png",
) -> Simulation:
    """Interpolants between two point clouds under the product, optimal and curved couplings."""
    if bridge not in ("cosine", "overshoot"):
        raise measureflow.ParameterError(
            f"bridge must be 'cosine' or 'overshoot' (a curved schedule); received {bridge!r}"
        )
    x, y = endpoints(n, m, seed)
    pairs = make_pairs(coupling, x, y)
    field = measureflow.field("pair_interpolation", pairs=pairs, schedule=schedule_of(coupling, bridge))
    writers = [measureflow.get_registry().writer("h5md", out, every=every)] if out else []
    return Simulation(pairs.interpolate(0.0), field, "rk4", 0.0, 1.0, steps=steps, writers=writers, seed=seed)


# -- the numbers ------------------------------------------------------------------------------------


def interpolant_frames(pairs: PairedEndpoints, schedule: str, times) -> torch.Tensor:
    """(T, P, 2): the particles aₜxᵢ + bₜyⱼ at the given times (the closed form of the run)."""
    return torch.stack([pairs.interpolate(float(t), schedule).x[0] for t in times])


def emd2(xa, wa, xb, wb) -> float:
    """W₂²(Σ wa δ_xa, Σ wb δ_xb), unhalved squared-Euclidean cost (POT ``ot.emd2``)."""
    import ot

    cost = measureflow.couplings.squared_distances(xa, xb).numpy()
    return float(ot.emd2(wa.double().numpy(), wb.double().numpy(), cost, numItermax=10_000_000))


def coupling_numbers(pairs: PairedEndpoints, schedule: str, frames: torch.Tensor, times, y: torch.Tensor) -> dict:
    """Coupling cost, kinetic action, straightness and the geodesic ratio of one interpolant."""
    w = pairs.weights
    path = path_transport_cost(frames, torch.as_tensor(np.asarray(times, dtype=np.float64)), w)
    half = pairs.interpolate(0.5, schedule).x[0]
    uniform_y = torch.full((y.shape[0],), 1.0 / y.shape[0], dtype=y.dtype)
    start = pairs.interpolate(0.0, schedule).x[0]
    whole = emd2(start, w, y, uniform_y)
    return {
        "pairs": pairs.size,
        "cost": float((w * ((pairs.x1 - pairs.x0) ** 2).sum(-1)).sum()),
        "kinetic": float(path.kinetic),
        "straightness": float(path.straightness),
        "geodesic_ratio": emd2(half, w, y, uniform_y) / whole,
    }


@interpolants.report
def report(result, params):
    """Print W₂²(α, β) and each coupling's numbers (the run's from its file), then draw the panels."""
    x, y = endpoints(params["n"], params["m"], params["seed"])
    ran = params["coupling"]
    w2 = emd2(x, torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=x.dtype), y,
              torch.full((y.shape[0],), 1.0 / y.shape[0], dtype=y.dtype))
    print(f"W2^2(alpha, beta) by POT emd2 = {w2:.10f} (the last column is 1/4 along a W2 geodesic: McCann)")
    times = np.linspace(0.0, 1.0, params["steps"] // params["every"] + 1)
    traj = None
    if params["out"]:
        traj = measureflow.open(params["out"])
        times = np.asarray(traj.times, dtype=np.float64)
    numbers, frames_of = {}, {}
    try:
        for coupling in COUPLINGS:
            pairs = make_pairs(coupling, x, y)
            schedule = schedule_of(coupling, params["bridge"])
            if coupling == ran and traj is not None:
                frames = torch.as_tensor(np.asarray(traj.positions[:]))[:, 0]
                source = "run"
            else:
                frames = interpolant_frames(pairs, schedule, times)
                source = "closed form"
            numbers[coupling] = coupling_numbers(pairs, schedule, frames, times, y)
            frames_of[coupling] = (pairs, schedule, frames)
            k = numbers[coupling]
            print(
                f"{coupling:>7} ({schedule}, {source}): pairs = {k['pairs']}, cost = {k['cost']:.10f}, "
                f"kinetic = {k['kinetic']:.10f}, straightness = {k['straightness']:.10f}, "
                f"W2^2(a_1/2, a_1)/W2^2(a_0, a_1) = {k['geodesic_ratio']:.10f}"
            )
    finally:
        if traj is not None:
            traj.close()
    final = result.state.x[0]
    pairs, schedule, _ = frames_of[ran]
    print(f"run ({ran}): max |Z_1 - y_pair| = {float((final - pairs.x1).abs().max()):.3e} "
          f"(RK4 on the label velocities a'x + b'y)")
    if params["picture"]:
        draw(frames_of, numbers, times, x, y, params, w2).savefig(params["picture"], dpi=110)
        print(f"wrote {params['picture']}")


# -- the picture ------------------------------------------------------------------------------------


def draw(frames_of: dict, numbers: dict, times, x, y, params, w2):
    """One panel per coupling: particles at the snapshot times, some whole paths, midpoint velocities."""
    from matplotlib import colormaps
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    cmap = colormaps["viridis"]
    every_point = torch.cat([f.reshape(-1, 2) for _, _, f in frames_of.values()]).numpy()
    lo, hi = every_point.min(0), every_point.max(0)
    pad = 0.06 * (hi - lo).max()
    lo, hi = lo - pad, hi + pad
    # Panels at equal aspect: the figure's height follows the data's.
    height = 5.0 * (hi[1] - lo[1]) / (hi[0] - lo[0]) + 1.6
    fig = Figure(figsize=(15, height), layout="constrained")
    axes = fig.subplots(1, len(COUPLINGS), sharex=True, sharey=True)
    rng = np.random.default_rng(0)
    titles = {"product": "product coupling α⊗β", "ot": "optimal coupling (McCann)",
              "curved": f"optimal pairs, {params['bridge']} bridge"}
    for ax, coupling in zip(axes, COUPLINGS):
        pairs, schedule, frames = frames_of[coupling]
        P = pairs.size
        # A few whole paths, drawn from π, show the geometry without hiding the clouds.
        shown = rng.choice(P, size=min(P, 70), replace=False, p=(pairs.weights / pairs.weights.sum()).numpy())
        dense = np.linspace(0.0, 1.0, 81)
        subset = PairedEndpoints(pairs.x0[shown], pairs.x1[shown], pairs.weights[shown] / pairs.weights[shown].sum(),
                                 pairs.index0[shown], pairs.index1[shown])
        paths = interpolant_frames(subset, schedule, dense)
        ax.add_collection(LineCollection(np.transpose(paths.numpy(), (1, 0, 2)), colors="0.55", linewidths=0.5,
                                         alpha=0.6, zorder=1))
        size = 6 if P > 1000 else 14
        for t in SNAPSHOTS:
            z = pairs.interpolate(t, schedule).x[0].numpy()
            ax.scatter(z[:, 0], z[:, 1], s=size, color=cmap(t), alpha=0.55 if P > 1000 else 0.9,
                       lw=0, zorder=2, label=f"t = {t:g}")
        # Midpoint velocities a'xᵢ + b'yⱼ (the book's gray arrows).
        mid = pairs.interpolate(0.5, schedule).x[0].numpy()[shown[:25]]
        _, da, _, db = (float(c) for c in measureflow.schedules.get(schedule).coefficients(0.5))
        v = (da * pairs.x0 + db * pairs.x1).numpy()[shown[:25]]
        ax.quiver(mid[:, 0], mid[:, 1], v[:, 0], v[:, 1], color="0.25", angles="xy", scale_units="xy",
                  scale=6, width=0.004, zorder=3)
        ax.scatter(x[:, 0], x[:, 1], s=28, facecolor="none", edgecolor="tab:red", lw=1.0, zorder=4)
        ax.scatter(y[:, 0], y[:, 1], s=28, facecolor="none", edgecolor="tab:blue", lw=1.0, zorder=4)
        k = numbers[coupling]
        ax.set_title(f"{titles[coupling]}\n{P} pairs · cost {k['cost']:.3f} · action {k['kinetic']:.3f} · "
                     f"straightness {k['straightness']:.3f}", fontsize="medium")
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_aspect("equal")
        ax.set_xlabel("x₁")
    axes[0].set_ylabel("x₂")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(SNAPSHOTS), fontsize="small", markerscale=2.5,
               frameon=False)
    fig.suptitle(f"Interpolants αₜ = Σ πᵢⱼ δ(aₜxᵢ + bₜyⱼ) between {x.shape[0]} source points (red) and "
                 f"{y.shape[0]} ring points (blue); W₂²(α, β) = {w2:.3f}", fontsize="large")
    return fig


if __name__ == "__main__":
    interpolants.main()
