"""Learn depth-dependent attention parameters θ(t) by gradients through the run (MATH.md §10, §15.5).

Tokens drawn from one Gaussian mixture (two clusters on the horizontal axis) move by the attention
flow ẋᵢ = Γ_{θ(t)}[μ](xᵢ) over depth t ∈ [0, 1], with θ(t) = (Q_l, K_l, V_l) constant on each of
``layers`` layers (a transformer of ``layers`` blocks, each integrated by RK4 in ``substeps`` steps).
The table is trained with Adam so that the final tokens match a target mixture (two clusters on the
vertical axis), the loss being the squared MMD with a Gaussian kernel between the final tokens and
target samples (unhalved, MATH.md §0),

    L(θ) = MMD²_k(μ_1(θ), β),

differentiated through the solver with ``Simulation(..., gradient=gradient)`` (``"adjoint"`` by
default: memory independent of the number of steps; ``"backprop"`` keeps the graph). This is the
survey's §7.3 "training the parameters of the PDE" in its simplest form: the forward map is the
flow, the parameters a function of depth.

The run is the trained model applied to fresh tokens (an H5MD trajectory); the report prints the
loss before and after training and draws the loss curve and the token trajectories with the initial
and the trained parameters.

    python scenarios/attention_training.py
    measureflow run scenarios/attention_training.py --set iterations=300 --set layers=6
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import numpy as np
import torch

import measureflow
from measureflow import Particles, Simulation, scenario
from measureflow.errors import ParameterError
from measureflow.measures import GaussianMixture
from measureflow.parameters import Count, Picture, Points, Positive, PositiveFloat, Steps

F64 = torch.float64
#: The trained tables of this process (out → (Q, K, V, losses)), for the report.
TRAINED: dict = {}


def mixture(axis: int, spread: float = 0.15) -> GaussianMixture:
    """Two equal clusters at ±1 along ``axis`` (0: horizontal, 1: vertical), isotropic std ``spread``."""
    means = torch.zeros(2, 2, dtype=F64)
    means[0, axis], means[1, axis] = 1.0, -1.0
    covs = (spread**2 * torch.eye(2, dtype=F64)).expand(2, 2, 2).clone()
    return GaussianMixture(torch.full((2,), 0.5, dtype=F64), means, covs)


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """MMD²_k between uniform point clouds x (N, d), y (M, d), k = exp(−|x − y|²/(2ℓ²)); differentiable."""
    def mean_k(a, b):
        return torch.exp(-torch.cdist(a, b).square() / (2 * bandwidth**2)).mean()

    return mean_k(x, x) - 2 * mean_k(x, y) + mean_k(y, y)


def initial_table(layers: int, seed: int):
    """Q, K, V per layer, (layers, 2, 2): small random maps around V = I, so the untrained flow moves little."""
    g = torch.Generator().manual_seed(seed)
    Q = 0.3 * torch.randn(layers, 2, 2, generator=g, dtype=F64)
    K = 0.3 * torch.randn(layers, 2, 2, generator=g, dtype=F64)
    V = torch.eye(2, dtype=F64).expand(layers, 2, 2) + 0.1 * torch.randn(layers, 2, 2, generator=g, dtype=F64)
    return Q, K, V


def attention(Q, K, V):
    layers = Q.shape[0]
    return measureflow.field("attention", Q=Q, K=K, V=V, layer_times=[l / layers for l in range(layers)])


def train(params: dict):
    """Adam on the (Q, K, V) table; returns the trained table and the loss per iteration."""
    source, target = mixture(0), mixture(1)
    g = torch.Generator().manual_seed(params["seed"])
    Q, K, V = (m.clone().requires_grad_(True) for m in initial_table(params["layers"], params["seed"]))
    optimiser = torch.optim.Adam([Q, K, V], lr=params["lr"])
    losses = []
    steps = params["layers"] * params["substeps"]
    for _ in range(params["iterations"]):
        x0 = source.sample(params["tokens"], g)
        y = target.sample(params["tokens"], g)
        result = Simulation(Particles(x0[None]), attention(Q, K, V), "rk4", t1=1.0, steps=steps,
                            gradient=params["gradient"], progress=False).run()
        loss = mmd2(result.state.x[0], y, params["bandwidth"])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    return tuple(m.detach() for m in (Q, K, V)), losses


@scenario
def attention_training(
    layers: Count = 4,
    substeps: Count = 4,
    tokens: Points = 96,
    iterations: Steps = 150,
    lr: PositiveFloat = 0.05,
    bandwidth: Annotated[float, Positive(maximum=1e6)] = 0.5,
    gradient: str = "adjoint",
    n: Points = 400,
    seed: int = 0,
    out: str = "runs/attention_training.h5",
    picture: Picture = "runs/attention_training.png",
) -> Simulation:
    """Attention parameters θ(t) learned by gradients through the run, moving one mixture onto another."""
    for name in ("layers", "substeps", "tokens", "iterations", "n"):
        if locals()[name] < 1:
            raise ParameterError(f"{name} must be at least 1; received {locals()[name]}")
    if gradient not in ("adjoint", "backprop"):
        raise ParameterError(f"gradient must be 'adjoint' or 'backprop'; received {gradient!r}")
    params = dict(locals())
    table, losses = train(params)
    TRAINED[out] = (table, losses)
    x = mixture(0).sample(n, torch.Generator().manual_seed(seed + 1))
    return Simulation(Particles(x[None]), attention(*table), "rk4", t1=1.0, steps=layers * substeps,
                      writers=[out] if out else [], seed=seed, parameters={"final_loss": losses[-1]})


def evaluate(result, params: dict) -> dict:
    table, losses = TRAINED[params["out"]]
    target = mixture(1).sample(params["n"], torch.Generator().manual_seed(params["seed"] + 2))
    x0 = mixture(0).sample(params["n"], torch.Generator().manual_seed(params["seed"] + 1))
    steps = params["layers"] * params["substeps"]

    def run(Q, K, V):
        writer = measureflow.get_registry().writer("memory")
        out = Simulation(Particles(x0[None]), attention(Q, K, V), "rk4", t1=1.0, steps=steps, writers=[writer],
                         progress=False).run()
        return out.state.x[0], np.asarray(writer.positions)[:, 0]

    before, paths_before = run(*initial_table(params["layers"], params["seed"]))
    after, paths_after = run(*table)
    bw = params["bandwidth"]
    return {"losses": losses, "mmd2_before": float(mmd2(before, target, bw)), "mmd2_after": float(mmd2(after, target, bw)),
            "mmd2_source": float(mmd2(x0, target, bw)), "paths_before": paths_before, "paths_after": paths_after,
            "target": target.numpy()}


@attention_training.report
def report(result, params):
    nb = evaluate(result, params)
    print(f"MMD² to the target mixture ({params['n']} fresh tokens): untrained θ {nb['mmd2_before']:.4g}, "
          f"trained θ {nb['mmd2_after']:.4g} (source itself {nb['mmd2_source']:.4g}); training loss "
          f"{nb['losses'][0]:.4g} → {nb['losses'][-1]:.4g} in {len(nb['losses'])} iterations ({params['gradient']})")
    if params["picture"]:
        draw(nb, params["picture"])
        print(f"wrote {params['picture']}")


def draw(nb: dict, path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.8), layout="constrained")
    ax0, ax1, ax2 = fig.subplots(1, 3)
    ax0.semilogy(nb["losses"], lw=1)
    ax0.set_xlabel("iteration")
    ax0.set_ylabel("MMD² of a mini-batch")
    ax0.set_title("training loss (gradients through the run)", fontsize="medium")
    for ax, key, title in ((ax1, "paths_before", "untrained θ(t)"), (ax2, "paths_after", "trained θ(t)")):
        paths = nb[key]
        ax.scatter(nb["target"][:, 0], nb["target"][:, 1], s=3, c="0.7", label="target")
        ax.plot(paths[:, :60, 0], paths[:, :60, 1], c="C0", lw=0.5, alpha=0.5)
        ax.scatter(paths[0, :, 0], paths[0, :, 1], s=3, c="C0", label="t = 0")
        ax.scatter(paths[-1, :, 0], paths[-1, :, 1], s=3, c="C3", label="t = 1")
        ax.set_aspect("equal")
        ax.set_title(f"tokens with {title}", fontsize="medium")
        ax.legend(fontsize="small", markerscale=3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    attention_training.main()
