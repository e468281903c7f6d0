"""The run engine: one loop for simulations and training (DESIGN.md "run/").

* :class:`Process` — what a run advances (a simulation, a training loop);
* :class:`RunLoop` — the loop: operations on triggers, health and status, stop requests,
  checkpoints, writer lifecycle (:mod:`measureflow.run.loop` documents the per-step order);
* operations (:mod:`measureflow.run.operations`): :class:`Observer`, :class:`Record` (a writer),
  :class:`Checkpoint`, :class:`Callback`, :class:`Progress`;
* specs: :class:`StopPolicy`, :class:`Checkpointing`.
"""

from __future__ import annotations

from .health import Health
from .loop import RunContext, RunLoop, RunOutcome
from .specs import Checkpointing, StopPolicy, TimeGrid
from .operations import Callback, Checkpoint, Observer, Operation, Progress, Record, observer_list, progress_enabled
from .process import Process
from .signals import install_sigterm

from . import health, loop, operations, process, signals, specs

__all__ = [*process.__all__, *loop.__all__, *specs.__all__, *operations.__all__, *health.__all__, *signals.__all__]
