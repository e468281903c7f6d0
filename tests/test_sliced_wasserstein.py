"""The sliced-Wasserstein gradient flow (MATH.md §8, §13 row V(C)C + CV(C)): direction sets, 1-D quantile
maps, Gaussian closure and its closed form V(C), particles against the closure, energies and errors."""

import math

import pytest
import torch
from scipy import integrate, stats

import measureflow
from measureflow import CapabilityError, Gaussians, Particles, Simulation
from measureflow.errors import ParameterError, ShapeError, StateError
from measureflow.measures import Empirical, Gaussian
from measureflow_plugins.sliced_wasserstein import DirectionSet, SlicedWassersteinField, gamma_drift_matrix

from samples import MEAN_03, MEAN_B3, SIGMA_03, SIGMA_B3, relerr, whitened

D64 = torch.float64
C0 = torch.diag(torch.tensor([4.0, 0.25], dtype=D64))
GAMMA2 = Gaussian(torch.zeros(2, dtype=D64), torch.eye(2, dtype=D64))


def _spd(d, seed, low=0.4, high=2.5):
    generator = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=D64))[0]
    return Q @ torch.diag(torch.linspace(high, low, d, dtype=D64)) @ Q.T


def test_registered_under_its_name():
    registry = measureflow.get_registry()
    assert registry.owner_of("fields", "sliced_wasserstein") == "measureflow_plugins.sliced_wasserstein"
    field = registry.field("sliced_wasserstein", target=GAMMA2)
    assert {"affine", "energy"} <= field.capabilities
    assert field.describe()["directions"] == {"kind": "quadrature", "count": 64, "resample": "fixed", "seed": 0}


def test_direction_sets_integrate_theta_theta_exactly():
    """E θθᵀ = I/d and Σ ω = 1 for every quadrature (the mean equation b = (2/d)(m_β − m) needs it)."""
    for d, count in ((1, None), (2, 2), (2, 64), (3, 8), (3, 200)):
        theta, omega = DirectionSet(count=count).nodes(d)
        assert torch.allclose(theta.norm(dim=1), torch.ones(len(theta), dtype=D64), atol=1e-15)
        assert abs(float(omega.sum()) - 1) <= 1e-15
        assert torch.allclose(torch.einsum("l,li,lj->ij", omega, theta, theta), torch.eye(d, dtype=D64) / d, atol=1e-15)
    assert DirectionSet(count=200).nodes(3)[0].shape == (200, 3)  # 10 polar × 20 azimuthal nodes
    theta, omega = DirectionSet("random", 50, seed=3).nodes(5)
    assert theta.shape == (50, 5) and torch.allclose(theta.norm(dim=1), torch.ones(50, dtype=D64), atol=1e-15)


def test_closed_form_of_V():
    # MATH.md §8 reference (7 decimals).
    assert torch.allclose(torch.as_tensor(gamma_drift_matrix(C0)), torch.diag(torch.tensor([-0.3907278, 0.1740310], dtype=D64)), atol=1e-7)
    # Elliptic form vs the 1-D integral (MATH-CHECKS: 9.6e−14), non-diagonal C.
    C2 = _spd(2, 0)
    assert relerr(gamma_drift_matrix(C2, "elliptic"), gamma_drift_matrix(C2, "integral")) <= 1e-12
    # Isotropic: v = λ^{−1/2} − 1 (the elliptic quotient is 0/0 there; "auto" takes the integral).
    assert torch.allclose(torch.as_tensor(gamma_drift_matrix(4 * torch.eye(2, dtype=D64))), -0.5 * torch.eye(2, dtype=D64), atol=1e-13)
    # The field's quadrature closure toward γ is V(C), spectrally accurate (MATH-CHECKS: 9.5e−14 / 2.3e−14;
    # in d = 3 for eigenvalues 0.4 … 2.5: 1e−4, 1e−8, 2e−12, 2e−14 at 200, 800, 1800, 3200 directions).
    for d, count, C in ((2, 64, C0), (2, 64, C2), (3, 3200, _spd(3, 1))):
        field = SlicedWassersteinField(Gaussian(torch.zeros(d, dtype=D64), torch.eye(d, dtype=D64)), count=count)
        _, A = field.affine(0.0, Gaussians(torch.zeros(d, dtype=D64), C))
        assert relerr(A[0], gamma_drift_matrix(C)) <= 1e-12


def test_reference_trajectory_toward_gamma():
    field = SlicedWassersteinField(GAMMA2)
    start = Gaussians(torch.zeros(2, dtype=D64), C0)
    run = Simulation(start, field, "rk4", 0.0, 0.5, steps=100, progress=False, observers=["energy"], observe_every=5).run()
    # MATH.md §8 reference (7 decimals); RK4 at h = 0.005 is ~1e−11 off.
    assert torch.allclose(run.state.cov[0], torch.diag(torch.tensor([2.8480381, 0.3047682], dtype=D64)), atol=1e-7)
    energies = torch.as_tensor(run.observables["energy"].values).reshape(-1)
    assert bool((energies[1:] < energies[:-1]).all())


def test_general_target_closure_in_d3():
    field = SlicedWassersteinField(Gaussian(MEAN_B3, SIGMA_B3), count=1800)
    state = Gaussians(MEAN_03, SIGMA_03)
    b, A = field.affine(0.0, state)
    assert torch.allclose(b[0], 2 / 3 * (MEAN_B3 - MEAN_03), atol=1e-15)
    assert torch.equal(A, A.transpose(-1, -2))
    # A = 2E[(r_θ − 1)θθᵀ] written out, on a finer node set (1800 vs 3200 nodes agree to ~1e−12).
    theta, omega = DirectionSet(count=3200).nodes(3)
    r = torch.sqrt(torch.einsum("ld,de,le->l", theta, SIGMA_B3, theta) / torch.einsum("ld,de,le->l", theta, SIGMA_03, theta))
    brute = 2 * torch.einsum("l,li,lj->ij", omega * (r - 1), theta, theta)
    assert relerr(A[0], brute) <= 1e-10
    # Energy identity dF/dt = −|b|² − tr(AΣAᵀ) (MATH.md eq. 0.2), exact for the discrete direction set;
    # central difference along (ṁ, Σ̇) = (b, AΣ + ΣAᵀ), error O(h²).
    h = 1e-5
    rate = (b * b).sum() + torch.einsum("rij,rjk,rik->r", A, state.cov, A).sum()
    move = A @ state.cov + state.cov @ A.transpose(-1, -2)
    plus = field.energy(Gaussians(state.mean + h * b, state.cov + h * move))
    minus = field.energy(Gaussians(state.mean - h * b, state.cov - h * move))
    assert abs(float((plus - minus) / (2 * h)) + float(rate)) <= 1e-7 * float(rate)
    # Vanishes at the target.
    b, A = field.affine(0.0, Gaussians(MEAN_B3, SIGMA_B3))
    assert float(b.abs().max()) <= 1e-15 and float(A.abs().max()) <= 1e-14
    coarse = SlicedWassersteinField(Gaussian(MEAN_B3, SIGMA_B3), count=200)
    run = Simulation(state, coarse, "rk4", 0.0, 2.0, steps=40, progress=False, observers=["energy"], observe_every=4).run()
    energies = torch.as_tensor(run.observables["energy"].values).reshape(-1)
    assert bool((energies[1:] < energies[:-1]).all())


def _particles_vs_closure(field, x0, gaussian0, t1, steps):
    particles = Simulation(Particles(x0[None]), field, "rk4", 0.0, t1, steps=steps, progress=False,
                           observers=["covariance", "mean"], observe_every=1).run().observables
    closure = Simulation(gaussian0, field, "rk4", 0.0, t1, steps=steps, progress=False,
                         observers=["covariance", "mean"], observe_every=1).run().observables
    cov = [relerr(p[0], c[0]) for p, c in zip(particles["covariance"].values, closure["covariance"].values)]
    mean = [float(abs(p - c).max()) for p, c in zip(particles["mean"].values, closure["mean"].values)]
    return cov, mean


def test_particles_follow_the_closure_toward_gamma_in_d2():
    """N = 2·10⁴ whitened particles, 64 angles (MATH.md §8 Tests: covariance ≤ 1.2e−4, mean ≤ 3e−9).

    Both sides are integrated by RK4 on the same grid (h = 0.25), so the comparison isolates the
    particle field's finite-N error (the closure's own RK4 error, ~1e−5 here, cancels to leading order;
    at h = 0.5 it would not: 4e−4)."""
    generator = torch.Generator().manual_seed(0)
    x0 = whitened(20_000, torch.zeros(2, dtype=D64), C0, generator)
    cov, mean = _particles_vs_closure(SlicedWassersteinField(GAMMA2), x0, Gaussians(torch.zeros(2, dtype=D64), C0), 1.0, 4)
    # Mid-rank quantiles Φ⁻¹((k + ½)/N) have variance 1 − O(log N / N): a 1e−4 floor at N = 2·10⁴
    # (MATH-CHECKS: 4.7e−5 … 8.8e−5 over t = 0.5 … 2; measured 3.7e−5 … 9.0e−5 over t = 0.25 … 1).
    assert max(cov) <= 1.2e-4
    assert max(mean) <= 3e-9  # Σ Φ⁻¹((k + ½)/N) = 0 by symmetry and E θθᵀ = I/2 exactly


def test_particles_follow_the_closure_in_d3_noncommuting_noncentred():
    """N = 2·10⁴, 200 Gauss–Legendre directions, non-commuting non-centred Gaussian target (MATH.md §8).

    Same-grid RK4 comparison as in d = 2; two steps of 0.5 keep the file's time in budget (each step
    sorts 4·10⁶ projections four times): measured 5.4e−5, 8.7e−5 at t = 0.5, 1 (4.3e−5, 7.2e−5 with
    h = 0.25, the difference being what is left of the integrator's error)."""
    generator = torch.Generator().manual_seed(1)
    x0 = whitened(20_000, MEAN_03, SIGMA_03, generator)
    field = SlicedWassersteinField(Gaussian(MEAN_B3, SIGMA_B3), count=200)
    cov, mean = _particles_vs_closure(field, x0, Gaussians(MEAN_03, SIGMA_03), 1.0, 2)
    assert max(cov) <= 1.2e-4  # MATH-CHECKS: 4.6e−5 … 1.2e−4 over t = 0.5 … 3
    assert max(mean) <= 3e-9


def test_weighted_mid_ranks_with_ties_and_weighted_quantiles():
    """d = 1 (θ = 1): v = 2(Q_β(F̂) − p), F̂ᵢ = Σ_{k before i} w_k + wᵢ/2 in the stable order."""
    p = torch.tensor([[[0.3], [0.1], [0.3], [0.2]]], dtype=D64)
    w = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=D64)
    state = Particles(p, w)
    ranks = torch.tensor([0.65, 0.1, 0.85, 0.4], dtype=D64)  # tie at 0.3 broken by index
    gauss = SlicedWassersteinField(Gaussian(torch.tensor([1.0], dtype=D64), torch.tensor([[4.0]], dtype=D64)))
    v = gauss.velocity(0.0, state.x, state)[0, :, 0]
    assert torch.allclose(v, 2 * (1.0 + 2.0 * torch.special.ndtri(ranks) - p[0, :, 0]), atol=1e-15)
    # Weighted target: Q(u) = y_(k), k the first index with cumulative weight ≥ u.
    y = torch.tensor([[2.0], [-1.0], [0.5]], dtype=D64)
    q = torch.tensor([0.3, 0.5, 0.2], dtype=D64)  # sorted: −1 (0.5), 0.5 (0.7), 2 (1.0)
    v = SlicedWassersteinField(Empirical(y, q)).velocity(0.0, state.x, state)[0, :, 0]
    assert torch.allclose(v, 2 * (torch.tensor([0.5, -1.0, 2.0, -1.0], dtype=D64) - p[0, :, 0]), atol=1e-15)


def test_off_particle_queries_use_the_cdf_midpoint():
    generator = torch.Generator().manual_seed(2)
    state = Particles(torch.randn(1, 500, 2, generator=generator, dtype=D64))
    field = SlicedWassersteinField(GAMMA2, count=16)
    at = field.velocity(0.0, state.x, state)
    assert torch.allclose(field.velocity(0.0, state.x.clone(), state), at, atol=1e-14)  # no ties: same ranks
    far = field.velocity(0.0, torch.tensor([[[50.0, -50.0]]], dtype=D64), state)
    assert bool(torch.isfinite(far).all())


def test_field_vanishes_at_sample_target_and_sample_energy():
    generator = torch.Generator().manual_seed(4)
    y = torch.randn(400, 3, generator=generator, dtype=D64)
    perm = torch.randperm(400, generator=generator)
    field = SlicedWassersteinField(Empirical(y), count=50)
    state = Particles(y[perm][None])
    # Each particle's quantile is its own projection, up to the rounding of the two projections.
    ulps = 8 * torch.finfo(D64).eps * float(y.abs().max())
    assert float(field.velocity(0.0, state.x, state).abs().max()) <= ulps
    assert float(field.energy(state).abs().max()) <= ulps**2
    # N = M uniform: SW₂² = Σ_l ω_l mean((p_(k) − y_(k))²).
    x = torch.randn(1, 400, 3, generator=generator, dtype=D64) * 2
    theta, omega = DirectionSet(count=50).nodes(3)
    direct = sum(
        float(omega[l]) * float(((x[0] @ theta[l]).sort().values - (y @ theta[l]).sort().values).pow(2).mean())
        for l in range(len(omega))
    )
    assert abs(float(field.energy(Particles(x))) - direct) <= 1e-12 * direct


def test_particle_energy_is_the_exact_sliced_cost_and_honours_weights():
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(7, 1, generator=generator, dtype=D64)
    k = torch.tensor([1, 3, 2, 1, 4, 2, 3])
    w = k.to(D64) / k.sum()
    target = Gaussian(torch.tensor([0.3], dtype=D64), torch.tensor([[2.25]], dtype=D64))
    field = SlicedWassersteinField(target)
    energy = float(field.energy(Particles(x[None], w[None])))
    # ∫₀¹ (Q_μ(u) − m − sΦ⁻¹(u))² du by adaptive quadrature, piece by piece.
    order = x[:, 0].argsort()
    edges = torch.cat([torch.zeros(1, dtype=D64), w[order].cumsum(0)]).tolist()
    quad = sum(
        integrate.quad(lambda u, a=float(x[order[i], 0]): (a - 0.3 - 1.5 * stats.norm.ppf(u)) ** 2,
                       edges[i], min(edges[i + 1], 1.0), epsabs=1e-13, epsrel=1e-12)[0]
        for i in range(7)
    )
    assert abs(energy - quad) <= 1e-9 * quad
    # The same measure as duplicated uniform particles: the same energy (Gaussian and sample targets).
    dup = Particles(x.repeat_interleave(k, 0)[None])
    assert abs(float(field.energy(dup)) - energy) <= 1e-12 * energy
    y = torch.randn(9, 1, generator=generator, dtype=D64)
    samples = SlicedWassersteinField(y)
    assert abs(float(samples.energy(dup)) - float(samples.energy(Particles(x[None], w[None])))) <= 1e-12


def test_random_directions_are_seeded_and_unbiased():
    state = Gaussians(MEAN_03, SIGMA_03)
    target = Gaussian(MEAN_B3, SIGMA_B3)
    fixed = SlicedWassersteinField(target, directions="random", count=32, seed=1)
    assert torch.equal(fixed.affine(0.0, state)[1], fixed.affine(0.7, state)[1])
    assert torch.equal(fixed.affine(0.0, state)[1], SlicedWassersteinField(target, directions="random", count=32, seed=1).affine(0.3, state)[1])
    assert not torch.equal(fixed.affine(0.0, state)[1], SlicedWassersteinField(target, directions="random", count=32, seed=2).affine(0.0, state)[1])
    fresh = SlicedWassersteinField(target, directions="random", count=32, seed=1, resample="time")
    assert torch.equal(fresh.affine(0.25, state)[1], fresh.affine(0.25, state)[1])
    assert not torch.equal(fresh.affine(0.25, state)[1], fresh.affine(0.5, state)[1])
    assert torch.equal(fresh.energy(state), fixed.energy(state))  # the reference set: seed alone
    # Unbiased: the mean closure over 400 times is the quadrature's, within 4 standard errors.
    draws = torch.stack([fresh.affine(0.01 * i, state)[1][0] for i in range(400)])
    exact = SlicedWassersteinField(target, count=800).affine(0.0, state)[1][0]
    stderr = draws.std(0) / math.sqrt(400)
    assert bool(((draws.mean(0) - exact).abs() <= 4 * stderr + 1e-12).all())


def test_each_replica_gets_its_own_target_and_ranks():
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(2, 300, 2, generator=generator, dtype=D64)
    y = torch.randn(2, 200, 2, generator=generator, dtype=D64) + torch.tensor([[[1.0, 0.0]], [[0.0, -2.0]]], dtype=D64)
    both = Particles(x)
    field = SlicedWassersteinField(y, count=24)
    v, F = field.velocity(0.0, both.x, both), field.energy(both)
    for r in range(2):
        one = Particles(x[r:r + 1])
        single = SlicedWassersteinField(y[r], count=24)
        assert torch.allclose(v[r:r + 1], single.velocity(0.0, one.x, one), atol=1e-14)
        assert torch.allclose(F[r:r + 1], single.energy(one), rtol=1e-14)


def test_bad_inputs_are_named():
    points = torch.randn(10, 2, dtype=D64)
    with pytest.raises(ParameterError, match="quadrature directions exist for d ≤ 3 only.*random"):
        SlicedWassersteinField(torch.randn(10, 4, dtype=D64))
    with pytest.raises(ParameterError, match="resample='time' is for random directions"):
        SlicedWassersteinField(points, resample="time")
    with pytest.raises(ParameterError, match="directions must be one of"):
        SlicedWassersteinField(points, directions="sobol")
    with pytest.raises(ParameterError, match="count must be a positive integer"):
        SlicedWassersteinField(points, count=0)
    with pytest.raises(ParameterError, match="seed must be a non-negative integer"):
        SlicedWassersteinField(points, directions="random", seed=-1)
    with pytest.raises(ParameterError, match="count ≥ 8"):
        SlicedWassersteinField(torch.randn(10, 3, dtype=D64), count=4)
    with pytest.raises(ParameterError, match="inside the DirectionSet"):
        SlicedWassersteinField(points, directions=DirectionSet(), count=5)
    state = Particles(torch.randn(1, 10, 2, dtype=D64))
    with pytest.raises(ShapeError, match="target has dimension d = 3"):
        SlicedWassersteinField(torch.randn(10, 3, dtype=D64)).velocity(0.0, state.x, state)
    with pytest.raises(ShapeError, match=r"query points must have shape \(R, N', d\)"):
        SlicedWassersteinField(points).velocity(0.0, state.x[0], state)
    with pytest.raises(CapabilityError, match="needs a Gaussian target"):
        SlicedWassersteinField(points).affine(0.0, Gaussians(torch.zeros(2, dtype=D64), torch.eye(2, dtype=D64)))
    with pytest.raises(ParameterError, match="method must be"):
        gamma_drift_matrix(C0, "simpson")
    with pytest.raises(StateError, match="positive definite"):
        gamma_drift_matrix(torch.diag(torch.tensor([1.0, -1.0])))
    with pytest.raises(ParameterError, match="elliptic form is for d = 2"):
        gamma_drift_matrix(torch.eye(3), "elliptic")
