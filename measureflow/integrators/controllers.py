"""Step-size controllers: how a run crosses an output interval with a solver's steps.

A controller is a frozen spec (its options never change during a run); what it carries from one
interval to the next — the step-size proposal, the previous error — lives in the run's
:class:`~measureflow.integrators.Stepper` as a small dict (``controller_state``), saved in
checkpoints so that a resumed run takes the same steps as one that never stopped.

:meth:`Controller.integrate` advances a state from t0 to t1 (either direction) and lands on t1
exactly (bit for bit):

* :class:`ConstantController` — one step per output interval. A Gaussian state is checked after
  every step (one host synchronisation) because a covariance must never leave the cone of SPD
  matrices: if any replica's Σ fails a Cholesky factorisation or a value is non-finite, the step is
  retried from its start as 2, 4, 8, … substeps, up to ``max_halvings`` times, and then
  :class:`~measureflow.errors.StepFailure` is raised. Particles are never read back.
* :class:`PIController` — error-controlled steps for solvers with an embedded error estimate
  (Gustafsson's PI form). With the scaled error norm ‖e‖ (≤ 1 means "within tolerance") of a step
  of size h and the norm ‖e_prev‖ of the previous accepted step, the next step size is

      h_new = h · clip( safety · ‖e‖^(−α) · ‖e_prev‖^(β),  min_factor,  max_factor ),
      β = 0.2 / k,   α = 1/k − 0.75 β,   k = (order of the error estimate) + 1

  (for Dormand–Prince 5(4), k = 5: α = 0.17, β = 0.04, the values of Hairer–Nørsett–Wanner's
  DOPRI5). On a smooth problem the step sizes settle where safety · ‖e‖^(β − α) = 1, i.e. at an
  error ‖e‖ = safety^(1/(α − β)) ≈ 0.44 of the tolerance. After a rejected step the proportional
  part alone is used and the step never grows. Each step reads its error norm (and for Gaussians
  the SPD check) back to the host: one synchronisation per step, inherent to adaptivity.
"""

from __future__ import annotations

import abc
import math

import attrs
import torch

from ..errors import ParameterError, StepFailure
from ..validators import check_int, integer, nonnegative, positive
from .combine import combine

__all__ = ["Controller", "ConstantController", "PIController", "error_norm"]

# Landing on t1: a remainder this close to the proposal (relative) is taken in one step rather
# than leaving a sliver of a step behind.
_STRETCH = 1.01


def error_norm(err, y0, y1, rtol: float, atol: float) -> torch.Tensor:
    """max over replicas r of RMS_r( err / (atol + rtol·max(|y0|, |y1|)) ), a 0-dim tensor.

    Replicas share one time grid, so a step is kept only when every replica meets the tolerance;
    the RMS runs over all of a replica's components (for Gaussians: the d mean entries and the d²
    covariance entries together).
    """
    total = None
    count = 0
    for e, a, b in zip(err, y0, y1):
        scale = atol + rtol * torch.maximum(a.abs(), b.abs())
        sq = (e / scale).square().reshape(e.shape[0], -1)
        part = sq.sum(dim=1)
        total = part if total is None else total + part
        count += sq.shape[1]
    # Step control only: never part of a gradient through the run.
    return (total / count).sqrt().amax().detach()


class Controller(abc.ABC):
    """Base class of step-size controllers (see the module docstring). ``adaptive`` says whether it
    chooses step sizes from the state (then replicas stacked in one batch share its choices)."""

    adaptive: bool = False

    @abc.abstractmethod
    def integrate(self, solver, dynamics, t0: float, t1: float, state, carry):
        """Advance ``state`` from t0 to t1 with ``solver`` steps; returns the state at t1.

        ``carry`` is the run's :class:`~measureflow.integrators.stepper.Carry`: the solver state and
        this controller's state, updated in place; counters go to ``dynamics.stats``."""

    def initial_state(self) -> dict:
        """What this controller carries between intervals, before the first step."""
        return {}

    @property
    def options(self) -> dict:
        """Its options, JSON-serialisable (written to trajectory parameters)."""
        return {}


@attrs.frozen
class ConstantController(Controller):
    """One solver step per output interval; Gaussian steps that leave the SPD cone are retried as
    2, 4, …, 2^max_halvings equal substeps (see the module docstring)."""

    max_halvings: int = attrs.field(default=10, converter=lambda v: check_int(v, "max_halvings", "ConstantController",
                                                                              minimum=0))

    @property
    def options(self) -> dict:
        return {"max_halvings": self.max_halvings}

    def integrate(self, solver, dynamics, t0, t1, state, carry):
        stats = dynamics.stats
        if dynamics.kind == "particles":
            y1, _, dense, carry.solver_state = solver.step(dynamics, t0, t1, state, carry.solver_state)
            stats["steps"] += 1
            stats["accepted"] += 1
            carry.dense = (dense,)
            return y1
        h_total = t1 - t0
        reason, t_fail = "", t0
        for level in range(self.max_halvings + 1):
            n = 1 << level
            h = h_total / n
            y = state
            denses = []
            for j in range(n):
                t = t0 + j * h
                y_next, _, dense, solver_state = solver.step(dynamics, t, t + h, y, carry.solver_state, dt=h)
                stats["steps"] += 1
                channels = dynamics.pack(y_next)
                if not bool(dynamics.admissible(channels)):  # host sync, by design (module docstring)
                    # Everything computed at this level is thrown away.
                    stats["rejected"] += j + 1
                    finite = all(bool(torch.isfinite(c).all()) for c in channels)
                    reason = "covariance left the SPD cone" if finite else "non-finite Gaussian parameters"
                    t_fail = t
                    break
                y = y_next
                carry.solver_state = solver_state
                denses.append(dense)
            else:
                stats["accepted"] += n
                carry.dense = tuple(denses)
                return y
        raise StepFailure(
            reason,
            t_fail,
            f"{solver.name}: the step from t = {t0:.9g} to {t1:.9g} still failed when split into "
            f"{1 << self.max_halvings} substeps; use a smaller time step or the adaptive 'dopri5', or check "
            "that the field's affine() closure is finite at this state",
        )


def _first_step(value):
    if value is None:
        return None
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ParameterError(f"first_step must be a positive finite step size; received {value!r}")
    return value


@attrs.frozen
class PIController(Controller):
    """PI step-size controller for embedded pairs (see the module docstring).

    Parameters: ``rtol``, ``atol`` (error scale atol + rtol·max(|y|, |y'|)); ``dt_min`` (a proposal
    below it is a step failure), ``dt_max``; ``safety`` factor; ``min_factor``/``max_factor`` bound
    the change per step; ``error_order`` is the order of the embedded error estimate (4 for
    Dormand–Prince 5(4)); ``first_step`` the initial step (by default chosen from the first
    derivative and a trial Euler step, two field evaluations once per run); ``max_steps`` the steps
    allowed per output interval before StepFailure (guards against stalling).
    """

    adaptive = True

    rtol: float = attrs.field(default=1e-6, converter=float, validator=nonnegative())
    atol: float = attrs.field(default=1e-8, converter=float, validator=nonnegative())
    dt_min: float = attrs.field(default=1e-10, converter=float, validator=nonnegative())
    dt_max: float = attrs.field(default=math.inf, converter=float)  # inf: no upper bound
    safety: float = attrs.field(default=0.9, converter=float, validator=positive())
    min_factor: float = attrs.field(default=0.2, converter=float, validator=positive())
    max_factor: float = attrs.field(default=10.0, converter=float, validator=positive())
    error_order: int = attrs.field(default=4, validator=integer())
    first_step: float | None = attrs.field(default=None, converter=_first_step)
    max_steps: int = attrs.field(default=100_000, validator=integer())

    def __attrs_post_init__(self):
        if not self.dt_max > 0:
            raise ParameterError(f"dt_max must be > 0 (inf: no bound); received {self.dt_max!r}")
        if self.rtol == 0 and self.atol == 0:
            raise ParameterError("rtol and atol cannot both be 0 (the error scale atol + rtol·|y| would vanish)")
        if self.dt_min > self.dt_max:
            raise ParameterError(f"dt_min = {self.dt_min:g} must not exceed dt_max = {self.dt_max:g}")
        if not (self.min_factor < 1 < self.max_factor):
            raise ParameterError(
                f"need min_factor < 1 < max_factor; received min_factor = {self.min_factor:g}, "
                f"max_factor = {self.max_factor:g}"
            )
        if not (self.safety <= 1):
            raise ParameterError(f"safety must lie in (0, 1]; received {self.safety:g}")

    @property
    def options(self) -> dict:
        return {
            "rtol": self.rtol,
            "atol": self.atol,
            "dt_min": self.dt_min,
            "dt_max": self.dt_max if math.isfinite(self.dt_max) else None,
            "safety": self.safety,
            "first_step": self.first_step,
            "max_steps": self.max_steps,
        }

    @property
    def alpha(self) -> float:
        return 1.0 / (self.error_order + 1) - 0.75 * self.beta

    @property
    def beta(self) -> float:
        return 0.2 / (self.error_order + 1)

    def clamp(self, dt: float) -> float:
        """dt limited to [dt_min, dt_max]."""
        return min(max(dt, self.dt_min), self.dt_max)

    def accept(self, err: float) -> bool:
        return math.isfinite(err) and err <= 1.0

    def factor(self, err: float, err_prev: float, accepted: bool) -> float:
        """Multiplier of the step size after a step with scaled error ``err``."""
        if not math.isfinite(err):
            return self.min_factor
        if err == 0.0:
            return self.max_factor if accepted else self.min_factor
        if accepted:
            f = self.safety * err ** (-self.alpha) * err_prev**self.beta
            return min(self.max_factor, max(self.min_factor, f))
        # Rejected: proportional control only, and never grow.
        f = self.safety * err ** (-1.0 / (self.error_order + 1))
        return min(1.0, max(self.min_factor, f))

    def initial_state(self) -> dict:
        return {"dt": None if self.first_step is None else self.clamp(self.first_step), "err_prev": 1.0}

    def integrate(self, solver, dynamics, t0, t1, state, carry):
        if t0 == t1:
            return state
        if not getattr(solver, "adaptive", False):
            raise ParameterError(f"a PIController needs a solver with an error estimate; {solver.name!r} has none")
        stats = dynamics.stats
        cs = carry.controller_state
        direction = 1.0 if t1 > t0 else -1.0
        solver_state = carry.solver_state
        if not solver.continues(dynamics, t0, state, solver_state):
            solver_state = solver.init(dynamics, t0, state)
        if cs["dt"] is None:
            f0 = solver_state.derivative if solver_state is not None else dynamics.rate(t0, dynamics.pack(state))
            cs["dt"] = self.clamp(self._initial_step(dynamics, t0, dynamics.pack(state), f0, direction, solver.order))

        t, y = t0, state
        taken = 0
        denses = []
        carry.dense = ()
        while t != t1:
            if taken >= self.max_steps:
                carry.dense = tuple(denses)
                raise StepFailure(
                    "too many steps",
                    t,
                    f"{solver.name} took {self.max_steps} internal steps between t = {t0:.9g} and {t1:.9g}; "
                    "raise max_steps, loosen rtol/atol, or check the field for stiffness",
                )
            taken += 1
            remaining = abs(t1 - t)
            dt = cs["dt"]
            if remaining <= _STRETCH * dt:
                h, t_new, clipped = t1 - t, t1, remaining < dt
            else:
                h = direction * dt
                t_new = t + h
                clipped = False

            y_new, err_vec, dense, new_state = solver.step(dynamics, t, t_new, y, solver_state, dt=h)
            before, after = dynamics.pack(y), dynamics.pack(y_new)
            err = error_norm(err_vec, before, after, self.rtol, self.atol)
            if dynamics.kind != "particles" or getattr(dynamics, "moving_weights", False):
                inside = dynamics.admissible(after).to(err.dtype)
                err, inside = torch.stack([err, inside]).tolist()  # one host sync per step
            else:
                err, inside = float(err), 1.0  # one host sync per step
            stats["steps"] += 1
            if inside == 1.0 and self.accept(err):
                stats["accepted"] += 1
                proposal = abs(h) * self.factor(err, cs["err_prev"], True)
                if clipped:
                    # A short landing step says little about the step the dynamics allow.
                    proposal = max(proposal, dt)
                cs["dt"] = self.clamp(proposal)
                cs["err_prev"] = max(err, 1e-4)
                t, y, solver_state = t_new, y_new, new_state
                denses.append(dense)
            else:
                stats["rejected"] += 1
                proposal = abs(h) * self.factor(err if inside == 1.0 else math.inf, cs["err_prev"], False)
                if proposal < self.dt_min:
                    carry.dense = tuple(denses)  # the steps kept before the failure (events look at them)
                    why = "covariance left the SPD cone" if inside != 1.0 else (
                        "non-finite error estimate" if not math.isfinite(err) else f"error norm {err:.3g} > 1"
                    )
                    raise StepFailure(
                        f"step size fell below dt_min = {self.dt_min:g}",
                        t,
                        f"{solver.name} rejected a step of h = {abs(h):.3g} ({why}); lower dt_min, loosen "
                        "rtol/atol, or check the field for a singularity near this time",
                    )
                cs["dt"] = min(proposal, self.dt_max)
        carry.solver_state = solver_state
        carry.dense = tuple(denses)
        return y

    def _initial_step(self, dynamics, t0: float, y, f0, direction: float, order: int) -> float:
        """Starting step from the size of y, f(t0, y) and a trial Euler step (Hairer, Nørsett &
        Wanner, Solving ODEs I, §II.4): h = min(100·h₀, (0.01 / max(d₁, d₂))^(1/(p+1)))."""
        if self.first_step is not None:
            return self.first_step
        zeros = tuple(torch.zeros_like(c) for c in y)
        d0 = float(error_norm(y, y, zeros, self.rtol, self.atol))
        d1 = float(error_norm(f0, y, zeros, self.rtol, self.atol))
        h0 = 0.01 * d0 / d1 if (d0 > 1e-5 and d1 > 1e-5 and math.isfinite(d0 / d1)) else 1e-6
        y1 = combine(y, direction * h0, (1.0,), (f0,))
        f1 = dynamics.rate(t0 + direction * h0, y1)
        diff = tuple(b - a for a, b in zip(f0, f1))
        d2 = float(error_norm(diff, y, zeros, self.rtol, self.atol)) / h0
        top = max(d1, d2)
        if not math.isfinite(top):
            return h0
        h1 = (0.01 / top) ** (1.0 / (order + 1)) if top > 1e-15 else max(1e-6, 1e-3 * h0)
        return min(100 * h0, h1)
