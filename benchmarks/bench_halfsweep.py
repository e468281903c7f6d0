"""A Sinkhorn half-sweep in units of a Gaussian kernel sum, the sides alternating in one process.

The c-transform gⱼ = −ε log Σᵢ wᵢ e^{(fᵢ − |yⱼ − xᵢ|²)/ε} (MATH.md §7) costs, per half-sweep:

* ``single-pass``: :func:`measureflow.reductions.logsumexp.shifted_logsumexp` with the previous potential as
  the row bound (what ``sinkhorn_potentials`` runs; bounds from a converged solve, so no row falls back);
* ``two-pass``: ``softmax_average(..., return_logsumexp=True)``, the streaming softmax the solver used before;
* ``kernel sum``: ``kernel_sum(x, y, kernel="gaussian", bandwidth=√(ε/2))``, the unit (same pairs, same exp count).

Reported: median wall and CPU seconds, and each half-sweep's median per-round ratio to the kernel sum, with
the torch threads, load average and effective cores at the start (``benchkit``). N = M, d = 2, ε = 0.5.

    python benchmarks/bench_halfsweep.py --quick          # N = 4000, 3 rounds
    python benchmarks/bench_halfsweep.py --sizes 10000 --rounds 7 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch

from benchkit import add_standard_arguments, alternate, paired_ratio, prepare_machine

from measureflow.reductions import kernel_sum, sinkhorn_potentials, softmax_average
from measureflow.reductions.logsumexp import shifted_logsumexp


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_standard_arguments(parser, "halfsweep", "N = 4000, 3 rounds")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--epsilon", type=float, default=0.5)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.rounds = [4000], 3
    env = prepare_machine(args)
    eps = args.epsilon
    rows = []
    for n in args.sizes:
        for name in args.dtypes:
            dtype = getattr(torch, name)
            gen = torch.Generator().manual_seed(n)
            x = torch.randn(1, n, 2, generator=gen, dtype=dtype)
            y = (0.8 * torch.randn(1, n, 2, generator=gen, dtype=torch.float64) + 1.0).to(dtype)
            logw = torch.full((1, n), -math.log(n), dtype=dtype)
            f, g, *_ = sinkhorn_potentials(x, logw, y, logw, eps, tol=1e-4, max_iter=200)
            lw = logw + f / eps
            bound = g / -eps
            sides = {
                "kernel sum": lambda: kernel_sum(y, x, kernel="gaussian", bandwidth=math.sqrt(eps / 2)),
                "single-pass": lambda: shifted_logsumexp(y, x, lw, bound, scale=1 / eps),
                "two-pass": lambda: softmax_average(y, x, log_weights=lw, scale=1 / eps, return_logsumexp=True),
            }
            one = shifted_logsumexp(y, x, lw, bound, scale=1 / eps)
            _, two = softmax_average(y, x, log_weights=lw, scale=1 / eps, return_logsumexp=True)
            diff = float(((one - two).abs() / two.abs().clamp_min(1.0)).max())
            times = alternate(sides, args.rounds)
            row = {"N": n, "dtype": name, "rounds": args.rounds, "max_rel_diff_single_vs_two_pass": diff}
            for side, t in times.items():
                row[side] = {"wall_s": statistics.median(r["wall"] for r in t),
                             "cpu_s": statistics.median(r["cpu"] for r in t)}
            row["single_pass_in_kernel_sums"] = paired_ratio(times, "single-pass", "kernel sum")
            row["two_pass_in_kernel_sums"] = paired_ratio(times, "two-pass", "kernel sum")
            row["two_pass_over_single_pass"] = paired_ratio(times, "two-pass", "single-pass")
            rows.append(row)
            print(f"N={n} {name}: kernel sum {row['kernel sum']['wall_s']:.4f} s; half-sweep single-pass "
                  f"{row['single_pass_in_kernel_sums']:.2f}, two-pass {row['two_pass_in_kernel_sums']:.2f} kernel sums "
                  f"(two/single {row['two_pass_over_single_pass']:.2f}); max rel diff {diff:.1e}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"environment": env, "results": rows}, indent=2))
    print(f"written: {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
