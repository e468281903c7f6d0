"""Fisher–Rao and Wasserstein–Fisher–Rao geometries: gradient flows that move mass (MATH.md §15.6).

``measureflow.field(name, ..., geometry=..., rate=α)`` builds a gradient-flow field and descends its
functional F in one of three geometries:

``"wasserstein"`` (default)
    the field as it is: ∂ₜμ = div(μ∇δF), particles move by v = −∇δF, weights stay fixed;
``"fisher_rao"``
    mass moves, particles stay: ∂ₜμ = −αμ(δF − ∫δF dμ);
``"wfr"``
    both: ∂ₜμ = div(μ∇δF) − αμ(δF − ∫δF dμ).

On particles μ = Σᵢ wᵢδ_{xᵢ} the weights become an integrated channel (carried with the positions by
every solver, :class:`~measureflow.integrators.Dynamics`):

    ẇᵢ = −α wᵢ (δF(xᵢ) − Σⱼ wⱼδF(xⱼ) / Σⱼ wⱼ)     (balanced: Σᵢ wᵢ stays 1, "birth–death"),
    ẇᵢ = −α wᵢ δF(xᵢ)                              (``balanced=False``: the mass changes),

the unbalanced variant only for functionals defined on positive measures (MMD, interaction and
potential energies: the field says so with ``positive_measures = True``). Along the flow
dF/dt = −∫|∇δF|² dμ − α Var_μ(δF) (balanced). A field takes part when it provides
``first_variation(t, x, state)``: δF[μ](x) at the query points x (R, N', d), shape (R, N').

On a Gaussian state N(m, Σ) the FR flow of an F whose first variation is quadratic at Gaussians —
the field's closure (b, A) being then exactly (−∇δF(m), −∇²δF), as the field declares with
``closure_is_gradient`` — stays Gaussian, with (Stein's identities)
ṁ = −αΣ∇δF(m) = αΣb and Σ̇ = −αΣ∇²δF Σ = αΣAΣ; so the FR part is the affine pair
(αΣb, ½αΣA), added to (b, A) for WFR. For KL toward N(m_β, Σ_β) this gives MATH.md §15.6's
ṁ = (I + αΣ)P(m_β − m), Σ̇ = 2I − PΣ − ΣP + α(Σ − ΣPΣ).
"""

from __future__ import annotations

import inspect

import torch

from .errors import CapabilityError, ParameterError
from .fields import Field, capabilities
from .validators import check_positive

__all__ = ["GEOMETRIES", "GeometryField", "with_geometry", "has_first_variation", "moves_weights"]

#: The geometries a gradient flow may descend in.
GEOMETRIES = ("wasserstein", "fisher_rao", "wfr")


def has_first_variation(field) -> bool:
    """Whether ``field`` (an instance or a class) provides ``first_variation(t, x, state)``."""
    fv = getattr(field, "first_variation", None)
    if not callable(fv):
        return False
    try:
        params = [p for p in inspect.signature(fv).parameters if p != "self"]
    except (TypeError, ValueError):
        params = []
    if params[:3] != ["t", "x", "state"]:
        return False  # a method of that name with another meaning or signature
    # An instance may lack it in some configurations (kl in mode 'svgd'): it says so with a
    # ``first_variation_available`` attribute; a class is listed when it defines the method.
    return isinstance(field, type) or bool(getattr(field, "first_variation_available", True))


def moves_weights(field) -> bool:
    """Whether ``field`` integrates particle weights (it provides ``weight_rate(t, state)``)."""
    return callable(getattr(field, "weight_rate", None))


def _fields_with_first_variation(registry) -> list[str]:
    return sorted(entry.name for entry in registry.entries("fields") if has_first_variation(entry.obj))


class GeometryField(Field):
    """``field`` descending its functional in the Fisher–Rao or WFR geometry (module docstring).

    Parameters
    ----------
    field:
        a gradient-flow field with ``first_variation(t, x, state)``.
    geometry:
        ``"fisher_rao"`` or ``"wfr"``.
    rate:
        α > 0, the Fisher–Rao rate.
    balanced:
        True: the mass stays 1; False: it changes (functionals on positive measures only).
    """

    def __init__(self, field, geometry: str, rate: float = 1.0, balanced: bool = True):
        if geometry not in ("fisher_rao", "wfr"):
            raise ParameterError(f"GeometryField: geometry must be 'fisher_rao' or 'wfr'; received {geometry!r}")
        self.field = field
        self.geometry = geometry
        self.rate = check_positive(rate, "rate", getattr(field, "name", "field"))
        self.balanced = bool(balanced)
        self.name = getattr(field, "name", type(field).__name__)
        self.time_range = getattr(field, "time_range", self.time_range)
        inner = capabilities(field)
        caps = {"velocity", "weight_rate"}
        if "energy" in inner:
            caps.add("energy")
        if "affine" in inner and getattr(field, "closure_is_gradient", False):
            caps.add("affine")
        if "diffusion" in inner and geometry == "wfr":
            caps.add("diffusion")
        self._capabilities = frozenset(caps)

    @property
    def dim(self):
        """The wrapped field's dimension (None when it has none)."""
        return getattr(self.field, "dim", None)

    # -- particles -----------------------------------------------------------------------------------
    def velocity(self, t, x, state):
        """−∇δF (WFR: the field's own velocity, or its drift when it has a noise term); zero for pure FR."""
        if self.geometry == "fisher_rao":
            return torch.zeros_like(x)
        return self.field.velocity(t, x, state)

    def first_variation(self, t, x, state) -> torch.Tensor:
        """δF[μ](x), shape (R, N')."""
        return self.field.first_variation(t, x, state)

    def weight_rate(self, t, state) -> torch.Tensor:
        """ẇ (R, N): −αw(δF − ⟨δF⟩_w) (balanced) or −αwδF (module docstring)."""
        w = state.weights_or_uniform()
        phi = self.field.first_variation(t, state.x, state)
        if self.balanced:
            # Normalised by Σw, so that Σẇ = 0 exactly whatever rounding did to the sum.
            phi = phi - (w * phi).sum(-1, keepdim=True) / w.sum(-1, keepdim=True)
        return -self.rate * w * phi

    def diffusion(self, t):
        return self.field.diffusion(t)

    # -- Gaussians -----------------------------------------------------------------------------------
    def affine(self, t, state):
        """(b, A) realising ṁ and Σ̇ of the FR / WFR flow (module docstring)."""
        if "affine" not in self._capabilities:
            raise CapabilityError(
                f"field {self.name!r} in the {self.geometry} geometry has no Gaussian closure: it needs a closure "
                "that is the exact gradient of a first variation quadratic at Gaussians (e.g. kl in mode "
                "'langevin' toward a Gaussian); run it on Particles"
            )
        b, A = self.field.affine(t, state)
        S = state.cov
        b_fr = self.rate * torch.einsum("rij,rj->ri", S, torch.broadcast_to(b, state.mean.shape))
        A_fr = (0.5 * self.rate) * (S @ A)
        if self.geometry == "fisher_rao":
            return b_fr, A_fr
        return b + b_fr, A + A_fr

    def solution(self, t, initial, t0: float = 0.0):
        """The closed-form law at t, when the field has one for this geometry
        (``field.fisher_rao_solution(t, initial, rate, t0)`` for pure FR)."""
        if self.geometry == "fisher_rao" and callable(getattr(self.field, "fisher_rao_solution", None)):
            return self.field.fisher_rao_solution(t, initial, self.rate, t0)
        raise CapabilityError(
            f"field {self.name!r}: no closed-form solution in the {self.geometry} geometry; integrate it with "
            "Simulation instead"
        )

    def energy(self, state):
        """F(μ) of the current measure (weights included)."""
        return self.field.energy(state)

    def describe(self):
        return {"name": self.name, "geometry": self.geometry, "rate": self.rate, "balanced": self.balanced,
                "field": self.field.describe() if callable(getattr(self.field, "describe", None)) else {}}

    def __repr__(self) -> str:
        return f"GeometryField({self.field!r}, geometry={self.geometry!r}, rate={self.rate:g}, balanced={self.balanced})"


def with_geometry(field, geometry: str = "wasserstein", rate=None, balanced: bool = True, registry=None):
    """``field`` descending its functional in ``geometry`` (module docstring); errors are one line.

    ``rate`` (α > 0, default 1) and ``balanced`` apply to the Fisher–Rao geometries only; the error for
    a field without a first variation lists the fields of ``registry`` that have one.
    """
    name = getattr(field, "name", type(field).__name__)
    if geometry not in GEOMETRIES:
        raise ParameterError(f"field {name!r}: geometry must be one of {', '.join(map(repr, GEOMETRIES))}; received {geometry!r}")
    if geometry == "wasserstein":
        if rate is not None:
            raise ParameterError(f"field {name!r}: rate= is the Fisher–Rao rate α; give it with geometry='fisher_rao' or 'wfr'")
        return field
    if not has_first_variation(field):
        having = "none registered" if registry is None else (", ".join(_fields_with_first_variation(registry))
                                                            or "none registered")
        raise CapabilityError(
            f"field {name!r} has no first variation δF (no first_variation(t, x, state)), so it has no "
            f"{geometry} dynamics; fields with one: {having}"
        )
    if not balanced and not getattr(field, "positive_measures", False):
        raise ParameterError(
            f"field {name!r}: balanced=False lets the mass change, which needs a functional defined on positive "
            "measures (mmd, interaction, a potential energy); keep balanced=True"
        )
    return GeometryField(field, geometry, 1.0 if rate is None else rate, balanced)
