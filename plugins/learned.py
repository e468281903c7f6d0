"""Learned velocity fields: a trained network used as a field (MATH.md §1, regression loss).

``learned``
    v_t(x) = v_θ(x, t) for a network trained by :func:`measureflow.training.train_velocity` (or any
    ``nn.Module`` with ``forward(x, t)`` mapping (..., d) to (..., d)). Given as ``model=`` (a
    module or a :class:`~measureflow.training.TrainingResult`) or ``path=`` (a file written by
    :func:`measureflow.training.save_model`). It is local (it ignores the rest of the measure) and
    has no Gaussian closure, so it moves particles; any deterministic integrator runs it, forwards
    or backwards in time, and the run is written to HDF5 like any other.

    The time range defaults to [0, 1], where flow-matching networks are trained; outside the
    training range a network extrapolates arbitrarily, so give ``time_range`` to match a
    ``t_range`` of training that was narrower.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
from pathlib import Path

import torch
from torch import nn

import measureflow
from measureflow.errors import CapabilityError, ParameterError, ShapeError
from measureflow.fields import Field, keeps_graph


class LearnedField(Field):
    """v_t(x) = v_θ(x, t), evaluated on the state's device and dtype (module docstring).

    The network is evaluated without building an autograd graph unless the query points
    themselves carry gradients (a diagnostic differentiating the field through x, e.g. a Jacobian
    by torch.func or autograd, still gets the network's true Jacobian) or a run asks for gradients
    (``Simulation(gradient=...)``; its weights are the field's ``trainable()`` tensors). The module is put in eval
    mode. When the state's device or dtype differs from the network's, a converted copy is made
    once and cached; train the original afterwards and build a new field to see the new weights.
    """

    name = "learned"

    def __init__(self, model=None, path=None, time_range=(0.0, 1.0)):
        from measureflow.training import TrainingResult, load_model

        if (model is None) == (path is None):
            raise ParameterError("field 'learned' needs exactly one of model= (a trained network) or path= (a saved model file)")
        self.path = None
        if path is not None:
            self.path = str(Path(path))
            model = load_model(path)
        if isinstance(model, TrainingResult):
            model = model.model
        if not isinstance(model, nn.Module):
            raise CapabilityError(
                f"field 'learned': model must be a torch.nn.Module with forward(x, t) (e.g. VelocityMLP or "
                f"TrainingResult.model); received {type(model).__name__}"
            )
        try:
            lo, hi = (float(v) for v in time_range)
        except (TypeError, ValueError):
            raise ParameterError(f"field 'learned': time_range must be a pair (t_min, t_max); received {time_range!r}") from None
        if math.isnan(lo) or math.isnan(hi) or not lo < hi:
            raise ParameterError(f"field 'learned': time_range needs t_min < t_max; received ({lo:g}, {hi:g})")
        self.time_range = (lo, hi)
        self.model = model.eval()
        config = getattr(model, "config", None)
        self.config = dict(config) if isinstance(config, dict) else None
        self.dim = self.config.get("dim") if self.config else None
        self._copies: dict = {}

    def _network(self, like: torch.Tensor) -> nn.Module:
        key = (like.device, like.dtype)
        net = self._copies.get(key)
        if net is None:
            params = list(self.model.parameters())
            if not params or (params[0].device == like.device and params[0].dtype == like.dtype):
                net = self.model
            else:
                net = copy.deepcopy(self.model).to(device=like.device, dtype=like.dtype).eval()
            self._copies[key] = net
        return net

    def velocity(self, t, x, state):
        if self.dim is not None and x.shape[-1] != self.dim:
            raise ShapeError(f"field 'learned' has dimension {self.dim}; the state has d = {x.shape[-1]}")
        net = self._network(x)
        grad = contextlib.nullcontext() if (x.requires_grad or keeps_graph()) else torch.no_grad()
        with grad:
            return net(x, t)

    def trainable(self) -> dict:
        """The network's weights (gradients through a run, ``Simulation(gradient=...)``)."""
        return dict(self.model.named_parameters())

    def describe(self):
        params = [p.detach() for p in self.model.parameters()]
        digest = hashlib.sha256()
        for p in params:
            digest.update(p.cpu().to(torch.float64).contiguous().numpy().tobytes())
        return {
            "name": self.name,
            "model": {
                "class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
                "config": self.config,
                "parameters": int(sum(p.numel() for p in params)),
                "weights_sha256": digest.hexdigest()[:16],
            },
            "path": self.path,
            "time_range": list(self.time_range),
        }


@measureflow.hookimpl
def measureflow_register_fields(registry) -> None:
    registry.add_field("learned", LearnedField)
