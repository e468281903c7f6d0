"""Flow matching, training and sampling: measureflow against TorchCFM and torchdiffeq.

**Training step** (forward + loss + backward + optimiser step), at each ``--batch-sizes`` B, for the
independent and the mini-batch exact-OT coupling with the linear schedule Zₜ = (1 − t)X₀ + tX₁
(MATH.md §1). Both sides train the same network — a :class:`~measureflow.training.VelocityMLP`
(d = 2, ``--hidden`` × ``--depth``, time embedding with 4 frequencies), the same initial weights —
with Adam (lr 1e-3), on the same data: X₀ ~ N(0, I₂) and X₁ resampled with replacement from a fixed
cloud of 20,000 points of an eight-Gaussian ring. Each side runs its public API:

* **measureflow**: one ``train_velocity(N(0, I), points, "linear", coupling=..., model=net,
  steps=S, batch_size=B)`` call (coupling ``"independent"`` or ``"exact_ot"``), timed from the
  outside (its set-up included) and divided by S;
* **TorchCFM**: the training loop of its README, with the same network — draw X₀ (``torch.randn``) and X₁ (index the cloud),
  ``t, xt, ut = FM.sample_location_and_conditional_flow(x0, x1)`` with ``ConditionalFlowMatcher()``
  or ``ExactOptimalTransportConditionalFlowMatcher()`` (σ = 0), ``loss = mean((net(xt, t) − ut)²)``,
  ``zero_grad``, ``backward``, ``step`` — S steps timed and divided by S.

The exact-OT couplings differ by design: measureflow uses the optimal permutation of the batch
(uniform weights, equal sizes: the plan is a vertex of the Birkhoff polytope), TorchCFM draws B pairs
with replacement from the plan. Both solve the same ``ot.emd`` problem, which dominates their time.

**Sampling**: ``--particles`` points X₀ ~ N(0, I₂) carried from t = 0 to t = 1 by a trained network
(``--pretrain`` measureflow training steps, independent coupling, batch 256; a network at its
random initialisation with ``--pretrain 0``), in ``--dtype`` (float64 by default, since a
tolerance of 1e-7 is below float32 resolution), without autograd on either side:

* **measureflow**: ``Simulation(Particles(x0), field("learned", model=net), integrator, 0, 1,
  steps=n)`` and ``run()``: ``"rk4"`` (classical) with n steps, ``"dopri5"`` with rtol = atol = tol
  and one output interval;
* **torchdiffeq**: ``odeint(lambda t, y: net(y, t), x0, ts, method=...)`` with ts the n + 1 grid
  points for ``"rk4"`` (so it takes exactly the same n steps) and ts = (0, 1) with rtol = atol = tol
  for ``"dopri5"``.

torchdiffeq's ``"rk4"`` is Kutta's 3/8 rule, not the classical method, so their endpoints differ by
the two methods' O(h⁴) truncation errors; the ``rk4_3/8`` row runs measureflow's
``ExplicitRungeKutta`` with the 3/8-rule tableau (at the first ``--rk4-steps`` value), the same
method as torchdiffeq's, whose endpoints must agree to rounding. The dopri5 pair is the same, but
the step-size controllers are not (measureflow: PI control and clipping the last step to land on
t = 1; torchdiffeq: I control and interpolation back to t = 1).
Field evaluations are counted by a wrapper around the network on both sides. Each row reports the
max |difference| of the two endpoints and each side's max error against a reference solution
(measureflow dopri5, rtol = atol = 1e-12, checked against torchdiffeq at the same tolerance).

Times are best of ``--repeats`` blocks (measureflow and the peer alternate, so load on the machine
hits both alike), after one untimed warm-up of each; the ratio of the median blocks is reported
too. ``--threads`` torch threads (default 1: on a shared machine an oversubscribed thread pool
makes small-tensor timings meaningless). Wall-clock time is the headline; the process CPU time of
the same blocks (best of the repeats; with one thread, the time the work itself took) is reported
beside it as a check that is less sensitive to other processes on the machine. The ``rk4`` and
``rk4_3/8`` rows at the same step count do the same work per step on both sides, so the spread
of their ratios around 1 gauges the noise of a run.

Usage::

    python benchmarks/bench_flow_matching.py            # B = 256, 1024; 10⁴ particles (5–15 min on 2 shared cores)
    python benchmarks/bench_flow_matching.py --quick    # fewer steps and repeats, random network (a few minutes)
    python benchmarks/bench_flow_matching.py --device cuda --threads 4

Results go to stdout and to ``--out`` (default ~/.cache/measureflow/benchmarks/flow_matching-<device>.{md,json}, outside the
repository: benchmarks/results/ holds the committed tables, written there only on purpose).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import time
from pathlib import Path
from statistics import median

import numpy as np
import torch
from torch import nn

from benchkit import add_standard_arguments, prepare_machine

import measureflow
from measureflow.integrators import ButcherTableau, DormandPrince5, ExplicitRungeKutta
from measureflow.training import VelocityMLP, train_velocity
from measureflow.measures import Gaussian


#: Kutta's 3/8 rule (the method torchdiffeq calls "rk4").
RK4_38 = ButcherTableau(
    "rk4_3/8",
    4,
    c=[0, 1 / 3, 2 / 3, 1],
    a=[[], [1 / 3], [-1 / 3, 1], [1, -1, 1]],
    b=[1 / 8, 3 / 8, 3 / 8, 1 / 8],
)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def ring(n: int, generator: torch.Generator) -> torch.Tensor:
    """n points of the eight-Gaussian ring (radius 2, standard deviation 0.2)."""
    angle = 2 * math.pi * torch.randint(8, (n,), generator=generator) / 8
    centres = 2.0 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centres + 0.2 * torch.randn(n, 2, generator=generator)


class Counted(nn.Module):
    """The wrapped network, counting its forward calls (field evaluations)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.config = getattr(net, "config", None)
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        return self.net(x, t)


def take_turns(sides: dict, run, warm, repeats: int) -> dict:
    """``run(side)`` for every side ``repeats`` times in turns (order reversed every other round), after
    one untimed ``warm(side)`` each (which also pays a compiled side's compile). Every timed run
    follows an untimed ``warm`` of the same side: a side timed straight after another pays for the
    state the other left (allocator, caches) — up to 30 % here on a float64 sampling run of 0.1 s,
    which made the ratio depend on the order of the turns. Per side, the list of what ``run``
    returned, in round order."""
    names = list(sides)
    for name in names:
        warm(sides[name])
    out = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            warm(sides[name])
            out[name].append(run(sides[name]))
    return out


def paired(num: list, den: list) -> float:
    """Median over rounds of wall(num) / wall(den), each ratio from one round's adjacent blocks."""
    return median(a[0] / b[0] for a, b in zip(num, den))


# -- training ---------------------------------------------------------------------------------------


class Clock:
    """Wall-clock and process CPU seconds of a block (the CPU time is what the block itself used,
    so it is far less sensitive to other processes on a shared machine than the wall time)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return False


def train_measureflow(net, source, points, coupling, batch, steps, device, compile=False):
    with Clock(device) as clock:
        train_velocity(source, points, "linear", coupling=coupling, model=net, steps=steps, batch_size=batch,
                       lr=1e-3, progress=False, device=device, compile=compile)
    return clock.wall / steps, clock.cpu / steps


def train_torchcfm(net, matcher, points, batch, steps, device):
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    d = points.shape[1]
    with Clock(device) as clock:
        for _ in range(steps):
            x0 = torch.randn(batch, d, device=device)
            x1 = points[torch.randint(points.shape[0], (batch,), device=device)]
            t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)
            loss = torch.mean((net(xt, t) - ut) ** 2)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return clock.wall / steps, clock.cpu / steps


def bench_training(args, device, net0, points):
    from torchcfm.conditional_flow_matching import (
        ConditionalFlowMatcher,
        ExactOptimalTransportConditionalFlowMatcher,
    )

    source = Gaussian(torch.zeros(2, device=device), torch.eye(2, device=device))
    cases = [
        ("independent", ConditionalFlowMatcher(sigma=0.0), args.train_steps),
        ("exact_ot", ExactOptimalTransportConditionalFlowMatcher(sigma=0.0), args.ot_steps),
    ]
    rows = []
    for batch in args.batch_sizes:
        for coupling, matcher, steps in cases:
            sides = {
                "measureflow": lambda n: train_measureflow(copy.deepcopy(net0), source, points, coupling, batch, n,
                                                           device),
                "torchcfm": lambda n: train_torchcfm(copy.deepcopy(net0), matcher, points, batch, n, device),
            }
            if args.compile:
                sides["compiled"] = lambda n: train_measureflow(copy.deepcopy(net0), source, points, coupling, batch,
                                                                n, device, compile=True)
            times = take_turns(sides, lambda fn: fn(steps), lambda fn: fn(2), args.repeats)
            mine, theirs = times["measureflow"], times["torchcfm"]
            row = {"batch": batch, "coupling": coupling, "steps_timed": steps,
                   "measureflow_s": min(w for w, _ in mine), "torchcfm_s": min(w for w, _ in theirs),
                   "measureflow_cpu_s": min(c for _, c in mine), "torchcfm_cpu_s": min(c for _, c in theirs),
                   "measureflow_all": mine, "torchcfm_all": theirs}
            row["ratio"] = row["torchcfm_s"] / row["measureflow_s"]
            row["cpu_ratio"] = row["torchcfm_cpu_s"] / row["measureflow_cpu_s"]
            row["median_ratio"] = median(w for w, _ in theirs) / median(w for w, _ in mine)
            row["paired_ratio"] = paired(theirs, mine)
            line = (f"train  B={batch:<5} {coupling:<12} measureflow {1e3 * row['measureflow_s']:9.3f} ms  "
                    f"TorchCFM {1e3 * row['torchcfm_s']:9.3f} ms  TorchCFM/measureflow {row['ratio']:5.2f} "
                    f"(CPU time {row['cpu_ratio']:5.2f}, medians {row['median_ratio']:5.2f}, paired {row['paired_ratio']:5.2f})")
            if args.compile:
                comp = times["compiled"]
                row.update(compiled_s=min(w for w, _ in comp), compiled_cpu_s=min(c for _, c in comp), compiled_all=comp)
                row["compiled_ratio"] = row["torchcfm_s"] / row["compiled_s"]
                row["compiled_cpu_ratio"] = row["torchcfm_cpu_s"] / row["compiled_cpu_s"]
                row["compiled_paired_ratio"] = paired(theirs, comp)
                line += (f"\n       compiled {1e3 * row['compiled_s']:9.3f} ms  TorchCFM/compiled {row['compiled_ratio']:5.2f} "
                         f"(CPU time {row['compiled_cpu_ratio']:5.2f}, paired {row['compiled_paired_ratio']:5.2f})")
            rows.append(row)
            print(line, flush=True)
    return rows


# -- sampling ---------------------------------------------------------------------------------------


def integrate_measureflow(counted, x0, method, n, tol, compile=False, with_nfev=False):
    if method == "rk4":
        integrator = measureflow.integrator("rk4")
    elif method == "rk4_3/8":
        integrator = ExplicitRungeKutta(RK4_38)
    else:
        integrator = DormandPrince5(rtol=tol, atol=tol)
    field = measureflow.field("learned", model=counted)
    sim = measureflow.Simulation(measureflow.Particles(x0[None]), field, integrator, 0.0, 1.0,
                                 steps=n if method != "dopri5" else 1, progress=False, compile=compile)
    result = sim.run()
    if not result.ok:
        raise RuntimeError(f"measureflow run did not complete: {result.status}")
    if with_nfev:
        return result.state.x[0], result.integrator_stats["nfev"]
    return result.state.x[0]


def integrate_torchdiffeq(counted, x0, method, n, tol):
    from torchdiffeq import odeint

    def f(t, y):
        return counted(y, t)

    with torch.no_grad():
        if method == "dopri5":
            ts = torch.tensor([0.0, 1.0], dtype=x0.dtype, device=x0.device)
            return odeint(f, x0, ts, method="dopri5", rtol=tol, atol=tol)[-1]
        ts = torch.linspace(0.0, 1.0, n + 1, dtype=x0.dtype, device=x0.device)
        return odeint(f, x0, ts, method="rk4")[-1]


def timed(fn, counted, device):
    counted.calls = 0
    with Clock(device) as clock:
        out = fn()
    return clock.wall, clock.cpu, counted.calls, out


def bench_sampling(args, device, net, dtype):
    gen = torch.Generator().manual_seed(args.seed + 1)
    x0 = torch.randn(args.particles, 2, generator=gen).to(device=device, dtype=dtype)
    net = copy.deepcopy(net).to(device=device, dtype=dtype).eval()
    counted = Counted(net)
    reference = integrate_measureflow(counted, x0, "dopri5", 1, 1e-12)
    check = integrate_torchdiffeq(counted, x0, "dopri5", 1, 1e-12)
    ref_gap = float((reference - check).abs().max())
    tag = str(dtype).replace("torch.", "")
    print(f"sample {tag} reference (dopri5, tol 1e-12): measureflow vs torchdiffeq max |diff| {ref_gap:.1e}")

    # The 3/8-rule rows check that the same method gives the same endpoints: one step count is enough.
    cases = [("rk4", n, None) for n in args.rk4_steps] + [("rk4_3/8", args.rk4_steps[0], None)]
    cases += [("dopri5", None, tol) for tol in args.tols]
    rows = []
    for method, n, tol in cases:
        peer_method = "dopri5" if method == "dopri5" else "rk4"
        sides = {
            "measureflow": lambda: integrate_measureflow(counted, x0, method, n, tol),
            "torchdiffeq": lambda: integrate_torchdiffeq(counted, x0, peer_method, n, tol),
        }
        if args.compile:
            def compiled_side(method=method, n=n, tol=tol):
                # The bare network: a Python counter inside a compiled graph is a side effect that
                # dynamo guards on (a recompile per call); the run's own counter gives the evaluations.
                y, nfev = integrate_measureflow(net, x0, method, n, tol, compile=True, with_nfev=True)
                counted.calls += nfev
                return y

            sides["compiled"] = compiled_side
        times = take_turns(sides, lambda fn: timed(fn, counted, device), lambda fn: fn(), args.repeats)
        mine, theirs = times["measureflow"], times["torchdiffeq"]
        t_m, _, nfev_m, y_m = min(mine, key=lambda v: v[0])
        t_p, _, nfev_p, y_p = min(theirs, key=lambda v: v[0])
        c_m, c_p = min(v[1] for v in mine), min(v[1] for v in theirs)
        row = {
            "dtype": tag, "particles": args.particles, "method": method, "steps": n, "tol": tol,
            "measureflow_s": t_m, "torchdiffeq_s": t_p, "ratio": t_p / t_m,
            "measureflow_cpu_s": c_m, "torchdiffeq_cpu_s": c_p, "cpu_ratio": c_p / c_m,
            "median_ratio": median(v[0] for v in theirs) / median(v[0] for v in mine),
            "paired_ratio": paired(theirs, mine),
            "measureflow_nfev": nfev_m, "torchdiffeq_nfev": nfev_p,
            "measureflow_per_eval_s": t_m / nfev_m, "torchdiffeq_per_eval_s": t_p / nfev_p,
            "max_diff": float((y_m - y_p).abs().max()),
            "measureflow_err": float((y_m - reference).abs().max()),
            "torchdiffeq_err": float((y_p - reference).abs().max()),
            "measureflow_all": [v[:2] for v in mine], "torchdiffeq_all": [v[:2] for v in theirs],
        }
        label = f"{method} n={n}" if tol is None else f"{method} tol={tol:g}"
        line = (f"sample {tag} {label:<16} measureflow {t_m:8.4f} s ({nfev_m:4d} evals)  torchdiffeq {t_p:8.4f} s "
                f"({nfev_p:4d} evals)  torchdiffeq/measureflow {row['ratio']:5.2f} (CPU {row['cpu_ratio']:5.2f}, "
                f"medians {row['median_ratio']:5.2f}, paired {row['paired_ratio']:5.2f})  max|diff| {row['max_diff']:.1e}  "
                f"err {row['measureflow_err']:.1e} / {row['torchdiffeq_err']:.1e}")
        if args.compile:
            comp = times["compiled"]
            t_c, _, nfev_c, y_c = min(comp, key=lambda v: v[0])
            c_c = min(v[1] for v in comp)
            row.update(compiled_s=t_c, compiled_cpu_s=c_c, compiled_nfev=nfev_c, compiled_ratio=t_p / t_c,
                       compiled_cpu_ratio=c_p / c_c, compiled_paired_ratio=paired(theirs, comp),
                       compiled_vs_eager=float((y_c - y_m).abs().max()),
                       compiled_err=float((y_c - reference).abs().max()), compiled_all=[v[:2] for v in comp])
            line += (f"\n       compiled {t_c:8.4f} s ({nfev_c:4d} evals)  torchdiffeq/compiled {row['compiled_ratio']:5.2f} "
                     f"(CPU {row['compiled_cpu_ratio']:5.2f}, paired {row['compiled_paired_ratio']:5.2f})  "
                     f"max|compiled − eager| {row['compiled_vs_eager']:.1e}  err {row['compiled_err']:.1e}")
        rows.append(row)
        print(line, flush=True)
    return rows, ref_gap


# -- main -------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--train-steps", type=int, default=100, help="steps per timed block, independent coupling")
    parser.add_argument("--ot-steps", type=int, default=10, help="steps per timed block, exact-OT coupling")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--particles", type=int, default=10_000)
    parser.add_argument("--rk4-steps", type=int, nargs="+", default=None, help="default 20 100 (--quick: 20)")
    parser.add_argument("--tols", type=float, nargs="+", default=[1e-5, 1e-7], help="dopri5 rtol = atol")
    parser.add_argument("--pretrain", type=int, default=2000, help="training steps of the sampled network (0: random)")
    parser.add_argument("--dtype", choices=["float32", "float64"], nargs="+", default=["float64"],
                        help="sampling precision(s)")
    parser.add_argument("--compile", action="store_true",
                        help="add a third side: measureflow compiled (train_velocity(compile=True), "
                             "Simulation(compile=True)); its compile is paid in the untimed warm-up")
    parser.add_argument("--repeats", type=int, default=9, help="timed blocks per side (best kept)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--skip", choices=["training", "sampling"], nargs="*", default=[])
    add_standard_arguments(parser, "flow_matching", "50/5 training steps, 3 repeats, random network, rk4 with 20 steps only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.train_steps, args.ot_steps, args.repeats, args.pretrain = 50, 5, 3, 0
    if args.rk4_steps is None:
        args.rk4_steps = [20] if args.quick else [20, 100]
    args.dtype = [getattr(torch, d) for d in args.dtype]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # TorchCFM draws its OT pairs from NumPy's global generator

    env = {
        **prepare_machine(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "measureflow": measureflow.__version__,
        "network": f"VelocityMLP(2, hidden={args.hidden}, depth={args.depth})",
        "repeats": args.repeats,
    }
    for mod in ("torchcfm", "torchdiffeq", "ot"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - a missing peer is reported, not fatal
            env[mod] = f"unavailable ({type(exc).__name__})"
    print("  ".join(f"{k}={v}" for k, v in env.items()))

    gen = torch.Generator().manual_seed(args.seed)
    points = ring(20_000, gen).to(device)
    net0 = VelocityMLP(2, hidden=args.hidden, depth=args.depth, generator=gen).to(device)

    training = [] if "training" in args.skip else bench_training(args, device, net0, points)
    sampling = []
    if "sampling" not in args.skip:
        net = copy.deepcopy(net0)
        if args.pretrain > 0:
            source = Gaussian(torch.zeros(2, device=device), torch.eye(2, device=device))
            result = train_velocity(source, points, "linear", model=net, steps=args.pretrain, batch_size=256,
                                    seed=args.seed, progress=False, device=device)
            env["sampled_network"] = f"trained {args.pretrain} steps, final loss {result.final_loss:.4g}"
        else:
            env["sampled_network"] = "random initialisation"
        for dtype in args.dtype:
            rows, ref_gap = bench_sampling(args, device, net, dtype)
            sampling += rows
            env[f"reference_gap_{str(dtype).replace('torch.', '')}"] = ref_gap
        env["sampling_particles"] = args.particles

    stem = args.out.with_name(f"{args.out.name}-{device.type}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "training": training, "sampling": sampling},
                                                    indent=2))
    lines = ["# Flow matching: training step and sampling (benchmarks/bench_flow_matching.py)", "",
             "  ".join(f"{k}={v}" for k, v in env.items()), ""]
    if training:
        lines += [
            "| batch | coupling | side | ms / step | TorchCFM ms / step | TorchCFM / side "
            "| same, CPU time | same, paired rounds |",
            "|---:|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in training:
            for side, key in (("measureflow", ""), ("measureflow compiled", "compiled")):
                if key and key + "_s" not in r:
                    continue
                k = key or "measureflow"
                ratio, cpu = (r["compiled_ratio"], r["compiled_cpu_ratio"]) if key else (r["ratio"], r["cpu_ratio"])
                pr = r["compiled_paired_ratio"] if key else r["paired_ratio"]
                lines.append(f"| {r['batch']} | {r['coupling']} | {side} | {1e3 * r[k + '_s']:.3f} | "
                             f"{1e3 * r['torchcfm_s']:.3f} | {ratio:.2f} | {cpu:.2f} | {pr:.2f} |")
        lines.append("")
    if sampling:
        lines += [
            "| dtype | method | steps / tol | side | s | torchdiffeq s | torchdiffeq / side | same, CPU time "
            "| same, paired rounds | evals | evals td | max \\|diff\\| vs td | err side | err td |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sampling:
            which = f"{r['steps']}" if r["tol"] is None else f"{r['tol']:g}"
            lines.append(
                f"| {r['dtype']} | {r['method']} | {which} | measureflow | {r['measureflow_s']:.4f} | {r['torchdiffeq_s']:.4f} | "
                f"{r['ratio']:.2f} | {r['cpu_ratio']:.2f} | {r['paired_ratio']:.2f} | {r['measureflow_nfev']} | "
                f"{r['torchdiffeq_nfev']} | {r['max_diff']:.1e} | {r['measureflow_err']:.1e} | {r['torchdiffeq_err']:.1e} |"
            )
            if "compiled_s" in r:
                lines.append(
                    f"| {r['dtype']} | {r['method']} | {which} | measureflow compiled | {r['compiled_s']:.4f} | "
                    f"{r['torchdiffeq_s']:.4f} | {r['compiled_ratio']:.2f} | {r['compiled_cpu_ratio']:.2f} | "
                    f"{r['compiled_paired_ratio']:.2f} | {r['compiled_nfev']} | {r['torchdiffeq_nfev']} | "
                    f"{r['compiled_vs_eager']:.1e} (vs eager) | {r['compiled_err']:.1e} | {r['torchdiffeq_err']:.1e} |"
                )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"\nwritten: {stem.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
