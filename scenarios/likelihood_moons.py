"""Bits per dimension of held-out two-moons points under the learned field of ``learned_moons`` and
under the exact field between the same endpoints (MATH.md §15.1).

``learned_moons`` regresses a network v_θ(x, t) that carries eight Gaussians (t = 0) to two moons
(t = 1). A flow is a density model: held-out points x drawn from the same two-moons process are
carried backwards from t = 1 to the source at t = 0 with the log-density channel
d log ρ/dt = −∇·v, and

    log p(x) = log p_source(x₀) − (log ρ₀(x₀) − log ρ₁(x))_channel,      bits/dim = −log₂ p(x) / 2.

The run is that backward integration of the learned field (an H5MD file with the points and their
``log_density`` channel per frame); the report adds

* the exact field (``flow_matching`` between the source mixture and the moons' atoms, MATH.md eq. 1.2),
  whose marginal at any t < 1 is a known Gaussian mixture (the atoms smoothed by the source's
  components shrunk by 1 − t): it memorises the training atoms, so fresh points between them get a
  poor likelihood, the learned field a better one. At its own cut-off t = 1 − 10⁻³ the closed form
  gives thousands of bits per dimension (the ODE there is far too stiff to integrate: a point between
  atoms is pushed back 10³ times further out); the engine's :func:`measureflow.likelihood` run is
  made from ``exact_t_max`` (default 0.9, RK4 on ``exact_steps`` steps geometric in 1 − t) and
  checked against the closed form there;
* the source's own bits per dimension on the held-out points (a flow that learned nothing);
* a picture of log p over the plane for both fields, with the held-out points.

The trained weights are those ``learned_moons`` keeps next to its output (``weights_from``); with
the same data and training settings they are reused, otherwise trained here first.

    python scenarios/likelihood_moons.py
    measureflow run scenarios/likelihood_moons.py --set held_out=1000 --set grid=80
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import torch

import measureflow
from measureflow import Particles, Simulation, scenario
from measureflow.errors import ParameterError
from measureflow.measures import Empirical, GaussianMixture
from measureflow.parameters import Picture, Points, PositiveFloat, Probability, Range, Size, Steps

F64 = torch.float64
LN2 = math.log(2.0)


def _learned_moons():
    """The learned_moons scenario module (data, training and weights helpers), loaded from beside this file."""
    name = "measureflow_scenario_learned_moons"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("learned_moons.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


LM = _learned_moons()


def held_out_points(params: dict) -> torch.Tensor:
    """Fresh two-moons points (their own seed stream), not the training atoms."""
    points, _, _ = LM.make_moons(params["held_out"], params["upper_mass"], params["seed"] + 7919)
    return points


def trained_field(params: dict):
    """The learned field with the weights learned_moons keeps next to ``weights_from`` (trained if absent)."""
    src = LM.make_source(params["source"])
    points, weights, _ = LM.make_moons(params["n_atoms"], params["upper_mass"], params["seed"])
    train = {**params, "out": params["weights_from"]}
    model, _ = LM.train_or_reuse(train, src, Empirical(points, weights), LM.training_config(train, points, weights),
                                 torch.device("cpu"))
    return measureflow.field("learned", model=model.to(F64)), src, points, weights


@scenario
def likelihood_moons(
    source: str = "eight_gaussians",
    n_atoms: Annotated[int, Size(minimum=2)] = 500,
    upper_mass: Annotated[float, Probability(open_interval=True)] = 0.5,
    hidden: Annotated[int, Range(1, 4096)] = 128,
    depth: Annotated[int, Range(1, 64)] = 3,
    train_steps: Annotated[int, Size(minimum=0)] = 4000,
    batch_size: Points = 256,
    lr: PositiveFloat = 3e-3,
    retrain: bool = False,
    weights_from: str = "runs/learned_moons.h5",
    held_out: Annotated[int, Size(minimum=0)] = 500,
    steps: Steps = 40,
    exact_steps: Steps = 240,
    exact_t_max: float = 0.9,
    log_density: str = "exact",
    probes: int = 1,
    grid: Annotated[int, Range(2, 4096)] = 48,
    seed: int = 0,
    out: str = "runs/likelihood_moons.h5",
    picture: Picture = "runs/likelihood_moons.png",
) -> Simulation:
    """Held-out two-moons points carried back to the source by the learned field, with their log-density."""
    for name in ("held_out", "steps", "exact_steps", "grid"):
        if locals()[name] < 1:
            raise ParameterError(f"{name} must be at least 1; received {locals()[name]}")
    if not 0.0 < exact_t_max < 1.0:
        raise ParameterError(f"exact_t_max must lie in (0, 1); received {exact_t_max!r}")
    params = dict(locals())
    field, _, _, _ = trained_field(params)
    x = held_out_points(params)
    return Simulation(Particles(x[None]), field, "rk4", t0=1.0, t1=0.0, steps=steps, writers=[out] if out else [],
                      log_density=log_density, probes=probes, seed=seed, blowup=None)


def evaluate(result, params: dict) -> dict:
    """Bits per dimension of the held-out points under the learned field, the exact field (engine and
    closed form) and the source; log p over a grid for the picture."""
    field, src, points, weights = trained_field(params)
    x = held_out_points(params)
    x0, channel = result.state.x[0], result.state.log_density[0]
    learned = src.log_density(x0) - channel
    memorising = LM.exact_field(src, points, weights)
    cutoff = memorising.time_range[1]
    t_max = params["exact_t_max"]
    exact_field = measureflow.field("flow_matching", data=src, noise=GaussianMixture.diracs(points, weights),
                                    t_max=t_max)
    # Stiff near t = 1 (Lipschitz constant ~ 1/(1 − t), MATH.md §1.3): RK4 on a grid geometric in 1 − t.
    gap = 1.0 - t_max
    times = [1.0 - gap * (1.0 / gap) ** (k / params["exact_steps"]) for k in range(params["exact_steps"] + 1)]
    times[-1] = 0.0
    exact = measureflow.likelihood(exact_field, x, noise=src, times=times, integrator="rk4", progress=False)
    closed = exact_field.marginal(t_max).log_density(x)
    lo, hi = x.min(0).values - 0.5, x.max(0).values + 0.5
    gx, gy = (torch.linspace(float(lo[k]), float(hi[k]), params["grid"], dtype=F64) for k in range(2))
    plane = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1).reshape(-1, 2)
    learned_plane = measureflow.likelihood(field, plane, noise=src, t0=1.0, t1=0.0, integrator="rk4",
                                           steps=params["steps"], progress=False).log_prob
    exact_plane = exact_field.marginal(t_max).log_density(plane)
    learned_at = measureflow.likelihood(field, x, noise=src, t0=t_max, t1=0.0, integrator="rk4",
                                        steps=params["steps"], progress=False).log_prob

    def bpd(logp):
        return float(-logp.mean() / (2 * LN2))

    return {
        "bits_per_dim": {"learned": bpd(learned), "learned_at_t_max": bpd(learned_at),
                         "exact_field": bpd(exact.log_prob), "exact_closed_form": bpd(closed),
                         "exact_at_cutoff": bpd(memorising.marginal(cutoff).log_density(x)),
                         "source": bpd(src.log_density(x))},
        "cutoff": cutoff,
        "exact_engine_vs_closed_form": float((exact.log_prob - closed).abs().max()),
        "t_max": t_max,
        "held_out": int(x.shape[0]),
        "plane": {"x": gx.numpy(), "y": gy.numpy(), "learned": learned_plane.reshape(len(gy), len(gx)).numpy(),
                  "exact": exact_plane.reshape(len(gy), len(gx)).numpy()},
        "points": x.numpy(),
    }


@likelihood_moons.report
def report(result, params):
    numbers = evaluate(result, params)
    b = numbers["bits_per_dim"]
    print(f"held-out points: {numbers['held_out']}; bits per dimension (lower is better):")
    print(f"  learned field at t = 1        {b['learned']:.4f}")
    print(f"  learned field at t = {numbers['t_max']:g}      {b['learned_at_t_max']:.4f}")
    print(f"  exact field at t = {numbers['t_max']:g}        {b['exact_field']:.4f} (closed form {b['exact_closed_form']:.4f}; "
          f"max |engine − closed form| = {numbers['exact_engine_vs_closed_form']:.2e})")
    print(f"  exact field at t = {numbers['cutoff']:g}      {b['exact_at_cutoff']:.4f} (closed form: it memorises the atoms)")
    print(f"  source law                    {b['source']:.4f}")
    if params["out"]:
        summary = {k: v for k, v in numbers.items() if k not in ("plane", "points")}
        Path(params["out"]).with_suffix(".report.json").write_text(json.dumps(summary, indent=1))
    if params["picture"]:
        draw(numbers, params["picture"])
        print(f"wrote {params['picture']}")


def draw(numbers: dict, path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5.2), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    plane, pts = numbers["plane"], numbers["points"]
    vmax = max(float(np.max(plane["learned"])), float(np.max(plane["exact"])))
    for ax, key, title in ((axes[0], "learned", "learned field"), (axes[1], "exact", "exact field (memorises atoms)")):
        image = ax.pcolormesh(plane["x"], plane["y"], np.maximum(plane[key], vmax - 12), shading="auto",
                              cmap="viridis", vmax=vmax)
        ax.scatter(pts[:, 0], pts[:, 1], s=2, c="w", alpha=0.6)
        bits = numbers["bits_per_dim"]["learned" if key == "learned" else "exact_field"]
        when = "t = 1" if key == "learned" else f"t = {numbers['t_max']:g}"
        ax.set_title(f"log p, {title}, {when}\n{bits:.3f} bits/dim on the held-out points", fontsize="medium")
        ax.set_aspect("equal")
    fig.colorbar(image, ax=axes, shrink=0.8, label="log p(x) (clipped 12 below the maximum)")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    likelihood_moons.main()
