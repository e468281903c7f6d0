"""Stochastic interpolants Zₜ = aX₀ + bX₁ + γₜW in the flow-matching field (MATH.md §15.2)."""

from __future__ import annotations

import math

import pytest
import torch

import measureflow
from measureflow import Gaussians, Particles, Simulation
from measureflow.errors import ParameterError
from measureflow.measures import Empirical, Gaussian

F64 = torch.float64
S0 = torch.tensor([[1.5, 0.4], [0.4, 0.7]], dtype=F64)
M0 = torch.tensor([1.0, -0.5], dtype=F64)
S1 = torch.tensor([[0.6, -0.2], [-0.2, 1.1]], dtype=F64)
M1 = torch.tensor([-0.5, 0.3], dtype=F64)
C = 0.8  # γ = C√(t(1 − t))


def gamma2(t):
    return C * C * t * (1 - t)


def expected_cov(t, noise_cov):
    return (1 - t) ** 2 * S0 + t * t * noise_cov + gamma2(t) * torch.eye(2, dtype=F64)


@pytest.mark.parametrize("noise", ["sigma", "measure"])
def test_gaussian_closure_of_the_stochastic_interpolant(noise):
    kw = {"sigma": 1.3} if noise == "sigma" else {"noise": Gaussian(M1, S1)}
    noise_cov = 1.69 * torch.eye(2, dtype=F64) if noise == "sigma" else S1
    field = measureflow.field("flow_matching", data=Gaussian(M0, S0), gamma=C, **kw)
    for t in (0.1, 0.5, 0.9):
        torch.testing.assert_close(field.path(t).cov.reshape(2, 2), expected_cov(t, noise_cov), rtol=0, atol=1e-14)
    # the closure (b, A) moves the exact law along the path: RK4 from t = 0.9 back to 0.1, 200 steps
    start = field.path(0.9)
    start = Gaussians(start.mean.reshape(1, 2), start.cov.reshape(1, 2, 2))
    end = Simulation(start, field, "rk4", 0.9, 0.1, steps=200, progress=False).run().state
    torch.testing.assert_close(end.cov[0], expected_cov(0.1, noise_cov), rtol=0, atol=1e-9)
    mean_1 = torch.zeros(2, dtype=F64) if noise == "sigma" else M1
    torch.testing.assert_close(end.mean[0], 0.9 * M0 + 0.1 * mean_1, rtol=0, atol=1e-9)


def test_particles_follow_the_stochastic_interpolant_law():
    """Exact samples of Zₜ = aX₀ + bX₁ + γW at t = 0.2 pushed to t = 0.8 by the field (RK4, 60 steps)
    have the law's covariance a²Σ₀ + b²Σ₁ + γ²I within 3 standard errors (N = 2·10⁴)."""
    field = measureflow.field("flow_matching", data=Gaussian(M0, S0), noise=Gaussian(M1, S1), gamma=C)
    n = 20_000
    g = torch.Generator().manual_seed(0)
    x0 = Gaussian(M0, S0).sample(n, g)
    x1 = Gaussian(M1, S1).sample(n, g)
    w = torch.randn(n, 2, dtype=F64, generator=g)
    z = 0.8 * x0 + 0.2 * x1 + math.sqrt(gamma2(0.2)) * w
    out = Simulation(Particles(z[None]), field, "rk4", 0.2, 0.8, steps=60, progress=False).run().state
    target = expected_cov(0.8, S1)
    se = torch.sqrt((target.diag()[:, None] * target.diag()[None, :] + target**2) / n)
    assert float(((out.covariance()[0] - target) / se).abs().max()) < 3
    # without γ the same samples land elsewhere: the W term matters (γ(0.8)² = 0.10 on the diagonal)
    plain = measureflow.field("flow_matching", data=Gaussian(M0, S0), noise=Gaussian(M1, S1))
    other = Simulation(Particles(z[None]), plain, "rk4", 0.2, 0.8, steps=60, progress=False).run().state
    assert float(((other.covariance()[0] - target) / se).abs().max()) > 10


def test_gamma_zero_is_the_plain_field_and_bad_gamma_is_refused():
    x = torch.randn(1, 5, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    a = measureflow.field("flow_matching", data=Gaussian(M0, S0), noise=Gaussian(M1, S1), gamma=0.0)
    b = measureflow.field("flow_matching", data=Gaussian(M0, S0), noise=Gaussian(M1, S1))
    torch.testing.assert_close(a.velocity(0.4, x), b.velocity(0.4, x), rtol=0, atol=1e-14)
    with pytest.raises(ParameterError, match="must vanish"):
        measureflow.field("flow_matching", data=Gaussian(M0, S0), gamma=lambda t: 1 + 0 * t)
    with pytest.raises(ParameterError, match="no atoms"):
        measureflow.field("flow_matching", data=Empirical(torch.randn(4, 2, dtype=F64)), noise=Gaussian(M1, S1),
                          gamma=0.5)
    # atoms against N(0, σ²I) are fine: the interpolant is a schedule there; t = 0 is cut off
    f = measureflow.field("flow_matching", data=Empirical(torch.randn(4, 2, dtype=F64)), gamma=0.5)
    assert f.t_min == pytest.approx(1e-3)
