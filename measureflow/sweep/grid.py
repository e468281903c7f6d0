"""Planning a sweep: a scenario over a parameter grid × seeds, one H5MD file per run (DESIGN.md
"Sweeps and distribution"), and the sweep's index.

    measureflow sweep scenarios/relaxation.py --grid n=100,1000 --grid t1=1,2 --seeds 0-9 --out runs/grid

expands into 2 × 2 × 10 runs. What this module fixes:

* **A run** is the scenario with fully resolved parameters. Its key is the first 16 hex digits of
  the sha256 of the canonical JSON (sorted keys, no spaces) of ``{"scenario": name, "parameters":
  ...}`` without the output parameters ``out``, ``picture`` and ``device`` (plus ``"dtype"`` when
  ``--dtype`` is given to a scenario without a ``dtype`` parameter). The run writes ``DIR/<key>.h5``
  (the sweep sets ``out``; ``picture`` is set to "" so no picture is drawn per run; reports are not
  called).
* **Seeds.** ``--seeds 0-9`` labels ten replicas of each grid point. The ``seed`` a run receives
  is derived by a hash from the sweep seed (``--sweep-seed``, default 0), the scenario's name, the
  run's other parameters and the label, so a run's numbers do not depend on the executor, on the
  order of execution, or on which other runs share the sweep.
* **The index** ``DIR/sweep.json`` records for each run its parameters, file, status, wall time,
  final observables and error. Only the driver writes it, atomically (temporary file, fsync,
  rename), at most once a second while runs finish and once at the end; the files stay the
  authority, so an index that missed the last second of a killed sweep is repaired on the next
  run from the files' recorded status.
* **Re-running** the same command skips runs whose file is completed, resumes interrupted ones
  from the checkpoint beside their file, and runs the rest. A failing run is recorded with its
  error and does not stop the others; it is attempted again by the next invocation.

This module plans a sweep and keeps its index; :mod:`measureflow.sweep.driver` runs it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import re
import time
from pathlib import Path
from typing import Iterable

import attrs
import torch

from ..errors import MeasureflowError, ParameterError
from ..io.atomic import atomic_replace
from ..jsonable import to_jsonable

__all__ = [
    "parse_grid",
    "parse_seeds",
    "check_dtype",
    "check_device",
    "run_key",
    "derive_seed",
    "RunSpec",
    "check_sweepable",
    "plan_runs",
    "SweepIndex",
    "write_atomic",
    "now",
    "INDEX_NAME",
    "OUTPUT_PARAMETERS",
]

INDEX_NAME = "sweep.json"
INDEX_FORMAT = "measureflow-sweep-1"
#: Parameters that say where a run writes or runs, not what it computes: left out of the key.
OUTPUT_PARAMETERS = ("out", "picture", "device")
#: Index writes while runs finish are at least this many seconds apart.
INDEX_INTERVAL = 1.0
DTYPES = ("float16", "bfloat16", "float32", "float64")


# ------------------------------------------------------------------------------------------------
# the command-line vocabulary


def parse_grid(items: Iterable[str]) -> dict[str, list[str]]:
    """``["n=10,100", "t1=1,2"]`` → ``{"n": ["10", "100"], "t1": ["1", "2"]}`` (values converted
    later, by the scenario's declared types)."""
    grid: dict[str, list[str]] = {}
    for item in items or ():
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ParameterError(f"--grid expects key=v1,v2,…; received {item!r}")
        if key in grid:
            raise ParameterError(f"--grid {key}=… is given twice; list all its values in one --grid {key}=v1,v2,…")
        grid[key] = [v.strip() for v in values.split(",") if v.strip()]
        if not grid[key]:
            raise ParameterError(f"--grid {item!r} lists no values; write --grid {key}=v1,v2,…")
    return grid


def parse_seeds(text: str | int | Iterable[int]) -> list[int]:
    """Seed labels: ``"0-9"``, ``"0,3,7"``, ``"0-4,10-12"`` or a count-free iterable of ints."""
    if isinstance(text, int):
        return [text]
    if not isinstance(text, str):
        return sorted({int(v) for v in text})
    labels: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise ParameterError(f"--seeds {text!r}: {part!r} is neither a number nor a range a-b (e.g. 0-9 or 0,3,7)")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise ParameterError(f"--seeds {text!r}: the range {part!r} runs backwards; write {last}-{first}")
        labels.update(range(first, last + 1))
    if not labels:
        raise ParameterError(f"--seeds {text!r} names no seed; write e.g. 0-9")
    return sorted(labels)


def check_dtype(dtype: str | None) -> str | None:
    if dtype is None or dtype == "":
        return None
    if dtype not in DTYPES:
        raise ParameterError(f"--dtype {dtype!r} is not a floating-point dtype; use one of {', '.join(DTYPES)}")
    return dtype


def check_device(device: str) -> str:
    """Validate the spelling of ``--device`` (whether the device exists is checked where runs execute)."""
    if device == "auto":
        return device
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ParameterError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N")
    return device


# ------------------------------------------------------------------------------------------------
# keys and seeds


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)


def _digest(value) -> bytes:
    return hashlib.sha256(_canonical(value).encode()).digest()


def run_key(scenario: str, parameters: dict, dtype: str | None = None) -> str:
    """The stable key of a run (and the stem of its file): see the module docstring."""
    identity = {
        "scenario": scenario,
        "parameters": {k: v for k, v in parameters.items() if k not in OUTPUT_PARAMETERS},
    }
    if dtype is not None:
        identity["dtype"] = dtype
    return _digest(identity).hex()[:16]


def derive_seed(sweep_seed: int, scenario: str, parameters: dict, label: int) -> int:
    """The ``seed`` of the run labelled ``label`` at this grid point: a 32-bit hash of the sweep
    seed, the scenario, the run's parameters (other than seed and outputs) and the label."""
    point = {k: v for k, v in parameters.items() if k not in OUTPUT_PARAMETERS and k != "seed"}
    digest = _digest({"sweep_seed": int(sweep_seed), "scenario": scenario, "parameters": point, "label": int(label)})
    return int.from_bytes(digest[:4], "little")


# ------------------------------------------------------------------------------------------------
# runs


@attrs.frozen
class RunSpec:
    """One run of a sweep.

    ``parameters`` are the scenario's resolved parameters (JSON values), with the derived
    ``seed`` and ``out`` = ``file``; ``label`` is the seed label from ``--seeds``; ``point`` is
    the key of the grid point (the parameters without the seed), shared by the runs that may be
    packed together.
    """

    key: str = attrs.field(validator=attrs.validators.matches_re(r"[0-9a-f]{16}"))
    parameters: dict = attrs.field(eq=False)
    label: int = attrs.field(converter=int)
    file: str
    point: str


def check_sweepable(scn, grid: dict, fixed: dict) -> None:
    """Refuse a scenario without ``out``/``seed`` parameters, and grid or fixed values for them."""
    params = scn.parameters
    missing = [name for name, kind in (("out", str), ("seed", int))
               if name not in params or params[name].type is not kind]
    if missing:
        have = ", ".join(f"{p.name}: {getattr(p.type, '__name__', p.type)}" for p in params.values()) or "(none)"
        raise ParameterError(
            f"scenario {scn.name!r} cannot be swept: a sweepable scenario declares `out: str` (the H5MD file "
            f"each run writes, set by the sweep) and `seed: int` (set per run from --seeds); it lacks "
            f"{' and '.join(missing)} (its parameters: {have})"
        )
    for source, values in (("--grid", grid), ("--set", fixed)):
        for name in ("out", "seed"):
            if name in values:
                what = "the sweep names each run's file DIR/<key>.h5" if name == "out" else "seeds come from --seeds"
                raise ParameterError(f"{source} {name}=… is not allowed in a sweep: {what}")


def plan_runs(scn, grid: dict, labels: list[int], directory: Path, *, fixed: dict | None = None,
              sweep_seed: int = 0, dtype: str | None = None) -> list[RunSpec]:
    """Expand grid × seed labels into runs (grid in the order given, labels innermost; duplicates dropped)."""
    fixed = dict(fixed or {})
    check_sweepable(scn, grid, fixed)
    directory = Path(directory).absolute()
    if dtype is not None and "dtype" in scn.parameters:
        fixed["dtype"] = dtype
    key_dtype = dtype if dtype is not None and "dtype" not in scn.parameters else None
    if "picture" in scn.parameters:
        fixed["picture"] = ""
    names = list(grid)
    runs, seen = [], set()
    for values in itertools.product(*(grid[n] for n in names)):
        resolved = scn.resolve({**fixed, **dict(zip(names, values))})
        resolved = to_jsonable(resolved, f"scenario {scn.name!r} parameters")
        point = run_key(scn.name, {k: v for k, v in resolved.items() if k != "seed"}, key_dtype)
        for label in labels:
            params = dict(resolved, seed=derive_seed(sweep_seed, scn.name, resolved, label))
            key = run_key(scn.name, params, key_dtype)
            if key in seen:
                continue
            seen.add(key)
            file = directory / f"{key}.h5"
            params["out"] = str(file)
            runs.append(RunSpec(key, params, label, str(file), point))
    return runs


# ------------------------------------------------------------------------------------------------
# the index


def now() -> str:
    """The current UTC time, to the second, as the index records it."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that readers see the old or the new file, never a torn one."""
    with atomic_replace(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


class SweepIndex:
    """``DIR/sweep.json``: the sweep's header and one record per run, keyed by run key.

    A record holds ``parameters``, ``label`` (seed label), ``file`` (relative to DIR),
    ``status`` (``pending``, ``completed``, ``failed`` or the run's own status: ``nonfinite``,
    ``blowup``, ``terminated`` …), ``message``, ``error`` (traceback of a failure),
    ``wall_time`` (seconds; a packed run gets its share of the pack's time), ``observables``
    (final values, see :func:`measureflow.sweep.run.final_observables`), ``device``, ``pack``
    (runs in its batch) and ``updated`` (UTC time).
    """

    def __init__(self, directory, header: dict | None = None, runs: dict | None = None):
        self.directory = Path(directory)
        self.path = self.directory / INDEX_NAME
        self.header = dict(header or {})
        self.runs: dict[str, dict] = dict(runs or {})
        self._saved_at = 0.0

    @classmethod
    def load(cls, directory, *, missing_ok: bool = False) -> "SweepIndex":
        directory = Path(directory)
        if directory.is_file() and directory.name == INDEX_NAME:
            directory = directory.parent
        path = directory / INDEX_NAME
        if not path.exists():
            if missing_ok:
                return cls(directory)
            raise MeasureflowError(
                f"{directory}: no sweep index ({INDEX_NAME}) there; give the --out directory of a "
                "`measureflow sweep` command"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MeasureflowError(
                f"{path}: cannot be read as a sweep index ({exc}); move it away and re-run the sweep"
            ) from exc
        if data.get("format") != INDEX_FORMAT:
            raise MeasureflowError(f"{path}: not a measureflow sweep index (format {data.get('format')!r})")
        return cls(directory, data.get("sweep", {}), data.get("runs", {}))

    def save(self, *, throttle: bool = False) -> None:
        if throttle and time.monotonic() - self._saved_at < INDEX_INTERVAL:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self.header["updated"] = now()
        text = json.dumps({"format": INDEX_FORMAT, "sweep": self.header, "runs": self.runs}, indent=1, allow_nan=True)
        write_atomic(self.path, text)
        self._saved_at = time.monotonic()

    def record(self, run: RunSpec, **fields) -> dict:
        entry = self.runs.setdefault(run.key, {})
        entry.update(parameters=run.parameters, label=run.label, file=Path(run.file).name)
        entry.setdefault("status", "pending")
        entry.update(fields)
        entry["updated"] = now()
        return entry

    def file_of(self, key: str) -> Path:
        return self.directory / self.runs[key]["file"]
