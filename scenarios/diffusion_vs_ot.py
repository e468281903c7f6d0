"""Diffusion sampling paths against optimal-transport rays with the same endpoints (MATH.md §1.2, §1.5, §2; [B]).

Noise z ~ N(0, σ²I) (n particles) is carried to a small data set by the exact reverse probability flow
of a noising schedule, integrated backwards from the noise end to t_min:

* ``schedule=cosine`` (default): field ``flow_matching`` (posterior-mean form (1.3)) with
  aₜ = cos(πt/2), bₜ = sin(πt/2) — the OU / variance-preserving diffusion after the time change
  τ = −log cos(πt/2), i.e. the same paths as the OU probability flow (MATH.md §1.3, §2), on the clock
  t ∈ [t_min, 1] of unit length;
* ``schedule=vp``: the OU probability flow itself, field ``ou_bridge`` (forward direction,
  v_τ(x) = −x − σ²∇log ρ_τ(x), MATH.md §2) integrated backwards in its own time τ ∈ [t_min, 12];
* ``schedule=linear``: ``flow_matching`` from Gaussian noise, Zₜ = (1 − t)X + tY.

The data (``data``) are either ``atoms``: m Diracs drawn once with the seed (uniform weights), or
``gaussian``: N(m₀, Σ₀). Atoms make the field singular at the data end, so the run steps through the
geometric grid tₖ = t_max (t_min/t_max)^{k/steps} (constant Δt/t, MATH.md §1.3:
``FlowMatchingField.generation_times``, ``OUBridge.time_grid`` for vp); the smooth field of Gaussian
data is stepped uniformly in t (still geometrically in τ for vp). The H5MD times are the schedule's
own t (τ for vp).

The straight rays join the same endpoints optimally: POT ``emd`` between the starting noise {zₖ} and
the generated points {xₖ} gives a permutation σ, and the rays are (1 − u)zₖ + u x_{σ(k)}, u ∈ [0, 1].
The report prints, for both families of paths (:func:`measureflow.diagnostics.path_transport_cost`,
in the schedule's own time t, i.e. τ for vp):

* the coupling cost E|x − z|² of the pairs they join (for the rays W₂² of the two point clouds);
* the kinetic action E∫|ẋ|² dt and the straightness (cost / (duration · action); 1 iff straight at
  constant speed — the rays are, to rounding);
* the share of particles that OT pairs as the flow does (atoms: sends to the same atom).

For Gaussian data the flow's map is the Brenier map (the noise covariance σ²I commutes with Σ₀,
MATH.md §1.5), so its pairing is optimal (share 1, cost = W₂²) although its paths are not straight; for
atoms the flow's pairing costs more than W₂².

    python scenarios/diffusion_vs_ot.py
    measureflow run scenarios/diffusion_vs_ot.py --set data=gaussian --set schedule=linear
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch

import measureflow
from measureflow import Particles, Simulation, scenario
from measureflow.diagnostics import path_transport_cost
from measureflow.measures import Gaussian, GaussianMixture
from measureflow.parameters import Count, OneOf, Picture, Points, Positive, PositiveFloat, Size, Steps

NOISE_END = {"linear": 1.0, "cosine": 1.0, "vp": 12.0}
DATA = ("atoms", "gaussian")
GAUSSIAN_MEAN = (1.0, 0.5)
GAUSSIAN_COV = ((1.6, 0.9), (0.9, 0.9))
TITLES = {"cosine": "OU paths on the cosine clock", "vp": "OU in its own time τ", "linear": "linear schedule"}
#: Paths drawn per panel.
FIGURE_PATHS = 120


def reverse_flow(schedule: str, law, sigma: float, t_min: float, steps: int):
    """(field, time grid from the noise end down to t_min) of the reverse probability flow to ``law``."""
    if schedule not in NOISE_END:
        raise measureflow.ParameterError(f"schedule must be one of {sorted(NOISE_END)}; received {schedule!r}")
    t_max = NOISE_END[schedule]
    if not 0 < t_min < t_max:
        raise measureflow.ParameterError(
            f"t_min must lie in (0, {t_max:g}) for schedule {schedule!r}; received {t_min!r}"
        )
    if schedule == "vp":
        # The OU flow in its own time: the forward field, run from τ_max down to τ_min.
        field = measureflow.field("ou_bridge", data=law, sigma=sigma, tau_min=t_min, tau_max=t_max)
        return field, field.time_grid(steps).flip(0).tolist()
    field = measureflow.field("flow_matching", data=law, schedule=schedule, sigma=sigma, t_min=t_min, t_max=t_max)
    return field, field.generation_times(steps)


def data_law(data: str, m: int, seed: int, dtype=torch.float64):
    """The data: m atoms spread over the plane (drawn with ``seed``), or a correlated Gaussian."""
    if data == "atoms":
        if m < 1:
            raise measureflow.ParameterError(f"m must be a positive number of atoms; received {m}")
        g = torch.Generator().manual_seed(10_000 + seed)
        return GaussianMixture.diracs(1.6 * torch.randn(m, 2, generator=g, dtype=dtype))
    if data == "gaussian":
        return Gaussian(torch.tensor(GAUSSIAN_MEAN, dtype=dtype), torch.tensor(GAUSSIAN_COV, dtype=dtype))
    raise measureflow.ParameterError(f"data must be one of {DATA}; received {data!r}")


@scenario
def diffusion_vs_ot(
    schedule: Annotated[str, OneOf(*sorted(NOISE_END))] = "cosine",
    data: Annotated[str, OneOf(*DATA)] = "atoms",
    m: Points = 6,
    n: Annotated[int, Size(minimum=2)] = 400,
    sigma: Annotated[float, Positive(maximum=1e6)] = 1.0,
    t_min: PositiveFloat = 1e-3,
    steps: Steps = 200,
    every: Count = 2,
    seed: int = 0,
    out: str = "runs/diffusion_vs_ot.h5",
    picture: Picture = "runs/diffusion_vs_ot.png",
) -> Simulation:
    """Reverse probability-flow paths from noise to data against straight OT rays between the same ends."""
    if n < 2:
        raise measureflow.ParameterError(f"n must be at least 2 particles; received {n}")
    field, times = reverse_flow(schedule, data_law(data, m, seed), sigma, t_min, steps)
    g = torch.Generator().manual_seed(seed)
    noise = sigma * torch.randn(1, n, 2, generator=g, dtype=torch.float64)
    writers = [measureflow.get_registry().writer("h5md", out, every=every)] if out else []
    return Simulation(Particles(noise), field, "rk4", times=times, writers=writers, seed=seed)


# -- the numbers ------------------------------------------------------------------------------------


def ot_rays(start: torch.Tensor, end: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rays (frames, n, 2) on u ∈ [0, 1], u, σ): straight segments zₖ → x_{σ(k)} for the optimal
    permutation σ of the squared distance between the two clouds (POT ``emd``)."""
    plan = measureflow.couplings.get("exact_ot").plan(start, end)
    sigma = plan.argmax(dim=1)
    u = torch.linspace(0.0, 1.0, frames, dtype=start.dtype)
    rays = (1 - u)[:, None, None] * start + u[:, None, None] * end[sigma]
    return rays, u, sigma


def nearest_atom(x: torch.Tensor, law, schedule: str, t_min: float) -> torch.Tensor | None:
    """Index of the nearest scaled atom a_{t_min}cⱼ of each point (None for Gaussian data)."""
    if not isinstance(law, GaussianMixture):
        return None
    a = float(measureflow.schedules.get(schedule).coefficients(t_min)[0])
    return torch.cdist(x, a * law.means).argmin(dim=1)


def compare(frames: torch.Tensor, times: torch.Tensor, law, schedule: str, t_min: float) -> dict:
    """Path statistics of the flow (frames (T, n, 2) at schedule times ``times``) and of the OT rays."""
    import ot

    start, end = frames[0], frames[-1]
    flow = path_transport_cost(frames, times)
    rays, u, sigma = ot_rays(start, end, frames.shape[0])
    straight = path_transport_cost(rays, u)
    cost = measureflow.couplings.squared_distances(start, end).numpy()
    n = start.shape[0]
    w2 = float(ot.emd2(np.full(n, 1.0 / n), np.full(n, 1.0 / n), cost))
    atom = nearest_atom(end, law, schedule, t_min)
    return {
        "flow": flow,
        "rays": straight,
        "ray_frames": rays,
        "w2": w2,
        "atom": atom,
        "ray_atom": None if atom is None else atom[sigma],
        # Atoms: points that reach one atom lie within ~b_{t_min}σ of each other, so which of them OT
        # picks is immaterial; the pairing is compared atom by atom. Gaussian data: point by point.
        "agreement": float(((sigma == torch.arange(n)) if atom is None else (atom[sigma] == atom)).double().mean()),
    }


@diffusion_vs_ot.report
def report(result, params):
    """Print the path statistics of the flow (from its file) and of the OT rays; draw both."""
    schedule = params["schedule"]
    if not params["out"]:
        print("no trajectory written (out is empty); nothing to compare")
        return
    with measureflow.open(params["out"]) as traj:
        frames = torch.as_tensor(np.asarray(traj.positions[:]))[:, 0]
        times = torch.as_tensor(np.asarray(traj.times, dtype=np.float64))
    law = data_law(params["data"], params["m"], params["seed"])
    k = compare(frames, times, law, schedule, params["t_min"])
    flow, rays = k["flow"], k["rays"]
    clock = "τ" if schedule == "vp" else "t"
    print(f"{params['data']} data, {frames.shape[1]} particles, {schedule} schedule, {clock} from "
          f"{float(times[0]):g} to {float(times[-1]):g} ({frames.shape[0]} frames)")
    print(f"  probability flow: cost = {float(flow.endpoint):.8f}, kinetic = {float(flow.kinetic):.8f}, "
          f"duration = {float(flow.duration):.6f}, straightness = {float(flow.straightness):.8f}")
    print(f"  OT rays:          cost = {float(rays.endpoint):.8f}, kinetic = {float(rays.kinetic):.8f}, "
          f"duration = {float(rays.duration):.6f}, straightness = {float(rays.straightness):.12f}")
    what = "sent by OT to the atom the flow sends them to" if k["atom"] is not None else \
        "whose OT partner is the flow's own endpoint"
    print(f"  W2^2(noise, generated) by POT emd2 = {k['w2']:.8f}; "
          f"flow cost / W2^2 = {float(flow.endpoint) / k['w2']:.8f}")
    print(f"  share of particles {what} = {k['agreement']:.4f}")
    if params["picture"]:
        draw(frames, k, law, params, clock).savefig(params["picture"], dpi=110)
        print(f"wrote {params['picture']}")


# -- the picture ------------------------------------------------------------------------------------


def draw(frames: torch.Tensor, k: dict, law, params, clock: str):
    """Two panels, flow paths and OT rays; with atoms, paths coloured by the atom they reach."""
    from matplotlib import colormaps
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 6.4), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    n = frames.shape[1]
    shown = np.random.default_rng(0).choice(n, size=min(n, FIGURE_PATHS), replace=False)
    flow, rays = k["flow"], k["rays"]
    palette = colormaps["tab10"]
    panels = (
        (axes[0], frames.numpy(), k["atom"], f"reverse probability flow, {TITLES[params['schedule']]}",
         f"cost {float(flow.endpoint):.3f} · action {float(flow.kinetic):.3f} ({clock} ∈ [{params['t_min']:g}, "
         f"{NOISE_END[params['schedule']]:g}]) · straightness {float(flow.straightness):.3f}"),
        (axes[1], k["ray_frames"].numpy(), k["ray_atom"], "OT rays between the same endpoints (POT emd)",
         f"cost W₂² = {k['w2']:.3f} · action {float(rays.kinetic):.3f} (u ∈ [0, 1]) · "
         f"straightness {float(rays.straightness):.3f}"),
    )
    for ax, paths, atom, title, numbers in panels:
        # Atoms: each noise point and its path take the colour of the atom it is carried to.
        colour = ["0.45"] * n if atom is None else [palette(int(j) % 10) for j in atom]
        ax.add_collection(LineCollection(np.transpose(paths[:, shown], (1, 0, 2)), colors=[colour[i] for i in shown],
                                         linewidths=0.6, alpha=0.75, zorder=1))
        ax.scatter(paths[0, :, 0], paths[0, :, 1], s=10, lw=0, alpha=0.85, zorder=2,
                   color="tab:red" if atom is None else colour, label=f"noise N(0, σ²I), n = {n}")
        if isinstance(law, GaussianMixture):
            ax.scatter(law.means[:, 0], law.means[:, 1], marker="*", s=260, color="black", zorder=4,
                       label=f"{law.means.shape[0]} data atoms")
        else:
            ax.scatter(paths[-1, :, 0], paths[-1, :, 1], s=10, color="tab:blue", lw=0, alpha=0.85, zorder=3,
                       label="generated ~ N(m₀, Σ₀)")
        ax.set_title(f"{title}\n{numbers}", fontsize="medium")
        ax.set_aspect("equal")
        ax.set_xlabel("x₁")
    axes[0].set_ylabel("x₂")
    axes[0].legend(loc="lower left", fontsize="small", markerscale=1.2, framealpha=0.85)
    what = "sent to the same atom" if k["atom"] is not None else "paired identically"
    fig.suptitle(f"Noise → {params['data']} data: diffusion paths vs straight OT rays; flow cost / W₂² = "
                 f"{float(flow.endpoint) / k['w2']:.4f}, {100 * k['agreement']:.1f} % of particles {what}",
                 fontsize="large")
    return fig


if __name__ == "__main__":
    diffusion_vs_ot.main()
