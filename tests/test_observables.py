"""Observables: moments, energy, W2 (Bures / exact OT), MMD², Sinkhorn divergence (measureflow.observables)."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import norm

from measureflow.errors import CapabilityError, ParameterError, ShapeError, StateError
from measureflow.fields import Field
from measureflow.measures import Empirical, Gaussian, GaussianMixture
from measureflow.observables import (
    OBSERVABLES,
    bures_w2,
    covariance,
    energy,
    gaussian_kernel_expectation,
    gaussian_sinkhorn_divergence,
    mean,
    measureflow_register_observables,
    mmd,
    sinkhorn,
    w2,
)
from measureflow.plugins import Registry
from measureflow.state import Gaussians, Particles

F64 = torch.float64
Z = 5.0  # Monte Carlo tolerance in standard errors (fixed seeds; < 1e-6 failure odds under a fresh seed)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def spd(d, seed, batch=()):
    a = torch.randn(*batch, d, d, generator=gen(seed), dtype=F64)
    return a @ a.transpose(-1, -2) + 0.3 * torch.eye(d, dtype=F64)


def weighted_particles(R, N, d, seed):
    x = torch.randn(R, N, d, generator=gen(seed), dtype=F64)
    w = torch.rand(R, N, generator=gen(seed + 1), dtype=F64) + 0.1
    return Particles(x, w / w.sum(1, keepdim=True))


def quantile_points(m, s, N):
    """Deterministic 1-D 'sample' x_i = m + s Φ⁻¹((i − ½)/N): no Monte Carlo noise."""
    z = torch.tensor(norm.ppf((np.arange(N) + 0.5) / N), dtype=F64)
    return (m + s * z)[:, None], z


# -- registration, moments, energy ----------------------------------------------------------------------------


def test_registered_names():
    registry = Registry()
    measureflow_register_observables(registry)
    assert registry.names("observables") == sorted(["mean", "covariance", "energy", "w2", "mmd", "sinkhorn"])
    assert registry.get("observables", "w2") is w2
    assert set(OBSERVABLES) == set(registry.names("observables"))


def test_moments_of_particles_and_gaussians():
    p = weighted_particles(3, 40, 2, seed=1)
    w, x = p.weights, p.x
    m = torch.einsum("rn,rnd->rd", w, x)
    c = torch.einsum("rn,rni,rnj->rij", w, x - m[:, None], x - m[:, None])
    torch.testing.assert_close(mean(p), m)
    torch.testing.assert_close(covariance(p), c)
    g = Gaussians(torch.zeros(4, 2, dtype=F64), spd(2, 2, (4,)))
    assert mean(g) is g.mean and covariance(g) is g.cov


class _Harmonic(Field):
    name = "harmonic"

    def velocity(self, t, x, state):
        return -x

    def energy(self, state):
        return 0.5 * (state.x**2).sum(-1).mean(-1)


def test_energy_calls_the_field_and_explains_failures():
    p = weighted_particles(2, 10, 2, seed=3)
    torch.testing.assert_close(energy(p, field=_Harmonic()), 0.5 * (p.x**2).sum(-1).mean(-1))
    with pytest.raises(ParameterError, match="needs the field"):
        energy(p)

    class NoEnergy(Field):
        name = "plain"

    with pytest.raises(CapabilityError, match="'plain'.*no energy"):
        energy(p, field=NoEnergy())


# -- W2 ---------------------------------------------------------------------------------------------------------


def test_bures_reference_value():
    # MATH.md §1.5 reference: W2² between N(0, diag(2, 0.5)) and N(0, [[1, .8], [.8, 1.2]]) = 0.651957
    # (printed to 6 digits, hence the 5e-7 tolerance).
    state = Gaussians(torch.zeros(2, dtype=F64), torch.diag(torch.tensor([2.0, 0.5], dtype=F64)))
    target = Gaussian(torch.zeros(2, dtype=F64), torch.tensor([[1.0, 0.8], [0.8, 1.2]], dtype=F64))
    assert abs(float(w2(state, target=target)) - 0.651957) < 5e-7


def test_bures_commuting_closed_form_batched():
    # Commuting covariances Σ₁ = U D₁ Uᵀ, Σ₂ = U D₂ Uᵀ: W2² = |Δm|² + Σₖ (√λ₁ₖ − √λ₂ₖ)² exactly.
    R, d = 5, 3
    u, _ = torch.linalg.qr(torch.randn(R, d, d, generator=gen(4), dtype=F64))
    l1 = torch.rand(R, d, generator=gen(5), dtype=F64) * 3 + 0.1
    l2 = torch.rand(R, d, generator=gen(6), dtype=F64) * 3 + 0.1
    s1, s2 = u @ torch.diag_embed(l1) @ u.transpose(-1, -2), u @ torch.diag_embed(l2) @ u.transpose(-1, -2)
    m1, m2 = torch.randn(R, d, generator=gen(7), dtype=F64), torch.randn(R, d, generator=gen(8), dtype=F64)
    expected = ((m1 - m2) ** 2).sum(-1) + ((l1.sqrt() - l2.sqrt()) ** 2).sum(-1)
    got = w2(Gaussians(m1, s1), target=Gaussians(m2, s2))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)  # eigh in float64: rounding only


def test_bures_batched_symmetric_and_zero_on_the_diagonal():
    R, d = 4, 3
    s1, s2 = spd(d, 9, (R,)), spd(d, 10, (R,))
    m1, m2 = torch.randn(R, d, dtype=F64), torch.randn(R, d, dtype=F64)
    batched = bures_w2(m1, s1, m2, s2)
    for r in range(R):
        torch.testing.assert_close(batched[r], bures_w2(m1[r], s1[r], m2[r], s2[r]))
    torch.testing.assert_close(batched, bures_w2(m2, s2, m1, s1), rtol=1e-10, atol=1e-10)
    assert bures_w2(m1, s1, m1, s1).abs().max() < 1e-10
    # one shared target for R replicas
    target = Gaussian(m2[0], s2[0])
    got = w2(Gaussians(m1, s1), target=target)
    torch.testing.assert_close(got, bures_w2(m1, s1, m2[:1], s2[:1]))


def test_exact_w2_on_particles_matches_1d_gaussian_formula():
    # In 1-D the monotone coupling is optimal, so between the quantile clouds of N(m₁, s₁²) and
    # N(m₂, s₂²) (same N) W2² = mean_i(Δm + Δs zᵢ)² exactly; Bures gives Δm² + Δs², and the two differ by
    # Δs²(mean z² − 1) (mean z = 0 by symmetry) — the quantile discretisation error, known here exactly.
    N, (m1, s1), (m2, s2) = 500, (0.3, 1.5), (-0.4, 0.7)
    x, z = quantile_points(m1, s1, N)
    y, _ = quantile_points(m2, s2, N)
    got = float(w2(Particles(x), target=Empirical(y)))
    exact_discrete = float(((m1 - m2) + (s1 - s2) * z).pow(2).mean())
    assert abs(got - exact_discrete) < 1e-12
    bures = float(bures_w2(*(torch.tensor(v, dtype=F64) for v in ([m1], [[s1**2]], [m2], [[s2**2]]))))
    assert abs(bures - ((m1 - m2) ** 2 + (s1 - s2) ** 2)) < 1e-14
    assert abs(got - bures) <= (s1 - s2) ** 2 * abs(float(z.pow(2).mean()) - 1) + 1e-12


def w2_1d_quantiles(x, a, y, b):
    """Independent 1-D W2² of weighted measures: ∫₀¹ (F⁻¹(u) − G⁻¹(u))² du over the merged breakpoints."""
    ix, iy = np.argsort(x), np.argsort(y)
    x, a, y, b = x[ix], a[ix], y[iy], b[iy]
    cuts = np.unique(np.concatenate([[0.0], np.cumsum(a), np.cumsum(b)]).clip(0, 1))
    mid = 0.5 * (cuts[1:] + cuts[:-1])
    qx = x[np.minimum(np.searchsorted(np.cumsum(a), mid), len(x) - 1)]
    qy = y[np.minimum(np.searchsorted(np.cumsum(b), mid), len(y) - 1)]
    return float(np.sum(np.diff(cuts) * (qx - qy) ** 2))


def test_exact_w2_weighted_particles_batched_against_1d_quantile_formula():
    p = weighted_particles(3, 70, 1, seed=11)
    y = torch.randn(55, 1, generator=gen(12), dtype=F64) * 2 + 1
    q = torch.rand(55, generator=gen(13), dtype=F64) + 0.2
    target = Empirical(y, q / q.sum())
    got = w2(p, target=target)
    assert got.shape == (3,)
    for r in range(3):
        ref = w2_1d_quantiles(p.x[r, :, 0].numpy(), p.weights[r].numpy(), y[:, 0].numpy(), target.weights.numpy())
        assert abs(float(got[r]) - ref) < 1e-10  # both exact; rounding only


def test_w2_particles_vs_analytic_target_uses_a_fixed_seed_sample():
    target = Gaussian(torch.tensor([1.0, -1.0], dtype=F64), spd(2, 14))
    state = target.particles(300, gen(7))
    # the documented rule: the target is replaced by target.sample(N, Generator().manual_seed(seed))
    assert float(w2(state, target=target, seed=7)) < 1e-12
    other = float(w2(state, target=target, seed=8))
    assert other > 0
    assert float(w2(state, target=target, seed=8)) == other  # the same sample at every call


def test_w2_refuses_large_problems_with_guidance():
    p = weighted_particles(1, 50, 2, seed=1)
    with pytest.raises(ParameterError, match=r"N·M = 50·40 = 2000 exceeds max_pairs = 1000.*'sinkhorn'"):
        w2(p, target=torch.zeros(40, 2, dtype=F64), max_pairs=1000)


def test_target_errors():
    p = weighted_particles(3, 10, 2, seed=1)
    with pytest.raises(ParameterError, match="needs a target"):
        w2(p)
    with pytest.raises(ShapeError, match="dimension 3 but the state has 2"):
        mmd(p, target=torch.zeros(5, 3, dtype=F64))
    with pytest.raises(ShapeError, match="2 replicas but the state has 3"):
        mmd(p, target=torch.zeros(2, 5, 2, dtype=F64))
    with pytest.raises(StateError, match="cannot use a str as the target"):
        sinkhorn(p, target="gamma")
    with pytest.raises(ParameterError, match="unknown kernel 'rbf'; choose one of gaussian, laplace, energy"):
        mmd(p, target=p, kernel="rbf")


# -- MMD --------------------------------------------------------------------------------------------------------


def dense_mmd(x, a, y, b, kernel, ell):
    def k(u, v):
        r = torch.cdist(u, v, compute_mode="donot_use_mm_for_euclid_dist")
        return {"gaussian": torch.exp(-(r**2) / (2 * ell**2)), "laplace": torch.exp(-r / ell), "energy": -r}[kernel]

    return a @ k(x, x) @ a - 2 * a @ k(x, y) @ b + b @ k(y, y) @ b


@pytest.mark.parametrize("kernel", ["gaussian", "laplace", "energy"])
def test_mmd_particles_matches_dense_formula(kernel):
    # N, M above the block size so that the blocked sums really run over several blocks.
    p = weighted_particles(3, 1100, 2, seed=20)
    y = torch.randn(900, 2, generator=gen(21), dtype=F64) + 0.5
    q = torch.rand(900, generator=gen(22), dtype=F64)
    target = Empirical(y, q / q.sum())
    got = mmd(p, target=target, kernel=kernel, bandwidth=0.8)
    assert got.shape == (3,)
    for r in range(3):
        ref = dense_mmd(p.x[r], p.weights[r], y, target.weights, kernel, 0.8)
        # float64 sums of ~10⁶ O(1) terms in different orders: rounding ~1e-13.
        assert abs(float(got[r]) - float(ref)) < 1e-11
    # one target per replica
    per_replica = mmd(p, target=Particles(y.expand(3, -1, -1), target.weights.expand(3, -1)), kernel=kernel,
                      bandwidth=0.8)
    torch.testing.assert_close(per_replica, got, rtol=1e-12, atol=1e-12)


def test_gaussian_kernel_expectation_vs_monte_carlo():
    # E k(X, Y) against the mean of k(Xᵢ, Yᵢ) over independent pairs; tolerance Z standard errors.
    d, ell, n = 3, 1.3, 400_000
    m1, m2 = torch.tensor([0.2, -0.5, 1.0], dtype=F64), torch.tensor([1.0, 0.3, 0.0], dtype=F64)
    s1, s2 = spd(d, 30), 0.5 * spd(d, 31)
    x = Gaussian(m1, s1).sample(n, gen(32))
    y = Gaussian(m2, s2).sample(n, gen(33))
    kv = torch.exp(-((x - y) ** 2).sum(-1) / (2 * ell**2))
    exact = float(gaussian_kernel_expectation(m1, s1, m2, s2, ell))
    assert abs(float(kv.mean()) - exact) <= Z * float(kv.std()) / n**0.5


def test_gaussian_gaussian_mmd_closed_form_vs_monte_carlo():
    # Unbiased estimator over independent quadruples: h = k(X,X') + k(Y,Y') − k(X,Y') − k(X',Y), E h = MMD².
    d, ell, n = 2, 1.0, 400_000
    a = Gaussian(torch.tensor([0.0, 0.5], dtype=F64), spd(d, 40))
    b = Gaussian(torch.tensor([0.8, -0.2], dtype=F64), 0.7 * spd(d, 41))
    x, x2 = a.sample(n, gen(42)), a.sample(n, gen(43))
    y, y2 = b.sample(n, gen(44)), b.sample(n, gen(45))

    def k(u, v):
        return torch.exp(-((u - v) ** 2).sum(-1) / (2 * ell**2))

    h = k(x, x2) + k(y, y2) - k(x, y2) - k(x2, y)
    exact = float(mmd(a.as_state(), target=b, bandwidth=ell))
    assert abs(float(h.mean()) - exact) <= Z * float(h.std()) / n**0.5
    assert abs(float(mmd(a.as_state(), target=a, bandwidth=ell))) < 1e-14


def test_mmd_against_a_dirac_mixture_equals_the_empirical_target():
    # The mixture path (closed form with Σ = 0) and the point-cloud path must agree exactly.
    p = weighted_particles(2, 80, 2, seed=50)
    y = torch.randn(30, 2, generator=gen(51), dtype=F64)
    got_mix = mmd(p, target=GaussianMixture.diracs(y), bandwidth=0.7)
    got_cloud = mmd(p, target=Empirical(y), bandwidth=0.7)
    torch.testing.assert_close(got_mix, got_cloud, rtol=1e-12, atol=1e-12)


def test_mmd_particles_vs_gaussian_target_is_exact():
    # No sampling: MMD² = wᵀK_xx w − 2 Σᵢ wᵢ E_Y k(xᵢ, Y) + E k(Y, Y'), each term assembled by hand here.
    p = weighted_particles(1, 50, 2, seed=60)
    target = Gaussian(torch.tensor([0.5, 0.0], dtype=F64), spd(2, 61))
    ell = 0.9
    x, w = p.x[0], p.weights[0]
    cross = sum(
        float(w[i]) * float(gaussian_kernel_expectation(x[i], None, target.mean(), target.cov, ell))
        for i in range(50)
    )
    self_t = float(gaussian_kernel_expectation(target.mean(), target.cov, target.mean(), target.cov, ell))
    self_p = float(w @ torch.exp(-torch.cdist(x, x) ** 2 / (2 * ell**2)) @ w)
    expected = self_p - 2 * cross + self_t
    assert abs(float(mmd(p, target=target, bandwidth=ell)) - expected) < 1e-12


# -- Sinkhorn divergence ----------------------------------------------------------------------------------------


def entropic_ot_reference(x, a, y, b, eps, iters=5000):
    """Independent OT_ε (KL to a⊗b, cost |x − y|²): log-domain Sinkhorn in numpy, dual value ⟨f,a⟩ + ⟨g,b⟩.

    After the f-update the plan has mass exactly one, so the dual objective reduces to ⟨f,a⟩ + ⟨g,b⟩.
    """
    c = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    f, g = np.zeros(len(a)), np.zeros(len(b))
    la, lb = np.log(a), np.log(b)
    for _ in range(iters):
        g = -eps * logsumexp(la[:, None] + (f[:, None] - c) / eps, axis=0)
        f = -eps * logsumexp(lb[None, :] + (g[None, :] - c) / eps, axis=1)
    return float(f @ a + g @ b)


def test_sinkhorn_divergence_matches_independent_computation_batched():
    eps = 0.5
    p = weighted_particles(2, 60, 2, seed=70)
    y = torch.randn(45, 2, generator=gen(71), dtype=F64) * 1.3 + 0.4
    q = torch.rand(45, generator=gen(72), dtype=F64) + 0.1
    target = Empirical(y, q / q.sum())
    got = sinkhorn(p, target=target, epsilon=eps)
    assert got.shape == (2,)
    yn, qn = y.numpy(), target.weights.numpy()
    for r in range(2):
        xn, an = p.x[r].numpy(), p.weights[r].numpy()
        ref = (entropic_ot_reference(xn, an, yn, qn, eps)
               - 0.5 * entropic_ot_reference(xn, an, xn, an, eps)
               - 0.5 * entropic_ot_reference(yn, qn, yn, qn, eps))
        # POT stops at marginal error 1e-9; the value error is of that order times the cost scale.
        assert abs(float(got[r]) - ref) < 1e-7
        assert float(got[r]) > 0


def test_sinkhorn_divergence_matches_pot_plans_plus_kl():
    # POT's sinkhorn2 returns the transport term ⟨π, C⟩ only; adding ε·KL(π | a⊗b) of POT's own plan gives
    # OT_ε of MATH.md §0, and the debiased combination must equal the observable.
    eps = 0.8
    x = torch.randn(40, 2, generator=gen(80), dtype=F64)
    y = torch.randn(35, 2, generator=gen(81), dtype=F64) + 1.0
    a, b = np.full(40, 1 / 40), np.full(35, 1 / 35)

    def ot_eps(u, wu, v, wv):
        c = ot.dist(u, v)
        plan = ot.sinkhorn(wu, wv, c, eps, method="sinkhorn_log", stopThr=1e-13, numItermax=20000)
        linear = ot.sinkhorn2(wu, wv, c, eps, method="sinkhorn_log", stopThr=1e-13, numItermax=20000)
        return float(linear) + eps * float(np.sum(plan * np.log(plan / np.outer(wu, wv))))

    xn, yn = x.numpy(), y.numpy()
    ref = ot_eps(xn, a, yn, b) - 0.5 * ot_eps(xn, a, xn, a) - 0.5 * ot_eps(yn, b, yn, b)
    assert abs(float(sinkhorn(Particles(x), target=y, epsilon=eps)) - ref) < 1e-7


def test_sinkhorn_zero_for_identical_and_positive_otherwise():
    p = weighted_particles(3, 50, 2, seed=90)
    same = sinkhorn(p, target=Particles(p.x.clone(), p.weights.clone()), epsilon=0.3)
    assert same.abs().max() < 1e-12  # identical problems solved identically: rounding only
    shifted = sinkhorn(p, target=Particles(p.x + 0.2, p.weights), epsilon=0.3)
    assert (shifted > 0).all()
    # a translation by h changes S_ε by exactly |h|² (the plans are translation-equivariant)
    torch.testing.assert_close(shifted, torch.full((3,), 2 * 0.2**2, dtype=F64), rtol=1e-7, atol=1e-9)


def test_gaussian_sinkhorn_reference_and_limits():
    # MATH.md §7 reference: S₁(N(0, diag(4, ¼)), γ) = 1.2170010 (8 digits → 5e-8).
    s = Gaussians(torch.zeros(2, dtype=F64), torch.diag(torch.tensor([4.0, 0.25], dtype=F64)))
    gamma = Gaussian(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    assert abs(float(sinkhorn(s, target=gamma, epsilon=1.0)) - 1.2170010) < 5e-8
    assert abs(float(sinkhorn(gamma.as_state(), target=gamma, epsilon=1.0))) < 1e-14
    # ε → 0: S_ε → W2² (Bures) with an O(ε²) gap: shrinking ε tenfold shrinks the gap ~100-fold.
    m, a, b = torch.tensor([0.5, -1.0], dtype=F64), spd(2, 91), spd(2, 92)
    gaps = [float(gaussian_sinkhorn_divergence(m, a, torch.zeros(2, dtype=F64), b, e)
                  - bures_w2(m, a, torch.zeros(2, dtype=F64), b)) for e in (1e-2, 1e-3)]
    assert abs(gaps[1]) < 1e-5 and 50 < abs(gaps[0] / gaps[1]) < 200


def test_gaussian_sinkhorn_closed_form_vs_particles_1d():
    # Quantile clouds of two 1-D Gaussians: the POT path converges to the closed form at first order in
    # 1/N (discretisation error), so Richardson extrapolation 2·S(2N) − S(N) cancels the leading term;
    # the remainder is O(N⁻² log N) (observed 1.5e-5 at N = 400).
    eps, (m1, s1), (m2, s2) = 0.5, (0.3, 1.5), (-0.2, 0.7)
    closed = float(gaussian_sinkhorn_divergence(
        torch.tensor([m1]), torch.tensor([[s1**2]]), torch.tensor([m2]), torch.tensor([[s2**2]]), eps))
    vals = []
    for N in (400, 800):
        x, _ = quantile_points(m1, s1, N)
        y, _ = quantile_points(m2, s2, N)
        vals.append(float(sinkhorn(Particles(x), target=y, epsilon=eps)))
    err = [closed - v for v in vals]
    assert 1.8 < err[0] / err[1] < 2.2  # first-order convergence
    assert abs(2 * vals[1] - vals[0] - closed) < 5e-5


def test_sinkhorn_particles_vs_gaussian_target_is_batched_and_seeded():
    target = Gaussian(torch.zeros(2, dtype=F64), spd(2, 95))
    p = target.particles(80, gen(3), replicas=3)
    got = sinkhorn(p, target=target, epsilon=1.0, seed=3)
    # replica 0 was drawn with the same seed and size as the target sample: S = 0 there
    assert abs(float(got[0])) < 1e-12 and (got[1:] > 0).all()
    for r in (1, 2):
        single = sinkhorn(Particles(p.x[r:r + 1]), target=target, epsilon=1.0, seed=3)
        torch.testing.assert_close(single[0], got[r], rtol=1e-12, atol=1e-12)
