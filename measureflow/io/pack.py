"""A writer for a batch of stacked runs: each run's writer receives its own block of replicas."""

from __future__ import annotations

import numpy as np

from ..errors import MeasureflowError
from ..state import Particles
from .base import Writer
from .runinfo import RunInfo, run_fingerprint

__all__ = ["PackWriter"]


class PackWriter(Writer):
    """Hands each run's writer its block of replicas of a batch (:meth:`measureflow.Simulation.stack`).

    ``writers[i]`` is run i's writer, ``parameters[i]`` its ``Simulation.run_parameters()``, and
    ``states[i]`` its own initial state: the template whose shape and weights its block takes. Each
    writer is opened with its own run's description, so each run's file is the one it writes alone.
    """

    def __init__(self, writers, parameters, states):
        self.writers = list(writers)
        self.parameters = list(parameters)
        self.states = list(states)
        self.trigger = self.writers[0].trigger
        ends = np.cumsum([s.replicas for s in self.states])
        self.blocks = list(zip([0, *ends[:-1].tolist()], ends.tolist()))
        self.total = int(ends[-1])

    def open(self, run: RunInfo) -> None:
        opened = []
        try:
            for writer, params, state in zip(self.writers, self.parameters, self.states):
                writer.open(RunInfo.from_state(state, parameters=params, observable_names=run.observable_names,
                                               observable_shapes=self._block_shapes(run, state),
                                               resume_step=run.resume_step,
                                               fingerprint=run_fingerprint(params)))
                opened.append(writer)
        except BaseException:
            for writer in opened:
                writer.close()
            raise

    def _block_shapes(self, run: RunInfo, state) -> dict:
        # Observables are (R, ...) per sample: a block holds its own replicas.
        return {name: (state.replicas, *shape[1:]) for name, shape in run.observable_shapes.items()
                if len(shape) >= 1 and shape[0] == self.total}

    def write_frame(self, step: int, time: float, state) -> None:
        for writer, template, (a, b) in zip(self.writers, self.states, self.blocks):
            if isinstance(state, Particles):
                part = template.with_positions(state.x[a:b])
            else:
                part = template.with_parameters(state.mean[a:b], state.cov[a:b])
            writer.write_frame(step, time, part)

    def write_observables(self, step: int, time: float, values: dict) -> None:
        for name, value in values.items():
            if getattr(value, "ndim", 0) < 1 or value.shape[0] != self.total:
                raise MeasureflowError(
                    f"observable {name!r} has shape {tuple(getattr(value, 'shape', ()))}; a packed batch splits "
                    f"observables per replica and needs shape (R, ...) with R = {self.total}"
                )
        for writer, (a, b) in zip(self.writers, self.blocks):
            writer.write_observables(step, time, {name: value[a:b] for name, value in values.items()})

    def set_status(self, status: str, step: int, time: float, message: str = "") -> None:
        for writer in self.writers:
            writer.set_status(status, step, time, message)

    def flush(self) -> None:
        for writer in self.writers:
            writer.flush()

    def close(self) -> None:
        errors = []
        for writer in self.writers:
            try:
                writer.close()
            except Exception as exc:  # noqa: BLE001 - close every file, then report
                errors.append(exc)
        if errors:
            raise errors[0]
