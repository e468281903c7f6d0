"""A field bound to one run: the system of channels a solver integrates (DESIGN.md "state channels").

A solver sees a state as a tuple of tensors, its **integrated channels**, and their rates:

* particles: ``y = (x, c₁, c₂, …)`` — the positions and one tensor per auxiliary
  :class:`Channel` of the run (a log-density, an action…), with
  ẋ = v_t[μ_y](x) where μ_y is the stage's own measure (a mean-field field sees the intermediate
  particles, not the step's starting ones) and ċᵢ given by the channel's rule;
* particles whose weights move (a field with ``weight_rate(t, state)``: the Fisher–Rao and WFR
  geometries, :mod:`measureflow.geometry`): ``y = (x, w, c₁, …)``, ẇ = field.weight_rate(t, μ_y),
  and the stage's measure carries the stage's weights;
* Gaussian mixtures: ``y = (π, m, Σ)`` per component, rates from :func:`measureflow.mixtures.mixture_rates`
  (MATH.md §15.7);
* Gaussians: ``y = (m, Σ)`` with ṁ = b, Σ̇ = AΣ + ΣAᵀ and (b, A) = field.affine(t, N(m, Σ)) (MATH.md
  eq. 0.1). The rate AΣ + ΣAᵀ is formed as P + Pᵀ with P = AΣ, which is bitwise symmetric, and every
  Runge–Kutta combination of bitwise-symmetric matrices is again bitwise symmetric.

A feature that integrates something along with the particles adds a :class:`Channel`; the solvers
and the run loop stay as they are. :class:`Dynamics` also carries what belongs to the run rather
than to the solver: the noise stream a stochastic step draws from and the counters (field
evaluations, steps taken, kept, rejected, and any a solver adds).

Nothing here reads a value back to the host except :meth:`Dynamics.admissible`, which the caller
converts to a Python bool when it must decide whether to keep a step.
"""

from __future__ import annotations

import abc

import torch

from ..errors import CapabilityError, ShapeError
from ..fields import capabilities
from ..geometry import moves_weights
from ..linalg import symmetrize
from ..mixtures import check_mixture_field, mixture_rates
from ..state import state_kind
from .brownian import BrownianIncrement, brownian_increment
from .noise import standard_normal

__all__ = ["Dynamics", "Channel", "as_dynamics", "STAT_KEYS"]

#: The counters every run keeps about its integration (in ``Result.integrator_stats``).
STAT_KEYS = ("nfev", "steps", "accepted", "rejected")


def _field_name(field) -> str:
    return getattr(field, "name", type(field).__name__)


class Channel(abc.ABC):
    """An auxiliary quantity integrated together with the particles, one value per particle.

    Subclasses set ``name`` (the key under which the state holds it, ``state.channels[name]``, also
    readable as ``state.<name>``) and implement :meth:`initial` and :meth:`rate`. A channel whose
    rate needs more than the velocity (e.g. its divergence) overrides :meth:`velocity_and_rate`.
    """

    name: str = "channel"

    @abc.abstractmethod
    def initial(self, state) -> torch.Tensor:
        """The channel's value at the start of a run whose state does not hold it yet, (R, N, ...)."""

    @abc.abstractmethod
    def rate(self, field, t: float, state, velocity: torch.Tensor) -> torch.Tensor:
        """d/dt of the channel at time t, given the stage's state and the particles' velocity."""

    def velocity_and_rate(self, field, t: float, x: torch.Tensor, state):
        """(v, rate) together; the default evaluates the field's velocity, then :meth:`rate`."""
        v = field.velocity(t, x, state)
        return v, self.rate(field, t, state, v)

    def describe(self) -> dict:
        return {"name": self.name, "class": f"{type(self).__module__}.{type(self).__qualname__}"}


class Dynamics:
    """``field`` bound to a run that starts from ``state`` (see the module docstring).

    Parameters
    ----------
    field:
        the velocity field.
    state:
        the template state (its kind, weights and shapes); any state of the run may be packed.
    noise:
        the run's noise stream (a :class:`~measureflow.integrators.NoiseStream` or a
        ``torch.Generator``), drawn by stochastic solvers; None draws from torch's global stream.
    channels:
        auxiliary :class:`Channel` rules integrated with the particles.
    stats:
        the counters dict to add to (a fresh one by default).
    """

    def __init__(self, field, state, *, noise=None, channels=(), stats: dict | None = None):
        self.field = field
        self.kind = state_kind(state)
        self.template = state
        self.noise = noise
        self.channels = tuple(channels)
        if self.kind == "mixtures":
            check_mixture_field(field)
        if self.channels and self.kind != "particles":
            raise CapabilityError("auxiliary channels are integrated with particles only, not with a Gaussian state")
        names = [c.name for c in self.channels]
        if len(set(names)) != len(names) or "x" in names:
            raise CapabilityError(f"channel names must be unique and differ from 'x'; received {names}")
        #: the weights are integrated (y[1]) rather than fixed
        self.moving_weights = self.kind == "particles" and moves_weights(field)
        self._first = 2 if self.moving_weights else 1  # index of the first auxiliary channel in y
        self._rate = self._gaussian_rate if self.kind == "gaussians" else self._mixture_rate if self.kind == "mixtures" else (
            self._particle_rate_with_channels if (self.channels or self.moving_weights) else self._particle_rate)
        self.stats = stats if stats is not None else dict.fromkeys(STAT_KEYS, 0)
        self.has_diffusion = "diffusion" in capabilities(field)
        self.diagonal_noise = callable(getattr(field, "diagonal_diffusion", None))

    def bind(self, field) -> "Dynamics":
        """The same run (noise, channels, counters) with another field, e.g. one piece of a
        piecewise-defined field."""
        if field is self.field:
            return self
        return Dynamics(field, self.template, noise=self.noise, channels=self.channels, stats=self.stats)

    def count(self, key: str, n: int = 1) -> None:
        """Add ``n`` to counter ``key`` (a solver's own counters, e.g. inner iterations)."""
        self.stats[key] = self.stats.get(key, 0) + n

    # -- channels -----------------------------------------------------------------------------------
    def pack(self, state) -> tuple[torch.Tensor, ...]:
        """The state's integrated channels, in order."""
        if self.kind == "gaussians":
            return (state.mean, state.cov)
        if self.kind == "mixtures":
            return (state.weights, state.means, state.covs)
        head = (state.x, state.weights_or_uniform()) if self.moving_weights else (state.x,)
        if not self.channels:
            return head
        held = state.channels
        return (*head, *[held[c.name] if c.name in held else c.initial(state) for c in self.channels])

    def unpack(self, y, like=None):
        """A state holding the channels ``y`` (weights and other fixed parts from ``like``)."""
        like = self.template if like is None else like
        if self.kind == "gaussians":
            return like.with_parameters(y[0], symmetrize(y[1]))
        if self.kind == "mixtures":
            return like.with_parameters(y[0], y[1], symmetrize(y[2]))
        out = like.with_positions(y[0])
        if self.moving_weights:
            out = out.with_weights(y[1])
        if not self.channels:
            return out
        return out.with_channels({c.name: v for c, v in zip(self.channels, y[self._first:])})

    # -- rates --------------------------------------------------------------------------------------
    def rate(self, t: float, y) -> tuple[torch.Tensor, ...]:
        """The channels' rates at (t, y); counts one field evaluation."""
        self.stats["nfev"] += 1
        return self._rate(t, y)

    def evaluate(self, t: float, y) -> tuple[torch.Tensor, ...]:
        """:meth:`rate` without counting: for a compiled step, which counts its evaluations itself
        (a counter in a compiled graph would be a side effect to replay)."""
        return self._rate(t, y)

    def _check_velocity(self, v, x):
        if v.shape != x.shape:
            raise ShapeError(
                f"field {_field_name(self.field)!r}: velocity() must return the shape of its query points "
                f"{tuple(x.shape)}; it returned {tuple(v.shape)}"
            )

    def _particle_rate(self, t, y):
        x = y[0]
        v = self.field.velocity(t, x, self.template.with_positions(x))
        self._check_velocity(v, x)
        return (v,)

    def _particle_rate_with_channels(self, t, y):
        x = y[0]
        stage = self.unpack(y)
        v, rates = None, []
        for channel in self.channels:
            if v is None and type(channel).velocity_and_rate is not Channel.velocity_and_rate:
                v, rate = channel.velocity_and_rate(self.field, t, x, stage)
                self._check_velocity(v, x)
                rates.append(rate)
            else:
                rates.append(None)
        if v is None:
            v = self.field.velocity(t, x, stage)
            self._check_velocity(v, x)
        rates = [r if r is not None else c.rate(self.field, t, stage, v) for c, r in zip(self.channels, rates)]
        if self.moving_weights:
            return (v, self.field.weight_rate(t, stage), *rates)
        return (v, *rates)

    def closure(self, t: float, m: torch.Tensor, S: torch.Tensor):
        """(b, A) of the field at N(m, Σ), broadcast to (R, d) and (R, d, d)."""
        b, A = self.field.affine(t, self.template.with_parameters(m, S))
        try:
            b = torch.broadcast_to(b, m.shape)
            A = torch.broadcast_to(A, S.shape)
        except RuntimeError:
            raise ShapeError(
                f"field {_field_name(self.field)!r}: affine() must return b of shape {tuple(m.shape)} and A of "
                f"shape {tuple(S.shape)}; it returned {tuple(b.shape)} and {tuple(A.shape)}"
            ) from None
        return b, A

    def _gaussian_rate(self, t, y):
        m, S = y
        b, A = self.closure(t, m, S)
        P = A @ S
        return (b, P + P.transpose(-1, -2))

    def _mixture_rate(self, t, y):
        return mixture_rates(self.field, t, self.unpack(y))

    def euler_pushforward(self, t: float, y, h: float):
        """One Euler step of a Gaussian as the pushforward of N(m, Σ) by x ↦ x + h(b + A(x − m)):
        m' = m + hb, Σ' = (I + hA) Σ (I + hA)ᵀ (symmetrised), positive semi-definite for any h.
        Counts one field evaluation."""
        self.stats["nfev"] += 1
        m, S = y
        b, A = self.closure(t, m, S)
        M = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device) + h * A
        return (m + h * b, symmetrize(M @ S @ M.transpose(-1, -2)))

    # -- noise --------------------------------------------------------------------------------------
    def diffusion(self, t: float):
        """σ(t) of the field's noise term, or None for a deterministic field."""
        return self.field.diffusion(t) if self.has_diffusion else None

    def standard_normal(self, shape, like: torch.Tensor) -> torch.Tensor:
        """ξ ~ N(0, I) from the run's noise stream."""
        return standard_normal(shape, like, self.noise)

    def brownian(self, t0: float, t1: float, like: torch.Tensor, levy: bool = False) -> BrownianIncrement:
        """The Brownian increment (ΔW, and the Lévy area H when ``levy``) of the step [t0, t1], from
        the run's noise (:func:`~measureflow.integrators.brownian.brownian_increment`)."""
        return brownian_increment(self.noise, t0, t1, like, levy)

    def noise_coefficient(self, t: float, x: torch.Tensor):
        """The field's noise at (t, x): its ``diagonal_diffusion(t, x)`` (elementwise, shaped like x)
        when it has one, else the scalar ``diffusion(t)``."""
        if self.diagonal_noise:
            return self.field.diagonal_diffusion(t, x)
        return self.field.diffusion(t)

    # -- checks -------------------------------------------------------------------------------------
    def admissible(self, y) -> torch.Tensor:
        """A 0-dim bool tensor: every value finite and (Gaussians) every covariance Cholesky-factorisable.
        Reading it on the host is a device synchronisation."""
        if self.kind == "gaussians":
            m, S = y
            _, info = torch.linalg.cholesky_ex(S)
            return (info == 0).all() & torch.isfinite(m).all() & torch.isfinite(S).all()
        if self.kind == "mixtures":
            w, m, S = y
            _, info = torch.linalg.cholesky_ex(S)
            finite = torch.isfinite(w).all() & torch.isfinite(m).all() & torch.isfinite(S).all()
            return (info == 0).all() & finite & (w >= 0).all()
        if self.moving_weights:
            w = y[1]
            return torch.isfinite(y[0]).all() & torch.isfinite(w).all() & (w >= 0).all()
        return torch.isfinite(y[0]).all()

    def __repr__(self) -> str:
        extra = f", channels={[c.name for c in self.channels]}" if self.channels else ""
        extra += ", moving weights" if self.moving_weights else ""
        return f"Dynamics(field={_field_name(self.field)!r}, kind={self.kind}{extra})"


def as_dynamics(field, state, noise=None) -> Dynamics:
    """``field`` itself when it is already bound to a run, else a one-off :class:`Dynamics`."""
    if isinstance(field, Dynamics):
        return field
    return Dynamics(field, state, noise=noise)
