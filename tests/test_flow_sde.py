"""The marginal-preserving SDE of a flow, ``flow_sde`` (MATH.md §15.2)."""

from __future__ import annotations

import math

import pytest
import torch

import measureflow
from measureflow import Gaussians, Particles, Simulation
from measureflow.errors import CapabilityError, ParameterError
from measureflow.fields import Field
from measureflow.measures import Gaussian, GaussianMixture

F64 = torch.float64
# A data Gaussian in d = 3 whose covariance does not commute with a diagonal one.
SIGMA_DATA = torch.tensor([[2.0, 0.6, -0.3], [0.6, 0.8, 0.2], [-0.3, 0.2, 0.5]], dtype=F64)
MEAN_DATA = torch.tensor([1.0, -0.5, 0.3], dtype=F64)


def fm_field(**kw):
    return measureflow.field("flow_matching", data=Gaussian(MEAN_DATA, SIGMA_DATA), sigma=1.0, **kw)


@pytest.mark.parametrize("g", [0.0, 0.5, 1.0, 2.0])
def test_sde_generates_the_target_covariance_for_every_noise_level(g):
    """From N(0, I) at t = 1 to the data at t = 0 (s = 1 − t), SRA1 with 100 steps (weak order 2: bias
    ~1e-4, far below the sampling error). Sample mean and covariance entries within 3 standard errors:
    SE(Σ̂ᵢⱼ) = √((ΣᵢᵢΣⱼⱼ + Σᵢⱼ²)/N), SE(m̂ᵢ) = √(Σᵢᵢ/N), N = 2·10⁴."""
    n = 20_000
    x0 = torch.randn(1, n, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    field = measureflow.field("flow_sde", flow=fm_field(), noise=g, direction="reverse")
    out = Simulation(Particles(x0), field, "sra", 0.0, 1.0, steps=100, seed=2, progress=False).run().state
    S = SIGMA_DATA
    se_cov = torch.sqrt((S.diag()[:, None] * S.diag()[None, :] + S**2) / n)
    se_mean = torch.sqrt(S.diag() / n)
    assert float(((out.covariance()[0] - S) / se_cov).abs().max()) < 3
    assert float(((out.mean()[0] - MEAN_DATA) / se_mean).abs().max()) < 3


@pytest.mark.parametrize("g", [0.5, 2.0])
def test_on_gaussians_the_sde_closure_equals_the_ode_closure(g):
    flow = fm_field()
    sde = measureflow.field("flow_sde", flow=flow, noise=g, direction="reverse")
    ode = measureflow.field("flow_sde", flow=flow, noise=0.0, direction="reverse")
    for s in (0.0, 0.3, 0.7, 1.0):
        path = flow.path(1.0 - s)
        state = Gaussians(path.mean[None], path.cov[None]) if path.mean.ndim == 1 else path
        b, A = sde.affine(s, state)
        b0, A0 = flow.affine(1.0 - s, state)
        torch.testing.assert_close(b, -b0, rtol=0, atol=1e-12)
        torch.testing.assert_close(A, -A0, rtol=0, atol=1e-12)
        torch.testing.assert_close(ode.affine(s, state)[1], -A0, rtol=0, atol=0)
    # a whole run on a Gaussian state: the SDE's moments follow the exact path like the ODE's (RK2
    # on the closure, 200 steps: error O(h²) ≈ 1e-5)
    start = flow.path(1.0)
    start = Gaussians(start.mean.reshape(1, 3), start.cov.reshape(1, 3, 3))
    end = Simulation(start, sde, "stochastic_heun", 0.0, 1.0, steps=200, progress=False).run().state
    torch.testing.assert_close(end.cov[0], SIGMA_DATA, rtol=0, atol=1e-4)
    torch.testing.assert_close(end.mean[0], MEAN_DATA, rtol=0, atol=1e-4)


def three_diracs():
    c = torch.tensor([[2.0, 0.0], [-1.0, math.sqrt(3)], [-1.0, -math.sqrt(3)]], dtype=F64)
    return GaussianMixture.diracs(c, torch.tensor([0.5, 0.3, 0.2], dtype=F64))


@pytest.mark.parametrize("flow_direction", ["forward", "reverse"])
def test_ou_path_with_g_sqrt2_sigma_is_ou_bridge_sde(flow_direction):
    sigma, tau_max = 0.8, 3.0
    data = three_diracs()
    bridge = measureflow.field("ou_bridge", data=data, sigma=sigma, tau_max=tau_max, direction=flow_direction)
    sde = measureflow.field("flow_sde", flow=bridge, noise=math.sqrt(2) * sigma,
                            direction="reverse" if flow_direction == "forward" else "forward")
    ref = measureflow.field("ou_bridge_sde", data=data, sigma=sigma, tau_max=tau_max)
    assert sde.time_range == pytest.approx(ref.time_range, abs=1e-15)
    x0 = sigma * torch.randn(2, 500, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    span = ref.time_range[1]
    runs = [Simulation(Particles(x0), f, "euler_maruyama", 0.0, span, steps=60, seed=5, progress=False).run()
            for f in (sde, ref)]
    torch.testing.assert_close(runs[0].state.x, runs[1].state.x, rtol=0, atol=1e-12)
    torch.testing.assert_close(sde.velocity(1.0, x0), ref.velocity(1.0, x0), rtol=0, atol=1e-12)


def test_noise_as_callable_or_schedule_and_a_separate_score():
    flow = fm_field()
    # score given separately (a callable in the flow's time): same drift as the flow's own score
    own = measureflow.field("flow_sde", flow=flow, noise=1.0, direction="reverse")
    given = measureflow.field("flow_sde", flow=flow, score=lambda t, x: flow.score(t, x), noise=lambda s: 1.0,
                              direction="reverse")
    x = torch.randn(1, 7, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(own.velocity(0.4, x), given.velocity(0.4, x), rtol=0, atol=1e-13)
    # a schedule: g = scale · b_t at the flow's time t = 1 − s
    sched = measureflow.field("flow_sde", flow=flow, noise="cosine", noise_scale=2.0, direction="reverse")
    assert sched.diffusion(0.25) == pytest.approx(2.0 * math.sin(math.pi * 0.75 / 2), abs=1e-15)
    assert sched.diffusion(1.0) == pytest.approx(0.0, abs=1e-15)


def test_bad_input():
    class NoScore(Field):
        name = "no_score"
        time_range = (0.0, 1.0)

        def velocity(self, t, x, state):
            return -x

    with pytest.raises(ParameterError, match="positive noise level needs the score"):
        measureflow.field("flow_sde", flow=NoScore(), noise=0.5)
    ode = measureflow.field("flow_sde", flow=NoScore(), noise=0.0)  # the ODE needs no score
    assert torch.equal(ode.velocity(0.5, torch.ones(1, 2, 1)), -torch.ones(1, 2, 1))
    with pytest.raises(ParameterError, match="noise level must be a finite number >= 0"):
        measureflow.field("flow_sde", flow=fm_field(), noise=-1.0)
    with pytest.raises(ParameterError, match="direction"):
        measureflow.field("flow_sde", flow=fm_field(), noise=1.0, direction="backwards")
    with pytest.raises(CapabilityError, match="already has a noise term"):
        measureflow.field("flow_sde", flow=measureflow.field("ou_bridge_sde", data=three_diracs()), noise=1.0)


def test_survey_convention_runs_forward_with_its_own_score():
    """Noise at t = 0 (survey convention): flow_sde runs forward in the flow's own time, and its drift
    equals that of the noising convention's reverse SDE at s = t."""
    survey = measureflow.field("flow_sde", flow=fm_field(convention="survey"), noise=0.7)
    noising = measureflow.field("flow_sde", flow=fm_field(), noise=0.7, direction="reverse")
    x = torch.randn(1, 9, 3, dtype=F64, generator=torch.Generator().manual_seed(4))
    for s in (0.1, 0.5, 0.9):
        torch.testing.assert_close(survey.velocity(s, x), noising.velocity(s, x), rtol=0, atol=1e-12)
    assert survey.diffusion(0.3) == 0.7 and survey.time_range == pytest.approx((0.0, 1.0))
