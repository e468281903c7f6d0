"""KL divergence to a target: Fokker–Planck / Langevin dynamics and their deterministic schemes (MATH.md §3).

``kl`` (:class:`KLField`) descends F(μ) = KL(μ | β), β ∝ e^{−V}: δF = log μ + V and the Wasserstein
descent velocity is v = −∇V − ∇log μ (MATH.md §0, §3). The target β is given as

* a :class:`~measureflow.measures.Gaussian` N(m_β, Σ_β) (P = Σ_β⁻¹): the only target with a Gaussian
  closure and closed-form solution;
* a :class:`~measureflow.measures.GaussianMixture` with a density (score and log-density in closed form);
* user callables ``potential(x) -> V(x)`` (shape x.shape[:-1]) and/or ``score(x) -> ∇log β(x) = −∇V(x)``
  (shape x.shape); with the potential alone the score comes from autograd;
* samples — an :class:`~measureflow.measures.Empirical`, a :class:`~measureflow.state.Particles` state
  (one target per replica) or a tensor (M, d) / (R, M, d) — for ``mode="smoothed"`` only;
* ``None``: no potential, F = ∫ μ log μ (negative entropy) and the flow is the heat equation ∂ₜμ = Δμ.

The term −∇log μ has four treatments (``mode``):

``"langevin"`` (default for analytic targets)
    dX = −∇V(X) dt + √2 dW: ``velocity`` is the drift −∇V only and ``diffusion`` is √2, so particles
    must run under ``euler_maruyama`` (x ← x − h∇V(x) + √(2h)ξ; bias O(h), e.g. OU stationary variance
    1/(1 − h/2)); a deterministic integrator on particles is refused, since the drift alone is not the
    KL flow. On a Gaussian state ``affine`` is the law's velocity, so deterministic integrators are exact.
``"blob"``
    deterministic kernel-density scheme v(x) = −∇V(x) − B_ε[μ](x)/ε, where
    B_ε[μ](x) = Σⱼ wⱼK_ε(x, xⱼ)(xⱼ − x)/Σⱼ wⱼK_ε(x, xⱼ) = ε∇log(K_ε*μ)(x), K_ε = e^{−|x−y|²/(2ε)}
    (MATH.md §9; the self term j = i is included), through :func:`measureflow.reductions.softmax_average`.
``"svgd"``
    Stein variational gradient descent with the kernel K_ε (bandwidth² = ε), through
    :func:`measureflow.reductions.kernel_sum`:
    v(x) = Σₖ wₖ [K_ε(xₖ, x)∇log β(xₖ) + ∇_{xₖ}K_ε(xₖ, x)]. It descends KL in the Stein geometry, not
    the Wasserstein one (so dF/dt = −∫|v|²dμ does not hold), and has no Gaussian closure.
``"smoothed"`` (default for targets without a score: samples, mixtures with Diracs)
    the target's score is replaced as well: v(x) = ∇log(K_ε*β)(x) − ∇log(K_ε*μ)(x)
    = (B_ε[β] − B_ε[μ])(x)/ε, the drifting field divided by ε (MATH.md §3(c), §14.12). An
    analytic β is smoothed in closed form (K_ε*N(m, Σ) ∝ N(m, Σ + εI)); samples go through the reduction.

Gaussian closure (Gaussian target or none; MATH.md §3, §9). With ε_μ = 0 (langevin) or ε (blob,
smoothed) and P̃ = P (langevin, blob), (Σ_β + εI)⁻¹ (smoothed) or 0 (no target):

    b = −P̃(m − m_β),   A = (Σ + ε_μI)⁻¹ − P̃,   Σ̇ = AΣ + ΣA.

Langevin is the exact KL flow, with solution (``solution``)
m(t) = m_β + e^{−tP}(m₀ − m_β), Σ(t) = Σ_β + e^{−tP}(Σ₀ − Σ_β)e^{−tP} (heat: m(t) = m₀, Σ(t) = Σ₀ + 2tI).
The blob closure is exact for the blob scheme and biased by O(ε) against KL (fixed point λ_β − ε for
commuting Σ_β), which needs ε < λ_min(Σ_β). The smoothed closure has the fixed point (m_β, Σ_β).

``energy``: on a Gaussian state the closed form
KL = ½[tr(PΣ) + (m − m_β)ᵀP(m − m_β) − d − log det(PΣ)] (no target: ∫μ log μ = −½ log det(2πeΣ)); on
particles the kernel-density *estimator* Σᵢ wᵢ[log(K_ε*μ)(xᵢ) + V(xᵢ)], K_ε*μ the normalised density
Σⱼ wⱼ N(·; xⱼ, εI) (biased by the smoothing; exact up to the normalising constant log Z of a
user potential, which shifts it by a constant). The smoothed mode descends no fixed functional
(MATH.md §9) and has no energy.

The field is autonomous: defined for every t.
"""

from __future__ import annotations

import math

import torch

import measureflow
from measureflow.cache import DeviceCache
from measureflow.errors import CapabilityError, ParameterError, ShapeError
from measureflow.fields import Field
from measureflow.linalg import matrix_function, spd_inverse, symmetrize
from measureflow.measures import Empirical, Gaussian, GaussianMixture
from measureflow.reductions import kernel_sum, softmax_average
from measureflow.mixtures import kl_divergence
from measureflow.state import GaussianMixtures, Gaussians, Particles
from measureflow.targets import check_points, gaussian_target, positive
from measureflow.validators import check_finite_tensor

__all__ = [
    "KLField", "MODES", "gaussian_kl", "kde_score", "kde_log_density",
]

#: The treatments of −∇log μ (see the module docstring).
MODES = ("langevin", "blob", "svgd", "smoothed")
_LOG_2PI = math.log(2 * math.pi)


def gaussian_kl(m: torch.Tensor, S: torch.Tensor, mb: torch.Tensor, P: torch.Tensor, logdet_b: torch.Tensor):
    """KL(N(m, Σ) | N(m_β, Σ_β)) = ½[tr(PΣ) + (m − m_β)ᵀP(m − m_β) − d − log det Σ + log det Σ_β], shape (R,)."""
    d = m.shape[-1]
    diff = m - mb
    L, _ = torch.linalg.cholesky_ex(S)
    logdet = 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    trace = torch.einsum("ij,rji->r", P, S)
    quad = torch.einsum("ri,ij,rj->r", diff, P, diff)
    return 0.5 * (trace + quad - d - logdet + logdet_b)


# -- targets -------------------------------------------------------------------------------------------------


class _NoTarget:
    """No potential: F = ∫ μ log μ, the heat equation."""

    kind = "none"
    dim = None
    has_potential = True

    def score(self, x):
        return torch.zeros_like(x)

    def potential(self, x):
        return torch.zeros_like(x[..., 0])

    def describe(self):
        return {"kind": "none"}


class _GaussianTarget:
    """N(m_β, Σ_β): score −P(x − m_β), V = −log N(x; m_β, Σ_β), smoothed precision (Σ_β + εI)⁻¹."""

    kind = "gaussian"
    has_potential = True

    def __init__(self, measure: Gaussian, epsilon: float | None):
        self.measure = measure
        self.dim = measure.dim
        self.epsilon = epsilon
        self._tensors = DeviceCache(self._build)

    def _build(self, like):
        dtype, device = like.dtype, like.device
        g = self.measure
        mean = g.mean_.to(torch.float64)
        cov = g.cov.to(torch.float64)
        eye = torch.eye(self.dim, dtype=torch.float64, device=cov.device)
        P = torch.cholesky_inverse(g.cholesky.to(torch.float64))
        out = {"mean": mean, "cov": cov, "P": symmetrize(P), "logdet": torch.logdet(cov)}
        if self.epsilon is not None:
            out["P_smoothed"] = symmetrize(torch.linalg.inv(cov + self.epsilon * eye))
        return {k: v.to(dtype=dtype, device=device) for k, v in out.items()}

    def tensors(self, like):
        return self._tensors(like)

    def score(self, x):
        t = self._tensors(x)
        return (t["mean"] - x) @ t["P"]

    def potential(self, x):
        t = self._tensors(x)
        diff = x - t["mean"]
        return 0.5 * ((diff @ t["P"]) * diff).sum(-1) + 0.5 * (t["logdet"] + self.dim * _LOG_2PI)

    def smoothed_score(self, x, epsilon):
        t = self._tensors(x)
        return (t["mean"] - x) @ t["P_smoothed"]

    def describe(self):
        return {"kind": "gaussian", "mean": self.measure.mean_.tolist(), "cov": self.measure.cov.tolist()}


class _MixtureTarget:
    """Σₖ wₖ N(mₖ, Σₖ): score and log-density from the measure; K_ε*β = Σₖ wₖ N(mₖ, Σₖ + εI)."""

    kind = "mixture"
    has_potential = True

    def __init__(self, measure: GaussianMixture, epsilon: float | None):
        self.measure = measure
        self.dim = measure.dim
        self.smooth = None
        if epsilon is not None:
            eye = torch.eye(self.dim, dtype=measure.dtype, device=measure.device)
            self.smooth = GaussianMixture(measure.weights, measure.means, measure.covs + epsilon * eye)
        self._plain = DeviceCache(self._build)

    def _build(self, like):
        dtype, device = like.dtype, like.device
        smooth = None if self.smooth is None else self.smooth.to(device=device, dtype=dtype)
        return {"law": self.measure.to(device=device, dtype=dtype), "smooth": smooth}

    def score(self, x):
        return self._plain(x)["law"].score(x)

    def potential(self, x):
        return -self._plain(x)["law"].log_density(x)

    def smoothed_score(self, x, epsilon):
        return self._plain(x)["smooth"].score(x)

    def describe(self):
        return {"kind": "mixture", "components": self.measure.components}


class _CallableTarget:
    """User callables: potential V(x) and/or score ∇log β(x) = −∇V(x)."""

    kind = "callable"
    dim = None

    def __init__(self, potential, score):
        for name, fn in (("potential", potential), ("score", score)):
            if fn is not None and not callable(fn):
                raise ParameterError(f"kl: {name} must be a callable of x (R, N, d); received {type(fn).__name__}")
        self._potential = potential
        self._score = score
        self.has_potential = potential is not None

    def score(self, x):
        if self._score is not None:
            out = self._score(x)
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ShapeError(f"kl: score(x) must return the shape of x {tuple(x.shape)}; returned {got}")
            return out
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.potential(xg).sum(), xg)
        return -grad

    def potential(self, x):
        out = self._potential(x)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape[:-1]:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ShapeError(f"kl: potential(x) must return one value per point, shape {tuple(x.shape[:-1])}; returned {got}")
        return out

    def describe(self):
        return {"kind": "callable", "potential": self._potential is not None, "score": self._score is not None}


class _SampleTarget:
    """β = Σⱼ qⱼ δ_{yⱼ}, shared (1, M, d) or one per replica (R, M, d); used smoothed only."""

    kind = "samples"
    has_potential = False

    def __init__(self, points: torch.Tensor, weights: torch.Tensor | None):
        self.points = points
        self.weights = weights
        self.dim = points.shape[-1]
        self._tensors = DeviceCache(self._build)

    def _build(self, like):
        dtype, device = like.dtype, like.device
        q = None if self.weights is None else self.weights.to(dtype=dtype, device=device)
        return {"y": self.points.to(dtype=dtype, device=device), "q": q}

    def smoothed_score(self, x, epsilon):
        t = self._tensors(x)
        return kde_score(x, t["y"], t["q"], epsilon)

    def describe(self):
        return {"kind": "samples", "size": self.points.shape[-2], "replicas": self.points.shape[0]}


def _sample_target(target) -> _SampleTarget | None:
    if isinstance(target, Empirical):
        return _SampleTarget(target.points[None], None if target.weights is None else target.weights[None])
    if isinstance(target, Particles):
        return _SampleTarget(target.x, target.weights)
    if isinstance(target, torch.Tensor):
        if not target.is_floating_point() or target.ndim not in (2, 3) or 0 in target.shape:
            raise ShapeError(
                f"kl: target samples must be a floating tensor of shape (M, d) or (R, M, d); received "
                f"{tuple(target.shape)} of dtype {target.dtype}"
            )
        check_finite_tensor(target, "target samples", "kl")
        return _SampleTarget(target if target.ndim == 3 else target[None], None)
    return None


def _make_target(target, potential, score, epsilon):
    if target is not None and (potential is not None or score is not None):
        raise ParameterError("kl: give the target either as target=<measure or samples> or as potential=/score= callables, not both")
    if potential is not None or score is not None:
        return _CallableTarget(potential, score)
    if target is None:
        return _NoTarget()
    gauss = gaussian_target(target)
    if gauss is not None:
        return _GaussianTarget(gauss, epsilon)
    if isinstance(target, GaussianMixture):
        if bool((target.covs == 0).all()):
            # all Diracs: the streamed reduction, not the K × N responsibilities of the mixture's score
            return _SampleTarget(target.means[None], target.weights[None])
        return _MixtureTarget(target, epsilon)
    samples = _sample_target(target)
    if samples is not None:
        return samples
    raise ParameterError(
        "kl: target must be a measureflow.measures Gaussian, GaussianMixture or Empirical, a Particles state, a "
        f"tensor of samples (M, d) / (R, M, d), or None (heat equation); received {type(target).__name__}. "
        "A target known by its potential or score goes in potential=/score="
    )


# -- the kernel-density pieces ---------------------------------------------------------------------------------


def kde_score(x: torch.Tensor, points: torch.Tensor, weights: torch.Tensor | None, epsilon: float) -> torch.Tensor:
    """∇log(K_ε*ν)(x) = B_ε[ν](x)/ε for ν = Σⱼ wⱼδ_{yⱼ} (MATH.md §9), streamed through softmax_average."""
    mean = softmax_average(x, points, weights=weights, scale=0.5 / epsilon)
    return (mean - x) / epsilon


def kde_log_density(x: torch.Tensor, points: torch.Tensor, weights: torch.Tensor | None, epsilon: float) -> torch.Tensor:
    """log Σⱼ wⱼ N(x; yⱼ, εI), shape (R, N'), from the reduction's log-sum-exp."""
    _, lse = softmax_average(x, points, weights=weights, scale=0.5 / epsilon, return_logsumexp=True)
    return lse - 0.5 * x.shape[-1] * (_LOG_2PI + math.log(epsilon))


# -- the field ---------------------------------------------------------------------------------------------------


_VALID_TARGETS = {
    "langevin": ("none", "gaussian", "mixture", "callable"),
    "blob": ("none", "gaussian", "mixture", "callable"),
    "svgd": ("gaussian", "mixture", "callable"),
    "smoothed": ("gaussian", "mixture", "samples"),
}
_WHY_NOT = {
    "samples": "a target known only by samples has no score; use mode='smoothed' (MATH.md §3(c))",
    "none": "without a target there is nothing for this mode to move toward; target=None (heat equation) "
    "runs with mode='langevin' or 'blob'",
    "callable": "a target given by callables cannot be smoothed in closed form; give it as a Gaussian, "
    "GaussianMixture or samples, or use mode='langevin', 'blob' or 'svgd'",
}


class KLField(Field):
    """Descent of KL(μ | β) (MATH.md §3); see the module docstring for the modes and formulas.

    Parameters
    ----------
    target:
        Gaussian, GaussianMixture (with a density, except in the smoothed mode), samples
        (Empirical, Particles, tensor (M, d) or (R, M, d); smoothed mode only), or None (heat equation).
    potential, score:
        callables of x (R, N, d) returning V(x) (R, N) and ∇log β(x) = −∇V(x) (R, N, d), instead of ``target``.
    mode:
        ``"langevin"``, ``"blob"``, ``"svgd"`` or ``"smoothed"``; None picks "smoothed" for targets without a
        score (samples, mixtures with Dirac components) and "langevin" otherwise.
    epsilon:
        variance of the kernel K_ε = e^{−|x−y|²/(2ε)}: the density smoothing of blob/smoothed, the SVGD
        kernel, and the particle energy estimator (required by blob, svgd, smoothed; optional for
        langevin, where only the particle energy uses it).
    """

    name = "kl"

    def __init__(self, target=None, *, potential=None, score=None, mode: str | None = None, epsilon=None):
        if epsilon is not None:
            epsilon = positive(epsilon, "epsilon", "kl")
        self._target = _make_target(target, potential, score, epsilon)
        kind = self._target.kind
        if mode is None:
            no_score = kind == "samples" or (kind == "mixture" and not self._target.measure.has_density)
            mode = "smoothed" if no_score else "langevin"
        if mode not in MODES:
            raise ParameterError(f"kl: mode must be one of {list(MODES)}; received {mode!r}")
        if kind == "mixture" and mode != "smoothed" and not self._target.measure.has_density:
            raise ParameterError(
                "kl: the target mixture has singular (Dirac) components, so it has no score; use mode='smoothed', "
                "or give every component a positive-definite covariance"
            )
        if kind not in _VALID_TARGETS[mode]:
            raise ParameterError(f"kl: mode={mode!r} does not accept this target: {_WHY_NOT[kind]}")
        if mode != "langevin" and epsilon is None:
            raise ParameterError(f"kl: mode={mode!r} needs the kernel variance epsilon > 0 (MATH.md §3, §9)")
        self.mode = mode
        self.epsilon = epsilon
        if mode == "blob" and kind == "gaussian":
            smallest = float(torch.linalg.eigvalsh(self._target.measure.cov.to(torch.float64))[0])
            if epsilon >= smallest:
                raise ParameterError(
                    f"kl: mode='blob' needs epsilon < λ_min(Σ_β) = {smallest:.6g} (its fixed point has eigenvalues "
                    f"λ_β − ε, MATH.md §3); received epsilon = {epsilon:g}"
                )
        caps = {"velocity"}
        if mode == "langevin":
            caps.add("diffusion")
        if kind in ("none", "gaussian") and mode != "svgd":
            caps.add("affine")
        if mode != "smoothed":
            caps.add("energy")
        self._capabilities = frozenset(caps)

    @property
    def dim(self) -> int | None:
        """The target's dimension (None for a target given by callables or no target)."""
        return self._target.dim

    # -- the protocol ----------------------------------------------------------------------------------------
    def velocity(self, t, x, state: Particles):
        """Drift −∇V (langevin), or the deterministic velocity of the blob/svgd/smoothed schemes; x (R, N', d)."""
        check_points(x, self.dim, "kl.velocity")
        if self.mode == "langevin":
            return self._target.score(x)
        if self.mode == "svgd":
            return self._svgd(x, state)
        target = self._target.score(x) if self.mode == "blob" else self._target.smoothed_score(x, self.epsilon)
        return target - kde_score(x, state.x, state.weights, self.epsilon)

    def _svgd(self, x, state):
        # Σₖ wₖK(xₖ, x)∇log β(xₖ) − Σₖ wₖ∇ₓK(x, xₖ): for the radial kernel ∇_{xₖ}K(xₖ, x) = −∇ₓK(x, xₖ).
        h = math.sqrt(self.epsilon)
        scores = self._target.score(state.x)
        drive = kernel_sum(x, state.x, values=scores, weights=state.weights, bandwidth=h)
        repulse = kernel_sum(x, state.x, weights=state.weights, bandwidth=h, gradient=True)
        return drive - repulse

    def diffusion(self, t):
        """σ = √2 of dX = −∇V dt + √2 dW (langevin mode only)."""
        if self.mode != "langevin":
            raise CapabilityError(f"field 'kl' in mode {self.mode!r} is deterministic; only mode='langevin' has a noise term")
        return math.sqrt(2.0)

    def _closure_terms(self, like: torch.Tensor):
        """(m_β, P̃, ε_μ) of the Gaussian closure (module docstring)."""
        d = like.shape[-1]
        eps_mu = 0.0 if self.mode == "langevin" else self.epsilon
        if self._target.kind == "none":
            zero = torch.zeros(d, dtype=like.dtype, device=like.device)
            return zero, torch.zeros(d, d, dtype=like.dtype, device=like.device), eps_mu
        t = self._target.tensors(like)
        return t["mean"], t["P_smoothed" if self.mode == "smoothed" else "P"], eps_mu

    def _check_state_dim(self, state, where):
        if self.dim is not None and state.dim != self.dim:
            raise ShapeError(f"kl.{where}: the target has d = {self.dim} but the state has d = {state.dim}")

    def affine(self, t, state: Gaussians):
        """b = −P̃(m − m_β), A = (Σ + ε_μI)⁻¹ − P̃ (the law's velocity; MATH.md §3, §9)."""
        if "affine" not in self._capabilities:
            raise CapabilityError(
                f"field 'kl' (mode {self.mode!r}, {self._target.kind} target) has no Gaussian closure: it exists for a "
                "Gaussian target or none, in modes 'langevin', 'blob' and 'smoothed'; run it on Particles"
            )
        self._check_state_dim(state, "affine")
        m, S = state.mean, state.cov
        mb, P, eps_mu = self._closure_terms(m)
        if eps_mu:
            S = S + eps_mu * torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
        return (mb - m) @ P, spd_inverse(S) - P

    def energy(self, state) -> torch.Tensor:
        """KL(μ | β) per replica: closed form on Gaussians, kernel-density estimator on particles."""
        if "energy" not in self._capabilities:
            raise CapabilityError(
                "field 'kl' in mode 'smoothed' descends no fixed functional (MATH.md §9); monitor a distance to the "
                "target instead (observables 'mmd', 'sinkhorn', 'w2')"
            )
        self._check_state_dim(state, "energy")
        if isinstance(state, Gaussians):
            return self._gaussian_energy(state)
        if isinstance(state, GaussianMixtures):
            return kl_divergence(self, state)
        if self.epsilon is None:
            raise CapabilityError(
                "field 'kl': the KL of particles is estimated with the kernel density K_ε*μ; build the field with "
                "epsilon=<kernel variance> to get it"
            )
        if not self._target.has_potential:
            raise CapabilityError("field 'kl': a target given by its score alone has no potential V, so KL cannot be estimated; pass potential=")
        logk = kde_log_density(state.x, state.x, state.weights, self.epsilon)
        w = state.weights_or_uniform()
        return (w * (logk + self._target.potential(state.x))).sum(-1)

    def _gaussian_energy(self, state: Gaussians) -> torch.Tensor:
        m, S = state.mean, state.cov
        if self._target.kind == "none":
            L, _ = torch.linalg.cholesky_ex(S)
            logdet = 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
            return -0.5 * (logdet + state.dim * (1.0 + _LOG_2PI))
        if self._target.kind != "gaussian":
            raise CapabilityError(
                f"field 'kl': KL of a Gaussian state against a {self._target.kind} target has no closed form; "
                "sample the state into Particles and use the estimator"
            )
        t = self._target.tensors(m)
        return gaussian_kl(m, S, t["mean"], t["P"], t["logdet"])

    def solution(self, t, initial: Gaussians, t0: float = 0.0) -> Gaussians:
        """The exact law at t from N(m₀, Σ₀) at t0 (langevin mode, Gaussian target or none; MATH.md §3)."""
        if self.mode != "langevin" or self._target.kind not in ("none", "gaussian"):
            raise CapabilityError(
                f"field 'kl': a closed-form solution exists for mode='langevin' with a Gaussian target or none; this is "
                f"mode {self.mode!r} with a {self._target.kind} target — integrate its closure with Simulation instead"
            )
        self._check_state_dim(initial, "solution")
        h = float(t) - float(t0)
        m0, S0 = initial.mean, initial.cov
        if self._target.kind == "none":
            eye = torch.eye(initial.dim, dtype=S0.dtype, device=S0.device)
            return Gaussians(m0.clone(), S0 + 2.0 * h * eye)
        tt = self._target.tensors(m0)
        E = matrix_function(tt["P"], lambda lam: torch.exp(-h * lam))
        mean = tt["mean"] + (m0 - tt["mean"]) @ E
        cov = tt["cov"] + E @ (S0 - tt["cov"]) @ E
        return Gaussians(mean, symmetrize(cov))

    # -- Fisher–Rao and WFR geometries (MATH.md §15.6) ------------------------------------------------------
    @property
    def first_variation_available(self) -> bool:
        """δF = log μ + V exists for the KL flows proper (modes 'langevin' and 'blob') with a potential."""
        return self.mode in ("langevin", "blob") and self._target.has_potential

    @property
    def closure_is_gradient(self) -> bool:
        """The closure (b, A) is (−∇δF(m), −∇²δF) of a δF quadratic at Gaussians (MATH.md §15.6)."""
        return self.mode in ("langevin", "blob") and self._target.kind in ("none", "gaussian")

    def first_variation(self, t, x, state: Particles) -> torch.Tensor:
        """δF(x) = log μ̂(x) + V(x), μ̂ = K_ε*μ the kernel density estimate (birth–death; MATH.md §15.6), (R, N')."""
        if not self.first_variation_available:
            raise CapabilityError(
                f"field 'kl' in mode {self.mode!r} with a {self._target.kind} target has no first variation log μ + V; "
                "use mode='langevin' or 'blob' with a target that has a potential"
            )
        if self.epsilon is None:
            raise CapabilityError(
                "field 'kl': on particles δF = log μ + V needs a kernel density estimate of μ; build the field with "
                "epsilon=<kernel variance>"
            )
        check_points(x, self.dim, "kl.first_variation")
        w = state.weights_or_uniform()
        # The estimate of the normalised measure: an unnormalised weight vector would shift δF by a constant.
        w = w / w.sum(-1, keepdim=True)
        return kde_log_density(x, state.x, w, self.epsilon) + self._target.potential(x)

    def fisher_rao_solution(self, t, initial: Gaussians, rate: float, t0: float = 0.0) -> Gaussians:
        """The pure Fisher–Rao KL flow toward N(m_β, Σ_β) in closed form (MATH.md §15.6), Λ = Σ⁻¹:
        Λ_t = e^{−αh}Λ₀ + (1 − e^{−αh})P, (Λm)_t = e^{−αh}Λ₀m₀ + (1 − e^{−αh})Pm_β, h = t − t0."""
        if self.mode != "langevin" or self._target.kind not in ("none", "gaussian"):
            raise CapabilityError(
                "field 'kl': the Fisher–Rao flow has a closed form for mode='langevin' with a Gaussian target or none; "
                f"this is mode {self.mode!r} with a {self._target.kind} target"
            )
        self._check_state_dim(initial, "fisher_rao_solution")
        m0, S0 = initial.mean, initial.cov
        mb, P, _ = self._closure_terms(m0)
        decay = math.exp(-float(rate) * (float(t) - float(t0)))
        L0 = spd_inverse(S0)
        Lt = symmetrize(decay * L0 + (1.0 - decay) * P)
        eta = decay * torch.einsum("rij,rj->ri", L0, m0) + (1.0 - decay) * (P @ mb)
        cov = spd_inverse(Lt)
        return Gaussians(torch.einsum("rij,rj->ri", cov, eta), symmetrize(cov))

    # -- Gaussian-mixture states (MATH.md §15.7) ---------------------------------------------------------------
    @property
    def mixture_available(self) -> bool:
        """A mixture state needs the target's log-density and score."""
        return self._target.has_potential and self._target.kind != "none"

    def target_log_density(self, x: torch.Tensor) -> torch.Tensor:
        """log β(x) = −V(x) (up to the constant log Z of a user potential), shape x.shape[:-1]."""
        return -self._target.potential(x)

    def target_score(self, x: torch.Tensor) -> torch.Tensor:
        """∇log β(x), shape of x."""
        return self._target.score(x)

    def describe(self):
        return {"name": self.name, "mode": self.mode, "epsilon": self.epsilon, "target": self._target.describe()}


@measureflow.hookimpl
def measureflow_register_fields(registry):
    registry.add_field("kl", KLField)
