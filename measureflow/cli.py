"""The ``measureflow`` command.

    measureflow run SCENARIO.py [--set key=value ...] [--resume] [--no-progress] [--params]
    measureflow sweep SCENARIO.py --grid key=v1,v2 ... --seeds 0-9 --out DIR [--executor ray] [--pack] ...
    measureflow collect DIR [-o TABLE.csv]
    measureflow plugins
    measureflow info RUN.h5
    measureflow repair RUN.h5
    measureflow plot RUN.h5 -o OUT.png [--animate OUT.gif]
    measureflow plot DIR --x key --y observable [-o OUT.png]
    measureflow likelihood MODEL.pt DATA.npy [--sigma S] [--t0 T0 --t1 T1] [--hutchinson K] [-o OUT.npy]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from . import __version__
from .errors import MeasureflowError, TrajectoryFileError

__all__ = ["main"]


def _cmd_run(args) -> int:
    from .scenario import choose_scenario, load_scenarios, run_from_args

    chosen = choose_scenario(load_scenarios(args.scenario), args.scenario, args.name)
    return run_from_args(chosen, args)


def _cmd_sweep(args) -> int:
    from .scenario import parse_assignments
    from .sweep import parse_grid, run_sweep

    options = {}
    if args.address is not None:
        options["address"] = args.address
    if args.gpus_per_run is not None:
        options["gpus_per_run"] = args.gpus_per_run
    if args.cpus_per_run is not None:
        options["cpus_per_run"] = args.cpus_per_run
    report = run_sweep(
        args.scenario,
        parse_grid(args.grid),
        args.seeds,
        args.out,
        fixed=parse_assignments(args.assignments),
        name=args.name,
        executor=args.executor,
        executor_options=options,
        pack=args.pack,
        device=args.device,
        dtype=args.dtype,
        sweep_seed=args.sweep_seed,
        progress=False if args.no_progress else None,
    )
    print(report.summary())
    for key, status, message in report.unfinished[:20]:
        print(f"  {key}: {status}" + (f": {message}" if message else ""))
    if len(report.unfinished) > 20:
        print(f"  … and {len(report.unfinished) - 20} more (measureflow collect {args.out})")
    return 0 if report.ok else 3


def _cmd_collect(args) -> int:
    from pathlib import Path

    from .sweep import sweep_table, write_atomic

    table = sweep_table(args.directory)
    print(table.format())
    out = Path(args.output) if args.output else Path(args.directory) / "sweep.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, table.to_csv())
    print(f"wrote {out}")
    return 0


def _cmd_plugins(args) -> int:
    from .plugins import KINDS, get_registry

    registry = get_registry()
    for kind in KINDS:
        entries = registry.entries(kind)
        if not entries:
            continue
        print(f"{kind}:")
        width = max(len(e.name) for e in entries)
        for entry in entries:
            print(f"  {entry.name:<{width}}  {entry.owner} {entry.version}".rstrip())
    if registry.failures:
        print("failed to load (skipped):")
        for label, message in registry.failures:
            print(f"  {label}: {message}")
    return 0


def _cmd_info(args) -> int:
    from .io.lock import holder
    from .io.reader import open_trajectory

    with open_trajectory(args.file) as traj:
        print(traj.summary())
        if traj.unclosed:
            pid = holder(args.file)
            if pid is not None:
                print(f"  note         process {pid} is writing it")
            else:
                print("  note         its writer was killed: other HDF5 tools (h5py, h5dump, pyh5md) refuse it "
                      "until `measureflow repair FILE` (or a --resume) rewrites it")
    return 0


def _cmd_repair(args) -> int:
    from .io.h5md import repair_file

    frames = repair_file(args.file)
    if frames is None:
        print(f"{args.file}: was closed by its writer; nothing to repair")
    else:
        print(f"{args.file}: rewritten as a plain HDF5 file with the {frames} frames of its writer's last flush; "
              "any HDF5 tool opens it now")
    return 0


def _cmd_likelihood(args) -> int:
    """log p and bits per dimension of points (a .npy/.txt/.csv array (n, d)) under a saved learned field."""
    from pathlib import Path

    import numpy as np
    import torch

    from .data_likelihood import likelihood
    from .plugins import get_registry

    path = Path(args.data)
    if not path.exists():
        raise MeasureflowError(f"likelihood: no data file {path}")
    points = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, delimiter="," if path.suffix == ".csv" else None)
    x = torch.as_tensor(np.atleast_2d(points), dtype=torch.float64)
    field = get_registry().field("learned", path=args.model)
    mode = "hutchinson" if args.hutchinson else "exact"
    result = likelihood(field, x, sigma=args.sigma, t0=args.t0, t1=args.t1, integrator=args.integrator,
                        steps=args.steps, log_density=mode, probes=args.hutchinson or 1, seed=args.seed,
                        batch_size=args.batch_size, progress=not args.no_progress and None)
    print(f"{len(x)} points, d = {x.shape[1]}: mean log p = {result.mean_log_prob:.6g}, "
          f"{result.mean_bits_per_dim:.6g} bits per dimension ({mode}, t = {result.t0:g} → {result.t1:g}, "
          f"{result.nfev} field evaluations)")
    if args.output:
        np.save(args.output, result.log_prob.cpu().numpy())
        print(f"wrote the per-point log p to {args.output}")
    return 0


def _cmd_plot(args) -> int:
    from pathlib import Path

    from . import plot
    from .io.reader import open_trajectory

    if Path(args.file).is_dir():
        return _plot_sweep(args)
    if args.x is not None or args.y is not None:
        raise MeasureflowError(f"--x/--y draw a sweep: give the sweep's directory, not the file {args.file}")
    if args.output is None and args.animate is None:
        raise MeasureflowError("measureflow plot needs -o OUT.png and/or --animate OUT.gif")
    _check_outputs(args.output, args.animate)
    with open_trajectory(args.file) as traj:
        if args.output is not None:
            with _writing(args.output):
                plot.plot_run(traj, out=args.output, replica=args.replica)
            print(f"wrote {args.output}")
        if args.animate is not None:
            with _writing(args.animate):
                plot.animate(traj, args.animate, replica=args.replica)
            print(f"wrote {args.animate}")
    return 0


@contextlib.contextmanager
def _writing(path):
    """An operating-system refusal to write ``path`` (a read-only or special file system) as one line."""
    try:
        yield
    except MeasureflowError:  # already one line (a TrajectoryFileError is also an OSError)
        raise
    except OSError as exc:
        raise MeasureflowError(f"cannot write {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        # matplotlib's refusal of NaN/inf axis limits: numbers in the file that no run writes.
        if "NaN or Inf" not in str(exc):
            raise
        raise TrajectoryFileError(f"cannot draw {path}: the file holds non-finite values where the picture needs "
                                  f"numbers ({exc})") from None


def _check_outputs(*paths) -> None:
    """Refuse a picture path that cannot be written before reading or drawing anything."""
    from .parameters import check_writable_path

    for path in paths:
        if path is not None:
            check_writable_path(path, "measureflow plot")


def _plot_sweep(args) -> int:
    import re
    from pathlib import Path

    from .sweep import plot_sweep, sweep_table

    if args.x is None or args.y is None:
        table = sweep_table(args.file)
        raise MeasureflowError(
            f"measureflow plot {args.file} (a sweep) needs --x PARAMETER --y OBSERVABLE; parameters that vary: "
            f"{', '.join(table.varying) or '(none)'}; observables: {', '.join(table.observables) or '(none)'}"
        )
    if args.animate is not None:
        raise MeasureflowError("--animate draws one trajectory file, not a sweep")
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{args.y}-vs-{args.x}").strip("_")
    out = args.output or str(Path(args.file) / f"{stem}.png")
    _check_outputs(out)
    with _writing(out):
        plot_sweep(args.file, args.x, args.y, out=out)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .scenario import add_run_arguments

    parser = argparse.ArgumentParser(prog="measureflow", description="Simulate how probability measures move.")
    parser.add_argument("--version", action="version", version=f"measureflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a scenario script")
    run.add_argument("scenario", help="path to a scenario .py file")
    run.add_argument("--name", help="which scenario, when the file defines several")
    add_run_arguments(run)
    run.set_defaults(handler=_cmd_run)

    sweep = sub.add_parser(
        "sweep", help="run a scenario over a parameter grid × seeds, one H5MD file a run",
        description="Expand --grid × --seeds into runs of SCENARIO, each writing DIR/<hash>.h5, with an index "
                    "DIR/sweep.json. Re-running the same command skips completed runs and resumes interrupted ones.",
    )
    sweep.add_argument("scenario", help="path to a scenario .py file (it needs `out: str` and `seed: int` parameters)")
    sweep.add_argument("--name", help="which scenario, when the file defines several")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,…",
                       help="a swept parameter and its values (repeatable; the grid is their product)")
    sweep.add_argument("--seeds", default="0", metavar="LABELS",
                       help="seed labels per grid point: 0-9, 0,3,7 or 0-4,10 (default 0); each run's seed is "
                            "derived from the sweep seed, its parameters and its label")
    sweep.add_argument("--out", required=True, metavar="DIR", help="directory of the runs' files and the index")
    sweep.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                       help="a parameter value shared by every run (repeatable)")
    sweep.add_argument("--executor", default="serial", help="registered executor: serial (default) or ray")
    sweep.add_argument("--address", help="ray: join this cluster (auto, or HOST:PORT of its head)")
    sweep.add_argument("--gpus-per-run", type=float,
                       help="ray: GPUs each run (or packed batch) reserves; fractions allowed")
    sweep.add_argument("--cpus-per-run", type=float, help="ray: CPUs each run (or packed batch) reserves (default 1)")
    sweep.add_argument("--pack", action="store_true",
                       help="advance the runs of one grid point (they differ only in seed) as one batch of replicas")
    sweep.add_argument("--device", default="auto", help="auto (CUDA where visible, else CPU), cpu or cuda:N")
    sweep.add_argument("--dtype", help="cast each run's state: float32 or float64 (default: the scenario's)")
    sweep.add_argument("--sweep-seed", type=int, default=0,
                       help="seed from which every run's seed is derived (default 0)")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar")
    sweep.set_defaults(handler=_cmd_sweep)

    collect = sub.add_parser("collect", help="print and write the table of a sweep (parameters × final observables)")
    collect.add_argument("directory", help="the sweep's --out directory")
    collect.add_argument("-o", "--output", help="CSV file to write (default DIR/sweep.csv)")
    collect.set_defaults(handler=_cmd_collect)

    plugins = sub.add_parser("plugins", help="list registered fields, integrators, writers, …")
    plugins.set_defaults(handler=_cmd_plugins)

    info = sub.add_parser("info", help="summarise a trajectory file")
    info.add_argument("file")
    info.set_defaults(handler=_cmd_info)

    repair = sub.add_parser(
        "repair", help="make a trajectory whose writer was killed readable by any HDF5 tool",
        description="A file whose writer was killed (SIGKILL, power cut) keeps HDF5's 'open for write' flag, "
                    "which h5py, h5dump and pyh5md refuse. Rewrite it as a plain HDF5 file holding the "
                    "frames of its last flush (a --resume does the same).",
    )
    repair.add_argument("file")
    repair.set_defaults(handler=_cmd_repair)

    plot = sub.add_parser("plot", help="draw a trajectory file, or a sweep's observable against a parameter")
    plot.add_argument("file", help="a trajectory .h5 file, or a sweep's directory")
    plot.add_argument("-o", "--output", help="PNG (or PDF/SVG) picture (a sweep: default DIR/<y>-vs-<x>.png)")
    plot.add_argument("--x", help="sweep: the parameter on the x axis")
    plot.add_argument("--y", help="sweep: the final observable on the y axis")
    plot.add_argument("--animate", metavar="OUT.gif", help="animated GIF of the run")
    plot.add_argument("--replica", type=int, default=0, help="which replica to draw (default 0)")
    plot.set_defaults(handler=_cmd_plot)

    lik = sub.add_parser("likelihood", help="log p and bits per dimension of data under a saved learned field")
    lik.add_argument("model", help="a model file written by measureflow.training.save_model")
    lik.add_argument("data", help="points (n, d): .npy, .csv or whitespace-separated text")
    lik.add_argument("--sigma", type=float, default=None, help="noise N(0, σ²I) at the noise end (default 1)")
    lik.add_argument("--t0", type=float, default=None, help="the data end (default 0)")
    lik.add_argument("--t1", type=float, default=None, help="the noise end (default 1)")
    lik.add_argument("--integrator", default="dopri5")
    lik.add_argument("--steps", type=int, default=1, help="output intervals (fixed-step integrators: the steps)")
    lik.add_argument("--hutchinson", type=int, default=0, metavar="K", help="Hutchinson trace with K probes")
    lik.add_argument("--seed", type=int, default=0)
    lik.add_argument("--batch-size", type=int, default=4096)
    lik.add_argument("--no-progress", action="store_true")
    lik.add_argument("-o", "--output", help="write the per-point log p to this .npy file")
    lik.set_defaults(handler=_cmd_likelihood)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.handler(args)
    except MeasureflowError as exc:
        # One line, whatever the message holds (a nested error's text may carry newlines).
        print(f"measureflow: error: {' '.join(str(exc).split())}", file=sys.stderr)
        code = 2
    _leave_if_hdf5_is_stuck(code)
    return code


def _leave_if_hdf5_is_stuck(code: int) -> None:
    """After a write error (a full disk) whose file HDF5 could not close either, HDF5 would try again
    at interpreter exit and may crash (a segfault, exit 139) after our one-line message: leave now,
    with ``code``. The file keeps what its last flush committed."""
    h5md = sys.modules.get("measureflow.io.h5md")
    if h5md is not None and h5md.UNCLOSED_AFTER_ERROR:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
