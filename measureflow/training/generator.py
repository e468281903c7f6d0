"""One-step generators trained by explicit Euler steps of a particle flow (MATH.md §9, last paragraph).

A generator G : R^k → R^d pushes a latent law λ forward to μ = G#λ. Any registered particle field
v_t[μ] (``drifting``, ``sinkhorn``, ``mmd``, ``kl`` in its smoothed mode, …) moves μ by the continuity
equation, and one explicit Euler step of the particle ODE ẋ = v_t[μ](x) with step τ sends every sample
x = G(ζ) to x + τ v_t[μ](x). The generator update [B]

    G⁺(ζ) = G(ζ) + τ U(G(ζ)),   U ≈ v_t[μ],

realises that step on the latent space: G⁺#λ = (id + τv)#μ is the Euler step of the flow.
:func:`train_generator` repeats it with the field estimated on a mini-batch. Iteration i (i = 1, 2, …),
from G = G_{i−1} at field time t = τ(i − 1):

1. draw latents ζ₁ … ζ_B and set x_j = G(ζ_j) (no gradient);
2. w_j = v_t[μ̂](x_j) with μ̂ = (1/B) Σ_j δ_{x_j}: the batch is the field's state,
   ``field.velocity(t, x[None], Particles(x[None]))``;
3. the Euler target x⁺_j = x_j + τ w_j;
4. ``mode="direct"``: ``inner_steps`` optimiser steps on mean_j |G(ζ_j) − x⁺_j|² move G's own parameters
   (the optimiser and its state persist across iterations);
   ``mode="residual"``: ``inner_steps`` optimiser steps fit a residual field U_η on mean_j |U_η(x_j) − w_j|²
   and G_i = G_{i−1} + τ U_η∘G_{i−1} is kept as a composed module (:class:`ResidualGenerator`). Nothing
   earlier is refitted, so the map **grows**: after n iterations it holds n residual networks; its size
   and the cost of one evaluation grow linearly in n, the whole training run costs O(n²) network
   evaluations. Each U_η starts from a copy of the previous one (the field changes by O(τ) per
   iteration) with a fresh optimiser.

**Exactness on Gaussians.** If v is affine on the batch, v(x) = b + A(x − m̂), and G (direct) or U_η
(residual) can represent affine maps, the fit is exact: an affine G(ζ) = a + Lζ becomes
a + τ(b + A(a − m̂)) + (I + τA)Lζ. For latents whose batch moments are exact, one iteration maps
N(m, Σ) to N(m + τb, (I + τA)Σ(I + τA)ᵀ), the push-forward of the particle Euler step; it differs from
the explicit Euler step of the Gaussian closure (MATH.md eq. 0.1), Σ + τ(AΣ + ΣAᵀ), by τ²AΣAᵀ.

**Monitors.** Per iteration i: ``velocity_sq`` ∫|w|² dμ̂_{i−1} (mean squared velocity on the training
batch, the quantity MATH.md §9 says to monitor, dF/dt = −∫|v|²dμ for gradient flows (eq. 0.2)) and
``fit`` = mean_j |G_i(ζ_j) − x⁺_j|², the squared distance between the update realised and the Euler target
(compare with τ²·velocity_sq, the squared length of the step asked for). Every ``every`` iterations, on a
fixed evaluation batch G(ζ_eval) (latents drawn once): MMD² (Gaussian kernel, ℓ = ``mmd_bandwidth``) and
the Sinkhorn divergence S_ε (ε = ``sinkhorn_epsilon``) to ``data``, through
:func:`measureflow.observables.mmd` and :func:`measureflow.observables.sinkhorn`. These are the only
points (besides checkpoints) where values leave the device.

**The run.** Training runs on the run loop (:mod:`measureflow.run.loop`) as a
:class:`GeneratorTrainingProcess`: step i is iteration i (time i); its health is the iteration's two
monitors (and the evaluation batch where it is measured), so a non-finite field, fit or sample ends
the run with status ``nonfinite`` at the first bad iteration, keeping what was recorded before it.
The distances are :class:`~measureflow.run.Observer` operations on the evaluation batch.

**File.** With ``out``, an H5MD trajectory (:class:`~measureflow.io.h5md.H5MDWriter`, written by a
:class:`GeneratorRecord`) holds the evaluation batch as one replica of N = ``eval_batch`` particles, one
frame every ``every`` iterations (and the last), step = time = iteration; observables ``mmd`` and
``sinkhorn`` at the frames, ``velocity_sq`` and ``fit`` at every iteration (step i for iteration i), all
declared before the first iteration. ``measureflow plot FILE`` draws it.

**Checkpoints and resumption.** The generator, the optimiser, the random generator's state and the
monitors are saved every ``checkpoint_every`` iterations (:func:`measureflow.io.checkpoint.save_checkpoint`,
atomic), when the run is stopped and at its end; ``resume=True`` continues from the checkpoint and gives
the uninterrupted run's result bit for bit. A field that keeps a warm start between calls (``reset()``,
e.g. the Sinkhorn potentials) has it dropped when a run starts or resumes and on the checkpoint schedule,
whether or not checkpoints are written, so that its state after an interruption at a scheduled checkpoint
is the uninterrupted run's. (A run stopped between scheduled checkpoints — SIGTERM, a callback — resumes
from a cold field where the uninterrupted run had a warm one: the same up to the field's tolerance.)
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
from pathlib import Path
from typing import Any, Callable

import attrs
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import CapabilityError, ParameterError, ShapeError, TimeRangeError
from ..fields import capabilities
from ..run import Callback, Checkpointing, Observer, Operation, Process, Record, RunLoop, StopPolicy
from ..run.operations import WRITE
from ..scenario import scenario
from ..state import Particles
from ..status import Status
from ..triggers import as_trigger
from ..jsonable import to_jsonable_lenient
from ..validators import check_int, check_positive
from .common import default_device, default_optimizer, model_dtype, steps_kept
from .networks import GeneratorMLP

__all__ = [
    "GeneratorMLP",
    "ResidualGenerator",
    "GeneratorResult",
    "GeneratorTraining",
    "GeneratorTrainingProcess",
    "GeneratorRecord",
    "train_generator",
    "generator_scenario",
    "MODES",
]

MODES = ("direct", "residual")
CHECKPOINT_FORMAT = "measureflow-generator-training-2"
#: Frames and distance monitors every this many iterations when ``every`` is not given.
DEFAULT_EVERY = 10
#: The observables a run records (see the module docstring).
PER_ITERATION = ("velocity_sq", "fit")

#: A scenario returning a :class:`GeneratorTraining` is an ordinary scenario (the runner takes any
#: :class:`~measureflow.scenario.Runnable`); the name stays for scripts written against it.
generator_scenario = scenario


# -- networks ------------------------------------------------------------------------------------------------


class ResidualGenerator(nn.Module):
    """G_n = (id + τ_n U_n) ∘ … ∘ (id + τ_1 U_1) ∘ G_0: a base generator followed by residual Euler steps.

    ``forward(z)``: x = base(z), then x ← x + τ_k U_k(x) for k = 1 … n. :meth:`append` adds one step (one
    training iteration of ``mode="residual"``); the module's size and evaluation cost grow linearly
    in the number of steps. The step sizes τ_k are Python floats kept in the state dict's extra state
    (not a float buffer, which a dtype change would round).
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.blocks = nn.ModuleList()
        self.steps: list[float] = []

    def append(self, field: nn.Module, step: float) -> None:
        """Compose one more residual step x ↦ x + step·field(x)."""
        self.blocks.append(field)
        self.steps.append(float(step))

    def __len__(self) -> int:
        return len(self.blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.base(z)
        for block, tau in zip(self.blocks, self.steps):
            x = torch.add(x, block(x), alpha=tau)
        return x

    def get_extra_state(self):
        return {"steps": list(self.steps)}

    def set_extra_state(self, state):
        steps = [float(v) for v in state["steps"]]
        if len(steps) != len(self.blocks):
            raise ShapeError(
                f"ResidualGenerator: the state holds {len(steps)} residual steps but the module has "
                f"{len(self.blocks)}; "
                "append that many residual networks before loading"
            )
        self.steps = steps

    def extra_repr(self) -> str:
        return f"steps={len(self.blocks)}"


# -- inputs ----------------------------------------------------------------------------------------------------

def _latent_sampler(latent, device: torch.device, dtype: torch.dtype):
    """(draw(n, generator) -> (n, k) on device/dtype, k or None, description) for the ``latent`` argument."""
    if isinstance(latent, bool):
        raise ParameterError(f"train_generator: latent cannot be a bool; received {latent!r}")
    if isinstance(latent, int):
        if latent < 1:
            raise ParameterError(f"train_generator: a latent dimension must be >= 1; received {latent}")
        k = int(latent)

        def draw(n, rng):
            return torch.randn(n, k, generator=rng, device=device, dtype=dtype)

        return draw, k, {"name": "standard_normal", "dim": k}
    if callable(getattr(latent, "sample", None)):
        to = getattr(latent, "to", None)
        measure = to(device=device, dtype=dtype) if callable(to) else latent
        dim = getattr(measure, "dim", None)
        return (lambda n, rng: measure.sample(n, rng)), (int(dim) if dim is not None else None), repr(measure)
    if callable(latent):
        return latent, None, getattr(latent, "__qualname__", type(latent).__name__)
    raise ParameterError(
        "train_generator: latent must be a latent dimension k (standard normal N(0, I_k)), a measure with "
        "sample(n, generator) (e.g. measureflow.measures.Gaussian) or a callable sampler(n, generator) -> (n, k); "
        f"received {type(latent).__name__}"
    )


def _draw_latents(draw, n: int, rng, k, device, dtype) -> torch.Tensor:
    z = draw(n, rng)
    if not isinstance(z, torch.Tensor) or not z.is_floating_point():
        raise ShapeError(
            f"train_generator: the latent sampler must return a floating tensor (n, k); received {type(z).__name__}"
        )
    if z.ndim != 2 or z.shape[0] != n or (k is not None and z.shape[1] != k):
        want = f"({n}, k)" if k is None else f"({n}, {k})"
        raise ShapeError(
            f"train_generator: the latent sampler returned shape {tuple(z.shape)} for n = {n}; expected {want}"
        )
    if z.device != device or z.dtype != dtype:
        z = z.to(device=device, dtype=dtype)
    return z


def _data_dim(data) -> int | None:
    if data is None:
        return None
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return int(data.shape[-1]) if data.ndim >= 2 else None
    dim = getattr(data, "dim", None)
    return int(dim) if dim is not None else None


def _data_on(data, device, dtype):
    """The monitors' target moved once to the training device and dtype."""
    if data is None:
        return None
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if isinstance(data, torch.Tensor):
        if data.ndim not in (2, 3) or 0 in data.shape:
            raise ShapeError(f"train_generator: data points must have shape (M, d); received {tuple(data.shape)}")
        return data.detach().to(device=device, dtype=dtype)
    to = getattr(data, "to", None)
    if callable(to):
        return to(device=device, dtype=dtype)
    return data


def _check_field(field, step: float, iterations: int):
    if not callable(getattr(field, "velocity", None)):
        raise ParameterError(
            "train_generator: field must be a measureflow field with velocity(t, x, state), e.g. "
            f"measureflow.field('sinkhorn', target=data); received {type(field).__name__}"
        )
    name = getattr(field, "name", type(field).__name__)
    if "diffusion" in capabilities(field):
        raise CapabilityError(
            f"train_generator: field {name!r} has a noise term; its velocity() is only the drift, so the Euler "
            "step of the samples would not follow the law's flow. Use a deterministic field (e.g. "
            "kl with mode='smoothed' or 'blob', drifting, sinkhorn, mmd)"
        )
    lo, hi = getattr(field, "time_range", (-math.inf, math.inf))
    t_last = step * (iterations - 1)
    if not (lo <= 0.0 and t_last <= hi):
        raise TimeRangeError(
            f"train_generator: iteration i evaluates field {name!r} at t = τ(i − 1), here t in [0, {t_last:g}], but "
            f"the field is defined on [{lo:g}, {hi:g}]; lower the step or the number of iterations"
        )


def _describe(obj) -> Any:
    describe = getattr(obj, "describe", None)
    if callable(describe):
        return to_jsonable_lenient(describe())
    return {"name": getattr(obj, "name", type(obj).__name__)}


def _module_desc(module: nn.Module) -> dict:
    return {"class": f"{type(module).__module__}.{type(module).__qualname__}",
            "config": to_jsonable_lenient(getattr(module, "config", None))}


# -- one iteration's pieces ----------------------------------------------------------------------------------


def _velocity(field, t: float, x: torch.Tensor, field_name: str) -> torch.Tensor:
    """w = v_t[μ̂](x) with the batch as the state: x (B, d) → (B, d)."""
    w = field.velocity(t, x[None], Particles.unchecked(x[None]))
    if not isinstance(w, torch.Tensor) or w.shape != x[None].shape:
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ShapeError(
            f"train_generator: field {field_name!r} returned a velocity of shape {got} for x of shape "
            f"{tuple(x[None].shape)}; a field's velocity(t, x, state) must return x's shape"
        )
    return w.detach()[0].to(x.dtype)


def _direct_update(generator, z, x, w, tau, opt, inner_steps) -> torch.Tensor:
    """Fit G(ζ) to the Euler target x + τw; returns mean|G⁺(ζ) − x⁺|² (0-dim, on the device)."""
    target = torch.add(x, w, alpha=tau)
    _regress(generator, z, target, opt, inner_steps)
    with torch.no_grad():
        return (generator(z) - target).square().sum(-1).mean()


def _residual_update(generator, x, w, tau, make_optimizer, new_residual, inner_steps) -> torch.Tensor:
    """Fit U(x) ≈ w, starting from the last residual network, and compose G ← G + τU∘G; returns
    mean|G⁺(ζ) − x⁺|² = τ² mean|U(x) − w|²."""
    net = copy.deepcopy(generator.blocks[-1]) if len(generator) else new_residual()
    _regress(net, x, w, make_optimizer(net.parameters()), inner_steps)
    generator.append(net, tau)
    with torch.no_grad():
        return (tau * tau) * (net(x) - w).square().sum(-1).mean()


def _check_output(x, n: int, k: int, d: int | None, field_dim, data_dim, field_name) -> int:
    """The generator's output must be (n, d) with the field's and the data's d (metadata only)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[0] != n:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ShapeError(
            f"train_generator: the generator mapped latents of shape ({n}, {k}) to {got}; it must return samples "
            f"of shape ({n}, d)"
        )
    out = int(x.shape[1])
    if d is not None and out != d:
        raise ShapeError(f"train_generator: the generator's output dimension changed from {d} to {out}")
    if field_dim is not None and out != field_dim:
        raise ShapeError(
            f"train_generator: the generator outputs d = {out} but field {field_name!r} has dimension d = {field_dim}; "
            "make the generator's output dimension the field's"
        )
    if data_dim is not None and out != data_dim:
        raise ShapeError(f"train_generator: the generator outputs d = {out} but data has dimension d = {data_dim}")
    return out


def _residual_factory(residual_model, d, device, dtype, rng):
    if residual_model is None or isinstance(residual_model, dict):
        kwargs = dict(residual_model or {})

        def build():
            return GeneratorMLP(d, d, **kwargs, device=device, dtype=dtype, generator=rng)

        return build, {"class": f"{GeneratorMLP.__module__}.GeneratorMLP", "config": kwargs}
    if not callable(residual_model):
        raise ParameterError(
            "train_generator: residual_model must be a callable residual_model(d) -> nn.Module, a dict of "
            f"GeneratorMLP arguments or None; received {type(residual_model).__name__}"
        )

    def build():
        net = residual_model(d)
        if not isinstance(net, nn.Module):
            raise ParameterError(
                f"train_generator: residual_model(d) must return an nn.Module; it returned {type(net).__name__}"
            )
        return net.to(device=device, dtype=dtype)

    return build, {"class": getattr(residual_model, "__qualname__", type(residual_model).__name__)}


def _regress(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, opt, steps: int) -> None:
    """``steps`` optimiser steps on mean_j |model(inputs_j) − targets_j|² (a closure, so LBFGS works too)."""
    scale = 1.0 / inputs.shape[0]

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(inputs), targets, reduction="sum") * scale
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)


# -- the result ---------------------------------------------------------------------------------------------


@attrs.define(eq=False)
class GeneratorResult:
    """What :func:`train_generator` returns.

    ``generator``: the trained module (a :class:`ResidualGenerator` in residual mode).
    ``velocity_sq[i − 1]``, ``fit[i − 1]``: the monitors of iteration i = 1 … ``iterations`` (module
    docstring). ``steps``: the iterations where the evaluation batch was measured (0, every ``every``, the
    last); ``distances[name][k]`` its MMD² / S_ε to the data at ``steps[k]`` (empty without data);
    ``snapshots[k]``: the evaluation batch G(ζ_eval) there, shape (len(steps), N_eval, d).
    ``status``: a :class:`~measureflow.status.Status` (completed, stopped, terminated, nonfinite; a
    non-finite run keeps the values before its first bad iteration);
    ``wall_time`` in seconds (a resumed run adds the earlier time); ``config`` the JSON-able set-up; ``out``
    the trajectory file (or None).
    """

    generator: nn.Module
    velocity_sq: np.ndarray
    fit: np.ndarray
    steps: np.ndarray
    distances: dict
    snapshots: np.ndarray
    status: Status
    wall_time: float
    config: dict = attrs.field(factory=dict)
    out: Path | None = None

    @property
    def ok(self) -> bool:
        return self.status.ok

    @property
    def iterations(self) -> int:
        """Iterations done."""
        return len(self.velocity_sq)

    @property
    def relative_fit(self) -> np.ndarray:
        """fit / (τ²·velocity_sq): the share of the Euler step's squared length the update missed."""
        tau = float(self.config.get("step", 1.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.fit / (tau * tau * self.velocity_sq)

    def __repr__(self) -> str:
        last = ", ".join(f"{k}={v[-1]:.4g}" for k, v in self.distances.items() if len(v))
        return (f"GeneratorResult(status={self.status}, iterations={self.iterations}"
                f"{', ' + last if last else ''}, wall_time={self.wall_time:.3g}s)")


# -- the process and its operations ------------------------------------------------------------------------------


@attrs.frozen(eq=False)
class GeneratorStep:
    """The run's state after iteration ``step``: its two monitors (velocity_sq, fit; a view of the
    process's history on the device, None at step 0) and, where it is measured, the evaluation batch
    G(ζ_eval) of shape (N_eval, d) (None elsewhere)."""

    step: int
    monitors: torch.Tensor | None
    samples: torch.Tensor | None


class GeneratorTrainingProcess(Process):
    """The generator updates of :func:`train_generator` as the run loop drives them: step i is
    iteration i (time i). It keeps the per-iteration monitors on the device (one row per iteration)
    and the evaluation batches measured so far on the host; the state is a :class:`GeneratorStep`."""

    unit = "it"
    checkpoint_format = CHECKPOINT_FORMAT
    differs = "other field, generator, mode, step, batch, optimiser, monitors or seed"

    def __init__(self, *, generator, field, draw, latent_dim: int, dim: int, z_eval, tau: float, mode: str,
                 batch: int, inner_steps: int, optimizer, make_optimizer, new_residual, rng, iterations: int,
                 frames, field_resets, field_dim, data_dim, device, dtype, fingerprint: str,
                 run_parameters: dict | None, names):
        self.generator = generator
        self.field = field
        self.field_name = getattr(field, "name", type(field).__name__)
        self.label = f"train_generator {self.field_name}"
        self.draw = draw
        self.latent_dim = latent_dim
        self.dim = dim
        self.z_eval = z_eval
        self.tau = tau
        self.mode = mode
        self.batch = batch
        self.inner_steps = inner_steps
        self.optimizer = optimizer
        self.make_optimizer = make_optimizer
        self.new_residual = new_residual
        self.rng = rng
        self.n_steps = iterations
        times = self.times()
        self.frames = as_trigger(frames).resolve(times)
        self.field_resets = as_trigger(field_resets).resolve(times)
        self.field_dim = field_dim
        self.data_dim = data_dim
        self.device = device
        self.dtype = dtype
        self._fingerprint = fingerprint
        self.run_parameters = run_parameters
        self.names = list(names)
        # Row i − 1: (velocity_sq, fit) of iteration i.
        self.monitors = torch.full((iterations, 2), math.nan, dtype=dtype, device=device)
        self.snapshot_steps: list[int] = []
        self.snapshots: list[torch.Tensor] = []

    # -- stepping ----------------------------------------------------------------------------------------
    def time_at(self, step: int) -> float:
        return float(step)

    def _reset_field(self) -> None:
        reset = getattr(self.field, "reset", None)
        if callable(reset):
            reset()

    def _evaluate(self) -> torch.Tensor:
        with torch.no_grad():
            return self.generator(self.z_eval)

    def start(self):
        self._reset_field()
        return GeneratorStep(0, None, self._evaluate())

    def advance(self, state, step: int):
        # Dropped on the checkpoint schedule with or without a file: a resumed run sees the same state.
        if step > 0 and self.field_resets(step):
            self._reset_field()
        i = step + 1
        generator, tau = self.generator, self.tau
        z = _draw_latents(self.draw, self.batch, self.rng, self.latent_dim, self.device, self.dtype)
        with torch.no_grad():
            x = generator(z)
        _check_output(x, self.batch, self.latent_dim, self.dim, self.field_dim, self.data_dim, self.field_name)
        x = x.detach()
        w = _velocity(self.field, tau * (i - 1), x, self.field_name)
        self.monitors[i - 1, 0] = (w * w).sum(-1).mean()
        if self.mode == "direct":
            self.monitors[i - 1, 1] = _direct_update(generator, z, x, w, tau, self.optimizer, self.inner_steps)
        else:
            self.monitors[i - 1, 1] = _residual_update(generator, x, w, tau, self.make_optimizer, self.new_residual,
                                                       self.inner_steps)
        samples = self._evaluate() if (i == self.n_steps or self.frames(i)) else None
        return GeneratorStep(i, self.monitors[i - 1], samples)

    def health(self, state):
        parts = [p.reshape(-1) for p in (state.monitors, state.samples) if p is not None]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def frame(self, state):
        return Particles(state.samples[None])

    def keep_snapshot(self, step: int, samples: torch.Tensor) -> None:
        """Keep the evaluation batch of ``step`` on the host (for the result and the checkpoint)."""
        self.snapshot_steps.append(int(step))
        self.snapshots.append(samples.detach().cpu())

    # -- what writers and checkpoints see ------------------------------------------------------------------
    def run_info(self, state, observable_shapes: dict, resume_step):
        from ..io.runinfo import RunInfo

        if self.run_parameters is None:
            return None  # no trajectory file
        names = [*PER_ITERATION, *self.names]
        return RunInfo(kind="particles", replicas=1, size=self.z_eval.shape[0], dim=self.dim,
                       dtype=str(self.dtype).replace("torch.", ""), parameters=self.run_parameters,
                       observable_names=names, observable_shapes={name: (1,) for name in names},
                       resume_step=resume_step)

    def fingerprint(self) -> str:
        return self._fingerprint

    def state_dict(self, state) -> dict:
        generator = self.generator
        return {
            "blocks": len(generator) if isinstance(generator, ResidualGenerator) else 0,
            # Tensors to the host; the residual steps (extra state) are a dict of floats.
            "generator": {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
                          for k, v in generator.state_dict().items()},
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "rng": self.rng.get_state(),
            "monitors": self.monitors[:state.step].detach().cpu(),
            "snapshot_steps": list(self.snapshot_steps),
            "snapshots": list(self.snapshots),
        }

    def load_state_dict(self, saved: dict):
        generator = self.generator
        if isinstance(generator, ResidualGenerator):
            while len(generator) < int(saved["blocks"]):
                generator.append(self.new_residual(), 0.0)  # weights and steps come from the state dict
        generator.load_state_dict(saved["generator"])
        if self.optimizer is not None and saved.get("optimizer") is not None:
            self.optimizer.load_state_dict(saved["optimizer"])
        self.rng.set_state(saved["rng"])
        done = int(saved["monitors"].shape[0])
        self.monitors[:done] = saved["monitors"].to(self.monitors)
        self.snapshot_steps = [int(s) for s in saved["snapshot_steps"]]
        self.snapshots = list(saved["snapshots"])
        self._reset_field()
        return GeneratorStep(done, self.monitors[done - 1] if done else None, None if done else self._evaluate())

    def postfix(self, context) -> dict:
        out = {}
        for name in self.names:
            entries = context.history.get(name)
            if entries:
                out[name] = f"{float(entries[-1][2]):.3g}"
        return out

    # -- the result ---------------------------------------------------------------------------------------
    def result(self, outcome, config: dict, out) -> GeneratorResult:
        kept = steps_kept(outcome)
        monitors = self.monitors[:kept].double().cpu().numpy()
        chosen = [k for k, s in enumerate(self.snapshot_steps) if s <= kept]
        snapshots = (torch.stack([self.snapshots[k] for k in chosen]).double().numpy() if chosen
                     else np.zeros((0, self.z_eval.shape[0], self.dim)))
        distances = {name: np.asarray([float(v) for s, _, v in outcome.history.get(name, []) if s <= kept],
                                      dtype=np.float64) for name in self.names}
        return GeneratorResult(
            generator=self.generator,
            velocity_sq=monitors[:, 0].copy(),
            fit=monitors[:, 1].copy(),
            steps=np.asarray([self.snapshot_steps[k] for k in chosen], dtype=np.int64),
            distances=distances,
            snapshots=snapshots,
            status=outcome.status,
            wall_time=outcome.wall_time,
            config=config,
            out=None if out is None else Path(out),
        )


class EvaluationBatches(Operation):
    """Keeps the evaluation batch G(ζ_eval) on the host on its trigger (the frames' steps), for the
    result's ``snapshots``; it moves data to the host, so the run checks its health first."""

    phase = WRITE
    reads_host = True
    on_last = True

    def __init__(self, process: GeneratorTrainingProcess, every):
        self.process = process
        self.trigger = as_trigger(every)

    def __call__(self, context):
        self.process.keep_snapshot(context.step, context.state.samples)

    def __repr__(self) -> str:
        return f"EvaluationBatches(every={self.trigger!r})"


class GeneratorRecord(Record):
    """The trajectory writer of a generator training: on its trigger the frame (the evaluation batch)
    and the distances measured there, as any :class:`~measureflow.run.Record`; and the per-iteration
    monitors (``velocity_sq``, ``fit``) of every iteration since its last write, moved to the host in
    one copy — on its trigger, before a checkpoint and when the run ends (up to the last iteration
    whose values are finite)."""

    def __init__(self, writer, process: GeneratorTrainingProcess):
        super().__init__(writer)
        self.process = process
        self.context = None
        self.written = 0  # iterations whose per-iteration rows are in the file

    def start(self, context) -> None:
        super().start(context)
        self.context = context
        self.written = context.step

    def write_monitors(self, upto: int) -> None:
        if upto <= self.written:
            return
        rows = self.process.monitors[self.written:upto].double().cpu().numpy()
        for j, (vs, ft) in enumerate(rows, start=self.written + 1):
            self.writer.write_observables(j, float(j), {"velocity_sq": vs.reshape(1), "fit": ft.reshape(1)})
        self.written = upto

    def __call__(self, context):
        self.write_monitors(context.step)
        super().__call__(context)

    def flush(self) -> None:
        if self.opened and self.context is not None:
            self.write_monitors(self.context.step)
        super().flush()

    def finish(self, context, status) -> None:
        if self.opened:
            upto = context.step
            if status is not None and status.code in ("nonfinite", "blowup"):
                upto = min(upto, status.step - 1)
            try:
                self.write_monitors(upto)
            finally:
                super().finish(context, status)
        else:
            super().finish(context, status)


class _OnEvaluationBatch:
    """An observable of the evaluation batch: ``function(Particles(samples[None]), **options)``."""

    def __init__(self, function: Callable):
        self.function = function
        self.__name__ = getattr(function, "__name__", "observable")

    def __call__(self, state: GeneratorStep, **options):
        return self.function(Particles(state.samples[None]), **options)


def _distance_observers(data, bandwidth, epsilon, sinkhorn_options, every) -> list[Observer]:
    from .. import observables

    out = []
    if data is None:
        return out
    if bandwidth is not None:
        out.append(Observer(_OnEvaluationBatch(observables.mmd), "mmd", every, target=data,
                            params={"bandwidth": bandwidth}, shape=(1,)))
    if epsilon is not None:
        out.append(Observer(_OnEvaluationBatch(observables.sinkhorn), "sinkhorn", every, target=data,
                            params={"epsilon": epsilon, **sinkhorn_options}, shape=(1,)))
    return out


def _iteration_callback(callback: Callable, generator: nn.Module) -> Callable:
    """``callback(iteration, generator)`` as a run-loop callback ``f(step, time, state)``."""

    def call(step, time, state):
        return callback(step, generator)

    call.__name__ = getattr(callback, "__name__", "callback")
    return call


# -- training ----------------------------------------------------------------------------------------------------


def train_generator(
    generator,
    field,
    latent,
    *,
    iterations: int = 200,
    batch: int = 256,
    step: float = 0.1,
    mode: str = "direct",
    inner_steps: int = 5,
    lr: float = 1e-3,
    optimizer: Callable | None = None,
    residual_model=None,
    data=None,
    eval_batch: int = 1000,
    every=None,
    mmd_bandwidth: float = 1.0,
    sinkhorn_epsilon: float | None = 0.1,
    sinkhorn_options: dict | None = None,
    out=None,
    parameters: dict | None = None,
    checkpoint=None,
    checkpoint_every=None,
    resume: bool = False,
    seed: int = 0,
    device=None,
    dtype: torch.dtype | None = None,
    progress: bool | None = None,
    callback: Callable | None = None,
) -> GeneratorResult:
    """Train a one-step generator by repeated explicit Euler steps of ``field`` (module docstring).

    Parameters
    ----------
    generator:
        an ``nn.Module`` mapping latents (B, k) to samples (B, d), trained in place; a dict of
        :class:`GeneratorMLP` keyword arguments or None for ``GeneratorMLP(k, d)`` (d from the field's
        ``dim`` or the data), initialised from the run's seed.
    field:
        any field object with ``velocity(t, x, state)``, e.g. ``measureflow.field("drifting", target=data,
        bandwidth=0.05)``, ``measureflow.field("sinkhorn", target=data, epsilon=0.1)``,
        ``measureflow.field("mmd", target=data, bandwidth=0.5)``, ``measureflow.field("kl", target=data,
        mode="smoothed", epsilon=0.05)``. It is evaluated at t = τ(i − 1) on the batch.
    latent:
        k (standard normal latents N(0, I_k)), a measure with ``sample(n, generator)``, or a callable
        ``sampler(n, generator) -> (n, k)``.
    iterations, batch, step:
        number of generator updates (in total, counting those of a resumed run), batch size B, Euler step τ.
    mode, inner_steps:
        ``"direct"`` or ``"residual"`` (module docstring); optimiser steps per iteration.
    lr, optimizer:
        ``optimizer(parameters) -> torch.optim.Optimizer`` (default
        :func:`measureflow.training.default_optimizer`: Adam with ``lr``, fused where supported). It is
        stepped with a closure, so LBFGS works too. Direct mode builds it once; residual mode once per
        iteration.
    residual_model:
        residual mode: ``residual_model(d) -> nn.Module`` (R^d → R^d), a dict of :class:`GeneratorMLP`
        keyword arguments, or None for ``GeneratorMLP(d, d)`` (initialised from the run's seed). Only the
        first residual network is built from it; later ones start from a copy of the previous one.
    data:
        samples or a law to monitor the distance to (Empirical, Gaussian, GaussianMixture, tensor (M, d));
        None: no distance monitors.
    eval_batch, every:
        size of the fixed evaluation batch; its frames and the distance monitors are taken every ``every``
        iterations (int or trigger; default 10) and at the last.
    mmd_bandwidth, sinkhorn_epsilon, sinkhorn_options:
        ℓ of the Gaussian-kernel MMD² and ε of S_ε (cost |x − y|², MATH.md §0); None skips that monitor.
        ``sinkhorn_options`` go to :func:`measureflow.observables.sinkhorn` (default ``{"tol": 1e-6}``: POT's
        marginal tolerance, plenty for a curve and several times cheaper than its 1e-9).
    out, parameters:
        H5MD trajectory path (None: no file) and extra JSON-able parameters stored in it.
    checkpoint, checkpoint_every, resume:
        checkpoint path, written atomically every ``checkpoint_every`` iterations (int or trigger; default
        iterations // 10), when the run is stopped and at the end; ``resume=True`` continues an existing one.
    seed, device, dtype:
        the run's randomness (initial weights when built here, evaluation latents, batches) comes from one
        ``torch.Generator`` on the device seeded with ``seed``; device and dtype default to the generator
        module's (else CUDA when available, float32).
    progress:
        a tqdm bar; None shows it when stderr is a terminal and the CI variable is unset.
    callback:
        ``callback(iteration, generator)`` after every iteration; returning True ends training (status
        ``stopped``).
    """
    iterations = check_int(iterations, "iterations", "train_generator")
    batch = check_int(batch, "batch", "train_generator")
    inner_steps = check_int(inner_steps, "inner_steps", "train_generator")
    eval_batch = check_int(eval_batch, "eval_batch", "train_generator")
    tau = check_positive(step, "step", "train_generator")
    lr = check_positive(lr, "lr", "train_generator")
    if mode not in MODES:
        raise ParameterError(f"train_generator: mode must be one of {', '.join(map(repr, MODES))}; received {mode!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ParameterError(f"train_generator: seed must be an integer; received {seed!r}")
    if resume and checkpoint is None:
        raise ParameterError("train_generator: resume=True needs a checkpoint path (checkpoint='train.ckpt')")
    bandwidth = None if mmd_bandwidth is None else check_positive(mmd_bandwidth, "mmd_bandwidth", "train_generator")
    epsilon = None if sinkhorn_epsilon is None else check_positive(sinkhorn_epsilon, "sinkhorn_epsilon", "train_generator")
    sinkhorn_options = {"tol": 1e-6, **dict(sinkhorn_options or {})}
    monitor_every = as_trigger(DEFAULT_EVERY if every is None else every)
    ckpt_every = as_trigger(max(1, iterations // 10) if checkpoint_every is None else checkpoint_every)
    _check_field(field, tau, iterations)

    # -- device, generator module, latents ------------------------------------------------------------
    device = torch.device(device) if device is not None else default_device(generator)
    if isinstance(generator, nn.Module):
        dtype = dtype or model_dtype(generator)
        generator = generator.to(device=device, dtype=dtype)
    elif generator is None or isinstance(generator, dict):
        dtype = dtype or torch.float32
    else:
        raise ParameterError(
            "train_generator: generator must be an nn.Module mapping latents (B, k) to samples (B, d), a dict of "
            f"GeneratorMLP arguments, or None; received {type(generator).__name__}"
        )
    rng = torch.Generator(device=device)
    rng.manual_seed(int(seed))
    draw, k, latent_desc = _latent_sampler(latent, device, dtype)
    # The evaluation latents come first from the seed: they fix k for a sampler that does not declare it.
    z_eval = _draw_latents(draw, eval_batch, rng, k, device, dtype)
    k = int(z_eval.shape[1])
    field_name = getattr(field, "name", type(field).__name__)
    field_dim = getattr(field, "dim", None)
    data_dim = _data_dim(data)
    if field_dim is not None and data_dim is not None and field_dim != data_dim:
        raise ShapeError(
            f"train_generator: field {field_name!r} has dimension d = {field_dim} but data has d = {data_dim}"
        )
    if not isinstance(generator, nn.Module):
        d = field_dim if field_dim is not None else data_dim
        if d is None:
            raise ParameterError(
                f"train_generator: the output dimension is unknown (field {field_name!r} has no dim and no data was "
                "given); pass a generator module"
            )
        # Initialised from the run's generator: the seed fixes the initial weights too.
        generator = GeneratorMLP(k, d, **dict(generator or {}), device=device, dtype=dtype, generator=rng)
    with torch.no_grad():
        x_eval = generator(z_eval)
    d = _check_output(x_eval, eval_batch, k, None, field_dim, data_dim, field_name)

    # -- residual machinery -----------------------------------------------------------------------------
    make_optimizer = optimizer if optimizer is not None else (lambda params: default_optimizer(params, lr))
    new_residual = None
    residual_desc = None
    if mode == "residual":
        if not isinstance(generator, ResidualGenerator):
            generator = ResidualGenerator(generator)
        new_residual, residual_desc = _residual_factory(residual_model, d, device, dtype, rng)
        opt = None
    else:
        if residual_model is not None:
            raise ParameterError("train_generator: residual_model applies to mode='residual' only")
        opt = make_optimizer(generator.parameters())
    data = _data_on(data, device, dtype)

    config = to_jsonable_lenient({
        "mode": mode,
        "step": tau,
        "batch": batch,
        "inner_steps": inner_steps,
        "lr": lr,
        "optimizer": None if opt is None else type(opt).__name__,
        "generator": _module_desc(generator.base if mode == "residual" else generator),
        "residual_model": residual_desc,
        "latent": latent_desc,
        "field": _describe(field),
        "seed": int(seed),
        "eval_batch": eval_batch,
        "every": repr(monitor_every),
        "mmd_bandwidth": bandwidth,
        "sinkhorn_epsilon": epsilon,
        "sinkhorn_options": sinkhorn_options if epsilon is not None else None,
        "dtype": str(dtype).replace("torch.", ""),
    })
    fingerprint = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    config["iterations"] = iterations

    run_parameters = None
    if out is not None:
        from ..io.runinfo import default_versions
        from ..plugins import get_registry

        run_parameters = {
            **dict(parameters or {}),
            "field": _describe(field),
            "integrator": {"name": f"one-step generator ({config['mode']}, τ = {config['step']:g})"},
            "training": config,
            "versions": default_versions(get_registry()),
        }
    observers = _distance_observers(data, bandwidth, epsilon, sinkhorn_options, monitor_every)
    process = GeneratorTrainingProcess(
        generator=generator, field=field, draw=draw, latent_dim=k, dim=d, z_eval=z_eval, tau=tau, mode=mode,
        batch=batch, inner_steps=inner_steps, optimizer=opt, make_optimizer=make_optimizer,
        new_residual=new_residual, rng=rng, iterations=iterations, frames=monitor_every, field_resets=ckpt_every,
        field_dim=field_dim, data_dim=data_dim, device=device, dtype=dtype, fingerprint=fingerprint,
        run_parameters=run_parameters, names=[o.name for o in observers],
    )
    operations: list[Operation] = [*observers, EvaluationBatches(process, monitor_every)]
    if out is not None:
        from ..io.h5md import H5MDWriter

        operations.append(GeneratorRecord(H5MDWriter(out, every=monitor_every), process))
    if callback is not None:
        operations.append(Callback(_iteration_callback(callback, generator)))
    loop = RunLoop(
        process, operations,
        # The monitors have no blow-up bound; their health is read where the batch is measured.
        stop=StopPolicy(blowup=None),
        checkpointing=Checkpointing(path=checkpoint, every=ckpt_every, resume=bool(resume), at_end=True),
        progress=progress,
    )
    return process.result(loop.run(), config, out)


# -- the run as a scenario returns it ---------------------------------------------------------------------------


def _training_keywords() -> frozenset:
    return frozenset(p.name for p in inspect.signature(train_generator).parameters.values()
                     if p.kind is inspect.Parameter.KEYWORD_ONLY)


#: Keywords of train_generator that GeneratorTraining holds as attributes, not in ``options``.
_ATTRIBUTE_KEYWORDS = frozenset({"out", "parameters", "checkpoint", "checkpoint_every", "resume", "progress"})


@attrs.frozen(eq=False)
class GeneratorTraining:
    """A generator training as a run (:class:`~measureflow.scenario.Runnable`): what a scenario returns,
    fixed once built; :meth:`run` calls :func:`train_generator`.

    ``generator``, ``field``, ``latent`` and ``options`` (the other keyword arguments of
    :func:`train_generator`) set up the training; ``out`` is the H5MD file; ``parameters`` and
    ``description`` are recorded in it; ``progress``, ``checkpoint_path``, ``checkpoint_trigger`` and
    ``resume`` are the run's. ``writers`` (the output file's writer) and ``n_steps`` (the iterations) are
    what the scenario runner reads; :meth:`with_options` and :meth:`with_checkpoint` return new runs, so
    ``measureflow run`` keeps a checkpoint beside the H5MD file, resumes with ``--resume`` and removes the
    checkpoint once training completes, exactly as for a :class:`~measureflow.Simulation`.

    :meth:`run` trains a copy of a ``generator`` module, so the spec itself never changes and every run
    starts from the same weights.
    """

    generator: Any
    field: Any
    latent: Any
    options: dict = attrs.field(factory=dict, converter=dict)
    out: str | Path | None = None
    parameters: dict = attrs.field(factory=dict, converter=dict)
    description: str = ""
    progress: bool | None = None
    checkpoint_path: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    checkpoint_trigger: Any = None
    resume: bool = attrs.field(default=False, converter=bool)

    def __attrs_post_init__(self):
        reserved = _ATTRIBUTE_KEYWORDS & set(self.options)
        if reserved:
            raise ParameterError(
                f"GeneratorTraining: give {', '.join(sorted(reserved))} as attributes, not in options"
            )
        unknown = set(self.options) - _training_keywords()
        if unknown:
            raise ParameterError(
                f"GeneratorTraining: options {sorted(unknown)} are not keyword arguments of train_generator"
            )
        if self.resume and self.checkpoint_path is None:
            raise ParameterError("GeneratorTraining: resume=True needs a checkpoint path (with_checkpoint(path))")

    @property
    def n_steps(self) -> int:
        return int(self.options.get("iterations", 200))

    @property
    def writers(self) -> tuple:
        """The trajectory writer the run will use (unopened), as on a Simulation."""
        from ..io.h5md import H5MDWriter

        if self.out is None:
            return ()
        return (H5MDWriter(self.out, every=self.options.get("every") or DEFAULT_EVERY),)

    def with_options(self, **options) -> "GeneratorTraining":
        """The same training with other ``parameters``, ``description``, ``progress``, ``out``,
        ``generator``, ``field``, ``latent`` or :func:`train_generator` keyword options."""
        own = {"generator", "field", "latent", "out", "parameters", "description", "progress"}
        keywords = _training_keywords() - _ATTRIBUTE_KEYWORDS
        unknown = set(options) - own - keywords
        if unknown:
            raise ParameterError(
                f"GeneratorTraining.with_options: unknown options {sorted(unknown)}; use its attributes "
                "or keyword arguments of train_generator"
            )
        changes = {key: value for key, value in options.items() if key in own}
        extra = {key: value for key, value in options.items() if key not in own}
        if extra:
            changes["options"] = {**self.options, **extra}
        return attrs.evolve(self, **changes)

    def with_checkpoint(self, path, every=None, resume: bool | None = None) -> "GeneratorTraining":
        """The same training saving its checkpoint to ``path`` every ``every`` iterations (default: a
        tenth of the run), resuming from it when ``resume``."""
        return attrs.evolve(self, checkpoint_path=path, checkpoint_trigger=every,
                            resume=self.resume if resume is None else bool(resume))

    def run(self) -> GeneratorResult:
        generator = self.generator
        if isinstance(generator, nn.Module):
            generator = copy.deepcopy(generator)
        return train_generator(
            generator, self.field, self.latent, out=self.out,
            parameters={"parameters": self.parameters, "description": self.description},
            checkpoint=self.checkpoint_path, checkpoint_every=self.checkpoint_trigger, resume=self.resume,
            progress=self.progress, **self.options,
        )
