"""Sweep throughput: one 64-run sweep, serial against Ray against packed, in runs per minute.

The sweep: ``scenarios/relaxation.py`` with the Ornstein–Uhlenbeck field on particles (Euler–
Maruyama, so every run draws its own noise), 100 steps to t1 = 2, a frame and the observables
(mean, covariance, squared W2 to the exact law) every 10 steps, one checkpoint every 10 steps;
grid n ∈ {250, 1000} × t1 ∈ {1, 2} × 16 seeds = 64 runs. Each mode sweeps into a fresh directory
and is timed from the call of :func:`measureflow.sweep.run_sweep` to its return (planning, every
run, the index):

* ``serial``: every run in this process, one after the other;
* ``serial --pack``: the 16 seeds of each grid point advanced as one batch (4 batches);
* ``ray, cold``: the executor starts a local cluster with this machine's cores, runs one task per
  run and shuts the cluster down — all of it timed;
* ``ray, warm``: the cluster is already up and its workers have imported measureflow (a first,
  untimed sweep of one run per core did that), as on a long-lived cluster;
* ``ray --pack, warm``: one task per batch of 16 seeds.

Every mode's files are compared with the first serial sweep's (they must be identical). Each mode
sweeps ``--repeats`` times (best and median reported), in three phases — no Ray process running;
cold Ray; a warm cluster — with the repeats of a phase's modes interleaved so that the load of a
shared machine falls on them alike.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_sweep.py                 # the 2-core CPU table
    python benchmarks/bench_sweep.py --device cuda --gpus-per-run 0.25 --n 100000 1000000 --out benchmarks/results/sweep

On a GPU node the second command runs every mode on ``cuda`` (Ray tasks reserve a quarter GPU each,
so four runs share a device; packed batches use one device each). Results go to stdout and to ``--out``
(default ~/.cache/measureflow/benchmarks/sweep-<device>.{md,json}; benchmarks/results/ only on purpose).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from benchkit import add_standard_arguments, prepare_machine

from measureflow.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "scenarios" / "relaxation.py"
MODES = ("serial", "serial-pack", "ray-cold", "ray-warm", "ray-pack")
LABELS = {"serial": "serial", "serial-pack": "serial --pack", "ray-cold": "ray, cold (cluster start included)",
          "ray-warm": "ray, warm", "ray-pack": "ray --pack, warm"}


def same_files(a: Path, b: Path) -> bool:
    """Whether two sweep directories hold the same runs with the same data (output paths aside)."""
    names = sorted(p.name for p in a.glob("*.h5"))
    if names != sorted(p.name for p in b.glob("*.h5")):
        return False
    for name in names:
        with h5py.File(a / name, "r") as fa, h5py.File(b / name, "r") as fb:
            for element in ("particles/trajectory/position/value", "observables/w2_to_exact/value",
                            "observables/covariance/value"):
                if not np.array_equal(fa[element][()], fb[element][()]):
                    return False
    return True


def sweep(args, directory: Path, **options) -> tuple[float, dict]:
    start = time.perf_counter()
    report = run_sweep(SCENARIO, {"n": [str(n) for n in args.n], "t1": ["1", "2"]}, f"0-{args.seeds - 1}", directory,
                       fixed={"field": "ornstein_uhlenbeck", "steps": args.steps, "every": 10},
                       device=args.device, progress=False, **options)
    seconds = time.perf_counter() - start
    if not report.ok:
        raise SystemExit(f"the sweep into {directory} did not complete: {report.summary()}")
    return seconds, report.counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs=2, default=[250, 1000], help="the two particle counts of the grid")
    parser.add_argument("--seeds", type=int, default=16, help="seeds per grid point (4 grid points)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU node")
    parser.add_argument("--gpus-per-run", type=float, default=0.0, help="Ray: GPUs each task reserves")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--repeats", type=int, default=3, help="timed sweeps per mode (best and median reported)")
    add_standard_arguments(parser, "sweep", "4 seeds, 20 steps, 1 repeat, serial modes only")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.repeats = 4, 20, 1
        args.modes = [m for m in args.modes if not m.startswith("ray")]

    env = {
        **prepare_machine(args),
        "device": args.device if args.device != "cpu" else (platform.processor() or platform.machine()),
        "runs": 4 * args.seeds,
        "n": args.n,
        "steps": args.steps,
        "repeats": args.repeats,
    }
    try:
        import ray

        env["ray"] = ray.__version__
    except ImportError:
        ray = None
        env["ray"] = "not installed"
    print("  ".join(f"{k}={v}" for k, v in env.items()), flush=True)

    ray_options = {"gpus_per_run": args.gpus_per_run} if args.gpus_per_run else {}
    modes = [m for m in MODES if m in args.modes]
    if ray is None and any(m.startswith("ray") for m in modes):
        raise SystemExit(f"the ray modes need Ray: pip install -e \".[ray]\" (or --modes {' '.join(MODES[:2])})")
    times: dict[str, list[float]] = {m: [] for m in modes}
    identical: dict[str, bool] = {}
    work = Path(tempfile.mkdtemp(prefix="bench_sweep-"))
    reference: Path | None = None

    def timed(mode: str, repeat: int) -> None:
        nonlocal reference
        options = {}
        if mode.startswith("ray"):
            options.update(executor="ray", executor_options=ray_options)
        if mode.endswith("pack"):
            options["pack"] = True
        directory = work / f"{mode}-{repeat}"
        seconds, counts = sweep(args, directory, **options)
        times[mode].append(seconds)
        if reference is None:
            reference = directory
        else:
            identical[mode] = identical.get(mode, True) and same_files(reference, directory)
        print(f"{LABELS[mode]:<38} {sum(counts.values())} runs in {seconds:7.2f} s = "
              f"{60.0 * sum(counts.values()) / seconds:7.1f} runs/min", flush=True)
        if directory != reference:
            shutil.rmtree(directory, ignore_errors=True)

    try:
        # Three phases, each mode's repeats interleaved with the others' of its phase so that machine
        # noise hits them alike: no Ray running; cold Ray; a warm cluster kept up.
        phases = [[m for m in modes if not m.startswith("ray")], [m for m in modes if m == "ray-cold"],
                  [m for m in modes if m in ("ray-warm", "ray-pack")]]
        for phase in phases:
            if phase and phase[0] in ("ray-warm", "ray-pack"):
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
                run_sweep(SCENARIO, {}, f"0-{os.cpu_count() - 1}", work / "warm-up", fixed={"steps": 10, "n": 10},
                          executor="ray", executor_options=ray_options, device=args.device, progress=False)
            for repeat in range(args.repeats):
                for mode in phase:
                    timed(mode, repeat)
    finally:
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    runs = env["runs"]
    rows = []
    for mode in modes:
        best, median = min(times[mode]), float(np.median(times[mode]))
        rows.append({"mode": mode, "label": LABELS[mode], "runs": runs, "seconds": times[mode],
                     "best_runs_per_minute": 60.0 * runs / best, "median_runs_per_minute": 60.0 * runs / median,
                     "identical_to_first": identical.get(mode)})

    stem = args.out.with_name(f"{args.out.name}-{'cpu' if args.device == 'cpu' else 'gpu'}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "results": rows}, indent=2))
    lines = ["# Sweep throughput (benchmarks/bench_sweep.py)", "", "  ".join(f"{k}={v}" for k, v in env.items()), "",
             f"| mode | runs | s (best of {args.repeats}) | runs / min (best) | runs / min (median) "
             f"| files identical to {modes[0]} |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        same = "—" if r["identical_to_first"] is None else ("yes" if r["identical_to_first"] else "NO")
        lines.append(f"| {r['label']} | {r['runs']} | {min(r['seconds']):.1f} | {r['best_runs_per_minute']:.0f} "
                     f"| {r['median_runs_per_minute']:.0f} | {same} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"\nwritten: {stem.with_suffix('.md')} and .json")


if __name__ == "__main__":
    sys.exit(main())
