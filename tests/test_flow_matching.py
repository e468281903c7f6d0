"""The exact flow-matching field (MATH.md §1): closed forms, reductions, Gaussian closure, the
three-Dirac reverse flow, conventions, time ranges and pair interpolation.

Everything runs in float64 with a few thousand particles at most."""

from __future__ import annotations

import math

import pytest
import torch

import measureflow
from measureflow import Gaussians, Particles
from measureflow.errors import CapabilityError, ParameterError, ShapeError, TimeRangeError
from measureflow.measures import Empirical, Gaussian, GaussianMixture
from measureflow.schedules import get as schedule
from measureflow_plugins.flow_matching import FlowMatchingField, pair_particles

F64 = torch.float64
HALF_PI = math.pi / 2

# MATH.md §1.6
ATOMS = torch.tensor([[2.0, 0.0], [-1.0, math.sqrt(3)], [-1.0, -math.sqrt(3)]], dtype=F64)
MASSES = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
# MATH.md §1.5
SIGMA0 = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=F64)
SIGMA1 = torch.tensor([[1.0, 0.8], [0.8, 1.2]], dtype=F64)

INTERIOR = {
    "linear": [0.02, 0.3, 0.7, 0.97],
    "cosine": [0.02, 0.3, 0.7, 0.97],
    "overshoot": [0.02, 0.3, 0.45, 0.55, 0.7, 0.97],
    "vp": [0.01, 0.3, 1.0, 4.0],
}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def three_diracs():
    return GaussianMixture.diracs(ATOMS, MASSES)


def fm(data=None, **params) -> FlowMatchingField:
    return measureflow.field("flow_matching", data=three_diracs() if data is None else data, **params)


def dense_reference(sched, t, w0, mu, P, w1, nu, R, z):
    """Eq. (1.2) written out over every component pair with explicit inverses and log-determinants
    (no reduction, no Cholesky): vₜ(z) = Σᵢⱼ rᵢⱼ[a'μᵢ + b'νⱼ + (aa'Pᵢ + bb'Rⱼ)Sᵢⱼ⁻¹(z − mᵢⱼ)]."""
    a, da, b, db = (float(c) for c in sched.coefficients(t))
    m = a * mu[:, None] + b * nu[None]
    S = a * a * P[:, None] + b * b * R[None]
    B = a * da * P[:, None] + b * db * R[None]
    Sinv = torch.linalg.inv(S)
    diff = z[:, None, None, :] - m
    maha = torch.einsum("nijk,ijkl,nijl->nij", diff, Sinv, diff)
    logr = torch.log(w0)[:, None] + torch.log(w1)[None] - 0.5 * torch.linalg.slogdet(S)[1] - 0.5 * maha
    r = torch.softmax(logr.reshape(z.shape[0], -1), -1).reshape(logr.shape)
    vij = da * mu[:, None] + db * nu[None] + torch.einsum("ijkl,ijlm,nijm->nijk", B, Sinv, diff)
    return torch.einsum("nij,nijk->nk", r, vij)


def max_rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))


# -- closed forms ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(INTERIOR))
def test_posterior_and_score_forms_agree(name):
    """(1.3) ≡ (1.4) at interior times (MATH.md §1.2: to 10⁻¹⁵ in the reference computation)."""
    z = 2.5 * torch.randn(1, 400, 2, generator=gen(1), dtype=F64)
    mixture = GaussianMixture(
        torch.tensor([0.3, 0.7], dtype=F64),
        torch.tensor([[1.0, -1.0], [-2.0, 0.5]], dtype=F64),
        torch.stack([torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=F64), 0.1 * torch.eye(2, dtype=F64)]),
    )
    for data in (three_diracs(), mixture):
        post = fm(data, schedule=name, sigma=0.8)
        score = fm(data, schedule=name, sigma=0.8, form="score")
        for t in INTERIOR[name]:
            # Both forms are O(1) arithmetic on the same posterior; (1.4) divides by a, so the
            # rounding grows like |a'/a|·|z|·ε ≤ 10⁻¹³ at the times above (a ≥ 0.047).
            assert max_rel(score.velocity(t, z), post.velocity(t, z)) < 1e-12, (name, t)


@pytest.mark.parametrize(
    "name, times", [("linear", [1e-3, 0.05, 0.5, 1.0]), ("cosine", [0.01, 0.6, 1.0]),
                    ("overshoot", [0.2, 0.5, 0.8]), ("vp", [1e-3, 0.5, 12.0])]
)
def test_reduction_field_equals_the_dense_formula(name, times):
    """Dirac data through softmax_average vs eq. (1.2) by explicit pairs: N = 300, M = 500 weighted atoms."""
    g = gen(2)
    for d in (3, 6):  # d ≤ 4: explicit differences in the reduction; d = 6: its GEMM identity
        atoms = torch.randn(500, d, generator=g, dtype=F64)
        w = torch.rand(500, generator=g, dtype=F64) + 0.05
        w = w / w.sum()
        field = fm(GaussianMixture.diracs(atoms, w), schedule=name, sigma=0.8)
        z = 1.5 * torch.randn(1, 300, d, generator=g, dtype=F64)
        zeros = torch.zeros(500, d, d, dtype=F64)
        for t in times:
            ref = dense_reference(
                schedule(name), t, w, atoms, zeros, torch.ones(1, dtype=F64), torch.zeros(1, d, dtype=F64),
                0.64 * torch.eye(d, dtype=F64)[None], z[0],
            )
            # Same float64 sums in another order; the GEMM identity adds ε·|x|²·(1/2b²σ²) ≈ 10⁻¹⁴ to
            # the logits at t ≥ 0.2 (it is used only for d = 6, where the times are not tiny).
            tol = 1e-12 if d == 3 else 1e-11
            assert max_rel(field.velocity(t, z)[0], ref) < tol, (name, t, d)


def test_mixed_components_and_general_noise_equal_the_dense_formula():
    """Atoms + full components of the data against a non-isotropic noise mixture, and atomic noise
    against Gaussian data (the reduction then runs over the noise atoms)."""
    g = gen(3)
    d = 2

    def spd(k):
        A = torch.randn(k, d, d, generator=g, dtype=F64)
        return A @ A.transpose(-1, -2) + 0.2 * torch.eye(d, dtype=F64)

    w0 = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    mu = torch.randn(4, d, generator=g, dtype=F64)
    P = spd(4)
    P[:2] = 0
    w1 = torch.tensor([0.6, 0.4], dtype=F64)
    nu = torch.randn(2, d, generator=g, dtype=F64)
    R = spd(2)
    z = 3 * torch.randn(80, d, generator=g, dtype=F64)
    field = fm(GaussianMixture(w0, mu, P), noise=GaussianMixture(w1, nu, R), schedule="cosine")
    for t in (0.01, 0.3, 0.7, 1.0):
        ref = dense_reference(schedule("cosine"), t, w0, mu, P, w1, nu, R, z)
        assert max_rel(field.velocity(t, z), ref) < 1e-12, t

    q = torch.tensor([0.25, 0.25, 0.5], dtype=F64)
    y = torch.randn(3, d, generator=g, dtype=F64)
    p, m = torch.tensor([0.6, 0.4], dtype=F64), torch.randn(2, d, generator=g, dtype=F64)
    P2 = spd(2)
    swapped = fm(GaussianMixture(p, m, P2), noise=Empirical(y, q), schedule="overshoot")
    assert swapped.time_range == (0.0, 0.999)  # a = 0 at t = ½ and 1 is singular for atomic noise
    for t in (0.0, 0.3, 0.7, 0.99):
        ref = dense_reference(schedule("overshoot"), t, p, m, P2, q, y, torch.zeros(3, d, d, dtype=F64), z)
        assert max_rel(swapped.velocity(t, z), ref) < 1e-12, t
    with pytest.raises(TimeRangeError, match="singular at t = 0.5: a = 0"):
        swapped.velocity(0.5, z)


def continuity_residual(field, t, z, velocity=None, h=1e-5):
    """Relative residual of ∂ₜlog pₜ + div v + v·∇log pₜ = 0 (the continuity equation divided by
    pₜ), with pₜ the exact law of Zₜ (marginal(t)), ∂ₜ by central differences, div by autograd."""
    def logp(s):
        return field.marginal(s).log_density(z)

    dt_logp = (logp(t + h) - logp(t - h)) / (2 * h)
    zz = z.clone().requires_grad_(True)
    v = (velocity or (lambda tt, x: field.velocity(tt, x[None])[0]))(t, zz)
    div = sum(torch.autograd.grad(v[:, k].sum(), zz, retain_graph=True)[0][:, k] for k in range(z.shape[1]))
    transport = (v.detach() * field.marginal(t).score(z)).sum(-1)
    residual = dt_logp + div.detach() + transport
    scale = dt_logp.abs() + div.detach().abs() + transport.abs()
    return float((residual.abs() / scale).max())


@pytest.mark.parametrize("name", sorted(INTERIOR))
def test_field_solves_the_continuity_equation(name):
    """(αₜ, vₜ) solves the continuity equation (MATH.md §1): a check of eq. (1.1) itself, independent
    of how the posterior is computed (the autograd path of the field is exercised here)."""
    z = 2 * torch.randn(200, 2, generator=gen(4), dtype=F64)
    field = fm(schedule=name)
    for t in INTERIOR[name][1:]:
        # Central difference with h = 10⁻⁵: h²·|∂³log p|/6 + ε|log p|/h ≈ 10⁻¹⁰ relative to the terms.
        assert continuity_residual(field, t, z) < 1e-7, (name, t)


def test_survey_formula_of_the_survey_is_corrected():
    """MATH.md §14.1: in the survey convention (noise N(0, I) at t = 0, data N(0, 4) at t = 1) the
    field is (x + (1 − t)∇log αₜ)/t; [S] Prop. 3.3 as printed, x/(1 − t) + t/(1 − t)∇log αₜ, fails
    the continuity equation."""
    field = fm(Gaussian(torch.zeros(1, dtype=F64), 4 * torch.eye(1, dtype=F64)), convention="survey")
    z = torch.linspace(-3, 3, 25, dtype=F64)[:, None]
    for t in (0.1, 0.25, 0.6, 0.9):
        x = z[None]
        s = field.score(t, x)
        corrected = (x + (1 - t) * s) / t
        via_denoiser = (field.posterior_mean(t, x) - x) / (1 - t)
        v = field.velocity(t, x)
        assert max_rel(corrected, v) < 1e-13 and max_rel(via_denoiser, v) < 1e-13
        assert continuity_residual(field, t, z) < 1e-7

        def printed(tt, xx, t=t):
            return xx / (1 - tt) + tt / (1 - tt) * field.marginal(tt).score(xx)

        # (residual relative to the sum of the terms' sizes: 0.11 at t = 0.6, more elsewhere)
        assert continuity_residual(field, t, z, velocity=printed) > 0.05


# -- Gaussian endpoints ------------------------------------------------------------------------------------------


def gaussian_field(**params):
    m0 = torch.tensor([1.0, -0.5], dtype=F64)
    m1 = torch.tensor([-0.5, 1.0], dtype=F64)
    return fm(Gaussian(m0, SIGMA0), noise=Gaussian(m1, SIGMA1), **params)


def rk4_particles(field, x, h, t1=1.0):
    integrator = measureflow.integrator("rk4")
    state = Particles(x)
    n = round(t1 / h)
    frames = {}
    for k in range(n):
        state = integrator.advance(field, state, k * h, (k + 1) * h)
        frames[round((k + 1) * h, 12)] = state
    return frames


def test_particles_follow_the_affine_flow_of_their_own_moments():
    """MATH.md §1.4 (a). The field is affine, so particles move by x ↦ mₜ + Tₜ(x − m₀) and the
    sample's moments follow the exact flow of the sample moments (no sampling error): compare with
    solution(t, N(m̂₀, Σ̂₀), 0). The remaining error is RK4's, checked to be 4th order."""
    field = gaussian_field()
    x = Gaussian(torch.tensor([1.0, -0.5], dtype=F64), SIGMA0).sample(2000, gen(5))[None]
    start = Particles(x)
    moments = Gaussians(start.mean(), start.covariance())
    errors = {}
    for h in (0.01, 0.02):
        frames = rk4_particles(field, x, h)
        worst = 0.0
        for t in (0.5, 1.0):
            exact = field.solution(t, moments, t0=0.0)
            got = frames[t]
            worst = max(worst, float((got.covariance() - exact.cov).abs().max()),
                        float((got.mean() - exact.mean).abs().max()))
        errors[h] = worst
    # MATH-CHECKS: 5·10⁻¹⁰ at h = 0.01 (N = 10⁵); halving h must divide the error by ≈ 2⁴.
    assert errors[0.01] < 2e-9
    assert 8 < errors[0.02] / errors[0.01] < 32
    # And the population statement: Σₜ = (1 − t)²Σ₀ + t²Σ₁ for the linear schedule.
    for t in (0.0, 0.3, 1.0):
        assert torch.allclose(field.path(t).cov[0], (1 - t) ** 2 * SIGMA0 + t * t * SIGMA1, rtol=0, atol=1e-15)


def test_gaussian_state_through_affine_matches_the_closed_form_path():
    field = gaussian_field(schedule="cosine")
    integrator = measureflow.integrator("rk4")
    errors = {}
    for h in (0.01, 0.02):
        state = field.path(0.0)
        n = round(1 / h)
        for k in range(n):
            state = integrator.advance(field, state, k * h, (k + 1) * h)
        exact = field.path(1.0)
        errors[h] = max(float((state.cov - exact.cov).abs().max()), float((state.mean - exact.mean).abs().max()))
    # RK4 on ṁ = b, Σ̇ = AΣ + ΣAᵀ: 4th order (ratio ≈ 16), a few 10⁻⁹ at h = 0.01.
    assert errors[0.01] < 1e-8
    assert 8 < errors[0.02] / errors[0.01] < 32


def test_affine_is_the_exact_field_and_its_symmetry():
    field = gaussian_field()
    state = Gaussians(torch.tensor([[0.3, 0.1]], dtype=F64), torch.tensor([[[1.5, 0.2], [0.2, 0.7]]], dtype=F64))
    z = torch.randn(1, 50, 2, generator=gen(6), dtype=F64)
    for t in (0.0, 0.4, 1.0):
        b, A = field.affine(t, state)
        affine_v = b[:, None, :] + (z - state.mean[:, None, :]) @ A.transpose(-1, -2)
        assert max_rel(affine_v, field.velocity(t, z)) < 1e-13
    # eq. (1.5): A_t = (t Σ₁ − (1 − t) Σ₀) Σₜ⁻¹ for the linear schedule; non-symmetric here.
    t = 0.4
    _, A = field.affine(t, state)
    St = (1 - t) ** 2 * SIGMA0 + t * t * SIGMA1
    assert torch.allclose(A[0], (t * SIGMA1 - (1 - t) * SIGMA0) @ torch.linalg.inv(St), rtol=0, atol=1e-14)
    assert float((A[0] - A[0].T).abs().max()) > 0.1
    # noise σ²I, or commuting covariances: symmetric.
    noise = fm(Gaussian(torch.zeros(2, dtype=F64), SIGMA1), sigma=0.7)
    _, A = noise.affine(t, state)
    assert float((A[0] - A[0].T).abs().max()) < 1e-15
    commuting = fm(Gaussian(torch.zeros(2, dtype=F64), SIGMA0), noise=Gaussian(torch.zeros(2, dtype=F64), torch.diag(torch.tensor([0.3, 4.0], dtype=F64))))
    _, A = commuting.affine(t, state)
    assert float((A[0] - A[0].T).abs().max()) < 1e-15


def test_terminal_map_reference_numbers():
    """MATH.md §1.5: T^FM and its transport cost 0.817144 (vs W₂² = 0.651957 for Brenier)."""
    field = fm(Gaussian(torch.zeros(2, dtype=F64), SIGMA0), noise=Gaussian(torch.zeros(2, dtype=F64), SIGMA1))
    T, c = field.flow_map(1.0, 0.0)
    ref = torch.tensor([[0.59534, 0.76306], [0.19076, 1.50148]], dtype=F64)
    assert float((T - ref).abs().max()) < 5e-6  # the reference is printed to 5 decimals
    assert float(c.abs().max()) == 0.0
    eye = torch.eye(2, dtype=F64)
    cost = float(torch.trace((T - eye) @ SIGMA0 @ (T - eye).T))
    assert cost == pytest.approx(0.817144, abs=5e-7)
    assert torch.allclose(T @ SIGMA0 @ T.T, SIGMA1, rtol=0, atol=1e-14)
    # The terminal map does not depend on the scalar schedule (MATH-CHECKS: 10⁻¹²).
    for name in ("cosine", "overshoot"):
        other = fm(Gaussian(torch.zeros(2, dtype=F64), SIGMA0), noise=Gaussian(torch.zeros(2, dtype=F64), SIGMA1), schedule=name)
        assert torch.allclose(other.flow_map(1.0, 0.0)[0], T, rtol=0, atol=1e-13)
    # Commuting covariances: diag √(λ₁/λ₀), the Brenier map.
    commuting = fm(Gaussian(torch.zeros(2, dtype=F64), SIGMA0), noise=Gaussian(torch.zeros(2, dtype=F64), torch.diag(torch.tensor([0.3, 4.0], dtype=F64))))
    T, _ = commuting.flow_map(1.0, 0.0)
    assert torch.allclose(T, torch.diag(torch.tensor([math.sqrt(0.3 / 2), math.sqrt(4.0 / 0.5)], dtype=F64)), rtol=0, atol=1e-14)


# -- the three-Dirac reverse flow ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, exact_rms", [("linear", 1.414e-3), ("cosine", 2.221e-3), ("overshoot", 1.414e-3), ("vp", 0.0632)])
def test_three_dirac_reverse_flow(name, exact_rms):
    """MATH.md §1.6: from N(0, I) at t = 1 (τ_max = 12) back to t_min = 10⁻³ on a geometric grid
    with RK4, particles land in N(a c_j, b² I) with masses w_j; RMS distance to the nearest scaled
    atom = b_{t_min}√2."""
    field = fm(schedule=name)
    n = 2000
    x = torch.randn(1, n, 2, generator=gen(7), dtype=F64)
    # 200 steps: Δt/t = 0.035 (vp: Δτ/τ = 0.047); positions then agree with a 400-step run to
    # ~10⁻⁵·b, far below the Monte-Carlo tolerances below (checked in the next test).
    out = field.generate(x, steps=200)
    a, _, b, _ = field.coefficients(field.t_min)
    assert b * math.sqrt(2) == pytest.approx(exact_rms, rel=5e-4)
    dist, label = torch.cdist(out.x[0], a * ATOMS).min(1)
    fractions = torch.bincount(label, minlength=3).to(F64) / n
    binomial = (MASSES * (1 - MASSES) / n).sqrt()
    assert bool(((fractions - MASSES).abs() < 3 * binomial).all()), fractions
    # |z − a c_j|² / b² ~ χ²₂ for the exact law: the sample RMS has relative MC error 1/(2√n) = 1.1 %;
    # 4 of those.
    rms = float(dist.pow(2).mean().sqrt())
    assert rms == pytest.approx(b * math.sqrt(2), rel=4 / (2 * math.sqrt(n)))
    # The final denoising jump lands on the atoms themselves.
    landed = field.denoise(field.t_min, out)
    assert torch.allclose(landed.x[0], ATOMS[label], rtol=0, atol=1e-12)


def test_reverse_flow_is_converged_on_the_geometric_grid():
    field = fm(schedule="linear")
    x = torch.randn(1, 300, 2, generator=gen(8), dtype=F64)
    coarse = field.generate(x, steps=200).x
    fine = field.generate(x, steps=400).x
    b = field.coefficients(field.t_min)[2]
    assert float((coarse - fine).abs().max()) < 1e-3 * b


def test_trajectories_in_scaled_coordinates_do_not_depend_on_the_schedule():
    """For N(0, σ²I) noise, u = z/b obeys du/dρ = x̂(u, ρ) with ρ = a/b (derived from eq. 1.3), so two
    schedules agree at equal ρ: linear at t = 10⁻³ (ρ = 999) and vp at τ = ½·log(1 + 1/999²)."""
    x = torch.randn(1, 300, 2, generator=gen(9), dtype=F64)
    linear = fm(schedule="linear")
    tau = 0.5 * math.log1p(1 / 999**2)
    vp = fm(schedule="vp", t_min=tau, t_max=12.0)
    u_lin = linear.generate(x, steps=300).x / linear.coefficients(linear.t_min)[2]
    a12, _, b12, _ = vp.coefficients(12.0)
    # vp starts at ρ = a/b = e^{−12}/b ≈ 6·10⁻⁶, not 0: start it from the linear flow at that ρ.
    t_start = 1 / (1 + a12 / b12)
    start = linear.generate(x, times=linear.generation_times(1, "uniform")[:1] + [t_start], integrator="rk4")
    start = start.with_positions(start.x / t_start * b12)
    u_vp = vp.generate(start, steps=300).x / vp.coefficients(tau)[2]
    # Both are RK4 solutions of one ODE in (u, ρ); each is converged to ~10⁻⁵ (previous test).
    assert float((u_lin - u_vp).abs().max()) < 1e-3


# -- conventions ---------------------------------------------------------------------------------------------


def test_survey_convention_runs_the_same_trajectories_with_time_reversed():
    noising = fm(schedule="cosine")
    survey = fm(schedule="cosine", convention="survey")
    assert survey.time_range == pytest.approx((0.0, 1 - noising.t_min))
    times = noising.generation_times(60)
    survey_times = survey.generation_times(60)
    assert survey_times == pytest.approx([1 - t for t in times], abs=1e-15)
    x = torch.randn(1, 500, 2, generator=gen(10), dtype=F64)
    rk4 = measureflow.integrator("rk4")
    a, b = Particles(x), Particles(x)
    for k in range(60):
        a = rk4.advance(noising, a, times[k], times[k + 1])
        b = rk4.advance(survey, b, survey_times[k], survey_times[k + 1])
        # s = 1 − t rounds differently from t: coefficients differ by ~ε, trajectories by ~ε·Lip·T.
        assert max_rel(b.x, a.x) < 1e-10
    z = torch.randn(1, 20, 2, generator=gen(11), dtype=F64)
    for t in (0.2, 0.7):
        # 1 − (1 − t) is t up to one rounding
        assert max_rel(survey.velocity(1 - t, z), -noising.velocity(t, z)) < 1e-13
    with pytest.raises(ParameterError, match="survey"):
        fm(schedule="vp", convention="survey")


def test_reparametrisation_identity():
    """vₜ = λ'(t)·v_{λ(t)} for a monotone time change of the linear bridge (MATH.md §1.3), and
    cosine = vp after τ = −log cos(πt/2): vₜ = (π/2)tan(πt/2)·v_τ."""
    lam = lambda t: 0.5 * (1 - torch.cos(math.pi * t))  # noqa: E731
    reparam = fm(schedule={"name": "reparametrised", "base": "linear", "lam": lam})
    linear = fm(schedule="linear")
    cosine, vp = fm(schedule="cosine"), fm(schedule="vp")
    z = 2 * torch.randn(1, 200, 2, generator=gen(12), dtype=F64)
    for t in (0.1, 0.4, 0.8):
        s = 0.5 * (1 - math.cos(math.pi * t))
        expected = 0.5 * math.pi * math.sin(math.pi * t) * linear.velocity(s, z)
        assert max_rel(reparam.velocity(t, z), expected) < 1e-13
        tau = -math.log(math.cos(HALF_PI * t))
        # log/exp round trips put ~10⁻¹⁵·|log cos| relative error on a and b.
        assert max_rel(cosine.velocity(t, z), HALF_PI * math.tan(HALF_PI * t) * vp.velocity(tau, z)) < 1e-12


# -- time ranges and errors -------------------------------------------------------------------------------------


def test_singular_data_end_is_refused_with_the_safe_range():
    field = fm(schedule="linear")
    assert field.time_range == (1e-3, 1.0)
    z = torch.zeros(1, 3, 2, dtype=F64)
    with pytest.raises(TimeRangeError, match=r"singular at t = 0: b = 0.*defined for t in \[0.001, 1\]"):
        field.velocity(0.0, z)
    with pytest.raises(ParameterError, match=r"t_min = 0 is a singular time.*t_min=0.001"):
        fm(schedule="linear", t_min=0.0)
    survey = fm(schedule="linear", convention="survey")
    with pytest.raises(TimeRangeError, match=r"\[0, 0.999\]"):
        survey.velocity(1.0, z)
    vp = fm(schedule="vp")
    assert vp.time_range == (1e-3, 12.0)
    with pytest.raises(TimeRangeError, match=r"\[0.001, 12\]"):
        vp.velocity(20.0, z)
    # Regular data ends: Gaussian data, or Lipman's smoothed end b₀ = σ_min.
    assert fm(Gaussian(torch.zeros(2, dtype=F64), SIGMA0)).time_range == (0.0, 1.0)
    lipman = fm(schedule={"name": "lipman", "sigma_min": 0.01})
    assert lipman.time_range == (0.0, 1.0)
    assert bool(torch.isfinite(lipman.velocity(0.0, z)).all())
    # The score form is 0/0 where a = 0.
    score = fm(schedule="overshoot", form="score")
    with pytest.raises(TimeRangeError, match="score form"):
        score.velocity(0.5, z)
    # Simulation refuses a singular end at assembly.
    with pytest.raises(TimeRangeError):
        measureflow.Simulation(Particles(z), field, "rk4", t0=1.0, t1=0.0, steps=10)


def test_simulation_runs_generation_backwards():
    field = fm(schedule="linear")
    x = torch.randn(1, 200, 2, generator=gen(13), dtype=F64)
    result = measureflow.Simulation(Particles(x), field, "rk4", t0=1.0, t1=0.05, steps=40).run()
    assert result.ok
    a, _, b, _ = field.coefficients(0.05)
    dist = torch.cdist(result.state.x[0], a * ATOMS).min(1).values
    assert float(dist.max()) < 10 * b


def test_bad_parameters_are_named():
    z = torch.zeros(3, 2, dtype=F64)
    with pytest.raises(ParameterError, match="pair_particles"):
        fm(noise=Empirical(ATOMS))
    with pytest.raises(ParameterError, match="sigma must be positive"):
        fm(sigma=0.0)
    with pytest.raises(ParameterError, match="either sigma"):
        fm(sigma=1.0, noise=Gaussian(torch.zeros(2, dtype=F64), SIGMA1))
    with pytest.raises(ParameterError, match="form='score' is eq. \\(1.4\\)"):
        fm(noise=Gaussian(torch.zeros(2, dtype=F64), SIGMA1), form="score")
    with pytest.raises(ParameterError, match="convention"):
        fm(convention="generation")
    with pytest.raises(ParameterError, match="GaussianMixture, Gaussian or Empirical"):
        fm(data=ATOMS)
    with pytest.raises(ShapeError, match="d = 2"):
        fm().velocity(0.5, torch.zeros(3, 3, dtype=F64))
    with pytest.raises(ShapeError, match="noise has d = 3"):
        fm(noise=Gaussian(torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64)))
    assert fm().velocity(0.5, z).shape == (3, 2)


def test_capabilities_and_registry():
    registry = measureflow.get_registry()
    assert {"flow_matching", "pair_interpolation"} <= set(registry.names("fields"))
    assert "affine" not in fm().capabilities
    assert "affine" in gaussian_field().capabilities
    # A single Dirac against N(0, σ²I) is affine too: A = (b'/b) I.
    dirac = fm(GaussianMixture.diracs(ATOMS[:1]))
    _, A = dirac.affine(0.5, Gaussians(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64)))
    assert torch.allclose(A[0], 2.0 * torch.eye(2, dtype=F64), rtol=0, atol=1e-15)
    with pytest.raises(CapabilityError, match="Gaussian closure"):
        measureflow.Simulation(Gaussians(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64)), fm(), "rk4",
                               t0=1.0, t1=0.5, steps=2)
    desc = fm(schedule="lipman").describe()
    assert desc["schedule"]["name"] == "lipman" and desc["data"]["atoms"] == 3


def test_marginal_is_the_noised_mixture():
    """MATH.md §1.4 (b): the three-Dirac law is exactly Σⱼ wⱼ N(aₜcⱼ, bₜ²σ²I)."""
    field = fm(schedule="overshoot", sigma=0.5)
    a, _, b, _ = field.coefficients(0.7)
    law = field.marginal(0.7)
    assert torch.allclose(law.means, a * ATOMS, rtol=0, atol=1e-15)
    assert torch.allclose(law.covs, (0.25 * b * b * torch.eye(2, dtype=F64)).expand(3, 2, 2), rtol=0, atol=1e-16)
    assert torch.allclose(law.weights, MASSES, rtol=0, atol=1e-15)
    z = torch.randn(1, 30, 2, generator=gen(14), dtype=F64)
    assert max_rel(field.score(0.7, z)[0], law.score(z[0])) < 1e-13


# -- empirical ↔ empirical ------------------------------------------------------------------------------------


def test_pair_particles_carry_their_pair():
    g = gen(15)
    x, y = torch.randn(4, 2, generator=g, dtype=F64), torch.randn(5, 2, generator=g, dtype=F64)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    q = torch.full((5,), 0.2, dtype=F64)
    pairs = pair_particles(x, p, y, q)
    assert pairs.size == 20
    assert torch.allclose(pairs.weights, (p[:, None] * q[None]).reshape(-1), rtol=0, atol=1e-16)
    field = pairs.field("cosine")
    state = pairs.interpolate(0.0, "cosine")
    rk4 = measureflow.integrator("rk4")
    for k in range(20):
        state = rk4.advance(field, state, k / 20, (k + 1) / 20)
        exact = pairs.interpolate((k + 1) / 20, "cosine")
        # ẋ = a'x0 + b'x1 integrated by RK4 (h = 0.05): local error h⁵·|(a, b)⁽⁵⁾| ≈ 3·10⁻⁶·(π/2)⁵/120.
        assert float((state.x - exact.x).abs().max()) < 1e-6
    assert torch.allclose(state.x[0], y[pairs.index1], rtol=0, atol=1e-6)
    assert torch.equal(state.weights, exact.weights)
    with pytest.raises(ShapeError, match="P = 20 pair particles"):
        field.velocity(0.5, torch.zeros(1, 7, 2, dtype=F64), None)


def test_pair_particles_with_a_plan_and_a_coupling_callable():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=F64)
    y = torch.tensor([[0.0, 1.0], [1.0, 1.0]], dtype=F64)
    plan = torch.tensor([[0.5, 0.0], [0.0, 0.5]], dtype=F64)
    pairs = pair_particles(x, None, y, None, coupling=plan)
    assert pairs.size == 2 and pairs.index0.tolist() == [0, 1] and pairs.index1.tolist() == [0, 1]
    state = pairs.interpolate(0.5)  # McCann's interpolation for the OT plan, linear schedule
    assert torch.allclose(state.x[0], torch.tensor([[0.0, 0.5], [1.0, 0.5]], dtype=F64))

    def reverse(a, b, generator=None, w0=None, w1=None):
        return a, b.flip(0)

    swapped = pair_particles(x, None, y, None, coupling=reverse)
    assert torch.equal(swapped.x1, y.flip(0))
    with pytest.raises(ShapeError, match=r"\(N, M\) = \(2, 2\)"):
        pair_particles(x, None, y, None, coupling=torch.ones(3, 2, dtype=F64) / 6)
