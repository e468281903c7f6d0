"""The velocity-field protocol, composition and potential fields (DESIGN.md "field", MATH.md §0).

A field moves a measure by the continuity equation ∂ₜμ + div(μ v) = 0 (plus ½σ²Δμ when it has a
diffusion term). It provides

* ``velocity(t, x, state)`` — v_t[μ](x) at query points x of shape (R, N', d) given the current
  measure ``state`` (mean-field fields need the whole measure; local fields ignore it);
* optionally ``affine(t, state) -> (b, A)`` — the Gaussian closure v(x) = b + A(x − m) on a
  :class:`~measureflow.state.Gaussians` state, b of shape (R, d), A of shape (R, d, d). For a field with
  a diffusion term this is the closure of the *law's* velocity (its probability flow), so that
  ṁ = b, Σ̇ = AΣ + ΣAᵀ is the exact evolution of the Gaussian (MATH.md eq. 0.1);
* optionally ``diffusion(t)`` — the scalar σ(t) of dXₜ = v dt + σ(t) dWₜ (particles only; ``velocity``
  is then the drift);
* optionally ``energy(state)`` — the functional F the field descends, one value per replica (R,).

Subclass :class:`Field` and override what you provide; capabilities are detected from the overrides,
so a field without ``affine`` is refused on a Gaussian state at assembly, before any step runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from typing import Callable

import torch

from .errors import CapabilityError, ShapeError, TimeRangeError
from .mixtures import check_mixture_field
from .state import Gaussians, Particles, state_kind

__all__ = [
    "keep_graph",
    "keeps_graph",
    "trainable",
    "Field",
    "SumField",
    "ScaledField",
    "PotentialField",
    "from_potential",
    "capabilities",
    "check_compatible",
]

CAPABILITIES = ("velocity", "affine", "diffusion", "energy")

_KEEP_GRAPH = contextvars.ContextVar("measureflow_keep_graph", default=False)


@contextlib.contextmanager
def keep_graph():
    """Within this block fields build the autograd graph through their parameters (gradients
    through a run, ``Simulation(gradient=...)``); outside it a field may evaluate without one."""
    token = _KEEP_GRAPH.set(True)
    try:
        yield
    finally:
        _KEEP_GRAPH.reset(token)


@torch.compiler.assume_constant_result
def _graph_kept() -> bool:
    # torch.compile cannot trace a ContextVar read: a compiled step takes its value at compile
    # time. Compiled steps never run inside keep_graph() (Simulation refuses compile with gradient=).
    return _KEEP_GRAPH.get()


def keeps_graph() -> bool:
    """Whether a field evaluated now should keep its autograd graph (see :func:`keep_graph`)."""
    return torch.is_grad_enabled() and _graph_kept()


def trainable(field) -> dict:
    """The tensors a field declares trainable (``field.trainable() -> {name: tensor}``), gathered
    through sums and scalings; {} for a field that declares none."""
    out = {}
    stack = [("", field)]
    while stack:
        prefix, f = stack.pop()
        for i, term in enumerate(getattr(f, "terms", ())):
            stack.append((f"{prefix}{i}.", term))
        inner = getattr(f, "field", None)
        if isinstance(inner, Field) and inner is not f:
            stack.append((prefix, inner))
        own = getattr(f, "trainable", None)
        if callable(own):
            out.update({prefix + k: v for k, v in own().items()})
    return out


class Field:
    """Base class of every velocity field (built-in or third party).

    Class attributes a subclass may set:

    ``name``
        the registry name (set by registration when omitted);
    ``time_range``
        ``(t_min, t_max)``, the closed interval of times where the field is defined; times outside
        raise :class:`~measureflow.errors.TimeRangeError` naming the range.
    """

    name: str = "field"
    time_range: tuple[float, float] = (-math.inf, math.inf)

    # -- the protocol ------------------------------------------------------------------------
    def velocity(self, t: float, x: torch.Tensor, state: Particles) -> torch.Tensor:
        """v_t[μ](x) for x of shape (R, N', d); returns the same shape."""
        raise CapabilityError(f"field {self.name!r} does not define velocity() and cannot move particles")

    def affine(self, t: float, state: Gaussians) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian closure (b, A) with v(x) = b + A(x − m); b (R, d), A (R, d, d)."""
        raise CapabilityError(self._missing("affine"))

    def diffusion(self, t: float):
        """σ(t) of the noise term dXₜ = v dt + σ(t) dWₜ (scalar)."""
        raise CapabilityError(self._missing("diffusion"))

    def energy(self, state) -> torch.Tensor:
        """The functional F(μ) the field descends, shape (R,)."""
        raise CapabilityError(self._missing("energy"))

    # -- capabilities --------------------------------------------------------------------------
    @property
    def capabilities(self) -> frozenset[str]:
        """Which optional parts of the protocol this field provides."""
        return capabilities(self)

    def check_time(self, t: float) -> None:
        lo, hi = self.time_range
        if not (lo <= t <= hi):
            raise TimeRangeError(
                f"field {self.name!r} is defined for t in [{lo:g}, {hi:g}]; received t = {t:g}. "
                "Choose t0/t1 inside that range."
            )

    def _missing(self, what: str) -> str:
        hint = {
            "affine": "it has no Gaussian closure; run it on Particles instead",
            "diffusion": "it is deterministic",
            "energy": "it does not descend a known functional",
        }[what]
        return f"field {self.name!r} ({type(self).__name__}) does not provide {what}(): {hint}"

    # -- composition -----------------------------------------------------------------------------
    def __add__(self, other: "Field") -> "Field":
        if not isinstance(other, Field):
            return NotImplemented
        return SumField((self, other))

    def __mul__(self, c) -> "Field":
        if isinstance(c, Field):
            return NotImplemented
        return ScaledField(self, float(c))

    __rmul__ = __mul__

    def __neg__(self) -> "Field":
        return ScaledField(self, -1.0)

    def __sub__(self, other: "Field") -> "Field":
        if not isinstance(other, Field):
            return NotImplemented
        return SumField((self, ScaledField(other, -1.0)))

    def describe(self) -> dict:
        """JSON-friendly description written to trajectory parameters."""
        return {"name": self.name, "class": f"{type(self).__module__}.{type(self).__qualname__}"}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def field_parts(field):
    """``field`` and every field it is made of (the ``terms`` of a sum, the ``field`` a wrapper such
    as a geometry holds), depth first: what a check that must see every part walks."""
    stack = [field]
    while stack:
        part = stack.pop()
        yield part
        stack.extend(getattr(part, "terms", ()))
        inner = getattr(part, "field", None)
        if inner is not None and inner is not part:
            stack.append(inner)


def capabilities(field) -> frozenset[str]:
    """The parts of the protocol ``field`` implements (detected from overrides of :class:`Field`)."""
    own = getattr(field, "_capabilities", None)
    if own is not None:
        return own
    found = {"velocity"}
    for cap in ("affine", "diffusion", "energy"):
        method = getattr(type(field), cap, None)
        if method is not None and method is not getattr(Field, cap):
            found.add(cap)
    return frozenset(found)


class SumField(Field):
    """f + g: velocities add; closures add when both have one; noises are independent, so
    σ² adds; energies add when both have one."""

    def __init__(self, terms):
        flat = []
        for term in terms:
            flat.extend(term.terms if isinstance(term, SumField) else [term])
        self.terms = tuple(flat)
        self.name = " + ".join(t.name for t in self.terms)
        lo = max(t.time_range[0] for t in self.terms)
        hi = min(t.time_range[1] for t in self.terms)
        self.time_range = (lo, hi)
        caps = {"velocity"}
        for cap in ("affine", "energy"):
            if all(cap in capabilities(t) for t in self.terms):
                caps.add(cap)
        if any("diffusion" in capabilities(t) for t in self.terms):
            caps.add("diffusion")
        self._capabilities = frozenset(caps)

    def velocity(self, t, x, state):
        out = self.terms[0].velocity(t, x, state)
        for term in self.terms[1:]:
            out = out + term.velocity(t, x, state)
        return out

    def affine(self, t, state):
        if "affine" not in self._capabilities:
            missing = [term.name for term in self.terms if "affine" not in capabilities(term)]
            raise CapabilityError(f"sum field {self.name!r}: term(s) {missing} have no Gaussian closure")
        b, A = self.terms[0].affine(t, state)
        for term in self.terms[1:]:
            b2, A2 = term.affine(t, state)
            b, A = b + b2, A + A2
        return b, A

    def diffusion(self, t):
        total = 0.0
        for term in self.terms:
            if "diffusion" in capabilities(term):
                total = total + term.diffusion(t) ** 2
        return total**0.5

    def energy(self, state):
        if "energy" not in self._capabilities:
            missing = [term.name for term in self.terms if "energy" not in capabilities(term)]
            raise CapabilityError(f"sum field {self.name!r}: term(s) {missing} have no energy")
        out = self.terms[0].energy(state)
        for term in self.terms[1:]:
            out = out + term.energy(state)
        return out

    def describe(self):
        return {"name": "sum", "terms": [t.describe() for t in self.terms]}


class ScaledField(Field):
    """c · f: the dynamics of f run at speed c (drift × c, closure × c, energy × c).

    For a stochastic field the generator is scaled, so σ becomes √c·σ (a time change of the SDE);
    a negative factor on a stochastic field is refused.
    """

    def __init__(self, field: Field, factor: float):
        self.field = field
        self.factor = float(factor)
        self.name = f"{self.factor:g}*{field.name}"
        self.time_range = field.time_range
        self._capabilities = capabilities(field)
        if "diffusion" in self._capabilities and self.factor < 0:
            raise CapabilityError(
                f"cannot scale the stochastic field {field.name!r} by a negative factor {factor:g}: "
                "time reversal of a diffusion is not a scaled diffusion"
            )

    def velocity(self, t, x, state):
        return self.factor * self.field.velocity(t, x, state)

    def affine(self, t, state):
        b, A = self.field.affine(t, state)
        return self.factor * b, self.factor * A

    def diffusion(self, t):
        return self.factor**0.5 * self.field.diffusion(t)

    def energy(self, state):
        return self.factor * self.field.energy(state)

    def describe(self):
        return {"name": "scaled", "factor": self.factor, "field": self.field.describe()}


class PotentialField(Field):
    """v = −∇ₓ U(t, x, μ) for a potential U computed by autograd.

    ``potential(t, x, state)`` returns one value per query point, shape (R, N'). The gradient is
    taken of the sum, which is exact because each value depends only on its own point.
    """

    def __init__(self, potential: Callable, name: str = "potential", energy: Callable | None = None):
        self.potential = potential
        self.name = name
        self._energy = energy
        caps = {"velocity"}
        if energy is not None:
            caps.add("energy")
        self._capabilities = frozenset(caps)

    def velocity(self, t, x, state):
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            u = self.potential(t, xg, state)
            if u.shape != xg.shape[:-1]:
                from .errors import ShapeError

                raise ShapeError(
                    f"potential of field {self.name!r} must return shape {tuple(xg.shape[:-1])} "
                    f"(one value per point); returned {tuple(u.shape)}"
                )
            (grad,) = torch.autograd.grad(u.sum(), xg)
        return -grad

    def energy(self, state):
        if self._energy is None:
            raise CapabilityError(self._missing("energy"))
        return self._energy(state)


def from_potential(potential: Callable, name: str = "potential", energy: Callable | None = None) -> Field:
    """A field v = −∇U from a potential ``U(t, x, state) -> (R, N')`` (autograd gradient).

    ``energy(state) -> (R,)`` may be given when U derives from a known functional.
    """
    return PotentialField(potential, name=name, energy=energy)


def check_compatible(field, state, *, stochastic_integrator: bool | None = None,
                     needs: frozenset | None = None) -> None:
    """Refuse a field/state/integrator combination that cannot run, before any step.

    * a Gaussian state needs ``affine`` — unless the integrator says what it uses instead through
      ``needs`` (its ``needs`` attribute: e.g. the JKO step minimises the field's ``energy``);
    * a field with a diffusion term on particles needs a stochastic integrator;
    * a deterministic field given a stochastic integrator is fine (no noise is drawn).
    """
    if not isinstance(field, Field) and not callable(getattr(field, "velocity", None)):
        raise CapabilityError(
            f"expected a measureflow field (an object with velocity(t, x, state)); received {type(field).__name__}"
        )
    kind = state_kind(state)
    caps = capabilities(field)
    name = getattr(field, "name", type(field).__name__)
    dim = getattr(field, "dim", None)
    if isinstance(dim, numbers.Integral) and not isinstance(dim, bool) and dim != state.dim:
        # A field defined in d dimensions (its target, centre or matrix) meets a state in another:
        # refused here, before a step broadcasts the mismatch into a wrong result or a raw error.
        raise ShapeError(f"field {name!r} is defined in d = {dim} dimensions but the state has d = {state.dim}; "
                         "give the field parameters (target, center, A…) of the state's dimension")
    if kind == "mixtures":
        check_mixture_field(field)
        return
    if kind == "gaussians" and needs is not None:
        missing = sorted(set(needs) - set(caps))
        if missing:
            raise CapabilityError(
                f"field {name!r} ({type(field).__name__}) has no {' or '.join(missing)}, which this integrator "
                "uses on a Gaussians state"
            )
    elif kind == "gaussians" and "affine" not in caps:
        raise CapabilityError(
            f"field {name!r} ({type(field).__name__}) has no Gaussian closure (no affine() method), "
            "so it cannot advance a Gaussians state; run it on Particles, or give the field an "
            "affine(t, state) -> (b, A) method"
        )
    if kind == "particles" and "diffusion" in caps and stochastic_integrator is False:
        raise CapabilityError(
            f"field {name!r} has a diffusion term; integrate particles with 'euler_maruyama' "
            "(a deterministic integrator would silently drop the noise)"
        )
