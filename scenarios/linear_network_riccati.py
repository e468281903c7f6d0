"""The linear two-layer network's Riccati flow: neurons as particles beside the Gaussian closure (MATH.md §11).

Data: K inputs z_k ~ N(0, I_d), outputs y_k = W z_k + noise (d = 3, d' = 2 by default). A neuron is p = (u, v) ∈
R^d × R^{d'}; the network g(z) = M_VU z, M_VU = ∫ v uᵀ dα, is linear, and the risk f = (1/K)Σ|g(z_k) − y_k|² is
descended by ṗ = B(M) p, B = −2[[0, S_zz M_UV − S_zy], [M_VU S_zz − S_yz, 0]] (M = ∫ p pᵀ dα). The run moves n
i.i.d. neurons (written to H5MD with their second moment, risk, invariants and distance to the least-squares
fit); the report integrates the closure Ṁ = BM + MBᵀ from the particles' own empirical mean and covariance, which
it must match to the integrator's error (ṗ = B(M)p is linear in p, so the closure is exact for the empirical
second moment), and draws:

* the entries of M_VU(t) for particles and closure, converging to the least-squares fit S_yz S_zz⁻¹;
* ‖M_VU − S_yz S_zz⁻¹‖ and the excess risk f − min f (log scales);
* the relative distance between the particles' second moment and the closure;
* the drift of the invariants det M and tr M_UU − tr M_VV. RK4 keeps det M (degree d + d') to O(h⁴); it keeps
  tr M_UU − tr M_VV, linear in M, to round-off in a centred closure — here the empirical mean enters it
  quadratically (|m_u|² − |m_v|²), and the particles hold it neuron by neuron (|u|² − |v|²), both to O(h⁴).

    python scenarios/linear_network_riccati.py
    OMP_NUM_THREADS=1 measureflow run scenarios/linear_network_riccati.py --set n=500 --set t1=5
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import torch

import measureflow
from measureflow import Gaussians, Particles, Simulation, scenario
from measureflow.parameters import Count, NonNegative, Picture, Points, PositiveFloat, Range, Size, Steps, Threads
from measureflow.simulation import Observer

DTYPE = torch.float64


def regression_data(inputs: int, outputs: int, points: int, noise: float, seed: int):
    """z_k ~ N(0, I), y_k = W z_k + noise·N(0, I), W with entries N(0, 1) (all drawn from ``seed``)."""
    if points < inputs:
        raise measureflow.ParameterError(
            f"points must be at least inputs = {inputs} (S_zz singular: the least-squares fit is not unique); "
            f"received {points}"
        )
    g = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(points, inputs, generator=g, dtype=DTYPE)
    W = torch.randn(outputs, inputs, generator=g, dtype=DTYPE)
    y = z @ W.T + noise * torch.randn(points, outputs, generator=g, dtype=DTYPE)
    return z, y


def make_field(params: dict):
    z, y = regression_data(params["inputs"], params["outputs"], params["points"], params["noise"], params["seed"])
    return measureflow.field("mean_field_network", inputs=z, outputs=y)


def initial_neurons(n: int, dim: int, scale: float, seed: int) -> Particles:
    """n i.i.d. neurons N(0, scale² I) (not whitened: the closure starts from their own mean and covariance)."""
    if n < 2:
        raise measureflow.ParameterError(f"n (neurons) must be at least 2; received {n}")
    g = torch.Generator().manual_seed(seed)
    return Particles(scale * torch.randn(1, n, dim, generator=g, dtype=DTYPE))


def observers(field) -> list:
    limit = field.least_squares()
    return [
        "energy",
        Observer(lambda state, **_: field.second_moment(state), name="second_moment"),
        Observer(lambda state, **_: field.determinant(state), name="determinant"),
        Observer(lambda state, **_: field.trace_difference(state), name="trace_difference"),
        Observer(lambda state, **_: (field.network_matrix(state) - limit.to(state.dtype)).flatten(1).norm(dim=1),
                 name="least_squares_distance"),
    ]


@scenario
def linear_network_riccati(
    n: Annotated[int, Size(minimum=2)] = 2000,
    inputs: Annotated[int, Range(1, 4096)] = 3,
    outputs: Annotated[int, Range(1, 4096)] = 2,
    points: Points = 40,
    noise: Annotated[float, NonNegative()] = 0.3,
    scale: PositiveFloat = 0.5,
    t1: PositiveFloat = 10.0,
    steps: Steps = 1000,
    every: Count = 10,
    seed: int = 0,
    threads: Threads = 0,
    out: str = "runs/linear_network_riccati.h5",
    picture: Picture = "runs/linear_network_riccati.png",
) -> Simulation:
    """A linear two-layer network's neurons following the Riccati flow to the least-squares fit."""
    if threads > 0:
        # For the rest of the process: n × (d + d') tensors are too small for a second intra-op thread.
        torch.set_num_threads(threads)
    field = make_field({"inputs": inputs, "outputs": outputs, "points": points, "noise": noise, "seed": seed})
    writers = [measureflow.get_registry().writer("h5md", out, every=every)] if out else []
    return Simulation(initial_neurons(n, inputs + outputs, scale, seed), field, "rk4", 0.0, t1, steps=steps,
                      writers=writers, observers=observers(field), observe_every=every, seed=seed)


def closure_run(params: dict):
    """The Gaussian closure from the initial neurons' empirical mean and covariance, same grid."""
    field = make_field(params)
    start = initial_neurons(params["n"], field.dim, params["scale"], params["seed"])
    gauss = Gaussians(start.mean(), start.covariance())
    return Simulation(gauss, field, "rk4", 0.0, params["t1"], steps=params["steps"], observers=observers(field),
                      observe_every=params["every"], progress=False).run()


def summary(result, params, closure=None) -> dict:
    """Particles vs closure, the least-squares limit, the risk above its minimum and the invariants' drift."""
    field = make_field(params)
    closure = closure if closure is not None else closure_run(params)
    obs, ref = result.observables, closure.observables
    M, M_ref = obs["second_moment"].values[:, 0], ref["second_moment"].values[:, 0]
    gap = np.linalg.norm(M - M_ref, axis=(1, 2)) / np.linalg.norm(M_ref, axis=(1, 2))
    det = np.ravel(obs["determinant"].values)
    trace = np.ravel(obs["trace_difference"].values)
    risk = np.ravel(obs["energy"].values)
    return {
        "times": np.asarray(obs["energy"].times),
        "closure_gap": gap,
        "max_closure_gap": float(gap.max()),
        "risk": risk,
        "closure_risk": np.ravel(ref["energy"].values),
        "minimal_risk": float(field.minimal_risk()),
        "least_squares": field.least_squares().numpy(),
        "distance": np.ravel(obs["least_squares_distance"].values),
        "closure_distance": np.ravel(ref["least_squares_distance"].values),
        "final_distance": float(np.ravel(obs["least_squares_distance"].values)[-1]),
        "det_drift": np.abs(det / det[0] - 1),
        "closure_det_drift": np.abs(np.ravel(ref["determinant"].values) / det[0] - 1),
        "trace_drift": np.abs(trace - trace[0]),
        "closure_trace_drift": np.abs(np.ravel(ref["trace_difference"].values) - trace[0]),
        "M_vu": M[:, field.input_dim :, : field.input_dim],
        "closure_M_vu": M_ref[:, field.input_dim :, : field.input_dim],
        "input_dim": field.input_dim,
    }


@linear_network_riccati.report
def report(result, params):
    numbers = summary(result, params)
    print(f"particles vs closure: largest relative gap of the second moment {numbers['max_closure_gap']:.2g}")
    print(f"‖M_VU(t1) − S_yz S_zz⁻¹‖ = {numbers['final_distance']:.2g}; risk {numbers['risk'][0]:.4g} → "
          f"{numbers['risk'][-1]:.6g} (minimum {numbers['minimal_risk']:.6g})")
    print(f"invariants: det M relative drift {numbers['det_drift'].max():.2g}, tr M_UU − tr M_VV drift "
          f"{numbers['trace_drift'].max():.2g} (particles)")
    if params["picture"]:
        start = initial_neurons(params["n"], params["inputs"] + params["outputs"], params["scale"], params["seed"])
        draw(numbers, params, start.x[0].numpy(), result.state.x[0].numpy())
        print(f"wrote {params['picture']}")


def draw(numbers: dict, params: dict, first: np.ndarray, last: np.ndarray) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.figure import Figure

    t = numbers["times"]
    floor = 1e-17  # exact zeros (an invariant kept to the last bit) drawn at the bottom of a log axis
    fig = Figure(figsize=(15, 8.5), layout="constrained")
    axes = fig.subplots(2, 3)

    ax = axes[0, 0]
    M, M_ref, limit = numbers["M_vu"], numbers["closure_M_vu"], numbers["least_squares"]
    mark = max(1, len(t) // 25)
    for k, (i, j) in enumerate(np.ndindex(*limit.shape)):
        c = f"C{k % 10}"
        ax.plot(t, M_ref[:, i, j], c=c, lw=1.2)
        ax.plot(t[::mark], M[::mark, i, j], "o", c=c, mfc="none", ms=4)
        ax.axhline(limit[i, j], c=c, ls=":", lw=0.9)
    ax.legend(handles=[Line2D([], [], c="0.3", label="closure"),
                       Line2D([], [], c="0.3", ls="none", marker="o", mfc="none", label="particles"),
                       Line2D([], [], c="0.3", ls=":", label="S_yz S_zz⁻¹")], fontsize="small", loc="center right")
    ax.set_xlabel("t")
    ax.set_title("entries of M_VU = ∫ v uᵀ dα (the network's matrix)", fontsize="medium")

    ax = axes[0, 1]
    ax.semilogy(t, np.maximum(numbers["closure_distance"], floor), c="C0", label="closure")
    ax.semilogy(t[::mark], np.maximum(numbers["distance"][::mark], floor), "o", c="C0", mfc="none", ms=4,
                label="particles")
    ax.set_xlabel("t")
    ax.set_title("‖M_VU − S_yz S_zz⁻¹‖_F: convergence to least squares", fontsize="medium")
    ax.legend(fontsize="small")

    ax = axes[0, 2]
    excess = np.maximum(numbers["closure_risk"] - numbers["minimal_risk"], floor)
    ax.semilogy(t, excess, c="C1", label="closure")
    ax.semilogy(t[::mark], np.maximum(numbers["risk"][::mark] - numbers["minimal_risk"], floor), "o", c="C1",
                mfc="none", ms=4, label="particles")
    ax.set_xlabel("t")
    ax.set_title(f"excess risk f − min f (min f = {numbers['minimal_risk']:.4g})", fontsize="medium")
    ax.legend(fontsize="small")

    ax = axes[1, 0]
    ax.semilogy(t[1:], np.maximum(numbers["closure_gap"][1:], floor), c="C3")
    ax.set_xlabel("t")
    ax.set_title("particles vs closure: ‖M − M_closure‖_F / ‖M_closure‖_F", fontsize="medium")

    ax = axes[1, 1]
    ax.semilogy(t, np.maximum(numbers["closure_det_drift"], floor), c="C4", label="det M, closure")
    ax.semilogy(t, np.maximum(numbers["det_drift"], floor), c="C4", ls="--", label="det M, particles")
    ax.semilogy(t, np.maximum(numbers["closure_trace_drift"], floor), c="C5", label="tr M_UU − tr M_VV, closure")
    ax.semilogy(t, np.maximum(numbers["trace_drift"], floor), c="C5", ls="--", label="tr M_UU − tr M_VV, particles")
    ax.set_xlabel("t")
    ax.set_title("drift of the invariants (det: relative)", fontsize="medium")
    ax.legend(fontsize="x-small")

    ax = axes[1, 2]
    d = numbers["input_dim"]
    show = slice(0, min(len(first), 400))
    ax.scatter(first[show, 0], first[show, d], s=6, c="0.7", label="t = 0")
    ax.scatter(last[show, 0], last[show, d], s=6, c="C0", label=f"t = {t[-1]:.3g}")
    ax.set_xlabel("u₁")
    ax.set_ylabel("v₁")
    ax.set_title("neurons: (u₁, v₁) at the start and the end", fontsize="medium")
    ax.legend(fontsize="small")
    fig.suptitle(f"Linear two-layer network, n = {params['n']} neurons: particles beside the Riccati closure "
                 "(MATH.md §11)", fontsize="medium")
    Path(params["picture"]).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(params["picture"], dpi=100)


if __name__ == "__main__":
    linear_network_riccati.main()
