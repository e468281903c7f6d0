"""The marginal-preserving SDE of any flow that has a score (MATH.md §15.2).

If a velocity field u_s, run forward in its own time s, carries the marginals q_s, then for every
noise level g_s ≥ 0

    dX = [u_s(X) + ½ g_s² ∇log q_s(X)] ds + g_s dW

has the same marginals (its Fokker–Planck equation adds −∇·(q ½g²∇log q) + ½g²Δq = 0). g = 0 is the
ODE; the OU bridge with g = √2σ is the reverse SDE of [V] (``ou_bridge_sde``, MATH.md §2).

``measureflow.field("flow_sde", flow=<velocity field>, score=<score>, noise=g)`` builds it:

* ``flow`` — any field; ``direction="forward"`` runs it in its own time (s = t), ``"reverse"`` in
  s = t_max − t ∈ [0, t_max − t_min] with u_s = −v_{t_max−s} (generation from the noise end of a
  flow written in the noising convention, MATH.md §0).
* ``score`` — ∇log q at the flow's own time t: a field or object with ``marginal_score(t, x)``, a
  field whose ``velocity(t, x, state)`` is the score, or a callable ``score(t, x)``. Leave it out when
  the flow knows its own score (it has ``marginal_score``: the exact ``flow_matching`` field in
  either convention, ``ou_bridge``, a ``learned`` model with a known parameterisation). A positive
  noise level with no score is refused.
* ``noise`` — g as a number ≥ 0 (0: the ODE, no score needed), a callable g(s) of the SDE's time, or a
  schedule (a registered name, a :class:`~measureflow.schedules.Schedule` or ``{"name": ...}``): then
  g = b_t, the schedule's noise coefficient at the flow's time t, times ``noise_scale``.

It runs under every SDE solver (``euler_maruyama``, ``stochastic_heun``, ``sra``, ``milstein``).

*Gaussian closure.* When the flow has one, ``affine`` is the velocity of the SDE's law at the state
N(m, Σ): the drift's closure plus ½g²Σ⁻¹ (the noise's contribution −½g²∇log N(m, Σ)), with the
score's closure read from the score at m and at m + eₖ (exact when the score is affine, i.e. the
flow's marginals are Gaussian). On the flow's own Gaussian path (Σ = Σ_t) ½g²(∇s + Σ⁻¹) = 0 and the
closure is the ODE's: the SDE's moments follow the ODE's exactly.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch

from .errors import CapabilityError, ParameterError
from .fields import Field, capabilities
from .plugins import hookimpl
from .schedules import Schedule, as_schedule

__all__ = ["FlowSDE", "marginal_score_of", "DIRECTIONS"]

DIRECTIONS = ("forward", "reverse")


def _name(obj) -> str:
    return getattr(obj, "name", type(obj).__name__)


def marginal_score_of(obj) -> Callable | None:
    """``score(t, x)`` for an object that provides ∇log q_t: its ``marginal_score``, the velocity of a
    field (a score field), or the callable itself; None for None."""
    if obj is None:
        return None
    method = getattr(obj, "marginal_score", None)
    if callable(method):
        return method
    if isinstance(obj, Field) or callable(getattr(obj, "velocity", None)):
        return lambda t, x: obj.velocity(t, x, None)
    if callable(obj):
        return obj
    raise ParameterError(
        f"flow_sde: score must be a field with marginal_score(t, x), a score field, or a callable score(t, x); "
        f"received {type(obj).__name__}"
    )


class FlowSDE(Field):
    """dX = [u_s(X) + ½g_s²∇log q_s(X)] ds + g_s dW, the marginal-preserving SDE of a flow (module
    docstring; MATH.md §15.2).

    Parameters
    ----------
    flow:
        the velocity field (a field object or a registered name built without parameters).
    score:
        ∇log q_t at the flow's time t (see the module docstring); None: the flow's own ``marginal_score``.
    noise:
        the noise level g: a number ≥ 0, a callable g(s), or a schedule (g = noise_scale · b_t).
    direction:
        ``"forward"`` (s = t) or ``"reverse"`` (s = t_max − t, u_s = −v_{t_max−s}).
    noise_scale:
        factor on a schedule's b_t (ignored otherwise).
    """

    name = "flow_sde"

    def __init__(self, flow=None, score=None, noise=0.0, direction: str = "forward", noise_scale: float = 1.0):
        if flow is None:
            raise ParameterError("flow_sde: give the flow, flow=<velocity field>")
        if isinstance(flow, str):
            from .plugins import get_registry

            flow = get_registry().field(flow)
        if not callable(getattr(flow, "velocity", None)):
            raise ParameterError(f"flow_sde: flow must be a velocity field; received {type(flow).__name__}")
        if "diffusion" in capabilities(flow):
            raise CapabilityError(
                f"flow_sde: the flow {_name(flow)!r} already has a noise term; give its probability-flow ODE field"
            )
        if direction not in DIRECTIONS:
            raise ParameterError(f"flow_sde: direction must be one of {DIRECTIONS}; received {direction!r}")
        self.flow = flow
        self.direction = direction
        lo, hi = (float(v) for v in getattr(flow, "time_range", (-math.inf, math.inf)))
        if direction == "reverse":
            if not math.isfinite(hi) or not math.isfinite(lo):
                raise ParameterError(
                    f"flow_sde: direction='reverse' needs a flow with a finite time range; {_name(flow)!r} has "
                    f"[{lo:g}, {hi:g}]"
                )
            self.time_range = (0.0, hi - lo)
        else:
            self.time_range = (lo, hi)
        self._flow_hi = hi
        self.noise_scale = float(noise_scale)
        self._g, self._noise_desc, self._zero_noise = self._noise_function(noise)
        if score is None and callable(getattr(flow, "marginal_score", None)):
            self._score_source = "flow"
            self._score = flow.marginal_score
        else:
            self._score_source = None if score is None else _name(score)
            self._score = marginal_score_of(score)
        if self._score is None and not self._zero_noise:
            raise ParameterError(
                f"flow_sde: a positive noise level needs the score ∇log q of the flow {_name(flow)!r}, which does not "
                "know its own: pass score=<field or callable score(t, x)>, or noise=0 for the ODE"
            )
        caps = {"velocity", "diffusion"}
        if "affine" in capabilities(flow):
            caps.add("affine")
        self._capabilities = frozenset(caps)

    # -- noise -------------------------------------------------------------------------------------------
    def _noise_function(self, noise):
        """(g(s) -> float, JSON description, identically zero?)."""
        if isinstance(noise, (Schedule, str, Mapping)) or (
                callable(getattr(noise, "coefficients", None)) and hasattr(noise, "time_range")):
            schedule = as_schedule(noise)
            scale = self.noise_scale
            if not (scale >= 0 and math.isfinite(scale)):
                raise ParameterError(f"flow_sde: noise_scale must be a finite number >= 0; received {scale!r}")

            def g(s):
                return scale * float(schedule.coefficients(self.flow_time(s))[2])

            desc = {"schedule": schedule.describe() if callable(getattr(schedule, "describe", None)) else str(schedule),
                    "scale": scale}
            return g, desc, scale == 0
        if callable(noise):
            return (lambda s: float(noise(s))), {"callable": getattr(noise, "__qualname__", repr(noise))}, False
        try:
            value = float(noise)
        except (TypeError, ValueError):
            raise ParameterError(
                f"flow_sde: noise must be a number >= 0, a callable g(s) or a schedule; received {noise!r}"
            ) from None
        if not (value >= 0 and math.isfinite(value)):
            raise ParameterError(f"flow_sde: the noise level must be a finite number >= 0; received {noise!r}")
        return (lambda s: value), value, value == 0

    def diffusion(self, t):
        """g(s) at the SDE's time s = t."""
        return self._g(t)

    # -- time ------------------------------------------------------------------------------------------------
    def flow_time(self, s: float) -> float:
        """The flow's time t at the SDE's time s (forward: t = s; reverse: t = t_max − s)."""
        return float(s) if self.direction == "forward" else self._flow_hi - float(s)

    def check_time(self, t) -> None:
        """Refuse a time whose flow time the flow refuses (its error names its safe range)."""
        check = getattr(self.flow, "check_time", None)
        if callable(check):
            check(self.flow_time(t))
        else:
            super().check_time(t)

    # -- the protocol -------------------------------------------------------------------------------------------
    def _flow_velocity(self, s, x, state):
        v = self.flow.velocity(self.flow_time(s), x, state)
        return -v if self.direction == "reverse" else v

    def marginal_score(self, t, x):
        """∇log q_s(x) at the SDE's time s = t (the flow's marginal at t_flow(s))."""
        if self._score is None:
            raise CapabilityError(f"flow_sde over {_name(self.flow)!r} was built without a score")
        return self._score(self.flow_time(t), x)

    def velocity(self, t, x, state=None):
        """The drift u_s(x) + ½g_s²∇log q_s(x)."""
        g = self._g(t)
        if g == 0:
            return self._flow_velocity(t, x, state)
        both = getattr(self.flow, "velocity_and_score", None)
        if self._score_source == "flow" and callable(both):
            # one evaluation of the flow's posterior gives both (exact flow-matching fields)
            v, score = both(self.flow_time(t), x, state)
            if self.direction == "reverse":
                v = -v
        else:
            v, score = self._flow_velocity(t, x, state), self.marginal_score(t, x)
        return v + (0.5 * g * g) * score

    def affine(self, t, state):
        """(b, A) of the law's velocity at N(m, Σ): the flow's closure + ½g²(s(m), ∇s + Σ⁻¹)."""
        b, A = self.flow.affine(self.flow_time(t), state)
        if self.direction == "reverse":
            b, A = -b, -A
        g = self._g(t)
        if g == 0:
            return b, A
        m, S = state.mean, state.cov
        R, d = m.shape
        eye = torch.eye(d, dtype=m.dtype, device=m.device)
        points = torch.cat([m[:, None, :], m[:, None, :] + eye], dim=1)  # (R, d + 1, d): m and m + eₖ
        s = self.marginal_score(t, points)
        slope = (s[:, 1:, :] - s[:, :1, :]).transpose(-1, -2)  # column k: s(m + eₖ) − s(m)
        c = 0.5 * g * g
        return b + c * s[:, 0, :], A + c * (slope + torch.linalg.inv(S))

    def describe(self) -> dict:
        describe = getattr(self.flow, "describe", None)
        return {
            "name": self.name,
            "flow": describe() if callable(describe) else {"name": _name(self.flow)},
            "score": self._score_source,
            "noise": self._noise_desc,
            "direction": self.direction,
        }

    def __repr__(self) -> str:
        return f"FlowSDE(flow={_name(self.flow)!r}, noise={self._noise_desc!r}, direction={self.direction!r})"


@hookimpl
def measureflow_register_fields(registry) -> None:
    registry.add_field("flow_sde", FlowSDE)
