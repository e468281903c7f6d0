"""Thread scaling of the fused reductions: 1 against 2 (or ``--scale``) torch threads, alternating in one process.

For each reduction (Gaussian kernel sum with gradient; the one-pass shifted log-sum-exp of a Sinkhorn
half-sweep), N = M, d = 2, float32, it times calls at each thread count in turns and reports the median
wall and CPU seconds, the speed-up (wall at 1 thread / wall at T threads, median of per-round ratios) and
CPU/wall at T threads (≈ T when every thread works, ≈ 1 when the kernel runs on one core).

It also reports the per-core exponential rate of the kernel sum (pairs per CPU second) against this CPU's
arithmetic rate for a vectorised exp: ``torch.exp`` over a 4096-element float32 buffer that stays in L1,
repeated (a large ``torch.exp`` measures memory bandwidth, not exp throughput). The reductions evaluate one
exp per pair, so pairs/CPU-s ÷ exps/CPU-s is the fraction of the exp floor they reach.

Meaningful only where the machine has the cores: the record's ``effective_cores`` says what it had.

    python benchmarks/bench_threads.py --quick       # N = 20000, 3 rounds
    python benchmarks/bench_threads.py --sizes 100000 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from benchkit import add_standard_arguments, prepare_machine, timed

from measureflow.reductions import kernel_sum
from measureflow.reductions.logsumexp import shifted_logsumexp


def exp_rate(seconds: float = 0.5) -> float:
    """exps per CPU second of a vectorised float32 exp on an L1-resident buffer (one thread)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    a = torch.rand(4096) * -10.0
    out = torch.empty_like(a)
    torch.exp(a, out=out)
    count, cpu0 = 0, time.process_time()
    while time.process_time() - cpu0 < seconds:
        for _ in range(256):
            torch.exp(a, out=out)
        count += 256 * a.numel()
    rate = count / (time.process_time() - cpu0)
    torch.set_num_threads(saved)
    return rate


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_standard_arguments(parser, "threads", "N = 20000, 3 rounds", threads=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.rounds = [20_000], 3
    env = prepare_machine(args)
    counts = [1, args.threads] if args.threads > 1 else [1, 2]
    rate = exp_rate()
    print(f"vectorised exp (L1-resident, 1 thread): {rate:.3e} exps per CPU second", flush=True)
    rows = []
    for n in args.sizes:
        gen = torch.Generator().manual_seed(n)
        x = torch.randn(1, n, 2, generator=gen)
        y = torch.randn(1, n, 2, generator=gen) + 0.5
        lw = torch.full((1, n), -math.log(n))
        bound = torch.zeros(1, n)  # |log-sum| stays within range for these clouds: one pass
        cases = {
            "kernel_sum gaussian + gradient": lambda: kernel_sum(x, y, bandwidth=0.5, gradient="both"),
            "shifted log-sum-exp": lambda: shifted_logsumexp(x, y, lw, bound, scale=2.0),
        }
        for name, fn in cases.items():
            fn()  # compile outside the timing
            times = {t: [] for t in counts}
            for r in range(args.rounds):
                for t in counts if r % 2 == 0 else reversed(counts):
                    torch.set_num_threads(t)
                    times[t].append(timed(fn))
            torch.set_num_threads(args.threads)
            row = {"N": n, "reduction": name, "rounds": args.rounds}
            for t in counts:
                row[f"{t} threads"] = {"wall_s": statistics.median(v["wall"] for v in times[t]),
                                       "cpu_s": statistics.median(v["cpu"] for v in times[t])}
            top = counts[-1]
            row["speedup"] = statistics.median(a["wall"] / b["wall"] for a, b in zip(times[1], times[top]))
            row["cpu_over_wall_at_top"] = statistics.median(v["cpu"] / v["wall"] for v in times[top])
            row["pairs_per_cpu_s"] = n * n / row["1 threads"]["cpu_s"]
            row["fraction_of_exp_rate"] = row["pairs_per_cpu_s"] / rate
            rows.append(row)
            print(f"N={n} {name}: 1 thread {row['1 threads']['wall_s']:.3f} s, {top} threads "
                  f"{row[f'{top} threads']['wall_s']:.3f} s (CPU/wall {row['cpu_over_wall_at_top']:.2f}); speed-up "
                  f"{row['speedup']:.2f}; {row['pairs_per_cpu_s']:.3e} pairs/CPU-s = "
                  f"{row['fraction_of_exp_rate']:.2f} of the exp rate", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"environment": env, "exp_rate_per_cpu_s": rate,
                                                        "results": rows}, indent=2))
    print(f"written: {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
