"""One evaluation of the attention field: measureflow against torch's scaled_dot_product_attention.

The quantity, for N tokens x (N, d), d = 64, one head, Q, K, V ∈ R^{d×d}, float32 on the CPU:

    Γ(xᵢ) = Σⱼ e^{⟨Qxᵢ, Kxⱼ⟩} Vxⱼ / Σⱼ e^{⟨Qxᵢ, Kxⱼ⟩}                     (MATH.md §10, uniform weights)

with x ~ N(0, I_d) and Q, K, V with entries N(0, 1)/d^{3/4}, so that the scores ⟨Qxᵢ, Kxⱼ⟩ have a
standard deviation of about 1 (the softmax is neither uniform nor a one-hot). Compared, side by side in
one run (each round calls every implementation once, in turn; the table gives the median over rounds):

* **measureflow field**: ``AttentionField(Q, K, V).velocity(0, x, Particles(x))`` — the projections
  Qx, Kx, Vx (three N × d × d products) and one ``softmax_average(score="bilinear")``;
* **measureflow reduction**: ``softmax_average(Qx, Kx, Vx, score="bilinear")`` on the precomputed
  projections — the same inputs as SDPA. On the CPU it runs torch's fused attention kernel (see
  measureflow/reductions/cpu_attention.py);
* **measureflow blocked**: the same call with ``block_size=(1024, 1024)``, which selects measureflow's
  own blocked path (GEMM per block, exponential in place, streaming maximum);
* **SDPA**: ``torch.nn.functional.scaled_dot_product_attention(Qx, Kx, Vx, scale=1)`` on (1, 1, N, d)
  views, with torch's choice of backend (on the CPU its flash-attention kernel, O(N·d) memory);
* **SDPA math**: the same under ``sdpa_kernel(SDPBackend.MATH)``, which forms the N × N score matrix.
  It is skipped, with the reason printed, when its estimated memory 3·N²·4 bytes exceeds
  ``--max-gib`` (8 GiB by default: the development machine has 24 GiB shared by several users).

Times are wall-clock and process CPU time per evaluation, both medians over the rounds, with one torch
thread by default (``--threads``): the development machine is shared, and under load a second thread
mostly measures waiting for a core. CPU time is the steadier of the two when other jobs run. Ratios are
"SDPA time / ours" (above 1: ours is faster), from both clocks. At N = 10⁵ every implementation is
called once (about a minute each), and that call is timed, measured for memory and checked.

Memory is the extra resident memory of one evaluation, measured as the kernel's resident-set high-water
mark VmHWM after resetting it through /proc/self/clear_refs, minus VmRSS before (tracemalloc does not see
torch's allocations; the probe is bench_reductions.PeakMemory); it includes the outputs (N·d floats,
0.25 MiB at N = 10³, 25 MiB at N = 10⁵) unless the call reuses freed pages. Each implementation's output is
compared with a float64 dense reference on the first ``--check-rows`` rows.

Usage::

    python benchmarks/bench_attention.py                 # N = 10³, 10⁴, 10⁵ (about 10 min on 2 busy cores)
    python benchmarks/bench_attention.py --quick         # N = 10³, 4·10³, a few seconds
    python benchmarks/bench_attention.py --sizes 20000 --threads 1

Results go to stdout and to ``--out`` (default ~/.cache/measureflow/benchmarks/attention-cpu.{md,json}, outside the
repository: benchmarks/results/ holds the committed tables, written there only on purpose).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import add_standard_arguments, prepare_machine  # noqa: E402
from bench_reductions import PeakMemory, fmt_bytes  # noqa: E402 - the same memory probe as the other CPU benchmarks

from measureflow.reductions import softmax_average  # noqa: E402
from measureflow.state import Particles  # noqa: E402
from measureflow_plugins.attention import AttentionField  # noqa: E402

DTYPE = torch.float32
GiB = 1 << 30


def problem(n: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DTYPE)
    Q, K, V = (torch.randn(d, d, generator=g, dtype=DTYPE) / d**0.75 for _ in range(3))
    return x, Q, K, V


def implementations(x, Q, K, V, max_gib: float):
    """name → (callable or None, reason it is skipped)."""
    n = x.shape[0]
    field = AttentionField(Q=Q, K=K, V=V)
    state = Particles(x[None])
    q, k, v = x @ Q.T, x @ K.T, x @ V.T
    q4, k4, v4 = q[None, None], k[None, None], v[None, None]
    math_bytes = 3 * n * n * x.element_size()
    out = {
        "measureflow field": (lambda: field.velocity(0.0, state.x, state)[0], ""),
        "measureflow reduction": (lambda: softmax_average(q, k, v, score="bilinear"), ""),
        "measureflow blocked": (lambda: softmax_average(q, k, v, score="bilinear", block_size=(1024, 1024)), ""),
        "SDPA": (lambda: F.scaled_dot_product_attention(q4, k4, v4, scale=1.0)[0, 0], ""),
    }
    if math_bytes > max_gib * GiB:
        out["SDPA math"] = (None, f"needs ≈ 3·N²·4 B = {math_bytes / GiB:.0f} GiB > {max_gib:g} GiB (N × N scores)")
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa_math():
            with sdpa_kernel(SDPBackend.MATH):
                return F.scaled_dot_product_attention(q4, k4, v4, scale=1.0)[0, 0]

        out["SDPA math"] = (sdpa_math, "")
    return out, (q, k, v)


def reference(q, k, v, rows: int) -> torch.Tensor:
    s = q[:rows].double() @ k.double().T
    return torch.softmax(s, -1) @ v.double()


def sdpa_backend(q) -> str:
    try:
        choice = torch._fused_sdp_choice(q[None, None], q[None, None], q[None, None])
        from torch.nn.attention import SDPBackend

        return SDPBackend(choice).name
    except Exception:  # noqa: BLE001 - a label only
        return "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default: by size)")
    parser.add_argument("--max-gib", type=float, default=8.0, help="skip an implementation estimated above this")
    parser.add_argument("--check-rows", type=int, default=256)
    add_standard_arguments(parser, "attention-cpu", "N = 1000, 4000")
    args = parser.parse_args()
    if args.quick:
        args.sizes = [1000, 4000]
    env = {**prepare_machine(args), "dtype": "float32", "d": args.dim}
    print("  ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    rows = []
    header = (f"{'N':>7} {'implementation':<22} {'median s':>9} {'CPU s':>9} {'rounds':>6} {'peak mem':>10} "
              f"{'SDPA/this':>9} {'(CPU)':>9} {'err vs f64':>10}")
    print(header, flush=True)
    for n in args.sizes:
        x, Q, K, V = problem(n, args.dim, seed=n)
        impls, (q, k, v) = implementations(x, Q, K, V, args.max_gib)
        ref = reference(q, k, v, min(args.check_rows, n))
        rounds = args.rounds or (9 if n <= 2000 else 5 if n <= 20_000 else 1)
        live = {name: fn for name, (fn, why) in impls.items() if fn is not None}
        results = {name: {"times": [], "cpu": []} for name in live}
        for name, fn in live.items():  # warm-up (first-call costs), memory and accuracy, one at a time
            gc.collect()
            with PeakMemory(torch.device("cpu")) as mem:
                start, cpu = time.perf_counter(), time.process_time()
                out = fn()
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            results[name]["peak_bytes"] = mem.bytes
            results[name]["error"] = float((out[: ref.shape[0]].double() - ref).abs().max() / ref.abs().max())
            if rounds == 1:  # a single evaluation (minutes at N = 10⁵): it is also the timed one
                results[name]["times"].append(wall)
                results[name]["cpu"].append(cpu)
            del out
        for _ in range(rounds if rounds > 1 else 0):
            for name, fn in live.items():
                gc.collect()
                start, cpu = time.perf_counter(), time.process_time()
                fn()
                results[name]["times"].append(time.perf_counter() - start)
                results[name]["cpu"].append(time.process_time() - cpu)
        sdpa = statistics.median(results["SDPA"]["times"])
        sdpa_cpu = statistics.median(results["SDPA"]["cpu"])
        for name, (fn, why) in impls.items():
            if fn is None:
                rows.append({"N": n, "impl": name, "skipped": why})
                print(f"{n:>7} {name:<22} skipped: {why}", flush=True)
                continue
            r = results[name]
            median, cpu = statistics.median(r["times"]), statistics.median(r["cpu"])
            row = {"N": n, "impl": name, "median_seconds": median, "min_seconds": min(r["times"]),
                   "median_cpu_seconds": cpu, "rounds": rounds, "times": r["times"], "cpu_times": r["cpu"],
                   "peak_bytes": r["peak_bytes"], "sdpa_over_this": sdpa / median,
                   "sdpa_over_this_cpu": sdpa_cpu / cpu, "error_vs_float64": r["error"]}
            if name == "SDPA":
                row["backend"] = sdpa_backend(q)
            rows.append(row)
            print(f"{n:>7} {name:<22} {median:>9.4f} {cpu:>9.4f} {rounds:>6} {fmt_bytes(r['peak_bytes']):>10} "
                  f"{sdpa / median:>9.2f} {sdpa_cpu / cpu:>9.2f} {r['error']:>10.1e}", flush=True)
        del impls, live, results, q, k, v
        gc.collect()

    stem = args.out
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "results": rows}, indent=2))
    lines = [
        "# Attention field, one evaluation, d = 64, float32 (benchmarks/bench_attention.py)",
        "",
        "  ".join(f"{k}={v}" for k, v in env.items()),
        "",
        "| N | implementation | median s | median CPU s | rounds | peak extra memory | SDPA / this | SDPA / this (CPU) "
        "| max error vs float64 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['N']} | {r['impl']} | skipped: {r['skipped']} | | | | | | |")
            continue
        name = r["impl"] + (f" ({r['backend']})" if "backend" in r else "")
        lines.append(
            f"| {r['N']} | {name} | {r['median_seconds']:.4f} | {r['median_cpu_seconds']:.4f} | {r['rounds']} | "
            f"{fmt_bytes(r['peak_bytes'])} | {r['sdpa_over_this']:.2f} | {r['sdpa_over_this_cpu']:.2f} | "
            f"{r['error_vs_float64']:.1e} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"\nwritten: {stem.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
