"""Gradients through a run (MATH.md §15.5): ``Simulation(..., gradient="backprop" | "adjoint")``.

A scalar L of the final state depends on the initial state and on the field's trainable tensors
(``field.trainable() -> {name: tensor}``: ``linear``'s A and b, ``attention``'s Q, K, V or θ(t)
table, a ``learned`` network's weights). Give those tensors ``requires_grad=True`` and
``torch.autograd.grad(L, A)`` works on ``result.state``:

* ``"backprop"`` — the run keeps the autograd graph through every solver stage (fields evaluate
  inside :func:`~measureflow.fields.keep_graph`); exact derivative of the discrete solution, memory
  growing with the number of steps.
* ``"adjoint"`` — the run itself records no graph; the final positions are tied to the initial
  positions and the trainable tensors by the continuous adjoint, integrated backwards when the
  gradient is asked for, with the state recomputed backwards alongside:

      ẋ = vₜ(x),   ȧ = −aᵀ ∂ₓv,   ȧ_θ = −aᵀ ∂_θv,   a(T) = ∂L/∂x(T),  a_θ(T) = 0,

  so ∂L/∂x(t₀) = a(t₀) and ∂L/∂θ = a_θ(t₀). The backward pass takes the forward run's own steps in
  reverse with the same Runge–Kutta tableau (its error control already chose them), so the two
  gradients agree to the solver's tolerance; memory is that of a few states, whatever the number
  of steps. For particles of a mean-field field, ∂ₓv is the Jacobian of the whole particle system
  (interactions included): the adjoint of the N-particle ODE the solver integrates.
"""

from __future__ import annotations

import torch

from .errors import CapabilityError, MeasureflowError
from .fields import field_parts, keep_graph, trainable
from .integrators import combine, rk_stages
from .state import state_kind

__all__ = ["GRADIENT_MODES", "check_gradient", "AdjointPlan", "attach_adjoint", "differentiable_parameters"]

GRADIENT_MODES = ("backprop", "adjoint")


def _name(field) -> str:
    return getattr(field, "name", type(field).__name__)


def _not_differentiable(field, state):
    """(field, reason) of the first part of ``field`` declaring itself not differentiable on
    ``state`` (``differentiable = False``, or a method ``differentiable(state) -> bool``), else None."""
    for f in field_parts(field):
        flag = getattr(f, "differentiable", True)
        if (flag(state) if callable(flag) else flag) is False:
            return f, getattr(f, "not_differentiable_because", "it calls a non-differentiable solver")
    return None


def differentiable_parameters(field) -> tuple:
    """The field's declared trainable tensors that require grad, in a fixed order."""
    return tuple(t for _, t in sorted(trainable(field).items()) if isinstance(t, torch.Tensor) and t.requires_grad)


def check_gradient(mode, field, state, solver, *, log_density=None, events=(), resume=False) -> None:
    """Refuse a gradient request that cannot be honoured, with a one-line error naming the fix."""
    if mode not in GRADIENT_MODES:
        raise MeasureflowError(f"gradient must be one of {list(GRADIENT_MODES)} or None; received {mode!r}")
    bad = _not_differentiable(field, state)
    if bad is not None:
        f, why = bad
        raise CapabilityError(
            f"gradient={mode!r}: field {_name(f)!r} is not differentiable ({why}); use a differentiable option "
            "of the field (e.g. an entropic instead of an exact OT solver) or run without gradient="
        )
    if resume:
        raise MeasureflowError(f"gradient={mode!r} cannot continue a checkpoint (the graph does not cross a restart); "
                               "run without resume=True")
    if mode == "adjoint":
        if state_kind(state) != "particles":
            raise CapabilityError("gradient='adjoint' integrates particles; for a Gaussians state use gradient='backprop'")
        if getattr(solver, "tableau", None) is None or getattr(solver, "stochastic", False):
            raise CapabilityError(
                f"gradient='adjoint' replays the steps of a Runge–Kutta integrator; {getattr(solver, 'name', '?')!r} "
                "is not one: use 'rk4' or 'dopri5', or gradient='backprop'"
            )
        if log_density is not None or getattr(state, "channels", None):
            raise CapabilityError("gradient='adjoint' differentiates positions only; use gradient='backprop' with channels "
                                  "or log_density")
        if any(e.terminal for e in events):
            raise CapabilityError("gradient='adjoint' with a terminal event: use gradient='backprop' (the stopping time "
                                  "depends on the parameters)")
        if callable(getattr(field, "project", None)) and getattr(field, "sphere", True):
            raise CapabilityError(f"gradient='adjoint': field {_name(field)!r} projects the state after each step; use "
                                  "gradient='backprop'")


class AdjointPlan:
    """What the backward pass needs: the field, the state's fixed parts, the tableau, the forward's
    accepted steps [(t0, t1), …] (host floats) and the trainable tensors."""

    def __init__(self, field, template, tableau, params):
        self.field = field
        self.template = template
        self.tableau = tableau
        self.params = tuple(params)
        self.steps: list[tuple[float, float]] = []
        b = tableau.b
        self._stages = max(i for i, w in enumerate(b) if w != 0.0) + 1  # skip an FSAL stage of weight 0
        self._pieces = getattr(field, "pieces", None) if callable(getattr(field, "pieces", None)) else None

    def record(self, denses) -> None:
        self.steps.extend((d.t0, d.t1) for d in denses)

    def _field_on(self, a: float, b: float):
        if self._pieces is None:
            return self.field
        # With grad on: a piece built now (a layer of a table) must hold its graph to the table's tensors
        # (autograd runs backward passes with grad off).
        with torch.enable_grad(), keep_graph():
            pieces = self._pieces(a, b)
        return pieces[0][2]

    def _rate(self, field):
        params, template = self.params, self.template

        def rate(t, y):
            x, a = y[0], y[1]
            with torch.enable_grad(), keep_graph():
                xg = x.detach().requires_grad_(True)
                v = field.velocity(t, xg, template.with_positions(xg))
                grads = torch.autograd.grad(v, (xg, *params), grad_outputs=a, allow_unused=True)
            out = [v.detach(), -grads[0]]
            for p, g in zip(params, grads[1:]):
                out.append(torch.zeros_like(p) if g is None else -g)
            return tuple(out)

        return rate

    def backward(self, x_final: torch.Tensor, a_final: torch.Tensor):
        """(∂L/∂x(t₀), ∂L/∂θ₁, …) from a(T) = ∂L/∂x(T)."""
        y = (x_final, a_final.to(x_final.dtype), *[torch.zeros_like(p) for p in self.params])
        tab = self.tableau
        for t0, t1 in reversed(self.steps):
            field = self._field_on(t0, t1)
            h = t0 - t1
            ks = rk_stages(tab, self._rate(field), t1, y, h, stages=self._stages)
            y = combine(y, h, tab.b[: self._stages], ks)
        return y[1:]


class _Adjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, x_final, x0, *params):
        ctx.plan = plan
        ctx.save_for_backward(x_final)
        return x_final.clone()

    @staticmethod
    def backward(ctx, grad):
        (x_final,) = ctx.saved_tensors
        grads = ctx.plan.backward(x_final, grad)
        return (None, None, *grads)


def attach_adjoint(plan: AdjointPlan, x0: torch.Tensor, x_final: torch.Tensor) -> torch.Tensor:
    """x_final tied to x0 and the plan's trainable tensors by the adjoint backward pass."""
    if not (x0.requires_grad or plan.params):
        return x_final
    return _Adjoint.apply(plan, x_final.detach(), x0, *plan.params)
