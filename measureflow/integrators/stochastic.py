"""Euler–Maruyama for fields with a noise term dXₜ = v_t[μₜ](Xₜ) dt + σ(t) dWₜ.

One step of h = t1 − t0 > 0 per :meth:`EulerMaruyama.advance`:

    x' = x + h·v_{t0}[μ](x) + σ(t0)·√h·ξ,    ξ ~ N(0, I) i.i.d. per particle and coordinate,

with ξ drawn from the run's seeded ``torch.Generator`` on the state's device and dtype, so the noise
stream is reproducible and lives in the generator (which the simulation checkpoints). Weak order 1,
strong order ½. The particle path never synchronises with the host.

* A field without ``diffusion`` makes this exactly explicit Euler and draws nothing.
* A Gaussian state is advanced deterministically: a field's ``affine`` closure is the law's velocity
  (probability flow), so the Gaussian step is the Euler pushforward m' = m + hb,
  Σ' = (I + hA)Σ(I + hA)ᵀ, with the SPD safeguard of the fixed-step methods.
* h < 0 is refused: a diffusion cannot be run backwards in time by flipping the step.
"""

from __future__ import annotations

import math

import torch

from ..errors import TimeRangeError
from ..fields import capabilities
from .base import Integrator, as_time
from .runge_kutta import advance_gaussians
from .systems import GaussianSystem, ParticleSystem, system_for

__all__ = ["EulerMaruyama", "ReplicaNoise", "standard_normal"]


class ReplicaNoise:
    """Noise streams of a batch that stacks several runs along the replica axis (a packed sweep).

    Block i — ``replicas[i]`` consecutive replicas — draws from its own generator seeded with
    ``seeds[i]``, so each run receives the noise it would draw alone. Use it where a
    ``torch.Generator`` goes; :func:`standard_normal` draws block by block. ``get_state`` /
    ``set_state`` stack the blocks' states so that checkpoints hold every stream.
    """

    def __init__(self, seeds, replicas, device):
        if len(seeds) != len(replicas) or not seeds:
            raise ValueError(
                f"ReplicaNoise needs one seed per block; received {len(seeds)} seeds, {len(replicas)} blocks"
            )
        self.device = torch.device(device)
        self.replicas = tuple(int(r) for r in replicas)
        self.generators = [torch.Generator(device=self.device) for _ in seeds]
        for generator, seed in zip(self.generators, seeds):
            generator.manual_seed(int(seed))

    def standard_normal(self, shape, like: torch.Tensor) -> torch.Tensor:
        if shape[0] != sum(self.replicas):
            raise ValueError(
                f"ReplicaNoise holds streams for {sum(self.replicas)} replicas {self.replicas}; "
                f"a draw of shape {tuple(shape)} asks for {shape[0]}"
            )
        rest = tuple(shape[1:])
        return torch.cat([standard_normal((r, *rest), like, g) for g, r in zip(self.generators, self.replicas)])

    def get_state(self) -> torch.Tensor:
        return torch.stack([g.get_state() for g in self.generators])

    def set_state(self, state: torch.Tensor) -> None:
        for generator, row in zip(self.generators, state):
            generator.set_state(row.clone())  # a row of the stack is a view; the generator needs its own storage


def standard_normal(shape, like: torch.Tensor, generator) -> torch.Tensor:
    """ξ ~ N(0, I) of ``shape`` with like's dtype and device, drawn from ``generator``.

    A generator on another device than the state (e.g. a CPU generator for a CUDA state) draws on
    its own device and the sample is copied over, asynchronously. A :class:`ReplicaNoise` draws
    each block of replicas from its own stream.
    """
    if isinstance(generator, ReplicaNoise):
        return generator.standard_normal(shape, like)
    if generator is None or generator.device == like.device:
        return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)
    xi = torch.randn(shape, generator=generator, dtype=like.dtype, device=generator.device)
    return xi.to(like.device, non_blocking=True)


class EulerMaruyama(Integrator):
    """Euler–Maruyama (see the module docstring).

    Parameters
    ----------
    max_halvings:
        Gaussian states only, as for the fixed-step Runge–Kutta methods.
    """

    name = "euler_maruyama"
    order = 1  # weak order (strong order 1/2)
    adaptive = False
    stochastic = True

    def __init__(self, *, max_halvings: int = 10):
        super().__init__()
        if int(max_halvings) < 0:
            raise ValueError(f"max_halvings must be >= 0; received {max_halvings!r}")
        self.max_halvings = int(max_halvings)

    @property
    def options(self) -> dict:
        return {"max_halvings": self.max_halvings}

    def advance(self, field, state, t0: float, t1: float, generator: torch.Generator | None = None):
        """One step from t0 to t1 > t0 (noise from ``generator``; None uses torch's global RNG)."""
        self.check(field, state)
        t0, t1 = as_time(t0, "t0"), as_time(t1, "t1")
        h = t1 - t0
        if h < 0:
            raise TimeRangeError(
                f"euler_maruyama integrates forward in time only; received t0 = {t0:.9g} > t1 = {t1:.9g}. "
                "Integrate the probability-flow ODE backwards with a deterministic integrator "
                "('euler', 'rk4', 'dopri5') instead"
            )
        system = system_for(state)
        if system is GaussianSystem:

            def step(t, y, dt):
                self.stats["nfev"] += 1
                return GaussianSystem.euler_pushforward(field, t, state, y, dt)

            return advance_gaussians(self, step, state, t0, t1, self.max_halvings)

        x = state.x
        self.stats["nfev"] += 1
        (v,) = ParticleSystem.rate(field, t0, state, (x,))
        x_new = x + h * v
        if "diffusion" in capabilities(field):
            sigma = field.diffusion(t0)
            xi = standard_normal(x.shape, x, generator)
            x_new = x_new + (sigma * math.sqrt(h)) * xi
        self.stats["steps"] += 1
        self.stats["accepted"] += 1
        return state.with_positions(x_new)
