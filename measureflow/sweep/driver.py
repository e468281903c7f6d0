"""The sweep driver: plan the runs, skip what is done, hand jobs to an executor, keep the index.

:func:`run_sweep` plans the runs (:mod:`measureflow.sweep.grid`), recovers those its files say
are done, groups the rest into :class:`~measureflow.sweep.run.Job` objects — one per run, or with
``pack=True`` one per grid point — and hands them to an executor
(:mod:`measureflow.sweep.executors`) with :func:`execute`, the one function executors call. Each
outcome is recorded in the index as it arrives; SIGTERM, or a run that was terminated, stops the
sweep after the outcomes in hand are recorded (the same command continues it).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import attrs

from ..errors import ParameterError
from ..run import install_sigterm
from ..scenario import choose_scenario, load_scenarios
from .executors import make_executor
from ..io.lock import OutputLock
from .grid import INDEX_NAME, RunSpec, SweepIndex, check_device, check_dtype, now, parse_seeds, plan_runs
from .pack import run_pack
from .run import Job, Outcome, file_done, load_scenario, resolve_device, run_one, summarise

__all__ = ["run_sweep", "execute", "SweepReport"]


def execute(job: Job) -> list[Outcome]:
    """Run a job and return one outcome per run (never raises): a packed job as one batch when
    :func:`~measureflow.sweep.pack.run_pack` can, else its runs one by one."""
    try:
        device = resolve_device(job.device)
        scn = load_scenario(job.scenario, job.name)
    except Exception as exc:  # noqa: BLE001 - every run of the job records it
        return [Outcome.from_exception(run.key, exc, job.device) for run in job.runs]
    if job.pack and len(job.runs) > 1:
        packed = run_pack(scn, job.runs, device, job.dtype, job.checkpoint)
        if not isinstance(packed, str):
            return packed
        print(f"measureflow sweep: {len(job.runs)} runs not packed ({packed}); running them one by one",
              file=sys.stderr)
    return [run_one(scn, run, device, job.dtype) for run in job.runs]


@attrs.frozen
class SweepReport:
    """What :func:`run_sweep` did: counts by status, the runs that did not complete, the index path."""

    index: Path
    total: int
    skipped: int
    counts: dict
    unfinished: tuple  # (key, status, message) of runs not completed
    stopped: bool = False  # SIGTERM or a terminated run ended the sweep early

    @property
    def ok(self) -> bool:
        return not self.unfinished and not self.stopped

    def summary(self) -> str:
        parts = ", ".join(f"{n} {status}" for status, n in sorted(self.counts.items()))
        text = f"{self.total} runs: {parts or 'none run'} ({self.skipped} already completed); index {self.index}"
        if self.stopped:
            text += "; stopped early — run the same command again to continue"
        return text


def _recover(index: SweepIndex, run: RunSpec) -> bool:
    """True when ``run`` is already completed: its file says so (status, committed frames, the run's
    parameters) and no checkpoint is left. The index is corrected from the file either way."""
    entry = index.runs.get(run.key, {})
    if Path(run.file + ".ckpt").exists() or not file_done(run):
        if entry.get("status") == "completed":
            index.record(run, status="pending", message="its file does not hold the completed run; running it again")
        return False
    if entry.get("status") != "completed":
        # The run completed but the index missed it (the driver was killed before its next write).
        outcome = summarise(run, "completed", "", None, entry.get("device", ""))
        index.record(run, **outcome.record())
    return True


def _jobs(scenario_path: Path, name: str, runs: list[RunSpec], *, pack: bool, device: str, dtype: str | None,
          directory: Path) -> list[Job]:
    if not pack:
        return [Job(str(scenario_path), name, (run,), device, dtype) for run in runs]
    points: dict[str, list[RunSpec]] = {}
    for run in runs:
        points.setdefault(run.point, []).append(run)
    jobs = []
    for members in points.values():
        checkpoint = None
        if len(members) > 1:
            pack_key = hashlib.sha256(",".join(sorted(r.key for r in members)).encode()).hexdigest()[:16]
            checkpoint = str(directory / f"pack-{pack_key}.ckpt")
        jobs.append(Job(str(scenario_path), name, tuple(members), device, dtype, pack=len(members) > 1,
                        checkpoint=checkpoint))
    return jobs


def _progress(total: int, initial: int, progress: bool | None, name: str):
    from tqdm.auto import tqdm

    disable = None if progress is None else not progress
    if progress is None and os.environ.get("CI"):
        disable = True
    return tqdm(total=total, initial=initial, disable=disable, desc=f"sweep {name}", unit="run",
                file=sys.stderr, dynamic_ncols=True)


def run_sweep(
    scenario,
    grid: dict | None = None,
    seeds="0",
    out="sweep",
    *,
    fixed: dict | None = None,
    name: str | None = None,
    executor: str = "serial",
    executor_options: dict | None = None,
    pack: bool = False,
    device: str = "auto",
    dtype: str | None = None,
    sweep_seed: int = 0,
    progress: bool | None = None,
) -> SweepReport:
    """Run ``scenario`` (a scenario file) over ``grid`` (name → list of values) × ``seeds`` into ``out``.

    ``fixed`` holds parameter values shared by every run; ``executor`` names a registered executor
    built with ``executor_options``; ``pack`` advances the runs of one grid point as one batch;
    ``device`` is ``auto`` (CUDA where the run executes and one is visible, else CPU), ``cpu`` or
    ``cuda:N``; ``dtype`` casts each run's state. Returns a :class:`SweepReport`; the index is
    ``out/sweep.json``. See :mod:`measureflow.sweep.grid` for keys, seeds and resumption.
    """
    scenario_path = Path(scenario).absolute()
    scenarios = load_scenarios(scenario_path)
    scn = choose_scenario(scenarios, scenario_path, name)
    directory = Path(out).absolute()
    if directory.exists() and not directory.is_dir():
        raise ParameterError(f"--out {out}: exists and is not a directory; give a directory for the sweep's files")
    grid = {k: list(v) for k, v in (grid or {}).items()}
    fixed = dict(fixed or {})
    labels = parse_seeds(seeds)
    dtype = check_dtype(dtype)
    device = check_device(device)
    engine = make_executor(executor, **(executor_options or {}))
    runs = plan_runs(scn, grid, labels, directory, fixed=fixed, sweep_seed=sweep_seed, dtype=dtype)

    # One sweep per directory: a second one is refused before any work, so no index update is lost.
    with OutputLock(directory / INDEX_NAME, what=f"sweep directory {directory}"):
        return _sweep(scn, scenario_path, directory, grid, runs, engine, pack=pack, device=device, dtype=dtype,
                      sweep_seed=sweep_seed, progress=progress)


def _sweep(scn, scenario_path: Path, directory: Path, grid: dict, runs: list, engine, *, pack: bool, device: str,
           dtype: str | None, sweep_seed: int, progress: bool | None) -> SweepReport:
    out = directory
    index = SweepIndex.load(directory, missing_ok=True)
    previous = index.header.get("scenario", {}).get("name")
    if previous is not None and previous != scn.name:
        raise ParameterError(
            f"--out {out} holds a sweep of scenario {previous!r}; sweep {scn.name!r} into another directory"
        )
    index.header.update(scenario={"name": scn.name, "path": str(scenario_path)}, sweep_seed=int(sweep_seed),
                        grid=sorted(set(index.header.get("grid", [])) | set(grid)), dtype=dtype)
    index.header.setdefault("created", now())
    todo = [run for run in runs if not _recover(index, run)]
    for run in todo:
        index.record(run)
    index.save()
    skipped = len(runs) - len(todo)

    counts: dict[str, int] = {}
    unfinished = []
    stop = engine.stopping
    bar = _progress(len(runs), skipped, progress, scn.name)
    restore = install_sigterm(stop)
    try:
        jobs = _jobs(scenario_path, scn.name, todo, pack=pack, device=device, dtype=dtype, directory=directory)
        with engine:
            for job, result in engine.map_unordered(execute, jobs):
                if isinstance(result, BaseException):
                    message = f"{type(result).__name__}: {result}"
                    result = [Outcome.failure(run.key, message, message) for run in job.runs]
                by_key = {outcome.key: outcome for outcome in result}
                for run in job.runs:
                    outcome = by_key.get(run.key) or Outcome.failure(run.key, "the executor returned no outcome for it")
                    index.record(run, **outcome.record())
                    counts[outcome.status] = counts.get(outcome.status, 0) + 1
                    if outcome.status != "completed":
                        unfinished.append((run.key, outcome.status, outcome.message))
                    if outcome.status == "terminated":
                        stop.set()
                    bar.update(1)
                index.save(throttle=True)
                if stop.is_set():
                    break
        stopped = stop.is_set()
    finally:
        restore()
        bar.close()
        index.save()
    return SweepReport(index.path, len(runs), skipped, counts, tuple(unfinished), stopped)
