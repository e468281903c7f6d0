"""Log-domain Sinkhorn on the streaming softmax: OT_ε potentials and the debiased divergence S_ε (MATH.md §7).

For α = Σᵢ wᵢ δ_{xᵢ}, β = Σⱼ qⱼ δ_{yⱼ} and the cost |x − y|² (unhalved, MATH.md §0), ε > 0 in units of
length²:

    OT_ε(α, β) = min_π ∫|x − y|² dπ + ε KL(π | α⊗β),   S_ε(μ, β) = OT_ε(μ, β) − ½OT_ε(μ, μ) − ½OT_ε(β, β).

**Potentials** (:func:`sinkhorn_potentials`, :func:`symmetric_potential`). Log-domain Sinkhorn:
gⱼ ← −ε log Σᵢ wᵢ e^{(fᵢ − Cᵢⱼ)/ε}, fᵢ ← −ε log Σⱼ qⱼ e^{(gⱼ − Cᵢⱼ)/ε}, and for the symmetric pair the
damped update f ← ⅓f + ⅔T(f). The two-sided sweeps are over-relaxed, g ← (1 − ω)g + ωT(f) and likewise f
(same fixed point): with ``relaxation=("auto", ω₀)`` ω is learnt from the observed contraction (Young's
optimum for a two-block Gauss–Seidel iteration, see :func:`_iterate`), typically 1.3–1.6 at ε comparable
to the data's variance, which cuts the sweeps 2–5× against plain Sinkhorn. Every log-sum-exp is streamed (no N×M
matrix): one exponential sum shifted row by row by the previous sweep's potential, which is the row's
log-sum-exp at the fixed point (:func:`.logsumexp.shifted_logsumexp`, the cost of one kernel sum), with
rows the shift misses redone by the two-pass :func:`~measureflow.reductions.softmax_average`. Iterations stop once one
sweep changes no potential by more than ``tol``·ε (the marginals then hold to a relative error of about
``tol``), after ``max_iter`` sweeps at most; the test runs every ``check_every`` sweeps and is the only
read-back from the device (``tol=None``: exactly ``max_iter`` sweeps and none). *ε-scaling*
(``epsilon_scaling`` = ρ ∈ (0, 1)): a cold solve first sweeps once at each of ε_k = max(ε, D²ρᵏ), D the
diameter of the point clouds (one read-back to get D), then iterates at ε.

**Unbalanced** (``reach`` = ρ, length²): OT_{ε,ρ} relaxes the marginals by ρ·KL; the c-transforms are damped
by λ = 1/(1 + ε/ρ), and the debiased divergence of Séjourné et al. (2019),
S = (ρ + ε/2)[⟨α, e^{−f_αα/ρ} − e^{−f_αβ/ρ}⟩ + ⟨β, e^{−g_ββ/ρ} − e^{−g_αβ/ρ}⟩], is defined on positive measures
of any mass, with δS = (ρ + ε)(e^{−f_αα/ρ} − e^{−f_αβ/ρ}) and descent velocity
v(x) = 2(e^{−f_αβ(x)/ρ}(E_αβ[y | x] − x) − e^{−f_αα(x)/ρ}(E_αα[x' | x] − x)). ρ → ∞ is the balanced case.

**Divergence** (:class:`SinkhornDivergence`). δS_ε = f_μβ − f_μμ and ∇f(x) = 2(x − E_π[y | x]), so the
Wasserstein descent velocity of S_ε(·, β) is the difference of two barycentric projections,

    v(x) = 2( Σⱼ softmaxⱼ(log qⱼ + (gⱼ − |x − yⱼ|²)/ε) yⱼ − Σₖ softmaxₖ(log wₖ + (fₖ − |x − xₖ|²)/ε) xₖ ),

with (f, g) = (f_μβ, g_μβ) in the first sum and f = f_μμ in the second; off the particles the potentials
are extended by the same log-sum-exp (the c-transform), so v may be evaluated anywhere. Energy: the dual
formula S_ε = ⟨w, f_μβ − f_μμ⟩ + ⟨q, g_μβ − g_ββ⟩ on particles, Janati et al.'s closed form on Gaussians.
Gaussian closure toward N(m_β, Σ_β) (derived ✔): with σ² = ε/2 and D = (4Σ^{1/2}Σ_βΣ^{1/2} + σ⁴I)^{1/2},

    b = 2(m_β − m),   A = Σ^{−1/2}DΣ^{−1/2} − h(Σ),   h(λ) = (4λ² + σ⁴)^{1/2}/λ.

*Warm start.* The divergence keeps the converged potentials, keyed by the problem (μβ or μμ), the number of
replicas and particles, dtype and device, and starts the next solve from them: along a trajectory the
particles move little between calls, so a few sweeps suffice.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..errors import CapabilityError, ParameterError
from ..linalg import matrix_function
from ..state import Gaussians, Particles
from ..targets import as_target, check_points, check_replicas, check_state, gaussian_target, positive
from ..validators import check_int
from .logsumexp import shifted_logsumexp
from .softmax import softmax_average

__all__ = ["sinkhorn_potentials", "symmetric_potential", "SinkhornDivergence"]

#: Automatic over-relaxation: upper bound of ω (ω → 2 stalls), how close two successive contraction
#: rates must be to count as steady, and how far above ω − 1 a rate must be to show ω below its optimum.
_MAX_RELAXATION = 1.9
_STEADY = 0.02
_MARGIN = 0.03


# -- log-domain Sinkhorn through the streaming softmax ------------------------------------------------------


def _c_transform(queries, keys, log_weights, potential, epsilon, previous=None):
    """−ε log Σⱼ wⱼ e^{(φⱼ − |q − kⱼ|²)/ε} at every query (one half-sweep of log-domain Sinkhorn).

    With ``previous`` (the last sweep's potential at the queries) the log-sum-exp is one shifted
    exponential sum, −previous/ε being its value at the fixed point (:func:`.logsumexp.shifted_logsumexp`;
    rows it misses fall back to two passes); without it, the streaming softmax's two passes.
    """
    lw = log_weights + potential / epsilon
    if previous is not None:
        return -epsilon * shifted_logsumexp(queries, keys, lw, previous / -epsilon, scale=1.0 / epsilon)
    _, lse = softmax_average(queries, keys, log_weights=lw, scale=1.0 / epsilon, return_logsumexp=True)
    return -epsilon * lse


def _log_weights(weights, like, n):
    if weights is None:
        return torch.full(like.shape[:2], -math.log(n), dtype=like.dtype, device=like.device)
    return torch.log(weights)


def _schedule(epsilon, scaling, clouds):
    """The ε levels of a cold solve: one sweep at each of max(ε, D²ρᵏ) before ε (none without scaling)."""
    if scaling is None:
        return []
    points = torch.cat([c.reshape(-1, c.shape[-1]) for c in clouds])
    diameter2 = float(((points.amax(0) - points.amin(0)) ** 2).sum())
    levels, level = [], diameter2
    while level > epsilon:
        levels.append(level)
        level *= scaling
    return levels


def _iterate(sweep, state, epsilon, tol, max_iter, check_every, omega=None):
    """Run ``sweep(state, ε, check, ω) -> (state, change)`` to tolerance.

    ``omega``: None (no relaxation parameter), a fixed ω, or ("auto", ω₀): start at ω₀ and raise ω
    toward the optimal over-relaxation of a two-block Gauss–Seidel iteration (Young's theory, which
    the linearised Sinkhorn map obeys). While ω is below its optimum the changes contract steadily at
    a rate ρ > ω − 1 per sweep; the plain iteration's rate is then κ = (ρ + ω − 1)²/(ρω²) and the optimum
    ω* = 2/(1 + √(1 − κ)). Once ρ reaches ω − 1 (ω at or past ω*, complex modes, ρ = ω − 1) nothing is
    learnt and ω stays. A change that more than doubles resets ω to 1.
    Returns (state, sweeps, residual/ε or None, ω).
    """
    auto = isinstance(omega, tuple)
    w = omega[1] if auto else omega
    residual, previous, last_rate = None, None, None
    for it in range(1, max_iter + 1):
        check = tol is not None and (it % check_every == 0 or it == max_iter)
        state, change = sweep(state, epsilon, check, w)
        if not check:
            continue
        residual = float(change) / epsilon
        if residual <= tol:
            return state, it, residual, w
        if auto and previous:
            rate = (residual / previous) ** (1.0 / check_every) if residual > 0 else 0.0
            if residual > 2.0 * previous:
                w, rate = 1.0, None
            elif last_rate is not None and abs(rate - last_rate) < _STEADY and w - 1.0 + _MARGIN < rate < 1.0:
                kappa = min((rate + w - 1.0) ** 2 / (rate * w * w), 1.0)
                w = max(w, min(_MAX_RELAXATION, 2.0 / (1.0 + math.sqrt(1.0 - kappa))))
                rate = None  # the next estimate must come from sweeps at the new ω
            last_rate = rate
        previous = residual
    return state, max_iter, residual, w


def _damping(epsilon, reach):
    """λ = 1/(1 + ε/ρ) of the unbalanced c-transform (1: balanced, ``reach`` None)."""
    return 1.0 if reach is None else 1.0 / (1.0 + epsilon / reach)


def sinkhorn_potentials(x, logw, y, logq, epsilon, *, f=None, g=None, relaxation=("auto", 1.0), tol=1e-6,
                        max_iter=1000, check_every=2, epsilon_scaling=None, reach=None, single_pass=True):
    """(f, g, ω, sweeps, residual) of OT_ε between Σwᵢδ_{xᵢ} and Σqⱼδ_{yⱼ}, cost |x − y|² (log-domain;
    module docstring, MATH.md §7).

    x (R, N, d), y (R or 1, M, d), log-weights (R or 1, N) / (R or 1, M); ``epsilon`` = ε > 0 (length²);
    f, g optional warm starts. Over-relaxed sweeps g ← (1 − ω)g + ωT(f), f ← (1 − ω)f + ωT(g) (ω = 1:
    plain Sinkhorn); the fixed point is the same for every ω, only the speed changes. ``relaxation``: a
    fixed ω or ("auto", ω₀). ``residual`` is the last measured change in units of ε (None with tol=None).
    ``reach`` = ρ > 0 (length²): unbalanced OT with KL marginal penalties ρ·KL, whose c-transforms are
    damped by λ = 1/(1 + ε/ρ) (Séjourné et al. 2019); None: balanced.
    ``single_pass``: each half-sweep is one exponential sum shifted by the previous potential (divided by
    λ: the undamped c-transform's value at the fixed point) (:func:`.logsumexp.shifted_logsumexp`; same
    result, rows it misses are redone in two passes); False: the two-pass streaming softmax throughout.
    """
    R = max(x.shape[0], y.shape[0])
    f = torch.zeros(R, x.shape[1], dtype=x.dtype, device=x.device) if f is None else f
    cold = g is None
    g = torch.zeros(R, y.shape[1], dtype=x.dtype, device=x.device) if g is None else g

    def sweep(fg, e, check, w):
        f_old, g_old = fg
        lam = _damping(e, reach)
        g_new = lam * _c_transform(y, x, logw, f_old, e, g_old / lam if single_pass else None)
        if w != 1.0:
            g_new = torch.lerp(g_old, g_new, w)
        f_new = lam * _c_transform(x, y, logq, g_new, e, f_old / lam if single_pass else None)
        if w != 1.0:
            f_new = torch.lerp(f_old, f_new, w)
        change = (f_new - f_old).abs().amax() if check else None
        return (f_new, g_new), change

    if cold:
        for level in _schedule(epsilon, epsilon_scaling, (x, y)):
            (f, g), _ = sweep((f, g), level, False, 1.0)
    (f, g), sweeps, residual, w = _iterate(sweep, (f, g), epsilon, tol, max_iter, check_every, relaxation)
    return f, g, w, sweeps, residual


def symmetric_potential(x, logw, epsilon, *, f=None, tol=1e-6, max_iter=1000, check_every=2,
                        epsilon_scaling=None, reach=None, single_pass=True):
    """(f, sweeps, residual) of OT_ε(α, α), α = Σwᵢδ_{xᵢ}, by the damped update f ← ⅓f + ⅔T(f).

    T alone oscillates: near the fixed point δT(f) = −Pδf with P = softmax matrix, similar to a congruence
    of the positive semi-definite Gibbs kernel and row-stochastic, so spec(P) ⊂ [0, 1]. The damped map
    (1 − θ)I − θP contracts every mode by at most max(|1 − 2θ|, 1 − θ), which θ = ⅔ minimises: ⅓ per
    sweep (the classical average θ = ½ gives ½). ``reach``: as in :func:`sinkhorn_potentials` (T damped by λ);
    ``single_pass`` likewise.
    """
    cold = f is None
    f = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device) if f is None else f

    def sweep(f_old, e, check, w):
        lam = _damping(e, reach)
        bound = f_old / lam if single_pass else None
        f_new = torch.lerp(f_old, lam * _c_transform(x, x, logw, f_old, e, bound), 2.0 / 3.0)
        change = (f_new - f_old).abs().amax() if check else None
        return f_new, change

    if cold:
        for level in _schedule(epsilon, epsilon_scaling, (x,)):
            f, _ = sweep(f, level, False, None)
    f, sweeps, residual, _ = _iterate(sweep, f, epsilon, tol, max_iter, check_every)
    return f, sweeps, residual


# -- the divergence toward a fixed target ---------------------------------------------------------------------


class SinkhornDivergence:
    """S_ε(·, β) toward a fixed target β: warm-started potentials, the Wasserstein gradient, the energy and
    the Gaussian closure (module docstring; MATH.md §7). What the fields built on Sinkhorn share.

    Parameters
    ----------
    target:
        β: Gaussian (closure; with ``samples`` also particles), Empirical, Particles or samples (M, d) / (R, M, d).
    epsilon:
        ε > 0, the entropic regularisation (length², cost |x − y|², Gibbs kernel e^{−|x−y|²/ε}).
    tol, max_iter, check_every:
        stopping rule of every solve: potentials change by at most tol·ε in a sweep (tol=None: always
        ``max_iter`` sweeps, no read-back), tested every ``check_every`` sweeps.
    relaxation:
        ω of the over-relaxed μβ sweeps: ``"auto"`` (estimated from the observed contraction and kept with
        the warm start) or a number in [1, 2) (1: plain Sinkhorn).
    epsilon_scaling:
        None or ρ ∈ (0, 1): cold solves anneal ε from the squared diameter by factors ρ.
    warm_start:
        start each solve from the previous potentials of the same shape.
    samples, seed:
        draw ``samples`` points of a Gaussian target once, for particles.
    reach:
        None (balanced S_ε) or ρ > 0 (length²): the unbalanced divergence of Séjourné et al. (marginals
        penalised by ρ·KL), defined on positive measures of any mass (module docstring); particles only.
    where:
        the owner's name, which every error and warning starts with.

    After each solve ``stats`` holds, per problem ("mu_beta", "mu_mu", "beta_beta"), the sweeps run and the
    last measured change (in units of ε).
    """

    def __init__(self, target, epsilon: float = 1.0, *, tol: float | None = 1e-6, max_iter: int = 1000,
                 check_every: int = 2, relaxation="auto", epsilon_scaling: float | None = None,
                 warm_start: bool = True, samples: int | None = None, seed: int = 0, where: str = "sinkhorn",
                 reach: float | None = None):
        self.where = where
        self.epsilon = positive(epsilon, "epsilon", where)
        self.reach = None if reach is None else positive(reach, "reach", where)
        self.tol = None if tol is None else positive(tol, "tol", where)
        self.max_iter = check_int(max_iter, "max_iter", where)
        self.check_every = check_int(check_every, "check_every", where)
        if relaxation != "auto":
            omega = positive(relaxation, "relaxation", where)
            if not 1.0 <= omega < 2.0:
                raise ParameterError(
                    f"{where}: relaxation must be 'auto' or a number in [1, 2); received {relaxation!r}"
                )
            relaxation = omega
        self.relaxation = relaxation
        if epsilon_scaling is not None:
            rho = positive(epsilon_scaling, "epsilon_scaling", where)
            if rho >= 1:
                raise ParameterError(f"{where}: epsilon_scaling must lie in (0, 1); received {epsilon_scaling!r}")
            epsilon_scaling = rho
        self.epsilon_scaling = epsilon_scaling
        self.warm_start = bool(warm_start)
        self.target = as_target(target, where, samples=samples, seed=seed)
        self.dim = self.target.dim
        self.gaussian = None if self.target.law is None else gaussian_target(self.target.law)
        if self.target.points is None and self.gaussian is None:
            raise ParameterError(
                f"{where}: a {type(self.target.law).__name__} target needs samples=<n> (the Gaussian closure needs a "
                "single Gaussian target)"
            )
        caps = {"velocity", "energy"}
        if self.gaussian is not None and self.reach is None:
            caps.add("affine")
        #: What a field built on this divergence provides (the Gaussian closure needs a Gaussian target).
        self.capabilities = frozenset(caps)
        self._warm: dict = {}
        self.stats: dict = {}

    def reset(self) -> None:
        """Forget the warm-start potentials (the next solve starts cold)."""
        self._warm.clear()

    # -- potentials -----------------------------------------------------------------------------------------
    def _samples(self, like, where):
        if self.target.points is None:
            raise CapabilityError(
                f"{where}: the particle field needs samples of the target; build the field with samples=<n> (drawn "
                "once from the Gaussian target) or give the target as an Empirical"
            )
        y, q = self.target.tensors(like)
        return y, _log_weights(q, y, y.shape[1])

    def _options(self):
        return {"tol": self.tol, "max_iter": self.max_iter, "check_every": self.check_every,
                "epsilon_scaling": self.epsilon_scaling, "reach": self.reach}

    def _record(self, problem, sweeps, residual):
        self.stats[problem] = {"sweeps": sweeps, "residual": residual}
        if self.tol is not None and residual is not None and residual > self.tol:
            # stacklevel: _record ← potentials ← velocity/energy ← the field's method ← its caller
            warnings.warn(
                f"{self.where}: the {problem} potentials stopped after max_iter = {self.max_iter} sweeps with a change "
                f"of {residual:.2e}·ε > tol = {self.tol:.1e}; raise max_iter, raise epsilon or use epsilon_scaling",
                RuntimeWarning,
                stacklevel=5,
            )

    def _start(self, key):
        return self._warm.get(key, {}) if self.warm_start else {}

    def potentials(self, state: Particles) -> dict:
        """The Sinkhorn potentials of the state: f_μβ (R, N), g_μβ (R, M), f_μμ (R, N)."""
        where = f"{self.where}.potentials"
        check_state(state, self.dim, where, Particles)
        check_replicas(self.target, state.replicas, where)
        x = state.x
        R, N, _ = x.shape
        y, logq = self._samples(x, where)
        logw = _log_weights(state.weights, x, N)
        eps = self.epsilon

        key = ("mu_beta", R, N, y.shape[1], x.dtype, x.device)
        start = self._start(key)
        omega = self.relaxation if self.relaxation != "auto" else ("auto", start.get("omega", 1.0))
        f_mb, g_mb, omega, sweeps, residual = sinkhorn_potentials(
            x, logw, y, logq, eps, f=start.get("f"), g=start.get("g"), relaxation=omega, **self._options())
        self._warm[key] = {"f": f_mb, "g": g_mb, "omega": omega}
        self._record("mu_beta", sweeps, residual)

        key = ("mu_mu", R, N, x.dtype, x.device)
        f_mm, sweeps, residual = symmetric_potential(x, logw, eps, f=self._start(key).get("f"), **self._options())
        self._warm[key] = {"f": f_mm}
        self._record("mu_mu", sweeps, residual)
        return {"f_mu_beta": f_mb, "g_mu_beta": g_mb, "f_mu_mu": f_mm}

    def _target_potential(self, like):
        """g_ββ, solved once (the target does not move)."""
        y, logq = self._samples(like, f"{self.where}.energy")
        key = ("beta_beta", y.shape[0], y.shape[1], like.dtype, like.device)
        hit = self._warm.get(key)
        if hit is None:
            g, sweeps, residual = symmetric_potential(y, logq, self.epsilon, **self._options())
            self._record("beta_beta", sweeps, residual)
            hit = self._warm[key] = {"f": g}
        return hit["f"]

    # -- velocity, closure, energy ----------------------------------------------------------------------------
    def _extended(self, x, state: Particles, where: str):
        """The barycentric projections E_μβ[y | x], E_μμ[x' | x] (R, N', d) and the potentials f_μβ(x),
        f_μμ(x) (R, N') extended to x by the (damped) c-transform: one streamed pass for each pair."""
        check_state(state, self.dim, where, Particles)
        check_points(x, self.dim, where)
        pot = self.potentials(state)
        eps = self.epsilon
        lam = _damping(eps, self.reach)
        y, logq = self._samples(x, where)
        logw = _log_weights(state.weights, state.x, state.size)
        toward, lse_b = softmax_average(x, y, log_weights=logq + pot["g_mu_beta"] / eps, scale=1.0 / eps,
                                        return_logsumexp=True)
        own, lse_a = softmax_average(x, state.x, log_weights=logw + pot["f_mu_mu"] / eps, scale=1.0 / eps,
                                     return_logsumexp=True)
        return toward, own, -lam * eps * lse_b, -lam * eps * lse_a

    def velocity(self, x, state: Particles):
        """v(x) = −∇δS(x), shape of x (R, N', d): the descent velocity of S_ε(·, β) at μ = state. Balanced:
        2(E_μβ[y | x] − E_μμ[x' | x]); with a reach ρ: 2(e^{−f_μβ(x)/ρ}(E_μβ[y | x] − x) − e^{−f_μμ(x)/ρ}(E_μμ[x' | x] − x))."""
        toward, own, f_ab, f_aa = self._extended(x, state, f"{self.where}.velocity")
        if self.reach is None:
            return 2.0 * (toward - own)
        rho = self.reach
        return 2.0 * (torch.exp(-f_ab / rho)[..., None] * (toward - x) - torch.exp(-f_aa / rho)[..., None] * (own - x))

    def first_variation(self, x, state: Particles):
        """δS(x), shape (R, N'), with the potentials extended to x by the c-transform (the Fisher–Rao / WFR
        weight rate, MATH.md §15.6): f_μβ(x) − f_μμ(x), or (ρ + ε)(e^{−f_μμ(x)/ρ} − e^{−f_μβ(x)/ρ}) with a reach ρ."""
        _, _, f_ab, f_aa = self._extended(x, state, f"{self.where}.first_variation")
        if self.reach is None:
            return f_ab - f_aa
        rho = self.reach
        return (rho + self.epsilon) * (torch.exp(-f_aa / rho) - torch.exp(-f_ab / rho))

    def affine(self, state: Gaussians):
        """(b, A) of the Gaussian closure toward a Gaussian target (module docstring), A symmetric."""
        where = f"{self.where}.affine"
        if self.reach is not None:
            raise CapabilityError(f"{where}: the unbalanced divergence (reach = {self.reach:g}) has no Gaussian closure; "
                                  "run it on Particles")
        if self.gaussian is None:
            raise CapabilityError(
                f"{where}: the Gaussian closure needs a Gaussian target; the target is samples. Run the field on "
                "Particles, or give target=Gaussian(...)"
            )
        check_state(state, self.dim, where, Gaussians)
        m, S = state.mean, state.cov
        mb, Sb = self.target.moments(m)
        s2 = 0.5 * self.epsilon
        s4 = s2 * s2
        root = matrix_function(S, torch.sqrt)
        inv_root = matrix_function(S, torch.rsqrt)
        D = matrix_function(4.0 * root @ Sb @ root, lambda lam: torch.sqrt(lam.clamp_min(0) + s4))
        A = inv_root @ D @ inv_root - matrix_function(S, lambda lam: torch.sqrt(4.0 * lam * lam + s4) / lam)
        return 2.0 * (mb - m), 0.5 * (A + A.transpose(-1, -2))

    def energy(self, state) -> torch.Tensor:
        """S_ε(μ, β), shape (R,): dual formula on particles, Janati et al.'s closed form on Gaussians."""
        # observables builds on the reductions, so it is imported when first needed, not with this package
        from ..observables import gaussian_sinkhorn_divergence

        where = f"{self.where}.energy"
        check_state(state, self.dim, where)
        check_replicas(self.target, state.replicas, where)
        if isinstance(state, Gaussians):
            if self.reach is not None:
                raise CapabilityError(f"{where}: the unbalanced divergence has no closed form on Gaussians; use Particles")
            if self.gaussian is None:
                raise CapabilityError(
                    f"{where}: S_ε of a Gaussian state has a closed form against a Gaussian target only; the target "
                    "is samples. Evaluate it on Particles (e.g. state.sample(n))"
                )
            mb, Sb = self.target.moments(state.mean)
            return gaussian_sinkhorn_divergence(state.mean, state.cov, mb, Sb, self.epsilon)
        pot = self.potentials(state)
        w = state.weights_or_uniform()
        y, q = self.target.tensors(state.x)
        q = torch.full(y.shape[:2], 1.0 / y.shape[1], dtype=y.dtype, device=y.device) if q is None else q
        g_bb = self._target_potential(state.x)
        if self.reach is not None:
            # Séjourné et al.: (ρ + ε/2)[⟨α, e^{−f_αα/ρ} − e^{−f_αβ/ρ}⟩ + ⟨β, e^{−g_ββ/ρ} − e^{−g_αβ/ρ}⟩]
            rho = self.reach
            e = lambda f: torch.exp(-f / rho)  # noqa: E731
            return (rho + 0.5 * self.epsilon) * ((w * (e(pot["f_mu_mu"]) - e(pot["f_mu_beta"]))).sum(-1)
                                                 + (q * (e(g_bb) - e(pot["g_mu_beta"]))).sum(-1))
        return (w * (pot["f_mu_beta"] - pot["f_mu_mu"])).sum(-1) + (q * (pot["g_mu_beta"] - g_bb)).sum(-1)
