"""Rules for scenario parameters, checked before a scenario builds anything.

A scenario declares what each parameter accepts in its annotation, with :data:`typing.Annotated`::

    from measureflow.parameters import Count, OneOf, Picture, Points, Positive

    @scenario
    def relax(n: Points = 2000, steps: Count = 100, t1: Annotated[float, Positive()] = 2.0,
              field: Annotated[str, OneOf("linear", "ornstein_uhlenbeck")] = "linear",
              picture: Picture = "runs/relax.png") -> Simulation: ...

:meth:`measureflow.scenario.Scenario.resolve` converts every value to its declared type and applies
the rules, so a bad ``--set`` ends in one :class:`~measureflow.errors.ParameterError` line before
any allocation, sampling or run. Without an annotated rule a parameter still gets its type's rule:

* ``int``: a whole number ≥ 0 (counts, sizes, seeds, thread numbers); a bool is not an integer.
  Declare ``Annotated[int, AtLeast(-k)]`` for a signed one. Every int fits in 64 bits.
* ``float``: a finite number (not nan or inf); a bool is not a number.
* ``bool`` and ``str``: of that type.

The messages come from :mod:`measureflow.validators`, so they read like every other parameter error.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Annotated, Any

import attrs

from .errors import ParameterError
from .validators import check_finite, check_int, check_nonnegative, check_positive, check_probability

__all__ = [
    "Rule",
    "AtLeast",
    "Range",
    "Positive",
    "NonNegative",
    "Probability",
    "OneOf",
    "Size",
    "OutputFile",
    "Count",
    "Points",
    "Steps",
    "Threads",
    "Picture",
    "PositiveFloat",
    "rules_of",
    "effective_rules",
    "check_value",
    "available_memory",
    "check_writable_path",
    "output_files",
]


class Rule:
    """What a parameter accepts: :meth:`check` returns the value (converted) or raises
    :class:`~measureflow.errors.ParameterError`; :meth:`describe` is shown by ``--params``."""

    def check(self, value, name: str, where: str, params: dict):  # pragma: no cover - abstract by contract
        return value

    def describe(self) -> str:
        return ""


@attrs.frozen
class AtLeast(Rule):
    """A number ≥ ``minimum`` (an int parameter: a whole number)."""

    minimum: float

    def check(self, value, name, where, params):
        if isinstance(value, numbers.Integral):
            return check_int(value, name, where, minimum=int(math.ceil(self.minimum)))
        out = check_finite(value, name, where)
        if out < self.minimum:
            raise ParameterError(f"{where}: {name} must be ≥ {self.minimum:g}; received {value!r}")
        return out

    def describe(self) -> str:
        return f"≥ {self.minimum:g}"


@attrs.frozen
class Range(Rule):
    """A number in [``minimum``, ``maximum``] (an int parameter: a whole number); for counts whose
    cost grows faster than memory can say (network depth, inner iterations). ``open_below``: in
    (``minimum``, ``maximum``], the minimum itself refused (an exponent whose limit is another model)."""

    minimum: float
    maximum: float
    open_below: bool = False

    def check(self, value, name, where, params):
        out = AtLeast(self.minimum).check(value, name, where, params)
        if self.open_below and out == self.minimum:
            raise ParameterError(f"{where}: {name} must be greater than {self.minimum:g}; received {value!r}")
        if out > self.maximum:
            raise ParameterError(f"{where}: {name} must be at most {self.maximum:g}; received {value!r}")
        return out

    def describe(self) -> str:
        return f"in {'(' if self.open_below else '['}{self.minimum:g}, {self.maximum:g}]"


@attrs.frozen
class Positive(Rule):
    """A finite number > 0 (and ≤ ``maximum`` when given: a scale whose square or exponential the
    scenario computes)."""

    maximum: float | None = None

    def check(self, value, name, where, params):
        out = check_positive(value, name, where)
        if self.maximum is not None and out > self.maximum:
            raise ParameterError(f"{where}: {name} must be at most {self.maximum:g}; received {value!r}")
        return int(out) if isinstance(value, numbers.Integral) else out

    def describe(self) -> str:
        return "> 0" if self.maximum is None else f"in (0, {self.maximum:g}]"


@attrs.frozen
class NonNegative(Rule):
    """A finite number ≥ 0."""

    def check(self, value, name, where, params):
        out = check_nonnegative(value, name, where)
        return int(out) if isinstance(value, numbers.Integral) else out

    def describe(self) -> str:
        return "≥ 0"


@attrs.frozen
class Probability(Rule):
    """A number in [0, 1] (in (0, 1) with ``open_interval``)."""

    open_interval: bool = False

    def check(self, value, name, where, params):
        return check_probability(value, name, where, open_interval=self.open_interval)

    def describe(self) -> str:
        return "in (0, 1)" if self.open_interval else "in [0, 1]"


@attrs.frozen
class OneOf(Rule):
    """One of the listed values."""

    choices: tuple = attrs.field(converter=tuple)

    def __init__(self, *choices):
        self.__attrs_init__(choices)

    def check(self, value, name, where, params):
        if value not in self.choices:
            raise ParameterError(
                f"{where}: {name} must be one of {', '.join(map(str, self.choices))}; received {value!r}"
            )
        return value

    def describe(self) -> str:
        return "one of " + "|".join(map(str, self.choices))


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (MemAvailable on Linux, else the physical
    memory), or None where neither can be read."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@attrs.frozen
class Size(Rule):
    """A number of points (≥ ``minimum``) whose arrays must fit in memory: ``value`` × the values of
    the parameters named in ``times`` × ``bytes_each`` is compared with the memory available before
    anything is allocated. ``bytes_each`` is a floor on what one point costs (its coordinates in
    float64 and the run's working copies), so only an absurd request is refused here; a run that is
    merely too large still reports the allocator's failure as one line."""

    minimum: int = 1
    bytes_each: int = 64
    times: tuple = ()

    def check(self, value, name, where, params):
        value = check_int(value, name, where, minimum=self.minimum)
        count = value
        for other in self.times:
            factor = params.get(other)
            if isinstance(factor, numbers.Integral) and not isinstance(factor, bool) and factor > 0:
                count *= int(factor)
        need, have = count * self.bytes_each, available_memory()
        if have is not None and need > have:
            scale = f" × {' × '.join(self.times)}" if self.times else ""
            raise ParameterError(
                f"{where}: {name} = {value}{scale} needs at least {_bytes(need)} but {_bytes(have)} of memory is "
                f"available; pass a smaller {name}"
            )
        return value

    def describe(self) -> str:
        return f"≥ {self.minimum}, fits in memory"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PiB"  # pragma: no cover


@attrs.frozen
class OutputFile(Rule):
    """A path the run will write after it ends (a picture): its suffix is one of ``suffixes``, it
    is not a directory, and its folder exists or can be created (the runner creates it before the
    run, as it does the ``out`` file's), so a bad path fails before the run and not after it. The
    empty string means "write nothing" when ``optional``. The check itself creates nothing."""

    suffixes: tuple = attrs.field(converter=tuple)
    optional: bool = True

    def __init__(self, *suffixes, optional: bool = True):
        self.__attrs_init__(suffixes, optional)

    def check(self, value, name, where, params):
        if not isinstance(value, str):
            raise ParameterError(f"{where}: {name} must be a file path (a string); received {value!r}")
        if value == "" and self.optional:
            return value
        path = Path(value)
        if self.suffixes and path.suffix.lower() not in self.suffixes:
            raise ParameterError(
                f"{where}: {name} must end in {', '.join(self.suffixes)}; received {value!r}"
                + (" (or pass an empty value to write none)" if self.optional else "")
            )
        check_writable_path(path, f"{where}: {name}", create=True)
        return value

    def describe(self) -> str:
        return "file " + "|".join(self.suffixes) + (" or empty" if self.optional else "")


def check_writable_path(path, where: str, *, create: bool = False) -> None:
    """Refuse ``path`` when it is a directory, or its folder is not a writable folder. With
    ``create`` a missing folder is fine when its nearest existing ancestor is a writable folder (the
    caller creates it before writing); without, the folder must exist."""
    path = Path(path)
    if path.is_dir():
        raise ParameterError(f"{where}: {str(path)!r} is a directory; give a file name")
    folder = path.parent
    probe = folder
    while create and not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.exists():
        raise ParameterError(f"{where}: cannot write {str(path)!r}: the folder {str(folder)!r} does not exist; "
                             "create it first or choose another path")
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        what = "is not a folder" if not probe.is_dir() else "cannot be written"
        raise ParameterError(f"{where}: cannot write {str(path)!r}: {str(probe)!r} {what}")


def output_files(parameters: dict, values: dict) -> dict:
    """``{name: path}`` of the parameters declared :class:`OutputFile` that have a path."""
    return {name: values[name] for name, param in parameters.items()
            if values.get(name) and any(isinstance(rule, OutputFile) for rule in param.rules)}


# -- the common annotations ----------------------------------------------------------------------------------

#: A number of steps, frames or iterations: a whole number ≥ 1.
Count = Annotated[int, AtLeast(1)]
#: A number of points or particles: ≥ 1 and small enough to allocate.
Points = Annotated[int, Size()]
#: A number of time steps: ≥ 1, and a time grid that fits in memory.
Steps = Annotated[int, Size(bytes_each=64)]
#: A number of CPU threads: 0 for the default, else at most 1024.
Threads = Annotated[int, Range(0, 1024)]
#: A finite float > 0 (a time, a bandwidth, a scale).
PositiveFloat = Annotated[float, Positive()]
#: A picture written after the run: .png, .pdf or .svg in a folder that exists or can be made, or "" for none.
Picture = Annotated[str, OutputFile(".png", ".pdf", ".svg")]

_DEFAULT_RULES: dict[type, Rule] = {int: AtLeast(0)}


def rules_of(annotation) -> tuple[Any, tuple[Rule, ...]]:
    """(the plain type, its rules) of a parameter annotation, ``Annotated`` or not."""
    metadata = getattr(annotation, "__metadata__", None)
    if metadata is None:
        return annotation, ()
    return annotation.__origin__, tuple(m for m in metadata if isinstance(m, Rule))


def effective_rules(kind, rules: tuple) -> tuple:
    """The rules a value of ``kind`` is checked by: ``rules``, or the type's default rule."""
    if not rules and kind in _DEFAULT_RULES:
        return (_DEFAULT_RULES[kind],)
    return tuple(rules)


def check_value(kind, rules: tuple, value, name: str, where: str, params: dict):
    """``value`` of the declared ``kind`` (int, float, bool, str; an int is accepted for a float),
    through ``rules`` (or the type's default rule); raises ParameterError otherwise."""
    if kind is bool:
        if not isinstance(value, bool):
            raise ParameterError(f"{where}: {name} must be true or false; received {value!r}")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ParameterError(f"{where}: {name} must be a whole number; received {value!r}")
        value = int(value)
        if not -(2**63) <= value < 2**63:  # torch (seeds, sizes, thread counts) takes 64-bit integers
            raise ParameterError(f"{where}: {name} must fit in a 64-bit integer; received {value}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ParameterError(f"{where}: {name} must be a number; received {value!r}")
        value = float(value)
        if not rules:
            value = check_finite(value, name, where)
    elif kind is str:
        if not isinstance(value, str):
            raise ParameterError(f"{where}: {name} must be a string; received {value!r}")
    for rule in effective_rules(kind, rules):
        value = rule.check(value, name, where, params)
    return value
