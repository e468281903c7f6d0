"""Packing: the runs of one grid point — they differ only in seed — advanced as one batch.

Each run's Simulation is built exactly as it would be alone (:func:`measureflow.sweep.run.place`);
:meth:`measureflow.Simulation.stack` turns them into one Simulation that advances their initial
states stacked along the replica axis R (run i owns a block of consecutive replicas) on one device,
with each block's noise drawn from its own run's seed and each run's writers receiving their own
block of every frame, so each run's file is the one it writes alone (see
:mod:`measureflow.packing` for when runs stack). The batch checkpoints to its own file,
``DIR/pack-<key>.ckpt``, so a killed batch resumes as a batch.

:func:`run_pack` returns the runs' outcomes, or a sentence saying why the runs were not packed
(``Simulation.stack`` refused them, or building one raised) or why the batch's result cannot stand
for the separate runs (the batch failed, or a Gaussian step was split for the whole batch because
one replica needed it). The caller then runs them one by one; files the batch wrote are replaced.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..errors import MeasureflowError
from ..simulation import Simulation
from .run import final_observables, place, summarise

__all__ = ["run_pack"]

#: Batch statuses whose result stands for the separate runs (a stopped batch resumes as a batch).
STANDING_STATUSES = ("completed", "terminated", "time_budget")


def run_pack(scn, runs, device, dtype: str | None, checkpoint) -> list | str:
    """Advance ``runs`` as one batch checkpointing to ``checkpoint``; their outcomes, or why they
    were not (or must not be) packed (see the module docstring)."""
    start = time.monotonic()
    try:
        simulations = [place(scn, run, device, dtype) for run in runs]
    except Exception as exc:  # noqa: BLE001 - the runs alone will report it
        return f"building them raised {type(exc).__name__}: {exc}"
    try:
        batch = Simulation.stack(simulations)
    except MeasureflowError as exc:
        return str(exc)
    batch = batch.with_checkpoint(checkpoint, every=max(1, batch.n_steps // 10), resume=Path(checkpoint).exists())
    ends = np.cumsum([s.state.replicas for s in simulations]).tolist()
    blocks = list(zip([0, *ends[:-1]], ends))
    try:
        result = batch.run()
    except Exception as exc:  # noqa: BLE001
        Path(checkpoint).unlink(missing_ok=True)
        return f"the batch raised {type(exc).__name__}: {exc}"
    status = result.status
    if status.code not in STANDING_STATUSES:
        Path(checkpoint).unlink(missing_ok=True)
        return f"the batch ended {status}"
    if result.integrator_stats.get("rejected", 0):
        Path(checkpoint).unlink(missing_ok=True)
        return "the integrator split steps for the whole batch"
    if status.ok:
        Path(checkpoint).unlink(missing_ok=True)
        for run in runs:
            Path(run.file + ".ckpt").unlink(missing_ok=True)
    share = (time.monotonic() - start) / len(runs)
    return [summarise(run, status.code, status.message, share, str(device), len(runs),
                      final_observables(result.observables, slice(a, b)))
            for run, (a, b) in zip(runs, blocks)]
