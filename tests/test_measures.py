"""Reference laws: sampling, densities, scores, moments and validation (measureflow.measures)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from measureflow.errors import CapabilityError, ShapeError, StateError
from measureflow.measures import Empirical, Gaussian, GaussianMixture
from measureflow.state import Gaussians, Particles

F64 = torch.float64

# Tolerance in standard errors for Monte Carlo checks: a fixed seed makes each test deterministic,
# and 5 standard errors would fail with probability < 1e-6 per scalar under a fresh seed.
Z = 5.0


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def spd(d, seed):
    a = torch.randn(d, d, generator=gen(seed), dtype=F64)
    return a @ a.T + 0.5 * torch.eye(d, dtype=F64)


@pytest.fixture
def gaussian():
    return Gaussian(torch.tensor([1.0, -2.0, 0.5], dtype=F64), spd(3, 1))


@pytest.fixture
def mixture():
    means = torch.tensor([[0.0, 0.0], [3.0, 1.0], [-1.0, 2.5]], dtype=F64)
    covs = torch.stack([spd(2, 2), 0.3 * spd(2, 3), torch.diag(torch.tensor([0.5, 2.0], dtype=F64))])
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2], dtype=F64), means, covs)


@pytest.fixture
def dirac_mixture():
    means = torch.tensor([[2.0, 0.0], [-1.0, 3**0.5], [-1.0, -(3**0.5)]], dtype=F64)
    covs = torch.zeros(3, 2, 2, dtype=F64)
    covs[0] = torch.eye(2, dtype=F64)  # one smooth component, two Diracs
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2], dtype=F64), means, covs)


def check_moments(x, mean, cov):
    """Sample mean and covariance within Z standard errors estimated from the sample itself."""
    n = x.shape[0]
    m_hat = x.mean(0)
    assert torch.all((m_hat - mean).abs() <= Z * x.std(0) / n**0.5)
    c = x - mean  # centred at the true mean: E[c cᵀ] = Σ exactly
    prod = c[:, :, None] * c[:, None, :]
    c_hat = prod.mean(0)
    se = prod.std(0) / n**0.5
    assert torch.all((c_hat - cov).abs() <= Z * se)


# -- sampling ---------------------------------------------------------------------------------------------


def test_gaussian_sample_moments(gaussian):
    x = gaussian.sample(100_000, gen(3))
    assert x.shape == (100_000, 3) and x.dtype == F64
    check_moments(x, gaussian.mean(), gaussian.covariance())


def test_mixture_sample_moments_follow_total_covariance(mixture, dirac_mixture):
    for law in (mixture, dirac_mixture):
        x = law.sample(100_000, gen(4))
        check_moments(x, law.mean(), law.covariance())


def test_dirac_mixture_samples_sit_on_atoms_with_the_weights(dirac_mixture):
    x = dirac_mixture.sample(20_000, gen(5))
    for k in (1, 2):  # the Dirac components
        hits = (x - dirac_mixture.means[k]).abs().amax(-1) == 0
        p = float(dirac_mixture.weights[k])
        frac = hits.double().mean()
        assert abs(float(frac) - p) <= Z * math.sqrt(p * (1 - p) / x.shape[0])


def test_empirical_resampling_frequencies():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]], dtype=F64)
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    emp = Empirical(points, weights)
    x = emp.sample(40_000, gen(6))
    for j in range(4):
        frac = float((x == points[j]).all(-1).double().mean())
        p = float(weights[j])
        assert abs(frac - p) <= Z * math.sqrt(p * (1 - p) / x.shape[0])


def test_same_seed_same_samples_different_seed_different(gaussian, mixture):
    emp = Empirical(torch.randn(50, 2, generator=gen(0), dtype=F64))
    for law in (gaussian, mixture, emp):
        a = law.sample(64, gen(11), replicas=3)
        b = law.sample(64, gen(11), replicas=3)
        c = law.sample(64, gen(12), replicas=3)
        assert a.shape == (3, 64, law.dim)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
        # (R, n, d) with replicas equals (R·n, d) without, drawn from the same stream
        flat = law.sample(3 * 64, gen(11))
        assert torch.equal(a.reshape(-1, law.dim), flat)


def test_particles_state(gaussian, mixture):
    p = gaussian.particles(10, gen(1), replicas=4)
    assert isinstance(p, Particles) and p.x.shape == (4, 10, 3) and p.weights is None
    assert torch.equal(p.x, gaussian.sample(10, gen(1), replicas=4))
    assert mixture.particles(5, gen(2)).x.shape == (1, 5, 2)


def test_as_state_and_as_mixture(gaussian):
    s = gaussian.as_state(replicas=3)
    assert isinstance(s, Gaussians) and s.mean.shape == (3, 3) and s.cov.shape == (3, 3, 3)
    assert torch.equal(s.cov[2], gaussian.cov)
    mix = gaussian.as_mixture()
    x = torch.randn(7, 3, generator=gen(2), dtype=F64)
    torch.testing.assert_close(mix.log_density(x), gaussian.log_density(x), rtol=1e-12, atol=1e-12)
    emp = Empirical(torch.randn(6, 2, dtype=F64), torch.full((6,), 1 / 6, dtype=F64))
    st = emp.as_state(replicas=2)
    assert st.x.shape == (2, 6, 2) and st.weights.shape == (2, 6)
    assert not emp.as_mixture().has_density


# -- densities and scores -----------------------------------------------------------------------------------


def test_gaussian_log_density_matches_scipy(gaussian):
    x = torch.randn(4, 5, 3, generator=gen(7), dtype=F64) * 2
    ref = multivariate_normal(gaussian.mean().numpy(), gaussian.cov.numpy()).logpdf(x.reshape(-1, 3).numpy())
    got = gaussian.log_density(x)
    assert got.shape == (4, 5)
    # float64 Cholesky vs scipy's eigen-decomposition: both backward stable, agree to ~1e-13 here.
    np.testing.assert_allclose(got.reshape(-1).numpy(), ref, rtol=1e-11, atol=1e-11)


def test_mixture_log_density_matches_scipy(mixture):
    x = torch.randn(50, 2, generator=gen(8), dtype=F64) * 3
    comps = [
        np.log(float(w)) + multivariate_normal(m.numpy(), c.numpy()).logpdf(x.numpy())
        for w, m, c in zip(mixture.weights, mixture.means, mixture.covs)
    ]
    ref = np.logaddexp.reduce(np.stack(comps), axis=0)
    np.testing.assert_allclose(mixture.log_density(x).numpy(), ref, rtol=1e-11, atol=1e-11)


def autograd_score(law, x):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(law.log_density(x).sum(), x)
    return g


@pytest.mark.parametrize("which", ["gaussian", "mixture"])
def test_score_is_gradient_of_log_density(which, gaussian, mixture):
    law = gaussian if which == "gaussian" else mixture
    x = torch.randn(3, 40, law.dim, generator=gen(9), dtype=F64) * 3
    got = law.score(x)
    assert got.shape == x.shape
    # Both are exact formulas evaluated in float64; differences are rounding only.
    torch.testing.assert_close(got, autograd_score(law, x), rtol=1e-10, atol=1e-10)


def test_mixture_score_is_stable_far_from_every_component(mixture):
    # At |x| ~ 1e3 every component density underflows to 0; the log-sum-exp form must not.
    x = torch.tensor([[1e3, -2e3], [-5e2, 8e2]], dtype=F64)
    lp, s = mixture.log_density(x), mixture.score(x)
    assert torch.isfinite(lp).all() and torch.isfinite(s).all()
    torch.testing.assert_close(s, autograd_score(mixture, x), rtol=1e-9, atol=1e-9)
    # Far out one component dominates and the score is that component's −Σₖ⁻¹(x − mₖ): O(|x|), no blow-up.
    assert s.norm(dim=-1).max() < 1e5


def test_float32_density_and_dtype_kept():
    law = Gaussian(torch.zeros(2), torch.eye(2) * 2)
    assert law.dtype == torch.float32 and law.sample(3, gen()).dtype == torch.float32
    x = torch.tensor([[1.0, 1.0]])
    expected = -0.5 * (2 / 2) - 0.5 * math.log(4.0) - math.log(2 * math.pi)
    assert abs(float(law.log_density(x)) - expected) < 1e-6
    law64 = law.to(dtype=F64)
    assert law64.dtype == F64 and law64.cov.dtype == F64


# -- moments -------------------------------------------------------------------------------------------------


def test_law_of_total_covariance(mixture):
    w, m, c = mixture.weights, mixture.means, mixture.covs
    mean = (w[:, None] * m).sum(0)
    second = sum(wk * (ck + torch.outer(mk, mk)) for wk, mk, ck in zip(w, m, c))
    torch.testing.assert_close(mixture.mean(), mean)
    torch.testing.assert_close(mixture.covariance(), second - torch.outer(mean, mean), rtol=1e-12, atol=1e-12)


def test_empirical_moments_weighted():
    y = torch.randn(30, 3, generator=gen(10), dtype=F64)
    w = torch.rand(30, generator=gen(11), dtype=F64)
    w = w / w.sum()
    emp = Empirical(y, w)
    m = (w[:, None] * y).sum(0)
    torch.testing.assert_close(emp.mean(), m)
    torch.testing.assert_close(emp.covariance(), ((y - m).T * w) @ (y - m))
    assert emp.size == 30 and emp.dim == 3


# -- no density ----------------------------------------------------------------------------------------------


def test_dirac_mixture_has_no_density_but_samples_and_moments(dirac_mixture):
    assert not dirac_mixture.has_density
    x = torch.zeros(4, 2, dtype=F64)
    for method in (dirac_mixture.log_density, dirac_mixture.score):
        with pytest.raises(CapabilityError, match=r"component\(s\) \[1, 2\].*singular covariance"):
            method(x)
    assert dirac_mixture.sample(10, gen()).shape == (10, 2)
    assert torch.isfinite(dirac_mixture.covariance()).all()
    diracs = GaussianMixture.diracs(torch.randn(5, 2, dtype=F64))
    assert diracs.components == 5 and not diracs.has_density


def test_empirical_has_no_density():
    emp = Empirical(torch.randn(5, 2))
    with pytest.raises(CapabilityError, match="no density"):
        emp.log_density(torch.zeros(1, 2))
    with pytest.raises(CapabilityError, match="no density"):
        emp.score(torch.zeros(1, 2))


# -- validation --------------------------------------------------------------------------------------------


def test_gaussian_validation_messages():
    with pytest.raises(ShapeError, match=r"Gaussian.mean must have shape \(d,\); received \(1, 2\)"):
        Gaussian(torch.zeros(1, 2), torch.eye(2))
    with pytest.raises(ShapeError, match=r"Gaussian.cov must have shape \(d, d\) = \(2, 2\); received \(3, 3\)"):
        Gaussian(torch.zeros(2), torch.eye(3))
    with pytest.raises(StateError, match=r"positive definite; its smallest eigenvalue is -1"):
        Gaussian(torch.zeros(2), torch.diag(torch.tensor([1.0, -1.0])))
    with pytest.raises(StateError, match="symmetric"):
        Gaussian(torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(StateError, match="finite"):
        Gaussian(torch.tensor([0.0, float("nan")]), torch.eye(2))
    with pytest.raises(StateError, match="positive definite"):
        Gaussian(torch.zeros(2), torch.zeros(2, 2))  # a Dirac is a GaussianMixture, not a Gaussian


def test_mixture_validation_messages():
    means, covs = torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2)
    with pytest.raises(StateError, match=r"sum to one; they sum to 1\.1.*w / w\.sum\(\)"):
        GaussianMixture(torch.tensor([0.5, 0.6]), means, covs)
    with pytest.raises(StateError, match="non-negative"):
        GaussianMixture(torch.tensor([1.5, -0.5]), means, covs)
    with pytest.raises(ShapeError, match=r"weights must have shape \(K,\) = \(2,\); received \(3,\)"):
        GaussianMixture(torch.ones(3) / 3, means, covs)
    with pytest.raises(ShapeError, match=r"covs must have shape \(K, d, d\) = \(2, 2, 2\); received \(2, 2\)"):
        GaussianMixture(torch.ones(2) / 2, means, torch.eye(2))
    bad = torch.stack([torch.eye(2), torch.diag(torch.tensor([1.0, -0.1]))])
    with pytest.raises(StateError, match=r"semi-definite; component 1 has smallest eigenvalue -0\.1"):
        GaussianMixture(torch.ones(2) / 2, means, bad)


def test_empirical_validation_messages():
    with pytest.raises(ShapeError, match=r"points must have shape \(M, d\); received \(5,\)"):
        Empirical(torch.zeros(5))
    with pytest.raises(ShapeError, match=r"weights must have shape \(M,\) = \(4,\); received \(3,\)"):
        Empirical(torch.zeros(4, 2), torch.ones(3) / 3)
    with pytest.raises(StateError, match=r"sum to one; they sum to 2"):
        Empirical(torch.zeros(4, 2), torch.ones(4) / 2)


def test_sample_arguments_are_checked(gaussian):
    with pytest.raises(ShapeError, match="positive integer"):
        gaussian.sample(0)
    with pytest.raises(ShapeError, match="replicas"):
        gaussian.sample(3, replicas=0)
    with pytest.raises(ShapeError, match=r"x must have shape \(\.\.\., d\) with d = 3"):
        gaussian.score(torch.zeros(4, 2, dtype=F64))


def test_numpy_and_list_inputs_are_accepted():
    law = GaussianMixture([0.25, 0.75], np.zeros((2, 2)), np.stack([np.eye(2), 2 * np.eye(2)]))
    assert law.dtype == F64  # numpy float64 kept
    assert Gaussian([0, 0], [[1, 0], [0, 1]]).dtype == torch.get_default_dtype()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda(mixture):
    law = mixture.to(device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = law.sample(1000, g)
    assert x.device.type == "cuda"
    assert law.score(x).device.type == "cuda"
    with pytest.raises(StateError, match="generator is on cpu"):
        law.sample(10, gen())
