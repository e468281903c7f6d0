"""The exact flow-matching field between Gaussian-mixture endpoints (MATH.md §1).

``flow_matching``
    vₜ(z) = E[a'ₜX₀ + b'ₜX₁ | Zₜ = z],  Zₜ = aₜX₀ + bₜX₁  (eq. 1.1), with X₀ = data (a
    :class:`~measureflow.measures.GaussianMixture`, :class:`~measureflow.measures.Gaussian` or
    :class:`~measureflow.measures.Empirical`; Diracs are zero-covariance components) and X₁ = noise,
    either N(0, σ²I) (``sigma``, MATH.md §1.2) or a second mixture (``noise``, product coupling,
    MATH.md §1.1). Schedules follow the noising convention (MATH.md §0, §1.3).

    *Posterior-mean form* (default, ``form="posterior"``): vₜ(z) = a'ₜ x̂₀(z) + b'ₜ x̂₁(z) with
    x̂ₖ(z) = E[Xₖ | Zₜ = z]. Per component pair (i, j) of the endpoints, Zₜ | ij ~ N(mᵢⱼ, Sᵢⱼ),
    mᵢⱼ = aμᵢ + bνⱼ, Sᵢⱼ = a²Pᵢ + b²Rⱼ, and
        E[X₀ | z, ij] = μᵢ + aPᵢSᵢⱼ⁻¹(z − mᵢⱼ),   E[X₁ | z, ij] = νⱼ + bRⱼSᵢⱼ⁻¹(z − mᵢⱼ),
    averaged with the responsibilities rᵢⱼ ∝ pᵢqⱼN(z; mᵢⱼ, Sᵢⱼ) (log-sum-exp): this is eq. (1.2).
    For Dirac data against N(0, σ²I) it is eq. (1.3),
        x̂ₜ(z) = Σⱼ softmaxⱼ(−|z − acⱼ|²/(2b²σ²) + log wⱼ) cⱼ,   vₜ(z) = (b'/b) z + (a' − ab'/b) x̂ₜ(z),
    computed by :func:`measureflow.reductions.softmax_average` (streamed, memory O((N + M)d), so
    N = 10⁵ particles against M = 10⁵ atoms never forms the N×M matrix). Components with a
    covariance use the per-pair formulas above, vectorised over the (few) pairs; atoms against a
    component with a covariance go through the reduction after whitening by that covariance.

    *Score form* (``form="score"``, noise N(0, σ²I) only; for comparison, eq. 1.4):
        vₜ(z) = (a'/a) z + (a'b²/a − b'b) σ² sₜ(z),   sₜ = ∇ log pₜ,
    singular (0/0) where a = 0, which the posterior form is not.

    *Time range.* Where b = 0 the field is truly singular for atomic or low-rank data (Lipschitz
    constant ∼ b'/b, MATH.md §1.3), and likewise where a = 0 for an atomic noise endpoint; those
    times are cut off at ``t_min`` (default 10⁻³ above the singular end) / ``t_max``, and a time at
    an interior singularity is refused, always with a :class:`~measureflow.errors.TimeRangeError`
    naming the safe range. Generation integrates backwards from t_max (1, or τ_max = 12 for the
    variance-preserving schedule) to t_min, best on a geometric grid (:meth:`generation_times`,
    :meth:`generate`), and may end with the jump z ↦ x̂_{t_min}(z) (:meth:`denoise`).

    *Conventions.* ``convention="noising"`` (default): data at t = 0. ``convention="survey"``: noise
    at t = 0, data at t = 1 (Zₜ = (1 − t)X_noise + tX_data for the linear schedule); this is the
    same field with the endpoints exchanged, i.e. uₜ(z) = −v_{1−t}(z), so for the linear schedule
    uₜ(x) = (x̂(x) − x)/(1 − t) = (x + (1 − t)∇log αₜ(x))/t (MATH.md §1.2, corrected [S] Prop. 3.3, §14).
    Every public method takes the field's own time.

    *Gaussian closure* (eq. 1.5), both endpoints single Gaussians (or Diracs): mₜ = am₀ + bm₁,
    Σₜ = a²Σ₀ + b²Σ₁, v(z) = (a'm₀ + b'm₁) + Aₜ(z − mₜ), Aₜ = (aa'Σ₀ + bb'Σ₁)Σₜ⁻¹ — not symmetric
    unless Σ₀Σ₁ = Σ₁Σ₀ (always symmetric for noise σ²I). :meth:`affine` evaluates that exact field
    around the state's mean; :meth:`path`, :meth:`solution` and :meth:`flow_map` give the closed forms
    (MATH.md §1.4–1.5).

``pair_interpolation``
    Empirical ↔ empirical (MATH.md §1.1, last paragraph): αₜ = Σᵢⱼ πᵢⱼ δ_{a xᵢ + b yⱼ}, and the
    field is defined only on the atoms, so each particle carries its pair (i, j) and moves with
    a'xᵢ + b'yⱼ. Build the pairs with :func:`pair_particles` (product coupling pᵢqⱼ, an explicit
    plan, or a coupling callable).
"""

from __future__ import annotations

import math

import attrs
import torch

import measureflow
from measureflow.cache import DeviceCache
from measureflow.errors import CapabilityError, ParameterError, ShapeError, StateError, TimeRangeError
from measureflow.fields import Field
from measureflow.measures import Empirical, Gaussian, GaussianMixture
from measureflow.reductions import softmax_average
from measureflow.schedules import Schedule, as_schedule, autograd_derivative
from measureflow.state import Gaussians, Particles, as_tensor
from measureflow.validators import check_int, check_positive

__all__ = ["FlowMatchingField", "InterpolantSchedule", "PairInterpolationField", "PairedEndpoints", "pair_particles"]

#: Distance of the default cut-off from a singular end of the schedule's range (MATH.md §1.3: "e.g. 10⁻³").
DEFAULT_CUTOFF = 1e-3
#: Default τ_max of a schedule whose range is unbounded above (MATH.md §1.6: τ_max = 12 for OU).
DEFAULT_HORIZON = 12.0
_LOG_2PI = math.log(2 * math.pi)


# -- endpoints ---------------------------------------------------------------------------------------------


@attrs.frozen(eq=False)
class _Endpoint:
    """A mixture split into Dirac atoms (zero covariance) and components with a covariance.

    atoms (M, d) with log-weights (M,); components means (K, d), covs (K, d, d), log-weights (K,),
    ``iso`` (K,) the variance s² of a component whose covariance is s²I (NaN otherwise).
    ``singular``: some component has a singular covariance (atoms included).
    """

    atoms: torch.Tensor | None
    atom_logw: torch.Tensor | None
    means: torch.Tensor | None
    covs: torch.Tensor | None
    logw: torch.Tensor | None
    iso: tuple
    singular: bool
    dim: int
    label: str

    @property
    def n_atoms(self) -> int:
        return 0 if self.atoms is None else self.atoms.shape[0]

    @property
    def n_components(self) -> int:
        return 0 if self.means is None else self.means.shape[0]

    @property
    def single(self) -> bool:
        return self.n_atoms + self.n_components == 1

    def to(self, dtype, device) -> "_Endpoint":
        def move(t):
            return None if t is None else t.to(dtype=dtype, device=device)

        return attrs.evolve(
            self,
            atoms=move(self.atoms),
            atom_logw=move(self.atom_logw),
            means=move(self.means),
            covs=move(self.covs),
            logw=move(self.logw),
        )

    def moments(self):
        """(mean, cov) of a single-component endpoint (cov = 0 for a Dirac)."""
        if self.n_atoms:
            d = self.dim
            return self.atoms[0], torch.zeros(d, d, dtype=self.atoms.dtype, device=self.atoms.device)
        return self.means[0], self.covs[0]

    def mixture_parts(self):
        """(log-weights (K',), means (K', d), covs (K', d, d)) over atoms and components together."""
        logw, means, covs = [], [], []
        if self.n_atoms:
            M, d = self.atoms.shape
            logw.append(self.atom_logw)
            means.append(self.atoms)
            covs.append(self.atoms.new_zeros(M, d, d))
        if self.n_components:
            logw.append(self.logw)
            means.append(self.means)
            covs.append(self.covs)
        return torch.cat(logw), torch.cat(means), torch.cat(covs)


def _endpoint(measure, label: str) -> _Endpoint:
    if isinstance(measure, Empirical):
        w = measure.weights_or_uniform()
        return _Endpoint(measure.points, torch.log(w), None, None, None, (), True, measure.dim, label)
    if isinstance(measure, Gaussian):
        measure = measure.as_mixture()
    if not isinstance(measure, GaussianMixture):
        raise ParameterError(
            f"flow_matching: {label} must be a measureflow.measures GaussianMixture, Gaussian or Empirical; "
            f"received {type(measure).__name__}"
        )
    covs = measure.covs
    dirac = covs.abs().amax(dim=(-1, -2)) == 0
    logw = torch.log(measure.weights)
    atoms = measure.means[dirac] if bool(dirac.any()) else None
    atom_logw = logw[dirac] if atoms is not None else None
    keep = ~dirac
    if bool(keep.any()):
        means, ccovs, clogw = measure.means[keep], covs[keep], logw[keep]
        iso = tuple(_isotropic(c) for c in ccovs)
        evals = torch.linalg.eigvalsh(ccovs)
        tol = 1e-12 if ccovs.dtype == torch.float64 else 1e-6
        singular_cov = bool((evals[:, 0] <= tol * evals[:, -1].clamp_min(1e-300)).any())
    else:
        means = ccovs = clogw = None
        iso = ()
        singular_cov = False
    return _Endpoint(atoms, atom_logw, means, ccovs, clogw, iso, atoms is not None or singular_cov, measure.dim, label)


def _isotropic(cov: torch.Tensor) -> float:
    """s² when cov = s²I exactly, else NaN (the reduction then whitens by the covariance)."""
    d = cov.shape[-1]
    s2 = float(cov[0, 0])
    if s2 > 0 and bool((cov == s2 * torch.eye(d, dtype=cov.dtype, device=cov.device)).all()):
        return s2
    return math.nan


def _noise_endpoint(sigma: float, d: int, dtype, device) -> _Endpoint:
    eye = torch.eye(d, dtype=dtype, device=device)
    return _Endpoint(
        None, None, torch.zeros(1, d, dtype=dtype, device=device), (sigma**2 * eye)[None],
        torch.zeros(1, dtype=dtype, device=device), (sigma**2,), False, d, "noise",
    )


# -- the posterior computation ------------------------------------------------------------------------------


@attrs.frozen
class _Group:
    """One set of component pairs: its log-mass log Σ pᵢqⱼN(z; mᵢⱼ, Sᵢⱼ) (None when it is the only
    group), E[X₀|z, group], E[X₁|z, group] and the score ∇log of its mass."""

    log_mass: torch.Tensor | None
    x0: torch.Tensor
    x1: torch.Tensor
    score: torch.Tensor


def _dense_pairs(x, a, b, E0: _Endpoint, E1: _Endpoint, need_mass: bool, g: float = 0.0):
    """Component pairs (i, j) with covariances on both sides: eq. (1.2) per pair, log-sum-exp over pairs.

    With interpolant noise γ = g (MATH.md §15.2) every pair's covariance gains g²I and E[W | z, ij] =
    g Sᵢⱼ⁻¹(z − mᵢⱼ); returns (group, E[W | z]) then (E[W | z] is None when g = 0)."""
    K0, K1, d = E0.n_components, E1.n_components, x.shape[-1]
    mu = E0.means[:, None, :].expand(K0, K1, d).reshape(-1, d)
    nu = E1.means[None, :, :].expand(K0, K1, d).reshape(-1, d)
    P = E0.covs[:, None].expand(K0, K1, d, d).reshape(-1, d, d)
    Rc = E1.covs[None, :].expand(K0, K1, d, d).reshape(-1, d, d)
    logc = (E0.logw[:, None] + E1.logw[None, :]).reshape(-1)
    m = a * mu + b * nu
    S = a * a * P + b * b * Rc
    if g:
        S = S + (g * g) * torch.eye(d, dtype=S.dtype, device=S.device)
    L, _ = torch.linalg.cholesky_ex(S)
    eye = torch.eye(d, dtype=x.dtype, device=x.device).expand_as(L)
    Linv = torch.linalg.solve_triangular(L, eye, upper=False)
    diff = x[..., None, :] - m  # (R, N, pairs, d)
    white = torch.einsum("pij,rnpj->rnpi", Linv, diff)
    u = torch.einsum("pji,rnpj->rnpi", Linv, white)  # S⁻¹(z − m)
    half_logdet = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    logr = logc - half_logdet - 0.5 * d * _LOG_2PI - 0.5 * (white * white).sum(-1)
    lse = torch.logsumexp(logr, dim=-1)
    r = torch.exp(logr - lse[..., None])[..., None]
    x0 = (r * (mu + a * torch.einsum("pij,rnpj->rnpi", P, u))).sum(-2)
    x1 = (r * (nu + b * torch.einsum("pij,rnpj->rnpi", Rc, u))).sum(-2)
    score = -(r * u).sum(-2)
    group = _Group(lse if need_mass else None, x0, x1, score)
    if g:
        return group, g * (r * u).sum(-2)
    return group


def _atoms_against(x, atoms_side: _Endpoint, alpha, comp_side: _Endpoint, j: int, beta, need_mass: bool,
                   factors) -> tuple:
    """Atoms μᵢ (coefficient α) against the component j (νⱼ, Rⱼ; coefficient β) of the other side.

    Sᵢⱼ = β²Rⱼ for every atom, so E[atom | z] is a softmax average of the atoms with logits
    log pᵢ − |Lⱼ⁻¹(z − βνⱼ − αμᵢ)|²/(2β²) (Rⱼ = LⱼLⱼᵀ), computed by the streaming reduction; then
    E[other | z] = νⱼ + (z − αx̂ − βνⱼ)/β and the score is −(β²Rⱼ)⁻¹(z − αx̂ − βνⱼ).
    Returns (log_mass, E[atom side], E[component side], score).
    """
    d = x.shape[-1]
    nu = comp_side.means[j]
    s2 = comp_side.iso[j]
    shifted = x - beta * nu
    if not math.isnan(s2):
        queries, keys, scale = shifted, alpha * atoms_side.atoms, 1.0 / (2.0 * beta * beta * s2)
        log_norm = -0.5 * d * (_LOG_2PI + math.log(beta * beta * s2))
    else:
        Linv, half_logdet = factors[j]
        queries = shifted @ Linv.transpose(-1, -2)
        keys = alpha * atoms_side.atoms @ Linv.transpose(-1, -2)
        scale = 1.0 / (2.0 * beta * beta)
        log_norm = -0.5 * d * (_LOG_2PI + math.log(beta * beta)) - half_logdet
    xa, lse = _softmax(queries, keys, atoms_side.atoms, atoms_side.atom_logw, scale, need_mass)
    resid = x - alpha * xa - beta * nu
    xb = nu + resid / beta
    if not math.isnan(s2):
        score = -resid / (beta * beta * s2)
    else:
        Linv, _ = factors[j]
        score = -(resid @ Linv.transpose(-1, -2)) @ Linv / (beta * beta)
    log_mass = None if lse is None else lse + log_norm + comp_side.logw[j]
    return log_mass, xa, xb, score


def _softmax(queries, keys, values, log_weights, scale, need_lse):
    """Σⱼ softmaxⱼ(log wⱼ − scale|q − kⱼ|²) vⱼ (and the log-sum-exp): the streaming reduction, or a
    dense log-sum-exp when the queries carry autograd history (the reduction records none)."""
    if torch.is_grad_enabled() and queries.requires_grad:
        logits = log_weights - scale * ((queries[..., :, None, :] - keys) ** 2).sum(-1)
        lse = torch.logsumexp(logits, dim=-1)
        avg = torch.exp(logits - lse[..., None]) @ values
        return avg, (lse if need_lse else None)
    out = softmax_average(
        queries, keys, values, log_weights=log_weights, scale=scale, return_logsumexp=need_lse,
    )
    return out if need_lse else (out, None)


def _combine(groups: list[_Group]) -> tuple:
    if len(groups) == 1:
        g = groups[0]
        return g.x0, g.x1, g.score
    lse = torch.logsumexp(torch.stack([g.log_mass for g in groups]), dim=0)
    out = []
    for attr in ("x0", "x1", "score"):
        total = 0
        for g in groups:
            total = total + torch.exp(g.log_mass - lse)[..., None] * getattr(g, attr)
        out.append(total)
    return tuple(out)


# -- stochastic interpolants ----------------------------------------------------------------------------------


def _gamma_function(gamma, schedule) -> tuple:
    """(γ(t) -> (γ, γγ'), description) for ``gamma``: a number c (γ = c√(t(1 − t)), on [0, 1]) or a
    callable γ(t) of torch functions (γ' by autograd). γ must vanish at finite ends of the range."""
    lo, hi = (float(v) for v in schedule.time_range)
    if callable(gamma):
        def g(t):
            value, slope = autograd_derivative(gamma, t, "gamma")
            return value, value * slope

        desc = getattr(gamma, "__qualname__", repr(gamma))
    else:
        try:
            c = float(gamma)
        except (TypeError, ValueError):
            raise ParameterError(f"flow_matching: gamma must be a number or a callable γ(t); received {gamma!r}") from None
        if not (c >= 0 and math.isfinite(c)):
            raise ParameterError(f"flow_matching: gamma must be a finite number >= 0; received {gamma!r}")
        if (lo, hi) != (0.0, 1.0):
            raise ParameterError(
                f"flow_matching: gamma = c means γ = c√(t(1 − t)) on [0, 1], but schedule {schedule.name!r} runs on "
                f"[{lo:g}, {hi:g}]; give gamma as a callable γ(t) vanishing at the ends"
            )

        def g(t):
            t = torch.as_tensor(t, dtype=torch.float64) if not isinstance(t, torch.Tensor) else t
            # γγ' = c²(1 − 2t)/2 stays finite where γ' = c(1 − 2t)/(2√(t(1 − t))) does not
            return c * torch.sqrt((t * (1 - t)).clamp_min(0)), 0.5 * c * c * (1 - 2 * t)

        desc = c
    for end in (lo, hi):
        if math.isfinite(end) and abs(float(g(torch.tensor(end, dtype=torch.float64))[0])) > 1e-12:
            raise ParameterError(f"flow_matching: the interpolant noise γ must vanish at the path's ends; γ({end:g}) ≠ 0")
    return g, desc


class InterpolantSchedule(Schedule):
    """The stochastic interpolant Zₜ = aₜX₀ + bₜX₁ + γₜW with X₁ ~ N(0, σ²I) and W ~ N(0, I)
    independent, written as a deterministic one (MATH.md §15.2): bₜX₁ + γₜW ~ N(0, (b² + γ²/σ²)σ²I), so
    b̃ = √(b² + γ²/σ²), b̃' = (bb' + γγ'/σ²)/b̃ and E[b'X₁ + γ'W | Zₜ] = b̃' E[X̃₁ | Zₜ]: the conditional
    expectation (1.1) with the extra term γ'E[W | Zₜ] is the field of the schedule (a, b̃)."""

    def __init__(self, base, gamma, sigma: float = 1.0, gamma_desc=None):
        self.base = as_schedule(base)
        self.gamma = gamma
        self.sigma = float(sigma)
        self.name = f"{self.base.name}+gamma"
        self.time_range = self.base.time_range
        self.singular = self.base.singular
        self._gamma_desc = gamma_desc

    def _coefficients(self, t):
        a, da, b, db = self.base.coefficients(t)
        g, ggp = self.gamma(t)
        g, ggp = g.to(b), ggp.to(b)
        s2 = self.sigma**2
        bt = torch.sqrt(b * b + g * g / s2)
        return a, da, bt, (b * db + ggp / s2) / bt

    def describe(self):
        return {"name": "stochastic_interpolant", "base": self.base.describe(), "gamma": self._gamma_desc,
                "sigma": self.sigma}


# -- the field ----------------------------------------------------------------------------------------------


class FlowMatchingField(Field):
    """The exact conditional-expectation field vₜ(z) = E[a'X₀ + b'X₁ | Zₜ = z] (module docstring;
    MATH.md §1.1–1.5).

    Parameters
    ----------
    data:
        X₀, the data end (t = 0 in the noising convention): ``GaussianMixture``, ``Gaussian`` or
        ``Empirical`` (weighted atoms; zero-covariance mixture components are atoms too).
    schedule:
        a registered schedule name, a :class:`~measureflow.schedules.Schedule`, or
        ``{"name": ..., **params}`` (default ``"linear"``).
    sigma:
        noise scale of X₁ ~ N(0, σ²I) (default 1 when ``noise`` is not given).
    noise:
        a general second endpoint X₁ (mixture, Gaussian or empirical; product coupling, eq. 1.2)
        instead of ``sigma``. Atoms on both ends are refused (see ``pair_interpolation``).
    t_min, t_max:
        cut-offs of the schedule's range (noising time). Defaults: the ends of the schedule's
        range, moved in by 10⁻³ at a singular end; t_max = 12 when the range is unbounded (τ_max).
    convention:
        ``"noising"`` (data at t = 0) or ``"survey"`` (noise at t = 0, data at t = 1: the same
        field run as uₜ = −v_{1−t}).
    form:
        ``"posterior"`` (eq. 1.3/1.2, default) or ``"score"`` (eq. 1.4, noise N(0, σ²I) only).
    gamma:
        a stochastic interpolant Zₜ = aX₀ + bX₁ + γₜW, W ~ N(0, I) independent (MATH.md §15.2): a number
        c for γ = c√(t(1 − t)), or a callable γ(t) (torch functions) vanishing at the ends. With noise
        N(0, σ²I) it is the schedule (a, √(b² + γ²/σ²)) (:class:`InterpolantSchedule`); with a ``noise``
        measure every pair of components gains γ²I in its covariance and γ'E[W | z] in its velocity
        (components only, no atoms). The Gaussian closure has Σₜ = a²Σ₀ + b²Σ₁ + γ²I. Times where b = 0
        are cut off (γ' is infinite there).
    """

    name = "flow_matching"

    def __init__(self, data=None, schedule="linear", sigma: float | None = None, noise=None,
                 t_min: float | None = None, t_max: float | None = None, convention: str = "noising",
                 form: str = "posterior", gamma=None):
        if data is None:
            raise ParameterError("flow_matching: give the data endpoint, data=GaussianMixture/Gaussian/Empirical")
        if convention not in ("noising", "survey"):
            raise ParameterError(f"flow_matching: convention must be 'noising' or 'survey'; received {convention!r}")
        if form not in ("posterior", "score"):
            raise ParameterError(f"flow_matching: form must be 'posterior' or 'score'; received {form!r}")
        self.schedule = as_schedule(schedule)
        self.convention = convention
        self.form = form
        self._data = _endpoint(data, "data")
        d = self._data.dim
        ref = self._data.atoms if self._data.atoms is not None else self._data.means
        if noise is not None:
            if sigma is not None:
                raise ParameterError("flow_matching: give either sigma (noise N(0, σ²I)) or noise=<measure>, not both")
            self._noise = _endpoint(noise, "noise")
            if self._noise.dim != d:
                raise ShapeError(f"flow_matching: data has d = {d} but noise has d = {self._noise.dim}")
            self.sigma = None
            if form == "score":
                raise ParameterError(
                    "flow_matching: form='score' is eq. (1.4), valid for noise N(0, σ²I) only; use sigma=... "
                    "or form='posterior'"
                )
        else:
            sigma = check_positive(1.0 if sigma is None else sigma, "sigma", "flow_matching")
            self.sigma = sigma
            self._noise = _noise_endpoint(sigma, d, ref.dtype, ref.device)
        self._check_pairs()
        self._gamma = None  # (γ function, description) of a general-noise stochastic interpolant
        if gamma is not None:
            g, desc = _gamma_function(gamma, self.schedule)
            if self.sigma is not None:
                self.schedule = InterpolantSchedule(self.schedule, g, self.sigma, desc)
            else:
                if self._data.n_atoms or self._noise.n_atoms:
                    raise ParameterError(
                        "flow_matching: gamma with a noise measure needs endpoints made of components with covariances "
                        "(no atoms); with atoms use noise N(0, σ²I) (sigma=...)"
                    )
                self._gamma = (g, desc)
        self._set_time_range(t_min, t_max)
        self._endpoints = DeviceCache(self._build_endpoints)
        caps = {"velocity"}
        if self._data.single and self._noise.single:
            caps.add("affine")
        self._capabilities = frozenset(caps)

    # -- set-up ---------------------------------------------------------------------------------------
    def _check_pairs(self) -> None:
        E0, E1 = self._data, self._noise
        if E0.n_atoms and E1.n_atoms:
            raise ParameterError(
                "flow_matching: both endpoints have Dirac atoms, so the interpolant of an atom pair has zero "
                "covariance at every t and the field exists only on the atoms (MATH.md §1.1); use "
                "pair_particles(...) and the 'pair_interpolation' field"
            )
        for side, other in ((E0, E1), (E1, E0)):
            if side.n_atoms and other.n_components:
                evals = torch.linalg.eigvalsh(other.covs)
                if bool((evals[:, 0] <= 0).any()):
                    raise ParameterError(
                        f"flow_matching: the {side.label} has atoms and a {other.label} component has a singular "
                        "covariance, so their interpolant is degenerate at every t; give that component a "
                        "positive-definite covariance"
                    )
        if E0.n_components and E1.n_components:
            total = E0.covs[:, None] + E1.covs[None, :]
            evals = torch.linalg.eigvalsh(total)
            tol = 1e-12 if total.dtype == torch.float64 else 1e-6
            if bool((evals[..., 0] <= tol * evals[..., -1]).any()):
                raise ParameterError(
                    "flow_matching: a data component and a noise component have covariances with a common null "
                    "direction (Pᵢ + Rⱼ singular), so Sᵢⱼ = a²Pᵢ + b²Rⱼ is singular at every t (MATH.md §1.1)"
                )

    def _set_time_range(self, t_min, t_max) -> None:
        lo, hi = (float(v) for v in self.schedule.time_range)
        sing = self.schedule.singular
        reasons: dict[float, str] = {}
        if self._data.singular:
            for v in sing.get("b_zero", ()):
                reasons[float(v)] = (
                    "b = 0 there and the data are atomic or low-rank, so the field's Lipschitz constant blows up "
                    "(∼ b'/b); stop at the cut-off t_min and finish with denoise()"
                )
        if self._noise.singular:
            for v in sing.get("a_zero", ()):
                reasons[float(v)] = "a = 0 there and the noise endpoint is atomic or low-rank; stop before it"
        if isinstance(self.schedule, InterpolantSchedule) or getattr(self, "_gamma", None) is not None:
            for v in sing.get("b_zero", ()):
                reasons.setdefault(float(v), "the interpolant noise γ has an infinite derivative where b = 0")
        if self.form == "score":
            for v in sing.get("a_zero", ()):
                reasons.setdefault(float(v), "a = 0 there and the score form (1.4) is 0/0; use form='posterior'")
        self._singular_reasons = reasons
        if t_min is None:
            t_min = lo + DEFAULT_CUTOFF if lo in reasons else lo
        if t_max is None:
            if math.isinf(hi):
                t_max = DEFAULT_HORIZON
            else:
                t_max = hi - DEFAULT_CUTOFF if hi in reasons else hi
        try:
            t_min, t_max = float(t_min), float(t_max)
        except (TypeError, ValueError):
            raise ParameterError(f"flow_matching: t_min and t_max must be numbers; received {t_min!r}, {t_max!r}") from None
        sname = self.schedule.name
        if not (lo <= t_min < t_max <= hi) or not math.isfinite(t_max):
            raise ParameterError(
                f"flow_matching: need {lo:g} <= t_min < t_max <= {hi:g} (finite) for schedule {sname!r}; received "
                f"t_min = {t_min:g}, t_max = {t_max:g}"
            )
        for end, value in (("t_min", t_min), ("t_max", t_max)):
            if value in reasons:
                safe = value + DEFAULT_CUTOFF if end == "t_min" else value - DEFAULT_CUTOFF
                raise ParameterError(
                    f"flow_matching: {end} = {value:g} is a singular time of schedule {sname!r} ({reasons[value]}); "
                    f"cut off before it, e.g. {end}={safe:g}"
                )
        self.t_min, self.t_max = t_min, t_max
        if self.convention == "survey":
            if lo < 0 or hi > 1:
                raise ParameterError(
                    f"flow_matching: convention='survey' maps t ↦ 1 − t and needs a schedule on [0, 1]; schedule "
                    f"{sname!r} runs on [{lo:g}, {hi:g}] (use the noising convention)"
                )
            self.time_range = (1.0 - t_max, 1.0 - t_min)
        else:
            self.time_range = (t_min, t_max)

    # -- time ------------------------------------------------------------------------------------------
    def _to_internal(self, t: float) -> float:
        return 1.0 - t if self.convention == "survey" else t

    def _from_internal(self, tau: float) -> float:
        return 1.0 - tau if self.convention == "survey" else tau

    def check_time(self, t) -> None:
        """Refuse a time outside the safe range or at an interior singular time (TimeRangeError)."""
        t = float(t)
        lo, hi = self.time_range
        tau = self._to_internal(t)
        where = f"field {self.name!r} (schedule {self.schedule.name!r}, {self.convention} convention)"
        if tau in self._singular_reasons:
            raise TimeRangeError(
                f"{where} is singular at t = {t:g}: {self._singular_reasons[tau]}. It is defined for t in "
                f"[{lo:g}, {hi:g}] except at its singular times (MATH.md §1.3)"
            )
        if not (lo <= t <= hi):
            slo, shi = (float(v) for v in self.schedule.time_range)
            end = slo if tau < self.t_min else shi
            why = f" (at the schedule's end t = {self._from_internal(end):g}: {self._singular_reasons[end]})" \
                if end in self._singular_reasons else ""
            raise TimeRangeError(
                f"{where} is defined for t in [{lo:g}, {hi:g}]; received t = {t:g}{why}. Choose times inside "
                f"that range (t_min/t_max set the cut-offs; MATH.md §1.3)"
            )

    def coefficients(self, t):
        """(a, a', b, b') of the schedule at the field's time t, in the noising time (Python floats)."""
        tau = self._to_internal(float(t))
        return tuple(float(c) for c in self.schedule.coefficients(tau))

    # -- per-device copies -----------------------------------------------------------------------------------
    def _build_endpoints(self, like: torch.Tensor):
        """(E0, E1, Cholesky factors of each side's components) in ``like``'s dtype and device."""
        E0 = self._data.to(like.dtype, like.device)
        E1 = self._noise.to(like.dtype, like.device)
        factors = {}
        for side, other in ((E0, E1), (E1, E0)):
            if side.n_atoms and other.n_components:
                facs = []
                for j in range(other.n_components):
                    L = torch.linalg.cholesky(other.covs[j])
                    Linv = torch.linalg.solve_triangular(L, torch.eye(E0.dim, dtype=L.dtype, device=L.device), upper=False)
                    facs.append((Linv, float(torch.log(torch.diagonal(L)).sum())))
                factors[other.label] = facs
        return E0, E1, factors

    def _check_points(self, x: torch.Tensor, where: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise StateError(f"flow_matching.{where}: x must be a floating-point tensor; received {type(x).__name__}")
        if x.ndim == 2:
            x = x.unsqueeze(0)
        if x.ndim != 3 or x.shape[-1] != self._data.dim:
            raise ShapeError(
                f"flow_matching.{where}: x must have shape (R, N, d) (or (N, d)) with d = {self._data.dim}; "
                f"received {tuple(x.shape)}"
            )
        return x

    # -- the posterior ---------------------------------------------------------------------------------------
    def _interpolant_noise(self, tau: float):
        """(γ, γγ') at noising time τ for a general-noise stochastic interpolant, else (0, 0)."""
        if self._gamma is None:
            return 0.0, 0.0
        g, ggp = self._gamma[0](torch.tensor(tau, dtype=torch.float64))
        return float(g), float(ggp)

    def _posterior_velocity(self, tau: float, x: torch.Tensor):
        """(v, E[X₀ | z], E[X₁ | z], score) at noising time τ (noising convention), with the
        interpolant term γ'E[W | z] of a general-noise stochastic interpolant."""
        if self._gamma is None:
            (a, da, b, db), x0, x1, score = self._posterior(tau, x)
            if self.form == "posterior":
                return da * x0 + db * x1, x0, x1, score
            return (da / a) * x + (da * b * b / a - db * b) * self.sigma**2 * score, x0, x1, score
        a, da, b, db = (float(c) for c in self.schedule.coefficients(tau))
        g, ggp = self._interpolant_noise(tau)
        E0, E1, _ = self._endpoints(x)
        if g == 0:
            group = _dense_pairs(x, a, b, E0, E1, False)
            return da * group.x0 + db * group.x1, group.x0, group.x1, group.score
        group, w = _dense_pairs(x, a, b, E0, E1, False, g)
        # w = E[W | z] (= γ Σᵢⱼ rᵢⱼ Sᵢⱼ⁻¹(z − mᵢⱼ)); γ' = γγ'/γ keeps γ' finite-free where γ > 0
        return da * group.x0 + db * group.x1 + (ggp / g) * w, group.x0, group.x1, group.score

    def _posterior(self, tau: float, x: torch.Tensor):
        """(E[X₀ | Z = x], E[X₁ | Z = x], ∇log p(x)) at noising time τ, plus the coefficients."""
        a, da, b, db = (float(c) for c in self.schedule.coefficients(tau))
        E0, E1, factors = self._endpoints(x)
        if self._gamma is not None:
            g, _ = self._interpolant_noise(tau)
            group = _dense_pairs(x, a, b, E0, E1, False, g)
            group = group[0] if isinstance(group, tuple) else group
            return (a, da, b, db), group.x0, group.x1, group.score
        n_groups = (
            (1 if E0.n_components and E1.n_components else 0)
            + (E1.n_components if E0.n_atoms else 0)
            + (E0.n_components if E1.n_atoms else 0)
        )
        need = n_groups > 1
        groups = []
        if E0.n_components and E1.n_components:
            groups.append(_dense_pairs(x, a, b, E0, E1, need))
        if E0.n_atoms:
            for j in range(E1.n_components):
                lm, xa, xb, s = _atoms_against(x, E0, a, E1, j, b, need, factors.get("noise"))
                groups.append(_Group(lm, xa, xb, s))
        if E1.n_atoms:
            for i in range(E0.n_components):
                lm, xa, xb, s = _atoms_against(x, E1, b, E0, i, a, need, factors.get("data"))
                groups.append(_Group(lm, xb, xa, s))
        x0, x1, score = _combine(groups)
        return (a, da, b, db), x0, x1, score

    # -- the protocol ----------------------------------------------------------------------------------------
    def velocity(self, t, x, state=None):
        """vₜ(x) for x of shape (R, N', d) (the field is local: ``state`` is not used)."""
        self.check_time(t)
        tau = self._to_internal(float(t))
        x3 = self._check_points(x, "velocity")
        v, _, _, _ = self._posterior_velocity(tau, x3)
        if self.convention == "survey":
            v = -v
        return v.reshape(x.shape)

    def velocity_and_score(self, t, x, state=None):
        """(vₜ(x), ∇log αₜ(x)) from one posterior evaluation (what ``flow_sde``'s drift needs)."""
        self.check_time(t)
        x3 = self._check_points(x, "velocity_and_score")
        v, _, _, score = self._posterior_velocity(self._to_internal(float(t)), x3)
        if self.convention == "survey":
            v = -v
        return v.reshape(x.shape), score.reshape(x.shape)

    def affine(self, t, state: Gaussians):
        """(b, A) with v(x) = b + A(x − m) the exact field (eq. 1.5) around the state's mean m."""
        if "affine" not in self._capabilities:
            raise CapabilityError(
                "field 'flow_matching' is affine only when both endpoints are single Gaussians (or Diracs); "
                "these are mixtures, so run it on Particles"
            )
        self.check_time(t)
        tau = self._to_internal(float(t))
        a, da, b, db = (float(c) for c in self.schedule.coefficients(tau))
        E0, E1, _ = self._endpoints(state.mean)
        m0, S0 = E0.moments()
        m1, S1 = E1.moments()
        mt = a * m0 + b * m1
        g, ggp = self._interpolant_noise(tau)
        eye = torch.eye(S0.shape[-1], dtype=S0.dtype, device=S0.device)
        St = a * a * S0 + b * b * S1 + (g * g) * eye
        B = a * da * S0 + b * db * S1 + ggp * eye
        A = torch.linalg.solve(St, B.transpose(-1, -2)).transpose(-1, -2)  # B Σₜ⁻¹ (Σₜ symmetric)
        shift = da * m0 + db * m1
        bvec = shift + (state.mean - mt) @ A.transpose(-1, -2)
        R = state.mean.shape[0]
        if self.convention == "survey":
            bvec, A = -bvec, -A
        return bvec, A.expand(R, -1, -1)

    def divergence(self, t, x, state=None):
        """∇·vₜ = tr Aₜ, Aₜ = (aa'Σ₀ + bb'Σ₁)Σₜ⁻¹ (eq. 1.5), at every point (R, N) when both endpoints are
        single Gaussians (the field is affine); None otherwise: the log-density channel then takes the
        autograd trace (MATH.md §15.1)."""
        if "affine" not in self._capabilities:
            return None
        self.check_time(t)
        a, da, b, db = (float(c) for c in self.schedule.coefficients(self._to_internal(float(t))))
        E0, E1, _ = self._endpoints(x)
        _, S0 = E0.moments()
        _, S1 = E1.moments()
        St = a * a * S0 + b * b * S1
        B = a * da * S0 + b * db * S1
        trace = torch.diagonal(torch.linalg.solve(St, B), dim1=-2, dim2=-1).sum()  # tr(Σₜ⁻¹B) = tr(BΣₜ⁻¹)
        if self.convention == "survey":
            trace = -trace
        return trace.expand(x.shape[:-1])

    # -- public helpers ----------------------------------------------------------------------------------
    def posterior_mean(self, t, x: torch.Tensor) -> torch.Tensor:
        """x̂ₜ(x) = E[X_data | Zₜ = x] (eq. 1.3, or the per-pair form of eq. 1.2); same shape as x."""
        self.check_time(t)
        x3 = self._check_points(x, "posterior_mean")
        _, x0, _, _ = self._posterior(self._to_internal(float(t)), x3)
        return x0.reshape(x.shape)

    def denoise(self, t, x):
        """The final jump z ↦ x̂ₜ(z) (MATH.md §1.3); x a tensor or a Particles state (weights kept)."""
        if isinstance(x, Particles):
            return Particles(self.posterior_mean(t, x.x), x.weights)
        return self.posterior_mean(t, x)

    def score(self, t, x: torch.Tensor) -> torch.Tensor:
        """sₜ(x) = ∇ log pₜ(x) of the interpolant's law αₜ (eq. 1.4); same shape as x."""
        self.check_time(t)
        x3 = self._check_points(x, "score")
        _, _, _, s = self._posterior(self._to_internal(float(t)), x3)
        return s.reshape(x.shape)

    def marginal_score(self, t, x: torch.Tensor) -> torch.Tensor:
        """∇log αₜ(x) at the field's own time t (either convention): the score a stochastic sampler
        of this flow needs (``flow_sde``, MATH.md §15.2)."""
        return self.score(t, x)

    def noise_prediction(self, t, x: torch.Tensor) -> torch.Tensor:
        """ε̂ₜ(x) = E[X_noise | Zₜ = x]/σ for noise N(0, σ²I) (MATH.md §15.2); same shape as x."""
        if self.sigma is None:
            raise CapabilityError("flow_matching.noise_prediction needs the noise endpoint N(0, σ²I) (sigma=...)")
        self.check_time(t)
        x3 = self._check_points(x, "noise_prediction")
        _, _, x1, _ = self._posterior(self._to_internal(float(t)), x3)
        return (x1 / self.sigma).reshape(x.shape)

    def marginal(self, t) -> GaussianMixture:
        """The law αₜ of Zₜ = Σᵢⱼ pᵢqⱼ N(aμᵢ + bνⱼ, a²Pᵢ + b²Rⱼ) (a mixture; MATH.md §1.1)."""
        self.check_time(t)
        a, _, b, _ = self.coefficients(t)
        lw0, mu, P = self._data.mixture_parts()
        lw1, nu, Rc = self._noise.mixture_parts()
        d = mu.shape[1]
        weights = torch.exp(lw0[:, None] + lw1[None, :]).reshape(-1)
        means = (a * mu[:, None] + b * nu[None, :]).reshape(-1, d)
        g, _ = self._interpolant_noise(self._to_internal(float(t)))
        covs = (a * a * P[:, None] + b * b * Rc[None, :]).reshape(-1, d, d) + (g * g) * torch.eye(d, dtype=P.dtype)
        return GaussianMixture(weights / weights.sum(), means, covs)

    def _require_gaussian(self, what: str):
        if not (self._data.single and self._noise.single):
            raise CapabilityError(
                f"flow_matching.{what} needs single-Gaussian (or Dirac) endpoints; these are mixtures, use marginal(t)"
            )

    def path(self, t) -> Gaussians:
        """The exact Gaussian law (mₜ, Σₜ) = (am₀ + bm₁, a²Σ₀ + b²Σ₁) at the field's time t (eq. 1.5)."""
        self._require_gaussian("path")
        self.check_time(t)
        a, _, b, _ = self.coefficients(t)
        m0, S0 = self._data.moments()
        m1, S1 = self._noise.moments()
        g, _ = self._interpolant_noise(self._to_internal(float(t)))
        eye = torch.eye(S0.shape[-1], dtype=S0.dtype, device=S0.device)
        return Gaussians(a * m0 + b * m1, a * a * S0 + b * b * S1 + (g * g) * eye)

    def flow_map(self, t, t0):
        """(T, c): the flow of the field from t0 to t is x ↦ Tx + c (Gaussian endpoints, MATH.md §1.5).

        With W the covariance of an endpoint that is positive definite (Σ₀ if it is, else Σ₁) and
        C = W^{−½} Σ_other W^{−½} = U diag(λ) Uᵀ, the whitened field commutes with C, so
        T = W^{½} U diag(fₜ/f_{t0}) Uᵀ W^{−½},  f = √(a² + b²λ) (W = Σ₀) or √(a²λ + b²) (W = Σ₁),
        and c = mₜ − T m_{t0}. For the linear schedule from 0 to 1 this is [B] (29),
        T₁ = Σ₀^{½} C^{½} Σ₀^{−½}.
        """
        self._require_gaussian("flow_map")
        if self._gamma is not None:
            raise CapabilityError(
                "flow_matching.flow_map: with gamma and a noise measure the closures at different times do not "
                "commute and the map has no closed form; integrate the Gaussian state instead"
            )
        self.check_time(t)
        self.check_time(t0)
        m0, S0 = self._data.moments()
        m1, S1 = self._noise.moments()
        data_whitens = bool(torch.linalg.eigvalsh(S0)[0] > 0)
        W, other = (S0, S1) if data_whitens else (S1, S0)
        if not bool(torch.linalg.eigvalsh(W)[0] > 0):
            raise CapabilityError("flow_matching.flow_map needs one endpoint with a positive-definite covariance")
        ew, Uw = torch.linalg.eigh(W)
        root = (Uw * ew.sqrt()) @ Uw.T
        inv_root = (Uw / ew.sqrt()) @ Uw.T
        lam, U = torch.linalg.eigh(inv_root @ other @ inv_root)
        lam = lam.clamp_min(0)

        def f(time):
            a, _, b, _ = self.coefficients(time)
            return torch.sqrt(a * a + b * b * lam) if data_whitens else torch.sqrt(a * a * lam + b * b)

        T = root @ (U * (f(t) / f(t0))) @ U.T @ inv_root
        a, _, b, _ = self.coefficients(t)
        a0, _, b0, _ = self.coefficients(t0)
        shift = (a * m0 + b * m1) - T @ (a0 * m0 + b0 * m1)
        return T, shift

    def solution(self, t, initial: Gaussians | None = None, t0: float | None = None) -> Gaussians:
        """The exact Gaussian state at t: the path law (``initial`` None), or the flow of ``initial``
        from t0 through :meth:`flow_map` (any Gaussian, e.g. a sample's own moments)."""
        if initial is None:
            return self.path(t)
        if t0 is None:
            raise ParameterError("flow_matching.solution: give t0, the time of the initial state")
        T, c = self.flow_map(t, t0)
        T, c = T.to(initial.mean), c.to(initial.mean)
        mean = initial.mean @ T.T + c
        cov = T @ initial.cov @ T.T
        return Gaussians(mean, 0.5 * (cov + cov.transpose(-1, -2)))

    # -- generation ----------------------------------------------------------------------------------------
    def generation_times(self, steps: int, spacing: str = "geometric") -> list[float]:
        """The grid from the noise end (t_max) to the data end (t_min) in the field's time.

        ``geometric``: constant Δt/(t − t₀) with t₀ the schedule's singular data end (MATH.md §1.3:
        RK4 with Δt/t ≲ 0.02 is stable), uniform when that end is not singular; ``uniform``.
        """
        steps = check_int(steps, "steps", "flow_matching.generation_times")
        if spacing not in ("geometric", "uniform"):
            raise ParameterError(f"flow_matching: spacing must be 'geometric' or 'uniform'; received {spacing!r}")
        lo = float(self.schedule.time_range[0])
        origin = lo if (lo in self._singular_reasons and self.t_min > lo) else None
        if spacing == "geometric" and origin is not None:
            r = (self.t_min - origin) / (self.t_max - origin)
            taus = [origin + (self.t_max - origin) * r ** (k / steps) for k in range(steps + 1)]
        else:
            taus = [self.t_max + (self.t_min - self.t_max) * k / steps for k in range(steps + 1)]
        taus[0], taus[-1] = self.t_max, self.t_min
        return [self._from_internal(tau) for tau in taus]

    def noise_sample(self, n: int, generator: torch.Generator | None = None, replicas: int | None = None):
        """n draws from the noise end X₁ (shape (n, d) or (R, n, d)): the start of generation (for the
        variance-preserving schedule α_{τmax} ≈ N(0, σ²I) up to the bound of MATH.md §1.3 (iii))."""
        lw, means, covs = self._noise.mixture_parts()
        return GaussianMixture(torch.exp(lw), means, covs).sample(n, generator, replicas)

    def generate(self, x, steps: int = 400, integrator="rk4", spacing: str = "geometric", times=None,
                 denoise: bool = False) -> Particles:
        """Integrate particles from the noise end to the data end over :meth:`generation_times`
        (or the given ``times``), optionally ending with :meth:`denoise`."""
        state = x if isinstance(x, Particles) else Particles(x)
        if times is None:
            times = self.generation_times(steps, spacing)
        times = [float(t) for t in times]
        step = measureflow.integrator(integrator) if isinstance(integrator, str) else integrator
        for t0, t1 in zip(times[:-1], times[1:]):
            state = step.advance(self, state, t0, t1)
        if denoise:
            state = state.with_positions(self.posterior_mean(times[-1], state.x))
        return state

    def describe(self) -> dict:
        def endpoint(E: _Endpoint):
            return {"atoms": E.n_atoms, "components": E.n_components, "dim": E.dim}

        out = {
            "name": self.name,
            "schedule": self.schedule.describe(),
            "convention": self.convention,
            "form": self.form,
            "t_min": self.t_min,
            "t_max": self.t_max,
            "data": endpoint(self._data),
        }
        if self.sigma is not None:
            out["sigma"] = self.sigma
        else:
            out["noise"] = endpoint(self._noise)
        return out


# -- empirical ↔ empirical: particles that carry their pair -------------------------------------------------


@attrs.frozen(eq=False)
class PairedEndpoints:
    """Pairs (x0ₖ, x1ₖ) with weights πₖ (MATH.md §1.1): particle k carries its pair label.

    ``index0``/``index1`` are the atom indices (i, j) of each pair in the original point sets.
    """

    x0: torch.Tensor
    x1: torch.Tensor
    weights: torch.Tensor
    index0: torch.Tensor
    index1: torch.Tensor

    @property
    def size(self) -> int:
        return self.x0.shape[0]

    def interpolate(self, t, schedule="linear", replicas: int = 1) -> Particles:
        """Particles at aₜx0ₖ + bₜx1ₖ with weights πₖ (the law αₜ = Σ πₖ δ)."""
        sched = as_schedule(schedule)
        z, _ = sched.interpolant(float(t), self.x0, self.x1)
        R = int(replicas)
        return Particles(z.expand(R, -1, -1).clone(), self.weights.expand(R, -1).clone())

    def field(self, schedule="linear") -> "PairInterpolationField":
        return PairInterpolationField(pairs=self, schedule=schedule)


def pair_particles(x, p=None, y=None, q=None, coupling=None, generator=None) -> PairedEndpoints:
    """Pairs of atoms x (N, d) with weights p and y (M, d) with weights q (MATH.md §1.1).

    ``coupling``:
    * ``None`` — the product coupling: all N·M pairs with weights pᵢqⱼ;
    * an (N, M) plan π (tensor or array, non-negative, summing to one) — the pairs with πᵢⱼ > 0;
    * a callable following the coupling protocol ``coupling(x, y, generator=None, w0=p, w1=q) ->
      (x_paired, y_paired)`` — its rows as pairs with uniform weights (indices −1: not tracked).
    """
    x = as_tensor(x, name="pair_particles x")
    y = as_tensor(y, dtype=x.dtype, device=x.device, name="pair_particles y")
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ShapeError(f"pair_particles: x and y must have shapes (N, d) and (M, d); received {tuple(x.shape)}, {tuple(y.shape)}")
    N, M = x.shape[0], y.shape[0]
    p = torch.full((N,), 1.0 / N, dtype=x.dtype, device=x.device) if p is None else as_tensor(p, dtype=x.dtype, device=x.device, name="p")
    q = torch.full((M,), 1.0 / M, dtype=x.dtype, device=x.device) if q is None else as_tensor(q, dtype=x.dtype, device=x.device, name="q")
    if tuple(p.shape) != (N,) or tuple(q.shape) != (M,):
        raise ShapeError(f"pair_particles: p must have shape ({N},) and q shape ({M},); received {tuple(p.shape)}, {tuple(q.shape)}")
    if coupling is None:
        i = torch.arange(N, device=x.device).repeat_interleave(M)
        j = torch.arange(M, device=x.device).repeat(N)
        return PairedEndpoints(x[i], y[j], p[i] * q[j], i, j)
    if callable(coupling):
        x0, x1 = coupling(x, y, generator=generator, w0=p, w1=q)
        B = x0.shape[0]
        idx = torch.full((B,), -1, dtype=torch.long, device=x.device)
        return PairedEndpoints(x0, x1, torch.full((B,), 1.0 / B, dtype=x.dtype, device=x.device), idx, idx)
    plan = as_tensor(coupling, dtype=x.dtype, device=x.device, name="coupling plan")
    if tuple(plan.shape) != (N, M):
        raise ShapeError(f"pair_particles: a coupling plan must have shape (N, M) = ({N}, {M}); received {tuple(plan.shape)}")
    if bool((plan < 0).any()) or abs(float(plan.sum()) - 1.0) > 1e-6:
        raise StateError("pair_particles: a coupling plan must be non-negative and sum to one")
    i, j = (plan > 0).nonzero(as_tuple=True)
    w = plan[i, j]
    return PairedEndpoints(x[i], y[j], w / w.sum(), i, j)


class PairInterpolationField(Field):
    """vₜ for particle k = a'ₜ x0ₖ + b'ₜ x1ₖ: each particle moves with its own pair (MATH.md §1.1).

    The velocity depends on the particle's label, not its position, so it is defined only for the
    P pair particles in their order (``pairs.interpolate(t)`` builds them); exact under any
    integrator whose stage times are on the schedule's range.
    """

    name = "pair_interpolation"

    def __init__(self, pairs: PairedEndpoints | None = None, schedule="linear", x0=None, x1=None, weights=None):
        if pairs is None:
            if x0 is None or x1 is None:
                raise ParameterError("pair_interpolation: give pairs=pair_particles(...) or paired arrays x0, x1")
            x0 = as_tensor(x0, name="x0")
            x1 = as_tensor(x1, dtype=x0.dtype, device=x0.device, name="x1")
            if x0.shape != x1.shape or x0.ndim != 2:
                raise ShapeError(f"pair_interpolation: x0 and x1 must both have shape (P, d); received {tuple(x0.shape)}, {tuple(x1.shape)}")
            P = x0.shape[0]
            w = torch.full((P,), 1.0 / P, dtype=x0.dtype, device=x0.device) if weights is None else as_tensor(weights, dtype=x0.dtype, device=x0.device, name="weights")
            idx = torch.arange(P, device=x0.device)
            pairs = PairedEndpoints(x0, x1, w, idx, idx)
        self.pairs = pairs
        self.schedule = as_schedule(schedule)
        self.time_range = tuple(float(v) for v in self.schedule.time_range)

    def velocity(self, t, x, state=None):
        self.check_time(t)
        if x.shape[-2] != self.pairs.size or x.shape[-1] != self.pairs.x0.shape[1]:
            raise ShapeError(
                f"pair_interpolation moves its P = {self.pairs.size} pair particles (d = {self.pairs.x0.shape[1]}) "
                f"in their order; received points of shape {tuple(x.shape)}. Start from pairs.interpolate(t0)"
            )
        _, da, _, db = (float(c) for c in self.schedule.coefficients(float(t)))
        v = da * self.pairs.x0.to(x) + db * self.pairs.x1.to(x)
        return v.expand(x.shape)

    def describe(self):
        return {"name": self.name, "schedule": self.schedule.describe(), "pairs": self.pairs.size}


@measureflow.hookimpl
def measureflow_register_fields(registry) -> None:
    registry.add_field("flow_matching", FlowMatchingField)
    registry.add_field("pair_interpolation", PairInterpolationField)
