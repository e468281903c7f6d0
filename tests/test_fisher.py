"""Fisher-information field (MATH.md §4, §13 row 2(C⁻¹ − C); levels of MATH-CHECKS.md D).

Closed forms in float64 at round-off or integrator level; each tolerance is derived next to its
assertion.
"""

from __future__ import annotations

import math

import pytest
import torch

import measureflow
from measureflow import CapabilityError, Gaussians, ParameterError, Particles, ShapeError, Simulation
from measureflow.measures import Empirical, Gaussian
from measureflow.simulation import Observer
from measureflow_plugins.fisher import FisherField
from samples import whitened

F64 = torch.float64
C0 = torch.diag(torch.tensor([4.0, 0.25], dtype=F64))
C_HALF = torch.tensor([1.7406979, 0.9344106], dtype=F64)  # MATH.md §4 at t = ½
_Q = torch.linalg.qr(torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(7)))[0]
SIGMA_B = _Q @ torch.diag(torch.tensor([0.6, 1.0, 1.8], dtype=F64)) @ _Q.T
MEAN_B = torch.tensor([0.5, -1.0, 0.2], dtype=F64)
# commutes with Σ_β (same eigenvectors) / does not
SIGMA_C = _Q @ torch.diag(torch.tensor([2.5, 0.4, 1.2], dtype=F64)) @ _Q.T
SIGMA_N = torch.tensor([[2.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 1.2]], dtype=F64)
MEAN_0 = torch.tensor([-1.0, 0.5, 1.0], dtype=F64)


pytestmark = pytest.mark.usefixtures("single_thread")


def target() -> Gaussian:
    return Gaussian(MEAN_B, SIGMA_B)


def test_reference_numbers_of_the_gamma_row():
    """C(t) = (I + (C₀² − I)e^{−4t})^{1/2}: diag(1.7406979, 0.9344106) at t = ½ (printed to 7 decimals).
    Near C = ¼ the rate ∂Ċ/∂C = −2/C² − 2 = −34 makes RK4 at h = 0.005 err ≈ 2e-8 (measured; fourth order,
    1.2e-9 at h = 0.0025); dopri5 at rtol 1e-10 errs 2e-11."""
    field = measureflow.field("fisher", target=Gaussian(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64)))
    start = Gaussians(torch.zeros(2, dtype=F64), C0)
    exact = field.solution(0.5, start)
    closed = torch.sqrt(1 + (torch.diagonal(C0) ** 2 - 1) * math.exp(-2.0))
    assert torch.allclose(exact.cov[0], torch.diag(closed), rtol=0, atol=1e-15)
    assert torch.allclose(exact.cov[0], torch.diag(C_HALF), rtol=0, atol=5e-8)
    runs = [("rk4", 100, {}, 1e-7), ("dopri5", 1, {"rtol": 1e-10, "atol": 1e-12}, 1e-9)]
    for name, steps, opts, tol in runs:
        result = Simulation(start, field, measureflow.integrator(name, **opts), 0.0, 0.5, steps=steps,
                            progress=False).run()
        assert result.ok
        assert torch.allclose(result.state.cov, exact.cov, rtol=0, atol=tol), name
        assert torch.allclose(result.state.cov[0], torch.diag(C_HALF), rtol=0, atol=5e-8 + tol), name


def test_commuting_non_centred_target_in_d3_and_the_target_free_flow():
    """Σ₀ sharing Σ_β's eigenvectors: Σ(t)² = e^{−4tP²}Σ₀² + (I − e^{−4tP²})P⁻², m(t) = m_β + e^{−tP²}(m₀ − m_β);
    no target: Σ(t) = (Σ₀² + 4tI)^{1/2}. dopri5 at rtol 1e-10 over t = 2: 1e-8 allowed."""
    integ = measureflow.integrator("dopri5", rtol=1e-10, atol=1e-12)
    for field, S0 in ((FisherField(target()), SIGMA_C), (FisherField(None), SIGMA_N)):
        start = Gaussians(MEAN_0, S0)
        exact = field.solution(2.0, start)
        result = Simulation(start, field, integ, 0.0, 2.0, steps=1, progress=False).run()
        assert result.ok
        assert torch.allclose(result.state.cov, exact.cov, rtol=0, atol=1e-8)
        assert torch.allclose(result.state.mean, exact.mean, rtol=0, atol=1e-8)
    free = FisherField(None).solution(2.0, Gaussians(MEAN_0, SIGMA_N)).cov[0]
    assert torch.allclose(free @ free, SIGMA_N @ SIGMA_N + 8.0 * torch.eye(3, dtype=F64), rtol=0, atol=1e-13)
    # the mean solves a linear ODE whatever Σ₀ is; the covariance of a non-commuting start has no closed form
    field = FisherField(target())
    start = Gaussians(MEAN_0, SIGMA_N)
    result = Simulation(start, field, integ, 0.0, 2.0, steps=1, progress=False).run()
    P2 = torch.linalg.inv(SIGMA_B @ SIGMA_B)
    expected = MEAN_B + torch.linalg.matrix_exp(-2.0 * P2) @ (MEAN_0 - MEAN_B)
    assert torch.allclose(result.state.mean[0], expected, rtol=0, atol=1e-8)
    with pytest.raises(CapabilityError, match="does not commute"):
        field.solution(1.0, start)


def test_closure_is_minus_half_the_gradient_of_the_first_variation():
    """v = −½∇δI, δI = −|∇log μ|² − 2Δlog μ + |∇V|² − 2ΔV (MATH.md §4); at a Gaussian the Laplacians are
    constants, so autograd of −|s_μ|² + |s_β|² with the measures' own scores gives v independently of the
    closure's formulas. Round-off level."""
    field = FisherField(target())
    state = Gaussians(MEAN_0, SIGMA_N)
    mu = Gaussian(MEAN_0, SIGMA_N)
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(1), dtype=F64).requires_grad_(True)
    delta = -(mu.score(x) ** 2).sum(-1) + (target().score(x) ** 2).sum(-1)
    (grad,) = torch.autograd.grad(delta.sum(), x)
    b, A = field.affine(0.0, state)
    affine = b + (x.detach() - MEAN_0) @ A[0].T
    assert torch.allclose(affine, -0.5 * grad, rtol=0, atol=1e-12)
    # non-commuting Σ₀: RK4 (h = 0.01) and tight dopri5 agree at RK4's level (rates ≤ 2/λ² + 2/λ_β² ≈ 14)
    start = Gaussians(MEAN_0, SIGMA_N)
    rk4 = Simulation(start, field, "rk4", 0.0, 1.0, steps=100, progress=False).run().state
    ref = Simulation(start, field, measureflow.integrator("dopri5", rtol=1e-11, atol=1e-13), 0.0, 1.0, steps=1,
                     progress=False).run().state
    assert torch.allclose(rk4.cov, ref.cov, rtol=0, atol=1e-7)


def test_field_vanishes_at_the_target():
    """b = 0, A = 0 at β; particles whose moments are exactly β's have v ≡ 0 (round-off)."""
    field = FisherField(target())
    b, A = field.affine(0.0, Gaussians(MEAN_B, SIGMA_B))
    assert float(b.abs().max()) < 1e-14 and float(A.abs().max()) < 1e-13
    cloud = Particles(whitened(500, MEAN_B, SIGMA_B, seed=2, root="symmetric")[None])
    assert float(field.velocity(0.0, cloud.x, cloud).abs().max()) < 1e-12
    assert float(field.energy(cloud)) < 1e-13


def test_energy_closed_form_descent_and_identity():
    """F = ½tr[Σ⁻¹ − 2P + P²Σ] + ½|P(m − m_β)|² equals ½E|∇log μ − ∇log β|² exactly on a whitened sample (the
    integrand is quadratic); γ: ½tr(C + C⁻¹ − 2I). Along the flow F decreases and dF/dt = −|b|² − tr(AΣAᵀ),
    checked by central differences along (ṁ, Σ̇) (δ = 1e-5: O(δ²) plus round-off 1e-11/δ, 1e-6 relative)."""
    field = FisherField(target())
    x = whitened(400, MEAN_0, SIGMA_N, seed=3, root="symmetric")[None]
    mu = Gaussian(MEAN_0, SIGMA_N)
    direct = 0.5 * ((mu.score(x) - target().score(x)) ** 2).sum(-1).mean()
    state = Gaussians(MEAN_0, SIGMA_N)
    assert torch.allclose(field.energy(state), direct[None], rtol=1e-12, atol=0)
    assert torch.allclose(field.energy(Particles(x)), direct[None], rtol=1e-12, atol=0)
    gamma_field = FisherField(Gaussian(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64)))
    C = torch.tensor([[2.0, 0.5], [0.5, 0.7]], dtype=F64)
    expected = 0.5 * torch.trace(C + torch.linalg.inv(C) - 2 * torch.eye(2, dtype=F64))
    assert torch.allclose(gamma_field.energy(Gaussians(torch.zeros(2, dtype=F64), C)), expected[None], rtol=1e-14)

    states = Gaussians(torch.stack([MEAN_0, MEAN_B]), torch.stack([SIGMA_N, SIGMA_C]))
    run = Simulation(states, field, "rk4", 0.0, 2.0, steps=200, observers=[Observer("energy", every=1)],
                     progress=False).run()
    values = torch.as_tensor(run.observables["energy"].values)
    assert bool((values[1:] <= values[:-1]).all()) and float(values[-1].max()) < 0.05 * float(values[0].min())
    for s in (states, run.state):
        b, A = field.affine(0.0, s)
        dS = A @ s.cov + s.cov @ A.transpose(-1, -2)
        delta = 1e-5
        rate = (field.energy(Gaussians(s.mean + delta * b, s.cov + delta * dS))
                - field.energy(Gaussians(s.mean - delta * b, s.cov - delta * dS))) / (2 * delta)
        dissipation = (b * b).sum(-1) + torch.einsum("rij,rjk,rik->r", A, s.cov, A)
        assert torch.allclose(rate, -dissipation, rtol=1e-6, atol=1e-12)


def test_particles_follow_the_moment_closure():
    """The moment-closure velocity is affine in x, so the particles' weighted moments follow the Gaussian
    closure whatever their law: a uniform (non-Gaussian), weighted cloud against the Gaussian state.
    Both by RK4 at h = 0.005 (different discretisations of the same ODE, each ~1e-9 here)."""
    field = FisherField(target())
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(2, 300, 3, generator=gen, dtype=F64) * 3 - 1
    w = torch.rand(2, 300, generator=gen, dtype=F64) + 0.5
    cloud = Particles(x, w / w.sum(-1, keepdim=True))
    start = Gaussians(cloud.mean(), cloud.covariance())
    moved = Simulation(cloud, field, "rk4", 0.0, 1.0, steps=200, progress=False).run().state
    closure = Simulation(start, field, "rk4", 0.0, 1.0, steps=200, progress=False).run().state
    assert torch.allclose(moved.covariance(), closure.cov, rtol=0, atol=1e-8)
    assert torch.allclose(moved.mean(), closure.mean, rtol=0, atol=1e-8)
    # and the particle energy is that of the closure they follow
    assert torch.allclose(field.energy(moved), field.energy(closure), rtol=1e-7, atol=0)


def test_bad_inputs_are_named():
    with pytest.raises(ParameterError, match="Gaussian"):
        FisherField(Empirical(torch.zeros(3, 2, dtype=F64)))
    with pytest.raises(ShapeError, match=r"\(R, N', 3\)"):
        FisherField(target()).velocity(0.0, torch.zeros(1, 4, 2, dtype=F64), None)
    with pytest.raises(ShapeError, match="d = 3 but the state has d = 2"):
        FisherField(target()).affine(0.0, Gaussians(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64)))
    field = measureflow.field("fisher", target=target())
    assert isinstance(field, FisherField) and field.capabilities == {"velocity", "affine", "energy"}
    assert field.describe()["target"]["mean"] == MEAN_B.tolist()
