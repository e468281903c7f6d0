"""A 1-D Gaussian mixture carried to noise by the Ornstein–Uhlenbeck bridge, and back (MATH.md §2, §1.2).

Data X₀ ~ Σⱼ wⱼ N(cⱼ, sⱼ²) (three modes). The forward OU process dX = −X dτ + √2σ dW has the exact law

    ρ_τ = Σⱼ wⱼ N(e^{−τ}cⱼ, e^{−2τ}sⱼ² + (1 − e^{−2τ})σ²),

so the field's ``marginal(τ)`` gives the density every particle cloud must follow. Particles move by

* ``direction=forward``: the probability flow v_τ(x) = −x − σ²∇log ρ_τ(x) from exact samples of
  ρ_{τmin} up to τ_max (field ``ou_bridge``), or the noising SDE itself (``sampler=sde``);
* ``direction=reverse``: the sampler dx/ds = x + σ²∇log ρ_{τmax−s}(x) from N(0, σ²) down to τ_min
  (``ou_bridge``), or the stochastic sampler dX = [X + 2σ²∇log ρ] ds + √2σ dW (``ou_bridge_sde``
  with Euler–Maruyama, ``sampler=sde``).

The run writes an H5MD trajectory with the Kolmogorov–Smirnov distance to the exact law at every
saved frame (about ``frames`` + 1 of them, evenly spaced in √τ: dense near the data, where the paths
bend). The report prints the final moments, the KS distance and the characteristic-function
distance against the exact law (with their Monte-Carlo levels) and draws the particle paths over
the exact density ρ_τ(x) together with the final histogram.

    python scenarios/gmm_bridge_1d.py
    measureflow run scenarios/gmm_bridge_1d.py --set direction=forward --set sampler=sde
"""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np
import torch

import measureflow
from measureflow import Particles, Simulation, scenario
from measureflow.measures import GaussianMixture
from measureflow.parameters import OneOf, Picture, Points, Positive, PositiveFloat, Size
from measureflow.simulation import Observer
from measureflow.triggers import On

#: The data law: three modes of different weights and widths.
WEIGHTS = (0.3, 0.45, 0.25)
CENTRES = (-2.0, 0.5, 2.5)
WIDTHS = (0.35, 0.5, 0.3)
#: The characteristic function is compared on |ω| ≤ OMEGA_MAX (where it is not yet negligible).
OMEGA_MAX = 4.0


def data_law(dtype=torch.float64) -> GaussianMixture:
    w = torch.tensor(WEIGHTS, dtype=dtype)
    c = torch.tensor(CENTRES, dtype=dtype)[:, None]
    s = torch.tensor(WIDTHS, dtype=dtype)
    return GaussianMixture(w, c, (s * s)[:, None, None])


def make_field(direction: str, sampler: str, sigma: float, tau_min: float, tau_max: float):
    if direction not in ("forward", "reverse"):
        raise measureflow.ParameterError(f"direction must be 'forward' or 'reverse'; received {direction!r}")
    if sampler not in ("ode", "sde"):
        raise measureflow.ParameterError(
            f"sampler must be 'ode' (probability flow, RK4) or 'sde' (Euler–Maruyama); received {sampler!r}"
        )
    name = "ou_bridge" if sampler == "ode" else "ou_bridge_sde"
    return measureflow.field(name, data=data_law(), sigma=sigma, tau_min=tau_min, tau_max=tau_max,
                             direction=direction)


def default_steps(sampler: str, steps: int) -> int:
    # RK4 needs h·L ≲ 1 with L ≈ σ²/min sⱼ² ≈ 11 near the data: 300 steps over τ ≤ 6 give h·L ≈ 0.2.
    # Euler–Maruyama has weak order 1 and its drift is twice as stiff: 3000 steps keep the bias in
    # the final variance well under the Monte-Carlo error of 2·10⁴ particles.
    if steps > 0:
        return steps
    return 300 if sampler == "ode" else 3000


def frame_steps(field, steps: int, frames: int) -> On:
    """The steps written: the first, the last and those nearest to ``frames`` + 1 times evenly spaced in
    √τ (steps that two of them share are written once).

    The paths bend while the noise variance, about 2σ²τ, is still comparable with the modes' widths
    sⱼ² (τ ≲ 0.5) and run nearly flat towards τ_max; evenly spaced in √τ, 40 frames draw the bends as
    finely as 100 evenly spaced in τ (7.0 MB instead of 16.6 MB for 2·10⁴ particles).
    """
    lo, hi = field.time_range
    root = np.sqrt([field.tau(lo + (hi - lo) * k / steps) for k in range(steps + 1)])
    targets = np.linspace(root[0], root[-1], max(1, frames) + 1)
    return On({0, steps, *(int(np.argmin(np.abs(root - u))) for u in targets)})


def start_state(field, direction: str, n: int, seed: int) -> Particles:
    """Exact samples of ρ_{τmin} (forward) or of the prior N(0, σ²) (reverse)."""
    generator = torch.Generator().manual_seed(seed)
    law = field.marginal(field.tau_min) if direction == "forward" else field.prior()
    return Particles(law.sample(n, generator)[None])


def final_tau(field) -> float:
    return field.tau_max if field.direction == "forward" else field.tau_min


# -- distances to the exact law --------------------------------------------------------------------------


def mixture_parts(law):
    """(weights, centres, standard deviations) of a 1-D Gaussian or mixture, as float64 tensors."""
    if hasattr(law, "weights"):
        w, c, v = law.weights, law.means[:, 0], law.covs[:, 0, 0]
    else:
        w, c, v = torch.ones(1, dtype=law.mean_.dtype), law.mean_.reshape(1), law.cov.reshape(1)
    return w.double(), c.double(), v.double().sqrt()


def mixture_cdf(law, x: torch.Tensor) -> torch.Tensor:
    w, c, s = mixture_parts(law)
    return (w * torch.special.ndtr((x[..., None] - c) / s)).sum(-1)


def mixture_density(law, x: torch.Tensor) -> torch.Tensor:
    w, c, s = mixture_parts(law)
    z = (x[..., None] - c) / s
    return (w * torch.exp(-0.5 * z * z) / (s * math.sqrt(2 * math.pi))).sum(-1)


def mixture_moments(law) -> tuple[float, float]:
    w, c, s = mixture_parts(law)
    mean = float((w * c).sum())
    return mean, float((w * (s * s + c * c)).sum()) - mean * mean


def ks_distance(x: torch.Tensor, law) -> torch.Tensor:
    """sup_x |F_N(x) − F(x)| per replica, for x of shape (R, N): exact for the empirical step function."""
    xs, _ = torch.sort(x, dim=-1)
    n = xs.shape[-1]
    F = mixture_cdf(law, xs)
    k = torch.arange(1, n + 1, dtype=F.dtype, device=F.device)
    return torch.maximum((k / n - F).amax(-1), (F - (k - 1) / n).amax(-1))


def cf_distance(x: torch.Tensor, law, omegas: int = 161) -> torch.Tensor:
    """max over ω ∈ [−4, 4] of |φ_N(ω) − φ(ω)|, φ(ω) = Σⱼ wⱼ exp(iωcⱼ − ω²sⱼ²/2), per replica."""
    w, c, s = mixture_parts(law)
    om = torch.linspace(-OMEGA_MAX, OMEGA_MAX, omegas, dtype=x.dtype, device=x.device)
    phase = om[:, None] * x[..., None, :]  # (R, Ω, N)
    emp_re, emp_im = torch.cos(phase).mean(-1), torch.sin(phase).mean(-1)
    damp = torch.exp(-0.5 * (om[:, None] * s) ** 2)
    ex_re = (w * damp * torch.cos(om[:, None] * c)).sum(-1)
    ex_im = (w * damp * torch.sin(om[:, None] * c)).sum(-1)
    return torch.hypot(emp_re - ex_re, emp_im - ex_im).amax(-1)


def ks_to_exact(state, *, field=None, t=0.0, **_):
    """Kolmogorov–Smirnov distance between the particles and the exact law ρ_τ at the frame's time."""
    return ks_distance(state.x[..., 0], field.marginal(field.tau(t)))


# -- the scenario -------------------------------------------------------------------------------------------


@scenario
def gmm_bridge_1d(
    direction: Annotated[str, OneOf("forward", "reverse")] = "reverse",
    sampler: str = "ode",
    n: Points = 20000,
    sigma: Annotated[float, Positive(maximum=1e6)] = 1.0,
    tau_min: PositiveFloat = 1e-3,
    tau_max: Annotated[float, Positive(maximum=1e4)] = 6.0,
    steps: Annotated[int, Size(minimum=0, bytes_each=64)] = 0,
    frames: Annotated[int, Size(bytes_each=64)] = 40,
    seed: int = 0,
    out: str = "runs/gmm_bridge_1d.h5",
    picture: Picture = "runs/gmm_bridge_1d.png",
) -> Simulation:
    """A 1-D Gaussian mixture diffused by the OU bridge (forward) or generated from noise (reverse)."""
    field = make_field(direction, sampler, sigma, tau_min, tau_max)
    steps = default_steps(sampler, steps)
    every = frame_steps(field, steps, frames)
    lo, hi = field.time_range
    return Simulation(
        start_state(field, direction, n, seed),
        field,
        "rk4" if sampler == "ode" else "euler_maruyama",
        t0=lo,
        t1=hi,
        steps=steps,
        writers=[measureflow.get_registry().writer("h5md", out, every=every)] if out else [],
        observers=["mean", Observer(ks_to_exact, name="ks_to_exact")],
        observe_every=every,
        seed=seed,
    )


@gmm_bridge_1d.report
def report(result, params):
    field = make_field(params["direction"], params["sampler"], params["sigma"], params["tau_min"], params["tau_max"])
    numbers = final_numbers(result, params, field)
    n = numbers["n"]
    print(f"{params['direction']} {params['sampler']}: {n} particles, final τ = {numbers['tau']:g}, "
          f"{result.steps_done} steps of the {field.name!r} field")
    for key, label in (("mean", "mean    "), ("variance", "variance")):
        got, exact, se = numbers[key], numbers[f"exact_{key}"], numbers[f"{key}_se"]
        print(f"  {label} {got:+.5f}  exact {exact:+.5f}  error {got - exact:+.2e}  "
              f"({(got - exact) / se:+.1f} MC s.e.)")
    print(f"  3rd central moment {numbers['third']:+.4f}  exact {numbers['exact_third']:+.4f}  "
          f"({(numbers['third'] - numbers['exact_third']) / numbers['third_se']:+.1f} MC s.e.)")
    # Kolmogorov's law: for exact samples √N·D exceeds 1.36 with probability 5 %, 1.95 with 0.1 %.
    print(f"  KS distance D = {numbers['ks']:.4f}  (√N·D = {math.sqrt(n) * numbers['ks']:.2f}; exact samples exceed "
          "1.36 with probability 5 %)")
    print(f"  characteristic-function distance max_|ω|≤{OMEGA_MAX:g} |φ_N − φ| = {numbers['cf']:.4f}  "
          f"(Monte-Carlo level 1/√N = {1 / math.sqrt(n):.4f})")
    if "quantile_error" in numbers:
        # In 1-D the probability flow preserves the order of particles, so its flow map is the monotone
        # map F_end⁻¹ ∘ F_start: every particle keeps its quantile. No Monte-Carlo error enters here.
        print(f"  quantile drift max_i |F_end(x_i(end)) − F_start(x_i(start))| = {numbers['quantile_error']:.2e}  "
              "(flow-map error of the integrator)")
        # Hence the KS distance is the starting draw's own: what is left is Monte-Carlo error.
        print(f"  KS distance of the starting draw to ρ_start: {numbers['start_ks']:.4f} (a 1-D flow keeps it)")
    if "startup_bound" in numbers:
        # MATH.md §1.3 (iii): the sampler starts from N(0, σ²) instead of ρ_τmax.
        print(f"  start-up bias bound W₂(ρ_τmax, N(0, σ²)) ≤ {numbers['startup_bound']:.1e}")
    if params["picture"]:
        draw(params, field, result.state.x[0, :, 0].double())
        print(f"wrote {params['picture']}")


def final_numbers(result, params, field) -> dict:
    """Final-law errors against ρ_τ at the run's last time (see the report)."""
    x = result.state.x[..., 0].double()
    n = x.shape[-1]
    tau = final_tau(field)
    law = field.marginal(tau)
    mean, var = mixture_moments(law)
    w, c, s = mixture_parts(law)
    out = {
        "n": n,
        "tau": tau,
        "mean": float(x.mean()),
        "exact_mean": mean,
        "mean_se": math.sqrt(var / n),
        "variance": float(x.var()),
        "exact_variance": var,
        # Var of the sample variance is (μ₄ − σ⁴)/N; μ₄ of the mixture from its components.
        "variance_se": math.sqrt(max(float((w * ((c - mean) ** 4 + 6 * (c - mean) ** 2 * s * s + 3 * s**4)).sum())
                                     - var * var, 0.0) / n),
        "third": float(((x - mean) ** 3).mean()),
        "third_se": float(((x - mean) ** 3).std()) / math.sqrt(n),
        # E(X − m)³ = Σⱼ wⱼ [(cⱼ − m)³ + 3(cⱼ − m)sⱼ²].
        "exact_third": float((w * ((c - mean) ** 3 + 3 * (c - mean) * s * s)).sum()),
        "ks": float(ks_distance(x, law).max()),
        "cf": float(cf_distance(x, law).max()),
    }
    if params["sampler"] == "ode":
        start = start_state(field, params["direction"], n, params["seed"]).x[..., 0].double()
        tau0 = field.tau_min if params["direction"] == "forward" else field.tau_max
        drift = mixture_cdf(law, x) - mixture_cdf(field.marginal(tau0), start)
        out["quantile_error"] = float(drift.abs().max())
        out["start_ks"] = float(ks_distance(start, field.marginal(tau0)).max())
    if params["direction"] == "reverse":
        second = float((w * (c * c + s * s)).sum())
        b = math.sqrt(-math.expm1(-2 * field.tau_max))
        out["startup_bound"] = math.exp(-field.tau_max) * math.sqrt(second) + (1 - b) * field.sigma
    return out


def draw(params, field, final: torch.Tensor):
    from pathlib import Path

    from matplotlib.figure import Figure

    tau_end = final_tau(field)
    law = field.marginal(tau_end)
    _, c, s = mixture_parts(field.marginal(field.tau_min))
    lo = float(min(float((c - 3.5 * s).min()), -3.5 * field.sigma))
    hi = float(max(float((c + 3.5 * s).max()), 3.5 * field.sigma))
    xs = torch.linspace(lo, hi, 400, dtype=torch.float64)
    taus = np.linspace(field.tau_min, field.tau_max, 241)
    dens = torch.stack([mixture_density(field.marginal(float(t)), xs) for t in taus]).numpy()

    fig = Figure(figsize=(13.0, 5.0), layout="constrained")
    grid = fig.add_gridspec(1, 2, width_ratios=[2.2, 1.0])
    ax = fig.add_subplot(grid[0, 0])
    mesh = ax.pcolormesh(taus, xs.numpy(), dens.T, cmap="Blues", shading="auto", rasterized=True)
    fig.colorbar(mesh, ax=ax, label="exact density ρ_τ(x)", pad=0.01)
    # Fewer paths for the SDE: Brownian paths cross and would hide the density.
    paths = 60 if params["sampler"] == "ode" else 12
    drawn = 0
    if params["out"] and Path(params["out"]).exists():
        with measureflow.open(params["out"]) as traj:
            first = np.asarray(traj.positions[0])[0, :, 0]
            # Evenly spaced quantiles of the starting cloud: paths of a 1-D flow never cross.
            order = np.argsort(first)
            pick = order[np.linspace(0, len(order) - 1, min(paths, len(order)) + 2).astype(int)[1:-1]]
            track = np.stack([np.asarray(traj.positions[f])[0, pick, 0] for f in range(len(traj.times))])
            t_frames = np.array([field.tau(float(t)) for t in traj.times])
        # Colour each path by the mode it ends nearest to: the trajectories split between the modes.
        ends = track[-1] if params["direction"] == "reverse" else track[0]
        mode = np.argmin(np.abs(ends[:, None] - np.asarray(CENTRES) * math.exp(-field.tau_min)), axis=1)
        colours = ("C1", "C2", "C3")
        for k in range(track.shape[1]):
            ax.plot(t_frames, track[:, k], color=colours[mode[k]], lw=0.8, alpha=0.9)
        drawn = track.shape[1]
    ax.set_xlim(field.tau_min, field.tau_max)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("OU time τ")
    ax.set_ylabel("x")
    how = {("ode", "forward"): "probability-flow ODE (RK4)", ("ode", "reverse"): "probability-flow ODE (RK4)",
           ("sde", "forward"): "noising SDE (Euler–Maruyama)",
           ("sde", "reverse"): "stochastic sampler (Euler–Maruyama)"}[params["sampler"], params["direction"]]
    way = "τ increasing: data → noise" if params["direction"] == "forward" else "τ decreasing: noise → data"
    ax.set_title(f"{params['direction']} {how}, {way}" + (f"; {drawn} paths coloured by mode" if drawn else ""),
                 fontsize="medium")

    hx = fig.add_subplot(grid[0, 1])
    edges = np.linspace(lo, hi, 90)
    hx.hist(final.numpy(), bins=edges, density=True, color="0.65", label=f"particles (N = {final.numel()})")
    hx.plot(xs.numpy(), mixture_density(law, xs).numpy(), color="C0", lw=1.8, label="exact ρ_τ")
    ks = float(ks_distance(final[None], law)[0])
    hx.set_title(f"final law at τ = {tau_end:g}: KS distance {ks:.4f}", fontsize="medium")
    hx.set_xlabel("x")
    hx.set_ylabel("density")
    hx.legend(fontsize="small", loc="upper left")
    fig.suptitle("Three-mode Gaussian mixture and the Ornstein–Uhlenbeck bridge, σ = "
                 f"{field.sigma:g} (MATH.md §2)", fontsize="medium")
    Path(params["picture"]).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(params["picture"], dpi=110)


if __name__ == "__main__":
    gmm_bridge_1d.main()
