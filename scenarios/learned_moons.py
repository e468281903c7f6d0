"""A learned flow-matching field from eight Gaussians to two moons, checked against the exact field.

The source X₀ is a mixture of eight Gaussians on a circle (or, with ``source=gaussian``, one
isotropic Gaussian), the target X₁ two moons given as weighted Dirac atoms; both are generated
here from the seed. A time-conditioned MLP v_θ(x, t) is regressed on the flow-matching target
X₁ − X₀ at Z_t = (1 − t)X₀ + tX₁ (linear schedule, product coupling, MATH.md §1), then particles
drawn from the source are carried from t = 0 to t = 1 by the ``learned`` field and written to an
H5MD file, with the MMD² to the target as an observable.

The trained weights, the loss history and the training checkpoint are kept next to the output
file (``<out>.weights.pt``, ``<out>.training.json``, ``<out>.training.ckpt``, with the ``.h5``
suffix dropped). A later run whose data and training settings are the same reuses the weights
instead of training again; ``retrain=true`` forces a new training run, and a training run that was
stopped resumes from its checkpoint.

The report compares the learned field with the exact one between the same endpoints (the
``flow_matching`` field with the source as a Gaussian mixture and the moons as Diracs, MATH.md
eq. 1.2), which memorises the atoms and sets the floor of every number:

* the final training loss against the irreducible loss L* = E_t E Var(X₁ − X₀ | Z_t), estimated by
  Monte Carlo as the loss of the exact field, and E|v_θ − v*|² = L(v_θ) − L* on the same draws;
* MMD², W₂² (and, with ``epsilon`` > 0, the Sinkhorn divergence S_ε) between the generated
  particles and the target atoms, for the learned field, for the exact field run from the same
  particles, and for the source itself;
* straightness, kinetic action and endpoint cost of the paths (the flow realises a coupling whose
  cost exceeds W₂²);
* the conservativity diagnostics of MATH.md §2 at one time t: |∮v·dx| / ∮|x||dx| on circles and
  on Brownian-bridge loops, and max|J − Jᵀ| (central differences), for both fields and their
  difference. With the eight-Gaussian source the exact field is *not* a gradient: differentiating
  eq. (1.2) with components N(μᵢ, s²I) and atoms yⱼ gives J − Jᵀ = (C − Cᵀ)/((1 − t)²s²),
  C = Cov(X₁, μ_I | Z_t = z) (I the source component), the mixture analogue of the non-symmetric
  A_t of MATH.md §1.4. So its loop integrals are not zero and the learned field is to be read
  against them, not against 0. With ``source=gaussian`` (one component, C = 0) it is a gradient
  (the score form, eq. 1.4): its circle integrals vanish to rounding, its Brownian-bridge ones to
  the discretisation error of the trapezoid sum on the rough 1000-step path.

The numbers are printed and written to ``<out>.report.json``; the picture shows the source, the
generated particles against the target, the learned paths, the loss curve and the diagnostics.

``device=auto`` trains and runs on CUDA when it is available; ``threads`` sets torch's intra-op
CPU threads for the process (0 leaves torch's default).

    python scenarios/learned_moons.py
    measureflow run scenarios/learned_moons.py --set train_steps=8000 --set retrain=true
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import textwrap
from pathlib import Path
from typing import Annotated

import numpy as np
import torch

import measureflow
from measureflow import Particles, Simulation, scenario
from measureflow.errors import MeasureflowError, ParameterError
from measureflow.measures import Empirical, Gaussian, GaussianMixture
from measureflow.parameters import (
    Count, NonNegative, OneOf, Picture, Points, PositiveFloat, Probability, Range, Size, Steps, Threads,
)
from measureflow.simulation import Observer

F64 = torch.float64

#: Eight Gaussians: centres on a circle of this radius, each with this standard deviation.
RING_RADIUS = 2.5
RING_STD = 0.3
#: The single-Gaussian source N(0, σ²I).
GAUSSIAN_STD = 1.0
#: Moons: the unit two-moons curves, centred, scaled, with Gaussian jitter (before scaling).
MOON_SCALE = 1.5
MOON_JITTER = 0.05
#: Bandwidth ℓ of the Gaussian-kernel MMD² (the observable and the report).
MMD_BANDWIDTH = 0.25
#: Circles of the loop diagnostic: centred at 0, radii spanning the support of both endpoints.
CIRCLE_RADII = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0)
CIRCLE_POINTS = 512
#: Brownian-bridge loops of MATH.md §2 / [V]: duration U.
BRIDGE_DURATION = 9.0
#: Time nodes of the Monte-Carlo estimate of the regression losses (midpoint rule on [0, 1]).
LOSS_NODES = 100
LOSS_DRAWS = 20_000
SOURCES = ("eight_gaussians", "gaussian")
#: Whether this process trained the weights kept next to an output file (out → bool), for the report.
TRAINED_HERE: dict[str, bool] = {}


# -- data ---------------------------------------------------------------------------------------------


def make_source(kind: str) -> GaussianMixture | Gaussian:
    """The source law X₀ (float64, CPU): eight Gaussians on a circle, or N(0, σ²I)."""
    if kind == "eight_gaussians":
        angle = 2 * math.pi * torch.arange(8, dtype=F64) / 8
        means = RING_RADIUS * torch.stack([angle.cos(), angle.sin()], dim=-1)
        covs = (RING_STD**2 * torch.eye(2, dtype=F64)).expand(8, 2, 2).clone()
        return GaussianMixture(torch.full((8,), 1 / 8, dtype=F64), means, covs)
    if kind == "gaussian":
        return Gaussian(torch.zeros(2, dtype=F64), GAUSSIAN_STD**2 * torch.eye(2, dtype=F64))
    raise ParameterError(f"source must be one of {', '.join(SOURCES)}; received {kind!r}")


def make_moons(n_atoms: int, upper_mass: float, seed: int):
    """Two moons as weighted atoms: (points (M, 2), weights (M,), upper (M,) bool), float64, CPU.

    ⌈M/2⌉ atoms on the upper arc (cos θ, sin θ) and the rest on the lower arc (1 − cos θ, ½ − sin θ),
    θ ~ U(0, π), jittered by N(0, 0.05²I), centred and scaled by 1.5. The upper moon carries the
    mass ``upper_mass``, spread evenly over its atoms (uniform weights when it is ½ and M is even).
    """
    if n_atoms < 2:
        raise ParameterError(f"n_atoms must be at least 2 (one atom per moon); received {n_atoms}")
    if not 0.0 < upper_mass < 1.0:
        raise ParameterError(f"upper_mass is the upper moon's share of the mass, in (0, 1); received {upper_mass}")
    g = torch.Generator().manual_seed(int(seed))
    n_up = (n_atoms + 1) // 2
    upper = torch.arange(n_atoms) < n_up
    theta = math.pi * torch.rand(n_atoms, generator=g, dtype=F64)
    x = torch.where(upper, theta.cos(), 1 - theta.cos())
    y = torch.where(upper, theta.sin(), 0.5 - theta.sin())
    points = torch.stack([x, y], dim=-1) + MOON_JITTER * torch.randn(n_atoms, 2, generator=g, dtype=F64)
    points = MOON_SCALE * (points - torch.tensor([0.5, 0.25], dtype=F64))
    weights = torch.where(upper, upper_mass / n_up, (1 - upper_mass) / (n_atoms - n_up)).to(F64)
    return points, weights / weights.sum(), upper


def exact_field(src, points, weights):
    """The exact flow-matching field v*_t(z) = E[X₁ − X₀ | Z_t = z] between the source (a Gaussian
    mixture) and the moons (Diracs, zero covariance), linear schedule, product coupling (MATH.md
    eq. 1.2). The atoms make it singular at t = 1, so it is defined on [0, 1 − 10⁻³] (MATH.md §1.3)."""
    return measureflow.field("flow_matching", data=src, noise=GaussianMixture.diracs(points, weights))


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else the CPU; otherwise the named device, which must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ParameterError(f"device must be 'auto', 'cpu' or 'cuda[:k]'; received {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError("device='cuda' was asked for but CUDA is not available here; use device=auto or cpu")
    return device


def sidecar_files(out: str) -> dict[str, Path]:
    """The files kept next to the H5MD output ``out`` (its .h5 suffix dropped)."""
    if not out:
        raise ParameterError("learned_moons needs out=<file.h5>: the trained weights are kept next to it")
    base = Path(out)
    if base.suffix in (".h5", ".hdf5", ".h5md"):
        base = base.with_suffix("")
    return {kind: base.with_name(base.name + suffix) for kind, suffix in (
        ("weights", ".weights.pt"), ("meta", ".training.json"), ("checkpoint", ".training.ckpt"),
        ("numbers", ".report.json"))}


def initial_positions(params: dict, source) -> torch.Tensor:
    """The n particles the run starts from, (n, 2) float64 on the CPU (own seed stream)."""
    return source.sample(params["n"], torch.Generator().manual_seed(params["seed"] + 1))


# -- training or reuse ------------------------------------------------------------------------------------


def training_config(params: dict, points, weights) -> dict:
    """Everything that determines the trained weights; equal configs give interchangeable weights."""
    digest = hashlib.sha256()
    for t in (points, weights):
        digest.update(t.contiguous().numpy().tobytes())
    keys = ("source", "n_atoms", "upper_mass", "seed", "hidden", "depth", "train_steps", "batch_size", "lr")
    return {**{k: params[k] for k in keys}, "schedule": "linear", "coupling": "independent",
            "lr_schedule": "cosine", "data_sha256": digest.hexdigest()[:16]}


def _read_meta(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train_or_reuse(params: dict, source, target: Empirical, config: dict, device: torch.device):
    """(model, meta): the saved network when its config matches and ``retrain`` is off, else a new one.

    ``meta`` holds the config, the loss history ``losses`` (one mini-batch loss per step),
    ``final_loss``, ``wall_time`` and ``trained`` (whether this call trained). The meta file is
    written before training starts, so a stopped run's checkpoint is known to belong to this config
    and is resumed; a checkpoint of another config (or any checkpoint, with ``retrain``) is
    discarded first.
    """
    from measureflow import training

    files = sidecar_files(params["out"])
    meta = _read_meta(files["meta"])
    same = meta is not None and meta.get("config") == config
    if same and meta.get("status") == "completed" and files["weights"].exists() and not params["retrain"]:
        model = training.load_model(files["weights"], device=device)
        print(f"reusing the trained weights {files['weights']} ({len(meta['losses'])} steps, "
              f"final loss {meta['final_loss']:.4g})", file=sys.stderr)
        return model, {**meta, "trained": False}
    if files["checkpoint"].exists() and (params["retrain"] or not same):
        files["checkpoint"].unlink()
    files["meta"].parent.mkdir(parents=True, exist_ok=True)
    files["meta"].write_text(json.dumps({"config": config, "status": "training"}, indent=1))
    steps = params["train_steps"]
    print(f"training v_θ for {steps} steps on {device} (checkpoint {files['checkpoint']})", file=sys.stderr)
    result = training.train_velocity(
        source, target, "linear",
        model=dict(hidden=params["hidden"], depth=params["depth"]),
        steps=steps, batch_size=params["batch_size"], lr=params["lr"],
        # Cosine decay lowers the stochastic-gradient noise floor of the final loss.
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps),
        seed=params["seed"], device=device, checkpoint=files["checkpoint"], resume=True,
    )
    if not result.ok:
        if result.status.code == "nonfinite":
            hint = f"lower lr, delete {files['checkpoint']} and run the scenario again"
        else:
            hint = f"run the scenario again to resume from {files['checkpoint']}"
        raise MeasureflowError(f"training ({steps} steps) ended early: {result.status}; {hint}")
    training.save_model(result.model, files["weights"])
    meta = {"config": config, "status": "completed", "final_loss": result.final_loss,
            "wall_time": result.wall_time, "losses": [float(v) for v in result.losses]}
    files["meta"].write_text(json.dumps(meta))
    return result.model, {**meta, "trained": True}


# -- the scenario -------------------------------------------------------------------------------------------


@scenario
def learned_moons(
    source: Annotated[str, OneOf(*SOURCES)] = "eight_gaussians",
    n_atoms: Annotated[int, Size(minimum=2)] = 500,
    upper_mass: Annotated[float, Probability(open_interval=True)] = 0.5,
    n: Points = 1000,
    hidden: Annotated[int, Range(1, 4096)] = 128,
    depth: Annotated[int, Range(1, 64)] = 3,
    train_steps: Steps = 4000,
    batch_size: Points = 256,
    lr: PositiveFloat = 3e-3,
    retrain: bool = False,
    steps: Steps = 100,
    every: Count = 5,
    exact_steps: Steps = 60,
    diag_t: Annotated[float, Probability(open_interval=True)] = 0.5,
    diag_points: Points = 256,
    bridges: Points = 16,
    bridge_steps: Steps = 1000,
    epsilon: Annotated[float, NonNegative()] = 0.0,
    seed: int = 0,
    device: str = "auto",
    threads: Threads = 0,
    out: str = "runs/learned_moons.h5",
    picture: Picture = "runs/learned_moons.png",
) -> Simulation:
    """Particles moved from eight Gaussians to two moons by a learned flow-matching field."""
    params = dict(locals())
    for name in ("n", "exact_steps", "diag_points", "bridges", "every"):
        if params[name] < 1:
            raise ParameterError(f"{name} must be at least 1; received {params[name]}")
    if threads > 0:
        # For the rest of the process. The tensors here are small (mini-batches of a few hundred
        # points, a 1000-particle MLP pass): a second intra-op thread gains little, and where the
        # cores are shared with other jobs the threads' synchronisation stalls every operation
        # (the run's integration took 8× the CPU time with two threads on a busy two-core machine).
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    src = make_source(source)
    points, weights, _ = make_moons(n_atoms, upper_mass, seed)
    # Refuse a diagnostic time outside the exact field's range now, not after training and the run.
    exact_field(src, points, weights).check_time(diag_t)
    target = Empirical(points, weights)
    model, meta = train_or_reuse(params, src, target, training_config(params, points, weights), dev)
    TRAINED_HERE[out] = meta["trained"]
    field = measureflow.field("learned", model=model)
    dtype = next(model.parameters()).dtype
    start = Particles(initial_positions(params, src).to(device=dev, dtype=dtype)[None])
    writer = measureflow.get_registry().writer("h5md", out, every=every)
    mmd = Observer("mmd", name="mmd_to_target", target=target.to(device=dev, dtype=dtype),
                   params={"bandwidth": MMD_BANDWIDTH})
    return Simulation(
        start, field, "rk4", t0=0.0, t1=1.0, steps=steps, writers=[writer], observers=[mmd],
        observe_every=every, seed=seed,
        parameters={"weights_file": str(sidecar_files(out)["weights"])},
    )


# -- the report -------------------------------------------------------------------------------------------


def integrate_exact(field, x0: torch.Tensor, steps: int):
    """RK4 from t = 0 to the field's t_max on a grid geometric in 1 − t; returns (times, frames (T, N, d)).

    At t = 1 the atoms make the field singular (Lipschitz constant ∼ 1/(1 − t), MATH.md §1.3), so the
    grid keeps Δt/(1 − t) constant, as the geometric grid does at the data end of generation.
    """
    t_max = field.time_range[1]
    gap = 1.0 - t_max
    times = [1.0 - gap ** (k / steps) for k in range(steps + 1)]
    times[0], times[-1] = 0.0, t_max
    rk4 = measureflow.integrator("rk4")
    state = Particles(x0[None])
    frames = [x0]
    for a, b in zip(times[:-1], times[1:]):
        state = rk4.advance(field, state, a, b)
        frames.append(state.x[0])
    return torch.tensor(times, dtype=F64), torch.stack(frames)


def loss_terms(learned, exact, src, target: Empirical, n_per_node: int, generator, device) -> dict:
    """Monte-Carlo regression losses on shared draws (MATH.md §1).

    t on the midpoint nodes (k + ½)/K of [0, 1] (all inside the exact field's range; training draws
    t ~ U(0, 1), whose expectation this quadrature approximates), (X₀, X₁) independent,
    Z = (1 − t)X₀ + tX₁, u = X₁ − X₀. Returns L(v_θ) and L* = L(v*) (means of |v − u|²), the gap
    E|v_θ − v*|², and the mean of the cross term 2(v_θ − v*)·(v* − u), whose expectation is 0 because
    v* = E[u | Z]; so L(v_θ) − L* − gap is that mean, within a few of its standard errors. Standard
    errors are those of the stratified estimator (variances within nodes).
    """
    rows = {"learned": [], "exact": [], "gap": [], "cross": []}
    for k in range(LOSS_NODES):
        t = (k + 0.5) / LOSS_NODES
        # Drawn on the CPU from CPU measures, so the draws do not depend on the device.
        x0 = src.sample(n_per_node, generator).to(device)
        x1 = target.sample(n_per_node, generator).to(device)
        z, u = (1 - t) * x0 + t * x1, x1 - x0
        v_star = exact.velocity(t, z[None], None)[0]
        v_theta = learned.velocity(t, z[None], None)[0].to(F64)
        rows["learned"].append(((v_theta - u) ** 2).sum(-1))
        rows["exact"].append(((v_star - u) ** 2).sum(-1))
        rows["gap"].append(((v_theta - v_star) ** 2).sum(-1))
        rows["cross"].append(2 * ((v_theta - v_star) * (v_star - u)).sum(-1))
    out = {}
    for key, values in rows.items():
        v = torch.stack(values)  # (K, n)
        out[key] = float(v.mean())
        out[key + "_se"] = float(torch.sqrt(v.var(dim=1).sum() / n_per_node) / LOSS_NODES)
    return out


def distances(x: torch.Tensor, target: Empirical, epsilon: float) -> dict:
    """Distances between particles x (N, d) and the target atoms (MATH.md §0 normalisations).

    MMD² with the Gaussian kernel of bandwidth ℓ (exact kernel sums), W₂² by exact OT (POT's network
    simplex) and, when ``epsilon`` > 0, the Sinkhorn divergence S_ε (POT's log-domain Sinkhorn, the
    costliest of the three: seconds per solve on a CPU at these sizes).
    """
    from measureflow import observables

    state = Particles(x[None].to(F64))
    out = {
        "mmd2": float(observables.mmd(state, target=target, bandwidth=MMD_BANDWIDTH)[0]),
        "w2": float(observables.w2(state, target=target)[0]),
    }
    if epsilon > 0:
        out["sinkhorn"] = float(observables.sinkhorn(state, target=target, epsilon=epsilon, tol=1e-6)[0])
    return out


def upper_share(x: torch.Tensor, points, upper) -> float:
    """Mass of the particles whose nearest atom is on the upper moon (target: its ``upper_mass``)."""
    nearest = torch.cdist(x.to(points), points).argmin(dim=1)
    return float(upper.to(points.device)[nearest].to(F64).mean())


def path_numbers(positions, times) -> dict:
    """Straightness, kinetic action E∫|ẋ|²dt and endpoint cost E|x_T − x_0|² of one replica's paths
    (:func:`measureflow.diagnostics.path_transport_cost`; frames (T, N, d) or a trajectory)."""
    from measureflow.diagnostics import path_transport_cost

    cost = path_transport_cost(positions, times)
    return {"straightness": float(cost.straightness.reshape(-1)[0]), "kinetic": float(cost.kinetic.reshape(-1)[0]),
            "endpoint_cost": float(cost.endpoint.reshape(-1)[0])}


def conservativity(learned, exact, points: torch.Tensor, bridges: torch.Tensor) -> dict:
    """MATH.md §2 diagnostics of the learned field, the exact field and their difference v_θ − v*.

    ``learned``, ``exact``: vector fields on (..., d) (one time). Loop ratios |∮v·dx| / ∮|x||dx| on
    the circles of CIRCLE_RADII (centred at 0) and on ``bridges`` (B, K, d); max_ij |J − Jᵀ| at
    ``points`` by central differences, with the scale max_ij |J_ij|. Both the loop integral and the
    Jacobian are linear in the field, so the difference's numbers come from the same evaluations.
    """
    from measureflow import diagnostics as D

    circles = D.circle_loops(torch.zeros(2, dtype=F64, device=points.device),
                             torch.tensor(CIRCLE_RADII, dtype=F64, device=points.device), CIRCLE_POINTS)
    raw = {}
    for name, s in (("learned", learned), ("exact", exact)):
        with torch.no_grad():
            circ, brid = D.loop_integral(s, circles), D.loop_integral(s, bridges)
        raw[name] = (circ.circulation, brid.circulation, D.jacobian(s, points, method="central"))
    raw["difference"] = tuple(a - b for a, b in zip(raw["learned"], raw["exact"]))
    # ∮|x||dx| depends on the loop only (any field gives it; the identity is the cheapest).
    circle_norm = D.loop_integral(lambda x: x, circles).normaliser
    bridge_norm = D.loop_integral(lambda x: x, bridges).normaliser
    out = {}
    for name, (circ, brid, J) in raw.items():
        circ_ratio, brid_ratio = circ.abs() / circle_norm, brid.abs() / bridge_norm
        asym = (J - J.transpose(-1, -2)).abs().amax((-1, -2))
        out[name] = {
            "circle_ratio_mean": float(circ_ratio.mean()), "circle_ratio_max": float(circ_ratio.max()),
            "bridge_ratio_mean": float(brid_ratio.mean()), "bridge_ratio_max": float(brid_ratio.max()),
            "jacobian_asymmetry_mean": float(asym.mean()), "jacobian_asymmetry_max": float(asym.max()),
            "jacobian_scale_mean": float(J.abs().amax((-1, -2)).mean()),
        }
    return out


def evaluate(result, params: dict) -> tuple[dict, dict]:
    """All the report's numbers (JSON-able) and the arrays its picture needs."""
    from measureflow import diagnostics as D
    from measureflow import training

    dev = result.state.x.device
    files = sidecar_files(params["out"])
    meta = _read_meta(files["meta"]) or {}
    src = make_source(params["source"])
    points, weights, upper = make_moons(params["n_atoms"], params["upper_mass"], params["seed"])
    target = Empirical(points, weights).to(device=dev)
    learned = measureflow.field("learned", model=training.load_model(files["weights"], device=dev))
    exact = exact_field(src.to(device=dev), points.to(dev), weights.to(dev))
    rng = torch.Generator().manual_seed(params["seed"] + 2)

    x0 = initial_positions(params, src).to(dev)
    x_learned = result.state.x[0].to(F64)
    exact_times, exact_frames = integrate_exact(exact, x0, params["exact_steps"])
    x_exact = exact_frames[-1]

    losses = loss_terms(learned, exact, src, Empirical(points, weights), LOSS_DRAWS // LOSS_NODES, rng, dev)

    with measureflow.open(params["out"]) as traj:
        learned_paths = path_numbers(traj, None)
        frame_idx = np.unique(np.linspace(0, len(traj.times) - 1, 41).round().astype(int))
        learned_frames = np.stack([traj.positions[int(i)][0] for i in frame_idx])
        learned_times = np.asarray(traj.times)[frame_idx]
    exact_paths = path_numbers(exact_frames, exact_times)

    dist = {name: distances(x, target, params["epsilon"])
            for name, x in (("source", x0), ("learned", x_learned), ("exact", x_exact))}

    # Diagnostic points: draws of the interpolant's law at t; the bridges start at them, in turn.
    t = float(params["diag_t"])
    k = params["diag_points"]
    z = (1 - t) * src.sample(k, rng) + t * points[torch.multinomial(weights, k, replacement=True, generator=rng)]
    bridges = D.brownian_bridge_loops(z[torch.arange(params["bridges"]) % k], U=BRIDGE_DURATION,
                                      steps=params["bridge_steps"], count=1, generator=rng)
    v_learned = D.as_vector_field(learned, t=t)
    v_exact = D.as_vector_field(exact, t=t)
    diag = conservativity(v_learned, v_exact, z.to(dev), bridges.reshape(-1, params["bridge_steps"], 2).to(dev))

    numbers = {
        "source": params["source"],
        "device": str(dev),
        "training": {"trained_now": TRAINED_HERE.get(params["out"], False),
                     "steps": len(meta.get("losses", [])), "final_loss": meta.get("final_loss", math.nan),
                     "wall_time": meta.get("wall_time", math.nan)},
        "loss": losses,
        "distance": dist,
        "upper_mass": {"target": float(params["upper_mass"]),
                       "learned": upper_share(x_learned, points.to(dev), upper),
                       "exact": upper_share(x_exact, points.to(dev), upper)},
        "flow_map_rms_gap": float(((x_learned - x_exact) ** 2).sum(-1).mean().sqrt()),
        "paths": {"learned": learned_paths, "exact": exact_paths},
        "conservativity": {"t": t, **diag},
        "exact_t_max": float(exact.time_range[1]),
    }
    arrays = {"x0": _np(x0), "x_learned": _np(x_learned), "points": _np(points), "weights": _np(weights),
              "learned_frames": learned_frames, "learned_times": learned_times,
              "losses": np.asarray(meta.get("losses", []), dtype=float)}
    return numbers, arrays


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", F64).numpy()


def _g(v: float, spec: str = ".4g") -> str:
    return format(v, spec) if math.isfinite(v) else "n/a"


DIAGNOSTIC_ROWS = (
    ("circle_ratio_mean", "circles  |∮v·dx|/∮|x||dx|  mean"),
    ("circle_ratio_max", "                           max"),
    ("bridge_ratio_mean", "bridges  |∮v·dx|/∮|x||dx|  mean"),
    ("bridge_ratio_max", "                           max"),
    ("jacobian_asymmetry_mean", "|J − Jᵀ|                  mean"),
    ("jacobian_asymmetry_max", "                           max"),
    ("jacobian_scale_mean", "max_ij |J_ij| (scale)     mean"),
)


def print_numbers(nb: dict) -> None:
    tr, lo, di, pa, co = nb["training"], nb["loss"], nb["distance"], nb["paths"], nb["conservativity"]
    src = "eight Gaussians" if nb["source"] == "eight_gaussians" else "N(0, I)"
    how = "trained in this run" if tr["trained_now"] else "saved weights reused, not trained again"
    print(f"{src} → two moons, learned field on {nb['device']}: {how} ({tr['steps']} steps, "
          f"{_g(tr['wall_time'], '.1f')} s of training)")
    print("regression loss (MATH.md §1), E over t ~ U(0, 1):")
    print(f"  final training loss (mean of the last 10 % of steps)  {_g(tr['final_loss'])}")
    print(f"  irreducible loss L* = L(v*) (Monte Carlo)             {lo['exact']:.4g} ± {lo['exact_se']:.2g}")
    print(f"  L(v_θ) on the same draws                              {lo['learned']:.4g} ± {lo['learned_se']:.2g}")
    residual = lo["learned"] - lo["exact"] - lo["gap"]
    print(f"  E|v_θ − v*|² on the same draws                        {lo['gap']:.4g} ± {lo['gap_se']:.2g}"
          f"   (L(v_θ) − L* − E|v_θ − v*|² = {residual:.2g}, expected 0 ± {lo['cross_se']:.2g})")
    names = [k for k in ("mmd2", "w2", "sinkhorn") if k in di["source"]]
    heads = {"mmd2": f"MMD² (ℓ={MMD_BANDWIDTH:g})", "w2": "W₂²", "sinkhorn": "Sinkhorn S_ε"}
    print("distance to the target atoms        " + "".join(f"{heads[k]:>15}" for k in names))
    for name, label in (("source", "source particles, t = 0"), ("learned", "learned field, t = 1"),
                        ("exact", f"exact field, t = {nb['exact_t_max']:g}")):
        print(f"  {label:<34}" + "".join(f"{di[name][k]:>15.4g}" for k in names))
    um = nb["upper_mass"]
    print(f"upper-moon mass: target {um['target']:.3f}, learned {um['learned']:.3f}, exact {um['exact']:.3f};"
          f" RMS distance between the learned and exact endpoints {nb['flow_map_rms_gap']:.4g}")
    print("paths                                     learned        exact")
    for key, label in (("straightness", "straightness"), ("kinetic", "kinetic action E∫|ẋ|²dt"),
                       ("endpoint_cost", "endpoint cost E|x₁ − x₀|²")):
        print(f"  {label:<34} {pa['learned'][key]:>12.4g} {pa['exact'][key]:>12.4g}")
    print(f"  (W₂²(source particles, target) = {di['source']['w2']:.4g}, the cost of the optimal coupling)")
    print(f"conservativity at t = {co['t']:g} (MATH.md §2)          learned        exact     v_θ − v*")
    for key, label in DIAGNOSTIC_ROWS:
        print(f"  {label:<34} {co['learned'][key]:>12.4g} {co['exact'][key]:>12.4g} {co['difference'][key]:>12.4g}")
    print("  " + " ".join(_reading(nb["source"])))


def _reading(source: str) -> tuple[str, ...]:
    if source == "eight_gaussians":
        return ("The exact field is not a gradient here (mixture source, MATH.md §1.4):",
                "its loop integrals are not 0, so read the learned field's against them.")
    return ("The exact field is a gradient here (isotropic Gaussian source, MATH.md eq. 1.4):",
            "its circle integrals vanish to rounding, its bridge integrals to the error of",
            "the trapezoid sum on a rough path; the learned field's are its own error.")


@learned_moons.report
def report(result, params):
    if not result.ok:
        print(f"the run did not complete ({result.status}); nothing to report")
        return
    numbers, arrays = evaluate(result, params)
    print_numbers(numbers)
    path = sidecar_files(params["out"])["numbers"]
    path.write_text(json.dumps(numbers, indent=1))
    print(f"wrote {path}")
    if params["picture"]:
        draw(numbers, arrays, params["picture"])
        print(f"wrote {params['picture']}")


# -- the picture ------------------------------------------------------------------------------------------


def draw(nb: dict, ar: dict, out: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 9.5), layout="constrained")
    axes = fig.subplots(2, 3)
    lim = _limits(np.concatenate([ar["x0"], ar["points"], ar["x_learned"]]))
    _draw_source(axes[0, 0], ar, nb)
    _draw_generated(axes[0, 1], ar, nb)
    _draw_paths(fig, axes[0, 2], ar, nb)
    for ax in axes[0]:
        ax.set_xlim(*lim[0])
        ax.set_ylim(*lim[1])
        ax.set_aspect("equal", adjustable="box")
        ax.set_xlabel("x₁")
        ax.set_ylabel("x₂")
    _draw_loss(axes[1, 0], ar["losses"], nb)
    _draw_diagnostics(axes[1, 1], nb["conservativity"])
    _draw_table(axes[1, 2], nb)
    fig.suptitle("Flow matching learned from samples vs the exact field between the same endpoints "
                 "(linear schedule, independent coupling)", fontsize="large")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


def _limits(x: np.ndarray):
    lo, hi = x.min(axis=0), x.max(axis=0)
    pad = 0.05 * (hi - lo).max()
    return (lo[0] - pad, hi[0] + pad), (lo[1] - pad, hi[1] + pad)


def _draw_source(ax, ar, nb):
    ax.scatter(ar["x0"][:, 0], ar["x0"][:, 1], s=4, color="C1", alpha=0.6, linewidths=0)
    label = "eight Gaussians" if nb["source"] == "eight_gaussians" else "N(0, I)"
    ax.set_title(f"source X₀ ~ {label}: {len(ar['x0'])} particles at t = 0", fontsize="medium")


def _draw_generated(ax, ar, nb):
    pts, w = ar["points"], ar["weights"]
    ax.scatter(pts[:, 0], pts[:, 1], s=10 * w / w.mean(), color="0.55", linewidths=0,
               label=f"target X₁: {len(pts)} weighted atoms")
    ax.scatter(ar["x_learned"][:, 0], ar["x_learned"][:, 1], s=4, color="C0", alpha=0.6, linewidths=0,
               label="generated by v_θ at t = 1")
    d = nb["distance"]
    ax.set_title(f"generated vs target: MMD² {d['learned']['mmd2']:.2g}, W₂² {d['learned']['w2']:.2g}\n"
                 f"(exact field: {d['exact']['mmd2']:.2g}, {d['exact']['w2']:.2g}; "
                 f"source: {d['source']['mmd2']:.2g}, {d['source']['w2']:.2g})", fontsize="medium")
    ax.legend(loc="upper left", fontsize="small", markerscale=2)


def _draw_paths(fig, ax, ar, nb):
    from matplotlib.collections import LineCollection

    frames, times = ar["learned_frames"], ar["learned_times"]
    show = np.random.default_rng(0).choice(frames.shape[1], size=min(300, frames.shape[1]), replace=False)
    segments = np.stack([frames[:-1, show], frames[1:, show]], axis=2).reshape(-1, 2, 2)
    lines = LineCollection(segments, array=np.repeat(0.5 * (times[:-1] + times[1:]), len(show)),
                           cmap="viridis", linewidths=0.7, alpha=0.8)
    ax.add_collection(lines)
    ax.scatter(frames[-1, show, 0], frames[-1, show, 1], s=5, color="k", linewidths=0, zorder=3)
    # Inside the panel: beside an equal-aspect axes a layout-managed colorbar drifts away from it.
    cax = ax.inset_axes([0.62, 0.05, 0.34, 0.03])
    fig.colorbar(lines, cax=cax, orientation="horizontal")
    cax.set_title("t", fontsize="small", pad=2)
    cax.tick_params(labelsize="x-small")
    p = nb["paths"]
    ax.set_title(f"paths of v_θ ({len(show)} of {frames.shape[1]}): straightness {p['learned']['straightness']:.3f}\n"
                 f"(exact field {p['exact']['straightness']:.3f})", fontsize="medium")


def _draw_loss(ax, losses, nb):
    lo = nb["loss"]
    if len(losses):
        steps = np.arange(1, len(losses) + 1)
        ax.plot(steps, losses, color="C0", alpha=0.25, linewidth=0.6, label="mini-batch loss")
        k = max(1, len(losses) // 50)
        if k > 1:
            ax.plot(steps[k - 1:], np.convolve(losses, np.ones(k) / k, mode="valid"), color="C0",
                    label=f"moving average ({k} steps)")
    ax.axhline(lo["exact"], color="k", linestyle="--", linewidth=1, label=f"irreducible loss L* = {lo['exact']:.3g}")
    ax.axhline(lo["learned"], color="C3", linestyle=":", linewidth=1.2,
               label=f"L(v_θ) after training = {lo['learned']:.3g}")
    if len(losses):
        ax.set_ylim(0.9 * min(lo["exact"], float(losses.min())), float(np.quantile(losses, 0.995)))
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("regression loss E|v_θ(Z_t, t) − (X₁ − X₀)|²")
    ax.legend(loc="upper right", fontsize="small")
    ax.set_title(f"training: E|v_θ − v*|² = L(v_θ) − L* = {lo['gap']:.3g}", fontsize="medium")


def _draw_diagnostics(ax, co: dict) -> None:
    metrics = (("circle_ratio_mean", "circle loops\n|∮v·dx| / ∮|x||dx|"),
               ("bridge_ratio_mean", "Brownian bridges\n|∮v·dx| / ∮|x||dx|"),
               ("jacobian_asymmetry_mean", "|J − Jᵀ|\nmean"), ("jacobian_asymmetry_max", "|J − Jᵀ|\nmax"))
    floor = 1e-17  # zero (a gradient field's exact value) drawn at the bottom of the log axis
    x = np.arange(len(metrics))
    series = (("learned", "learned v_θ", "C0"), ("exact", "exact v*", "C3"), ("difference", "v_θ − v*", "0.65"))
    for k, (name, label, colour) in enumerate(series):
        values = np.array([co[name][m] for m, _ in metrics])
        bars = ax.bar(x + (k - 1) * 0.27, np.maximum(values, floor), width=0.27, color=colour, label=label)
        ax.bar_label(bars, labels=[f"{v:.1e}" for v in values], fontsize=7, rotation=90, padding=2)
    ax.set_yscale("log")
    ax.set_xticks(x, [label for _, label in metrics], fontsize="small")
    # Head room above the tallest bar for its rotated label and the legend, in proportion to the
    # decades the axis spans (a gradient field's zeros pull it down to the floor).
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * (hi / lo) ** 0.45)
    ax.legend(fontsize="small", loc="upper right", ncols=3)
    ax.set_title(f"conservativity at t = {co['t']:g} (MATH.md §2): 0 for a gradient field", fontsize="medium")


def _draw_table(ax, nb: dict) -> None:
    lo, di, pa, um, tr = nb["loss"], nb["distance"], nb["paths"], nb["upper_mass"], nb["training"]
    names = [k for k in ("mmd2", "w2", "sinkhorn") if k in di["source"]]
    heads = {"mmd2": "MMD²", "w2": "W₂²", "sinkhorn": "S_ε"}
    rows = [
        f"training: {tr['steps']} steps" + ("" if tr["trained_now"] else " (saved weights reused)"),
        f"  final loss       {_g(tr['final_loss'])}",
        f"  L*               {lo['exact']:.4g} ± {lo['exact_se']:.1g}",
        f"  E|v_θ − v*|²     {lo['gap']:.4g} ± {lo['gap_se']:.1g}",
        "",
        "distance to target " + "".join(f"{heads[k]:>11}" for k in names),
    ]
    for name in ("source", "learned", "exact"):
        rows.append(f"  {name:<17}" + "".join(f"{di[name][k]:>11.3g}" for k in names))
    rows += [
        f"upper-moon mass: target {um['target']:.2f},",
        f"  learned {um['learned']:.2f}, exact {um['exact']:.2f}",
        "",
        "paths                 learned      exact",
        f"  straightness     {pa['learned']['straightness']:>10.3f} {pa['exact']['straightness']:>10.3f}",
        f"  E∫|ẋ|²dt         {pa['learned']['kinetic']:>10.3g} {pa['exact']['kinetic']:>10.3g}",
        f"  E|x₁ − x₀|²      {pa['learned']['endpoint_cost']:>10.3g} {pa['exact']['endpoint_cost']:>10.3g}",
        f"  W₂²(source, target) = {di['source']['w2']:.3g}",
        "",
        textwrap.fill(" ".join(_reading(nb["source"])), 56),
    ]
    ax.axis("off")
    ax.text(0.0, 1.0, "\n".join(rows), family="monospace", fontsize=9, va="top", ha="left",
            transform=ax.transAxes)


if __name__ == "__main__":
    learned_moons.main()
