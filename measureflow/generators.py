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

**File.** With ``out``, an H5MD trajectory (:class:`~measureflow.io.h5md.H5MDWriter`) holds the
evaluation batch as one replica of N = ``eval_batch`` particles, one frame every ``every`` iterations
(and the last), step = time = iteration; observables ``mmd`` and ``sinkhorn`` at the frames,
``velocity_sq`` and ``fit`` at every iteration (step i for iteration i).
``measureflow plot FILE`` draws it.

**Checkpoints and resumption.** The generator, the optimiser, the random generator's state and the
monitors are saved every ``checkpoint_every`` iterations (:func:`measureflow.io.checkpoint.save_checkpoint`,
atomic); ``resume=True`` continues from the checkpoint and gives the uninterrupted run's result bit for
bit. A field that keeps a warm start between calls (``reset()``, e.g. the Sinkhorn potentials) has it
dropped on the same schedule whether or not checkpoints are written, so that its state after an
interruption is the uninterrupted run's.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import threading
import time as _time
from pathlib import Path
from typing import Any, Callable

import attrs
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .errors import CapabilityError, ParameterError, ShapeError, TimeRangeError
from .fields import capabilities
from .learning import VelocityMLP, _jsonable, default_device, default_optimizer, model_dtype, progress_enabled
from .scenario import Scenario
from .run import install_sigterm
from .status import Status
from .state import Particles
from .triggers import as_trigger

__all__ = [
    "GeneratorMLP",
    "ResidualGenerator",
    "GeneratorResult",
    "GeneratorTraining",
    "train_generator",
    "generator_scenario",
    "GeneratorScenario",
    "MODES",
]

MODES = ("direct", "residual")
CHECKPOINT_FORMAT = "measureflow-generator-training-1"
#: Frames and distance monitors every this many iterations when ``every`` is not given.
DEFAULT_EVERY = 10
#: The observables a run records (see the module docstring).
PER_ITERATION = ("velocity_sq", "fit")
DISTANCES = ("mmd", "sinkhorn")


# -- networks ------------------------------------------------------------------------------------------------


class GeneratorMLP(nn.Module):
    """A multilayer perceptron G : R^k → R^d (``latent_dim`` k, ``dim`` d): ``depth`` hidden layers of
    width ``hidden`` with SiLU activations and a linear output layer.

    ``forward(z)`` takes z of shape (..., k) and returns (..., d). ``config`` holds the constructor
    arguments. ``generator`` draws the initial weights (PyTorch's ``nn.Linear`` law, as
    :meth:`measureflow.learning.VelocityMLP.reset_parameters`); without it they come from the global
    torch random state. The same class serves as the residual field U_η : R^d → R^d (k = d).
    """

    def __init__(self, latent_dim: int, dim: int, hidden: int = 64, depth: int = 3, *, device=None, dtype=None,
                 generator: torch.Generator | None = None):
        super().__init__()
        for name, value in (("latent_dim", latent_dim), ("dim", dim), ("hidden", hidden), ("depth", depth)):
            if isinstance(value, bool) or int(value) != value or int(value) < 1:
                raise ParameterError(f"GeneratorMLP: {name} must be an integer >= 1; received {value!r}")
        self.config = {"latent_dim": int(latent_dim), "dim": int(dim), "hidden": int(hidden), "depth": int(depth)}
        factory = {"device": device, "dtype": dtype}
        layers: list[nn.Module] = [nn.Linear(int(latent_dim), int(hidden), **factory), nn.SiLU()]
        for _ in range(int(depth) - 1):
            layers += [nn.Linear(int(hidden), int(hidden), **factory), nn.SiLU()]
        layers.append(nn.Linear(int(hidden), int(dim), **factory))
        self.net = nn.Sequential(*layers)
        if generator is not None:
            self.reset_parameters(generator)

    # The same initialisation law as the velocity network, drawn from an explicit generator.
    reset_parameters = VelocityMLP.reset_parameters

    @property
    def latent_dim(self) -> int:
        return self.config["latent_dim"]

    @property
    def dim(self) -> int:
        return self.config["dim"]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[-1] != self.latent_dim:
            raise ShapeError(
                f"GeneratorMLP: z must have shape (..., k) with k = {self.latent_dim}; received {tuple(z.shape)}"
            )
        return self.net(z)

    def extra_repr(self) -> str:
        c = self.config
        return f"latent_dim={c['latent_dim']}, dim={c['dim']}, hidden={c['hidden']}, depth={c['depth']}"


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


def _positive_int(value, name) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise ParameterError(f"train_generator: {name} must be a positive integer; received {value!r}")
    return int(value)


def _positive_float(value, name) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ParameterError(f"train_generator: {name} must be a positive number; received {value!r}") from None
    if not (out > 0 and math.isfinite(out)):
        raise ParameterError(f"train_generator: {name} must be positive and finite; received {value!r}")
    return out


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
        return _jsonable(describe())
    return {"name": getattr(obj, "name", type(obj).__name__)}


def _module_desc(module: nn.Module) -> dict:
    return {"class": f"{type(module).__module__}.{type(module).__qualname__}",
            "config": _jsonable(getattr(module, "config", None))}


# -- the result ---------------------------------------------------------------------------------------------


@attrs.define(eq=False)
class GeneratorResult:
    """What :func:`train_generator` returns.

    ``generator``: the trained module (a :class:`ResidualGenerator` in residual mode).
    ``velocity_sq[i − 1]``, ``fit[i − 1]``: the monitors of iteration i = 1 … ``iterations`` (module
    docstring). ``steps``: the iterations where the evaluation batch was measured (0, every ``every``, the
    last); ``distances[name][k]`` its MMD² / S_ε to the data at ``steps[k]`` (empty without data);
    ``snapshots[k]``: the evaluation batch G(ζ_eval) there, shape (len(steps), N_eval, d).
    ``status``: a :class:`~measureflow.simulation.Status` (completed, stopped, terminated, nonfinite);
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
        ``optimizer(parameters) -> torch.optim.Optimizer`` (default :func:`measureflow.learning.default_optimizer`: Adam with ``lr``, fused where supported). It is stepped with a
        closure, so LBFGS works too. Direct mode builds it once; residual mode once per iteration.
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
        iterations // 10) and at the end; ``resume=True`` continues an existing one.
    seed, device, dtype:
        the run's randomness (initial weights when built here, evaluation latents, batches) comes from one
        ``torch.Generator`` on the device seeded with ``seed``; device and dtype default to the generator
        module's (else CUDA when available, float32).
    progress:
        a tqdm bar; None shows it when stderr is a terminal and the CI variable is unset.
    callback:
        ``callback(iteration, generator)`` after every iteration; returning True ends training (status
        ``"stopped"``).
    """
    iterations = _positive_int(iterations, "iterations")
    batch = _positive_int(batch, "batch")
    inner_steps = _positive_int(inner_steps, "inner_steps")
    eval_batch = _positive_int(eval_batch, "eval_batch")
    tau = _positive_float(step, "step")
    lr = _positive_float(lr, "lr")
    if mode not in MODES:
        raise ParameterError(f"train_generator: mode must be one of {', '.join(map(repr, MODES))}; received {mode!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ParameterError(f"train_generator: seed must be an integer; received {seed!r}")
    if resume and checkpoint is None:
        raise ParameterError("train_generator: resume=True needs a checkpoint path (checkpoint='train.ckpt')")
    bandwidth = None if mmd_bandwidth is None else _positive_float(mmd_bandwidth, "mmd_bandwidth")
    epsilon = None if sinkhorn_epsilon is None else _positive_float(sinkhorn_epsilon, "sinkhorn_epsilon")
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

    config = _jsonable({
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

    rec = _Recorder(iterations, dtype, device, _distance_names(data, bandwidth, epsilon))
    start = 0
    earlier_time = 0.0
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if resume and ckpt_path.exists():
        start, earlier_time = _load(ckpt_path, fingerprint, iterations, generator, opt, rng, new_residual, rec)
    if out is not None:
        rec.writer = _open_writer(out, monitor_every, eval_batch, d, dtype, rec.names, config, field, parameters,
                                  start if (resume and start > 0) else None)
    rec.written = start

    def measure(i: int) -> bool:
        with torch.no_grad():
            xe = generator(z_eval)
        return rec.measure(i, xe, lambda: _distances(xe, data, bandwidth, epsilon, sinkhorn_options))

    def save(i: int, elapsed: float):
        rec.write_pending(i)
        rec.flush()
        _save(ckpt_path, fingerprint, config, i, generator, opt, rng, rec, earlier_time + elapsed)

    bar = None
    status = None
    stop_flag = threading.Event()
    restore_signal = install_sigterm(stop_flag)
    t_start = _time.monotonic()
    i = checked = start
    reset = getattr(field, "reset", None)
    try:
        if start == 0 and not measure(0):
            status = Status("nonfinite", 0, 0.0, "the initial generator outputs non-finite samples")
        if progress_enabled(progress) and start < iterations and status is None:
            from tqdm.auto import tqdm

            bar = tqdm(total=iterations, initial=start, desc=f"train_generator {field_name}", unit="it",
                       file=sys.stderr, dynamic_ncols=True)
        while status is None and i < iterations:
            i += 1
            z = _draw_latents(draw, batch, rng, k, device, dtype)
            with torch.no_grad():
                x = generator(z)
            _check_output(x, batch, k, d, field_dim, data_dim, field_name)
            x = x.detach()
            w = _velocity(field, tau * (i - 1), x, field_name)
            rec.velocity_sq[i - 1] = (w * w).sum(-1).mean()
            if mode == "direct":
                rec.fit[i - 1] = _direct_update(generator, z, x, w, tau, opt, inner_steps)
            else:
                rec.fit[i - 1] = _residual_update(generator, x, w, tau, make_optimizer, new_residual, inner_steps)
            stop = bool(callback(i, generator)) if callback is not None else False
            last = i == iterations
            if last or monitor_every(i) or ckpt_every(i) or stop or stop_flag.is_set():
                bad = rec.first_nonfinite(checked, i)
                checked = i
                if bad is not None:
                    status = Status("nonfinite", bad, float(bad),
                                    f"the field or the fit became non-finite at iteration {bad}; lower the step or lr")
                    break
            if last or monitor_every(i):
                rec.write_pending(i)
                if not measure(i):
                    status = Status("nonfinite", i, float(i),
                                    f"the generator outputs non-finite samples at iteration {i}; lower the step or lr")
                    break
                if bar is not None and rec.names:
                    bar.set_postfix({n: f"{v[-1]:.3g}" for n, v in rec.distances.items()}, refresh=False)
            if ckpt_every(i) and not last:
                if ckpt_path is not None:
                    save(i, _time.monotonic() - t_start)
                # Dropped on the checkpoint schedule with or without a file: a resumed run sees the same state.
                if callable(reset):
                    reset()
            if bar is not None:
                bar.update(1)
            if stop or stop_flag.is_set():
                status = Status("stopped" if stop else "terminated", i, float(i),
                                "the callback asked to stop" if stop else "SIGTERM received; stopped cleanly")
                break
        if status is None:
            status = Status("completed", i, float(i))
        if ckpt_path is not None and i > start and status.code != "nonfinite":
            save(i, _time.monotonic() - t_start)
        else:
            rec.write_pending(i)
    except BaseException:
        if status is None:
            status = Status("interrupted", i, float(i), "an exception ended training")
        raise
    finally:
        if bar is not None:
            bar.close()
        restore_signal()
        rec.close(status)
    return rec.result(generator, i, status, earlier_time + _time.monotonic() - t_start, config, out, (eval_batch, d))


def _velocity(field, t: float, x: torch.Tensor, field_name: str) -> torch.Tensor:
    """w = v_t[μ̂](x) with the batch as the state: x (B, d) → (B, d)."""
    w = field.velocity(t, x[None], Particles(x[None]))
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


class _Recorder:
    """The monitors of a run: per-iteration values on the device, measurements of the evaluation batch on the
    host, and the trajectory file they go to (rows leave the device only in ``write_pending``/``measure``)."""

    def __init__(self, iterations: int, dtype, device, names: list[str]):
        self.velocity_sq = torch.full((iterations,), math.nan, dtype=dtype, device=device)
        self.fit = torch.full((iterations,), math.nan, dtype=dtype, device=device)
        self.names = list(names)
        self.steps: list[int] = []
        self.distances: dict[str, list[float]] = {n: [] for n in self.names}
        self.snapshots: list[torch.Tensor] = []
        self.writer = None
        self.written = 0  # iterations whose per-iteration rows are in the file

    def first_nonfinite(self, since: int, upto: int) -> int | None:
        window = torch.stack([self.velocity_sq[since:upto], self.fit[since:upto]])
        bad = ~torch.isfinite(window).all(0)
        if bool(bad.any()):  # host sync, at measurement/checkpoint points only
            return since + int(bad.nonzero()[0, 0]) + 1
        return None

    def write_pending(self, upto: int) -> None:
        if self.writer is not None and upto > self.written:
            # One device→host copy for the window, then one row per iteration.
            rows = torch.stack([self.velocity_sq[self.written:upto], self.fit[self.written:upto]], 1)
            for j, (vs, ft) in enumerate(rows.double().cpu().numpy(), start=self.written + 1):
                self.writer.write_observables(j, float(j), {"velocity_sq": vs.reshape(1), "fit": ft.reshape(1)})
        self.written = max(self.written, upto)

    def measure(self, i: int, x: torch.Tensor, distances: Callable[[], dict]) -> bool:
        """Record the evaluation batch x at iteration i and its distances; False when x is not finite."""
        if not bool(torch.isfinite(x).all()):  # host sync, at measurement points only
            return False
        values = distances()
        self.steps.append(i)
        for name, value in values.items():
            self.distances[name].append(float(value))
        self.snapshots.append(x.detach().cpu())
        if self.writer is not None:
            self.writer.write_frame(i, float(i), Particles(x[None]))
            if values:
                self.writer.write_observables(i, float(i), {n: v.reshape(1) for n, v in values.items()})
        return True

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self, status: Status) -> None:
        if self.writer is not None:
            try:
                self.writer.set_status(status.code, status.step, status.time, status.message)
            finally:
                self.writer.close()

    def state(self, upto: int) -> dict:
        return {"velocity_sq": self.velocity_sq[:upto].detach().cpu(), "fit": self.fit[:upto].detach().cpu(),
                "steps": list(self.steps), "distances": {n: list(v) for n, v in self.distances.items()},
                "snapshots": list(self.snapshots)}

    def load(self, payload: dict, upto: int) -> None:
        self.velocity_sq[:upto] = payload["velocity_sq"].to(self.velocity_sq)
        self.fit[:upto] = payload["fit"].to(self.fit)
        self.steps = list(payload["steps"])
        self.distances = {n: list(payload["distances"].get(n, [])) for n in self.names}
        self.snapshots = list(payload["snapshots"])

    def result(self, generator, done, status, wall_time, config, out, frame_shape) -> "GeneratorResult":
        snapshots = (torch.stack(self.snapshots).double().numpy() if self.snapshots
                     else np.zeros((0, *frame_shape)))
        return GeneratorResult(
            generator=generator,
            velocity_sq=self.velocity_sq[:done].double().cpu().numpy(),
            fit=self.fit[:done].double().cpu().numpy(),
            steps=np.asarray(self.steps, dtype=np.int64),
            distances={n: np.asarray(v, dtype=np.float64) for n, v in self.distances.items()},
            snapshots=snapshots,
            status=status,
            wall_time=wall_time,
            config=config,
            out=None if out is None else Path(out),
        )


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


def _distance_names(data, bandwidth, epsilon) -> list[str]:
    if data is None:
        return []
    return [n for n, p in zip(DISTANCES, (bandwidth, epsilon)) if p is not None]


def _distances(x: torch.Tensor, data, bandwidth, epsilon, sinkhorn_options) -> dict:
    from . import observables

    if data is None:
        return {}
    state = Particles(x[None])
    out = {}
    if bandwidth is not None:
        out["mmd"] = observables.mmd(state, target=data, bandwidth=bandwidth)[0]
    if epsilon is not None:
        out["sinkhorn"] = observables.sinkhorn(state, target=data, epsilon=epsilon, **sinkhorn_options)[0]
    return out


def _open_writer(out, trigger, n, d, dtype, names, config, field, parameters, resume_step):
    from .io.h5md import H5MDWriter
    from .io.runinfo import RunInfo, default_versions
    from .plugins import get_registry

    run_parameters = {
        **dict(parameters or {}),
        "field": _describe(field),
        "integrator": {"name": f"one-step generator ({config['mode']}, τ = {config['step']:g})"},
        "training": config,
        "versions": default_versions(get_registry()),
    }
    observables = [*PER_ITERATION, *names]
    writer = H5MDWriter(out, every=trigger)
    writer.open(RunInfo(kind="particles", replicas=1, size=n, dim=d, dtype=str(dtype).replace("torch.", ""),
                        parameters=run_parameters, observable_names=observables,
                        observable_shapes={name: (1,) for name in observables}, resume_step=resume_step))
    return writer


def _save(path, fingerprint, config, iteration, generator, opt, rng, rec: _Recorder, wall_time):
    from .io.checkpoint import save_checkpoint

    payload = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "config": config,
        "iteration": int(iteration),
        "blocks": len(generator) if isinstance(generator, ResidualGenerator) else 0,
        # Tensors to the host; the residual steps (extra state) are a dict of floats.
        "generator": {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
                      for k, v in generator.state_dict().items()},
        "optimizer": None if opt is None else opt.state_dict(),
        "rng": rng.get_state(),
        "monitors": rec.state(iteration),
        "wall_time": float(wall_time),
    }
    save_checkpoint(path, payload)


def _load(path, fingerprint, iterations, generator, opt, rng, new_residual, rec: _Recorder):
    from .io.checkpoint import load_training_checkpoint

    payload, done = load_training_checkpoint(
        path, owner="train_generator", expected_format=CHECKPOINT_FORMAT, fingerprint=fingerprint,
        counter="iteration", limit=iterations,
        differs="other field, generator, mode, step, batch, optimiser, monitors or seed",
    )
    if isinstance(generator, ResidualGenerator):
        while len(generator) < int(payload["blocks"]):
            generator.append(new_residual(), 0.0)  # weights and steps come from the state dict
    generator.load_state_dict(payload["generator"])
    if opt is not None and payload.get("optimizer") is not None:
        opt.load_state_dict(payload["optimizer"])
    rng.set_state(payload["rng"])
    rec.load(payload["monitors"], done)
    return done, float(payload.get("wall_time", 0.0))


# -- scenarios ----------------------------------------------------------------------------------------------


@attrs.define(eq=False)
class GeneratorTraining:
    """A generator training set up by a scenario: :meth:`run` calls :func:`train_generator`.

    It carries what the scenario runner sets and reads on a :class:`~measureflow.Simulation`
    (``parameters``, ``description``, ``progress``, ``checkpoint_path``, ``checkpoint_trigger``, ``resume``,
    ``writers`` for the output path, ``n_steps``), so ``measureflow run`` keeps a checkpoint beside the H5MD
    file, resumes with ``--resume`` and removes the checkpoint once training completes. ``options`` are the
    keyword arguments of :func:`train_generator` other than those.
    """

    generator: Any
    field: Any
    latent: Any
    options: dict = attrs.field(factory=dict)
    out: str | Path | None = None
    parameters: dict = attrs.field(factory=dict)
    description: str = ""
    progress: bool | None = None
    checkpoint_path: Path | None = None
    checkpoint_trigger: Any = None
    resume: bool = False

    def __attrs_post_init__(self):
        reserved = {"out", "parameters", "checkpoint", "checkpoint_every", "resume", "progress"} & set(self.options)
        if reserved:
            raise ParameterError(
                f"GeneratorTraining: give {', '.join(sorted(reserved))} as attributes, not in options"
            )

    @property
    def n_steps(self) -> int:
        return int(self.options.get("iterations", 200))

    @property
    def writers(self) -> tuple:
        """The trajectory writer the run will use (unopened), as on a Simulation."""
        from .io.h5md import H5MDWriter

        if self.out is None:
            return ()
        return (H5MDWriter(self.out, every=self.options.get("every") or DEFAULT_EVERY),)

    def run(self) -> GeneratorResult:
        return train_generator(
            self.generator, self.field, self.latent, out=self.out,
            parameters={"parameters": self.parameters, "description": self.description},
            checkpoint=self.checkpoint_path, checkpoint_every=self.checkpoint_trigger, resume=self.resume,
            progress=self.progress, **self.options,
        )


class GeneratorScenario(Scenario):
    """A scenario whose function returns a :class:`GeneratorTraining` instead of a Simulation; it runs
    through the same path (``python file.py``, ``measureflow run file.py``, ``--set``, ``--resume``)."""

    def build(self, overrides: dict | None = None):
        params = self.resolve(overrides)
        training = self.function(**params)
        if not isinstance(training, GeneratorTraining):
            raise ParameterError(
                f"scenario {self.name!r} must return a measureflow.generators.GeneratorTraining; it returned "
                f"{type(training).__name__}"
            )
        training.parameters = {**params, **training.parameters}
        training.description = training.description or self.doc.split("\n")[0]
        return training, params


def generator_scenario(function: Callable | None = None, *, name: str | None = None):
    """Decorator like :func:`measureflow.scenario` for functions returning a :class:`GeneratorTraining`."""
    if function is None:
        return lambda f: GeneratorScenario(f, name=name)
    return GeneratorScenario(function, name=name)
