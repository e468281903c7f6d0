"""Training on the run loop: learned velocity fields (flow matching, MATH.md §1) and one-step
generators trained by Euler steps of a particle flow (MATH.md §9).

* :mod:`~measureflow.training.networks` — :class:`VelocityMLP` and :class:`GeneratorMLP`, one MLP builder;
* :mod:`~measureflow.training.velocity` — :func:`train_velocity`, :func:`regression_loss`,
  :func:`save_model` / :func:`load_model`, :func:`plot_loss`, :class:`TrainingResult`;
* :mod:`~measureflow.training.reflow` — :func:`reflow` (rectified flow: couple by the flow map, refit);
* :mod:`~measureflow.training.generator` — :func:`train_generator`, :class:`ResidualGenerator`,
  :class:`GeneratorResult`, :class:`GeneratorTraining` (a run a scenario returns).

Both trainings are :class:`~measureflow.run.Process` objects driven by :class:`~measureflow.run.RunLoop`:
one status vocabulary (:class:`~measureflow.status.Status`), SIGTERM and callbacks as stop requests,
checkpoints that resume bit for bit, progress bars, and a non-finite loss or monitor recorded as status
``nonfinite`` rather than raised.
"""

from __future__ import annotations

from .common import default_device, default_optimizer, model_dtype
from .generator import (
    MODES,
    GeneratorRecord,
    GeneratorResult,
    GeneratorTraining,
    GeneratorTrainingProcess,
    ResidualGenerator,
    generator_scenario,
    train_generator,
)
from .networks import GeneratorMLP, VelocityMLP
from .reflow import ReflowResult, ReflowRound, flow_map, reflow
from .velocity import (
    TrainingResult,
    VelocityTrainingProcess,
    load_model,
    plot_loss,
    regression_loss,
    save_model,
    train_velocity,
)

__all__ = [
    "VelocityMLP",
    "GeneratorMLP",
    "TrainingResult",
    "train_velocity",
    "regression_loss",
    "save_model",
    "load_model",
    "plot_loss",
    "reflow",
    "ReflowResult",
    "ReflowRound",
    "flow_map",
    "ResidualGenerator",
    "GeneratorResult",
    "GeneratorTraining",
    "train_generator",
    "generator_scenario",
    "MODES",
    "VelocityTrainingProcess",
    "GeneratorTrainingProcess",
    "GeneratorRecord",
    "default_device",
    "default_optimizer",
    "model_dtype",
]
