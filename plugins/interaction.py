"""Pairwise interaction energy with an optional confinement potential (MATH.md §0, §6).

``interaction`` (:class:`InteractionField`) descends

    F(μ) = ½ ∬ W(x − y) dμ(x) dμ(y) + ∫ V dμ,     W(z) = s·k(|z|)  (radial),

whose first variation is δF = W*μ + V (W is even), so the descent velocity is

    v(x) = −∇(W*μ)(x) − ∇V(x) = −s Σₖ wₖ ∇₁k(x, xₖ) − ∇V(x),

and dF/dt = −Σᵢ wᵢ|v(xᵢ)|² along it (MATH.md eq. 0.2). Both the velocity's sum and the energy's
½ s Σᵢ Σₖ wᵢwₖ k(xᵢ, xₖ) are :func:`measureflow.reductions.kernel_sum` calls (streamed, never N×N).

The profile k is a named radial kernel of :data:`measureflow.reductions.KERNELS` (``"gaussian"``
e^{−r²/(2ℓ²)}, ``"laplace"`` e^{−r/ℓ}, ``"energy"`` −r, ``"imq"`` (1 + r²/ℓ²)^{−1/2}; ℓ = ``bandwidth``) or a
callable ``f(r2)`` of the squared distance r² = |x − y|², applied elementwise — its gradient
∇ₓf(|x − y|²) = 2f′(r²)(x − y) comes from autograd inside the reduction. ``strength`` s scales W:
s > 0 with a decreasing profile attracts, s < 0 repels (e.g. ``kernel="energy", strength=-1`` is the
repulsive W(z) = |z|, to be balanced by a confinement).

The MMD flow's self term is this field: with W = 2k, v is −2Σₖwₖ∇₁k(x, xₖ), the first half of the
MMD velocity of MATH.md §6, and F is wᵀK w.

``confinement`` V: ``None``; a number a ≥ 0 for V(x) = ½a|x|² (∇V = ax); or a callable ``V(x)`` returning
one value per point (shape x.shape[:-1]), differentiated by autograd unless ``confinement_gradient``
(a callable x -> ∇V(x)) is given.

Particles only: a radial W other than a quadratic does not keep Gaussians Gaussian, so there is no
closure. The field is autonomous: defined for every t.
"""

from __future__ import annotations

from typing import Callable

import torch

import measureflow
from measureflow.errors import CapabilityError, ParameterError, ShapeError
from measureflow.fields import Field
from measureflow.reductions import KERNELS, measure_kernel_sum
from measureflow.state import Particles
from measureflow.targets import check_points
from measureflow.validators import check_finite, check_positive

__all__ = ["InteractionField", "RADIAL_KERNELS"]

#: Named profiles of W (translation invariant kernels of the reduction).
RADIAL_KERNELS = ("gaussian", "laplace", "energy", "imq")


class InteractionField(Field):
    """Wasserstein gradient flow of ½∬W(x − y)dμdμ + ∫V dμ (module docstring).

    Parameters
    ----------
    kernel:
        radial profile k of W = s·k: ``"gaussian"`` (default), ``"laplace"``, ``"energy"``, ``"imq"``, or a
        callable f(|x − y|²) -> k (elementwise).
    bandwidth:
        ℓ > 0 of the gaussian, laplace and imq profiles.
    strength:
        s, the factor of W (negative: repulsion).
    confinement:
        None, a number a ≥ 0 (V = ½a|x|²) or a callable V(x) -> (...,).
    confinement_gradient:
        optional callable x -> ∇V(x) (shape of x) for a callable V, used instead of autograd.
    """

    name = "interaction"

    def __init__(self, kernel="gaussian", bandwidth: float = 1.0, strength: float = 1.0,
                 confinement=None, confinement_gradient: Callable | None = None):
        where = "interaction"
        if callable(kernel) and not isinstance(kernel, str):
            self.kernel = kernel
        elif isinstance(kernel, str) and kernel in RADIAL_KERNELS:
            self.kernel = kernel
        else:
            poly = isinstance(kernel, str) and kernel in KERNELS
            hint = " (the polynomial kernels are not functions of x − y; use the mmd field)" if poly else ""
            raise ParameterError(
                f"{where}: unknown interaction kernel {kernel!r}{hint}; choose one of "
                f"{', '.join(map(repr, RADIAL_KERNELS))} or pass a callable f(sqdist) -> W"
            )
        self.bandwidth = check_positive(bandwidth, "bandwidth", where)
        self.strength = check_finite(strength, "strength", where)
        self.harmonic = None
        self.potential = None
        self.potential_gradient = None
        if confinement_gradient is not None and not callable(confinement_gradient):
            raise ParameterError(f"{where}: confinement_gradient must be a callable x -> ∇V(x)")
        if confinement is None:
            if confinement_gradient is not None:
                raise ParameterError(f"{where}: confinement_gradient needs the potential itself in confinement=")
        elif callable(confinement):
            self.potential = confinement
            self.potential_gradient = confinement_gradient
        else:
            a = check_finite(confinement, "confinement", where)
            if a < 0:
                raise ParameterError(
                    f"{where}: a harmonic confinement ½a|x|² needs a ≥ 0; received a = {a:g} (pass a callable for "
                    "another potential)"
                )
            if confinement_gradient is not None:
                raise ParameterError(f"{where}: confinement_gradient applies to a callable confinement only")
            self.harmonic = a
        self._capabilities = frozenset({"velocity", "energy"})

    def _kernel_name(self) -> str:
        return self.kernel if isinstance(self.kernel, str) else getattr(self.kernel, "__name__", "callable")

    def _check(self, state, where):
        if not isinstance(state, Particles):
            raise CapabilityError(
                f"{where}: field 'interaction' acts on Particles only (a radial interaction has no Gaussian "
                f"closure); received {type(state).__name__}"
            )

    # -- confinement ---------------------------------------------------------------------------------------
    def _confinement_value(self, x):
        if self.harmonic is not None:
            return 0.5 * self.harmonic * (x * x).sum(-1)
        value = self.potential(x)
        if not isinstance(value, torch.Tensor) or value.shape != x.shape[:-1]:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ShapeError(
                f"interaction: confinement V(x) must return one value per point, shape {tuple(x.shape[:-1])}; "
                f"received {got}"
            )
        return value

    def _confinement_gradient(self, x):
        if self.harmonic is not None:
            return self.harmonic * x
        if self.potential_gradient is not None:
            grad = self.potential_gradient(x)
            if not isinstance(grad, torch.Tensor) or grad.shape != x.shape:
                raise ShapeError(
                    f"interaction: confinement_gradient(x) must return the shape of x {tuple(x.shape)}"
                )
            return grad
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self._confinement_value(xg).sum(), xg)
        return grad

    # -- the protocol --------------------------------------------------------------------------------------
    def velocity(self, t, x, state: Particles):
        where = "interaction.velocity"
        self._check(state, where)
        check_points(x, state.dim, where)
        grad = measure_kernel_sum(x, state.x, state.weights, kernel=self.kernel, bandwidth=self.bandwidth,
                          gradient=True)
        v = -self.strength * grad
        if self.harmonic is not None or self.potential is not None:
            v = v - self._confinement_gradient(x)
        return v

    #: F is defined on positive measures: the unbalanced Fisher–Rao flow applies (MATH.md §15.6).
    positive_measures = True

    def first_variation(self, t, x, state: Particles) -> torch.Tensor:
        """δF(x) = s Σₖ wₖ k(x, xₖ) + V(x), shape (R, N') (Fisher–Rao / WFR weights, MATH.md §15.6)."""
        where = "interaction.first_variation"
        self._check(state, where)
        check_points(x, state.dim, where)
        out = self.strength * measure_kernel_sum(x, state.x, state.weights, kernel=self.kernel,
                                         bandwidth=self.bandwidth)
        if self.harmonic is not None or self.potential is not None:
            out = out + self._confinement_value(x)
        return out

    def energy(self, state) -> torch.Tensor:
        """F = ½ s Σᵢₖ wᵢwₖ k(xᵢ, xₖ) + Σᵢ wᵢ V(xᵢ), shape (R,)."""
        self._check(state, "interaction.energy")
        w = state.weights_or_uniform()
        sums = measure_kernel_sum(state.x, state.x, state.weights, kernel=self.kernel, bandwidth=self.bandwidth)
        out = 0.5 * self.strength * (w * sums).sum(-1)
        if self.harmonic is not None or self.potential is not None:
            out = out + (w * self._confinement_value(state.x)).sum(-1)
        return out

    def describe(self):
        confinement = (
            None if self.harmonic is None and self.potential is None
            else self.harmonic if self.harmonic is not None
            else getattr(self.potential, "__name__", "callable")
        )
        return {"name": self.name, "kernel": self._kernel_name(), "bandwidth": self.bandwidth,
                "strength": self.strength, "confinement": confinement}


@measureflow.hookimpl
def measureflow_register_fields(registry):
    registry.add_field("interaction", InteractionField)
