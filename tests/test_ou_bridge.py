"""The OU bridge fields ``ou_bridge`` / ``ou_bridge_sde`` against the closed forms of MATH.md §1.2, §1.6, §2."""

from __future__ import annotations

import json
import math

import pytest
import torch

import measureflow
from measureflow import Gaussians, Particles, Simulation
from measureflow.errors import CapabilityError, ParameterError, ShapeError, TimeRangeError
from measureflow.measures import Empirical, Gaussian, GaussianMixture
from measureflow.simulation import Observer
from measureflow_plugins.ou_bridge import OUBridge, OUBridgeSDE, cosine_time_grid, geometric_time_grid

F64 = torch.float64
# MATH.md §1.6: the three-Dirac test case
ATOMS = torch.tensor([[2.0, 0.0], [-1.0, math.sqrt(3.0)], [-1.0, -math.sqrt(3.0)]], dtype=F64)
ATOM_WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
TAU_MIN = 1e-3


pytestmark = pytest.mark.usefixtures("single_thread")


def three_diracs() -> GaussianMixture:
    return GaussianMixture.diracs(ATOMS, ATOM_WEIGHTS)


def gaussian_data() -> Gaussian:
    return Gaussian(torch.tensor([1.0, -0.5], dtype=F64), torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=F64))


def as_state(law: Gaussian) -> Gaussians:
    return Gaussians(law.mean_[None].clone(), law.cov[None].clone())


def integrate(field, state, grid, integrator="rk4", seed=None):
    """Step ``state`` along the field-time grid (the non-uniform grids the singular end needs)."""
    stepper = measureflow.integrator(integrator)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    ts = grid.tolist()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        state = stepper.advance(field, state, t0, t1, generator)
    return state


def clusters(x: torch.Tensor, tau: float):
    """Nearest scaled atom e^{−τ}cⱼ of each point: (labels, squared distances)."""
    d2 = ((x[:, None, :] - math.exp(-tau) * ATOMS[None]) ** 2).sum(-1)
    dmin, label = d2.min(dim=1)
    return label, dmin


# -- registration, parameters, errors ------------------------------------------------------------


def test_registered_names_and_capabilities():
    registry = measureflow.get_registry()
    assert registry.owner_of("fields", "ou_bridge") == "measureflow_plugins.ou_bridge"
    ode = measureflow.field("ou_bridge", data=three_diracs())
    sde = measureflow.field("ou_bridge_sde", data=three_diracs())
    assert type(ode) is OUBridge and type(sde) is OUBridgeSDE
    # mixture data: no Gaussian closure; the SDE is the one with a diffusion term
    assert ode.capabilities == {"velocity"}
    assert sde.capabilities == {"velocity", "diffusion"}
    assert sde.diffusion(0.0) == pytest.approx(math.sqrt(2.0))
    assert measureflow.field("ou_bridge", data=gaussian_data()).capabilities == {"velocity", "affine"}
    assert measureflow.field("ou_bridge_sde", data=gaussian_data()).capabilities == {"velocity", "affine", "diffusion"}
    json.dumps(ode.describe())
    json.dumps(measureflow.field("ou_bridge", data=gaussian_data(), direction="reverse").describe())


def test_time_ranges_and_refusals():
    fwd = OUBridge(three_diracs(), tau_min=TAU_MIN, tau_max=12.0)
    rev = OUBridge(three_diracs(), tau_min=TAU_MIN, tau_max=12.0, direction="reverse")
    assert fwd.time_range == (TAU_MIN, 12.0)
    assert rev.time_range == pytest.approx((0.0, 12.0 - TAU_MIN))
    x = torch.zeros(1, 4, 2, dtype=F64)
    with pytest.raises(TimeRangeError, match=r"\[0.001, 12\]"):
        fwd.velocity(1e-4, x, None)
    with pytest.raises(TimeRangeError, match="tau_min"):
        rev.velocity(12.0, x, None)  # s = τ_max ⇒ τ = 0
    # the simulation refuses to start outside the range
    with pytest.raises(TimeRangeError):
        Simulation(Particles(x), fwd, "rk4", t0=0.0, t1=1.0, steps=2)
    # stage times a few ulps past the end are the end itself
    fwd.velocity(12.0 * (1 + 1e-15), x, None)
    with pytest.raises(ParameterError, match="finite tau_max"):
        OUBridge(three_diracs(), tau_max=math.inf, direction="reverse")
    with pytest.raises(ParameterError, match="tau_min"):
        OUBridge(three_diracs(), tau_min=0.0)
    with pytest.raises(ParameterError, match="direction"):
        OUBridge(three_diracs(), direction="backward")
    with pytest.raises(ParameterError, match="Gaussian, GaussianMixture or Empirical"):
        OUBridge(ATOMS)
    with pytest.raises(ShapeError, match="d = 2"):
        fwd.velocity(1.0, torch.zeros(1, 4, 3, dtype=F64), None)
    with pytest.raises(CapabilityError, match="K = 3"):
        fwd.affine(1.0, as_state(gaussian_data()))
    with pytest.raises(CapabilityError, match="Gaussian closure"):
        Simulation(as_state(gaussian_data()), fwd, "rk4", t0=0.1, t1=1.0, steps=2)


def test_time_grids():
    fwd = OUBridge(three_diracs(), tau_min=TAU_MIN, tau_max=12.0)
    rev = OUBridge(three_diracs(), tau_min=TAU_MIN, tau_max=12.0, direction="reverse")
    g = fwd.time_grid(100)
    assert g[0] == TAU_MIN and g[-1] == 12.0
    ratios = g[1:] / g[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-12)
    s = rev.time_grid(100)
    assert s[0] == 0.0 and s[-1] == rev.time_range[1]
    # same OU times, visited in the opposite order
    assert torch.allclose(torch.tensor([rev.tau(v) for v in s.tolist()], dtype=F64), g.flip(0), atol=1e-12)
    with pytest.raises(ParameterError):
        geometric_time_grid(0.0, 1.0, 10)


def test_cosine_time_grid():
    T = 50
    k = torch.arange(T + 1, dtype=F64)
    tau = cosine_time_grid(T, s=0.0)
    # MATH.md §2: with s = 0 the discrete schedule is exactly τ = −log cos(πt/2), t = k/T
    assert torch.allclose(tau[:-1], -torch.log(torch.cos(math.pi * k[:-1] / (2 * T))), rtol=1e-13, atol=1e-15)
    assert tau[0] == 0.0 and tau[-1] == math.inf
    nd = cosine_time_grid(1000)
    assert nd[0] == 0.0 and bool((nd[1:] > nd[:-1]).all()) and nd[-1] == math.inf
    # Nichol–Dhariwal's ᾱ_k = f(k)/f(0) = e^{−2τ_k} at a hand-evaluated point, k = T/2, s = 0.008
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert math.exp(-2 * float(nd[500])) == pytest.approx(f(0.5) / f(0.0), rel=1e-13)
    with pytest.raises(ParameterError):
        cosine_time_grid(0)


# -- exact score --------------------------------------------------------------------------------


def test_reduction_score_equals_dense_formula():
    gen = torch.Generator().manual_seed(0)
    M, d = 3000, 3
    points = torch.randn(M, d, generator=gen, dtype=F64) * 2.0
    weights = torch.rand(M, generator=gen, dtype=F64) + 0.1
    weights = weights / weights.sum()
    field = OUBridge(Empirical(points, weights), sigma=0.8)
    assert field.atomic
    x = torch.randn(2, 40, d, generator=gen, dtype=F64) * 1.5
    for tau in (0.01, 0.3, 2.0):
        score = field.score(tau, x)
        # ρ_τ as a GaussianMixture of N(e^{−τ}yⱼ, s_τ²I): the measures module's dense log-sum-exp score
        dense = field.marginal(tau).score(x)
        # both are float64 sums of M terms; differences are rounding of the exponent shifts
        assert torch.allclose(score, dense, rtol=1e-10, atol=1e-10 * dense.abs().max())
        # differentiable path (log-sum-exp over components) agrees with the streaming reduction
        with torch.enable_grad():
            xr = x.clone().requires_grad_(True)
            assert torch.allclose(field.score(tau, xr).detach(), score, rtol=1e-10, atol=1e-12)
        # posterior mean: Σⱼ rⱼ yⱼ, and Tweedie x̂ = (x + s²∇log ρ)/a
        a, s2 = field.coefficients(tau)
        logr = torch.log(weights) - ((x[..., None, :] - a * points) ** 2).sum(-1) / (2 * s2)
        xhat = torch.softmax(logr, dim=-1) @ points
        assert torch.allclose(field.posterior_mean(tau, x), xhat, rtol=1e-10, atol=1e-12)
        assert torch.allclose((x + s2 * score) / a, xhat, rtol=1e-9, atol=1e-10)


def test_component_score_equals_mixture_score():
    gen = torch.Generator().manual_seed(1)
    K, d = 4, 2
    means = torch.randn(K, d, generator=gen, dtype=F64) * 2
    B = torch.randn(K, d, d, generator=gen, dtype=F64)
    covs = B @ B.transpose(-1, -2) * 0.3
    covs[1] = 0.0  # a Dirac among proper components
    mixture = GaussianMixture(torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64), means, covs)
    field = OUBridge(mixture, sigma=1.3)
    assert not field.atomic
    x = torch.randn(1, 64, d, generator=gen, dtype=F64) * 2
    for tau in (TAU_MIN, 0.2, 3.0):
        dense = field.marginal(tau).score(x)
        assert torch.allclose(field.score(tau, x), dense, rtol=1e-10, atol=1e-10 * dense.abs().max())
    # the field is v = −x − σ²∇log ρ_τ forward and its negative in reverse time
    rev = OUBridge(mixture, sigma=1.3, direction="reverse", tau_max=5.0)
    v = field.velocity(0.7, x, None)
    assert torch.allclose(v, -x - 1.3**2 * field.marginal(0.7).score(x), rtol=1e-10, atol=1e-10)
    assert torch.allclose(rev.velocity(5.0 - 0.7, x, None), -v, rtol=1e-12, atol=1e-12)


# -- Gaussian closure ---------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_closure_is_the_velocity_and_the_law_velocity(direction):
    data = gaussian_data()
    field = OUBridge(data, sigma=0.7, tau_max=4.0, direction=direction)
    t = field.field_time(0.35)
    # an off-bridge Gaussian state: the closure is the affine field itself at its mean
    state = Gaussians(torch.tensor([[0.3, 0.9]], dtype=F64), torch.tensor([[[1.0, 0.2], [0.2, 0.6]]], dtype=F64))
    b, A = field.affine(t, state)
    x = torch.randn(1, 10, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    affine_v = b[:, None, :] + (x - state.mean[:, None, :]) @ A.transpose(-1, -2)
    assert torch.allclose(field.velocity(t, x, None), affine_v, rtol=1e-12, atol=1e-12)
    # on the exact law, b = ∓m (MATH.md §2) and A = ∓(−I + σ²Σ_τ⁻¹) is symmetric
    exact = field.solution(t)
    b, A = field.affine(t, exact)
    sign = 1.0 if direction == "forward" else -1.0
    assert torch.allclose(b, -sign * exact.mean, atol=1e-14)
    expected_A = sign * (-torch.eye(2, dtype=F64) + 0.49 * torch.linalg.inv(exact.cov[0]))
    assert torch.allclose(A[0], expected_A, atol=1e-13)


def test_gaussian_closure_matches_closed_form():
    data = gaussian_data()
    fwd = OUBridge(data, sigma=1.0, tau_min=TAU_MIN, tau_max=6.0)
    result = Simulation(fwd.solution(TAU_MIN), fwd, "rk4", t0=TAU_MIN, t1=3.0, steps=300, progress=False).run()
    exact = fwd.solution(3.0)
    # closed form m_τ = e^{−τ}m₀, Σ_τ = e^{−2τ}Σ₀ + (1 − e^{−2τ})σ²I
    e = math.exp(-3.0)
    assert torch.allclose(exact.cov[0], e**2 * data.cov + (1 - e**2) * torch.eye(2, dtype=F64), atol=1e-15)
    assert torch.allclose(exact.mean[0], e * data.mean_, atol=1e-15)
    # RK4, h ≈ 0.01: global error O(h⁴) (MATH.md §2 measured 3.6e−8 on its grid)
    assert (result.state.cov - exact.cov).abs().max() < 1e-8
    assert (result.state.mean - exact.mean).abs().max() < 1e-8
    # reverse: from ρ_{τ_max} back to ρ_{τ_min}
    rev = OUBridge(data, sigma=1.0, tau_min=TAU_MIN, tau_max=6.0, direction="reverse")
    result = Simulation(rev.solution(0.0), rev, "rk4", t0=0.0, t1=rev.time_range[1], steps=600, progress=False).run()
    assert (result.state.cov - data.cov).abs().max() < 1e-8 + 2 * TAU_MIN  # Σ_{τ_min} differs from Σ₀ by O(τ_min)
    assert (result.state.cov - rev.solution(rev.time_range[1]).cov).abs().max() < 1e-8


def test_kl_monitor_decreases_along_the_noising_flow():
    field = OUBridge(gaussian_data(), sigma=1.0, tau_min=TAU_MIN, tau_max=6.0)
    obs = Observer(field.kl_to_stationary, name="kl", every=1)
    result = Simulation(field.solution(TAU_MIN), field, "rk4", t0=TAU_MIN, t1=4.0, steps=100, observers=[obs],
                        progress=False).run()
    kl = result.observables["kl"].values[:, 0]
    assert kl[0] > 0.5 and bool((kl[1:] < kl[:-1]).all())
    # closed form at τ = 4 (Gaussian KL formula of MATH.md §3)
    S = field.marginal(4.0).cov
    m = field.marginal(4.0).mean_
    expected = 0.5 * (torch.trace(S) + m @ m - 2 - torch.logdet(S))
    # RK4 with h = 0.04 leaves ~1e−10 in Σ; KL depends on Σ with O(1) slope
    assert kl[-1] == pytest.approx(float(expected), abs=1e-8)
    # particles: Gaussian-fit proxy, equal to the Gaussian value on the particles' own moments
    p = field.marginal(1.0).particles(500, torch.Generator().manual_seed(0))
    assert torch.allclose(field.kl_to_stationary(p), field.kl_to_stationary(Gaussians(p.mean(), p.covariance())))


def test_particles_follow_the_flow_of_their_own_moments():
    """Gaussian data: the field is affine in x, so the particles' empirical moments move exactly by the
    closure — the comparison measures the integrator's error, not the sampling error."""
    gen = torch.Generator().manual_seed(3)
    data = gaussian_data()
    fwd = OUBridge(data, sigma=0.8, tau_min=TAU_MIN, tau_max=6.0)
    particles = fwd.marginal(TAU_MIN).particles(2000, gen, replicas=2)
    own = Gaussians(particles.mean(), particles.covariance())
    result = Simulation(particles, fwd, "rk4", t0=TAU_MIN, t1=2.0, steps=200, progress=False).run()
    moved = fwd.solution(2.0, own, t0=TAU_MIN)
    # RK4 on a linear ODE with h = 0.01: relative error ~ h⁴ times smooth coefficients, far below 1e−8
    assert (result.state.covariance() - moved.cov).abs().max() < 1e-9
    assert (result.state.mean() - moved.mean).abs().max() < 1e-9
    # sampling error separates the particles from the exact law itself by ~ √(2/N)
    assert (result.state.covariance() - fwd.solution(2.0).cov).abs().max() > 1e-4
    # the reverse sampler from N(0, σ²I) at τ_max
    rev = OUBridge(data, sigma=0.8, tau_min=TAU_MIN, tau_max=6.0, direction="reverse")
    start = rev.prior().particles(2000, gen)
    own = Gaussians(start.mean(), start.covariance())
    end = rev.time_range[1]
    result = Simulation(start, rev, "rk4", t0=0.0, t1=end, steps=600, progress=False).run()
    moved = rev.solution(end, own, t0=0.0)
    assert (result.state.covariance() - moved.cov).abs().max() < 1e-9
    assert (result.state.mean() - moved.mean).abs().max() < 1e-9


# -- samplers on the three-Dirac law (MATH.md §1.6) ------------------------------------------------


def test_reverse_probability_flow_lands_on_the_atoms():
    n = 10_000
    field = OUBridge(three_diracs(), sigma=1.0, tau_min=TAU_MIN, tau_max=12.0, direction="reverse")
    start = field.prior().particles(n, torch.Generator().manual_seed(4))
    # geometric grid in τ, Δτ/τ = 4.8 %: RK4 converged here (200 and 500 steps agree to 1e−8 in RMS)
    end = integrate(field, start, field.time_grid(200))
    label, d2 = clusters(end.x[0], TAU_MIN)
    fractions = torch.bincount(label, minlength=3).to(F64) / n
    binomial = (ATOM_WEIGHTS * (1 - ATOM_WEIGHTS) / n).sqrt()
    assert bool(((fractions - ATOM_WEIGHTS).abs() < 3 * binomial).all()), fractions
    # exact: N(a cⱼ, b²σ²I) per cluster ⇒ RMS distance to the nearest scaled atom b√2 = 0.0632 (MATH.md §1.6)
    b = math.sqrt(-math.expm1(-2 * TAU_MIN))
    assert b * math.sqrt(2) == pytest.approx(0.0632, abs=5e-5)
    rms = float(d2.mean().sqrt())
    # r²/b² ~ χ²₂ (mean 2, sd 2), so the RMS has relative MC sd 1/(2√n) = 0.5 %; the start-up bias
    # (N(0, I) instead of ρ₁₂) is e^{−12}|c| ≈ 1e−5: allow 3 MC sd
    assert abs(rms / (b * math.sqrt(2)) - 1) < 3 / (2 * math.sqrt(n))


def test_stochastic_sampler_mass_split_and_reproducibility():
    n = 4000
    field = OUBridgeSDE(three_diracs(), sigma=1.0, tau_min=TAU_MIN, tau_max=12.0)
    assert field.direction == "reverse"
    start = field.prior().particles(n, torch.Generator().manual_seed(5))
    # Euler–Maruyama's weak bias on the mass split is O(Δτ/τ): measured with n = 10⁵, 0.0035 at 200
    # geometric steps, 0.0014 at 400 (0.2 binomial sd here), below MC at 800
    grid = field.time_grid(400)
    end = integrate(field, start, grid, "euler_maruyama", seed=11)
    again = integrate(field, start, grid, "euler_maruyama", seed=11)
    assert torch.equal(end.x, again.x)
    label, d2 = clusters(end.x[0], TAU_MIN)
    fractions = torch.bincount(label, minlength=3).to(F64) / n
    binomial = (ATOM_WEIGHTS * (1 - ATOM_WEIGHTS) / n).sqrt()
    assert bool(((fractions - ATOM_WEIGHTS).abs() < 3 * binomial).all()), fractions
    # every particle has reached a cluster: within 10 b of an atom (the exact law puts mass e^{−50} beyond)
    b = math.sqrt(-math.expm1(-2 * TAU_MIN))
    assert float(d2.max().sqrt()) < 10 * b


def test_stochastic_sampler_gaussian_data():
    """Euler–Maruyama from N(0, I) at τ_max = 6 to τ_min: covariance of the data law within MC error."""
    n, steps = 10_000, 1200
    data = gaussian_data()
    field = measureflow.field("ou_bridge_sde", data=data, sigma=1.0, tau_min=TAU_MIN, tau_max=6.0)
    end = field.time_range[1]
    prior = as_state(field.prior())
    exact = field.solution(end, prior, t0=0.0)
    # the SDE forgets its start: the exact law at the end is ρ_{τ_min} to 1e−9
    assert (exact.cov - field.solution(end).cov).abs().max() < 1e-9
    # the Gaussian state under the SDE's law closure follows the same law (RK4 error only)
    gauss = Simulation(prior, field, "rk4", t0=0.0, t1=end, steps=600, progress=False).run()
    assert (gauss.state.cov - exact.cov).abs().max() < 1e-7
    start = field.prior().particles(n, torch.Generator().manual_seed(6))
    result = Simulation(start, field, t0=0.0, t1=end, steps=steps, seed=7, progress=False).run()
    assert result.status.ok
    # Euler–Maruyama bias O(h): the chain's exact covariance (linear SDE) differs from the law's by
    # < 0.005 at h = 0.005 (recursion below); MC sd of a sample covariance entry is
    # √((ΣᵢᵢΣⱼⱼ + Σᵢⱼ²)/n) ≤ 0.03 — allow 4 sd plus the bias.
    m, C = prior.mean[0], prior.cov[0]
    h = end / steps
    eye = torch.eye(2, dtype=F64)
    for k in range(steps):
        tau = field.tau(k * h)
        a = math.exp(-tau)
        Q = torch.linalg.inv(a * a * data.cov + (1 - a * a) * eye)
        step = eye + h * (eye - 2 * Q)
        m = step @ m + 2 * h * Q @ (a * data.mean_)
        C = step @ C @ step.T + 2 * h * eye
    bias = (C - exact.cov[0]).abs().max()
    assert bias < 0.005
    S = exact.cov[0]
    mc = ((torch.diagonal(S)[:, None] * torch.diagonal(S)[None, :] + S**2) / n).sqrt()
    assert bool(((result.state.covariance()[0] - exact.cov[0]).abs() < 4 * mc + bias).all())
    assert bool(((result.state.mean()[0] - exact.mean[0]).abs() < 4 * torch.diagonal(S / n).sqrt() + 0.005).all())
