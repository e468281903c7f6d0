"""Porous-medium flow ∂ₜρ = Δρ^m on particles against the Barenblatt solution (MATH.md §15.8).

Particles start at quantiles of the Barenblatt profile ρ(1, ·) (unit mass) and move by the blob scheme
v = −mρ̃^{m−2}∇ρ̃, ρ̃ = K_ε*μ (field ``porous_medium``), from t = 1 to ``t1``. The exact solution is
self-similar, ρ(t, x) = t^{−a}(C − κ|x|²t^{−2a/d})₊^{1/(m−1)}, a = d/(d(m − 1) + 2), so its second moment grows
exactly as t^{2a/d}. The run records the particles' second moment; the report fits its growth exponent
against 2a/d and draws the particles' density against the exact profile (d = 1) or the particles (d = 2),
and M₂(t) against t^{2a/d}.

    python scenarios/barenblatt.py
    measureflow run scenarios/barenblatt.py --set d=2 --set n=500 --set epsilon=0.02
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import torch

import measureflow
from measureflow import Simulation, scenario
from measureflow.parameters import Count, Picture, Points, PositiveFloat, Range, Steps
from measureflow.simulation import Observer
from measureflow_plugins.porous_medium import (
    barenblatt_exponent,
    barenblatt_particles,
    barenblatt_profile,
    barenblatt_second_moment,
)


def second_moment(state, **_):
    return (state.weights_or_uniform() * (state.x**2).sum(-1)).sum(-1)


@scenario
def barenblatt(
    m: Annotated[float, Range(1.0, 100.0, open_below=True)] = 2.0,
    d: Annotated[int, Range(1, 1024)] = 1,
    n: Points = 200,
    epsilon: PositiveFloat = 0.01,
    t1: PositiveFloat = 8.0,
    steps: Steps = 280,
    every: Count = 2,
    out: str = "runs/barenblatt.h5",
    picture: Picture = "runs/barenblatt.png",
) -> Simulation:
    """Blob particles of the porous-medium equation from the Barenblatt profile at t = 1."""
    if d not in (1, 2):
        raise measureflow.ParameterError(f"d must be 1 or 2; received {d}")
    field = measureflow.field("porous_medium", m=m, epsilon=epsilon)
    return Simulation(barenblatt_particles(n, m, d), field, "rk4", 1.0, t1, steps=steps,
                      writers=[out] if out else [], observe_every=every,
                      observers=["energy", Observer(second_moment, name="second_moment")])


def exponent(result) -> float:
    """Least-squares slope of log M₂ against log t."""
    series = result.observables["second_moment"]
    return float(np.polyfit(np.log(series.times), np.log(np.ravel(series.values)), 1)[0])


@barenblatt.report
def report(result, params):
    m, d = params["m"], params["d"]
    a, _ = barenblatt_exponent(m, d)
    fitted = exponent(result)
    print(f"second-moment growth exponent {fitted:.5f}; Barenblatt 2a/d = {2 * a / d:.5f} "
          f"(relative error {fitted / (2 * a / d) - 1:+.2%})")
    if not params["picture"]:
        return
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.4), layout="constrained")
    ax, ax_m = fig.subplots(1, 2)
    x = result.state.x[0].numpy()
    if d == 1:
        grid = np.linspace(x.min() - 0.5, x.max() + 0.5, 400)
        ax.hist(x[:, 0], bins=40, density=True, color="C0", alpha=0.5, label=f"particles, t = {params['t1']:g}")
        exact = barenblatt_profile(params["t1"], torch.as_tensor(grid)[:, None], m).numpy()
        ax.plot(grid, exact, c="C3", label="Barenblatt")
        ax.legend(fontsize="small")
    else:
        ax.scatter(x[:, 0], x[:, 1], s=3)
        ax.set_aspect("equal")
    ax.set_title(f"m = {m:g}, d = {d}, ε = {params['epsilon']:g}", fontsize="medium")
    series = result.observables["second_moment"]
    ax_m.loglog(series.times, np.ravel(series.values), label="particles")
    ax_m.loglog(series.times, [barenblatt_second_moment(t, m, d) for t in series.times], "--", label=r"exact $\propto t^{2a/d}$")
    ax_m.set_xlabel("t"), ax_m.set_title(f"second moment: exponent {fitted:.4f} vs {2 * a / d:.4f}", fontsize="medium")
    ax_m.legend(fontsize="small")
    fig.suptitle("Porous-medium equation by the blob method against the Barenblatt solution (MATH.md §15.8)",
                 fontsize="medium")
    Path(params["picture"]).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(params["picture"], dpi=100)
    print(f"wrote {params['picture']}")


if __name__ == "__main__":
    barenblatt.main()
