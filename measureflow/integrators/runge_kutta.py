"""Tableau-driven explicit Runge–Kutta: the stage loop (shared with the adaptive method) and the
fixed-step integrators euler, heun, midpoint and rk4.

Particles take exactly one step of h = t1 − t0 per :meth:`ExplicitRungeKutta.advance` with no
device→host synchronisation: stage times and coefficients are Python floats, and no value is read
back (a non-finite state is caught by the simulation's health flags).

Gaussians (MATH.md eq. 0.1) are checked after every step — one synchronisation per step — because a
covariance must never leave the cone of SPD matrices: if any replica's Σ fails a Cholesky
factorisation or a value is non-finite, the step is retried from its start as 2, 4, 8, … substeps,
up to ``max_halvings`` times, and then :class:`~measureflow.integrators.StepFailure` is raised.
One-stage methods (Euler) advance Σ by the pushforward (I + hA)Σ(I + hA)ᵀ instead of Σ + h(AΣ + ΣAᵀ),
which is positive semi-definite for every h.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .base import Integrator, StepFailure, as_time
from .systems import GaussianSystem, ParticleSystem, system_for
from .tableau import ButcherTableau

__all__ = ["ExplicitRungeKutta", "rk_stages", "combine", "advance_gaussians"]

Tensors = tuple[torch.Tensor, ...]


def combine(y: Tensors, h: float, weights: Sequence[float], ks: Sequence[Tensors]) -> Tensors:
    """y + h Σᵢ wᵢ kᵢ, skipping zero weights (component-wise over the tuple y).

    The weighted sum is accumulated first, in one fresh buffer (so small increments are summed
    before they meet the larger y), then added to y: two allocations per component whatever the
    number of stages.
    """
    terms = [(w, k) for w, k in zip(weights, ks) if w != 0.0]
    if not terms:
        return tuple(y)
    out = []
    for comp, y_c in enumerate(y):
        w0, k0 = terms[0]
        acc = k0[comp] * w0
        for w, k in terms[1:]:
            acc.add_(k[comp], alpha=w)
        out.append(torch.add(y_c, acc, alpha=h))
    return tuple(out)


def rk_stages(
    tableau: ButcherTableau,
    rate: Callable[[float, Tensors], Tensors],
    t: float,
    y: Tensors,
    h: float,
    k1: Tensors | None = None,
    *,
    stages: int | None = None,
) -> list[Tensors]:
    """The stage derivatives k₁ … k_s of one step (kᵢ = f(t + cᵢh, y + h Σⱼ aᵢⱼkⱼ)).

    ``k1`` may be given when f(t, y) is already known (FSAL); ``stages`` stops early (the FSAL
    stage of an embedded pair is evaluated by the caller at the new point).
    """
    n = tableau.stages if stages is None else stages
    ks = [k1 if k1 is not None else rate(t, y)]
    for i in range(1, n):
        y_i = combine(y, h, tableau.a[i], ks)
        ks.append(rate(t + tableau.c[i] * h, y_i))
    return ks


def advance_gaussians(
    integrator: Integrator,
    step: Callable[[float, Tensors, float], Tensors],
    state,
    t0: float,
    t1: float,
    max_halvings: int,
):
    """Advance a Gaussian state from t0 to t1 by one step ``step(t, y, h) -> y'``, retried as
    2, 4, …, 2^max_halvings equal substeps (each restarting from t0) while any replica leaves the
    SPD cone or goes non-finite. Raises StepFailure when the finest split fails too."""
    y0 = GaussianSystem.pack(state)
    h_total = t1 - t0
    stats = integrator.stats
    reason, t_fail = "", t0
    for level in range(max_halvings + 1):
        n = 1 << level
        h = h_total / n
        y = y0
        ok = True
        for j in range(n):
            t = t0 + j * h
            y_next = step(t, y, h)
            stats["steps"] += 1
            admissible = GaussianSystem.admissible(y_next)
            if not bool(admissible):  # host sync, by design (see module docstring)
                ok = False
                # Everything computed at this level is thrown away.
                stats["rejected"] += j + 1
                finite = bool(torch.isfinite(y_next[0]).all() & torch.isfinite(y_next[1]).all())
                reason = "covariance left the SPD cone" if finite else "non-finite Gaussian parameters"
                t_fail = t
                break
            y = y_next
        if ok:
            stats["accepted"] += n
            return GaussianSystem.unpack(state, y)
    raise StepFailure(
        reason,
        t_fail,
        f"{integrator.name}: the step from t = {t0:.9g} to {t1:.9g} still failed when split into "
        f"{1 << max_halvings} substeps; use a smaller time step or the adaptive 'dopri5', or check "
        "that the field's affine() closure is finite at this state",
    )


class ExplicitRungeKutta(Integrator):
    """Fixed-step explicit Runge–Kutta method given by a :class:`ButcherTableau`.

    One call to :meth:`advance` takes one step of h = t1 − t0 (negative h integrates backwards):

        kᵢ = f(t0 + cᵢh, y + h Σⱼ aᵢⱼkⱼ),   y' = y + h Σᵢ bᵢkᵢ,

    with y = x for particles (each stage's velocity sees the stage's particles as the measure) and
    y = (m, Σ) for Gaussians (see the module docstring for the SPD safeguard; it synchronises once
    per Gaussian step, the particle path never does).

    Parameters
    ----------
    tableau:
        the method (``EULER``, ``HEUN``, ``MIDPOINT``, ``RK4`` or your own).
    max_halvings:
        Gaussian states only: how many times a step that leaves the SPD cone is split in two before
        giving up with StepFailure (default 10, i.e. at most 1024 substeps).
    """

    adaptive = False
    stochastic = False

    def __init__(self, tableau: ButcherTableau, *, max_halvings: int = 10):
        super().__init__()
        if not isinstance(tableau, ButcherTableau):
            raise TypeError(f"ExplicitRungeKutta needs a ButcherTableau; received {type(tableau).__name__}")
        if int(max_halvings) < 0:
            raise ValueError(f"max_halvings must be >= 0; received {max_halvings!r}")
        self.tableau = tableau
        self.name = tableau.name
        self.order = tableau.order
        self.max_halvings = int(max_halvings)

    @property
    def options(self) -> dict:
        return {"max_halvings": self.max_halvings}

    def advance(self, field, state, t0: float, t1: float, generator=None):
        """One step from t0 to t1 (``generator`` is unused: the method draws no noise)."""
        self.check(field, state)
        t0, t1 = as_time(t0, "t0"), as_time(t1, "t1")
        system = system_for(state)
        if system is ParticleSystem:
            y = self._step(system, field, state, t0, system.pack(state), t1 - t0)
            return system.unpack(state, y)
        return advance_gaussians(
            self,
            lambda t, y, h: self._step(system, field, state, t, y, h),
            state,
            t0,
            t1,
            self.max_halvings,
        )

    def _step(self, system, field, state, t: float, y: Tensors, h: float) -> Tensors:
        tab = self.tableau
        if system is GaussianSystem and tab.stages == 1:
            self.stats["nfev"] += 1
            return GaussianSystem.euler_pushforward(field, t, state, y, h)

        def rate(s, z):
            self.stats["nfev"] += 1
            return system.rate(field, s, state, z)

        ks = rk_stages(tab, rate, t, y, h)
        if system is ParticleSystem:
            # Particle steps are counted here; Gaussian steps by advance_gaussians.
            self.stats["steps"] += 1
            self.stats["accepted"] += 1
        return combine(y, h, tab.b, ks)
