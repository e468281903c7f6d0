"""Three Diracs generated from noise under the linear, variance-preserving and overshoot schedules
(MATH.md §1.3, §1.6).

Data: atoms c₁ = (2, 0), c₂ = (−1, √3), c₃ = (−1, −√3) with weights w = (0.5, 0.3, 0.2); noise
N(0, σ²I), σ = 1. The exact flow-matching field (``flow_matching``, posterior form eq. 1.3) of the
interpolant Zₜ = aₜX + bₜY is integrated backwards from the noise end (t = 1, or τ_max = 12 for
``vp``) to t_min = 10⁻³ with RK4 on the geometric grid of ``generation_times`` (Δt/t ≤ ``ratio`` =
0.02, MATH.md §1.3). Exactly, the particles land in N(a_{tmin}cⱼ, b_{tmin}²σ²I) with probabilities
wⱼ, so

* the fraction of particles nearest to each scaled atom a_{tmin}cⱼ is binomial(N, wⱼ)/N;
* the RMS distance to the nearest scaled atom is b_{tmin}σ√2 (d = 2).

The schedules share the end points but not the path: ``linear`` (aₜ = 1 − t, bₜ = t) gives
nearly radial paths, ``vp`` (a = e^{−τ}, b = √(1 − e^{−2τ})) contracts and de-noises at other
relative speeds, and ``overshoot`` (aₜ = (1 − t)(1 − 2t), bₜ = t) has aₜ < 0 on (½, 1): there the
mixture centres aₜcⱼ are the atoms reflected through 0, and the reverse paths bend accordingly.

Yet the three send a noise draw to the same place inside its cluster: by eq. (1.3), u = z/b moves by
du/dr = E[X | rX + Y = u] with r = a/b, whatever the schedule, so only the range of r matters. The
overshoot's r leaves 0 at t = 1 and is back at 0 at t = ½ (there z = z₁/2 exactly), then runs over
the linear schedule's values; the variance-preserving r = e^{−τ}/√(1 − e^{−2τ}) covers nearly the same
range. The report prints both identities from the figure's paths.

The run writes an H5MD trajectory of ``frames`` + 1 frames, evenly spaced in log t (the grid is
geometric), with the RMS distance to the nearest centre aₜcⱼ. The report prints the cluster
fractions and the RMS for the simulated schedule, repeats them with a few hundred particles for the
other two, and draws the three sets of paths from the same noise draws side by side.

    python scenarios/schedule_comparison.py --set schedule=overshoot
    measureflow run scenarios/schedule_comparison.py --set schedule=vp --set n=5000
"""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np
import torch

import measureflow
from measureflow import Particles, Simulation, scenario
from measureflow.measures import GaussianMixture
from measureflow.parameters import Picture, Points, Positive, PositiveFloat, Range, Size
from measureflow.simulation import Observer
from measureflow.triggers import On

SCHEDULES = ("linear", "vp", "overshoot")
ATOMS = ((2.0, 0.0), (-1.0, math.sqrt(3.0)), (-1.0, -math.sqrt(3.0)))
WEIGHTS = (0.5, 0.3, 0.2)
#: MATH.md §1.3: RK4 with Δt/t ≲ 0.02 is stable near the atomic data end.
RATIO = 0.02


def atoms(dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(ATOMS, dtype=dtype)


def make_field(schedule: str, sigma: float = 1.0, t_min: float = 1e-3):
    """The exact flow-matching field of the three atoms against N(0, σ²I) (MATH.md §1.2, eq. 1.3)."""
    if schedule not in SCHEDULES + ("cosine",):
        raise measureflow.ParameterError(
            f"schedule must be one of {', '.join(SCHEDULES)} (or cosine); received {schedule!r}"
        )
    data = GaussianMixture.diracs(atoms(), torch.tensor(WEIGHTS, dtype=torch.float64))
    return measureflow.field("flow_matching", data=data, schedule=schedule, sigma=sigma, t_min=t_min)


def generation_grid(field, ratio: float) -> list[float]:
    """The field's geometric grid from the noise end to t_min with Δt/t ≤ ``ratio`` per RK4 step.

    Near the singular data end t = 0 the field's Lipschitz constant grows like 1/t (MATH.md §1.3),
    so a constant Δt/t keeps RK4 stable and accurate however close to 0 the run ends.
    """
    if not ratio > 0:
        raise measureflow.ParameterError(f"ratio must be a positive Δt/t per step; received {ratio!r}")
    lo, hi = field.time_range
    return field.generation_times(max(1, math.ceil(math.log(hi / lo) / ratio - 1e-9)))


def frame_steps(steps: int, frames: int) -> On:
    """The ``frames`` + 1 grid steps written (0, the last, and evenly spaced between): on the geometric
    grid they are evenly spaced in log t."""
    frames = max(1, min(int(frames), steps))
    return On(round(k * steps / frames) for k in range(frames + 1))


def noise_particles(field, n: int, seed: int) -> Particles:
    """n draws of N(0, σ²I), the noise end every schedule starts from (same draws for every schedule)."""
    return Particles(field.noise_sample(n, torch.Generator().manual_seed(seed))[None])


def centres(field, t: float) -> torch.Tensor:
    """The mixture centres aₜcⱼ of αₜ = Σⱼ wⱼ N(aₜcⱼ, bₜ²σ²I)."""
    a, _, _, _ = field.coefficients(t)
    return a * atoms()


def nearest_centre_rms(state, *, field=None, t=0.0, **_):
    """RMS distance of the particles to their nearest centre aₜcⱼ (per replica)."""
    c = centres(field, t).to(state.x)
    d2 = ((state.x[..., None, :] - c) ** 2).sum(-1).amin(-1)
    return d2.mean(-1).sqrt()


def cluster_numbers(x: torch.Tensor, field) -> dict:
    """Cluster fractions and RMS distance at the data end against MATH.md §1.6 (x of shape (N, 2))."""
    t = field.time_range[0] if field.convention == "noising" else field.time_range[1]
    c = centres(field, t).to(x)
    d2 = ((x[:, None, :] - c) ** 2).sum(-1)
    nearest = d2.argmin(-1)
    n = x.shape[0]
    w = torch.tensor(WEIGHTS, dtype=torch.float64)
    fractions = torch.bincount(nearest, minlength=3).double() / n
    _, _, b, _ = field.coefficients(t)
    exact_rms = b * field.sigma * math.sqrt(2.0)
    rms = float(d2.amin(-1).mean().sqrt())
    return {
        "n": n,
        "t_min": t,
        "fractions": fractions.tolist(),
        "weights": list(WEIGHTS),
        # Binomial standard deviation of a fraction: √(w(1 − w)/N).
        "z": ((fractions - w) / torch.sqrt(w * (1 - w) / n)).tolist(),
        "rms": rms,
        "exact_rms": exact_rms,
    }


@scenario
def schedule_comparison(
    schedule: str = "overshoot",
    n: Points = 20000,
    sigma: Annotated[float, Positive(maximum=1e6)] = 1.0,
    t_min: PositiveFloat = 1e-3,
    frames: Annotated[int, Size(bytes_each=64)] = 20,
    ratio: Annotated[float, Range(1e-4, 1.0)] = RATIO,
    seed: int = 0,
    figure_particles: Annotated[int, Size(minimum=0)] = 300,
    out: str = "runs/schedule_comparison.h5",
    picture: Picture = "runs/schedule_comparison.png",
) -> Simulation:
    """Three Diracs generated from N(0, I) by the exact flow-matching field of one schedule."""
    field = make_field(schedule, sigma, t_min)
    times = generation_grid(field, ratio)
    written = frame_steps(len(times) - 1, frames)
    return Simulation(
        noise_particles(field, n, seed),
        field,
        "rk4",
        times=times,
        writers=[measureflow.get_registry().writer("h5md", out, every=written)] if out else [],
        observers=[Observer(nearest_centre_rms, name="nearest_centre_rms", every=written)],
        seed=seed,
    )


def generate_paths(schedule: str, params: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """Paths (steps + 1, n, 2), times and end numbers of ``figure_particles`` noise draws under ``schedule``.

    The grid is the run's geometric one, plus t = ½ when it is inside the range (where the overshoot
    schedule's centres come back through 0).
    """
    field = make_field(schedule, params["sigma"], params["t_min"])
    lo, hi = field.time_range
    grid = generation_grid(field, params["ratio"])
    if lo < 0.5 < hi:
        grid = sorted(set(grid) | {0.5}, reverse=True)
    # Same seed as the run: the draws coincide with the run's first particles.
    state = noise_particles(field, params["figure_particles"], params["seed"])
    memory = measureflow.get_registry().writer("memory", every=1)
    result = Simulation(state, field, "rk4", times=grid, writers=[memory], progress=False).run()
    return memory.positions[:, 0], np.asarray(grid), cluster_numbers(result.state.x[0], field)


def scaled_offsets(path: np.ndarray, times: np.ndarray, schedule: str, params: dict) -> np.ndarray:
    """(x − a cⱼ)/b at the end of each path, cⱼ the nearest atom: the draw's position inside its cluster."""
    field = make_field(schedule, params["sigma"], params["t_min"])
    a, _, b, _ = field.coefficients(float(times[-1]))
    c = atoms().numpy()
    end = path[-1]
    j = np.argmin(((end[:, None, :] - a * c[None]) ** 2).sum(-1), axis=1)
    return (end - a * c[j]) / b


def _print_numbers(label: str, numbers: dict) -> None:
    fr = ", ".join(f"{f:.4f}" for f in numbers["fractions"])
    z = ", ".join(f"{v:+.1f}" for v in numbers["z"])
    ratio = numbers["rms"] / numbers["exact_rms"]
    print(f"  {label:<10} N = {numbers['n']:>6}  fractions ({fr})  [{z}] binomial σ;  "
          f"RMS {numbers['rms']:.4e} vs b√2σ = {numbers['exact_rms']:.4e} (ratio {ratio:.4f})")


@schedule_comparison.report
def report(result, params):
    schedule = params["schedule"]
    field = make_field(schedule, params["sigma"], params["t_min"])
    numbers = cluster_numbers(result.state.x[0].double(), field)
    print(f"three Diracs, weights {WEIGHTS}, generated down to t_min = {numbers['t_min']:g}; exact: fractions = "
          "weights, RMS distance to the nearest scaled atom = b σ √2 (MATH.md §1.6)")
    _print_numbers(schedule, numbers)
    if params["figure_particles"] < 1:
        return
    runs = {name: generate_paths(name, params) for name in SCHEDULES}
    for name in SCHEDULES:
        if name != schedule:
            _print_numbers(name, runs[name][2])
    # z/b moves by du/dr = E[X | rX + Y = u] with r = a/b, whatever the schedule: schedules with the
    # same end values of r send a noise draw to the same place inside its cluster. The overshoot's
    # r = (1 − t)(1 − 2t)/t leaves 0 at t = 1 and comes back to 0 at t = ½, so there z = z₁/2 exactly.
    lin = scaled_offsets(*runs["linear"][:2], "linear", params)
    for name in ("vp", "overshoot"):
        other = scaled_offsets(*runs[name][:2], name, params)
        print(f"  same draws, linear vs {name}: max |Δ (x − a cⱼ)/b| = {np.abs(lin - other).max():.1e} at t_min")
    path, times, _ = runs["overshoot"]
    half = int(np.argmin(np.abs(times - 0.5)))
    print(f"  overshoot at t = ½: max |z(½) − z(1)/2| = {np.abs(path[half] - 0.5 * path[0]).max():.1e}")
    if params["picture"]:
        draw(params, runs, result.state.x[0])
        print(f"wrote {params['picture']}")


def draw(params, runs: dict, final: torch.Tensor, drawn: int = 120):
    from pathlib import Path

    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    colours = ("C0", "C1", "C2")
    titles = {
        "linear": r"linear: $a_t = 1 - t$, $b_t = t$",
        "vp": r"variance preserving: $a_\tau = e^{-\tau}$, $b_\tau = \sqrt{1 - e^{-2\tau}}$",
        "overshoot": r"overshoot: $a_t = (1 - t)(1 - 2t)$, $b_t = t$",
    }
    fig = Figure(figsize=(16.0, 4.9), layout="constrained")
    grid = fig.add_gridspec(1, 4, width_ratios=[1, 1, 1, 0.95])
    c = atoms().numpy()
    for k, name in enumerate(SCHEDULES):
        ax = fig.add_subplot(grid[0, k])
        path, times, numbers = runs[name]
        field = make_field(name, params["sigma"], params["t_min"])
        ends = np.argmin(((path[-1][:, None, :] - c[None] * field.coefficients(times[-1])[0]) ** 2).sum(-1), axis=1)
        show = min(drawn, path.shape[1])
        segments = [path[:, i, :] for i in range(show)]
        ax.add_collection(LineCollection(segments, colors=[colours[j] for j in ends[:show]], linewidths=0.6,
                                         alpha=0.55))
        ax.scatter(path[0, :show, 0], path[0, :show, 1], s=5, color="0.45", zorder=3, label="noise draws, t = 1")
        if name == "overshoot":
            half = int(np.argmin(np.abs(times - 0.5)))
            ax.scatter(path[half, :show, 0], path[half, :show, 1], s=4, color="magenta", alpha=0.7, zorder=3,
                       label="t = ½: z₁/2 exactly")
        # The centres aₜcⱼ along the path: for the overshoot they cross 0 at t = ½ and are reflected on (½, 1).
        fine = np.linspace(field.time_range[0], field.time_range[1], 400)
        coeff = np.array([field.coefficients(float(t))[0] for t in fine])
        for j in range(3):
            ax.plot(coeff * c[j, 0], coeff * c[j, 1], color="black", lw=1.6, zorder=4)
        if name == "overshoot":
            reflected = (fine > 0.5) & (fine < 1.0)
            for j in range(3):
                ax.plot(coeff[reflected] * c[j, 0], coeff[reflected] * c[j, 1], color="magenta", lw=3.0, zorder=5,
                        label="centres aₜcⱼ, t ∈ (½, 1): reflected" if j == 0 else None)
        ax.scatter(c[:, 0], c[:, 1], s=60, marker="*", color="black", zorder=6, label="atoms cⱼ (centres aₜcⱼ: black)")
        ax.set_xlim(-3.2, 3.2)
        ax.set_ylim(-3.2, 3.2)
        ax.set_aspect("equal")
        ax.set_xlabel("x₁")
        if k == 0:
            ax.set_ylabel("x₂")
        fr = ", ".join(f"{f:.2f}" for f in numbers["fractions"])
        ax.set_title(f"{titles[name]}\n{show} of {path.shape[1]} paths drawn; fractions ({fr})", fontsize="small")
        ax.legend(fontsize="x-small", loc="lower left")

    # The data coefficient against the noise coefficient: the three paths share the end points (1, 0)
    # and (0, 1); only the overshoot goes through a < 0.
    ax = fig.add_subplot(grid[0, 3])
    for k, name in enumerate(SCHEDULES):
        field = make_field(name, params["sigma"], params["t_min"])
        # The generation grid is geometric near the data end, where b changes fastest (vp: b ~ √(2τ)).
        ab = np.array([field.coefficients(t) for t in field.generation_times(400)])
        ax.plot(ab[:, 2], ab[:, 0], color=f"C{k + 3}", lw=1.8, label=name)
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.fill_between([0.5, 1.0], -0.2, 0.0, color="magenta", alpha=0.12, lw=0,
                    label="overshoot, t ∈ (½, 1): centres reflected")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.2, 1.02)
    ax.set_xlabel("noise coefficient bₜ")
    ax.set_ylabel("data coefficient aₜ")
    ax.set_title("schedules in the (b, a) plane", fontsize="small")
    ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=2)
    fig.suptitle(f"Reverse probability flow to three Diracs (weights {WEIGHTS}) from N(0, σ²I), σ = "
                 f"{params['sigma']:g}; run: {params['schedule']}, N = {final.shape[0]} (MATH.md §1.6)",
                 fontsize="medium")
    Path(params["picture"]).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(params["picture"], dpi=110)


if __name__ == "__main__":
    schedule_comparison.main()
