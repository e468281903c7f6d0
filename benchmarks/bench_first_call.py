"""First call of a fused reduction in a fresh process: what a user's first run at a new N pays.

For each N, a new Python process (same interpreter, same tree) times its first and its second call of
``kernel_sum(x, y, gradient="both")`` (Gaussian, d = 2, float32, N = M, fused path on). The first pays,
besides the kernel itself, importing torch's compiler (``torch._dynamo``, ``torch._inductor``),
dynamo's trace of the kernel and either inductor's compile or, when torch's on-disk caches (FX graph and
AOTAutograd caches under ``TORCHINDUCTOR_CACHE_DIR``; measureflow's default ``~/.cache/measureflow/inductor``,
see ``measureflow.reductions.compile_cache``) already hold it, their load. Each child reports those
parts (dynamo's compile-time records) and the cache counters: a process that compiled nothing shows
hits and no misses. Processes run one after another, all sizes per pass (``--passes``).

``--cold`` starts from an empty, temporary cache directory (removed afterwards): the first process
pays the one compile of this machine and configuration, every later one — at another N too — loads it.
Without it the children use the directory measureflow would use (or ``--cache-dir``).

    python benchmarks/bench_first_call.py --quick                     # N = 5000 only
    python benchmarks/bench_first_call.py --sizes 5000 100000 --passes 2
    python benchmarks/bench_first_call.py --cold --sizes 5000 100000 --passes 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from benchkit import add_standard_arguments, load_line, machine_record, prepare_machine

CHILD = """
import json, os, sys, time
t_start = time.perf_counter()
import torch
from measureflow import reductions
reductions.config.compile = "on"
n = int(sys.argv[1])
g = torch.Generator().manual_seed(0)
x, y = torch.randn(1, n, 2, generator=g), torch.randn(1, n, 2, generator=g)
t0 = time.perf_counter(); reductions.kernel_sum(x, y, bandwidth=0.5, gradient="both"); t1 = time.perf_counter()
reductions.kernel_sum(x, y, bandwidth=0.5, gradient="both"); t2 = time.perf_counter()
from torch._dynamo.utils import compilation_time_metrics as parts, counters
part = lambda name: round(sum(parts.get(name, [0.0])), 3)
cache = {k: v for group in ("inductor", "aot_autograd") for k, v in counters[group].items() if "cache" in k}
print(json.dumps({
    "import_s": t0 - t_start, "first_s": t1 - t0, "second_s": t2 - t1,
    "compile_s": part("_compile.compile_inner"), "trace_s": part("bytecode_tracing"),
    "load_s": part("PyCodeCache.load_by_key_path"),
    "cache": cache, "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
}))
"""


def run_child(n: int, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(n)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"child at N={n} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_standard_arguments(parser, "first_call", "N = 5000 only")
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 100_000])
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--cold", action="store_true", help="start from an empty temporary compile cache")
    parser.add_argument("--cache-dir", help="TORCHINDUCTOR_CACHE_DIR for the children (default: measureflow's)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = [5000]
    env_record = prepare_machine(args)
    env = dict(os.environ)
    cold_dir = tempfile.mkdtemp(prefix="mf-first-call-") if args.cold else None
    if cold_dir or args.cache_dir:
        env["TORCHINDUCTOR_CACHE_DIR"] = cold_dir or args.cache_dir
    rows = []
    try:
        for p in range(args.passes):
            for n in args.sizes:
                row = {"pass": p + 1, "N": n, "load_average": list(os.getloadavg()), **run_child(n, env)}
                rows.append(row)
                print(f"pass {p + 1} N={n}: first call {row['first_s']:.2f} s (torch.compile {row['compile_s']:.2f} s: "
                      f"trace {row['trace_s']:.2f}, cache load {row['load_s']:.2f}), second {row['second_s']:.3f} s, "
                      f"load {row['load_average'][0]:.2f}, cache {row['cache']}", flush=True)
    finally:
        if cold_dir:
            shutil.rmtree(cold_dir, ignore_errors=True)
    end_record = machine_record()
    print(load_line(end_record), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"environment": env_record, "environment_end": end_record, "cold": args.cold, "results": rows}, indent=2))
    print(f"written: {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
