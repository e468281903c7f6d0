"""The log-density channel d log ρ/dt = −∇·v (MATH.md §15.1) against its analytic cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import measureflow
from measureflow import Field, Gaussians, Particles, Simulation
from measureflow.errors import CapabilityError
from measureflow.measures import Gaussian, GaussianMixture
from measureflow.run import Callback

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
A_README = torch.tensor([[-0.5, -2.0], [1.0, -0.5]], dtype=F64)  # tr A = −1: the log-density rises at rate 1


def linear():
    return measureflow.field("linear", A=A_README, b=torch.tensor([0.5, 0.0], dtype=F64))


def initial_law():
    return Gaussian(torch.tensor([2.0, -1.0], dtype=F64), torch.tensor([[1.5, 0.6], [0.6, 0.8]], dtype=F64))


def start(n=40, replicas=2, seed=0):
    law = initial_law()
    x = law.sample(n, torch.Generator().manual_seed(seed), replicas=replicas)
    return law, x, Particles(x, channels={"log_density": law.log_density(x)})


class Opaque(Field):
    """A field that hides its closed-form divergence, so the engine must use autograd."""

    name = "opaque"

    def __init__(self, inner):
        self.inner = inner

    def velocity(self, t, x, state):
        return self.inner.velocity(t, x, state)


@pytest.mark.parametrize("wrap", [False, True], ids=["declared", "autograd"])
def test_affine_field_log_density_falls_by_t_trace(wrap):
    # Affine v = Ax + c: log ρ_t(x_t) = log ρ_0(x_0) − t·tr A exactly; the rate is constant, so every
    # Runge–Kutta method integrates it exactly and only rounding remains.
    law, x, state = start()
    field = Opaque(linear()) if wrap else linear()
    result = Simulation(state, field, "rk4", t1=1.5, steps=30, log_density="exact", progress=False).run()
    assert result.state.log_density.shape == (2, 40)
    expected = law.log_density(x) + 1.5  # −t·tr A = +1.5
    assert torch.allclose(result.state.log_density, expected, rtol=0, atol=1e-12)


def test_affine_field_log_density_is_the_gaussian_closure_density():
    # The particles sample N(m_t, Σ_t) = the field's exact solution, so the channel equals its log-pdf
    # at the particles' positions; RK4 with h = 0.01 leaves a position error ~h⁴ ≈ 1e-8 relative.
    law, x, state = start()
    field = linear()
    result = Simulation(state, Opaque(field), "rk4", t1=1.0, steps=100, log_density="exact", progress=False).run()
    exact = field.solution(1.0, Gaussians(law.mean()[None], law.covariance()[None]))
    reference = Gaussian(exact.mean[0], exact.cov[0]).log_density(result.state.x)
    assert torch.allclose(result.state.log_density, reference, rtol=0, atol=1e-8)


def gmm_flow_matching():
    data = GaussianMixture(
        torch.tensor([0.5, 0.3, 0.2], dtype=F64),
        torch.tensor([[2.0, 0.0], [-1.0, 1.5], [-1.0, -1.5]], dtype=F64),
        torch.tensor([[[0.3, 0.1], [0.1, 0.2]], [[0.2, 0.0], [0.0, 0.4]], [[0.25, -0.05], [-0.05, 0.15]]], dtype=F64),
    )
    noise = GaussianMixture(
        torch.tensor([0.6, 0.4], dtype=F64),
        torch.tensor([[0.5, 0.5], [-0.5, -0.5]], dtype=F64),
        torch.tensor([[[1.0, 0.2], [0.2, 0.8]], [[0.7, 0.0], [0.0, 1.1]]], dtype=F64),
    )
    return data, measureflow.field("flow_matching", data=data, noise=noise)


def test_flow_matching_gmm_channel_equals_the_mixture_log_pdf():
    # MATH.md §15.1: with GMM endpoints and the product coupling Z_t is the GMM of eq. 1.2 at every t,
    # so the channel started at log p_0(x_0) equals log p_{1/2}(x_{1/2}); dopri5 at tol 1e-9: 1e-6.
    data, field = gmm_flow_matching()
    x = data.sample(30, torch.Generator().manual_seed(1), replicas=1)
    state = Particles(x, channels={"log_density": data.log_density(x)})
    solver = measureflow.integrator("dopri5", rtol=1e-9, atol=1e-9)
    result = Simulation(state, field, solver, t0=0.0, t1=0.5, steps=1, log_density="exact", progress=False).run()
    reference = field.marginal(0.5).log_density(result.state.x)
    assert torch.allclose(result.state.log_density, reference, rtol=0, atol=1e-6)


def test_hutchinson_is_unbiased_for_the_mixture_log_pdf():
    # 64 probe seeds: the mean Hutchinson estimate lies within 3 standard errors of the exact value
    # (MATH.md §15.1 acceptance). The 64 seeds run as one batch of 64 replicas of the same particles,
    # each replica drawing its own probes; RK4 at h = 0.05 integrates the flow far below that error.
    data, field = gmm_flow_matching()
    x = data.sample(8, torch.Generator().manual_seed(2), replicas=1)
    x64 = x.expand(64, -1, -1).clone()
    state = Particles(x64, channels={"log_density": data.log_density(x64)})
    exact = Simulation(Particles(x, channels={"log_density": data.log_density(x)}), field, "rk4", t1=0.5,
                       steps=10, log_density="exact", progress=False).run().state.log_density[0]
    est = Simulation(state, field, "rk4", t1=0.5, steps=10, log_density="hutchinson", probes=1, seed=5,
                     progress=False).run().state.log_density
    mean, se = est.mean(0), est.std(0) / math.sqrt(64)
    assert bool((se > 0).all())  # the estimator really is random
    assert bool(((mean - exact).abs() <= 3 * se).all()), ((mean - exact) / se)


def test_killed_run_with_hutchinson_probes_resumes_bit_identically(tmp_path):
    law, x, state = start(n=20, replicas=1)
    field = Opaque(linear())
    common = dict(t1=1.0, steps=12, log_density="hutchinson", probes=2, seed=3, progress=False)
    whole = Simulation(state, field, "rk4", writers=[tmp_path / "whole.h5"], **common).run()
    stopped = Simulation(state, field, "rk4", checkpoint=tmp_path / "c.ckpt", checkpoint_every=1,
                         callbacks=[Callback(lambda step, time, s: step == 5)],
                         writers=[tmp_path / "run.h5"], **common).run()
    assert stopped.status.code == "stopped"
    resumed = Simulation(state, field, "rk4", checkpoint=tmp_path / "c.ckpt", resume=True,
                         writers=[tmp_path / "run.h5"], **common).run()
    assert torch.equal(resumed.state.x, whole.state.x)
    assert torch.equal(resumed.state.log_density, whole.state.log_density)
    with measureflow.open(tmp_path / "run.h5") as a, measureflow.open(tmp_path / "whole.h5") as b:
        la, lb = np.asarray(a.channels["log_density"]), np.asarray(b.channels["log_density"])
        assert la.shape == lb.shape == (13, 1, 20)
        assert np.array_equal(la, lb)


def test_log_density_is_written_and_read_back(tmp_path):
    law, x, state = start(n=10, replicas=2)
    result = Simulation(state, linear(), "rk4", t1=1.0, steps=4, log_density="exact", progress=False,
                        writers=[tmp_path / "run.h5"]).run()
    with measureflow.open(tmp_path / "run.h5") as traj:
        values = np.asarray(traj.channels["log_density"])
        assert values.shape == (5, 2, 10)
        assert torch.allclose(torch.as_tensor(values[-1]), result.state.log_density)


def test_log_density_starts_at_zero_without_an_initial_channel():
    _, x, _ = start(n=5, replicas=1)
    result = Simulation(Particles(x), linear(), "rk4", t1=2.0, steps=4, log_density="exact", progress=False).run()
    assert torch.allclose(result.state.log_density, torch.full((1, 5), 2.0, dtype=F64), atol=1e-14)


# -- bad input ----------------------------------------------------------------------------------------------
def test_log_density_on_gaussians_points_to_the_closed_form():
    law = initial_law()
    with pytest.raises(CapabilityError, match="closed form"):
        Simulation(law.as_state(), linear(), "rk4", steps=2, log_density="exact")


def test_field_without_autograd_path_or_divergence_is_refused_by_name():
    class Numpy(Field):
        name = "numpy_field"

        def velocity(self, t, x, state):
            return torch.as_tensor(-x.detach().numpy())

    _, x, _ = start(n=5, replicas=1)
    with pytest.raises(CapabilityError, match="numpy_field.*divergence"):
        Simulation(Particles(x), Numpy(), "rk4", steps=2, log_density="exact", progress=False).run()


def test_unknown_mode_and_bad_probes_are_refused():
    _, x, _ = start(n=5, replicas=1)
    with pytest.raises(measureflow.MeasureflowError, match="log_density must be one of"):
        Simulation(Particles(x), linear(), "rk4", steps=2, log_density="trace")
    with pytest.raises(measureflow.MeasureflowError, match="probes"):
        Simulation(Particles(x), linear(), "rk4", steps=2, log_density="hutchinson", probes=0)


@pytest.mark.parametrize("hide", [False, True], ids=["declared", "autograd"])
def test_flow_matching_between_gaussians_channel_is_the_closure_density(hide):
    # Gaussian endpoints: Z_t ~ N(m_t, Σ_t) (eq. 1.5), so the channel started at log N(x_0; m_0, Σ_0) equals
    # log N(x_t; m_t, Σ_t); the declared divergence tr A_t and the autograd trace both reach the ODE
    # tolerance (dopri5 at 1e-10: ~1e-9 here).
    data = Gaussian(torch.tensor([1.0, -0.5], dtype=F64), torch.tensor([[0.6, 0.2], [0.2, 0.3]], dtype=F64))
    field = measureflow.field("flow_matching", data=data, sigma=1.3)
    x = data.sample(25, torch.Generator().manual_seed(4), replicas=1)
    state = Particles(x, channels={"log_density": data.log_density(x)})
    solver = measureflow.integrator("dopri5", rtol=1e-10, atol=1e-10)
    result = Simulation(state, Opaque(field) if hide else field, solver, t0=0.0, t1=0.7, steps=1,
                        log_density="exact", progress=False).run()
    path = field.path(0.7)
    reference = Gaussian(path.mean[0], path.cov[0]).log_density(result.state.x)
    assert torch.allclose(result.state.log_density, reference, rtol=0, atol=1e-7)


@pytest.mark.parametrize("hide", [False, True], ids=["declared", "autograd"])
def test_ou_bridge_channel_is_the_marginal_log_pdf(hide):
    # The OU probability flow carries ρ_τ₀ to ρ_τ (MATH.md §2), a Gaussian mixture at every τ: the channel
    # started at log ρ_τ₀(x) equals log ρ_τ(x_τ) to the ODE tolerance (dopri5 at 1e-10), by the declared
    # Laplacian formula and by the autograd trace alike.
    data = GaussianMixture(torch.tensor([0.3, 0.7], dtype=F64), torch.tensor([[1.5, 0.0], [-1.0, 0.5]], dtype=F64),
                           torch.tensor([[[0.2, 0.05], [0.05, 0.1]], [[0.0, 0.0], [0.0, 0.0]]], dtype=F64))
    field = measureflow.field("ou_bridge", data=data, sigma=1.0, tau_min=0.05)
    start = field.marginal(0.05)
    x = start.sample(20, torch.Generator().manual_seed(6), replicas=1)
    state = Particles(x, channels={"log_density": start.log_density(x)})
    solver = measureflow.integrator("dopri5", rtol=1e-10, atol=1e-10)
    result = Simulation(state, Opaque(field) if hide else field, solver, t0=0.05, t1=0.8, steps=1,
                        log_density="exact", progress=False).run()
    reference = field.marginal(0.8).log_density(result.state.x)
    assert torch.allclose(result.state.log_density, reference, rtol=0, atol=1e-7)
