"""The OU / diffusion-bridge probability flow in OU time τ (MATH.md §2, §1.2, §1.3).

Forward (noising) SDE, data X₀ at τ = 0, stationary law N(0, σ²I):

    dX = −X dτ + √2 σ dW,      X_τ = a_τ X₀ + s_τ Z,   a_τ = e^{−τ},   s_τ² = (1 − e^{−2τ}) σ².

For data Σⱼ wⱼ N(cⱼ, Pⱼ) (Diracs: Pⱼ = 0; an empirical measure is a mixture of Diracs) the law is

    ρ_τ = Σⱼ wⱼ N(a_τ cⱼ, Sⱼ(τ)),     Sⱼ(τ) = a_τ² Pⱼ + s_τ² I,

with posterior mean (denoiser) x̂_τ(x) = E[X₀ | X_τ = x] = Σⱼ rⱼ(x)[cⱼ + a_τ Pⱼ Sⱼ⁻¹(x − a_τcⱼ)],
rⱼ ∝ wⱼ N(x; a_τcⱼ, Sⱼ), score ∇log ρ_τ(x) = Σⱼ rⱼ Sⱼ⁻¹(a_τcⱼ − x) (= (a_τ x̂ − x)/s_τ² for Diracs).

Registered fields
-----------------
``ou_bridge`` (:class:`OUBridge`) — the probability-flow ODE:

* ``direction="forward"``: field time t = τ ∈ [τ_min, τ_max], v_τ(x) = −x − σ²∇log ρ_τ(x);
* ``direction="reverse"``: the sampler's own time s = τ_max − τ ∈ [0, τ_max − τ_min], run forward,
  dx/ds = x + σ²∇log ρ_{τ_max−s}(x) (MATH.md §14.15). Start it from N(0, σ²I) (:meth:`OUBridge.prior`).

``ou_bridge_sde`` (:class:`OUBridgeSDE`) — the same dynamics as an SDE with ``diffusion(t)`` = √2σ, for
the ``euler_maruyama`` integrator:

* ``direction="reverse"`` (default): the stochastic sampler [V eq. 3],
  dX = [X + 2σ²∇log ρ_{τ_max−s}(X)] ds + √2σ dW;
* ``direction="forward"``: the noising SDE itself, dX = −X dτ + √2σ dW.

A separate name (rather than a flag) because a field's capabilities are fixed by its class: the
simulation picks Euler–Maruyama for, and refuses backward integration of, exactly the fields that
have a diffusion term.

Gaussian closure (data with one component, i.e. Gaussian data or a single Dirac): with
m_τ = a_τc, Σ_τ = a_τ²P + s_τ²I, the forward field is affine, v(x) = b + A(x − m) with
A = −I + σ²Σ_τ⁻¹ and b = v(m) = −m + σ²Σ_τ⁻¹(m − m_τ) (= −m on the exact law m = m_τ); reverse: (−b, −A)
at τ = τ_max − s. For the SDE the closure is the velocity of its *law* (drift − σ²∇log N(m, S)), so
the Gaussian state follows the SDE's law exactly. :meth:`OUBridge.solution` gives exact Gaussians.

Mixtures whose components are all Diracs go through :func:`measureflow.reductions.softmax_average`
(softmax of −|x − a_τcⱼ|²/(2s_τ²) + log wⱼ averaging cⱼ gives x̂), so memory stays bounded for any
number of atoms; mixtures with covariances use a log-sum-exp over their K components (K small).

Time range: atomic data make the field blow up like τ^{−1/2} (and its Lipschitz constant like
1/τ) as τ → 0 (MATH.md §1.3), so every field stops at τ_min > 0 and refuses times outside
[τ_min, τ_max] with a :class:`~measureflow.errors.TimeRangeError` naming the safe range. Near τ_min
use a geometric grid (:meth:`OUBridge.time_grid`; RK4 with Δτ/τ ≲ 0.02 is stable).
"""

from __future__ import annotations

import math

import torch

import measureflow
from measureflow.cache import DeviceCache
from measureflow.errors import CapabilityError, ParameterError, ShapeError, TimeRangeError
from measureflow.fields import Field
from measureflow.measures import Empirical, Gaussian, GaussianMixture
from measureflow.reductions import softmax_average
from measureflow.state import Gaussians, Particles
from measureflow.validators import check_int, check_nonnegative, check_positive

__all__ = ["OUBridge", "OUBridgeSDE", "cosine_time_grid", "geometric_time_grid", "gaussian_kl_to_stationary"]

DIRECTIONS = ("forward", "reverse")

# Elements of the (K, block, d) temporaries of the component path; bounds its memory like the
# reductions' own budget does.
_DENSE_BLOCK_ELEMENTS = 1 << 22


# -- time grids ------------------------------------------------------------------------------------------


def cosine_time_grid(T: int, s: float = 0.008) -> torch.Tensor:
    """OU times of the discrete cosine schedule (Nichol–Dhariwal; [V eq. 6] corrected, MATH.md §2, §14.4).

        τ_k = −½ log(f(k)/f(0)),   f(k) = cos²(((k/T + s)/(1 + s)) π/2),   k = 0 … T,

    so τ_0 = 0 and τ_T = +∞ (f(T) = 0: pure noise; clip at a finite τ_max before sampling). With s = 0
    this is exactly τ = −log cos(πt/2) at t = k/T, the cosine schedule of MATH.md §1.3 in OU time.
    Returns a float64 tensor of shape (T + 1,), increasing.
    """
    T = check_int(T, "T", "cosine_time_grid", advice="T is the number of steps: pass a whole number ≥ 1.")
    s = check_nonnegative(s, "the offset s", "cosine_time_grid")
    k = torch.arange(T + 1, dtype=torch.float64)
    cos = torch.cos((k / T + s) / (1 + s) * (math.pi / 2))
    tau = -torch.log(cos / math.cos(s / (1 + s) * math.pi / 2))
    # cos(π/2) rounds to 6e−17, not 0; the last point is pure noise by construction.
    tau[-1] = math.inf
    return tau


def geometric_time_grid(tau_min: float, tau_max: float, steps: int) -> torch.Tensor:
    """τ_k = τ_min (τ_max/τ_min)^{k/steps}, k = 0 … steps (float64, increasing).

    Constant Δτ/τ, the grid the singular end τ → 0 of atomic data needs (MATH.md §1.3).
    """
    tau_min, tau_max = float(tau_min), float(tau_max)
    if not (0 < tau_min < tau_max < math.inf):
        raise ParameterError(
            f"geometric_time_grid needs 0 < tau_min < tau_max < inf; received tau_min = {tau_min!r}, tau_max = {tau_max!r}"
        )
    steps = check_int(steps, "steps", "geometric_time_grid")
    k = torch.arange(steps + 1, dtype=torch.float64)
    grid = tau_min * torch.exp(k / steps * math.log(tau_max / tau_min))
    grid[0], grid[-1] = tau_min, tau_max
    return grid


def gaussian_kl_to_stationary(mean: torch.Tensor, cov: torch.Tensor, sigma: float) -> torch.Tensor:
    """KL(N(m, Σ) | N(0, σ²I)) = ½[tr Σ/σ² + |m|²/σ² − d − log det Σ + d log σ²] (MATH.md §3), batched."""
    d = mean.shape[-1]
    s2 = float(sigma) ** 2
    trace = torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1)
    return 0.5 * (trace / s2 + (mean * mean).sum(-1) / s2 - d - torch.logdet(cov) + d * math.log(s2))


# -- data ------------------------------------------------------------------------------------------------


def _mixture_of(data) -> tuple[GaussianMixture, str]:
    if isinstance(data, Gaussian):
        return data.as_mixture(), "gaussian"
    if isinstance(data, Empirical):
        return data.as_mixture(), "empirical"
    if isinstance(data, GaussianMixture):
        return data, "mixture"
    raise ParameterError(
        f"ou_bridge: data must be a measureflow.measures Gaussian, GaussianMixture or Empirical; received "
        f"{type(data).__name__}. Build one, e.g. GaussianMixture.diracs(points, weights) for atoms."
    )


class OUBridge(Field):
    """Probability flow of the OU bridge (module docstring; MATH.md §2).

    Parameters
    ----------
    data:
        the law at τ = 0: :class:`~measureflow.measures.Gaussian`, :class:`~measureflow.measures.GaussianMixture`
        (components may be Diracs) or :class:`~measureflow.measures.Empirical`.
    sigma:
        stationary standard deviation σ (the noise is N(0, σ²I)).
    tau_min, tau_max:
        the field is defined for τ ∈ [τ_min, τ_max], 0 < τ_min < τ_max; τ_max may be ``math.inf``
        in the forward direction only.
    direction:
        ``"forward"`` (t = τ) or ``"reverse"`` (t = s = τ_max − τ, the sampler's time).
    """

    name = "ou_bridge"
    stochastic = False

    def __init__(self, data, sigma: float = 1.0, tau_min: float = 1e-3, tau_max: float = 12.0,
                 direction: str = "forward"):
        mixture, kind = _mixture_of(data)
        self.data = data
        self.sigma = check_positive(sigma, "sigma", "ou_bridge")
        self.tau_min = check_positive(tau_min, "tau_min", "ou_bridge")
        try:
            if isinstance(tau_max, bool):
                raise TypeError("a bool is not a time")
            self.tau_max = float(tau_max)
        except (TypeError, ValueError):
            raise ParameterError(f"ou_bridge: tau_max must be a number; received {tau_max!r}") from None
        if not self.tau_max > self.tau_min:
            raise ParameterError(
                f"ou_bridge: need tau_max > tau_min; received tau_min = {self.tau_min:g}, tau_max = {self.tau_max:g}"
            )
        if direction not in DIRECTIONS:
            raise ParameterError(f"ou_bridge: direction must be one of {DIRECTIONS}; received {direction!r}")
        self.direction = direction
        if direction == "reverse" and not math.isfinite(self.tau_max):
            raise ParameterError(
                "ou_bridge: the reverse sampler starts at a finite tau_max (e.g. 12, where ρ_τ is within "
                "e^{−τ} of N(0, σ²I)); received tau_max = inf"
            )
        self._mixture = mixture
        self._kind = kind
        self._weights = mixture.weights
        self._means = mixture.means
        self._covs = mixture.covs
        self._atomic = bool((mixture.covs == 0).all())
        self._data_like = DeviceCache(self._build_data_like)
        span = self.tau_max - self.tau_min
        self.time_range = (self.tau_min, self.tau_max) if direction == "forward" else (0.0, span)
        caps = {"velocity"}
        if self.components == 1:
            caps.add("affine")
        self._capabilities = frozenset(caps)

    # -- data and time -------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._means.shape[1]

    @property
    def components(self) -> int:
        """Number K of mixture components (atoms) of the data."""
        return self._means.shape[0]

    @property
    def atomic(self) -> bool:
        """True when every component is a Dirac (the reduction path)."""
        return self._atomic

    def tau(self, t: float) -> float:
        """OU time τ at field time t (forward: τ = t; reverse: τ = τ_max − t)."""
        return float(t) if self.direction == "forward" else self.tau_max - float(t)

    def field_time(self, tau: float) -> float:
        """Field time t at OU time τ (inverse of :meth:`tau`)."""
        return float(tau) if self.direction == "forward" else self.tau_max - float(tau)

    def time_grid(self, steps: int, spacing: str = "geometric") -> torch.Tensor:
        """Field times t₀ < … < t_steps spanning :attr:`time_range`, geometric or uniform in τ (float64).

        Forward: τ from τ_min to τ_max; reverse: s = τ_max − τ with τ from τ_max down to τ_min.
        Step with ``integrator.advance(field, state, t[k], t[k + 1], generator)``.
        """
        if spacing == "geometric":
            tau = geometric_time_grid(self.tau_min, self.tau_max, steps)
        elif spacing == "uniform":
            if not math.isfinite(self.tau_max):
                raise ParameterError("ou_bridge.time_grid: a uniform grid needs a finite tau_max")
            tau = torch.linspace(self.tau_min, self.tau_max, int(steps) + 1, dtype=torch.float64)
        else:
            raise ParameterError(f"ou_bridge.time_grid: spacing must be 'geometric' or 'uniform'; received {spacing!r}")
        if self.direction == "forward":
            return tau
        s = self.tau_max - tau.flip(0)
        s[0], s[-1] = 0.0, self.time_range[1]
        return s

    def check_time(self, t: float) -> None:
        self._tau_checked(t)

    def _tau_checked(self, t) -> float:
        """τ at field time t, refused outside [τ_min, τ_max] (a few ulps of slack for stage times)."""
        tau = self.tau(t)
        lo, hi = self.tau_min, self.tau_max
        slack = 1e-12 * max(1.0, abs(self.tau_max) if math.isfinite(self.tau_max) else abs(tau))
        if lo - slack <= tau <= hi + slack:
            return min(max(tau, lo), hi)
        t_lo, t_hi = self.time_range
        raise TimeRangeError(
            f"field {self.name!r} ({self.direction}) is defined for OU time τ in [{lo:g}, {hi:g}], i.e. field "
            f"time t in [{t_lo:g}, {t_hi:g}]; received t = {float(t):g} (τ = {tau:g}). "
            + ("Below τ_min the score of atomic data blows up like τ^(−1/2) (MATH.md §1.3): stop at "
               "τ_min, or build the field with a smaller tau_min > 0." if tau < lo else
               "Choose times inside the range, or build the field with a larger tau_max.")
        )

    def coefficients(self, tau: float) -> tuple[float, float]:
        """(a_τ, s_τ²) = (e^{−τ}, (1 − e^{−2τ})σ²) as Python floats."""
        return math.exp(-tau), -math.expm1(-2.0 * tau) * self.sigma**2

    def _build_data_like(self, like: torch.Tensor):
        """(w, log w, means, covs) of the data mixture in ``like``'s dtype and device."""
        w = self._weights.to(device=like.device, dtype=like.dtype)
        return (w, torch.log(w), self._means.to(device=like.device, dtype=like.dtype),
                self._covs.to(device=like.device, dtype=like.dtype))

    def _check_points(self, x: torch.Tensor, where: str) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ShapeError(f"field {self.name!r}.{where}: x must have shape (..., d) with d = {self.dim} (the data's); received {got}")

    # -- the exact posterior mean and score -------------------------------------------------------------
    def denoise(self, tau: float, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂_τ(x), ∇log ρ_τ(x)) for x of shape (..., d) at OU time τ > 0 (MATH.md §1.2)."""
        self._check_points(x, "denoise")
        tau = float(tau)
        if not tau > 0:
            raise TimeRangeError(f"field {self.name!r}: the score needs τ > 0 (ρ₀ is the data law); received τ = {tau:g}")
        a, s2 = self.coefficients(tau)
        flat = x.reshape(-1, self.dim)
        if self._atomic and not (torch.is_grad_enabled() and flat.requires_grad):
            xhat, score = self._atoms(a, s2, flat)
        else:
            # Components with covariance, or a differentiable evaluation (the streaming reduction
            # records no autograd history): log-sum-exp over the K components.
            xhat, score = self._components(a, s2, flat)
        return xhat.reshape(x.shape), score.reshape(x.shape)

    def posterior_mean(self, tau: float, x: torch.Tensor) -> torch.Tensor:
        """x̂_τ(x) = E[X₀ | X_τ = x] (the final "denoise" jump of MATH.md §1.3)."""
        return self.denoise(tau, x)[0]

    def score(self, tau: float, x: torch.Tensor) -> torch.Tensor:
        """∇log ρ_τ(x) at OU time τ, shape of x."""
        return self.denoise(tau, x)[1]

    def _atoms(self, a: float, s2: float, flat: torch.Tensor):
        _, logw, c, _ = self._data_like(flat)
        # softmaxⱼ(−|x − a cⱼ|²/(2s²) + log wⱼ) averaging cⱼ: the posterior mean of the atoms.
        xhat = softmax_average(flat, a * c, c, log_weights=logw, scale=0.5 / s2)
        return xhat, (a * xhat - flat) / s2

    def _components(self, a: float, s2: float, flat: torch.Tensor):
        w, logw, c, P = self._data_like(flat)
        K, d = c.shape
        eye = torch.eye(d, dtype=flat.dtype, device=flat.device)
        S = (a * a) * P + s2 * eye
        L = torch.linalg.cholesky_ex(S).L  # (K, d, d); SPD since s² > 0, so unchecked (the check syncs on CUDA)
        half_logdet = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)  # (K,)
        precision = torch.cholesky_inverse(L)  # Sⱼ⁻¹, symmetric
        gain = a * (P @ precision)  # a Pⱼ Sⱼ⁻¹
        centres = a * c
        rows = max(1, _DENSE_BLOCK_ELEMENTS // max(1, K * d))
        xhats, scores = [], []
        for i in range(0, flat.shape[0], rows):
            diff = flat[None, i:i + rows, :] - centres[:, None, :]  # (K, n, d)
            u = diff @ precision  # rows Sⱼ⁻¹(x − a cⱼ)
            logr = logw[:, None] - 0.5 * (diff * u).sum(-1) - half_logdet[:, None]  # (K, n)
            r = torch.softmax(logr, dim=0)
            scores.append(-torch.einsum("kn,knd->nd", r, u))
            # cⱼ + a Pⱼ Sⱼ⁻¹(x − a cⱼ), averaged with the responsibilities
            xhats.append(r.T @ c + torch.einsum("kn,knd->nd", r, diff @ gain.transpose(-1, -2)))
        if len(xhats) == 1:
            return xhats[0], scores[0]
        return torch.cat(xhats), torch.cat(scores)

    def marginal_score(self, t, x: torch.Tensor) -> torch.Tensor:
        """∇log ρ at the field's own time t (τ = t forward, τ = τ_max − t reverse): the score a
        stochastic sampler of this flow needs (``flow_sde``, MATH.md §15.2)."""
        return self.score(self._tau_checked(t), x)

    def _laplacian(self, a: float, s2: float, flat: torch.Tensor) -> torch.Tensor:
        """Δ log ρ_τ(x) = Σⱼ rⱼ(|uⱼ|² − tr Sⱼ⁻¹) − |Σⱼ rⱼuⱼ|², uⱼ = Sⱼ⁻¹(x − a cⱼ) (the score is −Σⱼ rⱼuⱼ;
        differentiate it once more), blocked over points like :meth:`_components`."""
        w, logw, c, P = self._data_like(flat)
        K, d = c.shape
        eye = torch.eye(d, dtype=flat.dtype, device=flat.device)
        L = torch.linalg.cholesky_ex((a * a) * P + s2 * eye).L
        half_logdet = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        precision = torch.cholesky_inverse(L)
        trace = torch.diagonal(precision, dim1=-2, dim2=-1).sum(-1)  # (K,)
        rows = max(1, _DENSE_BLOCK_ELEMENTS // max(1, K * d))
        out = []
        for i in range(0, flat.shape[0], rows):
            diff = flat[None, i:i + rows, :] - (a * c)[:, None, :]
            u = diff @ precision
            r = torch.softmax(logw[:, None] - 0.5 * (diff * u).sum(-1) - half_logdet[:, None], dim=0)  # (K, n)
            mean_u = torch.einsum("kn,knd->nd", r, u)
            out.append((r * ((u * u).sum(-1) - trace[:, None])).sum(0) - (mean_u * mean_u).sum(-1))
        return torch.cat(out)

    def divergence(self, t, x, state=None):
        """∇·v in closed form (MATH.md §15.1): forward −(d + σ²Δlog ρ_τ), reverse d + σ²Δlog ρ_{τ_max−s}."""
        tau = self._tau_checked(t)
        self._check_points(x, "divergence")
        a, s2 = self.coefficients(tau)
        lap = self._laplacian(a, s2, x.reshape(-1, self.dim)).reshape(x.shape[:-1])
        div = self.dim + self.sigma**2 * lap
        return -div if self.direction == "forward" else div

    # -- the field protocol ------------------------------------------------------------------------
    def velocity(self, t, x, state=None):
        """Forward: −x − σ²∇log ρ_τ(x); reverse: x + σ²∇log ρ_{τ_max−s}(x)."""
        tau = self._tau_checked(t)
        score = self.score(tau, x)
        v = x + self.sigma**2 * score
        return -v if self.direction == "forward" else v

    def _gaussian_data(self, tau: float, like: torch.Tensor):
        """(m_τ, Σ_τ) of one-component data, on like's device and dtype."""
        if self.components != 1:
            raise CapabilityError(
                f"field {self.name!r}: the Gaussian closure needs Gaussian data (one component); the data have "
                f"K = {self.components} components, so ρ_τ is not Gaussian. Run Particles instead."
            )
        _, _, c, P = self._data_like(like)
        a, s2 = self.coefficients(tau)
        eye = torch.eye(self.dim, dtype=like.dtype, device=like.device)
        return a * c[0], (a * a) * P[0] + s2 * eye

    def affine(self, t, state):
        """(b, A) of v at N(m, ·): forward A = −I + σ²Σ_τ⁻¹, b = −m + σ²Σ_τ⁻¹(m − m_τ); reverse (−b, −A)."""
        tau = self._tau_checked(t)
        m = state.mean
        m_tau, S_tau = self._gaussian_data(tau, m)
        P = self.sigma**2 * torch.linalg.inv(S_tau)
        eye = torch.eye(self.dim, dtype=m.dtype, device=m.device)
        A = (P - eye).expand(m.shape[0], -1, -1)
        b = -m + (m - m_tau) @ P  # P symmetric
        if self.direction == "forward":
            return b, A
        return -b, -A

    # -- exact laws and monitors -------------------------------------------------------------------
    def marginal(self, tau: float):
        """The exact law ρ_τ: a :class:`Gaussian` for one-component data, else a :class:`GaussianMixture`."""
        tau = float(tau)
        if not tau > 0:
            raise TimeRangeError(f"field {self.name!r}.marginal: need τ > 0 (ρ₀ is the data); received τ = {tau:g}")
        a, s2 = self.coefficients(tau)
        c, P = self._means, self._covs
        eye = torch.eye(self.dim, dtype=c.dtype, device=c.device)
        covs = (a * a) * P + s2 * eye
        if self.components == 1:
            return Gaussian(a * c[0], covs[0])
        return GaussianMixture(self._weights, a * c, covs)

    def prior(self, dtype=None, device=None) -> Gaussian:
        """N(0, σ²I), the law the reverse samplers start from (MATH.md §1.3 (iii) bounds the bias)."""
        dtype = dtype or self._means.dtype
        device = device or self._means.device
        d = self.dim
        return Gaussian(torch.zeros(d, dtype=dtype, device=device), self.sigma**2 * torch.eye(d, dtype=dtype, device=device))

    def solution(self, t: float, initial: Gaussians | None = None, t0: float | None = None) -> Gaussians:
        """The Gaussian state at field time t (one-component data).

        ``initial=None``: the exact law ρ_τ, τ = τ(t), as a one-replica :class:`Gaussians`.
        Otherwise the flow of ``initial`` (given at field time ``t0``) under this affine field: every
        Σ_τ is a function of the data covariance P, so the closures A(τ) commute and the flow map from
        τ₀ to τ is Φ = Σ_τ^{1/2}Σ_{τ₀}^{−1/2}; hence m = m_τ + Φ(m₀ − m_{τ₀}), Σ = ΦΣ₀Φᵀ.
        """
        tau = self._tau_checked(t)
        if initial is None:
            if self.components != 1:
                self._gaussian_data(tau, self._means)  # raises the capability error
            law = self.marginal(tau)
            return Gaussians(law.mean_[None].clone(), law.cov[None].clone())
        if t0 is None:
            raise ParameterError(f"field {self.name!r}.solution: give t0, the field time of `initial`")
        tau0 = self._tau_checked(t0)
        m0, S0 = initial.mean, initial.cov
        m_t, S_t = self._gaussian_data(tau, m0)
        m_s, S_s = self._gaussian_data(tau0, m0)
        Phi = _sym_power(S_t, 0.5) @ _sym_power(S_s, -0.5)
        mean = m_t + (m0 - m_s) @ Phi.T
        cov = Phi @ S0 @ Phi.T
        return Gaussians(mean, 0.5 * (cov + cov.transpose(-1, -2)))

    def kl_to_stationary(self, state, **_) -> torch.Tensor:
        """KL(N(m, Σ) | N(0, σ²I)) per replica, shape (R,) (MATH.md §2 monitor, §3 formula).

        Exact for a Gaussian state; for particles the Gaussian fit of their weighted moments (a proxy,
        and a lower bound on nothing in general). Extra keywords are ignored so that the method can be
        handed to a :class:`~measureflow.simulation.Observer` as it is.
        """
        if isinstance(state, Gaussians):
            mean, cov = state.mean, state.cov
        elif isinstance(state, Particles):
            mean, cov = state.mean(), state.covariance()
        else:
            raise ParameterError(f"kl_to_stationary: expected Gaussians or Particles; received {type(state).__name__}")
        return gaussian_kl_to_stationary(mean, cov, self.sigma)

    def describe(self) -> dict:
        data = {"kind": self._kind, "components": self.components, "dim": self.dim, "atomic": self._atomic}
        if self.components <= 16:
            data.update(weights=self._weights.tolist(), means=self._means.tolist())
            if not self._atomic:
                data["covs"] = self._covs.tolist()
        return {
            "name": self.name,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "sigma": self.sigma,
            "tau_min": self.tau_min,
            "tau_max": self.tau_max,
            "direction": self.direction,
            "data": data,
        }

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(direction={self.direction!r}, sigma={self.sigma:g}, tau=[{self.tau_min:g}, "
                f"{self.tau_max:g}], data={self._kind} K={self.components} d={self.dim})")


class OUBridgeSDE(OUBridge):
    """The OU bridge as an SDE with diffusion √2σ (module docstring), for the SDE solvers.

    It is the special case g = √2σ of the marginal-preserving SDE of any flow (MATH.md §15.2):
    ``measureflow.field("flow_sde", flow=ou_bridge(...), noise=√2σ, direction="reverse")`` gives the
    same drift and noise (tests/test_flow_sde.py checks them equal to 1e-12 on the same noise); this
    class adds the exact Gaussian laws of :meth:`solution`.

    * reverse (default): drift x + 2σ²∇log ρ_{τ_max−s}(x) [V eq. 3];
    * forward: drift −x (the noising SDE; the data only set the time range and the closed forms).

    ``affine`` is the velocity of the law N(m, S) of the state, drift − σ²∇log N(m, S), i.e. with
    F the drift's Jacobian: A = F + σ²S⁻¹, b = drift(m), so that Σ̇ = FS + SFᵀ + 2σ²I exactly.
    """

    name = "ou_bridge_sde"
    stochastic = True

    def __init__(self, data, sigma: float = 1.0, tau_min: float = 1e-3, tau_max: float = 12.0,
                 direction: str = "reverse"):
        super().__init__(data, sigma=sigma, tau_min=tau_min, tau_max=tau_max, direction=direction)
        caps = {"velocity", "diffusion"}
        if self.components == 1 or direction == "forward":
            caps.add("affine")
        self._capabilities = frozenset(caps)

    def diffusion(self, t):
        """√2 σ (constant)."""
        return math.sqrt(2.0) * self.sigma

    def velocity(self, t, x, state=None):
        """The drift: forward −x; reverse x + 2σ²∇log ρ_{τ_max−s}(x)."""
        tau = self._tau_checked(t)
        if self.direction == "forward":
            return -x
        return x + 2.0 * self.sigma**2 * self.score(tau, x)

    def affine(self, t, state):
        tau = self._tau_checked(t)
        m, S = state.mean, state.cov
        s2 = self.sigma**2
        eye = torch.eye(self.dim, dtype=m.dtype, device=m.device)
        law = s2 * torch.linalg.inv(S)  # −σ²∇log N(m, S) = σ²S⁻¹(x − m)
        if self.direction == "forward":
            return -m, law - eye
        m_tau, S_tau = self._gaussian_data(tau, m)
        Q = torch.linalg.inv(S_tau)
        b = m - 2.0 * s2 * (m - m_tau) @ Q
        return b, eye - 2.0 * s2 * Q + law

    def solution(self, t: float, initial: Gaussians | None = None, t0: float | None = None) -> Gaussians:
        """The law of the SDE at field time t (Gaussian data for the reverse direction).

        ``initial=None``: ρ_τ (the exact law is stationary along the bridge in both directions).
        From ``initial`` N(m₀, S₀) at ``t0``:

        * forward (data-free OU), Δ = τ − τ₀: m = e^{−Δ}m₀, S = e^{−2Δ}S₀ + (1 − e^{−2Δ})σ²I;
        * reverse: the drift Jacobian F = I − 2σ²Σ_τ⁻¹ commutes with every Σ_τ, and the deviation from
          the bridge obeys D' = FD + DF, so with Φ = e^{−(s − s₀)} Σ_τ Σ_{τ₀}⁻¹ (solving Φ' = FΦ):
          m = m_τ + Φ(m₀ − m_{τ₀}), S = Σ_τ + Φ(S₀ − Σ_{τ₀})Φᵀ.
        """
        if initial is None:
            return super().solution(t)
        if t0 is None:
            raise ParameterError(f"field {self.name!r}.solution: give t0, the field time of `initial`")
        tau, tau0 = self._tau_checked(t), self._tau_checked(t0)
        m0, S0 = initial.mean, initial.cov
        eye = torch.eye(self.dim, dtype=m0.dtype, device=m0.device)
        if self.direction == "forward":
            decay = math.exp(-(tau - tau0))
            cov = decay**2 * S0 - math.expm1(-2.0 * (tau - tau0)) * self.sigma**2 * eye
            return Gaussians(decay * m0, cov)
        m_t, S_t = self._gaussian_data(tau, m0)
        m_s, S_s = self._gaussian_data(tau0, m0)
        Phi = math.exp(-(float(t) - float(t0))) * S_t @ torch.linalg.inv(S_s)
        mean = m_t + (m0 - m_s) @ Phi.T
        cov = S_t + Phi @ (S0 - S_s) @ Phi.T
        return Gaussians(mean, 0.5 * (cov + cov.transpose(-1, -2)))


def _sym_power(S: torch.Tensor, p: float) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(0.5 * (S + S.transpose(-1, -2)))
    return (evecs * evals.pow(p)[..., None, :]) @ evecs.transpose(-1, -2)


@measureflow.hookimpl
def measureflow_register_fields(registry) -> None:
    registry.add_field("ou_bridge", OUBridge)
    registry.add_field("ou_bridge_sde", OUBridgeSDE)
