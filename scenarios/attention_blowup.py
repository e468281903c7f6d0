"""The covariance of Gaussian tokens under attention blows up at the predicted time (MATH.md §10).

With V = I and KᵀQ = cI, the Gaussian closure of the attention flow from a centred N(0, Σ₀) is
Σ̇ = 2cΣ², solved by Σ(t) = Σ₀(I − 2ctΣ₀)⁻¹: the covariance diverges along the top eigenvector of Σ₀ at

    t* = 1 / (2c λ_max(Σ₀)).

The scenario runs n tokens drawn from N(0, Σ₀) (scrambled-Sobol points, exactly whitened) to
``stop``·t*, and, for the picture, the Gaussian closure itself (integrated by RK4 as a Gaussians state,
which stops with status "blowup" once max |Σ| passes the simulation's bound, just after t*) and the closed
form. Particles cannot blow up (|Γ| ≤ max|xⱼ|): they follow the closure until near t*, where the
softmax weights e^{c⟨x, xⱼ⟩} concentrate on a few extreme tokens (finite-N error of order e^{hᵀΣh}/N,
MATH.md §10 "Avoid"), and then keep growing only exponentially.

A terminal event (:func:`measureflow.events.eigenvalue_above`, MATH.md §15.4) stops a second closure
run, adaptive ``dopri5``, just before t*: when λ_max(Σ) reaches ``bound``, which for Σ̇ = 2cΣ² happens
exactly at t* − 1/(2c·bound) (1/λ_max falls linearly), located on the solver's dense output.

    python scenarios/attention_blowup.py --set c=1.0
    measureflow run scenarios/attention_blowup.py --set n=1024 --set steps=40
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import numpy as np
import torch

import measureflow
from measureflow import Gaussians, Particles, Simulation, scenario
from measureflow.parameters import Picture, PositiveFloat, Size, Steps
from measureflow_plugins.attention import AttentionField

DTYPE = torch.float64


def start_gaussian(angle: float) -> Gaussians:
    """Centred N(0, Σ₀), Σ₀ = R(angle) diag(1, 0.25) R(angle)ᵀ: λ_max = 1."""
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, -s], [s, c]], dtype=DTYPE)
    return Gaussians(torch.zeros(2, dtype=DTYPE), rot @ torch.diag(torch.tensor([1.0, 0.25], dtype=DTYPE)) @ rot.T)


def tokens(n: int, start: Gaussians, seed: int) -> Particles:
    """n scrambled-Sobol points of the start Gaussian with exactly its mean and covariance."""
    u = torch.quasirandom.SobolEngine(2, scramble=True, seed=seed).draw(n, dtype=DTYPE)
    z = torch.special.ndtri(u.clamp(1e-12, 1 - 1e-12))
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / n)).T
    return Particles((start.mean[0] + z @ torch.linalg.cholesky(start.cov[0]).T)[None])


def make_field(c: float) -> AttentionField:
    if c <= 0:
        raise measureflow.ParameterError(f"c must be positive (KᵀQ = cI; no blow-up otherwise); received {c!r}")
    root = math.sqrt(c) * torch.eye(2, dtype=DTYPE)
    return AttentionField(Q=root, K=root)


@scenario
def attention_blowup(
    n: Annotated[int, Size(minimum=3)] = 2048,
    c: PositiveFloat = 0.5,
    angle: float = 0.5,
    stop: PositiveFloat = 1.4,
    steps: Steps = 56,
    bound: PositiveFloat = 1e3,
    seed: int = 1,
    out: str = "runs/attention_blowup.h5",
    picture: Picture = "runs/attention_blowup.png",
) -> Simulation:
    """Gaussian tokens under attention with V = I, KᵀQ = cI: the covariance blows up at t* = 1/(2cλ_max(Σ₀))."""
    if stop <= 0:
        raise measureflow.ParameterError(f"stop (the end time in units of t*) must be positive; received {stop!r}")
    if not bound > 1.0:
        raise measureflow.ParameterError(f"bound (the eigenvalue that stops the event run) must exceed λ_max(Σ₀) = 1; "
                                         f"received {bound!r}")
    field = make_field(c)
    start = start_gaussian(angle)
    t_star = float(field.blowup_time(start)[0])
    return Simulation(tokens(n, start, seed), field, "rk4", 0.0, stop * t_star, steps=steps,
                      writers=[out] if out else [], observers=["covariance"], observe_every=1, seed=seed,
                      parameters={"t_star": t_star})


def closure_run(params: dict):
    """The Gaussian closure on the same grid, in memory; past t* it ends with a non-ok status."""
    field = make_field(params["c"])
    start = start_gaussian(params["angle"])
    t_star = float(field.blowup_time(start)[0])
    # check_every=1: the bound is read after every step, so the run stops at the first step past it. Read
    # only at the end, the run would go on past that step, and a later RK4 step, leaving the SPD cone at
    # every split, would end it as a step failure instead
    sim = Simulation(start, field, "rk4", 0.0, params["stop"] * t_star, steps=params["steps"], observers=["covariance"],
                     observe_every=1, check_every=1, progress=False)
    return sim.run()


def event_run(params: dict):
    """The Gaussian closure under dopri5 to t*, stopped by the terminal event λ_max(Σ) = bound."""
    from measureflow.events import eigenvalue_above

    field = make_field(params["c"])
    start = start_gaussian(params["angle"])
    t_star = float(field.blowup_time(start)[0])
    solver = measureflow.integrator("dopri5", rtol=1e-10, atol=1e-10)
    sim = Simulation(start, field, solver, 0.0, t_star, steps=1, blowup=None, progress=False,
                     events=[eigenvalue_above(params.get("bound", 1e3))])
    return sim.run()


def summary(result, params: dict) -> dict:
    """λ_max of the particle covariance, of the closure run and of the closed form over time, and the
    particles' covariance error against the closed form at t*/2 (nearest recorded time)."""
    field = make_field(params["c"])
    start = start_gaussian(params["angle"])
    t_star = float(field.blowup_time(start)[0])
    series = result.observables["covariance"]
    times = np.asarray(series.times)
    covs = np.asarray(series.values)[:, 0]
    closure = closure_run(params)
    c_series = closure.observables["covariance"]
    half = int(np.argmin(np.abs(times - 0.5 * t_star)))
    stopped = event_run(params)
    bound = params.get("bound", 1e3)
    exact_half = field.solution(times[half], start).cov[0].numpy()
    return {
        "t_star": t_star,
        "times": times,
        "particles": np.linalg.eigvalsh(covs)[:, -1],
        "closure_times": np.asarray(c_series.times),
        "closure": np.linalg.eigvalsh(np.asarray(c_series.values)[:, 0])[:, -1],
        "closure_status": closure.status,
        "half_time": float(times[half]),
        "half_error": float(np.linalg.norm(covs[half] - exact_half) / np.linalg.norm(exact_half)),
        "x": result.state.x[0].numpy(),
        "event_status": stopped.status,
        "event_time": stopped.events[0].t if stopped.events else float("nan"),
        "event_predicted": t_star - 1.0 / (2 * params["c"] * bound),
    }


@attention_blowup.report
def report(result, params):
    numbers = summary(result, params)
    t_star = numbers["t_star"]
    print(f"predicted blow-up t* = 1/(2cλ_max(Σ₀)) = {t_star:.6g}; closure run: {numbers['closure_status']}")
    print(f"particles vs closed form at t = {numbers['half_time']:.4g} ≈ t*/2: covariance error "
          f"{100 * numbers['half_error']:.2f} %; λ_max at the end: {numbers['particles'][-1]:.4g} (particles)")
    print(f"terminal event λ_max(Σ) = {params.get('bound', 1e3):g}: t = {numbers['event_time']:.10f} "
          f"(exact t* − 1/(2c·bound) = {numbers['event_predicted']:.10f}); status {numbers['event_status'].code}")
    if params["picture"]:
        _draw(numbers, params)
        print(f"wrote {params['picture']}")


def _draw(numbers: dict, params: dict) -> None:
    from matplotlib.figure import Figure
    from matplotlib.patches import Ellipse

    field = make_field(params["c"])
    start = start_gaussian(params["angle"])
    t_star = numbers["t_star"]
    fig = Figure(figsize=(14, 5.6), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=[1.5, 1])
    grid = np.linspace(0.0, t_star * (1 - 1e-3), 400)
    exact = [float(torch.linalg.eigvalsh(field.solution(t, start).cov[0])[-1]) for t in grid]
    ax.semilogy(grid / t_star, exact, c="k", lw=1, label="closed form λ_max(Σ₀(I − 2ctΣ₀)⁻¹)")
    ax.semilogy(numbers["closure_times"] / t_star, numbers["closure"], "o", ms=3, c="C0",
                label=f"Gaussian closure, RK4 ({numbers['closure_status'].code} at t = "
                      f"{numbers['closure_status'].time / t_star:.3g} t*)")
    ax.semilogy(numbers["times"] / t_star, numbers["particles"], c="C3", lw=2, label=f"{params['n']} tokens")
    ax.axvline(1.0, c="0.4", ls="--", lw=1)
    ax.semilogy([numbers["event_time"] / t_star], [params.get("bound", 1e3)], "*", ms=12, c="C2",
                label=f"terminal event λ_max = {params.get('bound', 1e3):g} (dopri5, dense output)")
    ax.text(1.01, 0.05, f"t* = {t_star:.4g}", transform=ax.get_xaxis_transform(), color="0.3")
    top = max(float(np.max(numbers["particles"])), max(exact)) * 10
    ax.set_ylim(0.5, top)
    ax.set_xlabel("t / t*")
    ax.set_ylabel("largest eigenvalue of the covariance")
    ax.set_title("covariance blow-up: closure and closed form diverge at t*, tokens stay finite",
                 fontsize="medium")
    ax.legend(fontsize="small", loc="upper left")
    ax.grid(alpha=0.3, which="both")

    x0 = tokens(params["n"], start, params["seed"]).x[0].numpy()
    x = numbers["x"]
    ax2.scatter(x0[:, 0], x0[:, 1], s=2, c="C0", alpha=0.5, label="tokens, t = 0")
    ax2.scatter(x[:, 0], x[:, 1], s=2, c="C3", alpha=0.5, label=f"tokens, t = {params['stop']:g} t*")
    for t, colour in ((0.0, "C0"), (0.5 * t_star, "C2"), (0.9 * t_star, "C1")):
        cov = field.solution(t, start).cov[0].numpy()
        lam, vec = np.linalg.eigh(cov)
        ellipse = Ellipse((0, 0), 4 * math.sqrt(lam[1]), 4 * math.sqrt(lam[0]),
                          angle=math.degrees(math.atan2(vec[1, 1], vec[0, 1])), fill=False, color=colour, lw=1.5,
                          label=f"closed form 2σ, t = {t / t_star:.2g} t*")
        ax2.add_patch(ellipse)
    lim = 1.1 * float(np.abs(x).max())
    ax2.set_xlim(-lim, lim), ax2.set_ylim(-lim, lim)
    ax2.set_aspect("equal")
    ax2.legend(fontsize="x-small", loc="lower right", markerscale=4)
    ax2.set_title("tokens and the closure's 2σ ellipses", fontsize="medium")
    fig.suptitle(f"Attention with V = I, KᵀQ = {params['c']:g} I from N(0, Σ₀), λ_max(Σ₀) = 1 (MATH.md §10)",
                 fontsize="medium")
    Path(params["picture"]).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(params["picture"], dpi=100)


if __name__ == "__main__":
    attention_blowup.main()
