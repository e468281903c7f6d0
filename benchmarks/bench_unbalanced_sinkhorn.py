"""Unbalanced Sinkhorn flow velocity: measureflow against GeomLoss and POT, time at equal accuracy.

Problem: x ~ N(0, I) (N points, weights 1/N), target y ~ N((1, 0), diag(½, 2)) (M points, weights 1/M),
d = 2, cost |x − y|² (unhalved, MATH.md §0), ε and reach ρ in length². The quantity is the descent velocity
of the debiased unbalanced divergence of Séjourné et al. at the particles,

    v(xᵢ) = 2(e^{−f_μβ(xᵢ)/ρ}(E_μβ[y | xᵢ] − xᵢ) − e^{−f_μμ(xᵢ)/ρ}(E_μμ[x' | xᵢ] − xᵢ)),

which measureflow's ``sinkhorn`` field computes with ``reach=ρ`` (streamed log-domain sweeps). The peers:

* GeomLoss ``SamplesLoss("sinkhorn", p=2, blur=√(ε/2), reach=√(ρ/2), debias=True)`` (its cost is |x − y|²/2,
  its ε blur², its ρ reach², so its loss is half of ours) differentiated by autograd: v = −2∇ₓL/wᵢ, times
  (ρ + ε)/(ρ + ε/2). GeomLoss's loss carries the factor (ρ + ε/2) of the divergence's value but its
  ``UnbalancedWeight`` back-propagates a different factor, so its autograd gradient with respect to the
  positions is (ρ + ε/2)/(ρ + ε) times the gradient of the value it returns (measured: 0.693, 0.807,
  0.949 of ours for ε = ½ and ρ = 1, 2, 10 — the ratio of these factors — while the values agree).
  measureflow's velocity is the exact gradient of that value (finite differences, tests/test_geometry.py)
  and agrees with POT's plans to 1e-13. Backend ``tensorized`` (dense; ``online`` needs KeOps). Accuracy
  knob: ``scaling`` of its ε-annealing.
* POT ``ot.unbalanced.sinkhorn_unbalanced(a, b, C, ε, ρ, reg_type="kl")`` for the plans π_μβ and π_μμ
  (dense numpy, float64); with e^{−f(xᵢ)/ρ} = (π1)ᵢ/aᵢ (the unbalanced optimality condition) the velocity is
  vᵢ = 2((π_μβy)ᵢ − (π_μβ1)ᵢxᵢ − (π_μμx)ᵢ + (π_μμ1)ᵢxᵢ)/aᵢ. Accuracy knob: ``numItermax`` (stopThr 0).

Accuracy is the relative error ‖v − v_ref‖/‖v_ref‖ against measureflow in float64 at tol = 1e-11; each
method runs a ladder of its knob and the table gives, per method, the time of the fastest setting that
reaches each error level. The methods take turns rung by rung; times are wall-clock, best of ``--repeats``;
the record carries torch threads, load and effective cores at the start and at the end (``benchkit``).

    python benchmarks/bench_unbalanced_sinkhorn.py --n 10000           # the issue's size
    python benchmarks/bench_unbalanced_sinkhorn.py --n 2000 --quick     # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from benchkit import add_standard_arguments, load_line, machine_record, prepare_machine

from measureflow.measures import Empirical
from measureflow.state import Particles
from measureflow_plugins.sinkhorn import SinkhornField

def clouds(n: int, m: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    scale = torch.tensor([math.sqrt(0.5), math.sqrt(2.0)], dtype=torch.float64)
    y = torch.randn(m, 2, generator=gen, dtype=torch.float64) * scale + torch.tensor([1.0, 0.0], dtype=torch.float64)
    return x, y


def best_time(fn, repeats: int):
    out, best = None, math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def measureflow_velocity(x, y, eps, rho, tol, dtype, max_iter=100000):
    field = SinkhornField(Empirical(y.to(dtype)), epsilon=eps, reach=rho, tol=tol, max_iter=max_iter,
                          warm_start=False)
    state = Particles(x.to(dtype)[None])
    return lambda: field.velocity(0.0, state.x, state)[0].to(torch.float64)


def geomloss_velocity(x, y, eps, rho, scaling, dtype):
    from geomloss import SamplesLoss

    loss = SamplesLoss("sinkhorn", p=2, blur=math.sqrt(eps / 2), reach=math.sqrt(rho / 2), scaling=scaling,
                       debias=True, backend="tensorized")
    n, m = x.shape[0], y.shape[0]
    a = torch.full((n,), 1.0 / n, dtype=dtype)
    b = torch.full((m,), 1.0 / m, dtype=dtype)
    yy = y.to(dtype)
    correction = (rho + eps) / (rho + eps / 2)  # see the module docstring

    def run():
        xx = x.to(dtype).clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(a, xx, b, yy), xx)
        return (-2.0 * correction * grad / a[:, None]).detach().to(torch.float64)

    return run


def pot_velocity(x, y, eps, rho, iters):
    import ot

    xn, yn = x.numpy(), y.numpy()
    n, m = len(xn), len(yn)
    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)

    def run():
        c_ab = ot.dist(xn, yn)  # squared Euclidean: the unhalved cost
        p_ab = ot.unbalanced.sinkhorn_unbalanced(a, b, c_ab, eps, rho, reg_type="kl", numItermax=iters, stopThr=0.0)
        del c_ab
        c_aa = ot.dist(xn, xn)
        p_aa = ot.unbalanced.sinkhorn_unbalanced(a, a, c_aa, eps, rho, reg_type="kl", numItermax=iters, stopThr=0.0)
        del c_aa
        v = 2.0 * (p_ab @ yn - p_ab.sum(1)[:, None] * xn - p_aa @ xn + p_aa.sum(1)[:, None] * xn) / a[:, None]
        return torch.as_tensor(v)

    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_standard_arguments(parser, "unbalanced_sinkhorn", "short ladders")
    parser.add_argument("--n", type=int, default=10_000, help="N = M (default 10⁴)")
    parser.add_argument("--epsilon", type=float, default=0.5)
    parser.add_argument("--reach", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip", nargs="*", default=[], choices=["geomloss", "pot"])
    args = parser.parse_args(argv)
    env = prepare_machine(args)
    x, y = clouds(args.n, args.n)
    eps, rho = args.epsilon, args.reach
    print(f"N = M = {args.n}, ε = {eps}, ρ = {rho}")
    # warm-up: compiles the fused reductions (both dtypes) once, outside the timings; 2100² pairs is above
    # reductions.config.compile_min_pairs, so the warm-up takes the fused path as the timed calls do
    for dtype in (torch.float32, torch.float64):
        measureflow_velocity(*clouds(2100, 2100), eps, rho, 1e-3, dtype)()
    ref, t_ref = best_time(measureflow_velocity(x, y, eps, rho, 1e-11, torch.float64), 1)
    print(f"reference: measureflow float64, tol 1e-11: {t_ref:.2f} s")
    norm = float(ref.norm())

    ladders = {"measureflow float32": [(f"tol={tol:g}", measureflow_velocity(x, y, eps, rho, tol, torch.float32))
                                       for tol in ((1e-3, 1e-5) if args.quick else (1e-2, 1e-3, 1e-4, 1e-5, 1e-6))]}
    if "geomloss" not in args.skip:
        ladders["GeomLoss tensorized float32"] = [
            (f"scaling={s}", geomloss_velocity(x, y, eps, rho, s, torch.float32))
            for s in ((0.5, 0.9) if args.quick else (0.5, 0.7, 0.8, 0.9, 0.95))]
    if "pot" not in args.skip:
        ladders["POT sinkhorn_unbalanced f64"] = [
            (f"numItermax={i}", pot_velocity(x, y, eps, rho, i))
            for i in ((5, 30) if args.quick else (3, 5, 10, 20, 30, 100))]
    # the methods take turns, rung by rung (A B C, C B A, …), so a change of load enters every method alike
    rows = []
    for rung in range(max(len(v) for v in ladders.values())):
        names = list(ladders) if rung % 2 == 0 else list(reversed(ladders))
        for method in names:
            if rung >= len(ladders[method]):
                continue
            knob, fn = ladders[method][rung]
            v, t = best_time(fn, args.repeats)
            err = float((v - ref).norm()) / norm
            rows.append({"method": method, "knob": knob, "time": t, "error": err})
            print(f"  {method:<28} {knob:<18} {t:8.3f} s   error {err:.2e}", flush=True)
    env_end = machine_record()
    print("end: " + load_line(env_end))

    print("\ntime to reach a relative error (fastest setting of each method):")
    levels = (1e-2, 1e-3, 1e-4)
    lines = ["| method | " + " | ".join(f"error ≤ {lv:g}" for lv in levels) + " |",
             "|---|" + "---|" * len(levels)]
    for method in ladders:
        cells = []
        for lv in levels:
            ok = [r["time"] for r in rows if r["method"] == method and r["error"] <= lv]
            cells.append(f"{min(ok):.3f} s" if ok else "—")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"environment": env, "environment_end": env_end, "n": args.n,
                                                    "epsilon": eps, "reach": rho, "reference_time": t_ref,
                                                    "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(
        f"N = M = {args.n}, ε = {eps}, ρ = {rho}, CPU; {load_line(env)}\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {out}.md / .json")


if __name__ == "__main__":
    main()
