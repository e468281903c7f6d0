"""Scenarios: parameterised scripts that build a run — a :class:`~measureflow.Simulation`, or a
training run such as :class:`~measureflow.training.GeneratorTraining`.

A scenario is a function whose keyword parameters all have type annotations and defaults; it
returns a run. Decorate it with :func:`scenario`; optionally attach a ``report`` that receives the
run's result (print numbers, draw a picture)::

    from measureflow import Simulation, scenario

    @scenario
    def relax(n: int = 1000, steps: int = 100, out: str = "runs/relax.h5") -> Simulation:
        ...
        return Simulation(state, field, "rk4", 0.0, 1.0, steps=steps, writers=[out])

    @relax.report
    def _(result, params):
        print(result.status)

    if __name__ == "__main__":
        relax.main()

The same file runs as ``python relax.py --set n=500`` and as ``measureflow run relax.py --set n=500``.
When the run writes an H5MD file, the runner keeps a checkpoint next to it (``<file>.ckpt``) so
that ``--resume`` continues a killed run; the checkpoint is removed once the run completes.

A run is anything with the small interface :class:`Runnable` describes (``Simulation`` and the
training runs have it): the runner never changes a run, it asks for new ones (``with_options``,
``with_checkpoint``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import attrs

from .errors import MeasureflowError, ParameterError
from .parameters import check_value, effective_rules, output_files, rules_of

__all__ = ["scenario", "Scenario", "Parameter", "Runnable", "load_scenarios", "parse_assignments",
           "with_run_checkpoint", "output_path", "choose_scenario"]


@runtime_checkable
class Runnable(Protocol):
    """What a scenario function returns: a run the runner can checkpoint, label and start.

    ``parameters`` and ``description`` are recorded in the run's file; ``writers`` are its trajectory
    sinks (the first one with a ``path`` is its output file); ``n_steps`` its length;
    ``checkpoint_path`` where it checkpoints (None: nowhere). ``with_options(parameters=…,
    description=…, progress=…)`` and ``with_checkpoint(path, every, resume)`` return new runs;
    ``run()`` returns a result with ``status`` (a :class:`~measureflow.status.Status`) and ``wall_time``.
    """

    parameters: dict
    description: str
    writers: tuple
    n_steps: int
    checkpoint_path: Any

    def with_options(self, **options): ...

    def with_checkpoint(self, path, every=None, resume=None): ...

    def run(self): ...

_SUPPORTED = (int, float, str, bool)


@attrs.frozen
class Parameter:
    """One scenario parameter: its name, type, default and the rules its values obey
    (:mod:`measureflow.parameters`)."""

    name: str
    type: Any
    default: Any
    rules: tuple = ()

    def check(self, value, scenario: str, params: dict):
        """``value`` converted to the declared type and checked by the rules (ParameterError otherwise)."""
        return check_value(self.type, self.rules, value, self.name, f"scenario {scenario!r}", params)

    def describe(self) -> str:
        rules = ", ".join(filter(None, (rule.describe() for rule in effective_rules(self.type, self.rules))))
        return _type_name(self.type) + (f" {rules}" if rules else "")

    def convert(self, text: str, scenario: str):
        """Parse ``text`` (from ``--set name=text``) into this parameter's type."""
        kind = self.type
        try:
            if kind is bool:
                lowered = text.strip().lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError("expected true/false")
            if kind in (int, float, str):
                return kind(text)
            origin = typing.get_origin(kind)
            if origin in (list, tuple):
                (inner,) = set(typing.get_args(kind)) - {Ellipsis} or {str}
                items = [inner(v) for v in text.split(",") if v.strip()]
                return tuple(items) if origin is tuple else items
        except (ValueError, TypeError) as exc:
            raise ParameterError(
                f"scenario {scenario!r}: cannot read --set {self.name}={text!r} as {_type_name(kind)} ({exc})"
            ) from None
        raise ParameterError(f"scenario {scenario!r}: parameter {self.name!r} has unsupported type {_type_name(kind)}")


def _type_name(kind) -> str:
    return getattr(kind, "__name__", None) or str(kind)


class Scenario:
    """A decorated scenario function (see the module docstring)."""

    def __init__(self, function: Callable, name: str | None = None):
        self.function = function
        self.name = name or function.__name__
        self.doc = inspect.getdoc(function) or ""
        self.parameters = self._read_signature(function)
        self._report: Callable | None = None

    def _read_signature(self, function) -> dict[str, Parameter]:
        hints = typing.get_type_hints(function, include_extras=True)
        out = {}
        for p in inspect.signature(function).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ParameterError(f"scenario {self.name!r}: *args/**kwargs are not allowed; declare each parameter")
            if p.default is inspect.Parameter.empty:
                raise ParameterError(f"scenario {self.name!r}: parameter {p.name!r} needs a default value")
            kind, rules = rules_of(hints.get(p.name, type(p.default) if p.default is not None else str))
            out[p.name] = Parameter(p.name, kind, p.default, rules)
        return out

    def report(self, function: Callable) -> Callable:
        """Attach ``function(result, params)``, called after the run."""
        self._report = function
        return function

    def resolve(self, overrides: dict | None = None) -> dict:
        """Defaults updated with ``overrides`` (values or strings), converted to the declared types
        and checked by each parameter's rules (:mod:`measureflow.parameters`) before anything is built."""
        params = {name: p.default for name, p in self.parameters.items()}
        for key, value in (overrides or {}).items():
            if key not in self.parameters:
                known = ", ".join(self.parameters) or "(none)"
                raise ParameterError(f"scenario {self.name!r} has no parameter {key!r}; its parameters are: {known}")
            param = self.parameters[key]
            if isinstance(value, str) and param.type is not str:
                value = param.convert(value, self.name)
            elif param.type is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            params[key] = value
        # Every value is converted before any rule runs: a rule may read the others (a size × replicas).
        for name, param in self.parameters.items():
            params[name] = param.check(params[name], self.name, params)
        return params

    def build(self, overrides: dict | None = None):
        """Call the scenario function with the resolved parameters; returns (run, params), the run
        labelled with the parameters and the scenario's first docstring line."""
        params = self.resolve(overrides)
        with _memory_as_error(self.name, "building the run"):
            run = self.function(**params)
        if not isinstance(run, Runnable):
            raise ParameterError(
                f"scenario {self.name!r} must return a measureflow.Simulation or another run (see "
                f"measureflow.scenario.Runnable); it returned {type(run).__name__}"
            )
        run = run.with_options(parameters={**params, **run.parameters},
                               description=run.description or self.doc.split("\n")[0])
        return run, params

    def run(self, overrides: dict | None = None, *, resume: bool = False, progress: bool | None = None,
            restart: bool = False, overwrite: bool = False, compile: bool = False):
        """Build, run (with a checkpoint beside any H5MD output) and report; returns the Result, or
        None when ``resume`` finds the run already completed in its file.

        An existing output file is replaced only when the new run ends (it is written beside it), and
        ``resume`` continues only a file it can verify, refusing another run's finished file unless
        ``overwrite`` (``restart`` starts over and drops the checkpoint)
        (:func:`measureflow.io.outputs.plan_output` has the table); a second process writing the same
        output is refused before any work. ``compile``: the run's steps compiled
        (``Simulation(compile=True)``; refused in one line where the run has no such steps)."""
        simulation, params = self.build(overrides)
        if progress is not None:
            simulation = simulation.with_options(progress=progress)
        if compile:
            from .simulation import Simulation  # the core's run engine: imported when asked for

            if not isinstance(simulation, Simulation):
                raise ParameterError(f"scenario {self.name!r}: --compile compiles a Simulation's solver steps; this "
                                     f"scenario runs a {type(simulation).__name__}, which has none")
            simulation = simulation.with_options(compile=True)
        h5_path = output_path(simulation)
        for name, path in output_files(self.parameters, params).items():
            # Made before the run, as the output file's folder is: the report writes there afterwards.
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ParameterError(f"scenario {self.name!r}: {name}: cannot create the folder of {path!r} "
                                     f"({exc.strerror or exc})") from None
        simulation = with_run_checkpoint(simulation, resume=resume and not restart)
        lock = None
        if h5_path is not None:
            from .io.lock import OutputLock
            from .io.outputs import DONE, plan_output

            lock = OutputLock(h5_path).acquire()
        try:
            if h5_path is not None:
                fingerprint = simulation.fingerprint() if callable(getattr(simulation, "fingerprint", None)) else ""
                plan = plan_output(h5_path, simulation.checkpoint_path, fingerprint, resume=resume,
                                   restart=restart, overwrite=overwrite)
                if plan == DONE:
                    print(f"{h5_path}: already completed; nothing to resume", file=sys.stderr)
                    return None
            result = simulation.run()
        finally:
            if lock is not None:
                lock.release()
        if result.status.ok and simulation.checkpoint_path is not None:
            simulation.checkpoint_path.unlink(missing_ok=True)
        print(f"{self.name}: {result.status} in {result.wall_time:.2f} s", file=sys.stderr)
        if self._report is not None:
            try:
                self._report(result, params)
            except OSError as exc:  # e.g. a picture on a file system that refuses it
                raise ParameterError(f"scenario {self.name!r}: the run ended ({result.status.code}) but its report "
                                     f"could not write {exc.filename or 'a file'}: {exc.strerror or exc}") from None
        return result

    def __call__(self, **overrides):
        """Build the Simulation with these parameters (no run)."""
        return self.build(overrides)[0]

    def main(self, argv=None) -> int:
        """Command-line entry used by ``python scenario.py`` (same options as ``measureflow run``)."""
        parser = argparse.ArgumentParser(prog=Path(sys.argv[0]).name, description=self.doc or None)
        add_run_arguments(parser)
        args = parser.parse_args(argv)
        try:
            return run_from_args(self, args)
        except MeasureflowError as exc:
            # Same behaviour as `measureflow run`: a message that names the problem, no traceback.
            print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
            raise SystemExit(2) from None

    def describe(self, values: dict | None = None) -> str:
        """The scenario's first docstring line and its parameters (type, rules, value: ``values``,
        e.g. :meth:`resolve`'s, or the defaults)."""
        lines = [f"{self.name}: {self.doc.splitlines()[0] if self.doc else ''}".rstrip()]
        for p in self.parameters.values():
            value = p.default if values is None else values.get(p.name, p.default)
            lines.append(f"  {p.name} ({p.describe()}) = {value!r}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Scenario({self.name!r}, parameters={list(self.parameters)})"


@contextlib.contextmanager
def _memory_as_error(name: str, doing: str):
    """An allocation the machine cannot satisfy becomes one ParameterError line: the sizes asked
    for are the user's to change. (Absurd sizes are refused earlier, by the parameters' rules.)"""
    try:
        yield
    except MemoryError as exc:
        raise ParameterError(f"scenario {name!r}: out of memory while {doing} ({exc or 'MemoryError'}); "
                             "pass smaller sizes") from None
    except RuntimeError as exc:
        text = str(exc)
        if "can't allocate memory" not in text and "out of memory" not in text.lower():
            raise
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise ParameterError(f"scenario {name!r}: out of memory while {doing} ({first[:200]}); "
                             "pass smaller sizes") from None


def scenario(function: Callable | None = None, *, name: str | None = None):
    """Decorator turning a parameterised function into a :class:`Scenario`."""
    if function is None:
        return lambda f: Scenario(f, name=name)
    return Scenario(function, name=name)


def parse_assignments(items, scenario_name: str = "?") -> dict:
    """``["n=10", "out=a.h5"]`` → ``{"n": "10", "out": "a.h5"}`` (conversion happens in resolve)."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise ParameterError(f"scenario {scenario_name!r}: --set expects key=value, received {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="override a scenario parameter (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint beside the output file (nothing to do when the file "
                             "holds this run, completed)")
    parser.add_argument("--restart", action="store_true",
                        help="start over: drop the checkpoint and replace the output file")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --resume: replace a finished output of other parameters instead of refusing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--compile", action="store_true",
                        help="compile each solver step (Simulation(compile=True): explicit Runge–Kutta runs; worth "
                             "it for small networks and few particles; recorded in the file, so resume with it too)")
    parser.add_argument("--params", action="store_true",
                        help="list the scenario's parameters (with the --set values, checked) and exit")


def run_from_args(scn: Scenario, args) -> int:
    overrides = parse_assignments(args.assignments, scn.name)
    if args.params:
        # With --set: the values the run would use, checked (a bad one is the run's own error line).
        print(scn.describe(scn.resolve(overrides)))
        return 0
    result = scn.run(overrides, resume=args.resume, progress=False if args.no_progress else None,
                     restart=args.restart, overwrite=args.overwrite, compile=getattr(args, "compile", False))
    if result is None:
        return 0
    return 0 if result.status.ok else 3


def load_scenarios(path: str | Path) -> dict[str, Scenario]:
    """Import a scenario file (without running its ``__main__`` block) and return its scenarios."""
    path = Path(path)
    if not path.is_file():
        raise ParameterError(f"scenario file {str(path)!r} does not exist")
    module_name = f"measureflow_scenario_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ParameterError(f"cannot import {str(path)!r} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    found = {obj.name: obj for obj in vars(module).values() if isinstance(obj, Scenario)}
    if not found:
        raise ParameterError(f"{str(path)!r} defines no @measureflow.scenario function")
    return found


def choose_scenario(scenarios: dict[str, Scenario], path, name: str | None = None) -> Scenario:
    """The scenario named ``name`` among a file's ``scenarios``, or the file's only one."""
    if name is not None:
        if name not in scenarios:
            raise MeasureflowError(f"{path} has no scenario named {name!r}; it defines: {', '.join(scenarios)}")
        return scenarios[name]
    if len(scenarios) == 1:
        (only,) = scenarios.values()
        return only
    raise MeasureflowError(f"{path} defines several scenarios ({', '.join(scenarios)}); pick one with --name")


def output_path(run) -> Path | None:
    """The run's output file: the path of its first writer that has one (None if none)."""
    for writer in run.writers:
        path = getattr(writer, "path", None)
        if path is not None:
            return Path(path)
    return None


def with_run_checkpoint(run, path=None, *, resume: bool = False):
    """``run`` with the checkpoint a scenario run keeps: ``path``, else its own, else
    ``<file>.ckpt`` beside its output file, saved every tenth of the run; resumed from when
    ``resume`` and the file exists. The output file's folder is created."""
    h5_path = output_path(run)
    if path is None:
        path = run.checkpoint_path
    if path is None and h5_path is not None:
        path = Path(str(h5_path) + ".ckpt")
    if h5_path is not None:
        Path(h5_path).parent.mkdir(parents=True, exist_ok=True)
    if path is None:
        return run
    return run.with_checkpoint(path, every=max(1, run.n_steps // 10), resume=bool(resume))

