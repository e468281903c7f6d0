"""First call of a fused reduction in a fresh process: what a user's first run at a new N pays.

For each N, a new Python process (same interpreter, same tree) times its first and its second call of
``kernel_sum(x, y, gradient="both")`` (Gaussian, d = 2, float32, N = M, fused path on): the first pays
dynamo's trace and inductor's compile or, when torch's on-disk caches (FX graph cache, under
``TORCHINDUCTOR_CACHE_DIR``, default /tmp/torchinductor_$USER) already hold the kernel, only the trace
and the load. Processes run one after another, each size twice (``--passes``), so the second pass
shows what a warm on-disk cache leaves. Records torch threads, load and effective cores (``benchkit``).

    python benchmarks/bench_first_call.py --quick          # N = 5000 only
    python benchmarks/bench_first_call.py --sizes 5000 100000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchkit import add_standard_arguments, prepare_machine

CHILD = """
import json, sys, time
import torch
from measureflow import reductions
reductions.config.compile = "on"
n = int(sys.argv[1])
g = torch.Generator().manual_seed(0)
x, y = torch.randn(1, n, 2, generator=g), torch.randn(1, n, 2, generator=g)
t0 = time.perf_counter(); reductions.kernel_sum(x, y, bandwidth=0.5, gradient="both"); t1 = time.perf_counter()
reductions.kernel_sum(x, y, bandwidth=0.5, gradient="both"); t2 = time.perf_counter()
from torch._dynamo.utils import counters
hits = {k: v for k, v in counters["inductor"].items() if "cache" in k}
print(json.dumps({"first_s": t1 - t0, "second_s": t2 - t1, "inductor_cache": hits}))
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_standard_arguments(parser, "first_call", "N = 5000 only")
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 100_000])
    parser.add_argument("--passes", type=int, default=2)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = [5000]
    env = prepare_machine(args)
    rows = []
    for p in range(args.passes):
        for n in args.sizes:
            out = subprocess.run([sys.executable, "-c", CHILD, str(n)], capture_output=True, text=True,
                                 env=dict(os.environ), check=True)
            row = {"pass": p + 1, "N": n, **json.loads(out.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(f"pass {p + 1} N={n}: first call {row['first_s']:.2f} s, second {row['second_s']:.3f} s, "
                  f"inductor cache {row['inductor_cache']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"environment": env, "results": rows}, indent=2))
    print(f"written: {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
