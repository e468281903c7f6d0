"""The Gaussian-closure table toward γ = N(0, I) (MATH.md §13), particles beside their closures.

Every row starts from the same law N(0, diag(4, ¼)) and descends its functional toward γ:

====================  ============================================  ===============================
row                   Ċ of the closure (centred, C = Σ)             exact solution (MATH.md)
====================  ============================================  ===============================
``kl``                2(I − C)                                      I + (C₀ − I)e^{−2t}        (§3)
``fisher``            2(C⁻¹ − C)                                    (I + (C₀² − I)e^{−4t})^{1/2} (§4)
``w2``                4(C^{1/2} − C)                                (I + e^{−2t}(C₀^{1/2} − I))² (§5)
``mmd`` (⟨x, y⟩²)     8(C − C²)                                     C₀e^{8t}(I − C₀ + C₀e^{8t})⁻¹ (§6)
``sinkhorn`` (ε = 1)  (16C + ε²I)^{1/2} − (16C² + ε²I)^{1/2}        none (§7)
``sliced_wasserstein``  V(C)C + CV(C)                               none (V closed form, §8)
====================  ============================================  ===============================

How the particles move, row by row:

* ``kl``: Langevin dynamics dX = −X dt + √2 dW under Euler–Maruyama (bias O(h));
* ``fisher``: the moment closure v(x) = Σ̂⁻²(x − m̂) − x (∇log μ of particles does not exist; §4);
* ``w2``: v = 2(T(x) − x) with T the exact assignment onto M = n samples of γ (network simplex);
* ``mmd``: the polynomial kernel ⟨x, y⟩² against γ's moments (the field is linear in x);
* ``sinkhorn``: Sinkhorn potentials against M = n samples of γ, ε = 1;
* ``sliced_wasserstein``: quadrature directions, monotone maps onto γ's projections (analytic target).

The scenario returns the particle run of ``row`` (written to ``out``); the report integrates the
Gaussian closure of every row (RK4, ``closure_steps`` steps), runs the particles of the other rows
(without writing them; ``all_rows=false`` skips them), prints the closure's covariance at t = ½ against
MATH.md's reference numbers and the particles' relative error against the closure, and draws the
covariance eigenvalues of all rows and their energies in one figure ``picture``.

    python scenarios/closure_table.py
    OMP_NUM_THREADS=1 measureflow run scenarios/closure_table.py --set row=w2 --set n=3000
"""

from __future__ import annotations

import contextlib
import math
from typing import Annotated

import numpy as np
import torch

import measureflow
from measureflow import Gaussians, Simulation, scenario
from measureflow.measures import Empirical, Gaussian
from measureflow.parameters import Count, OneOf, Picture, Points, Steps

ROWS = ("kl", "fisher", "w2", "mmd", "sinkhorn", "sliced_wasserstein")
LABELS = {
    "kl": "KL (Langevin)",
    "fisher": "Fisher (moment closure)",
    "w2": "W₂² (exact assignment)",
    "mmd": "MMD², k = ⟨x, y⟩²",
    "sinkhorn": "Sinkhorn S_ε, ε = 1",
    "sliced_wasserstein": "sliced W₂²",
}
#: MATH.md §3–§8: the covariance at t = ½ from diag(4, ¼), seven decimals.
REFERENCE = {
    "kl": (2.1036383, 0.7240904),
    "fisher": (1.7406979, 0.9344106),
    "w2": (1.8710942, 0.6659544),
    "mmd": (1.0139281, 0.9479150),
    "sinkhorn": (1.8787632, 0.6358442),
    "sliced_wasserstein": (2.8480381, 0.3047682),
}
#: Rows whose particles see γ through samples (M = n); their error has two sampling terms.
SAMPLED_TARGET = ("w2", "sinkhorn")
T1 = 1.0
HALF = 0.5
EPSILON = 1.0


def initial_law(dtype=torch.float64) -> Gaussians:
    return Gaussians(torch.zeros(1, 2, dtype=dtype), torch.diag(torch.tensor([4.0, 0.25], dtype=dtype))[None])


def gamma(dtype=torch.float64) -> Gaussian:
    return Gaussian(torch.zeros(2, dtype=dtype), torch.eye(2, dtype=dtype))


def check_row(row: str) -> str:
    if row not in ROWS:
        raise measureflow.ParameterError(f"row must be one of {', '.join(ROWS)}; received {row!r}")
    return row


def make_field(row: str, particles: bool = False, n: int = 0, seed: int = 0):
    """The row's field toward γ; for particles, samples of γ where the field needs them (M = n)."""
    target = gamma()
    if row == "kl":
        return measureflow.field("kl", target=target, mode="langevin")
    if row == "fisher":
        return measureflow.field("fisher", target=target)
    if row == "w2":
        if particles:
            samples = target.sample(n, torch.Generator().manual_seed(seed + 1000))
            return measureflow.field("w2", target=Empirical(samples))
        return measureflow.field("w2", target=target)
    if row == "mmd":
        return measureflow.field("mmd", target=target, kernel="poly2")
    if row == "sinkhorn":
        return measureflow.field("sinkhorn", target=target, epsilon=EPSILON, samples=n if particles else None,
                                 seed=seed + 1000)
    if row == "sliced_wasserstein":
        return measureflow.field("sliced_wasserstein", target=target)
    check_row(row)


def check_grid(steps: int, every: int, name: str) -> None:
    """t = ½ must be an observed step: ``every`` divides steps/2."""
    if steps < 2 or steps % 2 or (steps // 2) % every:
        raise measureflow.ParameterError(
            f"{name} = {steps} with every = {every}: t = ½ must be observed, so {name} must be even and "
            f"{name}/2 a multiple of every"
        )


def particle_simulation(row: str, n: int, steps: int, every: int, seed: int, out: str = "") -> Simulation:
    # The run's generator (Langevin noise) is seeded with `seed`; the starting draw takes its own
    # stream, or the first noise would repeat the draw's normals and correlate with the positions.
    start = initial_law().sample(n, torch.Generator().manual_seed(seed + 2000))
    field = make_field(row, particles=True, n=n, seed=seed)
    writers = [measureflow.get_registry().writer("h5md", out, every=every)] if out else []
    return Simulation(start, field, "euler_maruyama" if row == "kl" else "rk4", t0=0.0, t1=T1, steps=steps,
                      writers=writers, observers=["mean", "covariance"], observe_every=every, seed=seed)


def closure_simulation(row: str, steps: int, every: int) -> Simulation:
    return Simulation(initial_law(), make_field(row), "rk4", t0=0.0, t1=T1, steps=steps,
                      observers=["covariance", "energy"], observe_every=every)


@scenario
def closure_table(
    row: Annotated[str, OneOf(*ROWS)] = "kl",
    n: Points = 2000,
    steps: Steps = 40,
    every: Count = 2,
    sinkhorn_n: Points = 300,
    sinkhorn_steps: Steps = 10,
    closure_steps: Steps = 200,
    all_rows: bool = True,
    seed: int = 0,
    out: str = "runs/closure_table.h5",
    picture: Picture = "runs/closure_table.png",
) -> Simulation:
    """Particles from N(0, diag(4, ¼)) toward γ beside the Gaussian closure, one row of MATH.md §13."""
    check_row(row)
    check_grid(steps, every, "steps")
    check_grid(sinkhorn_steps, 1, "sinkhorn_steps")
    check_grid(closure_steps, 1, "closure_steps")
    n, steps, every = particle_sizes(row, dict(n=n, steps=steps, every=every, sinkhorn_n=sinkhorn_n,
                                                sinkhorn_steps=sinkhorn_steps))
    return particle_simulation(row, n, steps, every, seed, out)


def particle_sizes(row: str, params) -> tuple[int, int, int]:
    """(n, steps, every) of a row's particle run: Sinkhorn's O(n²) sweeps get their own, smaller sizes."""
    if row == "sinkhorn":
        return params["sinkhorn_n"], params["sinkhorn_steps"], 1
    return params["n"], params["steps"], params["every"]


# -- numbers -------------------------------------------------------------------------------------------


def eigenvalues(covariances) -> np.ndarray:
    """Descending eigenvalues (K, d) of a series of covariances (K, 1, d, d) or (K, d, d)."""
    c = torch.as_tensor(np.asarray(covariances)).reshape(-1, 2, 2)
    return torch.linalg.eigvalsh(0.5 * (c + c.transpose(-1, -2))).flip(-1).numpy()


def at(series, t: float) -> int:
    k = int(np.argmin(np.abs(series.times - t)))
    assert abs(series.times[k] - t) < 1e-9, (series.times[k], t)
    return k


def closure_numbers(row: str, closure_steps: int) -> dict:
    """The closure's run: times, eigenvalues and energy over [0, 1], covariance at t = ½, exact solution."""
    # Every step: the particles' observation times are then nodes of the closure's series.
    result = closure_simulation(row, closure_steps, 1).run()
    if not result.ok:
        raise measureflow.StateError(f"closure of row {row!r}: {result.status}")
    cov = result.observables["covariance"]
    energy = result.observables["energy"]
    half = np.asarray(cov.values[at(cov, HALF)]).reshape(2, 2)
    numbers = {
        "times": np.asarray(cov.times),
        "eig": eigenvalues(cov.values),
        "energy_times": np.asarray(energy.times),
        "energy": np.ravel(np.asarray(energy.values)),
        "half": half,
        "reference": np.array(REFERENCE[row]),
    }
    field = make_field(row)
    if hasattr(field, "solution"):
        ts = np.linspace(0.0, T1, 201)
        exact = [field.solution(float(t), initial_law()).cov for t in ts]
        numbers["exact_times"] = ts
        numbers["exact_eig"] = eigenvalues(torch.stack(exact).numpy())
    return numbers


def particle_numbers(row: str, cov_series, closure: dict) -> dict:
    """Relative eigenvalue error of the particles against the closure, at t = ½ and over the run."""
    times = np.asarray(cov_series.times)
    eig = eigenvalues(cov_series.values)
    ref = np.stack([np.interp(times, closure["times"], closure["eig"][:, k]) for k in range(2)], 1)
    rel = np.abs(eig / ref - 1.0).max(axis=1)
    return {"times": times, "eig": eig, "rel_half": float(rel[at(cov_series, HALF)]), "rel_max": float(rel.max())}


def sampling_bound(row: str, n: int, steps: int) -> float:
    """4 standard errors of a sample covariance's eigenvalue, relative: √(2/n) per draw of n points.

    Every row's closure damps relative eigenvalue errors (d log λ/dt is decreasing in log λ for
    each Ċ of MATH.md §13), so the error of the starting draw does not grow; rows that also sample γ
    (M = n) add a second, independent draw; Euler–Maruyama (kl) adds its bias, ≤ h relative
    (OU: stationary variance 1/(1 − h/2), transient (1 − h)^{2k} against e^{−2kh}).
    """
    draws = 2 if row in SAMPLED_TARGET else 1
    bias = T1 / steps if row == "kl" else 0.0
    return 4 * math.sqrt(draws) * math.sqrt(2.0 / n) + bias


def all_numbers(result, params) -> dict:
    """Per row: closure numbers and, where a particle run is at hand, its errors (the chosen row from
    ``result``; the others run here unless ``all_rows`` is false)."""
    table = {}
    for row in ROWS:
        closure = closure_numbers(row, params["closure_steps"])
        entry = {"closure": closure}
        if row == params["row"]:
            series = result.observables["covariance"]
        elif params["all_rows"]:
            run = particle_simulation(row, *particle_sizes(row, params), params["seed"]).run()
            if not run.ok:
                raise measureflow.StateError(f"particles of row {row!r}: {run.status}")
            series = run.observables["covariance"]
        else:
            series = None
        if series is not None:
            entry["particles"] = particle_numbers(row, series, closure)
            n, steps, _ = particle_sizes(row, params)
            entry["bound"] = sampling_bound(row, n, steps)
            entry["n"] = n
        table[row] = entry
    return table


@contextlib.contextmanager
def one_thread():
    """Small tensors (10³ points, 2×2 matrices): a thread pool only adds fork-join stalls, which on a
    loaded machine make these runs several times slower. The numbers do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@closure_table.report
def report(result, params):
    with one_thread():
        table = all_numbers(result, params)
    n, steps = params["n"], params["steps"]
    print(f"covariance at t = ½ from diag(4, ¼) toward γ: closure (RK4, h = {T1 / params['closure_steps']:g}) "
          f"against MATH.md; particles (n = {n}, h = {T1 / steps:g}; sinkhorn n = {params['sinkhorn_n']}, "
          f"h = {T1 / params['sinkhorn_steps']:g}) against the closure")
    print(f"  {'row':<20}{'closure diag':>26}{'MATH.md':>26}{'max |Δ|':>10}{'off-diag':>10}"
          f"{'rel. err ½':>12}{'max rel.':>10}{'bound':>8}")
    for row, entry in table.items():
        c = entry["closure"]
        diag = np.diag(c["half"])
        delta = np.abs(diag - c["reference"]).max()
        line = (f"  {row:<20}{diag[0]:>13.7f}{diag[1]:>13.7f}{c['reference'][0]:>13.7f}{c['reference'][1]:>13.7f}"
                f"{delta:>10.1e}{abs(c['half'][0, 1]):>10.1e}")
        if "particles" in entry:
            p = entry["particles"]
            line += f"{p['rel_half']:>12.2%}{p['rel_max']:>10.2%}{entry['bound']:>8.2%}"
        print(line)
    if params["picture"]:
        draw(table, params)
        print(f"wrote {params['picture']}")
    return table


# -- figure --------------------------------------------------------------------------------------------


def draw(table: dict, params) -> None:
    from pathlib import Path

    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(14, 8.4), layout="constrained")
    axes = fig.subplots(2, 4).ravel()
    colours = ("C0", "C3")
    for ax, (row, entry) in zip(axes, table.items()):
        c = entry["closure"]
        for k in range(2):
            ax.plot(c["times"], c["eig"][:, k], color=colours[k], lw=1.6)
            if "exact_eig" in c:
                ax.plot(c["exact_times"], c["exact_eig"][:, k], color="black", lw=1.0, ls=(0, (3, 3)))
            if "particles" in entry:
                p = entry["particles"]
                ax.plot(p["times"], p["eig"][:, k], ls="none", marker="o", ms=3.5, mfc="none",
                        mec=colours[k], mew=0.9)
        ax.axhline(1.0, color="0.7", lw=0.8, zorder=0)
        ax.axvline(HALF, color="0.85", lw=0.8, zorder=0)
        ax.set_yscale("log")
        ax.set_ylim(0.2, 4.6)
        ax.set_yticks([0.25, 0.5, 1, 2, 4], ["¼", "½", "1", "2", "4"])
        ax.minorticks_off()
        title = LABELS[row]
        if "particles" in entry:
            title += f"\nn = {entry['n']}; at t = ½ {entry['particles']['rel_half']:.1%} off the closure"
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("t")
        ax.set_ylabel("eigenvalues of Σ(t)")
    ax = axes[len(table)]
    for j, (row, entry) in enumerate(table.items()):
        c = entry["closure"]
        ax.plot(c["energy_times"], c["energy"], color=f"C{j}", lw=1.6, label=LABELS[row].split(" (")[0])
    ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("F(closure) − F(γ)")
    ax.set_title("energies of the closures", fontsize="medium")
    ax.legend(fontsize="x-small", loc="lower left")
    legend_ax = axes[len(table) + 1]
    legend_ax.axis("off")
    handles = [
        Line2D([], [], color=colours[0], lw=1.6, label="λ₁, Gaussian closure (RK4)"),
        Line2D([], [], color=colours[1], lw=1.6, label="λ₂, Gaussian closure (RK4)"),
        Line2D([], [], color="0.3", ls="none", marker="o", mfc="none", label="particles (sample covariance)"),
        Line2D([], [], color="black", lw=1.0, ls=(0, (3, 3)), label="exact solution (MATH.md §3–§6)"),
        Line2D([], [], color="0.7", lw=0.8, label="γ: λ = 1"),
    ]
    legend_ax.legend(handles=handles, loc="center", fontsize="small", frameon=False)
    fig.suptitle("Gaussian closures toward γ = N(0, I) from N(0, diag(4, ¼)) (MATH.md §13); "
                 "KL particles: Langevin, Euler–Maruyama", fontsize="medium")
    Path(params["picture"]).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(params["picture"], dpi=100)


if __name__ == "__main__":
    torch.set_num_threads(1)  # see one_thread
    closure_table.main()
