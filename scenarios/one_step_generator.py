"""A one-step generator trained by explicit Euler steps of the drifting or the Sinkhorn field (MATH.md §9).

A small MLP G : R² → R² pushes standard normal latents to a 2-D toy data set generated here from the
seed (eight Gaussians on a circle, or a checkerboard). Each training iteration draws a batch
x = G(ζ), evaluates a particle field on it (the batch is the field's state μ̂), moves the batch by one
explicit Euler step x⁺ = x + τv[μ̂](x) and regresses G onto x⁺ (MATH.md §9: G⁺ = G + τU∘G is the Euler step
of the particle ODE; :func:`measureflow.training.train_generator`). Two fields drive it:

* ``drifting``: u = B_ε[β] − B_ε[μ] (kernel drifting, ε = ``drifting_epsilon`` a variance, MATH.md §9), which has no
  fixed functional;
* ``sinkhorn``: the Wasserstein gradient flow of the debiased Sinkhorn divergence S_ε (MATH.md §7).

``field`` picks the run written to ``out``; with ``compare`` the report trains the other field with the
same settings (same seed, latents and data; its trajectory next to ``out``, suffixed with its name). The
report prints the distances to the data at the start and the end and draws, for each field, the fixed
evaluation batch at the start, middle and end over the data, and the distance curves of both fields on
one plot: MMD² (Gaussian kernel, ℓ = ``mmd_bandwidth``) and S_ε (ε = ``monitor_epsilon``) against the
iteration, with the mean squared velocity ∫|v|² dμ that MATH.md §9 says to monitor.

    python scenarios/one_step_generator.py
    measureflow run scenarios/one_step_generator.py --set field=sinkhorn --set dataset=checkerboard
    measureflow plot runs/one_step_generator.h5 -o runs/one_step_generator_file.png
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import torch

import measureflow
from measureflow.errors import ParameterError
from measureflow.parameters import Count, OneOf, Picture, Points, PositiveFloat, Range, Size, Steps, Threads
from measureflow.scenario import scenario
from measureflow.training import GeneratorTraining, train_generator

FIELDS = ("drifting", "sinkhorn")
DATASETS = ("eight_gaussians", "checkerboard")
#: Eight Gaussians: centres on a circle of this radius, each with this standard deviation.
RING_RADIUS = 2.0
RING_STD = 0.15
#: Checkerboard: 4 × 4 unit squares on [−2, 2]², every other one filled.
BOARD_CELLS = 4
#: Sinkhorn potentials of the field to a relative change of this size (float32 training; the step's
#: velocity error is of the order of tol·√ε, far below the batch's sampling noise).
FIELD_TOL = 1e-3


# -- data and fields ---------------------------------------------------------------------------------------


def make_data(kind: str, n: int, seed: int) -> torch.Tensor:
    """n points (float32, CPU) of the toy set, drawn with their own generator seeded by ``seed``."""
    if n < 8:
        raise ParameterError(f"n_data must be at least 8; received {n}")
    g = torch.Generator().manual_seed(int(seed))
    if kind == "eight_gaussians":
        angle = 2 * math.pi * torch.randint(8, (n,), generator=g) / 8
        centres = RING_RADIUS * torch.stack([angle.cos(), angle.sin()], dim=-1)
        return (centres + RING_STD * torch.randn(n, 2, generator=g)).float()
    if kind == "checkerboard":
        # A uniform cell (i, j) among the filled ones ((i + j) even), then a uniform point inside it.
        filled = torch.tensor([(i, j) for i in range(BOARD_CELLS) for j in range(BOARD_CELLS) if (i + j) % 2 == 0])
        cell = filled[torch.randint(len(filled), (n,), generator=g)]
        return (cell + torch.rand(n, 2, generator=g) - BOARD_CELLS / 2).float()
    raise ParameterError(f"dataset must be one of {', '.join(DATASETS)}; received {kind!r}")


def make_field(name: str, data: torch.Tensor, params: dict):
    if name == "drifting":
        return measureflow.field("drifting", target=data, epsilon=params["drifting_epsilon"])
    if name == "sinkhorn":
        return measureflow.field("sinkhorn", target=data, epsilon=params["sinkhorn_epsilon"], tol=FIELD_TOL)
    raise ParameterError(f"field must be one of {', '.join(FIELDS)}; received {name!r}")


def training_options(name: str, data: torch.Tensor, params: dict) -> dict:
    """train_generator's keyword arguments for one field (everything but the output files)."""
    return {
        "iterations": params["iterations"],
        "batch": params["batch"],
        "step": params[f"{name}_step"],
        "mode": params["mode"],
        "inner_steps": params["inner_steps"],
        "lr": params["lr"],
        "data": data,
        "eval_batch": params["eval_batch"],
        "every": params["every"],
        "mmd_bandwidth": params["mmd_bandwidth"],
        "sinkhorn_epsilon": params["monitor_epsilon"],
        "seed": params["seed"],
        "device": "cpu",
    }


def companion_path(out: str, name: str) -> str:
    """The trajectory of the comparison run for field ``name``: ``out`` with ``_<name>`` before the suffix."""
    path = Path(out)
    return str(path.with_name(f"{path.stem}_{name}{path.suffix or '.h5'}"))


# -- the scenario --------------------------------------------------------------------------------------------


@scenario
def one_step_generator(
    field: Annotated[str, OneOf(*FIELDS)] = "drifting",
    compare: bool = True,
    dataset: Annotated[str, OneOf(*DATASETS)] = "eight_gaussians",
    n_data: Annotated[int, Size(minimum=8)] = 500,
    iterations: Steps = 120,
    batch: Points = 128,
    mode: str = "direct",
    inner_steps: Annotated[int, Range(1, 10000)] = 5,
    lr: PositiveFloat = 3e-3,
    hidden: Annotated[int, Range(1, 4096)] = 64,
    depth: Annotated[int, Range(1, 64)] = 3,
    latent_dim: Annotated[int, Range(1, 4096)] = 2,
    drifting_epsilon: PositiveFloat = 0.2,
    drifting_step: PositiveFloat = 1.0,
    sinkhorn_epsilon: PositiveFloat = 0.5,
    sinkhorn_step: PositiveFloat = 0.25,
    eval_batch: Points = 300,
    every: Count = 15,
    mmd_bandwidth: PositiveFloat = 0.5,
    monitor_epsilon: PositiveFloat = 1.0,
    seed: int = 0,
    threads: Threads = 1,
    out: str = "runs/one_step_generator.h5",
    picture: Picture = "runs/one_step_generator.png",
) -> GeneratorTraining:
    """A one-step generator on a 2-D toy set, trained by drifting or Sinkhorn Euler steps."""
    params = dict(locals())
    if field not in FIELDS:
        raise ParameterError(f"field must be one of {', '.join(FIELDS)}; received {field!r}")
    if threads > 0:
        # For the rest of the process: batches of 10² points gain nothing from a thread pool.
        torch.set_num_threads(threads)
    data = make_data(dataset, n_data, seed)
    return GeneratorTraining(
        generator={"hidden": hidden, "depth": depth},
        field=make_field(field, data, params),
        latent=latent_dim,
        options=training_options(field, data, params),
        out=out or None,
    )


# -- the report ----------------------------------------------------------------------------------------------


def summary(result) -> dict:
    """Start and end values of the monitors, and the mean share of the Euler step the fit missed."""
    out = {name: {"start": float(v[0]), "end": float(v[-1])} for name, v in result.distances.items()}
    out["velocity_sq"] = {"start": float(result.velocity_sq[0]), "end": float(result.velocity_sq[-1])}
    out["relative_fit"] = float(np.nanmedian(result.relative_fit))
    out["wall_time"] = float(result.wall_time)
    return out


@one_step_generator.report
def report(result, params):
    if not result.ok:
        print(f"training did not complete ({result.status}); nothing to report")
        return
    runs = {params["field"]: result}
    if params["compare"]:
        other = next(f for f in FIELDS if f != params["field"])
        data = make_data(params["dataset"], params["n_data"], params["seed"])
        print(f"training the {other} field for comparison", file=sys.stderr)
        runs[other] = train_generator(
            {"hidden": params["hidden"], "depth": params["depth"]}, make_field(other, data, params),
            params["latent_dim"], out=companion_path(params["out"], other) if params["out"] else None,
            parameters={"parameters": {**params, "field": other}}, progress=False,
            **training_options(other, data, params),
        )
    numbers = {name: summary(r) for name, r in runs.items()}
    print(f"one-step generator on {params['dataset']} ({params['iterations']} iterations, mode {params['mode']}):")
    print(f"  {'field':<10}{'MMD² start':>12}{'MMD² end':>11}{'S_ε start':>11}{'S_ε end':>10}"
          f"{'∫|v|² end':>11}{'missed':>9}{'time':>8}")
    for name, nb in numbers.items():
        mmd, sk = nb.get("mmd", {}), nb.get("sinkhorn", {})
        print(f"  {name:<10}{mmd.get('start', math.nan):>12.4g}{mmd.get('end', math.nan):>11.4g}"
              f"{sk.get('start', math.nan):>11.4g}{sk.get('end', math.nan):>10.4g}"
              f"{nb['velocity_sq']['end']:>11.3g}{nb['relative_fit']:>9.2f}{nb['wall_time']:>7.1f}s")
    print("  (missed: median over iterations of |G⁺(ζ) − x⁺|² / (τ²∫|v|²), the share of the Euler step the "
          "regression did not realise)")
    if params["picture"]:
        data = make_data(params["dataset"], params["n_data"], params["seed"]).numpy()
        draw(runs, data, params, params["picture"])
        print(f"wrote {params['picture']}")
    return numbers


# -- the picture -----------------------------------------------------------------------------------------------


COLOURS = {"drifting": "C0", "sinkhorn": "C3"}


def draw(runs: dict, data: np.ndarray, params: dict, out: str) -> None:
    from matplotlib.figure import Figure

    rows = len(runs)
    fig = Figure(figsize=(17, 4.2 * max(rows, 1.6)), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[3.0, 1.25])
    lim = _limits(np.concatenate([data, *[r.snapshots[-1] for r in runs.values()]]))
    axes = left.subplots(rows, 3, squeeze=False)
    for row, (name, result) in enumerate(runs.items()):
        picks = sorted({0, len(result.steps) // 2, len(result.steps) - 1})
        for col, k in enumerate(picks):
            _draw_samples(axes[row, col], data, result, k, name, params, lim)
    curves = right.subplots(3, 1, sharex=True)
    names = (("mmd", f"MMD² to the data (ℓ = {params['mmd_bandwidth']:g})"),
             ("sinkhorn", f"S_ε to the data (ε = {params['monitor_epsilon']:g})"))
    for ax, (key, label) in zip(curves, names):
        for name, result in runs.items():
            if key in result.distances:
                ax.plot(result.steps, result.distances[key], marker="o", markersize=3, color=COLOURS[name],
                        label=f"{name} (τ = {params[f'{name}_step']:g})")
        ax.set_yscale("log")
        ax.set_ylabel(label, fontsize="small")
        ax.legend(fontsize="small")
    ax = curves[2]
    for name, result in runs.items():
        ax.plot(np.arange(1, len(result.velocity_sq) + 1), result.velocity_sq, color=COLOURS[name], linewidth=0.8,
                label=name)
    ax.set_yscale("log")
    ax.set_ylabel("∫|v|² dμ on the batch", fontsize="small")
    ax.set_xlabel("iteration")
    ax.legend(fontsize="small")
    right.suptitle("distance to the data and mean squared velocity", fontsize="medium")
    fig.suptitle(f"One-step generator G⁺ = G + τ v∘G (mode {params['mode']}, {params['iterations']} iterations, "
                 f"batch {params['batch']}) on {params['dataset'].replace('_', ' ')}: drifting (ε = "
                 f"{params['drifting_epsilon']:g}) vs Sinkhorn (ε = {params['sinkhorn_epsilon']:g}) field",
                 fontsize="large")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


def _limits(x: np.ndarray):
    lo, hi = np.quantile(x, 0.002, axis=0), np.quantile(x, 0.998, axis=0)
    pad = 0.08 * (hi - lo).max()
    return (lo[0] - pad, hi[0] + pad), (lo[1] - pad, hi[1] + pad)


def _draw_samples(ax, data, result, k, name, params, lim):
    x = result.snapshots[k]
    ax.scatter(data[:, 0], data[:, 1], s=4, color="0.7", linewidths=0, label=f"data ({len(data)})")
    ax.scatter(x[:, 0], x[:, 1], s=4, color=COLOURS[name], alpha=0.7, linewidths=0,
               label=f"G(ζ), {len(x)} fixed latents")
    mmd = result.distances.get("mmd")
    extra = f", MMD² {mmd[k]:.2g}" if mmd is not None and len(mmd) > k else ""
    ax.set_title(f"{name}: iteration {int(result.steps[k])}{extra}", fontsize="medium")
    ax.set_xlim(*lim[0])
    ax.set_ylim(*lim[1])
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("x₁")
    ax.set_ylabel("x₂")
    if k == 0:
        ax.legend(loc="upper left", fontsize="x-small", markerscale=2)


if __name__ == "__main__":
    one_step_generator.main()
