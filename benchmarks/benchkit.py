"""What every benchmark script shares: its standard options, the machine record, alternating sides.

* :func:`add_standard_arguments` gives a script ``--quick``, ``--threads`` and ``--out``; ``--out``
  defaults outside the repository (``$MEASUREFLOW_BENCH_OUT`` or ``~/.cache/measureflow/benchmarks``),
  so the committed tables in ``benchmarks/results/`` change only when someone writes there on purpose.
* :func:`prepare_machine` sets the torch threads (and the OpenMP/MKL variables for subprocesses) and returns the
  environment record every result carries: torch threads, load average and the *effective* number of
  cores, measured at the start as the CPU time a saturating torch computation gets per second of wall
  time with every core's thread asked for (2 on an idle 2-core machine, about 1 under a load of 1
  elsewhere). A ratio measured at 1.1 effective cores is not one measured at 2.
* :func:`alternate` times the sides of a comparison in turns, A B B A A B …, within one process, so a
  change of machine load enters both sides alike; :func:`paired_ratio` is the median of the per-round
  ratios (no ratio of runs made minutes apart).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

__all__ = ["add_standard_arguments", "default_out", "prepare_machine", "effective_cores", "machine_record", "alternate",
           "paired_ratio", "timed", "load_line", "alternate_best"]


def default_out(name: str) -> Path:
    """Default results stem of ``name``: outside the repository (``$MEASUREFLOW_BENCH_OUT`` or ~/.cache)."""
    root = os.environ.get("MEASUREFLOW_BENCH_OUT") or Path.home() / ".cache" / "measureflow" / "benchmarks"
    return Path(root) / name


def add_standard_arguments(parser: argparse.ArgumentParser, name: str, quick: str, threads: int = 1) -> None:
    """``--quick`` (help text ``quick``), ``--threads`` (default ``threads``) and ``--out`` (a results stem,
    default :func:`default_out` of ``name``)."""
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--threads", type=int, default=threads,
                        help=f"torch intra-op threads (default {threads}: a shared machine's pool oversubscribes)")
    parser.add_argument("--out", type=Path, default=default_out(name),
                        help=f"results stem, .json/.md added (default {default_out(name)}; outside the repository)")


def effective_cores(seconds: float = 0.3) -> float:
    """CPU seconds per wall second a saturating, all-threads torch computation gets now (≤ cores usable)."""
    saved = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(cores)
    try:
        a = torch.randn(256, 256, dtype=torch.float64)
        torch.mm(a, a)  # pool start-up outside the window
        wall0, cpu0 = time.perf_counter(), time.process_time()
        while time.perf_counter() - wall0 < seconds:
            for _ in range(8):
                torch.mm(a, a)
        return round((time.process_time() - cpu0) / (time.perf_counter() - wall0), 2)
    finally:
        torch.set_num_threads(saved)


def machine_record() -> dict:
    """Time, host, versions, torch threads, load average (1/5/15 min), cores and effective cores, now."""
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": load,
        "effective_cores": effective_cores(),
    }


def prepare_machine(args: argparse.Namespace) -> dict:
    """Set the threads from ``args.threads`` (here and for child processes) and return :func:`machine_record`."""
    threads = max(1, int(args.threads))
    torch.set_num_threads(threads)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    env = machine_record()
    print(load_line(env), flush=True)
    return env


def load_line(env: dict) -> str:
    load = env.get("load_average") or [float("nan")] * 3
    return (f"torch threads {env['torch_threads']}, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}, "
            f"effective cores {env['effective_cores']} of {env['cpu_count']} ({env['date']})")


def timed(fn: Callable[[], object]) -> dict:
    """Wall and process CPU seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def alternate(sides: dict[str, Callable[[], object]], rounds: int, warmup: bool = True) -> dict[str, list[dict]]:
    """Time every side ``rounds`` times in turns (order reversed every other round: A B, B A, A B …), after
    one untimed warm-up call each. Returns, per side, the list of :func:`timed` records in round order."""
    names = list(sides)
    if warmup:
        for name in names:
            sides[name]()
    out: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            out[name].append(timed(sides[name]))
    return out


def paired_ratio(times: dict[str, list[dict]], num: str, den: str, key: str = "wall") -> float:
    """Median over rounds of time(num) / time(den), each ratio from one round's adjacent measurements."""
    return statistics.median(a[key] / b[key] for a, b in zip(times[num], times[den]))


def alternate_best(sides: dict, repeats: int, long_run: float = float("inf")) -> dict:
    """Best wall seconds of each side over up to ``repeats`` calls made in turns (order reversed every other
    round); a side stops being repeated once one call took over ``long_run`` s. Returns, per side,
    (best seconds, last result, calls) or the exception its call raised (the other sides go on)."""
    best: dict = {name: [float("inf"), None, 0] for name in sides}
    failed: dict = {}
    names = list(sides)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            if name in failed or (best[name][2] and best[name][0] > long_run):
                continue
            gc.collect()
            try:
                wall = time.perf_counter()
                out = sides[name]()
                seconds = time.perf_counter() - wall
            except Exception as exc:  # noqa: BLE001 - a failing peer is reported, not fatal
                failed[name] = exc
                continue
            entry = best[name]
            entry[0], entry[1], entry[2] = min(entry[0], seconds), out, entry[2] + 1
    return {name: failed.get(name) or tuple(best[name]) for name in names}
