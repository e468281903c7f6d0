"""Particle velocities of three gradient flows: measureflow's fields against GeomLoss and POT.

Three comparisons, each on float32 data in d = 2 (x ~ N(0, I), target samples y ~ N((1, 0), diag(½, 2)),
uniform weights), timed side by side in one run:

1. **MMD velocity, Gaussian kernel** k = exp(−|x − y|²/(2h²)) (MATH.md §6). measureflow's ``mmd`` field,
   ``velocity`` at the particles (two streamed kernel sums), against GeomLoss's
   ``SamplesLoss("gaussian", blur=h)`` differentiated by autograd, with ``backend="online"`` (KeOps)
   and ``"tensorized"`` (dense torch; only where the N×M matrices fit). Normalisation: measureflow
   descends MMD² (unhalved, MATH.md §0); GeomLoss returns L = ½MMD². With uniform weights 1/N the
   velocity is v(xᵢ) = −(1/wᵢ)∇_{xᵢ}MMD² = −2N ∇_{xᵢ}L, the factor compared.
2. **Sliced-Wasserstein velocity** (MATH.md §8), L directions. measureflow's ``sliced_wasserstein``
   field (d = 2 quadrature: angles π(l + ½)/L) against POT's ``ot.sliced_wasserstein_distance`` on
   torch tensors with the same directions passed as ``projections`` and autograd. POT returns
   (mean_l W₂²)^{1/2}, so SW₂² is its square and v(xᵢ) = −N ∇_{xᵢ}(SW)². measureflow is timed twice:
   a field that already holds the target's sorted projections (the target is fixed along a flow, so
   every evaluation after the first finds them) and a new field per evaluation (sorts both clouds, as
   POT does).
3. **Sinkhorn potentials** of OT_ε(μ, β), cost |x − y|², ε in length² (MATH.md §7). measureflow's
   ``measureflow.reductions.sinkhorn_potentials`` (the solver inside the ``sinkhorn`` field: streamed log-domain sweeps,
   over-relaxed with ω learnt from the contraction; ``relaxation=1`` is plain Sinkhorn) against POT's
   numpy ``ot.bregman.sinkhorn_log`` (dense N×M cost) and GeomLoss ``SamplesLoss("sinkhorn", p=2,
   blur=√(ε/2), debias=False, potentials=True)`` (ε-scaling; its cost is |x − y|²/2 and its ε is
   blur², so its potentials are half of ours: F = f/2). Accuracy is measured the same way for all —
   the L1 marginal error ‖π1 − a‖₁ + ‖πᵀ1 − b‖₁ of the plan πᵢⱼ = aᵢbⱼe^{(fᵢ + gⱼ − Cᵢⱼ)/ε} built from
   the returned potentials (float64, streamed) — and each solver runs at a ladder of its own accuracy
   knob (measureflow ``tol``, POT iterations, GeomLoss ``scaling``), so the table gives the time to
   reach a common marginal error, not only a time per iteration. POT's sweep is plain log-domain
   Sinkhorn, the same iteration as measureflow with ``relaxation=1``; its dense sweep costs seconds at
   N = 10⁴, so POT runs ``--pot-iters`` sweeps once and its time to a given error is that per-sweep
   time times the sweeps plain Sinkhorn needs (read off the measureflow ``relaxation=1`` runs, whose
   error sequence is POT's up to rounding) — marked "est." in the table.

Times are wall-clock, best of ``--repeats`` after a warm-up call on 1000 points (compiles measureflow's
fused kernels and KeOps' formulas; reported separately); a single evaluation that takes over
``--long-run`` seconds is not repeated. Velocities are compared in max-norm relative difference,
potentials after removing the constant shift (f + c, g − c) that leaves the plan unchanged.

Usage::

    python benchmarks/bench_gradient_flows.py                # N = 10⁴, 10⁵ (MMD), 10⁵ (SW), 10⁴ (Sinkhorn)
    python benchmarks/bench_gradient_flows.py --quick        # small sizes, about a minute
    python benchmarks/bench_gradient_flows.py --parts mmd sw --mmd-sizes 10000

Results go to stdout and to ``--out`` (default ~/.cache/measureflow/benchmarks/gradient_flows-cpu.{md,json};
benchmarks/results/ holds the committed tables, written there only on purpose). The implementations of a
comparison are timed in turns within the process (``benchkit``), and the record holds torch threads, load
average and effective cores at the start.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchkit import add_standard_arguments, alternate_best, prepare_machine

from measureflow import reductions
from measureflow.reductions import sinkhorn_potentials, softmax_average
from measureflow.state import Particles
from measureflow_plugins.mmd import MMDField
from measureflow_plugins.sliced_wasserstein import DirectionSet, SlicedWassersteinField

DTYPE = torch.float32


# -- data and timing ---------------------------------------------------------------------------------


def clouds(n: int, m: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=gen, dtype=DTYPE)
    y = torch.randn(m, 2, generator=gen, dtype=DTYPE) * torch.tensor([math.sqrt(0.5), math.sqrt(2.0)]) + torch.tensor(
        [1.0, 0.0]
    )
    return x, y


def prepared(impls: dict, xs, ys, x, y, args) -> dict:
    """Per implementation (warm-up seconds on the small clouds, timing on the real ones): the sides are
    timed in turns within this process (benchkit.alternate_best), so load drift enters every ratio alike.
    A timing is (best seconds, result, calls), or the exception the implementation raised."""
    first, runners, failed = {}, {}, {}
    for name, make in impls.items():
        try:
            first[name] = warmup(make(xs, ys))
            runners[name] = make(x, y)
        except Exception as exc:  # noqa: BLE001 - a failing peer is reported, not fatal
            first[name], failed[name] = None, exc
    timings = alternate_best(runners, args.repeats, args.long_run)
    return {name: (first[name], failed.get(name) or timings[name]) for name in impls}


def warmup(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


SAVE = [lambda: None]  # rewrites the results files; set by main() so an interrupted run keeps its rows


def row(part, size, impl, seconds, **extra):
    return {"part": part, "size": size, "impl": impl, "seconds": seconds, **extra}


class Rows(list):
    def append(self, item):
        super().append(item)
        SAVE[0]()


# -- 1. MMD --------------------------------------------------------------------------------------------


def mmd_ours(x, y, h):
    field = MMDField(y, kernel="gaussian", bandwidth=h)
    state = Particles(x[None])
    return lambda: field.velocity(0.0, state.x, state)[0]


def mmd_geomloss(x, y, h, backend):
    from geomloss import SamplesLoss

    loss = SamplesLoss("gaussian", blur=h, backend=backend)
    n = x.shape[0]

    def run():
        xg = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(xg, y), xg)
        return -2.0 * n * grad  # L = ½MMD², v = −(1/wᵢ)∇MMD² = −2N∇L

    return run


def bench_mmd(args, rows):
    h = args.bandwidth
    for n in args.mmd_sizes:
        x, y = clouds(n, n, args.seed)
        xs, ys = clouds(1000, 1000, args.seed + 1)
        impls = {"measureflow": lambda a, b: mmd_ours(a, b, h),
                 "geomloss-online": lambda a, b: mmd_geomloss(a, b, h, "online")}
        # The tensorized backend forms three N×N float32 matrices and their autograd copies.
        if 6 * 4 * n * n < args.dense_bytes:
            impls["geomloss-tensorized"] = lambda a, b: mmd_geomloss(a, b, h, "tensorized")
        else:
            rows.append(row("mmd", n, "geomloss-tensorized", None,
                            error=f"skipped: dense N×N matrices need > {args.dense_bytes / 2**30:.0f} GiB"))
            print(f"mmd {n:>7} geomloss-tensorized skipped (dense matrices do not fit)")
        mine = None
        for name, (first, res) in prepared(impls, xs, ys, x, y, args).items():
            if isinstance(res, Exception):
                rows.append(row("mmd", n, name, None, error=f"{type(res).__name__}: {res}"))
                print(f"mmd {n:>7} {name:>20} failed: {type(res).__name__}: {res}")
                continue
            best, v, runs = res
            if mine is None:
                mine = (best, v)
            r = row("mmd", n, name, best, warmup_seconds=first, runs=runs, ratio=best / mine[0],
                    reldiff_velocity=rel(v, mine[1]))
            rows.append(r)
            print(f"mmd {n:>7} {name:>20} {best:9.3f} s  warm-up {first:6.2f} s  runs {runs}  "
                  f"peer/ours {r['ratio']:7.2f}  rel.diff v {r['reldiff_velocity']:.1e}", flush=True)


# -- 2. sliced Wasserstein ---------------------------------------------------------------------------


def sw_ours(x, y, count, cached: bool):
    state = Particles(x[None])
    field = SlicedWassersteinField(y, directions="quadrature", count=count)
    if cached:
        field.velocity(0.0, state.x, state)  # sorts the target's projections once, as a flow's first step does
        return lambda: field.velocity(0.0, state.x, state)[0]

    def run():
        fresh = SlicedWassersteinField(y, directions="quadrature", count=count)
        return fresh.velocity(0.0, state.x, state)[0]

    return run


def sw_pot(x, y, theta):
    import ot

    n = x.shape[0]
    proj = theta.T.contiguous()  # POT takes projections as (d, L)

    def run():
        xg = x.detach().clone().requires_grad_(True)
        sw = ot.sliced_wasserstein_distance(xg, y, projections=proj, p=2)
        (grad,) = torch.autograd.grad(sw * sw, xg)
        return -n * grad  # POT returns SW = (mean_l W₂²)^{1/2}; v = −(1/wᵢ)∇SW²

    return run


def bench_sw(args, rows):
    n = args.sw_size
    x, y = clouds(n, n, args.seed)
    xs, ys = clouds(1000, 1000, args.seed + 1)
    for count in args.directions:
        theta = DirectionSet("quadrature", count).nodes(x.shape[1])[0].to(x)  # the field's own directions
        impls = {
            "measureflow (target sorted once)": lambda a, b: sw_ours(a, b, count, True),
            "measureflow (new field)": lambda a, b: sw_ours(a, b, count, False),
            "pot": lambda a, b: sw_pot(a, b, theta),
        }
        mine = None
        for name, (first, res) in prepared(impls, xs, ys, x, y, args).items():
            if isinstance(res, Exception):
                rows.append(row("sw", n, name, None, directions=count, error=f"{type(res).__name__}: {res}"))
                print(f"sw  {n:>7} L={count:<4} {name:>34} failed: {type(res).__name__}: {res}")
                continue
            best, v, runs = res
            if mine is None:
                mine = (best, v)
            r = row("sw", n, name, best, directions=count, warmup_seconds=first, runs=runs,
                    ratio=best / mine[0], reldiff_velocity=rel(v, mine[1]))
            rows.append(r)
            print(f"sw  {n:>7} L={count:<4} {name:>34} {best:9.3f} s  peer/ours {r['ratio']:7.2f}  "
                  f"rel.diff v {r['reldiff_velocity']:.1e}", flush=True)


# -- 3. Sinkhorn potentials --------------------------------------------------------------------------


def marginal_error(x, y, f, g, eps) -> float:
    """‖π1 − a‖₁ + ‖πᵀ1 − b‖₁ for πᵢⱼ = aᵢbⱼe^{(fᵢ + gⱼ − |xᵢ − yⱼ|²)/ε}, uniform a, b, float64."""
    x, y, f, g = (t.detach().double() for t in (x, y, f, g))
    n, m = x.shape[0], y.shape[0]
    _, lse_rows = softmax_average(x, y, log_weights=g / eps - math.log(m), scale=1.0 / eps, return_logsumexp=True)
    _, lse_cols = softmax_average(y, x, log_weights=f / eps - math.log(n), scale=1.0 / eps, return_logsumexp=True)
    rows_ = torch.exp(f / eps + lse_rows) / n
    cols = torch.exp(g / eps + lse_cols) / m
    return float((rows_ - 1.0 / n).abs().sum() + (cols - 1.0 / m).abs().sum())


def shift_free(f, g):
    """Potentials with the plan-preserving shift (f + c, g − c) fixed by mean(g) = 0."""
    c = g.double().mean()
    return f.double() + c, g.double() - c


def sk_ours(x, y, eps, tol, max_iter, relaxation):
    n, m = x.shape[0], y.shape[0]
    logw = torch.full((1, n), -math.log(n), dtype=x.dtype)
    logq = torch.full((1, m), -math.log(m), dtype=y.dtype)

    def run():
        f, g, omega, sweeps, _ = sinkhorn_potentials(x[None], logw, y[None], logq, eps, relaxation=relaxation,
                                                     tol=tol, max_iter=max_iter, check_every=2)
        return f[0], g[0], sweeps, omega

    return run


def sk_pot(x, y, eps, iters):
    import ot

    xn, yn = x.numpy(), y.numpy()
    a = np.full(xn.shape[0], 1.0 / xn.shape[0], dtype=np.float32)
    b = np.full(yn.shape[0], 1.0 / yn.shape[0], dtype=np.float32)

    def run():
        M = ot.dist(xn, yn)  # squared Euclidean, dense N×M
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "did not converge": the sweep count is fixed on purpose
            _, log = ot.bregman.sinkhorn_log(a, b, M, eps, numItermax=iters, stopThr=0.0, log=True)
        f = eps * (torch.from_numpy(np.asarray(log["log_u"])) - math.log(a[0]))
        g = eps * (torch.from_numpy(np.asarray(log["log_v"])) - math.log(b[0]))
        return f, g, iters, None

    return run


def sk_geomloss(x, y, eps, scaling, backend):
    from geomloss import SamplesLoss

    # GeomLoss: cost |x − y|²/2 and ε = blur², i.e. our problem halved: blur = √(ε/2), F = f/2.
    loss = SamplesLoss("sinkhorn", p=2, blur=math.sqrt(eps / 2), scaling=scaling, debias=False, potentials=True,
                       backend=backend)

    def run():
        F, G = loss(x, y)
        return 2.0 * F.detach().reshape(-1), 2.0 * G.detach().reshape(-1), None, None

    return run


def bench_sinkhorn(args, rows):
    n = args.sinkhorn_size
    x, y = clouds(n, n, args.seed)
    xs, ys = clouds(1000, 1000, args.seed + 1)
    for eps in args.epsilons:
        runs = []  # (impl, knob, seconds, sweeps, error, f, g)
        ladder = [("measureflow", f"{args.iters} sweeps, ω = 1", sk_ours, (None, args.iters, 1.0))]
        ladder += [("measureflow", f"tol {t:g}, ω auto", sk_ours, (t, 5000, ("auto", 1.0))) for t in args.tols]
        ladder += [("measureflow (ω = 1)", f"tol {t:g}, ω = 1", sk_ours, (t, 5000, 1.0)) for t in args.plain_tols]
        if "pot" in args.sinkhorn_peers:
            ladder.append(("pot", f"{args.pot_iters} sweeps", sk_pot, (args.pot_iters,)))
        for backend, scalings in (("online", args.online_scalings), ("tensorized", args.scalings)):
            if f"geomloss-{backend}" in args.sinkhorn_peers:
                ladder += [(f"geomloss-{backend}", f"scaling {s:g}", lambda a, b, e, s_, bk=backend: sk_geomloss(a, b, e, s_, bk),
                            (s,)) for s in scalings]
        warmed, runners = set(), {}
        for impl, knob, make, params in ladder:
            try:
                if impl not in warmed:
                    warmup(make(xs, ys, eps, *params))
                    warmed.add(impl)
                runners[(impl, knob)] = make(x, y, eps, *params)
            except Exception as exc:  # noqa: BLE001
                runners[(impl, knob)] = exc
        timings = alternate_best({k: v for k, v in runners.items() if not isinstance(v, Exception)},
                                 args.repeats, args.long_run)
        for (impl, knob), runner in runners.items():
            res = runner if isinstance(runner, Exception) else timings[(impl, knob)]
            if not isinstance(res, Exception):
                best, (f, g, sweeps, omega), count = res
                try:
                    err = marginal_error(x, y, f, g, eps)
                except Exception as exc:  # noqa: BLE001
                    res = exc
            if isinstance(res, Exception):
                rows.append(row("sinkhorn", n, impl, None, epsilon=eps, knob=knob, error=f"{type(res).__name__}: {res}"))
                print(f"sk  {n:>7} ε={eps:<4g} {impl:>22} {knob:>18} failed: {type(res).__name__}: {res}")
                continue
            runs.append((impl, knob, best, sweeps, err, f, g))
            print(f"sk  {n:>7} ε={eps:<4g} {impl:>22} {knob:>18} {best:9.3f} s  sweeps {sweeps}  "
                  f"ω {omega if not isinstance(omega, float) else round(omega, 3)}  marginal L1 err {err:.2e}",
                  flush=True)
        # reference potentials: the most accurate measureflow run
        ref = min((r for r in runs if r[0] == "measureflow"), key=lambda r: r[4])
        fr, gr = shift_free(ref[5], ref[6])
        for impl, knob, best, sweeps, err, f, g in runs:
            fs, gs = shift_free(f, g)
            rows.append(row("sinkhorn", n, impl, best, epsilon=eps, knob=knob, sweeps=sweeps, marginal_error=err,
                            potential_diff=max(float((fs - fr).abs().max()), float((gs - gr).abs().max())) / eps))
        # time to reach each target accuracy
        pot = [r for r in runs if r[0] == "pot"]
        plain = sorted((r for r in runs if r[0] == "measureflow (ω = 1)"), key=lambda r: r[2])
        for target in args.targets:
            best_by = {}
            for impl, knob, best, sweeps, err, *_ in runs:
                if err <= target and (impl not in best_by or best < best_by[impl][0]):
                    best_by[impl] = (best, knob, False)
            if pot:
                per_sweep = pot[0][2] / pot[0][3]
                if pot[0][4] <= target:
                    best_by["pot"] = (pot[0][2], pot[0][1], False)
                else:
                    need = [r[3] for r in plain if r[4] <= target]
                    if need:
                        best_by["pot"] = (per_sweep * min(need), f"{min(need)} sweeps (est.)", True)
            ours = best_by.get("measureflow")
            best_by.pop("measureflow (ω = 1)", None)
            for impl, (sec, knob, est) in best_by.items():
                r = row("sinkhorn-to-accuracy", n, impl, sec, epsilon=eps, target=target, knob=knob, estimated=est,
                        ratio=None if ours is None else sec / ours[0])
                rows.append(r)
                print(f"sk  ε={eps:g} err ≤ {target:g}: {impl:>22} {sec:9.3f} s ({knob})"
                      + ("" if ours is None else f"  peer/ours {sec / ours[0]:.2f}"))


# -- report ------------------------------------------------------------------------------------------


def fmt(v, spec):
    return "" if v is None else format(v, spec)


#: Markdown sections: part, title, then (column header, alignment, cell) per column; the cells after
#: the leading key columns are left blank on a row that failed.
SECTIONS = [
    ("mmd", "MMD velocity, Gaussian kernel (v = −2N∇(GeomLoss ½MMD²))", 2, [
        ("N = M", "---:", lambda r: r["size"]), ("implementation", "---", lambda r: r["impl"]),
        ("s / evaluation", "---:", lambda r: f"{r['seconds']:.3f}"),
        ("warm-up s", "---:", lambda r: f"{r['warmup_seconds']:.2f}"), ("runs", "---:", lambda r: r["runs"]),
        ("peer / measureflow", "---:", lambda r: f"{r['ratio']:.2f}"),
        ("rel. diff v", "---:", lambda r: f"{r['reldiff_velocity']:.1e}")]),
    ("sw", "Sliced-Wasserstein velocity (v = −N∇(POT SW)²), same directions", 3, [
        ("N = M", "---:", lambda r: r["size"]), ("directions", "---:", lambda r: r["directions"]),
        ("implementation", "---", lambda r: r["impl"]), ("s / evaluation", "---:", lambda r: f"{r['seconds']:.3f}"),
        ("runs", "---:", lambda r: r["runs"]), ("peer / measureflow", "---:", lambda r: f"{r['ratio']:.2f}"),
        ("rel. diff v", "---:", lambda r: f"{r['reldiff_velocity']:.1e}")]),
    ("sinkhorn", "Sinkhorn potentials: every run", 4, [
        ("N = M", "---:", lambda r: r["size"]), ("ε", "---:", lambda r: f"{r['epsilon']:g}"),
        ("implementation", "---", lambda r: r["impl"]), ("setting", "---", lambda r: r["knob"]),
        ("s", "---:", lambda r: f"{r['seconds']:.3f}"), ("sweeps", "---:", lambda r: fmt(r["sweeps"], "d")),
        ("marginal L1 error", "---:", lambda r: f"{r['marginal_error']:.1e}"),
        ("max potential diff / ε", "---:", lambda r: f"{r['potential_diff']:.1e}")]),
    ("sinkhorn-to-accuracy", "Sinkhorn potentials: time to a marginal L1 error", 4, [
        ("N = M", "---:", lambda r: r["size"]), ("ε", "---:", lambda r: f"{r['epsilon']:g}"),
        ("error ≤", "---:", lambda r: f"{r['target']:g}"), ("implementation", "---", lambda r: r["impl"]),
        ("fastest setting reaching it", "---", lambda r: r["knob"]), ("s", "---:", lambda r: f"{r['seconds']:.3f}"),
        ("peer / measureflow", "---:", lambda r: fmt(r["ratio"], ".2f"))]),
]


def write(stem: Path, env: dict, rows: list) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "results": rows}, indent=2, default=str))
    lines = ["# Gradient-flow velocities and Sinkhorn potentials (benchmarks/bench_gradient_flows.py)", "",
             "  ".join(f"{k}={v}" for k, v in env.items()), ""]
    for part, title, keys, columns in SECTIONS:
        mine = [r for r in rows if r["part"] == part]
        if not mine:
            continue
        lines += [f"## {title}", "", "| " + " | ".join(c[0] for c in columns) + " |",
                  "|" + "|".join(c[1] for c in columns) + "|"]
        for r in mine:
            if r.get("error"):
                cells = [str(c[2](r)) for c in columns[:keys]] + [r["error"]] + [""] * (len(columns) - keys - 1)
            else:
                cells = [str(c[2](r)) for c in columns]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    stem.with_suffix(".md").write_text("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["mmd", "sw", "sinkhorn"], choices=["mmd", "sw", "sinkhorn"])
    parser.add_argument("--mmd-sizes", type=int, nargs="+", default=[10_000, 100_000], help="N = M of the MMD part")
    parser.add_argument("--bandwidth", type=float, default=0.5, help="h of the Gaussian kernel (GeomLoss blur)")
    parser.add_argument("--dense-bytes", type=float, default=8 * 2**30,
                        help="memory allowed to GeomLoss's tensorized backend (bytes)")
    parser.add_argument("--sw-size", type=int, default=100_000, help="N = M of the sliced-Wasserstein part")
    parser.add_argument("--directions", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--sinkhorn-size", type=int, default=10_000, help="N = M of the Sinkhorn part")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0])
    parser.add_argument("--iters", type=int, default=20, help="fixed sweep count of the first measureflow run")
    parser.add_argument("--tols", type=float, nargs="+", default=[1e-3, 1e-5], help="measureflow tol ladder")
    parser.add_argument("--pot-iters", type=int, default=20, help="sweeps of the single POT run")
    parser.add_argument("--plain-tols", type=float, nargs="+", default=[1e-5],
                        help="tol ladder of plain (ω = 1) measureflow runs, which give POT's sweep counts")
    parser.add_argument("--scalings", type=float, nargs="+", default=[0.5, 0.9],
                        help="GeomLoss scaling ladder (tensorized backend)")
    parser.add_argument("--online-scalings", type=float, nargs="+", default=[0.5],
                        help="GeomLoss scaling ladder (online backend, slower on CPU)")
    parser.add_argument("--targets", type=float, nargs="+", default=[1e-3, 1e-5],
                        help="marginal L1 errors at which times are compared")
    parser.add_argument("--sinkhorn-peers", nargs="*", default=["pot", "geomloss-online", "geomloss-tensorized"],
                        choices=["pot", "geomloss-online", "geomloss-tensorized"])
    parser.add_argument("--repeats", type=int, default=3, help="timed evaluations (best kept)")
    parser.add_argument("--long-run", type=float, default=20.0, help="seconds after which one evaluation is enough")
    add_standard_arguments(parser, "gradient_flows-cpu", "N = 2000 everywhere, 5000 for MMD; one repeat")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    reductions.config.compile = "on"  # steady state: the fused kernels compile during the warm-up
    if args.quick:
        args.mmd_sizes, args.sw_size, args.sinkhorn_size, args.repeats = [2000, 5000], 2000, 2000, 1

    env = {**prepare_machine(args), "repeats": args.repeats}
    for mod in ("pykeops", "geomloss", "ot"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            env[mod] = f"unavailable ({type(exc).__name__})"
    print("  ".join(f"{k}={v}" for k, v in env.items()), flush=True)

    rows = Rows()
    stem = args.out
    SAVE[0] = lambda: write(stem, env, rows)
    # cheapest parts first; the MMD part's largest size (GeomLoss on KeOps CPU) runs last
    for part, fn in (("sinkhorn", bench_sinkhorn), ("sw", bench_sw), ("mmd", bench_mmd)):
        if part in args.parts:
            fn(args, rows)
    print(f"\nwritten: {stem.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
