"""What both trainings share: where they run, the default optimiser, and how many steps a run kept."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["default_device", "model_dtype", "default_optimizer", "steps_kept"]


def default_device(model) -> torch.device:
    """Where training runs when no device is given: the model's parameters' device, else CUDA when present."""
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_dtype(model) -> torch.dtype:
    """The dtype of the model's parameters (torch's default for a model without any)."""
    for p in model.parameters():
        return p.dtype
    return torch.get_default_dtype()


def default_optimizer(parameters, lr: float) -> torch.optim.Optimizer:
    """Adam with learning rate ``lr``, in its fused form (one kernel per parameter tensor) where the
    parameters' device and dtype support it, else the standard form. Same update rule; for the small
    networks of flow matching the per-tensor launches of the standard form are a large part of a
    step (about a quarter at batch 256 on one CPU thread; benchmarks/README.md)."""
    params = list(parameters)
    try:
        return torch.optim.Adam(params, lr=float(lr), fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.Adam(params, lr=float(lr))


def steps_kept(outcome) -> int:
    """How many steps of a finished run (a :class:`~measureflow.run.RunOutcome`) a result keeps: the
    steps done, and for a run that went bad only those before its first bad step (the loop may have
    advanced past it before its next health check)."""
    if outcome.status.code in ("nonfinite", "blowup"):
        return min(outcome.steps_done, max(0, outcome.status.step - 1))
    return outcome.steps_done
