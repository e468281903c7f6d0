"""What a run advances: the one interface the run loop drives.

A :class:`Process` is a sequence of steps 0 … n on a time grid: a simulation integrating a measure,
or a training loop taking optimiser steps. The loop (:func:`measureflow.run.run`) does everything
else — operations on their triggers, health and status, stop requests, checkpoints, writers — the
same way for all of them.
"""

from __future__ import annotations

import abc
from typing import Any

__all__ = ["Process"]


class Process(abc.ABC):
    """Base class of what a run advances (see the module docstring).

    Attributes: ``n_steps`` (the last step), ``label`` and ``unit`` (for the progress bar),
    ``checkpoint_format`` (the format tag its checkpoints carry).
    """

    n_steps: int
    label: str = "measureflow"
    unit: str = "step"
    checkpoint_format: str = "measureflow-checkpoint-1"

    @abc.abstractmethod
    def time_at(self, step: int) -> float:
        """The time of step ``step`` (computed from the step, never accumulated)."""

    def times(self) -> list[float]:
        """The whole grid t_0 … t_n."""
        return [self.time_at(k) for k in range(self.n_steps + 1)]

    @abc.abstractmethod
    def start(self) -> Any:
        """The state at step 0 of a fresh run."""

    @abc.abstractmethod
    def advance(self, state, step: int) -> Any:
        """The state at step + 1 from ``state`` at ``step``; raises StepFailure when it cannot."""

    def steps_at_once(self, step: int) -> int:
        """How many steps from ``step`` the process can take in one call of ``advance_steps(state,
        step, k) -> (state at step + k, largest |health| after each step)`` (k ≤ this); the loop
        takes several only where nothing is due in between. By default 1: one :meth:`advance` at a
        time (a process returning more must have ``advance_steps``)."""
        return 1

    @abc.abstractmethod
    def health(self, state):
        """A tensor that must stay finite (and under the run's blow-up bound): its largest |value|
        is recorded on the device every step."""

    def diagnose(self, bad_step: int, state, before=None) -> str:
        """Why the run went non-finite, for its status message: ``state`` is the non-finite state the
        loop holds (at ``bad_step`` or later), ``before`` the finite state one step before
        ``bad_step`` when the loop still has it (None otherwise). Called once, when the run stops;
        by default a generic sentence."""
        return "the state has non-finite values (NaN or inf)"

    def frame(self, state):
        """What a writer writes for ``state`` (a Particles or Gaussians); by default the state."""
        return state

    def observe_args(self) -> dict:
        """Keyword arguments observers receive besides the state and time (``field``, ``target``)."""
        return {}

    @abc.abstractmethod
    def run_info(self, state, observable_shapes: dict, resume_step: int | None):
        """What writers are told before the first frame (:class:`~measureflow.io.RunInfo`)."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A hash of what determines the run: a checkpoint with another fingerprint is refused."""

    @abc.abstractmethod
    def state_dict(self, state) -> dict:
        """Everything needed to continue from ``state`` (tensors on the host, numbers, strings)."""

    @abc.abstractmethod
    def load_state_dict(self, saved: dict):
        """The state saved by :meth:`state_dict`, restored (and the process's own run state)."""

    def stop_request(self):
        """A :class:`~measureflow.status.Status` when the last :meth:`advance` ended the run early
        (a terminal event: the returned state is at ``status.time``), else None."""
        return None

    def postfix(self, context) -> dict:
        """Live numbers for the progress bar (read on its refresh steps)."""
        return {}
