"""The ``measureflow`` command.

    measureflow run SCENARIO.py [--set key=value ...] [--resume] [--no-progress] [--params]
    measureflow plugins
    measureflow info RUN.h5
    measureflow plot RUN.h5 -o OUT.png [--animate OUT.gif]
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import MeasureflowError

__all__ = ["main"]


def _cmd_run(args) -> int:
    from .scenario import load_scenarios, run_from_args

    scenarios = load_scenarios(args.scenario)
    if args.name is not None:
        if args.name not in scenarios:
            raise MeasureflowError(
                f"{args.scenario} has no scenario named {args.name!r}; it defines: {', '.join(scenarios)}"
            )
        chosen = scenarios[args.name]
    elif len(scenarios) == 1:
        (chosen,) = scenarios.values()
    else:
        raise MeasureflowError(
            f"{args.scenario} defines several scenarios ({', '.join(scenarios)}); pick one with --name"
        )
    return run_from_args(chosen, args)


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
    from .io.reader import open_trajectory

    with open_trajectory(args.file) as traj:
        print(traj.summary())
    return 0


def _cmd_plot(args) -> int:
    from . import plot
    from .io.reader import open_trajectory

    if args.output is None and args.animate is None:
        raise MeasureflowError("measureflow plot needs -o OUT.png and/or --animate OUT.gif")
    with open_trajectory(args.file) as traj:
        if args.output is not None:
            plot.plot_run(traj, out=args.output, replica=args.replica)
            print(f"wrote {args.output}")
        if args.animate is not None:
            plot.animate(traj, args.animate, replica=args.replica)
            print(f"wrote {args.animate}")
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

    plugins = sub.add_parser("plugins", help="list registered fields, integrators, writers, …")
    plugins.set_defaults(handler=_cmd_plugins)

    info = sub.add_parser("info", help="summarise a trajectory file")
    info.add_argument("file")
    info.set_defaults(handler=_cmd_info)

    plot = sub.add_parser("plot", help="draw a trajectory file")
    plot.add_argument("file")
    plot.add_argument("-o", "--output", help="PNG (or PDF/SVG) overview picture")
    plot.add_argument("--animate", metavar="OUT.gif", help="animated GIF of the run")
    plot.add_argument("--replica", type=int, default=0, help="which replica to draw (default 0)")
    plot.set_defaults(handler=_cmd_plot)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except MeasureflowError as exc:
        print(f"measureflow: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
