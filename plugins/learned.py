"""Learned velocity fields: a trained network used as a field (MATH.md §1, regression loss).

``learned``
    v_t(x) = v_θ(x, t) for a network trained by :func:`measureflow.training.train_velocity` (or any
    ``nn.Module`` with ``forward(x, t)`` mapping (..., d) to (..., d)). Given as ``model=`` (a
    module or a :class:`~measureflow.training.TrainingResult`) or ``path=`` (a file written by
    :func:`measureflow.training.save_model`). It is local (it ignores the rest of the measure) and
    has no Gaussian closure, so it moves particles; any deterministic integrator runs it, forwards
    or backwards in time, and the run is written to HDF5 like any other.

    A network trained with ``prediction="score" | "x0" | "noise"`` (MATH.md §15.2) is converted to a
    velocity exactly, given its path (read from ``model.parameterisation``, or ``schedule=``/``sigma=``);
    every learned field with a known path also gives its score (``marginal_score``), so
    ``flow_sde`` turns it into a stochastic sampler.

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
from measureflow.errors import CapabilityError, ParameterError, ShapeError, TimeRangeError
from measureflow.fields import Field, keeps_graph
from measureflow.parameterisation import check_prediction, convert
from measureflow.schedules import as_schedule
from measureflow.validators import check_positive


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

    def __init__(self, model=None, path=None, time_range=(0.0, 1.0), prediction=None, schedule=None,
                 sigma=None):
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
        self._set_parameterisation(prediction, schedule, sigma)

    def _set_parameterisation(self, prediction, schedule, sigma) -> None:
        """What the network predicts and on which path: the keywords, else what training recorded on
        the model (``model.parameterisation``), else a velocity on an unknown path."""
        known = getattr(self.model, "parameterisation", None)
        known = known if isinstance(known, dict) else {}
        prediction = prediction if prediction is not None else known.get("prediction", "velocity")
        self.prediction = check_prediction(prediction, "field 'learned'")
        schedule = schedule if schedule is not None else known.get("schedule")
        self.schedule = None if schedule is None else as_schedule(schedule)
        self.sigma = check_positive(sigma if sigma is not None else known.get("sigma", 1.0), "sigma", "field 'learned'")
        if self.prediction != "velocity" and self.schedule is None:
            raise ParameterError(
                f"field 'learned': a network predicting {self.prediction!r} needs its path to give a velocity: pass "
                "schedule= (and sigma=) as in training"
            )
        # Times where turning the prediction into a velocity divides by zero (MATH.md §15.2): a = 0
        # for score and noise predictions, b = 0 for x0 predictions.
        key = {"score": "a_zero", "noise": "a_zero", "x0": "b_zero"}.get(self.prediction)
        singular = getattr(self.schedule, "singular", {}) if key else {}
        self._singular = tuple(float(v) for v in singular.get(key, ()))

    def check_time(self, t) -> None:
        super().check_time(t)
        t = float(t)
        if t in self._singular:
            lo, hi = self.time_range
            safe = (lo, hi - 1e-3) if t == hi else (lo + 1e-3, hi)
            raise TimeRangeError(
                f"field 'learned' predicts {self.prediction!r}, whose velocity is singular at t = {t:g} "
                f"({'b' if self.prediction == 'x0' else 'a'} = 0 there, MATH.md §15.2); build it with a time_range "
                f"that stops short of it, e.g. time_range=({safe[0]:g}, {safe[1]:g})"
            )

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

    def predict(self, t, x):
        """The network's raw output at (x, t), of kind :attr:`prediction`."""
        if self.dim is not None and x.shape[-1] != self.dim:
            raise ShapeError(f"field 'learned' has dimension {self.dim}; the state has d = {x.shape[-1]}")
        net = self._network(x)
        grad = contextlib.nullcontext() if (x.requires_grad or keeps_graph()) else torch.no_grad()
        with grad:
            return net(x, t)

    def as_prediction(self, kind: str, t, x):
        """The network's prediction converted to ``kind`` ("velocity", "score", "x0", "noise";
        MATH.md §15.2), exact given the path (schedule, σ)."""
        check_prediction(kind, "field 'learned'")
        out = self.predict(t, x)
        if kind == self.prediction:
            return out
        if self.schedule is None:
            raise CapabilityError(
                f"field 'learned' predicts {self.prediction!r} on an unknown path; build it with schedule= (and "
                f"sigma=) to convert to {kind!r}"
            )
        return convert(out, x, float(t), source=self.prediction, target=kind, schedule=self.schedule,
                       sigma=self.sigma)

    def velocity(self, t, x, state):
        """v_t(x): the network's output, converted from its parameterisation when it is not a velocity."""
        return self.as_prediction("velocity", t, x)

    @property
    def marginal_score(self):
        """∇log ρ_t(x) as ``marginal_score(t, x)`` (what ``flow_sde`` uses), or None when the path is unknown."""
        if self.prediction != "score" and self.schedule is None:
            return None
        return lambda t, x: self.as_prediction("score", t, x)

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
            "prediction": self.prediction,
            "schedule": None if self.schedule is None else self.schedule.describe(),
            "sigma": self.sigma,
        }


@measureflow.hookimpl
def measureflow_register_fields(registry) -> None:
    registry.add_field("learned", LearnedField)
