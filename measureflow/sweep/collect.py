"""Reading a sweep back: a table of parameters × final observables, and a picture of one against
the other (``measureflow collect DIR``, ``measureflow plot DIR --x key --y observable``).

The table has one row per run of the index ``DIR/sweep.json``, in the index's order. Its columns
are the parameters that vary across the runs (those every run shares are listed once, above the
printed table), ``label`` (the seed label), ``status``, ``wall_time``, then every final observable
any run recorded (empty where a run has none), and ``file``. ``collect`` prints it and writes it as
CSV (default ``DIR/sweep.csv``).

The picture draws the ``--y`` observable against the ``--x`` parameter for the completed runs:
each run a faint dot, and per x value the mean over seeds with ±1 standard deviation; one line for
every combination of the other varying parameters. Numeric x values are placed by value, others in
order of first appearance; the x axis is logarithmic when its values are positive and span a
decade or more, the y axis when its values are positive and span more than three decades.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from ..errors import MeasureflowError
from .grid import SweepIndex

__all__ = ["SweepTable", "sweep_table", "plot_sweep"]

# Not table columns: the derived seed (the label stands for it) and where a run wrote or ran.
UNLISTED_PARAMETERS = ("seed", "out", "picture", "device")


class SweepTable:
    """Rows of a sweep (dicts), the varying parameter names, the shared ones and the observables."""

    def __init__(self, rows: list[dict], varying: list[str], shared: dict, observables: list[str]):
        self.rows = rows
        self.varying = varying
        self.shared = shared
        self.observables = observables

    @property
    def columns(self) -> list[str]:
        return [*self.varying, "label", "status", "wall_time", *self.observables, "file"]

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: _csv_cell(row.get(k)) for k in self.columns})
        return buffer.getvalue()

    def format(self) -> str:
        """An aligned text table (numbers with 6 significant digits)."""
        columns = self.columns
        cells = [[_cell(row.get(c)) for c in columns] for row in self.rows]
        widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
        lines = []
        if self.shared:
            lines.append("shared: " + ", ".join(f"{k}={v}" for k, v in self.shared.items()))
        lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
        for row in cells:
            lines.append("  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(row, widths)))
        return "\n".join(lines)


#: First characters that make a spreadsheet read a cell as a formula (OWASP "CSV injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value):
    """A CSV cell no spreadsheet reads as a formula: text starting with = + - @ tab or CR gets a
    leading apostrophe; numbers (and text that is a number, such as -1.5) stay numbers."""
    if value is None:
        return ""
    if isinstance(value, (bool, int, float)):
        return value
    text = str(value)
    if text.startswith(FORMULA_STARTS) and not _numeric(text):
        return "'" + text
    return text


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def sweep_table(directory) -> SweepTable:
    """The table of the sweep in ``directory`` (see the module docstring)."""
    index = SweepIndex.load(directory)
    records = list(index.runs.values())
    if not records:
        raise MeasureflowError(f"{index.path}: the sweep has no runs yet")
    names: list[str] = []
    for record in records:
        names += [k for k in record.get("parameters", {}) if k not in names and k not in UNLISTED_PARAMETERS]
    varying, shared = [], {}
    for name in names:
        values = {repr(r.get("parameters", {}).get(name)) for r in records}
        if len(values) > 1:
            varying.append(name)
        else:
            shared[name] = records[0]["parameters"].get(name)
    observables: list[str] = []
    for record in records:
        observables += [k for k in record.get("observables") or {} if k not in observables]
    rows = []
    for record in records:
        row = {name: record.get("parameters", {}).get(name) for name in varying}
        status, observables = _file_status(index.directory, record)
        row.update(label=record.get("label"), status=status, wall_time=record.get("wall_time"),
                   file=record.get("file"))
        row.update(observables)
        rows.append(row)
    return SweepTable(rows, varying, shared, observables)


def _file_status(directory: Path, record: dict) -> tuple[str, dict]:
    """A run's status and final observables, checked against its file: the files are the authority,
    so a run the index calls completed whose file is missing, damaged or unfinished is not."""
    status = record.get("status")
    observables = record.get("observables") or {}
    if status != "completed":
        return status, observables
    from ..io.outputs import inspect_output  # h5py loads on first use

    report = inspect_output(Path(directory) / str(record.get("file")))
    if not report.exists:
        return "missing", {}
    if report.problem:
        return "damaged", {}
    if not report.completed:
        return report.status.code if report.status is not None else "unknown", {}
    return status, observables


def _position(values: list) -> tuple[np.ndarray, list | None]:
    """x positions of ``values``: the numbers themselves, or first-appearance order (with tick labels)."""
    try:
        return np.array([float(v) for v in values]), None
    except (TypeError, ValueError):
        order = list(dict.fromkeys(map(str, values)))
        return np.array([order.index(str(v)) for v in values], dtype=float), order


def plot_sweep(directory, x: str, y: str, out=None):
    """Draw observable ``y`` against parameter ``x`` (see the module docstring); returns the Figure."""
    from matplotlib.figure import Figure

    table = sweep_table(directory)
    if x not in table.varying:
        raise MeasureflowError(
            f"--x {x!r} is not a parameter that varies in this sweep; those that vary: "
            f"{', '.join(table.varying) or '(none)'}"
        )
    if y not in table.observables:
        raise MeasureflowError(
            f"--y {y!r} is not a final observable of this sweep; it has: {', '.join(table.observables) or '(none)'}"
        )
    rows = [r for r in table.rows if r["status"] == "completed" and r.get(y) is not None and r.get(x) is not None]
    if not rows:
        raise MeasureflowError(
            f"no completed run of this sweep has {y!r}; run `measureflow collect {directory}` to see their status"
        )
    others = [k for k in table.varying if k != x]
    positions, ticks = _position([r[x] for r in rows])
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(tuple(row.get(k) for k in others), []).append(i)
    values = np.array([float(r[y]) for r in rows])
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    for i, (combo, members) in enumerate(groups.items()):
        px, py = positions[members], values[members]
        colour = f"C{i % 10}"
        label = ", ".join(f"{k}={v}" for k, v in zip(others, combo)) or None
        ax.plot(px, py, "o", color=colour, alpha=0.3, markersize=4)
        xs = np.unique(px)
        means = np.array([py[px == p].mean() for p in xs])
        spread = np.array([py[px == p].std() for p in xs])
        ax.errorbar(xs, means, yerr=spread, color=colour, marker="s", markersize=5, capsize=3, label=label)
    if ticks is not None:
        ax.set_xticks(range(len(ticks)), ticks)
    elif positions.min() > 0 and positions.max() / positions.min() >= 10:
        ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"{y} against {x} ({len(rows)} runs; mean ± sd over seeds)")
    if len(groups) > 1:
        ax.legend(fontsize="small")
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 1e3:
        ax.set_yscale("log")
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    return fig
