"""Run-loop overhead on tiny problems: this tree against a baseline revision, side by side.

Three cases, each a ``measureflow.Simulation(state, field, integrator, t0=, t1=, steps=,
writers=[...], seed=).run()`` with the ``linear`` field v(x) = Ax, A = [[-0.5, -2], [1, -0.5]]
(float64), timed from the call of ``run()`` to its return (the construction is timed apart):

* ``particles-euler``: N = 16 particles, R = 1, d = 2, float64, 10⁴ Euler steps, no writer and no
  observer: almost nothing but the loop's own per-step work;
* ``gaussians-rk4``: a Gaussian state (R = 1, d = 2, float64), 10⁴ RK4 steps (four affine
  evaluations and the covariance update per step);
* ``writer``: 10⁵ particles, d = 2, float32, 200 Euler steps, once with an H5MD writer every 10th
  step (21 frames, 17 MB) and once without: the writer's share of the run,
  (t_with − t_without) / t_with, target under 5 %.

The baseline (default 293b048, the last commit before the run-engine rewrite) is checked out as a
temporary ``git worktree``, removed afterwards. Each side is one long-lived worker process (this
script with ``--worker``) whose ``PYTHONPATH`` holds symlinks into its tree, with one thread
(``torch.set_num_threads(1)``, OMP_NUM_THREADS = MKL_NUM_THREADS = 1; ``--threads`` for more). The parent asks the two
workers in turn for one timed run each — sides alternate and the order flips every round, so the
load of a shared machine falls on both alike — after one untimed warm-up round. Reported: best and
median of the rounds, wall-clock and process CPU time, and the ratio baseline / current (above 1:
the current tree is faster). Load average and usable cores are recorded before and after.

Usage::

    python benchmarks/bench_loop.py                  # 7 rounds (about 1 min on 2 quiet cores)
    python benchmarks/bench_loop.py --quick          # 10³ steps, 10⁴ writer particles, 3 rounds (~20 s)
    python benchmarks/bench_loop.py --baseline main --out /tmp/loop   # results: /tmp/loop/loop.{json,md}

Results go to stdout and to the directory ``--out`` (default ~/.cache/measureflow/benchmarks/loop; never
benchmarks/results/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchkit import add_standard_arguments, prepare_machine
from trees import CURRENT_TREE, DEFAULT_BASELINE, baseline_tree, child_env, git, import_check, make_pyroot, sigterm_as_exit

A = [[-0.5, -2.0], [1.0, -0.5]]
SIDES = ("baseline", "current")


def sizes(quick: bool) -> dict[str, dict]:
    """Each timed case and its parameters (the writer case runs with and without its writer)."""
    steps = 1_000 if quick else 10_000
    n_writer = 10_000 if quick else 100_000
    return {
        "particles-euler": dict(kind="particles", n=16, dtype="float64", integrator="euler", steps=steps, writer=False),
        "gaussians-rk4": dict(kind="gaussians", dtype="float64", integrator="rk4", steps=steps, writer=False),
        "no-writer": dict(kind="particles", n=n_writer, dtype="float32", integrator="euler", steps=200, writer=False),
        "h5md-writer": dict(kind="particles", n=n_writer, dtype="float32", integrator="euler", steps=200, writer=True),
    }


# --------------------------------------------------------------------------------------------- worker


def worker(scratch: Path) -> None:
    """Serve timing requests on stdin, one JSON line each, answering on the original stdout."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # the parent's --threads
    import measureflow

    # Whatever the library prints must not corrupt the answers: keep the real stdout for them.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def reply(payload):
        answers.write(json.dumps(payload) + "\n")

    reply({"ready": os.path.realpath(measureflow.__file__), "torch": torch.__version__,
           "threads": torch.get_num_threads()})
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        case = request["case"]
        dtype = getattr(torch, case["dtype"])
        field = measureflow.field("linear", A=torch.tensor(A, dtype=torch.float64))
        generator = torch.Generator().manual_seed(0)
        if case["kind"] == "particles":
            state = measureflow.Particles(torch.randn(1, case["n"], 2, generator=generator, dtype=torch.float64).to(dtype))
        else:
            state = measureflow.Gaussians(torch.tensor([[2.0, -1.0]], dtype=dtype),
                                          torch.tensor([[[1.5, 0.6], [0.6, 0.8]]], dtype=dtype))
        path = scratch / f"writer-{os.getpid()}.h5"
        writers = [measureflow.get_registry().writer("h5md", str(path), every=10)] if case["writer"] else []
        wall0, cpu0 = time.perf_counter(), time.process_time()
        simulation = measureflow.Simulation(state, field, case["integrator"], t0=0.0, t1=1.0, steps=case["steps"],
                                            writers=writers, seed=0)
        wall1, cpu1 = time.perf_counter(), time.process_time()
        result = simulation.run()
        wall2, cpu2 = time.perf_counter(), time.process_time()
        ok = bool(getattr(result, "ok", True))
        path.unlink(missing_ok=True)
        reply({"setup": wall1 - wall0, "wall": wall2 - wall1, "cpu": cpu2 - cpu1, "ok": ok, "status": str(result.status)})
    answers.close()


class Worker:
    """A worker process importing one side's tree."""

    def __init__(self, side: str, python: str, pyroot: Path, scratch: Path, threads: int = 1):
        self.side = side
        self.log = scratch / f"worker-{side}.log"
        self.process = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--worker", str(scratch)],
            env=child_env(pyroot, threads), cwd=pyroot, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(self.log, "w"), text=True, bufsize=1)  # stderr to a file: no terminal, no progress bar
        self.info = self._answer()

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.side} worker died; end of its log:\n{self.log.read_text()[-3000:]}")
        return json.loads(line)

    def time(self, case: dict) -> dict:
        self.process.stdin.write(json.dumps({"case": case}) + "\n")
        answer = self._answer()
        if not answer["ok"]:
            raise RuntimeError(f"the {self.side} run of {case} did not complete: {answer['status']}")
        return answer

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"quit": True}) + "\n")
                self.process.stdin.close()
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


# --------------------------------------------------------------------------------------------- parent


def machine_load() -> dict:
    load1, load5, load15 = os.getloadavg()
    cores = len(os.sched_getaffinity(0))
    return {"time": datetime.datetime.now().isoformat(timespec="seconds"), "loadavg": [load1, load5, load15],
            "cores": cores, "idle_cores_estimate": max(0.0, cores - load1)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def summarise(samples: list[dict], steps: int) -> dict:
    wall = [s["wall"] for s in samples]
    cpu = [s["cpu"] for s in samples]
    return {"wall": wall, "cpu": cpu, "setup": [s["setup"] for s in samples],
            "best_s": min(wall), "median_s": statistics.median(wall), "best_cpu_s": min(cpu),
            "best_us_per_step": 1e6 * min(wall) / steps, "median_us_per_step": 1e6 * statistics.median(wall) / steps}


def markdown(report: dict) -> str:
    rows = report["cases"]
    lines = ["| case | steps | baseline µs/step (best) | current µs/step (best) | baseline / current (best) "
             "| (median) | (CPU time) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        b, c = row["baseline"], row["current"]
        lines.append(f"| {name} | {row['steps']} | {b['best_us_per_step']:.1f} | {c['best_us_per_step']:.1f} "
                     f"| {b['best_s'] / c['best_s']:.3f} | {b['median_s'] / c['median_s']:.3f} "
                     f"| {b['best_cpu_s'] / c['best_cpu_s']:.3f} |")
    share = report["writer_share_percent"]
    lines += ["", "| writer share of the run (target < 5 %) | baseline | current |", "|---|---:|---:|",
              f"| from best times | {share['baseline']['best']:.1f} % | {share['current']['best']:.1f} % |",
              f"| median of the rounds' shares | {share['baseline']['paired_median']:.1f} % "
              f"| {share['current']['paired_median']:.1f} % |"]
    before, after = report["load"]["before"], report["load"]["after"]
    lines += ["", f"Load average before {' / '.join(f'{x:.2f}' for x in before['loadavg'])}, "
              f"after {' / '.join(f'{x:.2f}' for x in after['loadavg'])} "
              f"(1 / 5 / 15 min; the figure after includes this benchmark's own ≈ 1) on {before['cores']} usable cores; "
              f"{report['rounds']} rounds after a warm-up, one thread per side; "
              f"baseline {report['baseline']['revision']} = {report['baseline']['commit'][:10]}, "
              f"current HEAD {report['current']['head'][:10]}"
              f"{' (with uncommitted changes)' if report['current']['dirty'] else ''}."]
    # The benchmark itself keeps about one core busy, so the load after it counts one job of ours.
    others = max(before["loadavg"][0], after["loadavg"][0] - 1.0)
    if before["cores"] - others < 1.0:
        lines += ["", "**Warning: other jobs left less than one core idle; the timings measured them as much as "
                  "the code. Rerun on a quiet machine.**"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE,
                        help=f"git revision to compare against (default {DEFAULT_BASELINE})")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per case and side (default 7, --quick 3)")
    add_standard_arguments(parser, "loop", "smoke mode: 10³ steps, 10⁴ writer particles, 3 rounds")
    parser.add_argument("--python", default=sys.executable, help="interpreter both sides run with")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return 0

    rounds = args.rounds or (3 if args.quick else 7)
    cases = sizes(args.quick)
    out = args.out.resolve()  # a directory here: loop.json and loop.md go into it
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench_loop-work-"))
    started = time.perf_counter()
    samples = {name: {side: [] for side in SIDES} for name in cases}
    workers: dict[str, Worker] = {}
    load = {"before": machine_load(), "start": prepare_machine(args)}
    print(f"load average {load['before']['loadavg'][0]:.2f} / {load['before']['loadavg'][1]:.2f} / "
          f"{load['before']['loadavg'][2]:.2f} on {load['before']['cores']} usable cores")
    if load["before"]["idle_cores_estimate"] < 1.0:
        print("warning: less than one core is idle; the timings will carry the other jobs' noise")
    try:
        with sigterm_as_exit(), baseline_tree(args.baseline, scratch) as (btree, bpyroot, commit):
            trees = {"baseline": (btree, bpyroot),
                     "current": (CURRENT_TREE, make_pyroot(CURRENT_TREE, scratch / "current-pyroot"))}
            for side, (tree, pyroot) in trees.items():
                import_check(args.python, pyroot, tree)
                workers[side] = Worker(side, args.python, pyroot, scratch, args.threads)
                print(f"{side}: {workers[side].info['ready']} (torch {workers[side].info['torch']}, "
                      f"{workers[side].info['threads']} thread)")
            for round_ in range(rounds + 1):  # round 0 warms up (first calls, caches) and is discarded
                order = SIDES if round_ % 2 == 0 else SIDES[::-1]
                for name, case in cases.items():
                    for side in order:
                        sample = workers[side].time(case)
                        if round_ > 0:
                            samples[name][side].append(sample)
                print(f"round {round_}/{rounds}{' (warm-up)' if round_ == 0 else ''} done, "
                      f"{time.perf_counter() - started:.0f} s")
            worker_info = {side: w.info for side, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
        shutil.rmtree(scratch, ignore_errors=True)
    load["after"] = machine_load()

    report = {
        "benchmark": "bench_loop", "quick": args.quick, "rounds": rounds,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "platform": platform.platform(), "python": platform.python_version()},
        "baseline": {"revision": args.baseline, "commit": commit},
        "current": {"tree": str(CURRENT_TREE), "head": git("rev-parse", "HEAD"),
                    "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))},
        "workers": worker_info, "load": load, "parameters": {"A": A, **{k: v for k, v in cases.items()}},
        "cases": {name: {"steps": case["steps"], **{side: summarise(samples[name][side], case["steps"]) for side in SIDES}}
                  for name, case in cases.items()},
    }
    # Two estimates of the writer's share: from each side's best times, and the median over rounds
    # of the share within a round (the two runs of one round ran seconds apart, under the same load).
    without, with_ = report["cases"]["no-writer"], report["cases"]["h5md-writer"]
    report["writer_share_percent"] = {
        side: {"best": 100.0 * (1.0 - without[side]["best_s"] / with_[side]["best_s"]),
               "paired_median": statistics.median(100.0 * (1.0 - a / b)
                                                  for a, b in zip(without[side]["wall"], with_[side]["wall"]))}
        for side in SIDES}
    text = markdown(report)
    (out / "loop.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "loop.md").write_text(text)
    print("\n" + text)
    print(f"wrote {out / 'loop.json'} and {out / 'loop.md'}; {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
