"""Sweeps: a scenario over a parameter grid × seeds, one H5MD file per run, resumable, on any
registered executor (DESIGN.md "Sweeps and distribution").

* :mod:`~measureflow.sweep.grid` — ``--grid``/``--seeds`` parsing, run keys and seeds, planning
  (:class:`RunSpec`), the index ``DIR/sweep.json`` (:class:`SweepIndex`);
* :mod:`~measureflow.sweep.run` — one run where an executor puts it: placement on a device,
  outcomes, final observables;
* :mod:`~measureflow.sweep.pack` — the runs of one grid point as one batch (``Simulation.stack``);
* :mod:`~measureflow.sweep.executors` — the :class:`Executor` interface and the ``serial`` executor;
* :mod:`~measureflow.sweep.driver` — :func:`run_sweep` and :func:`execute`, the function executors call;
* :mod:`~measureflow.sweep.collect` — the table and picture of a finished sweep.

Each module imports only those above it in this list (collect only ``grid``).
"""

from __future__ import annotations

from .grid import (
    INDEX_NAME,
    OUTPUT_PARAMETERS,
    RunSpec,
    SweepIndex,
    derive_seed,
    parse_grid,
    parse_seeds,
    plan_runs,
    run_key,
    write_atomic,
)
from .run import Job, Outcome, final_observables, place, resolve_device
from .pack import run_pack
from .executors import Executor, SerialExecutor, make_executor
from .driver import SweepReport, execute, run_sweep
from .collect import SweepTable, plot_sweep, sweep_table

__all__ = [
    "run_sweep",
    "SweepReport",
    "execute",
    "parse_grid",
    "parse_seeds",
    "run_key",
    "derive_seed",
    "RunSpec",
    "plan_runs",
    "SweepIndex",
    "write_atomic",
    "INDEX_NAME",
    "OUTPUT_PARAMETERS",
    "Job",
    "Outcome",
    "place",
    "resolve_device",
    "final_observables",
    "run_pack",
    "Executor",
    "SerialExecutor",
    "make_executor",
    "SweepTable",
    "sweep_table",
    "plot_sweep",
]

