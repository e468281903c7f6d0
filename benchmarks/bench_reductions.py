"""Gaussian kernel sum, value and gradient: measureflow against KeOps and GeomLoss (KeOps backend).

The quantity, for x (N, d), y (M, d), weights w (M,) summing to one and k(x, y) = exp(−|x − y|²/(2h²)):

    Sᵢ = Σⱼ wⱼ k(xᵢ, yⱼ),        Gᵢ = Σⱼ wⱼ ∇ₓk(xᵢ, yⱼ) = −(1/h²) Σⱼ wⱼ k(xᵢ, yⱼ)(xᵢ − yⱼ)

(the kernel mean embedding of Σⱼ wⱼ δ_{yⱼ} and its gradient: the MMD field, MATH.md §6), float32,
h = √d / 2 so that typical exponents are about −4 in every dimension. Each implementation computes
both S and G per evaluation:

* **measureflow**: ``kernel_sum(x, y, weights=w, bandwidth=h, gradient="both")`` — one streaming
  pass; on CPU the fused ``torch.compile`` kernel for d ≤ 8, the blocked GEMM path above.
* **KeOps** (pykeops ``LazyTensor``, the plain way to write it): K = exp(−|xᵢ − yⱼ|²/(2h²)) as a
  symbolic matrix and one reduction K @ [w, w·y] (M × (1 + d)), from which S = column 0 and
  G = −(x·S − columns 1…d)/h² — the cheapest KeOps formulation of both quantities.
* **GeomLoss** (``backend="online"``, i.e. KeOps): GeomLoss's own Gaussian kernel routine
  ``gaussian_kernel(x, y, blur=h, use_keops=True)`` — the one ``SamplesLoss("gaussian", blur=h,
  backend="online")`` calls for each of its kernel products — S = K @ w, and G by autograd of ΣᵢSᵢ
  with respect to x, which is how a GeomLoss kernel loss gets its gradient (KeOps differentiates the
  formula and runs a second reduction). ``SamplesLoss`` itself returns the whole MMD
  ½‖α − β‖²_k, three kernel products and two gradient reductions, not this quantity; the routine
  isolates the same S and G as the other two columns.

Times are wall-clock per evaluation (best of ``--repeats``, after a warm-up call on the first 1000
points that pays the compile of measureflow's and KeOps' kernels; its time is reported separately). Peak memory
is the extra resident memory of the evaluation on CPU (VmHWM after resetting the high-water mark
through /proc/self/clear_refs, minus VmRSS before) and torch's peak allocation on CUDA. Each
peer's S and G are compared with measureflow's (max-norm relative difference), and all three with
a float64 dense reference on the first ``--check-rows`` rows.

Usage::

    python benchmarks/bench_reductions.py                     # N = M = 10⁴, 10⁵; d = 2, 64
    python benchmarks/bench_reductions.py --quick             # small sizes, a minute
    python benchmarks/bench_reductions.py --sizes 20000 --dims 2 --device cuda

Results go to stdout and to ``--out`` (default ~/.cache/measureflow/benchmarks/reductions-<device>.{md,json}, outside the
repository: benchmarks/results/ holds the committed tables, written there only on purpose).
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
from pathlib import Path

import torch

from benchkit import add_standard_arguments, alternate_best, prepare_machine

from measureflow import reductions



# -- memory ---------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Extra peak memory of a block of code, in bytes.

    CPU: torch's CPU allocator hands out pages from malloc/mmap, which tracemalloc does not see;
    the kernel's resident-set high-water mark (VmHWM) does. Writing 5 to /proc/self/clear_refs
    resets VmHWM to the current RSS, so VmHWM after the block minus VmRSS before is the block's own
    peak. Where the reset is not allowed the figure is an upper bound (earlier peaks included).
    CUDA: torch.cuda's peak-allocation counter, reset before the block.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = None
        self.exact = True

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self.exact = False
            self.base = (_status_kib("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            hwm = _status_kib("VmHWM")
            self.bytes = None if hwm is None else max(0, hwm * 1024 - self.base)
        return False


# -- the three implementations ---------------------------------------------------------------------


def ours(x, y, w, h):
    return reductions.kernel_sum(x, y, weights=w, kernel="gaussian", bandwidth=h, gradient="both")


def keops_plain(x, y, w, h):
    from pykeops.torch import LazyTensor

    X = LazyTensor(x[:, None, :])
    Y = LazyTensor(y[None, :, :])
    K = (-((X - Y) ** 2).sum(-1) / (2.0 * h * h)).exp()
    out = K @ torch.cat([w[:, None], w[:, None] * y], dim=1)  # (N, 1 + d)
    S = out[:, 0]
    G = -(x * S[:, None] - out[:, 1:]) / (h * h)
    return S, G


def geomloss_online(x, y, w, h):
    from geomloss._legacy.kernel_samples import gaussian_kernel

    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        K = gaussian_kernel(xg, y, blur=h, use_keops=True)
        S = (K @ w[:, None]).squeeze(-1)
        (G,) = torch.autograd.grad(S.sum(), xg)
    return S.detach(), G


PEERS = {"keops": keops_plain, "geomloss": geomloss_online}


def reference(x, y, w, h, rows: int):
    """Dense float64 S and G on the first ``rows`` queries (column blocks keep memory small)."""
    xr = x[:rows].double()
    y64, w64 = y.double(), w.double()
    S = torch.zeros(xr.shape[0], dtype=torch.float64, device=x.device)
    T = torch.zeros_like(xr)
    for j in range(0, y.shape[0], 8192):
        yb, wb = y64[j:j + 8192], w64[j:j + 8192]
        diff = xr[:, None, :] - yb[None, :, :]
        kw = torch.exp(-(diff * diff).sum(-1) / (2 * h * h)) * wb
        S += kw.sum(1)
        T += (kw[..., None] * diff).sum(1)
    return S, -T / (h * h)


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# -- running ----------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, args, device, repeats: int, long_run: float, warm: int = 1000):
    """(warm-up seconds, best seconds, peak bytes, exact?, result).

    The warm-up evaluates the first ``warm`` points only: it pays every one-off cost (measureflow's
    compile, KeOps' code generation — both depend on d, not on N) without a full-size evaluation.
    """
    x, y, w, h = args
    m = min(warm, y.shape[0])
    sync(device)
    start = time.perf_counter()
    fn(x[:m], y[:m], w[:m] / w[:m].sum(), h)
    sync(device)
    first = time.perf_counter() - start
    times = []
    peak, exact = None, True
    for r in range(repeats):
        with PeakMemory(device) as mem:
            start = time.perf_counter()
            result = fn(*args)
            sync(device)
            times.append(time.perf_counter() - start)
        peak = mem.bytes if peak is None else max(peak, mem.bytes or 0)
        exact = exact and mem.exact
        if times[-1] > long_run:  # a single long evaluation is already a stable figure
            break
    return first, min(times), peak, exact, result


def fmt_bytes(b):
    if b is None:
        return "n/a"
    return f"{b / 2**20:.1f} MiB"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="N = M values")
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 64])
    parser.add_argument("--repeats", type=int, default=3, help="timed evaluations after the warm-up (best kept)")
    parser.add_argument("--long-run", type=float, default=20.0,
                        help="seconds after which one timed evaluation is enough")
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--check-rows", type=int, default=256, help="rows checked against float64")
    add_standard_arguments(parser, "reductions", "N = M = 2000, 5000; d = 2, 64; one repeat")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", choices=["on", "auto", "off"], default="on",
                        help="measureflow's fused-path policy (default on: steady state, compile in the warm-up)")
    args = parser.parse_args(argv)
    reductions.config.compile = args.compile
    if args.quick:
        args.sizes, args.repeats = [2000, 5000], 1
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")

    env = {
        **prepare_machine(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "compile": reductions.config.compile,
    }
    for mod in ("pykeops", "geomloss"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - a missing peer is reported, not fatal
            env[mod] = f"unavailable ({type(exc).__name__})"
    print("  ".join(f"{k}={v}" for k, v in env.items()))

    rows = []
    header = (
        f"{'N=M':>7} {'d':>3} {'impl':>11} {'s/eval':>9} {'warm-up s':>12} {'peak mem':>11} "
        f"{'peer/ours':>9} {'rel.diff S':>10} {'rel.diff G':>10} {'err64 S':>9} {'err64 G':>9}"
    )
    print(header)
    for n in args.sizes:
        for d in args.dims:
            gen = torch.Generator().manual_seed(args.seed)
            x = torch.randn(n, d, generator=gen).to(device)
            y = torch.randn(n, d, generator=gen).to(device)
            w = torch.rand(n, generator=gen, dtype=torch.float64)
            w = (w / w.sum()).to(torch.float32).to(device)
            w = w / w.sum()  # float32 renormalisation: sums to one within float32 rounding
            h = math.sqrt(d) / 2
            S64, G64 = reference(x, y, w, h, min(args.check_rows, n))
            impls = {"measureflow": ours} | {p: PEERS[p] for p in args.peers}
            # one measured call each (warm-up, peak memory, result), then the remaining repeats in turns
            measured = {}
            for name, fn in impls.items():
                try:
                    measured[name] = measure(fn, (x, y, w, h), device, 1, args.long_run)
                except Exception as exc:  # noqa: BLE001 - report the failing peer and go on
                    measured[name] = exc
            live = {name: (lambda fn=impls[name]: (fn(x, y, w, h), sync(device)))
                    for name, m in measured.items() if not isinstance(m, Exception) and m[1] <= args.long_run}
            again = alternate_best(live, args.repeats - 1, args.long_run) if args.repeats > 1 else {}
            mine = None
            for name in impls:
                if isinstance(again.get(name), Exception):
                    measured[name] = again[name]
                if isinstance(measured[name], Exception):
                    exc = measured[name]
                    print(f"{n:>7} {d:>3} {name:>11} failed: {type(exc).__name__}: {exc}")
                    rows.append({"N": n, "d": d, "impl": name, "error": f"{type(exc).__name__}: {exc}"})
                    continue
                first, best, peak, exact, (S, G) = measured[name]
                if name in again:
                    best = min(best, again[name][0])
                k = S64.shape[0]
                row = {
                    "N": n, "d": d, "impl": name, "seconds": best, "first_call_seconds": first,
                    "peak_bytes": peak, "peak_exact": exact,
                    "err64_S": rel(S[:k], S64), "err64_G": rel(G[:k], G64),
                }
                if mine is None:
                    mine = (best, S, G)
                    row.update(ratio=1.0, reldiff_S=0.0, reldiff_G=0.0)
                else:
                    row.update(ratio=best / mine[0], reldiff_S=rel(S, mine[1]), reldiff_G=rel(G, mine[2]))
                rows.append(row)
                print(
                    f"{n:>7} {d:>3} {name:>11} {best:>9.3f} {first:>12.2f} {fmt_bytes(peak):>11} "
                    f"{row['ratio']:>9.2f} {row['reldiff_S']:>10.1e} {row['reldiff_G']:>10.1e} "
                    f"{row['err64_S']:>9.1e} {row['err64_G']:>9.1e}",
                    flush=True,
                )
                del S, G
                gc.collect()

    stem = args.out.with_name(f"{args.out.name}-{device.type}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "results": rows}, indent=2))
    lines = [
        "# Gaussian kernel sum S and gradient G, float32 (benchmarks/bench_reductions.py)",
        "",
        "  ".join(f"{k}={v}" for k, v in env.items()),
        "",
        "| N = M | d | implementation | s / evaluation | warm-up s (compile) | peak extra memory | peer / measureflow "
        "| rel. diff S | rel. diff G | err vs float64 S | err vs float64 G |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['N']} | {r['d']} | {r['impl']} | failed: {r['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {r['N']} | {r['d']} | {r['impl']} | {r['seconds']:.3f} | {r['first_call_seconds']:.2f} | "
            f"{fmt_bytes(r['peak_bytes'])} | {r['ratio']:.2f} | {r['reldiff_S']:.1e} | {r['reldiff_G']:.1e} | "
            f"{r['err64_S']:.1e} | {r['err64_G']:.1e} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"\nwritten: {stem.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
