"""Sinkhorn-divergence flow toward a target (MATH.md §7).

``sinkhorn`` (:class:`SinkhornField`) descends the debiased Sinkhorn divergence

    S_ε(μ, β) = OT_ε(μ, β) − ½OT_ε(μ, μ) − ½OT_ε(β, β),
    OT_ε(α, β) = min_π ∫|x − y|² dπ + ε KL(π | α⊗β)   (cost unhalved, MATH.md §0),

with ε > 0 in units of length². δS_ε = f_μβ − f_μμ (the Sinkhorn potentials of the pairs (μ, β) and
(μ, μ)), and ∇f(x) = 2(x − E_π[y | x]), so the descent velocity is the difference of two barycentric
projections:

    v(x) = 2( Σⱼ softmaxⱼ(log qⱼ + (gⱼ − |x − yⱼ|²)/ε) yⱼ − Σₖ softmaxₖ(log wₖ + (fₖ − |x − xₖ|²)/ε) xₖ ),

with (f, g) = (f_μβ, g_μβ) in the first sum and f = f_μμ in the second. At a particle xᵢ this is
2(Σⱼ Π^{μβ}ᵢⱼ yⱼ − Σₖ Π^{μμ}ᵢₖ xₖ)/wᵢ, Πᵢⱼ = wᵢqⱼ e^{(fᵢ + gⱼ − |xᵢ − yⱼ|²)/ε}; elsewhere the potentials are
extended by the same log-sum-exp (the c-transform), so ``velocity`` may be evaluated anywhere.

The solver lives in the core, :mod:`measureflow.reductions.sinkhorn`: log-domain sweeps on the streaming
softmax (no N×M matrix), over-relaxed with ω learnt from the observed contraction, stopped once a sweep
changes no potential by more than ``tol``·ε (the only read-back from the device, every ``check_every``
sweeps), optional ε-scaling of cold solves. The field holds one
:class:`~measureflow.reductions.SinkhornDivergence`, which keeps the converged potentials keyed by the
problem (μβ or μμ), the number of replicas and particles, dtype and device, and starts the next solve from
them: along a trajectory the particles move little between calls, so a few sweeps suffice. A state with
another shape starts cold; :meth:`SinkhornField.reset` drops them. The target's own potential g_ββ
(energy only) is solved once.

**Energy.** Dual formula S_ε = ⟨w, f_μβ − f_μμ⟩ + ⟨q, g_μβ − g_ββ⟩ (MATH.md §7) on particles;
:func:`measureflow.observables.gaussian_sinkhorn_divergence` (Janati et al.) on Gaussians.

**Gaussian closure** (Gaussian target N(m_β, Σ_β); MATH.md §7, derived ✔). With σ² = ε/2,
D = (4Σ^{1/2}Σ_βΣ^{1/2} + σ⁴I)^{1/2} and the plans' cross-covariances
C_σ(Σ, Σ_β) = ½(Σ^{1/2}DΣ^{−1/2} − σ²I), C_σ(Σ, Σ) = ½((4Σ² + σ⁴I)^{1/2} − σ²I):

    b = 2(m_β − m),   A = 2(C_σ(Σ, Σ_β)ᵀ − C_σ(Σ, Σ)ᵀ)Σ⁻¹ = Σ^{−1/2}DΣ^{−1/2} − h(Σ),  h(λ) = (4λ² + σ⁴)^{1/2}/λ,

(the second form expands the first; it is symmetric, as the gradient flow's A must be). Toward γ this is
the row Ċ = (16C + ε²I)^{1/2} − (16C² + ε²I)^{1/2} (MATH.md §13); there is no closed-form solution.

**Targets.** Particles need samples of β: an :class:`~measureflow.measures.Empirical`, a
:class:`~measureflow.state.Particles` state (one per replica or shared), a tensor (M, d) / (R, M, d), or a
Gaussian with ``samples=n`` (drawn once, with ``seed``). Gaussians states need a
:class:`~measureflow.measures.Gaussian` target (or a one-component mixture with a density).

**Unbalanced** (``reach`` = ρ, length²): the debiased divergence of Séjourné et al. between positive
measures, S = (ρ + ε/2)[⟨μ, e^{−f_μμ/ρ} − e^{−f_μβ/ρ}⟩ + ⟨β, e^{−g_ββ/ρ} − e^{−g_μβ/ρ}⟩] (damped c-transforms),
with velocity v(x) = 2(e^{−f_μβ(x)/ρ}(E_μβ[y | x] − x) − e^{−f_μμ(x)/ρ}(E_μμ[x' | x] − x)) and first variation
(ρ + ε)(e^{−f_μμ/ρ} − e^{−f_μβ/ρ}); particles only (see :mod:`measureflow.reductions.sinkhorn`). Its weights
may then move with a changing mass (``geometry="wfr", balanced=False``, MATH.md §15.6).

The field is autonomous: defined for every t.
"""

from __future__ import annotations

import measureflow
from measureflow.fields import Field
from measureflow.reductions import SinkhornDivergence
from measureflow.state import Gaussians, Particles

__all__ = ["SinkhornField"]


class SinkhornField(Field):
    """Wasserstein gradient flow of S_ε(·, β) (module docstring; MATH.md §7).

    The parameters are those of :class:`~measureflow.reductions.SinkhornDivergence`, which solves for the
    potentials: the target β; ``epsilon`` = ε > 0, the entropic regularisation in units of length²; the
    stopping rule ``tol``, ``max_iter``, ``check_every``; ``relaxation`` ("auto" or ω in [1, 2));
    ``epsilon_scaling``; ``warm_start``; ``samples`` and ``seed`` for a Gaussian target on particles; ``reach``
    = ρ (length²) for the unbalanced divergence of Séjourné et al. (particles only; None: balanced).
    After each solve ``stats`` holds, per problem ("mu_beta", "mu_mu", "beta_beta"), the sweeps run and
    the last measured change (in units of ε).
    """

    name = "sinkhorn"

    def __init__(self, target, epsilon: float = 1.0, tol: float | None = 1e-6, max_iter: int = 1000,
                 check_every: int = 2, relaxation="auto", epsilon_scaling: float | None = None,
                 warm_start: bool = True, samples: int | None = None, seed: int = 0, reach: float | None = None):
        self.divergence = SinkhornDivergence(
            target, epsilon, tol=tol, max_iter=max_iter, check_every=check_every, relaxation=relaxation,
            epsilon_scaling=epsilon_scaling, warm_start=warm_start, samples=samples, seed=seed, where="sinkhorn",
            reach=reach,
        )
        self.reach = self.divergence.reach
        div = self.divergence
        self.epsilon, self.tol, self.max_iter, self.check_every = div.epsilon, div.tol, div.max_iter, div.check_every
        self.relaxation, self.epsilon_scaling, self.warm_start = div.relaxation, div.epsilon_scaling, div.warm_start
        self.target, self.dim, self.gaussian = div.target, div.dim, div.gaussian
        self._capabilities = div.capabilities
        self.stats = div.stats  # the divergence fills this dict after each solve

    @property
    def positive_measures(self) -> bool:
        """The unbalanced divergence (a reach ρ) is defined on positive measures: the unbalanced Fisher–Rao
        flow applies (MATH.md §15.6)."""
        return self.reach is not None

    def reset(self) -> None:
        """Forget the cached potentials (the next solve starts cold)."""
        self.divergence.reset()

    def potentials(self, state: Particles) -> dict:
        """The Sinkhorn potentials of the state: f_μβ (R, N), g_μβ (R, M), f_μμ (R, N)."""
        return self.divergence.potentials(state)

    # -- the protocol ---------------------------------------------------------------------------------------
    def velocity(self, t, x, state: Particles):
        return self.divergence.velocity(x, state)

    def first_variation(self, t, x, state: Particles):
        """δS_ε = f_μβ − f_μμ at x (R, N', d), shape (R, N') (Fisher–Rao / WFR weights, MATH.md §15.6)."""
        return self.divergence.first_variation(x, state)

    def affine(self, t, state: Gaussians):
        return self.divergence.affine(state)

    def energy(self, state):
        """S_ε(μ, β), shape (R,): dual formula on particles, Janati et al.'s closed form on Gaussians."""
        return self.divergence.energy(state)

    def describe(self):
        return {"name": self.name, "epsilon": self.epsilon, "reach": self.reach, "tol": self.tol, "max_iter": self.max_iter,
                "relaxation": self.relaxation, "epsilon_scaling": self.epsilon_scaling,
                "target": self.target.describe()}


@measureflow.hookimpl
def measureflow_register_fields(registry):
    registry.add_field("sinkhorn", SinkhornField)
