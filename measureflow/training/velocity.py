"""Learned velocity fields: regress a time-conditioned network on an interpolation (MATH.md §1).

Flow matching replaces the exact conditional-expectation field (MATH.md eq. 1.1)

    v_t(z) = E[a'_t X0 + b'_t X1 | Z_t = z],   Z_t = a_t X0 + b_t X1,   (X0, X1) ~ π,

by its least-squares characterisation: v is the minimiser over all fields u of

    L(u) = E_{t ~ U(t_lo, t_hi)} E_π |u_t(Z_t) − (a'_t X0 + b'_t X1)|²,

whose minimum is L* = E_t E Var(a'_t X0 + b'_t X1 | Z_t), and for every u

    L(u) − L* = E_t E |u_t(Z_t) − v_t(Z_t)|²                  (the irreducible-loss identity),

so driving the sampled loss down drives the network towards the exact field in L²(path).
:func:`train_velocity` does this with Adam on mini-batches: X0 from ``source``, X1 from ``target``,
paired by a coupling (independent by default, mini-batch OT …), t uniform on ``t_range``.

Conventions (MATH.md §0): the schedule is written in the noising convention, X0 at t = 0 and X1
at t = 1, and the learned field moves Law(X0) at t = 0 to Law(X1) at t = 1 when integrated
forward. With source = data and target = noise, generation integrates it backwards from t = 1.
The loss is unhalved and summed over coordinates (a squared Euclidean norm), so its values are
directly comparable with L*.

Training runs on the run loop (:mod:`measureflow.run.loop`) as a :class:`VelocityTrainingProcess`:
one step is one optimiser step, its health is the step's loss, so a non-finite loss ends the run
with status ``nonfinite`` at the first bad step and the losses before it are kept.

A trained network becomes a field like any other through the ``learned`` field plugin
(``measureflow.field("learned", model=result.model)`` or ``path="model.pt"``).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Callable

import attrs
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import CapabilityError, MeasureflowError, ParameterError, ShapeError, TrajectoryFileError
from ..run import Callback, Checkpointing, Process, RunLoop, StopPolicy
from ..status import Status
from ..jsonable import to_jsonable_lenient
from ..parameterisation import check_prediction, training_target
from ..validators import check_int, check_positive
from .compiled import CompiledGradient
from .common import default_device, default_optimizer, model_dtype, steps_kept
from .networks import VelocityMLP

__all__ = [
    "VelocityMLP",
    "TrainingResult",
    "VelocityTrainingProcess",
    "train_velocity",
    "regression_loss",
    "save_model",
    "load_model",
    "plot_loss",
]

CHECKPOINT_FORMAT = "measureflow-training-2"
MODEL_FORMAT = "measureflow-velocity-model-1"
#: The class names a model file may carry for a VelocityMLP (files written before the training
#: package recorded the class under measureflow.learning).
VELOCITY_MLP_CLASSES = (f"{VelocityMLP.__module__}.{VelocityMLP.__qualname__}", "measureflow.learning.VelocityMLP")

# Step losses kept as separate 0-dim tensors before one stacked copy into the loss history.
_LOSS_BUFFER = 256


# -- inputs ------------------------------------------------------------------------------------------------


def _sampler(obj, role: str, device: torch.device, dtype: torch.dtype) -> tuple[Callable, int, str]:
    """``draw(n, generator) -> (n, d)`` for a measure-like object or a tensor of points.

    Returns (draw, d, description). Points are resampled i.i.d. with replacement (the empirical
    law); measures are moved to the training device/dtype once, here, not at every step.
    """
    if isinstance(obj, np.ndarray):
        obj = torch.from_numpy(obj)
    if isinstance(obj, torch.Tensor):
        if obj.ndim != 2 or 0 in obj.shape:
            raise ShapeError(f"train_velocity: {role} points must have shape (M, d); received {tuple(obj.shape)}")
        if not obj.is_floating_point():
            raise ParameterError(f"train_velocity: {role} points must be floating point; received {obj.dtype}")
        points = obj.detach().to(device=device, dtype=dtype).contiguous()
        if not bool(torch.isfinite(points).all()):
            raise ParameterError(f"train_velocity: {role} points contain non-finite values; remove them first")
        size = points.shape[0]

        def draw(n, generator):
            return points[torch.randint(size, (n,), generator=generator, device=device)]

        return draw, points.shape[1], f"points(M={size}, d={points.shape[1]})"
    if callable(getattr(obj, "sample", None)):
        to = getattr(obj, "to", None)
        if callable(to):
            obj = to(device=device, dtype=dtype)
        measure = obj

        def draw(n, generator):
            return measure.sample(n, generator)

        d = getattr(measure, "dim", None)
        return draw, (int(d) if d is not None else None), repr(measure)
    raise ParameterError(
        f"train_velocity: {role} must be a measure (an object with sample(n, generator), e.g. "
        f"measureflow.measures.Gaussian) or a tensor of points (M, d); received {type(obj).__name__}"
    )


def sample_points(obj, n: int, generator: torch.Generator, device, dtype) -> torch.Tensor:
    """n draws (n, d) from a measure or a point cloud (resampled with replacement), as training draws them."""
    draw, _, _ = _sampler(obj, "source", torch.device(device), dtype)
    return draw(int(n), generator)


def _paired_sampler(source, target, device, dtype):
    """(draw_source, draw_target, d, descriptions) for paired rows: each step draws row indices once
    (in draw_source, from the run's generator) and both ends take the same rows (a coupling given by
    samples, e.g. (X₀, Φ(X₀)) in reflow)."""
    points = []
    for role, obj in (("source", source), ("target", target)):
        if isinstance(obj, np.ndarray):
            obj = torch.from_numpy(obj)
        if not isinstance(obj, torch.Tensor) or obj.ndim != 2:
            raise ParameterError(
                f"train_velocity: coupling='paired' needs source and target as tensors of paired rows (N, d); the "
                f"{role} is {type(obj).__name__}{'' if not isinstance(obj, torch.Tensor) else tuple(obj.shape)}"
            )
        points.append(obj.detach().to(device=device, dtype=dtype).contiguous())
    p0, p1 = points
    if p0.shape != p1.shape:
        raise ShapeError(f"train_velocity: paired source and target must have the same shape; received "
                         f"{tuple(p0.shape)} and {tuple(p1.shape)}")
    rows: list = [None]

    def draw0(n, generator):
        rows[0] = torch.randint(p0.shape[0], (n,), generator=generator, device=device)
        return p0[rows[0]]

    def draw1(n, generator):
        return p1[rows[0]]

    desc = f"paired points(N={p0.shape[0]}, d={p0.shape[1]})"
    return draw0, draw1, p0.shape[1], desc, desc


def _resolve_schedule(schedule):
    if isinstance(schedule, str):
        from ..plugins import get_registry

        return get_registry().schedule(schedule)
    if not callable(getattr(schedule, "coefficients", None)):
        raise ParameterError(
            "train_velocity: schedule must be a registered schedule name (e.g. 'linear') or an object "
            f"with coefficients(t) -> (a, a', b, b'); received {type(schedule).__name__}"
        )
    return schedule


def _resolve_coupling(coupling, params):
    """(callable or None for the independent pairing, JSON-able description)."""
    if coupling is None or coupling == "independent":
        # Independent samples paired row by row are already a sample of the product coupling.
        return None, {"name": "independent"}
    if isinstance(coupling, str):
        from .. import couplings

        fn = couplings.get(coupling, **params)
        describe = getattr(fn, "describe", None)
        return fn, (describe() if callable(describe) else {"name": coupling, **params})
    if params:
        raise ParameterError("train_velocity: coupling_params apply only to a coupling given by name")
    if not callable(coupling):
        raise ParameterError(
            "train_velocity: coupling must be a name ('independent', 'exact_ot', 'sinkhorn') or a callable "
            f"coupling(x0, x1, generator=None) -> (x0, x1); received {type(coupling).__name__}"
        )
    describe = getattr(coupling, "describe", None)
    desc = describe() if callable(describe) else {"name": getattr(coupling, "name", type(coupling).__name__)}
    return coupling, desc


def _check_t_range(t_range, schedule) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in t_range)
    except (TypeError, ValueError):
        raise ParameterError(f"train_velocity: t_range must be a pair (t_lo, t_hi); received {t_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ParameterError(f"train_velocity: t_range must be finite with t_lo < t_hi; received ({lo:g}, {hi:g})")
    allowed = getattr(schedule, "time_range", None)
    if allowed is not None:
        a_lo, a_hi = (float(v) for v in allowed)
        if lo < a_lo or hi > a_hi:
            raise ParameterError(
                f"train_velocity: t_range ({lo:g}, {hi:g}) leaves the schedule's time range "
                f"[{a_lo:g}, {a_hi:g}]; choose t_range inside it"
            )
    return lo, hi


def _check_noise_target(target, sigma: float) -> None:
    """A model predicting x0, noise or score needs the noise end N(0, σ²I): refuse a Gaussian that is not."""
    from ..measures import Gaussian

    if isinstance(target, Gaussian):
        mean, cov = target.mean_, target.cov
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        if float(mean.abs().max()) > 1e-12 or float((cov - sigma**2 * eye).abs().max()) > 1e-12 * max(1.0, sigma**2):
            raise ParameterError(
                f"train_velocity: a model predicting x0, noise or score needs target = N(0, σ²I) with σ = sigma "
                f"= {sigma:g}; the target Gaussian differs (pass its σ as sigma=, or predict the velocity)"
            )


# -- the result ---------------------------------------------------------------------------------------------


@attrs.define(eq=False)
class TrainingResult:
    """What :func:`train_velocity` returns.

    ``model`` is the trained network (on the training device, in train mode); ``steps`` and
    ``losses`` the loss curve (``losses[i]`` is the mini-batch loss of optimiser step ``steps[i]``,
    1-based; a run that went non-finite keeps the losses before its first bad step); ``wall_time``
    the seconds spent training (a resumed run adds its earlier time, recorded in the checkpoint);
    ``status`` a :class:`~measureflow.status.Status`: ``completed``, ``stopped`` (the callback asked
    to stop), ``terminated`` (SIGTERM) or ``nonfinite`` (a NaN or infinite loss, at the step it
    names); ``config`` the JSON-able training set-up.
    """

    model: nn.Module
    steps: np.ndarray
    losses: np.ndarray
    wall_time: float
    status: Status
    config: dict = attrs.field(factory=dict)

    @property
    def ok(self) -> bool:
        return self.status.ok

    @property
    def final_loss(self) -> float:
        """Mean mini-batch loss over the last 10 % of the steps (a smoothed end value)."""
        if len(self.losses) == 0:
            return math.nan
        k = max(1, len(self.losses) // 10)
        return float(np.mean(self.losses[-k:]))

    def save_model(self, path) -> Path:
        """Write the trained network to ``path`` (see :func:`save_model`)."""
        return save_model(self.model, path)

    def plot_loss(self, out=None, **kwargs):
        """The loss curve on a log scale (see :func:`plot_loss`)."""
        return plot_loss(self, out, **kwargs)

    def __repr__(self) -> str:
        return (f"TrainingResult(status={self.status}, steps={len(self.steps)}, "
                f"final_loss={self.final_loss:.4g}, wall_time={self.wall_time:.3g}s)")


# -- the process ----------------------------------------------------------------------------------------------


class VelocityTrainingProcess(Process):
    """Flow-matching regression as the run loop drives it: step k is optimiser step k (time k).

    The run's state is the last step's loss (a 0-dim tensor on the training device; NaN before the
    first step), which is also its health. The loss curve stays on the device: step losses are
    gathered in blocks of 256 into one preallocated tensor, so no step waits for the host.
    """

    label = "train_velocity"
    unit = "step"
    checkpoint_format = CHECKPOINT_FORMAT
    differs = "other model, schedule, coupling, batch size, learning rate, seed or dtype"

    def __init__(self, *, model, optimizer, lr_scheduler, generator, draw_source, draw_target, pair, schedule,
                 t_range, batch_size: int, steps: int, device, dtype, fingerprint: str,
                 prediction: str = "velocity", sigma: float = 1.0, compile: bool = False):
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.generator = generator
        self.draw_source = draw_source
        self.draw_target = draw_target
        self.pair = pair
        self.schedule = schedule
        self.t_lo, self.t_hi = t_range
        self.batch_size = batch_size
        self.n_steps = steps
        self.device = device
        self.dtype = dtype
        self._fingerprint = fingerprint
        self.prediction = prediction
        self.sigma = float(sigma)
        self.losses = torch.empty(steps, dtype=dtype, device=device)
        # Detached step losses not yet copied into `losses`: one stacked copy every few steps
        # instead of an indexed copy per step (the step's fixed cost matters for small networks).
        self.pending: list[torch.Tensor] = []
        self.written = 0
        #: the compiled loss-and-gradient of a step (``compile=True``), or None for eager autograd
        self.gradient = CompiledGradient(model, self.loss) if compile else None

    def time_at(self, step: int) -> float:
        return float(step)

    def start(self):
        self.model.train()
        return torch.full((), math.nan, dtype=self.dtype, device=self.device)

    def advance(self, state, step: int):
        batch, generator, device, dtype = self.batch_size, self.generator, self.device, self.dtype
        x0 = self.draw_source(batch, generator)
        x1 = self.draw_target(batch, generator)
        if self.pair is not None:
            x0, x1 = self.pair(x0, x1, generator=generator)
        t = torch.rand(batch, generator=generator, device=device, dtype=dtype)
        opt = self.optimizer
        if self.gradient is not None:
            loss = self.gradient(x0, x1, t)  # sets every weight's .grad
        else:
            loss = self.loss(self.model, x0, x1, t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        loss = loss.detach()
        self.pending.append(loss)
        if len(self.pending) >= _LOSS_BUFFER:
            self.flush_losses()
        return loss

    def loss(self, model, x0, x1, t):
        """The mini-batch loss of ``model`` at the pairs (x0, x1) and uniform draws t ∈ [0, 1)
        (rescaled to the run's t_range): mean_i |v_θ(Z_t, t) − (a'_t X0 + b'_t X1)|² for a velocity."""
        lo, span = self.t_lo, self.t_hi - self.t_lo
        if lo != 0.0 or span != 1.0:
            t = lo + span * t
        # Coefficients of shape (B, 1), broadcasting against the (B, d) batch.
        a, da, b, db = self.schedule.coefficients(t.unsqueeze(-1))
        if a.dtype != self.dtype:
            a, da, b, db = (c.to(self.dtype) for c in (a, da, b, db))
        z = torch.addcmul(a * x0, b, x1)
        if self.prediction == "velocity":
            u = torch.addcmul(da * x0, db, x1)
            v = model(z, t)
            # mean_i |v_i − u_i|², one fused kernel with one backward node
            return F.mse_loss(v, u, reduction="sum") / v.shape[0]
        # x0 / noise regression, or denoising score matching weighted by (bσ)² (MATH.md §15.2)
        u, weight = training_target(self.prediction, x0, x1, (a, da, b, db), self.sigma)
        v = model(z, t)
        sq = (v - u).square()
        return (sq if weight is None else sq * weight).sum() / v.shape[0]

    def flush_losses(self) -> None:
        """Copy the pending step losses into the loss history (one stacked copy on the device)."""
        pending = self.pending
        if pending:
            self.losses[self.written:self.written + len(pending)] = torch.stack(pending)
            self.written += len(pending)
            pending.clear()

    def loss_history(self, upto: int) -> np.ndarray:
        """The losses of steps 1 … ``upto`` as float64 on the host."""
        self.flush_losses()
        return self.losses[:upto].detach().to(torch.float64).cpu().numpy()

    def health(self, state):
        return state

    def run_info(self, state, observable_shapes: dict, resume_step):
        return None  # nothing is written to a trajectory

    def fingerprint(self) -> str:
        return self._fingerprint

    def state_dict(self, state) -> dict:
        self.flush_losses()
        sched = self.lr_scheduler
        return {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": None if sched is None else sched.state_dict(),
            "generator": self.generator.get_state(),
            "losses": self.losses[:self.written].detach().cpu(),
        }

    def load_state_dict(self, saved: dict):
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.lr_scheduler is not None and saved.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        self.generator.set_state(saved["generator"])
        history = saved["losses"]
        done = int(history.shape[0])
        self.losses[:done] = history.to(device=self.device, dtype=self.dtype)
        self.pending.clear()
        self.written = done
        self.model.train()
        if done == 0:
            return torch.full((), math.nan, dtype=self.dtype, device=self.device)
        return self.losses[done - 1].clone()

    def postfix(self, context) -> dict:
        return {"loss": f"{float(context.state):.4g}"}


def _loss_callback(callback: Callable, model: nn.Module) -> Callable:
    """``callback(step, loss, model)`` as a run-loop callback ``f(step, time, state)`` (the state is the loss)."""

    def call(step, time, loss):
        return callback(step, loss, model)

    call.__name__ = getattr(callback, "__name__", "callback")
    return call


# -- training -----------------------------------------------------------------------------------------------


def train_velocity(
    source,
    target,
    schedule="linear",
    *,
    coupling="independent",
    coupling_params: dict | None = None,
    model=None,
    steps: int = 1000,
    batch_size: int = 256,
    lr: float = 1e-3,
    optimizer: Callable | None = None,
    lr_scheduler: Callable | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    device=None,
    dtype: torch.dtype | None = None,
    t_range=(0.0, 1.0),
    progress: bool | None = None,
    checkpoint=None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    callback: Callable | None = None,
    prediction: str = "velocity",
    sigma: float = 1.0,
    compile: bool = False,
) -> TrainingResult:
    """Fit v_θ(z, t) to the flow-matching regression target (module docstring, MATH.md §1), or a model
    of another parameterisation (``prediction``, MATH.md §15.2).

    Each optimiser step draws a mini-batch of ``batch_size`` pairs: X0 from ``source`` and X1 from
    ``target``, paired by ``coupling``; t ~ U(t_range); then Z_t = a_t X0 + b_t X1 and the loss
    mean_i |v_θ(Z_t, t) − (a'_t X0 + b'_t X1)|².

    Parameters
    ----------
    source, target:
        measures (anything with ``sample(n, generator)``, e.g. :class:`~measureflow.measures.Gaussian`,
        ``GaussianMixture``, ``Empirical``) or tensors of points (M, d), resampled with replacement.
        Law(source) sits at t = 0, Law(target) at t = 1.
    schedule:
        a registered schedule name or an object with ``coefficients(t) -> (a, a', b, b')``
        (noising convention, MATH.md §1.3).
    coupling:
        ``"paired"``: source and target are tensors of paired rows (N, d), drawn together (a coupling
        given by samples, as in :func:`~measureflow.training.reflow`); ``"independent"`` (default: the
        product coupling), another name of
        :func:`measureflow.couplings.get` (``"exact_ot"``, ``"sinkhorn"``, with ``coupling_params``), or
        a callable ``coupling(x0, x1, generator=None) -> (x0, x1)`` pairing the rows of a mini-batch.
    model:
        an ``nn.Module`` with ``forward(x, t)``, a dict of :class:`VelocityMLP` keyword arguments, or
        None for ``VelocityMLP(d)``. It is trained in place.
    steps, batch_size, lr:
        optimiser steps (in total, counting those of a resumed run), mini-batch size, learning rate.
    optimizer:
        ``optimizer(parameters) -> torch.optim.Optimizer``; default
        :func:`~measureflow.training.default_optimizer` (Adam with ``lr``, fused where supported).
    lr_scheduler:
        ``lr_scheduler(optimizer) -> torch.optim.lr_scheduler.LRScheduler``, stepped once per
        optimiser step and saved in checkpoints (e.g. ``lambda o: CosineAnnealingLR(o, T_max=steps)``,
        which lowers the stochastic-gradient noise floor of the final loss).
    seed, generator:
        the run's randomness (data, pairing, times) comes from one generator on the training
        device: ``generator`` if given, else one seeded with ``seed`` (default 0). Its state is part
        of the checkpoint, so a resumed run draws the same batches.
    device, dtype:
        where and in which precision to train (default: the model's, else CUDA when available,
        else CPU; float32 for a new model). Measures and points are moved there once.
    t_range:
        the interval of training times, inside the schedule's ``time_range`` (exclude a singular
        endpoint here, e.g. (1e-3, 1) for a variance-preserving schedule near t = 0).
    progress:
        a tqdm bar; None shows it when stderr is a terminal and the CI variable is unset.
    checkpoint, checkpoint_every, resume:
        a checkpoint path written atomically every ``checkpoint_every`` steps (default steps // 10),
        when the run is stopped (callback, SIGTERM) and at the end (model, optimiser, generator,
        loss history, step); with ``resume=True`` an existing checkpoint is continued, and the
        result equals that of an uninterrupted run.
    callback:
        ``callback(step, loss, model)`` after every step (``loss`` a 0-dim tensor still on the
        device); returning True ends training early (status ``stopped``).

    prediction, sigma:
        what the network predicts (:mod:`measureflow.parameterisation`): ``"velocity"`` (default, the
        flow-matching target a'X0 + b'X1), ``"x0"`` (X0), ``"noise"`` (X1/σ) or ``"score"`` (denoising
        score matching, |bσ s_θ + X1/σ|², minimiser ∇log ρ_t). The last three need ``target`` to be the
        noise N(0, σ²I) (``sigma``; default 1). The trained model carries ``model.parameterisation``
        (prediction, schedule, σ), so the ``learned`` field turns it into a velocity and a score.

    compile:
        compute each step's loss and gradient as one compiled graph (``torch.func.grad_and_value``
        under ``torch.compile``, :class:`~measureflow.training.compiled.CompiledGradient`); the
        optimiser step stays the optimiser's own. Losses and weights equal eager training's up to
        rounding (which then grows along the run as in any chaotic optimisation); the first step
        pays the compile (seconds), so it is worth it for runs of hundreds of steps or more of a
        small network. A model that fails to compile warns once and trains eagerly. Not part of the
        checkpoint fingerprint: a run may resume with or without it.

    A NaN or infinite loss ends training with status ``nonfinite`` naming the first bad step (the
    loss is checked at checkpoints, every max(64, steps // 100) steps and at the end, without a
    per-step host synchronisation); the result keeps the losses before that step.
    """
    steps = check_int(steps, "steps", "train_velocity")
    if not isinstance(compile, bool):
        raise ParameterError(f"train_velocity: compile must be True or False; received {compile!r}")
    batch_size = check_int(batch_size, "batch_size", "train_velocity")
    lr = check_positive(lr, "lr", "train_velocity")
    if generator is not None and seed is not None:
        raise ParameterError("train_velocity: give seed or generator, not both")
    if resume and checkpoint is None:
        raise ParameterError("train_velocity: resume=True needs a checkpoint path (checkpoint='train.ckpt')")
    if checkpoint_every is None:
        checkpoint_every = max(1, steps // 10)
    checkpoint_every = check_int(checkpoint_every, "checkpoint_every", "train_velocity")

    schedule = _resolve_schedule(schedule)
    lo, hi = _check_t_range(t_range, schedule)
    paired = isinstance(coupling, str) and coupling == "paired"
    if paired:
        pair, coupling_desc = None, {"name": "paired"}
    else:
        pair, coupling_desc = _resolve_coupling(coupling, dict(coupling_params or {}))
    prediction = check_prediction(prediction, "train_velocity")
    sigma = check_positive(sigma, "sigma", "train_velocity")
    if prediction != "velocity":
        _check_noise_target(target, sigma)

    if generator is not None:
        device = torch.device(generator.device) if device is None else torch.device(device)
        if torch.device(generator.device).type != device.type:
            raise ParameterError(
                f"train_velocity: the generator is on {generator.device} but training runs on {device}; "
                f"create it with torch.Generator(device={str(device)!r})"
            )
    device = torch.device(device) if device is not None else default_device(model)

    if isinstance(model, nn.Module):
        if dtype is None:
            dtype = model_dtype(model)
        model = model.to(device=device, dtype=dtype)
    else:
        dtype = dtype or torch.float32
    if paired:
        draw0, draw1, d0, desc0, desc1 = _paired_sampler(source, target, device, dtype)
        d1 = d0
    else:
        draw0, d0, desc0 = _sampler(source, "source", device, dtype)
        draw1, d1, desc1 = _sampler(target, "target", device, dtype)
    if d0 is not None and d1 is not None and d0 != d1:
        raise ShapeError(f"train_velocity: source has dimension {d0} but target has dimension {d1}")
    dim = d0 if d0 is not None else d1
    seed_used = None
    if generator is None:
        seed_used = 0 if seed is None else int(seed)
        generator = torch.Generator(device=device)
        generator.manual_seed(seed_used)
    if model is None or isinstance(model, dict):
        if dim is None:
            dim = int(draw0(1, None).shape[-1])
        # Initialised from the run's generator: the seed fixes the initial weights too.
        model = VelocityMLP(dim, **dict(model or {}), device=device, dtype=dtype, generator=generator)
    elif not isinstance(model, nn.Module):
        raise ParameterError(
            f"train_velocity: model must be an nn.Module with forward(x, t), a dict of VelocityMLP "
            f"arguments, or None; received {type(model).__name__}"
        )
    model_dim = getattr(model, "config", {}).get("dim") if isinstance(getattr(model, "config", None), dict) else None
    if model_dim is not None and dim is not None and model_dim != dim:
        raise ShapeError(f"train_velocity: the model has dimension {model_dim} but the data have dimension {dim}")

    opt = optimizer(model.parameters()) if optimizer is not None else default_optimizer(model.parameters(), lr)
    sched = lr_scheduler(opt) if lr_scheduler is not None else None

    config = to_jsonable_lenient({
        "model": {"class": f"{type(model).__module__}.{type(model).__qualname__}",
                  "config": getattr(model, "config", None)},
        "source": desc0,
        "target": desc1,
        "schedule": (schedule.describe() if callable(getattr(schedule, "describe", None))
                     else getattr(schedule, "name", type(schedule).__name__)),
        "coupling": coupling_desc,
        "batch_size": batch_size,
        "lr": float(lr),
        "optimizer": type(opt).__name__,
        "lr_scheduler": None if sched is None else type(sched).__name__,
        "seed": seed_used,
        "t_range": [lo, hi],
        "dtype": str(dtype).replace("torch.", ""),
    })
    if prediction != "velocity":  # absent for velocity models: their checkpoints keep their fingerprints
        config.update(prediction=prediction, sigma=float(sigma))
    fingerprint = hashlib.sha256(json.dumps({k: v for k, v in config.items() if k not in ("source", "target")},
                                            sort_keys=True).encode()).hexdigest()[:16]

    process = VelocityTrainingProcess(
        model=model, optimizer=opt, lr_scheduler=sched, generator=generator, draw_source=draw0, draw_target=draw1,
        pair=pair, schedule=schedule, t_range=(lo, hi), batch_size=batch_size, steps=steps, device=device,
        dtype=dtype, fingerprint=fingerprint, prediction=prediction, sigma=sigma, compile=compile,
    )
    model.parameterisation = {"prediction": prediction, "schedule": schedule, "sigma": float(sigma)}
    operations = [] if callback is None else [Callback(_loss_callback(callback, model))]
    loop = RunLoop(
        process, operations,
        # A loss has no blow-up bound. Reading the health record every hundredth of the run, and no
        # more often than every 64 steps (the record's block, so a read finds it folded), ends a
        # diverged training early for a host synchronisation per 64 steps at most.
        stop=StopPolicy(blowup=None, check_every=max(64, steps // 100)),
        checkpointing=Checkpointing(path=checkpoint, every=checkpoint_every, resume=bool(resume), at_end=True),
        progress=progress,
    )
    outcome = loop.run()
    kept = steps_kept(outcome)
    return TrainingResult(
        model=model,
        steps=np.arange(1, kept + 1),
        losses=process.loss_history(kept),
        wall_time=outcome.wall_time,
        status=outcome.status,
        config=config,
    )


# -- evaluation -----------------------------------------------------------------------------------------------


@torch.no_grad()
def regression_loss(model, source, target, schedule="linear", *, n: int = 10_000, coupling="independent",
                    coupling_params: dict | None = None, generator: torch.Generator | None = None,
                    t_range=(0.0, 1.0)) -> float:
    """A fresh Monte-Carlo estimate of L(v_θ) = E_t E|v_θ(Z_t, t) − (a'_t X0 + b'_t X1)|² from n pairs.

    Compare with the irreducible minimum L* (MATH.md §1): L(v_θ) − L* is the squared L² distance
    between the network and the exact field along the path.
    """
    schedule = _resolve_schedule(schedule)
    lo, hi = _check_t_range(t_range, schedule)
    pair, _ = _resolve_coupling(coupling, dict(coupling_params or {}))
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    dtype = params[0].dtype if params else torch.get_default_dtype()
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(0)
    draw0, _, _ = _sampler(source, "source", device, dtype)
    draw1, _, _ = _sampler(target, "target", device, dtype)
    x0, x1 = draw0(int(n), generator), draw1(int(n), generator)
    if pair is not None:
        x0, x1 = pair(x0, x1, generator=generator)
    t = lo + (hi - lo) * torch.rand(int(n), generator=generator, device=device, dtype=dtype)
    a, da, b, db = (c.to(dtype).unsqueeze(-1) for c in schedule.coefficients(t))
    v = model(a * x0 + b * x1, t)
    return float((v - (da * x0 + db * x1)).square().sum(-1).mean())


# -- files -----------------------------------------------------------------------------------------------------


def save_model(model: nn.Module, path) -> Path:
    """Write ``model``'s weights (``state_dict``) and constructor ``config`` to ``path``, atomically.

    The file is a torch.save dict readable with ``torch.load(path, weights_only=True)``:
    ``{"format", "class", "config", "state_dict"}``. The model needs a ``config`` dict of its
    constructor arguments (every :class:`VelocityMLP` has one).
    """
    from ..io.checkpoint import save_checkpoint

    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or not isinstance(config, dict):
        raise CapabilityError(
            f"save_model: expected an nn.Module with a `config` dict of its constructor arguments "
            f"(e.g. VelocityMLP); received {type(model).__name__}. For another module, save "
            "model.state_dict() with torch.save yourself"
        )
    payload = {
        "format": MODEL_FORMAT,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": to_jsonable_lenient(config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    param = getattr(model, "parameterisation", None)
    if isinstance(param, dict):
        schedule = param.get("schedule")
        describe = getattr(schedule, "describe", None)
        payload["parameterisation"] = to_jsonable_lenient({
            "prediction": param.get("prediction"),
            "schedule": describe() if callable(describe) else schedule,
            "sigma": param.get("sigma"),
        })
    return save_checkpoint(path, payload)


def load_model(path, cls: type | None = None, *, device=None) -> nn.Module:
    """Rebuild a network written by :func:`save_model`: ``cls(**config)`` with the saved weights, in
    the saved precision, on ``device`` (default CPU). ``cls`` defaults to :class:`VelocityMLP`; give
    your own class for a model saved from another module."""
    from ..io.checkpoint import load_checkpoint

    payload = load_checkpoint(path)
    if payload.get("format") != MODEL_FORMAT:
        raise TrajectoryFileError(
            f"load_model: {path} is not a model file written by save_model (format {payload.get('format')!r})"
        )
    saved_class = payload.get("class", "")
    if cls is None:
        if saved_class not in VELOCITY_MLP_CLASSES:
            raise CapabilityError(
                f"load_model: {path} holds a {saved_class}, not a VelocityMLP; pass its class: "
                "load_model(path, cls=MyModel)"
            )
        cls = VelocityMLP
    state = payload["state_dict"]
    model = cls(**payload["config"])
    floats = [v.dtype for v in state.values() if v.is_floating_point()]
    if floats:
        model = model.to(dtype=floats[0])
    model.load_state_dict(state)
    param = payload.get("parameterisation")
    if isinstance(param, dict):
        from ..schedules import as_schedule

        schedule = param.get("schedule")
        try:
            schedule = as_schedule(schedule) if schedule is not None else None
        except MeasureflowError:
            pass  # a schedule that cannot be rebuilt by name (a custom one): give it to the learned field
        model.parameterisation = {**param, "schedule": schedule}
    return model.to(device=device) if device is not None else model


# -- plots -----------------------------------------------------------------------------------------------------


def plot_loss(result, out=None, *, ax=None, minimum: float | None = None, window: int | None = None):
    """The loss curve of a :class:`TrainingResult` (or a pair ``(steps, losses)``) on a log scale.

    Draws the per-step mini-batch loss (light) and its moving average over ``window`` steps (default
    steps // 50), and, when ``minimum`` is given, the irreducible loss L* as a dashed line (the gap
    to it is E|v_θ − v|², MATH.md §1). Returns the matplotlib Figure, written to ``out`` when given.
    """
    from matplotlib.figure import Figure

    if isinstance(result, TrainingResult):
        steps, losses = result.steps, result.losses
    else:
        steps, losses = (np.asarray(v) for v in result)
    steps = np.asarray(steps, dtype=np.float64)
    losses = np.asarray(losses, dtype=np.float64)
    if steps.shape != losses.shape or steps.ndim != 1 or len(steps) == 0:
        raise ShapeError(
            f"plot_loss: need matching 1-D steps and losses; received shapes {steps.shape} and {losses.shape}"
        )
    own = ax is None
    if own:
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = ax.figure
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="mini-batch loss")
    k = window or max(1, len(losses) // 50)
    if k > 1 and len(losses) >= k:
        kernel = np.ones(k) / k
        ax.plot(steps[k - 1:], np.convolve(losses, kernel, mode="valid"), color="tab:blue",
                label=f"moving average ({k} steps)")
    if minimum is not None:
        ax.axhline(minimum, color="black", linestyle="--", linewidth=1, label="irreducible loss L*")
    ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("regression loss")
    ax.legend(loc="upper right", fontsize=8)
    if own:  # a caller's figure keeps its own layout engine
        fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=120)
    return fig
