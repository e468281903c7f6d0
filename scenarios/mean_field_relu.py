"""Mean-field training of a two-layer ReLU network on a 1-D regression problem (MATH.md §11, activation ReLU).

Data: K points z_k evenly spread on [−1, 1], y_k = sin(ω z_k) + noise, fed to the network with a bias input
z̃ = (z, 1). A neuron is p = (u, v) ∈ R² × R (particle dimension 3); the network is the average
g(z) = Σᵢ wᵢ vᵢ max(0, ⟨uᵢ, z̃⟩) over n neurons (uniform weights 1/n, mean-field scaling), and training is the
Wasserstein gradient flow of the risk f = (1/K)Σ_k |g(z_k) − y_k|²: every neuron moves by −∇δf, integrated by RK4.
The run records the neurons (H5MD) and the risk (the field's energy, non-increasing along the flow), and the
invariant ∫(|u|² − |v|²) (kept neuron by neuron; RK4 keeps it to first order because of the kinks).

The report draws the fitted function at several training times against the data and the noiseless curve, the
risk on a log scale (with the noise variance for scale), and the neurons at the start and the end: in the
(u₁, u₂) plane coloured by v, and as (kink −u₂/u₁, output weight v·|u|), which shows the kinks gathering inside
the data interval.

    python scenarios/mean_field_relu.py
    OMP_NUM_THREADS=1 measureflow run scenarios/mean_field_relu.py --set n=200 --set steps=600
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import torch

import measureflow
from measureflow import On, Particles, Simulation, scenario
from measureflow.parameters import NonNegative, Picture, Points, PositiveFloat, Size, Steps, Threads
from measureflow.simulation import Observer

DTYPE = torch.float64


def regression_data(points: int, frequency: float, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs z̃ = (z, 1) (points, 2) with z evenly spaced on [−1, 1], outputs sin(ω z) + noise (points, 1)."""
    if points < 2:
        raise measureflow.ParameterError(f"points must be at least 2; received {points}")
    z = torch.linspace(-1.0, 1.0, points, dtype=DTYPE)
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.sin(frequency * z) + noise * torch.randn(points, generator=g, dtype=DTYPE)
    return torch.stack([z, torch.ones_like(z)], -1), y[:, None]


def make_field(params: dict):
    inputs, outputs = regression_data(params["points"], params["frequency"], params["noise"], params["seed"])
    return measureflow.field("mean_field_network", inputs=inputs, outputs=outputs, activation="relu")


def initial_neurons(n: int, scale: float, seed: int) -> Particles:
    """u ~ N(0, I₂), v ~ N(0, scale²): n neurons, uniform weights."""
    if n < 1:
        raise measureflow.ParameterError(f"n (neurons) must be at least 1; received {n}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, 3, generator=g, dtype=DTYPE)
    x[..., 2] *= scale
    return Particles(x)


@scenario
def mean_field_relu(
    n: Points = 300,
    points: Annotated[int, Size(minimum=2)] = 40,
    frequency: float = 3.0,
    noise: Annotated[float, NonNegative()] = 0.1,
    scale: PositiveFloat = 1.0,
    t1: PositiveFloat = 150.0,
    steps: Steps = 1500,
    frames: Annotated[int, Size(minimum=2, bytes_each=64)] = 30,
    seed: int = 0,
    threads: Threads = 0,
    out: str = "runs/mean_field_relu.h5",
    picture: Picture = "runs/mean_field_relu.png",
) -> Simulation:
    """A two-layer ReLU network trained as a mean-field particle flow on y = sin(ωz) + noise."""
    if threads > 0:
        # For the rest of the process: the tensors are a few hundred neurons × a few dozen points, too small
        # for a second intra-op thread to pay for its fork-join on a shared machine.
        torch.set_num_threads(threads)
    params = {"points": points, "frequency": frequency, "noise": noise, "seed": seed}
    field = make_field(params)
    writers = [measureflow.get_registry().writer("h5md", out, every=frame_steps(steps, frames))] if out else []
    balance = Observer(lambda state, **_: field.trace_difference(state), name="balance")
    return Simulation(initial_neurons(n, scale, seed), field, "rk4", 0.0, t1, steps=steps, writers=writers,
                      observers=["energy", balance], observe_every=max(1, steps // 300), seed=seed)


def frame_steps(steps: int, frames: int) -> On:
    """The first and last step and about ``frames`` more, evenly spaced in log-time: the network changes most
    in the first few percent of training (the risk falls by a factor 4 there), then slowly."""
    if frames < 2 or frames > steps:
        raise measureflow.ParameterError(f"frames must lie between 2 and steps ({steps}); received frames = {frames}")
    return On({0, steps, *np.unique(np.round(np.geomspace(1, steps, frames)).astype(int)).tolist()})


def summary(result, params) -> dict:
    """Risk at the start and the end, whether it never increased, the drift of ∫(|u|² − |v|²)."""
    risk = np.ravel(result.observables["energy"].values)
    balance = np.ravel(result.observables["balance"].values)
    return {
        "times": np.asarray(result.observables["energy"].times),
        "risk": risk,
        "start_risk": float(risk[0]),
        "final_risk": float(risk[-1]),
        "monotone": bool(np.all(np.diff(risk) <= 1e-12 * np.abs(risk[:-1]))),
        "balance_drift": float(np.abs(balance - balance[0]).max()),
    }


@mean_field_relu.report
def report(result, params):
    numbers = summary(result, params)
    print(f"risk {numbers['start_risk']:.4g} → {numbers['final_risk']:.4g} "
          f"(noise variance {params['noise'] ** 2:.3g}); "
          f"never increased: {numbers['monotone']}; drift of ∫(|u|² − |v|²): {numbers['balance_drift']:.2g}")
    if not params["picture"] or not params["out"]:
        return
    draw(numbers, params)
    print(f"wrote {params['picture']}")


def _frames_to_draw(count: int, shown: int = 6) -> list[int]:
    """``shown`` frames evenly spaced among the written ones (which are log-spaced in time)."""
    return sorted(set(np.round(np.linspace(0, count - 1, shown)).astype(int).tolist()))


def draw(numbers: dict, params: dict) -> None:
    from matplotlib import colormaps
    from matplotlib.colors import Normalize, TwoSlopeNorm
    from matplotlib.figure import Figure

    field = make_field(params)
    z_data = field.data.inputs[:, 0].numpy()
    y_data = field.data.outputs[:, 0].numpy()
    grid = torch.linspace(-1.2, 1.2, 241, dtype=DTYPE)
    grid_inputs = torch.stack([grid, torch.ones_like(grid)], -1)
    with measureflow.open(params["out"]) as traj:
        times = np.asarray(traj.times)
        picks = _frames_to_draw(len(times))
        weights = torch.as_tensor(traj.weights) if traj.weights is not None else None
        snaps = {i: torch.as_tensor(np.asarray(traj.positions[i])) for i in picks}
    fits = {i: field.predict(Particles(snaps[i], weights), grid_inputs)[0, :, 0].numpy() for i in picks}

    fig = Figure(figsize=(13, 9), layout="constrained")
    axes = fig.subplots(2, 2)
    ax = axes[0, 0]
    cmap = colormaps["viridis"]
    tnorm = Normalize(0, len(picks) - 1)
    for j, i in enumerate(picks):
        ax.plot(grid.numpy(), fits[i], color=cmap(tnorm(j)), lw=1.6, label=f"g at t = {times[i]:.3g}")
    ax.plot(grid.numpy(), np.sin(params["frequency"] * grid.numpy()), "k--", lw=1,
            label=f"sin({params['frequency']:g} z)")
    ax.scatter(z_data, y_data, s=14, c="C3", zorder=3, label=f"data (K = {len(z_data)})")
    ax.set_xlabel("z")
    ax.set_ylabel("g(z)")
    ax.set_title("the network over training time", fontsize="medium")
    ax.legend(fontsize="x-small", loc="best")

    ax = axes[0, 1]
    ax.semilogy(numbers["times"], numbers["risk"], c="C0", label="risk f(α_t)")
    ax.axhline(params["noise"] ** 2, color="0.5", ls=":", label=f"noise variance {params['noise'] ** 2:.3g}")
    ax.set_xlabel("t")
    ax.set_ylabel("f = (1/K) Σ |g(z_k) − y_k|²")
    ax.set_title(f"risk: {numbers['start_risk']:.3g} → {numbers['final_risk']:.3g}", fontsize="medium")
    ax.legend(fontsize="small")

    first, last = snaps[picks[0]][0].numpy(), snaps[picks[-1]][0].numpy()
    vmax = max(np.abs(first[:, 2]).max(), np.abs(last[:, 2]).max())
    vnorm = TwoSlopeNorm(0.0, -vmax, vmax)
    ax = axes[1, 0]
    ax.scatter(first[:, 0], first[:, 1], s=10, c="0.75", label="t = 0")
    sc = ax.scatter(last[:, 0], last[:, 1], s=12, c=last[:, 2], cmap="coolwarm", norm=vnorm,
                    label=f"t = {times[picks[-1]]:.3g} (colour: v)")
    fig.colorbar(sc, ax=ax, label="output weight v")
    ax.set_xlabel("u₁ (input weight)")
    ax.set_ylabel("u₂ (bias weight)")
    ax.set_title("neurons (u, v): input weights at the start and the end", fontsize="medium")
    ax.legend(fontsize="small")

    ax = axes[1, 1]
    for x, colour, label in ((first, "0.6", "t = 0"), (last, "C3", f"t = {times[picks[-1]]:.3g}")):
        kink = -x[:, 1] / np.where(x[:, 0] == 0, np.nan, x[:, 0])
        ax.scatter(kink, x[:, 2] * np.hypot(x[:, 0], x[:, 1]), s=10, c=colour, label=label)
    ax.axvspan(-1, 1, color="C2", alpha=0.08, label="data interval")
    bend = np.pi / (2 * params["frequency"])
    for sign in (-1, 1):
        ax.axvline(sign * bend, color="k", ls="--", lw=0.8, label="extrema of sin(ωz)" if sign < 0 else None)
    ax.set_xlim(-4, 4)
    ax.set_xlabel("kink position −u₂/u₁")
    ax.set_ylabel("v · |u| (neuron's output scale)")
    ax.set_title("where the neurons bend, and how strongly", fontsize="medium")
    ax.legend(fontsize="small")
    fig.suptitle(f"Mean-field ReLU network, n = {last.shape[0]} neurons as particles (MATH.md §11)", fontsize="medium")
    Path(params["picture"]).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(params["picture"], dpi=100)


if __name__ == "__main__":
    mean_field_relu.main()
