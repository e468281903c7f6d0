"""Kernel drifting and Sinkhorn drifting (MATH.md §9, MATH-CHECKS.md G): the drift against its score identity
and dense formulas, zero drift at μ = β, antisymmetry, the N^{-1/2} law, the Gaussian closures and their
closed forms against the exact solution, particles against the closures, the plans against POT, errors."""

import math
import warnings

import numpy as np
import ot
import pytest
import torch

import measureflow
from measureflow import CapabilityError, Gaussians, ParameterError, Particles, ShapeError, Simulation
from measureflow.measures import Empirical, Gaussian, GaussianMixture
from measureflow.observables import sinkhorn as sinkhorn_observable
import measureflow_plugins.drifting as drifting_module
from measureflow_plugins.drifting import (
    DriftingField,
    SinkhornDriftingField,
    drift_norm,
    eigenvalue_solution,
    implicit_invariant,
    kernel_drift,
)
from samples import MEAN_02, MEAN_03, MEAN_B2, MEAN_B3, SIGMA_02, SIGMA_03, SIGMA_B2, SIGMA_B3, relerr as rel, whitened, spectral, standard_gaussian as gamma

F64 = torch.float64
C0 = torch.diag(torch.tensor([4.0, 0.25], dtype=F64))

pytestmark = pytest.mark.usefixtures("small_reductions")


def weighted_cloud(seed, n, d=2, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=F64) * 1.2 + shift
    w = torch.rand(n, generator=gen, dtype=F64) + 0.2
    return x, w / w.sum()


def dense_log_smoothed(x, y, q, eps):
    """log (K_ε*ν)(x) = log Σⱼ qⱼ e^{−|x − yⱼ|²/(2ε)}, written out densely (autograd-able)."""
    return torch.logsumexp(torch.log(q) - ((x[:, None] - y[None]) ** 2).sum(-1) / (2 * eps), dim=-1)


# -- the drift of a measure: score identity, zero at μ = β, antisymmetry --------------------------------------


def test_drift_is_eps_grad_log_of_the_smoothed_measure():
    """B_ε[ν] = ε∇log(K_ε*ν) (MATH.md §9 ✔; MATH-CHECKS G: 2·10⁻¹⁰ by differences): here against autograd of
    the dense log-sum-exp on random weighted atoms, so both sides are exact up to rounding (≈10⁻¹⁵·|x|);
    the self-corrected u = ε∇log(K_ε*β / K_ε*μ) likewise, at the particles and off them."""
    eps = 0.7
    y, q = weighted_cloud(0, 60, shift=0.5)
    x, w = weighted_cloud(1, 45)
    queries = torch.cat([x, torch.randn(20, 2, generator=torch.Generator().manual_seed(2), dtype=F64) * 3])
    state = Particles(x[None], w[None])
    raw = DriftingField(Empirical(y, q), epsilon=eps, self_correction=False).velocity(0.0, queries[None], state)[0]
    u = DriftingField(Empirical(y, q), epsilon=eps).velocity(0.0, queries[None], state)[0]
    xg = queries.clone().requires_grad_(True)
    (g_beta,) = torch.autograd.grad(dense_log_smoothed(xg, y, q, eps).sum(), xg)
    (g_mu,) = torch.autograd.grad(dense_log_smoothed(xg, x, w, eps).sum(), xg)
    assert torch.allclose(raw, eps * g_beta, atol=1e-13, rtol=0)
    assert torch.allclose(u, eps * (g_beta - g_mu), atol=1e-13, rtol=0)


@pytest.mark.parametrize("kernel", ["gaussian", "laplace"])
def test_drift_vanishes_when_mu_is_beta(kernel):
    """μ = β as a set of weighted atoms, given (i) permuted and (ii) with every atom split into two copies
    carrying weights ⅓q and ⅔q: u is a difference of two averages of the same measure, equal up to the
    order of summation — MATH-CHECKS G: 2·10⁻¹⁵ / 1.3·10⁻¹⁵; ours ≲ 10⁻¹⁵ (bound 10⁻¹⁴ = a few ulps of |y|)."""
    y, q = weighted_cloud(3, 200)
    target = Empirical(y, q)
    field = DriftingField(target, epsilon=0.5, kernel=kernel)
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(4))
    permuted = Particles(y[perm][None], q[perm][None])
    split = Particles(torch.cat([y, y])[None], torch.cat([q / 3, 2 * q / 3])[None])
    queries = torch.cat([y, torch.randn(30, 2, generator=torch.Generator().manual_seed(5), dtype=F64)])[None]
    for state in (permuted, split):
        assert float(field.velocity(0.0, state.x, state).abs().max()) < 1e-14
        assert float(field.velocity(0.0, queries, state).abs().max()) < 1e-14
        assert float(field.monitor(state)[0]) < 1e-28
    # and not for another measure (the test can fail): moving one atom gives O(1) drift near it
    moved = y.clone()
    moved[0] += 1.0
    other = Particles(moved[None], q[None])
    assert float(field.velocity(0.0, other.x, other).abs().max()) > 1e-2


@pytest.mark.parametrize("kernel", ["gaussian", "laplace"])
def test_antisymmetry_under_swapping_mu_and_beta(kernel):
    """u_{μ→β}(x) = B[β](x) − B[μ](x) = −u_{β→μ}(x) at any x, for weighted atoms: the two terms are computed the
    same way whether a measure is the target or the state (including its own atom k = i), so the identity
    holds exactly, bit for bit."""
    y, q = weighted_cloud(6, 70, shift=1.0)
    x, w = weighted_cloud(7, 50)
    mu, beta = Particles(x[None], w[None]), Particles(y[None], q[None])
    queries = torch.randn(1, 40, 2, generator=torch.Generator().manual_seed(8), dtype=F64) * 2
    forward = DriftingField(Empirical(y, q), epsilon=0.4, kernel=kernel).velocity(0.0, queries, mu)
    backward = DriftingField(Empirical(x, w), epsilon=0.4, kernel=kernel).velocity(0.0, queries, beta)
    assert torch.equal(forward, -backward) and float(forward.abs().max()) > 0.1


def test_rms_drift_between_samples_of_one_law_scales_as_inverse_sqrt_n():
    """u between two independent N-samples of one law is pure sampling noise, RMS ∝ N^{-1/2} (MATH.md §9).
    MATH-CHECKS G gives RMS 0.091, 0.042, 0.022 at N = 500, 2000, 8000 without naming the law; γ = N(0, I₂)
    with ε = 0.5 reproduces them. The mean square is taken at 500 of the N particles (the self term still
    sums over all N, k = i included) and averaged over 32, 16, 8 independent replicas. |u|² is heavy-tailed
    (particles in the Gaussian's tails see few neighbours): one replica's mean square spreads by 40–100 %,
    so MATH's single-draw RMS values carry ≈ 20–50 % and ours ≈ 5–15 %; nine seeds gave slopes −0.43 … −0.58
    (this one: RMS 0.095, 0.042, 0.019, slope −0.58).
    Bounds: slope within ±0.15 of −½, each RMS within 30 % of MATH's. A drift that did not cancel between
    the two sums (a self term without k = i, a biased average) leaves an RMS that does not decay."""
    eps, d, queries = 0.5, 2, 500
    gen = torch.Generator().manual_seed(11)
    sizes, replicas, printed = (500, 2000, 8000), (32, 16, 8), (0.091, 0.042, 0.022)
    rms = []
    for n, R in zip(sizes, replicas):
        x = torch.randn(R, n, d, generator=gen, dtype=F64)
        y = torch.randn(R, n, d, generator=gen, dtype=F64)
        u = DriftingField(y, epsilon=eps).velocity(0.0, x[:, :queries], Particles(x))
        rms.append(float((u * u).sum(-1).mean().sqrt()))
    slope = np.polyfit(np.log(sizes), np.log(rms), 1)[0]
    assert abs(slope + 0.5) < 0.15, (rms, slope)
    for got, want in zip(rms, printed):
        assert abs(got - want) < 0.3 * want, (rms, printed)


# -- analytic targets and the Laplace kernel -------------------------------------------------------------------


def test_analytic_targets_match_their_atoms_and_densities():
    """Closed-form B_ε[β]: a Gaussian target gives ε(Σ_β + εI)⁻¹(m_β − x); a mixture ε × the score of
    Σ_c π_c N(m_c, Σ_c + εI), here against autograd of torch.distributions (independent code); a mixture of
    Diracs equals the same atoms given as an Empirical (softmax path) to rounding."""
    eps = 0.6
    x, w = weighted_cloud(9, 30)
    state = Particles(x[None], w[None])
    queries = torch.randn(1, 25, 2, generator=torch.Generator().manual_seed(10), dtype=F64) * 2
    covs = torch.stack([SIGMA_B2, 0.3 * torch.eye(2, dtype=F64), torch.zeros(2, 2, dtype=F64)])
    means = torch.stack([MEAN_B2, torch.tensor([-1.0, 1.0], dtype=F64), torch.tensor([2.0, 0.0], dtype=F64)])
    pis = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    mixture = GaussianMixture(pis, means, covs)
    raw = DriftingField(mixture, epsilon=eps, self_correction=False).velocity(0.0, queries, state)[0]
    smoothed = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=pis),
        torch.distributions.MultivariateNormal(means, covs + eps * torch.eye(2, dtype=F64)),
    )
    xg = queries[0].clone().requires_grad_(True)
    (score,) = torch.autograd.grad(smoothed.log_prob(xg).sum(), xg)
    assert torch.allclose(raw, eps * score, atol=1e-13, rtol=0)

    gauss = DriftingField(Gaussian(MEAN_B2, SIGMA_B2), epsilon=eps).velocity(0.0, queries, state)
    one = GaussianMixture(torch.tensor([0.4, 0.6], dtype=F64), MEAN_B2.expand(2, 2), SIGMA_B2.expand(2, 2, 2))
    assert torch.allclose(gauss, DriftingField(one, epsilon=eps).velocity(0.0, queries, state), atol=1e-13, rtol=0)
    pull = eps * torch.linalg.inv(SIGMA_B2 + eps * torch.eye(2, dtype=F64))
    own = DriftingField(Empirical(x, w), epsilon=eps, self_correction=False).velocity(0.0, queries, state)
    assert torch.allclose(gauss, (MEAN_B2 - queries) @ pull - own, atol=1e-13, rtol=0)

    y, q = weighted_cloud(12, 40, shift=0.3)
    diracs = DriftingField(GaussianMixture.diracs(y, q), epsilon=eps).velocity(0.0, queries, state)
    atoms = DriftingField(Empirical(y, q), epsilon=eps).velocity(0.0, queries, state)
    assert torch.allclose(diracs, atoms, atol=1e-13, rtol=0)


def test_laplace_drift_is_the_kernel_ratio_and_not_a_gradient():
    """Laplace kernel k = e^{−|x−y|/τ}, τ = √ε: the field is Σⱼ qⱼk(yⱼ − x)/Σⱼ qⱼk − (same for μ) (dense
    formula, 10⁻¹³), and it is not conservative (MATH.md §9, §14.11): its Jacobian has an antisymmetric
    part of order one, while the Gaussian kernel's — a Hessian of ε log(K_ε*β/K_ε*μ) — is symmetric up to
    the differencing error (central differences, h = 10⁻⁵: measured 6·10⁻¹¹ against |J| ≈ 0.5, where the
    Laplace field's antisymmetric part is 0.33)."""
    eps = 0.5
    y, q = weighted_cloud(13, 50, shift=0.8)
    x, w = weighted_cloud(14, 40)
    state = Particles(x[None], w[None])
    queries = torch.randn(1, 15, 2, generator=torch.Generator().manual_seed(15), dtype=F64)

    def dense(z, atoms, weights):
        k = weights * torch.exp(-torch.cdist(z, atoms) / math.sqrt(eps))
        return (k @ atoms) / k.sum(-1, keepdim=True) - z

    laplace = DriftingField(Empirical(y, q), epsilon=eps, kernel="laplace")
    expected = dense(queries[0], y, q) - dense(queries[0], x, w)
    assert torch.allclose(laplace.velocity(0.0, queries, state)[0], expected, atol=1e-13, rtol=0)

    def asymmetry(field):
        h = 1e-5
        cols = []
        for e in torch.eye(2, dtype=F64):
            up = field.velocity(0.0, queries + h * e, state)[0]
            down = field.velocity(0.0, queries - h * e, state)[0]
            cols.append((up - down) / (2 * h))
        J = torch.stack(cols, -1)  # J[n, i, j] = ∂vᵢ/∂xⱼ
        return float((J - J.transpose(-1, -2)).abs().max()), float(J.abs().max())

    gap, size = asymmetry(DriftingField(Empirical(y, q), epsilon=eps))
    assert gap < 1e-8 * size
    gap, size = asymmetry(laplace)
    assert gap > 0.05 * size


def test_laplace_field_refuses_the_gaussian_closure():
    field = DriftingField(gamma(2), epsilon=0.5, kernel="laplace", samples=300)
    assert "affine" not in field.capabilities
    start = Gaussians(torch.zeros(2, dtype=F64), C0)
    with pytest.raises(CapabilityError, match="laplace kernel's drift has no Gaussian closure.*kernel='gaussian'"):
        field.affine(0.0, start)
    with pytest.raises(CapabilityError, match="no Gaussian closure"):
        Simulation(start, field, "rk4", 0.0, 1.0, steps=2, progress=False)
    with pytest.raises(ParameterError, match="samples=<n>"):
        DriftingField(gamma(2), kernel="laplace")


# -- Gaussian closure and its closed forms ---------------------------------------------------------------------


def test_gaussian_reference_values_and_implicit_solution():
    """MATH.md §9, ε = 0.5, target γ, diag(4, ¼) → diag(3.2390509, 0.3367531) at t = ½ (RK4, h = 1/200: error
    ~10⁻¹²), and the closed forms: each eigenvalue keeps ε log λ − (1 + ε) log|1 − λ| − 2εt/(1 + ε) constant
    (MATH-CHECKS: 3·10⁻¹²), :meth:`solution` solves it to the float64 grid, the mean stays 0."""
    eps = 0.5
    field = measureflow.field("drifting", target=gamma(2), epsilon=eps)
    start = Gaussians(torch.zeros(2, dtype=F64), C0)
    run = Simulation(start, field, "rk4", 0.0, 0.5, steps=100, observers=["covariance"], observe_every=10,
                     progress=False).run()
    reference = torch.diag(torch.tensor([3.2390509, 0.3367531], dtype=F64))
    assert torch.allclose(run.state.cov[0], reference, atol=5e-8, rtol=0)
    exact = field.solution(0.5, start)
    assert torch.allclose(exact.cov[0], reference, atol=5e-8, rtol=0)
    assert torch.allclose(exact.cov, run.state.cov, atol=1e-12, rtol=0)
    assert float(run.state.mean.abs().max()) == 0.0 and float(exact.mean.abs().max()) == 0.0
    lam0 = torch.tensor([4.0, 0.25], dtype=F64)
    series = run.observables["covariance"]
    for t, cov in zip(series.times, series.values):
        lam = torch.diagonal(torch.as_tensor(cov[0]))
        drift = implicit_invariant(lam, t, eps) - implicit_invariant(lam0, 0.0, eps)
        assert float(drift.abs().max()) < 1e-11, t


def fourth_order_errors(field, start, exact, t1, coarse, compare):
    """Errors of the closure integrated by RK4 with ``coarse`` and 2·``coarse`` steps against ``exact`` at
    t1, and of their Richardson extrapolation (16·fine − coarse)/15, which cancels the h⁴ term."""
    runs = [Simulation(start, field, "rk4", 0.0, t1, steps=k, progress=False).run().state for k in (coarse, 2 * coarse)]
    values = [compare(r) for r in runs]
    errors = [float((v - exact).abs().max()) for v in values]
    extrapolated = float(((16 * values[1] - values[0]) / 15 - exact).abs().max())
    return errors, extrapolated


def test_one_dimensional_implicit_solution_against_the_ode():
    """1-D, from above and below the target, toward s = 1 (MATH.md §9) and s ≠ 1 (the general invariant
    ε log λ − (s + ε) log|s − λ| − 2εst/(s + ε)): RK4 on the closure converges to :func:`eigenvalue_solution`
    at fourth order (h = 1/25 → 1/50 divides the error by 16: ratio within 12–20) and the Richardson
    extrapolation agrees to ≤ 10⁻¹¹ (MATH-CHECKS G: ODE vs implicit solution ≤ 3.8·10⁻¹² at t = 1…4); solution()
    returns the same numbers."""
    eps, t1 = 0.5, 4.0
    for s, lam0 in ((1.0, (4.0, 0.25)), (2.5, (0.3, 6.0)), (0.4, (3.0, 0.1))):
        target = Gaussian(torch.zeros(1, dtype=F64), torch.full((1, 1), s, dtype=F64))
        field = DriftingField(target, epsilon=eps)
        lam0 = torch.tensor(lam0, dtype=F64)
        start = Gaussians(torch.zeros(2, 1, dtype=F64), lam0[:, None, None])
        exact = eigenvalue_solution(t1, lam0, eps, s)
        assert torch.equal(field.solution(t1, start).cov[:, 0, 0], exact)
        errors, extrapolated = fourth_order_errors(field, start, exact, t1, 100, lambda g: g.cov[:, 0, 0])
        assert 12 < errors[0] / errors[1] < 20 and errors[1] < 5e-9, (s, errors)
        assert extrapolated < 1e-11, (s, extrapolated)
        drift = implicit_invariant(exact, t1, eps, s) - implicit_invariant(lam0, 0.0, eps, s)
        assert float(drift.abs().max()) < 1e-12


def test_closure_in_three_dimensions_is_the_field_of_a_gaussian():
    """d = 3, non-centred, non-commuting target and state: b + A(x − m) equals u = B_ε[β] − B_ε[N(m, Σ)]
    evaluated pointwise through the closed-form drifts of the two Gaussians (10⁻¹³), and MATH.md §9's
    b = ε(Σ_β + εI)⁻¹(m_β − m), A = ε[(Σ + εI)⁻¹ − (Σ_β + εI)⁻¹] written out with numpy; the raw drift's closure
    has A = −ε(Σ_β + εI)⁻¹. The fixed point is exactly (m_β, Σ_β): b = 0 and A = 0 to rounding."""
    eps = 0.45
    field = DriftingField(Gaussian(MEAN_B3, SIGMA_B3), epsilon=eps)
    raw = DriftingField(Gaussian(MEAN_B3, SIGMA_B3), epsilon=eps, self_correction=False)
    own = DriftingField(Gaussian(MEAN_03, SIGMA_03), epsilon=eps, self_correction=False)
    state = Gaussians(MEAN_03, SIGMA_03)
    b, A = field.affine(0.0, state)
    queries = 2 * torch.randn(1, 30, 3, generator=torch.Generator().manual_seed(16), dtype=F64)
    dummy = Particles(queries)
    pointwise = raw.velocity(0.0, queries, dummy) - own.velocity(0.0, queries, dummy)
    assert torch.allclose(b[:, None] + (queries - MEAN_03) @ A.transpose(-1, -2), pointwise, atol=1e-13, rtol=0)
    S, Sb, I3 = SIGMA_03.numpy(), SIGMA_B3.numpy(), np.eye(3)
    Pb = eps * np.linalg.inv(Sb + eps * I3)
    assert np.allclose(b[0].numpy(), Pb @ (MEAN_B3 - MEAN_03).numpy(), atol=1e-15, rtol=0)
    assert np.allclose(A[0].numpy(), eps * np.linalg.inv(S + eps * I3) - Pb, atol=1e-15, rtol=0)
    b_raw, A_raw = raw.affine(0.0, state)
    assert torch.equal(b_raw, b) and np.allclose(A_raw[0].numpy(), -Pb, atol=1e-15, rtol=0)
    b, A = field.affine(0.0, Gaussians(MEAN_B3, SIGMA_B3))
    assert float(b.abs().max()) == 0.0 and float(A.abs().max()) < 1e-15
    assert float(field.monitor(Gaussians(MEAN_B3, SIGMA_B3))[0]) < 1e-30


def test_mean_formula_and_raw_drift_solution_in_three_dimensions():
    """ṁ = b does not involve Σ, so m(t) = m_β + exp(−tε(Σ_β + εI)⁻¹)(m₀ − m_β) with and without self-correction
    (MATH.md §9); the raw drift's A is constant, Σ(t) = EΣ₀E — it collapses toward Σ = 0; a start commuting
    with Σ_β keeps the eigenbasis and solution() is exact. RK4 on the closure converges to each at fourth
    order, Richardson-extrapolated to ≤ 10⁻¹². A non-commuting self-corrected start has no closed-form
    covariance: refused."""
    eps = 0.5
    start = Gaussians(MEAN_03, SIGMA_03)
    for correct in (True, False):
        field = DriftingField(Gaussian(MEAN_B3, SIGMA_B3), epsilon=eps, self_correction=correct)
        errors, extrapolated = fourth_order_errors(field, start, field.mean_solution(2.0, start), 2.0, 100,
                                                   lambda g: g.mean)
        assert 12 < errors[0] / errors[1] < 20 and extrapolated < 1e-11, (errors, extrapolated)
        if correct:
            with pytest.raises(CapabilityError, match="commutes"):
                field.solution(2.0, start)
        else:
            errors, extrapolated = fourth_order_errors(field, start, field.solution(2.0, start).cov, 2.0, 100,
                                                       lambda g: g.cov)
            assert 12 < errors[0] / errors[1] < 20 and extrapolated < 1e-11, (errors, extrapolated)
            assert float(torch.linalg.eigvalsh(field.solution(25.0, start).cov).max()) < 1e-3
    # a start commuting with a non-isotropic target: the eigenbasis is kept and solution() is exact
    commuting = Gaussians(MEAN_03, SIGMA_B3 @ SIGMA_B3 + 0.2 * torch.eye(3, dtype=F64))
    field = DriftingField(Gaussian(MEAN_B3, SIGMA_B3), epsilon=eps)
    errors, extrapolated = fourth_order_errors(field, commuting, field.solution(2.0, commuting).cov, 2.0, 100,
                                               lambda g: g.cov)
    assert 12 < errors[0] / errors[1] < 20 and extrapolated < 1e-11, (errors, extrapolated)


def test_monitor_on_gaussians_and_particles():
    """∫|v|²dμ: |b|² + tr(AΣAᵀ) on Gaussians. The raw drift toward a Gaussian is affine in x, so on whitened
    samples (exact first two moments) the particle value Σᵢwᵢ|v(xᵢ)|² equals it to rounding; the observable
    ``drift_norm`` returns the same."""
    field = DriftingField(Gaussian(MEAN_B2, SIGMA_B2), epsilon=0.5, self_correction=False)
    x = whitened(500, MEAN_02, SIGMA_02, 17)
    particles = field.monitor(Particles(x[None]))
    gaussian = field.monitor(Gaussians(MEAN_02, SIGMA_02))
    assert torch.allclose(particles, gaussian, atol=1e-13, rtol=0) and float(gaussian[0]) > 0.1
    assert torch.equal(drift_norm(Particles(x[None]), field=field), particles)


# -- particles against the closure -----------------------------------------------------------------------------


def test_particles_follow_the_closure():
    """N = 6000 whitened samples of N(m₀, Σ₀), non-commuting non-centred Gaussian target (analytic: its drift is
    closed-form), ε = 0.5, RK4 h = ½, against the closure (RK4, h = 1/100). MATH-CHECKS G at this N: covariance
    0.24–0.37 % at t = 1…4, mean ≤ 1.4·10⁻³. The error is the finite-N error of the self term B_ε[μ] on the
    third and fourth sample moments (whitening fixes the first two), O(N^{-1/2}); over four seeds at t = 1 it
    was 0.06–0.21 % and 0.9–1.1·10⁻³ (RK4 at h = ½ vs ¼ moves it by 10⁻⁵). Bounds: MATH's 0.37 % and
    1.4·10⁻³, while a 10 % error in ε moves the covariance by 0.7 % (ε ↔ 2ε: 4 %)."""
    eps = 0.5
    field = DriftingField(Gaussian(MEAN_B2, SIGMA_B2), epsilon=eps)
    x = whitened(6000, MEAN_02, SIGMA_02, 0)
    run = Simulation(Particles(x[None]), field, "rk4", 0.0, 1.0, steps=2, progress=False).run()
    closure = Simulation(Gaussians(MEAN_02, SIGMA_02), field, "rk4", 0.0, 1.0, steps=100, progress=False).run()
    assert rel(run.state.covariance()[0], closure.state.cov[0]) < 3.7e-3
    assert float((run.state.mean() - closure.state.mean).abs().max()) < 1.4e-3


def test_particles_follow_the_closure_in_three_dimensions():
    """d = 3, non-centred, non-commuting (samples.py's pair), N = 3000 whitened samples, ε = 0.5, RK4 h = ½ to
    t = 1. MATH-CHECKS has no d = 3 level; the finite-N error of the self term is larger than in d = 2 (the
    kernel sees fewer neighbours): 0.44–0.93 % in covariance and 0.9–2.1·10⁻³ in the mean over four seeds.
    Bounds 2 % and 4·10⁻³ (twice the worst), below what ε ↔ 2ε or ε ↔ ε/2 does to the covariance (3.6 %, 5.0 %)."""
    eps = 0.5
    field = DriftingField(Gaussian(MEAN_B3, SIGMA_B3), epsilon=eps)
    x = whitened(3000, MEAN_03, SIGMA_03, 0)
    run = Simulation(Particles(x[None]), field, "rk4", 0.0, 1.0, steps=2, progress=False).run()
    closure = Simulation(Gaussians(MEAN_03, SIGMA_03), field, "rk4", 0.0, 1.0, steps=100, progress=False).run()
    assert rel(run.state.covariance()[0], closure.state.cov[0]) < 0.02
    assert float((run.state.mean() - closure.state.mean).abs().max()) < 4e-3


# -- Sinkhorn drifting -----------------------------------------------------------------------------------------


def test_sinkhorn_drifting_plans_and_velocity_against_pot():
    """POT's log-domain Sinkhorn for the cost ½|x − y|² at regularisation ε (weighted, N = 40, M = 30) gives the
    same plans Πᵢⱼ = wᵢqⱼe^{(fᵢ + gⱼ − ½|xᵢ − yⱼ|²)/ε} as our potentials (which are half those of |x − y|² at
    2ε) and the same velocity (Σⱼ Π^{μβ}ᵢⱼyⱼ − Σₖ Π^{μμ}ᵢₖxₖ)/wᵢ; the energy is ½S_{2ε} (POT's ot.solve through the
    observable). Both solvers stop at marginal errors ≤ 10⁻¹², so 10⁻⁹ is the agreement to expect."""
    eps = 0.4
    x, w = weighted_cloud(20, 40)
    y, q = weighted_cloud(21, 30, shift=0.7)
    state = Particles(x[None], w[None])
    field = SinkhornDriftingField(Empirical(y, q), epsilon=eps, tolerance=1e-13, max_iterations=5000)
    pot = field.potentials(state)
    f, g = pot["f_mu_beta"][0].numpy(), pot["g_mu_beta"][0].numpy()
    X, W, Y, Q = x.numpy(), w.numpy(), y.numpy(), q.numpy()

    def pot_plan(a, wa, b, wb):
        cost = 0.5 * ot.dist(a, b)
        return ot.sinkhorn(wa, wb, cost, eps, method="sinkhorn_log", numItermax=20000, stopThr=1e-14), cost

    plan, cost = pot_plan(X, W, Y, Q)
    ours = W[:, None] * Q[None] * np.exp((f[:, None] + g[None] - cost) / eps)
    assert np.abs(ours - plan).max() < 1e-11
    self_plan, _ = pot_plan(X, W, X, W)
    expected = (plan @ Y - self_plan @ X) / W[:, None]
    assert np.allclose(field.velocity(0.0, state.x, state)[0].numpy(), expected, atol=1e-9, rtol=0)
    energy = field.energy(state)
    half = 0.5 * sinkhorn_observable(state, target=Empirical(y, q), epsilon=2 * eps, tol=1e-12)
    assert torch.allclose(energy, half, atol=1e-9, rtol=0)


def test_sinkhorn_drifting_vanishes_when_mu_is_beta():
    """μ = β permuted, or with split atoms (weights ⅓q, ⅔q): the two plans solve the same problem, u = 0 up to
    the potentials' tolerance (10⁻¹²·2ε, times the diameter ≈ 10⁻¹¹); ½S_{2ε} = 0 likewise."""
    y, q = weighted_cloud(22, 120)
    field = SinkhornDriftingField(Empirical(y, q), epsilon=0.5, tolerance=1e-12)
    perm = torch.randperm(120, generator=torch.Generator().manual_seed(23))
    for state in (Particles(y[perm][None], q[perm][None]),
                  Particles(torch.cat([y, y])[None], torch.cat([q / 3, 2 * q / 3])[None])):
        field.reset()
        assert float(field.velocity(0.0, state.x, state).abs().max()) < 1e-10
        assert abs(float(field.energy(state)[0])) < 1e-10


def test_sinkhorn_drifting_closure_reference_and_rows():
    """MATH.md §9: ε = 1, diag(4, ¼) → diag(2.6020185, 0.4104837) at t = ½ (RK4, h = 1/400), toward γ the row
    Ċ = (4C + ε²I)^{1/2} − (4C² + ε²I)^{1/2} (numpy, d = 3, non-diagonal C), the energy ½S_{2ε} decreases."""
    field = measureflow.field("sinkhorn_drifting", target=gamma(2), epsilon=1.0)
    start = Gaussians(torch.zeros(2, dtype=F64), C0)
    run = Simulation(start, field, "rk4", 0.0, 0.5, steps=400, observers=["energy"], observe_every=40,
                     progress=False).run()
    reference = torch.diag(torch.tensor([2.6020185, 0.4104837], dtype=F64))
    assert torch.allclose(run.state.cov[0], reference, atol=5e-8, rtol=0)
    energy = np.ravel(run.observables["energy"].values)
    assert (np.diff(energy) < 0).all()
    C = SIGMA_B3
    _, A = SinkhornDriftingField(gamma(3), epsilon=0.7).affine(0.0, Gaussians(torch.zeros(3, dtype=F64), C))
    row = spectral(C.numpy(), lambda lam: np.sqrt(4 * lam + 0.49) - np.sqrt(4 * lam**2 + 0.49))
    assert np.allclose((A[0] @ C + C @ A[0].T).numpy(), row, atol=1e-12, rtol=0)


def test_sinkhorn_drifting_closure_in_three_dimensions():
    """Non-centred, non-commuting target in d = 3: b = m_β − m exactly, A = ½ × MATH.md §7's
    2(C_σ(Σ, Σ_β)ᵀ − C_σ(Σ, Σ)ᵀ)Σ⁻¹ at 2ε (σ² = ε), written out with numpy; the closure is the gradient flow of
    ½S_{2ε}: dE/dt = −|b|² − tr(AΣAᵀ) (MATH.md eq. 0.2; 4-point stencil, s = 10⁻³, error ~10⁻¹²); fixed point
    at (m_β, Σ_β)."""
    eps = 0.6
    s2 = eps  # σ² = (2ε)/2
    field = SinkhornDriftingField(Gaussian(MEAN_B3, SIGMA_B3), epsilon=eps)
    b, A = field.affine(0.0, Gaussians(MEAN_03, SIGMA_03))
    S, Sb, I3 = SIGMA_03.numpy(), SIGMA_B3.numpy(), np.eye(3)
    root, inv_root = spectral(S, np.sqrt), spectral(S, lambda lam: lam**-0.5)
    D = spectral(4 * root @ Sb @ root + s2**2 * I3, np.sqrt)
    cross = 0.5 * (root @ D @ inv_root - s2 * I3)
    own = 0.5 * (spectral(4 * S @ S + s2**2 * I3, np.sqrt) - s2 * I3)
    assert np.allclose(A[0].numpy(), 0.5 * 2 * (cross.T - own.T) @ np.linalg.inv(S), atol=1e-12, rtol=0)
    assert torch.allclose(b[0], MEAN_B3 - MEAN_03, atol=1e-15, rtol=0)
    Sdot = A[0] @ SIGMA_03 + SIGMA_03 @ A[0].T
    h = 1e-3
    E = [float(field.energy(Gaussians(MEAN_03 + c * h * b[0], SIGMA_03 + c * h * Sdot))[0]) for c in (-2, -1, 1, 2)]
    dE = (E[0] - 8 * E[1] + 8 * E[2] - E[3]) / (12 * h)
    dissipation = float((b**2).sum() + torch.trace(A[0] @ SIGMA_03 @ A[0].T))
    assert abs(dE + dissipation) < 1e-9 * dissipation
    b, A = field.affine(0.0, Gaussians(MEAN_B3, SIGMA_B3))
    assert float(b.abs().max()) == 0.0 and float(A.abs().max()) < 1e-13


def test_sinkhorn_drifting_particles_match_the_closure():
    """Whitened samples N = M = 1200 (non-commuting, non-centred pair), ε = 0.5: u regressed on x gives the
    closure's (b, A). The plans are those of the cost |x − y|² at 2ε = 1, so the finite-N error is that of
    the Sinkhorn-divergence field at ε = 1 on the same samples: 0.7–1.0 % over seeds at this N (0.4–0.55 %
    at N = 2500; MATH-CHECKS G: 0.38 % at N = 2000), O(N^{-1/2}); 2 % is twice that. Against the closure at 2ε
    (the convention slip ½|x − y|² ↔ |x − y|²) the same field is 4.9 % off, so that slip fails the 3 % bound. b = m_β − m once the marginals hold: ≤ 2·tol·max|y| ≈ 10⁻⁷ at tol = 10⁻⁸."""
    m, S = torch.tensor([0.5, -0.3], dtype=F64), torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=F64)
    mb, Sb = torch.tensor([-1.0, 0.5], dtype=F64), torch.tensor([[1.0, -0.4], [-0.4, 0.8]], dtype=F64)
    N, eps = 1200, 0.5
    x = whitened(N, m, S, 0)
    field = SinkhornDriftingField(Empirical(whitened(N, mb, Sb, 1)), epsilon=eps, tolerance=1e-8)
    u = field.velocity(0.0, x[None], Particles(x[None]))[0]
    b_hat = u.mean(0)
    A_hat = (u - b_hat).T @ (x - m) / N @ torch.linalg.inv(S)
    b, A = SinkhornDriftingField(Gaussian(mb, Sb), epsilon=eps).affine(0.0, Gaussians(m, S))
    assert rel(A_hat, A[0]) < 0.02
    _, A_wrong = SinkhornDriftingField(Gaussian(mb, Sb), epsilon=2 * eps).affine(0.0, Gaussians(m, S))
    assert rel(A_hat, A_wrong[0]) > 0.03
    assert float((b_hat - b[0]).abs().max()) < 1e-7


# -- replicas, registry, errors --------------------------------------------------------------------------------


def test_replicas_are_independent():
    """A target per replica (R, M, d) and weighted states: each replica's velocity is the single-replica one."""
    gen = torch.Generator().manual_seed(24)
    y = torch.randn(3, 50, 2, generator=gen, dtype=F64)
    x = torch.randn(3, 40, 2, generator=gen, dtype=F64)
    w = torch.rand(3, 40, generator=gen, dtype=F64) + 0.1
    w = w / w.sum(-1, keepdim=True)
    v = DriftingField(y, epsilon=0.5).velocity(0.0, x, Particles(x, w))
    for r in range(3):
        one = DriftingField(y[r], epsilon=0.5).velocity(0.0, x[r:r + 1], Particles(x[r:r + 1], w[r:r + 1]))
        assert torch.allclose(v[r], one[0], atol=1e-14, rtol=0)


def test_registry_and_bad_inputs():
    registry = measureflow.get_registry()
    assert registry.owner_of("fields", "drifting") == "measureflow_plugins.drifting"
    assert registry.owner_of("fields", "sinkhorn_drifting") == "measureflow_plugins.drifting"
    for kwargs, match in (
        ({"epsilon": 0.0}, "epsilon must be positive"),
        ({"epsilon": 0.5, "bandwidth": 0.5}, "give epsilon only"),
        ({"kernel": "imq"}, "unknown kernel 'imq'; choose 'gaussian' or 'laplace'"),
        ({"self_correction": 1}, "self_correction must be True or False"),
    ):
        with pytest.raises(ParameterError, match=match):
            DriftingField(gamma(2), **kwargs)
    for kwargs, match in (
        ({"epsilon": -1.0}, "sinkhorn_drifting: epsilon"),
        ({"tolerance": 0.0}, "sinkhorn_drifting: tolerance"),
        ({"max_iterations": 0}, "sinkhorn_drifting: max_iterations"),
    ):
        with pytest.raises(ParameterError, match=match):
            SinkhornDriftingField(gamma(2), **kwargs)
    with pytest.raises(ParameterError, match="sinkhorn_drifting: a GaussianMixture target needs samples=<n>"):
        SinkhornDriftingField(GaussianMixture(torch.tensor([0.5, 0.5], dtype=F64), torch.eye(2, dtype=F64),
                                              torch.eye(2, dtype=F64).expand(2, 2, 2)))
    samples = torch.randn(30, 2, dtype=F64)
    with pytest.raises(CapabilityError, match="sinkhorn_drifting.affine: the Gaussian closure needs a Gaussian target"):
        SinkhornDriftingField(samples).affine(0.0, Gaussians(torch.zeros(2, dtype=F64), C0))
    mix = GaussianMixture(torch.tensor([0.5, 0.5], dtype=F64), torch.eye(2, dtype=F64),
                          torch.eye(2, dtype=F64).expand(2, 2, 2))
    with pytest.raises(CapabilityError, match="needs a Gaussian target"):
        DriftingField(mix).affine(0.0, Gaussians(torch.zeros(2, dtype=F64), C0))
    with pytest.raises(CapabilityError, match="no Gaussian closure"):
        Simulation(Gaussians(torch.zeros(2, dtype=F64), C0), DriftingField(samples), "rk4", 0.0, 1.0, steps=1,
                   progress=False)
    field = DriftingField(samples)
    x3 = torch.randn(1, 5, 3, dtype=F64)
    with pytest.raises(ShapeError, match="dimension d = 2 but the state has d = 3"):
        field.velocity(0.0, x3, Particles(x3))
    with pytest.raises(ShapeError, match="replicas"):
        x = torch.randn(2, 5, 2, dtype=F64)
        DriftingField(torch.randn(3, 30, 2, dtype=F64)).velocity(0.0, x, Particles(x))
    with pytest.raises(CapabilityError, match="energy"):
        field.energy(Particles(torch.randn(1, 5, 2, dtype=F64)))
    with pytest.raises(ParameterError, match="runs forward in time"):
        DriftingField(gamma(2)).solution(-1.0, Gaussians(torch.zeros(2, dtype=F64), C0))


def test_the_old_bandwidth_keyword_warns_once_and_means_epsilon(monkeypatch):
    """drifting's ε was called bandwidth (DESIGN.md, "Names of scales": a bandwidth is a length, ε a variance):
    the old keyword gives the same field and the same numbers, with one FutureWarning per process and owner."""
    monkeypatch.setattr(drifting_module, "_WARNED_BANDWIDTH", set())
    y, q = weighted_cloud(21, 30)
    x, _ = weighted_cloud(22, 12, shift=0.3)
    state = Particles(x[None])
    with pytest.warns(FutureWarning, match=r"drifting: the keyword bandwidth= is renamed epsilon= .*length²"):
        old = DriftingField(Empirical(y, q), bandwidth=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: no second warning
        again = measureflow.field("drifting", target=Empirical(y, q), bandwidth=0.3)
    new = DriftingField(Empirical(y, q), epsilon=0.3)
    assert old.epsilon == again.epsilon == new.epsilon == 0.3 and old.describe()["epsilon"] == 0.3
    assert torch.equal(old.velocity(0.0, state.x, state), new.velocity(0.0, state.x, state))
    with pytest.warns(FutureWarning, match="kernel_drift: the keyword bandwidth= is renamed epsilon="):
        drift = kernel_drift(x[None], y[None], bandwidth=0.3, kernel="laplace")
    assert torch.equal(drift, kernel_drift(x[None], y[None], epsilon=0.3, kernel="laplace"))
    with pytest.raises(ParameterError, match="kernel_drift: epsilon .* is required"):
        kernel_drift(x[None], y[None])
