"""Three Dirac masses noised to a Gaussian and generated back (MATH.md §1.6, §1.3, §2; [B] three-Dirac figures).

Data X = Σⱼ wⱼ δ_{cⱼ}, c₁ = (2, 0), c₂ = (−1, √3), c₃ = (−1, −√3), w = (0.5, 0.3, 0.2); noise
Y ~ N(0, σ²I). The noising path Zₜ = aₜX + bₜY has the exact law Σⱼ wⱼ N(aₜcⱼ, bₜ²σ²I) (MATH.md §1.4 (b)):

* ``schedule=linear``: aₜ = 1 − t, bₜ = t, t ∈ [t_min, 1] — centres move straight to the origin while
  the spread grows like tσ;
* ``schedule=vp``: the variance-preserving Ornstein–Uhlenbeck bridge aτ = e^{−τ}, bτ = √(1 − e^{−2τ}),
  τ ∈ [τ_min, 12] (its probability flow is v_τ = −z − σ²∇log p_τ, MATH.md §2) — same endpoints, another
  speed of contraction and noising (``cosine`` and ``overshoot`` are accepted too).

``direction=reverse`` (default) generates: particles drawn from N(0, σ²I) at the noise end move
backwards under the exact flow-matching field (1.3) (``flow_matching``) down to t_min. MATH.md §1.6:
they land in N(a_{t_min}cⱼ, b_{t_min}²σ²I) with probabilities wⱼ, at RMS distance b_{t_min}σ√2 from the
nearest scaled atom (1.414·10⁻³ linear, 0.0632 OU at τ_min = 10⁻³).
``direction=forward`` noises: each particle carries its pair (X, Y) and moves with a'X + b'Y
(``pair_interpolation``, MATH.md §1.1) from t_min to the noise end.

Both directions step through the geometric grid tₖ = t_max (t_min/t_max)^{k/steps} (t = τ for ``vp``;
:meth:`FlowMatchingField.generation_times`), the constant Δt/t the singular data end needs (RK4 with
Δt/t ≲ 0.035 is converged there, MATH.md §1.3); the H5MD times are the schedule's own t (τ). The
report prints the cluster fractions against w with their binomial standard deviations and the RMS
distance against b_{t_min}σ√2 (reverse), or the second moment of the noised cloud against its exact
value (forward), and draws both schedules in both directions (the panels not run are recomputed on a
few hundred particles).

    python scenarios/three_diracs.py
    measureflow run scenarios/three_diracs.py --set schedule=vp --set n=5000
    measureflow run scenarios/three_diracs.py --set direction=forward --set schedule=vp
"""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np
import torch

import measureflow
from measureflow import Particles, Simulation, scenario
from measureflow.measures import GaussianMixture
from measureflow.parameters import Count, OneOf, Picture, Points, Positive, PositiveFloat, Steps

ATOMS = ((2.0, 0.0), (-1.0, math.sqrt(3.0)), (-1.0, -math.sqrt(3.0)))
WEIGHTS = (0.5, 0.3, 0.2)
#: The noise end of each schedule (MATH.md §1.6: τ_max = 12 for OU, where α_τ is e^{−12}-close to N(0, σ²I)).
NOISE_END = {"linear": 1.0, "cosine": 1.0, "overshoot": 1.0, "vp": 12.0}
DIRECTIONS = ("reverse", "forward")
#: Particles per panel that the figure recomputes.
FIGURE_PARTICLES = 300
COLOURS = ("tab:red", "tab:green", "tab:blue")


def atoms(dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(cⱼ (3, 2), wⱼ (3,)) of MATH.md §1.6."""
    return torch.tensor(ATOMS, dtype=dtype), torch.tensor(WEIGHTS, dtype=dtype)


def generation_field(schedule: str, sigma: float, t_min: float):
    """The exact flow-matching field (1.3) of the three atoms against N(0, σ²I) on [t_min, t_max]."""
    if schedule not in NOISE_END:
        raise measureflow.ParameterError(f"schedule must be one of {sorted(NOISE_END)}; received {schedule!r}")
    t_max = NOISE_END[schedule]
    if not 0 < t_min < t_max:
        raise measureflow.ParameterError(
            f"t_min must lie in (0, {t_max:g}) for schedule {schedule!r}; received {t_min!r}"
        )
    c, w = atoms()
    return measureflow.field("flow_matching", data=GaussianMixture.diracs(c, w), schedule=schedule, sigma=sigma,
                             t_min=t_min, t_max=t_max)


def configure(schedule: str, direction: str, n: int, sigma: float, t_min: float, seed: int, steps: int):
    """(start state, field, time grid) of one run: the geometric grid from the noise end to t_min
    (reverse), or the same grid the other way round (forward)."""
    if direction not in DIRECTIONS:
        raise measureflow.ParameterError(f"direction must be one of {DIRECTIONS}; received {direction!r}")
    if n < 1:
        raise measureflow.ParameterError(f"n must be a positive number of particles; received {n}")
    generation = generation_field(schedule, sigma, t_min)
    times = generation.generation_times(steps)
    c, w = atoms()
    g = torch.Generator().manual_seed(seed)
    noise = sigma * torch.randn(n, 2, generator=g, dtype=c.dtype)
    if direction == "reverse":
        return Particles(noise[None]), generation, times
    labels = torch.multinomial(w, n, replacement=True, generator=g)
    field = measureflow.field("pair_interpolation", x0=c[labels], x1=noise, schedule=schedule)
    return field.pairs.interpolate(t_min, schedule), field, times[::-1]


@scenario
def three_diracs(
    schedule: Annotated[str, OneOf(*sorted(NOISE_END))] = "linear",
    direction: Annotated[str, OneOf(*DIRECTIONS)] = "reverse",
    n: Points = 20000,
    sigma: Annotated[float, Positive(maximum=1e6)] = 1.0,
    t_min: PositiveFloat = 1e-3,
    steps: Steps = 200,
    every: Count = 5,
    seed: int = 0,
    out: str = "runs/three_diracs.h5",
    picture: Picture = "runs/three_diracs.png",
) -> Simulation:
    """Three Diracs noised to N(0, σ²I) and generated back under the linear or the OU (vp) schedule."""
    state, field, times = configure(schedule, direction, n, sigma, t_min, seed, steps)
    writers = [measureflow.get_registry().writer("h5md", out, every=every)] if out else []
    return Simulation(state, field, "rk4", times=times, writers=writers, seed=seed)


# -- the numbers ------------------------------------------------------------------------------------


def landing(x: torch.Tensor, schedule: str, sigma: float, t_min: float) -> dict:
    """Nearest scaled atom a_{t_min}cⱼ of each particle; cluster fractions and RMS distance (MATH.md §1.6)."""
    a, _, b, _ = (float(v) for v in measureflow.schedules.get(schedule).coefficients(t_min))
    c, w = atoms(x.dtype)
    dist, label = torch.cdist(x, a * c).min(1)
    n = x.shape[0]
    return {
        "label": label,
        "fractions": torch.bincount(label, minlength=3).to(x.dtype) / n,
        "binomial_sd": (w * (1 - w) / n).sqrt(),
        "rms": float(dist.pow(2).mean().sqrt()),
        "exact_rms": b * sigma * math.sqrt(2.0),
        # |z − acⱼ|²/(bσ)² ~ χ²₂, so the sample RMS has relative standard deviation 1/(2√n).
        "rms_sd": 1.0 / (2.0 * math.sqrt(n)),
    }


def second_moment(schedule: str, t: float, sigma: float) -> float:
    """E|Zₜ|² = aₜ² Σⱼ wⱼ|cⱼ|² + 2bₜ²σ² for the exact law Σⱼ wⱼ N(aₜcⱼ, bₜ²σ²I) in d = 2."""
    a, _, b, _ = (float(v) for v in measureflow.schedules.get(schedule).coefficients(t))
    c, w = atoms()
    return a * a * float((w * (c * c).sum(-1)).sum()) + 2.0 * b * b * sigma * sigma


@three_diracs.report
def report(result, params):
    """Print the landing statistics (reverse) or the noised second moment (forward); draw all panels."""
    schedule, sigma, t_min = params["schedule"], params["sigma"], params["t_min"]
    x = result.state.x[0]
    if params["direction"] == "reverse":
        k = landing(x, schedule, sigma, t_min)
        f, sd = k["fractions"].tolist(), k["binomial_sd"].tolist()
        z = [(fi - wi) / si for fi, wi, si in zip(f, WEIGHTS, sd)]
        print(f"reverse flow ({schedule}, n = {x.shape[0]}, t_min = {t_min:g}):")
        print("  cluster fractions = " + " ".join(f"{v:.4f}" for v in f)
              + "  (weights " + " ".join(f"{v:g}" for v in WEIGHTS) + "; binomial sd "
              + " ".join(f"{v:.4f}" for v in sd) + "; z = " + " ".join(f"{v:+.2f}" for v in z) + ")")
        rel = k["rms"] / k["exact_rms"] - 1.0
        print(f"  RMS distance to the nearest scaled atom = {k['rms']:.6e}; exact b(t_min)*sigma*sqrt(2) = "
              f"{k['exact_rms']:.6e}; relative error = {rel:+.3e} (Monte-Carlo sd {k['rms_sd']:.2e})")
    else:
        t_end = NOISE_END[schedule]
        got = float((x * x).sum(-1).mean())
        exact = second_moment(schedule, t_end, sigma)
        # |Z|² at the noise end is σ²χ²₂ up to e^{−τ}: relative sd of its sample mean 1/√n.
        print(f"forward noising ({schedule}, n = {x.shape[0]}): E|Z|^2 at t = {t_end:g} is {got:.6f}; "
              f"exact {exact:.6f} (relative error {got / exact - 1.0:+.3e}, "
              f"Monte-Carlo sd {1 / math.sqrt(x.shape[0]):.2e})")
    if params["picture"]:
        draw(params).savefig(params["picture"], dpi=110)
        print(f"wrote {params['picture']}")


# -- the picture ------------------------------------------------------------------------------------


def _frames(params, schedule: str, direction: str) -> np.ndarray:
    """(frames, N, 2) trajectories: the run's own (its first particles, which are i.i.d.) when it is
    this panel, else a small run in memory with the same grid, steps and seed (noising: its closed form)."""
    if params["schedule"] == schedule and params["direction"] == direction and params["out"]:
        with measureflow.open(params["out"]) as traj:
            keep = min(traj.size, FIGURE_PARTICLES)
            return np.stack([np.asarray(traj.positions[k])[0][:keep] for k in range(len(traj))])
    state, field, times = configure(schedule, direction, FIGURE_PARTICLES, params["sigma"], params["t_min"],
                                    params["seed"], params["steps"])
    every = max(1, params["every"])
    if direction == "forward":
        # The noising run has a closed form: the pairs' interpolant on the frames the run would write.
        frames = [*times[::every], *([times[-1]] if (len(times) - 1) % every else [])]
        return np.stack([field.pairs.interpolate(t, schedule).x[0].numpy() for t in frames])
    memory = measureflow.get_registry().writer("memory", every=every)
    Simulation(state, field, "rk4", times=times, writers=[memory], progress=False).run()
    return memory.positions[:, 0]


def _snapshot_times(schedule: str, t_min: float) -> list[float]:
    """Noising times marked: both ends and t = ¼, ½, ¾ — for vp the OU times τ = −log cos(πt/2), where
    the OU bridge has the coefficients (cos πt/2, sin πt/2) of the cosine clock (MATH.md §1.3)."""
    if schedule == "vp":
        inner = [-math.log(math.cos(math.pi * t / 2)) for t in (0.25, 0.5, 0.75)]
    else:
        inner = [0.25, 0.5, 0.75]
    return [t_min, *inner, NOISE_END[schedule]]


def draw(params):
    """2 × 2 panels: noising paths and reverse trajectories, for the run's schedule and the other one."""
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    sigma, t_min = params["sigma"], params["t_min"]
    schedules = [params["schedule"], "vp" if params["schedule"] != "vp" else "linear"]
    c, _ = atoms()
    fig = Figure(figsize=(11, 10.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True, sharey=True)
    for row, schedule in enumerate(schedules):
        plain = measureflow.schedules.get(schedule)
        name = "OU (vp), τ" if schedule == "vp" else f"{schedule}, t"
        # Noising: paths Zₜ = aₜX + bₜY of pairs (X, Y), coloured by their atom, and the centres aₜcⱼ.
        ax = axes[row, 0]
        frames = _frames(params, schedule, "forward")
        source = np.argmin(((frames[0][:, None, :] - c.numpy()[None]) ** 2).sum(-1), axis=1)
        for j in range(3):
            ax.add_collection(LineCollection(np.transpose(frames[:, source == j], (1, 0, 2)), colors=COLOURS[j],
                                             linewidths=0.5, alpha=0.45))
        ax.scatter(frames[-1][:, 0], frames[-1][:, 1], s=6, color="0.3", lw=0, zorder=3,
                   label=f"end ~ N(0, σ²I) at {name} = {NOISE_END[schedule]:g}")
        dense = torch.exp(torch.linspace(math.log(t_min), math.log(NOISE_END[schedule]), 400, dtype=torch.float64))
        a_dense = plain.coefficients(dense)[0].numpy()
        for j in range(3):
            ax.plot(a_dense * float(c[j, 0]), a_dense * float(c[j, 1]), color="black", lw=1.2, zorder=3,
                    label="centres aₜcⱼ" if j == 0 else None)
        marks = _snapshot_times(schedule, t_min)[1:-1]
        a_marks = plain.coefficients(torch.tensor(marks, dtype=torch.float64))[0].numpy()
        ax.scatter(np.outer(a_marks, c[:, 0].numpy()), np.outer(a_marks, c[:, 1].numpy()), marker="o", s=22,
                   facecolor="white", edgecolor="black", zorder=5,
                   label=f"{name} = " + ", ".join(f"{t:.3g}" for t in marks))
        ax.set_title(f"noising, {schedule}: Zₜ = aₜX + bₜY from each atom\n{frames.shape[1]} pairs; "
                     f"spread bₜσ, centres aₜcⱼ", fontsize="medium")
        ax.legend(loc="lower left", fontsize="x-small", markerscale=1.5, framealpha=0.85)
        # Generation: trajectories from noise, coloured by the atom they reach.
        ax = axes[row, 1]
        frames = _frames(params, schedule, "reverse")
        k = landing(torch.as_tensor(frames[-1]), schedule, sigma, t_min)
        for j in range(3):
            mine = (k["label"] == j).numpy()
            ax.add_collection(LineCollection(np.transpose(frames[:, mine], (1, 0, 2)), colors=COLOURS[j],
                                             linewidths=0.5, alpha=0.5))
        ax.scatter(frames[0][:, 0], frames[0][:, 1], s=6, color="0.3", lw=0, zorder=3, label="start ~ N(0, σ²I)")
        f = " / ".join(f"{v:.2f}" for v in k["fractions"].tolist())
        ax.set_title(f"generation, {schedule}: reverse flow to {name} = {t_min:g}\n"
                     f"{frames.shape[1]} paths; fractions {f} (weights 0.5 / 0.3 / 0.2)", fontsize="medium")
        ax.legend(loc="lower left", fontsize="x-small", markerscale=2, framealpha=0.85)
        for ax in axes[row]:
            ax.scatter(c[:, 0], c[:, 1], marker="*", s=[300 * w for w in WEIGHTS], color="black", zorder=4)
            ax.set_aspect("equal")
    for ax in axes[-1]:
        ax.set_xlabel("x₁")
    for ax in axes[:, 0]:
        ax.set_ylabel("x₂")
    fig.suptitle(f"Three Diracs (stars, area ∝ weight) and N(0, σ²I), σ = {sigma:g}: noising paths and reverse "
                 "probability flows", fontsize="large")
    return fig


if __name__ == "__main__":
    three_diracs.main()
