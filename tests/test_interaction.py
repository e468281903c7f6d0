"""Pairwise interaction energy (MATH.md §0, §6): MMD's self term, exact linear and 1-D equilibria,
the energy identity (0.2), confinement, errors."""

import math

import pytest
import torch

import measureflow
from measureflow import CapabilityError, Gaussians, ParameterError, Particles, ShapeError, Simulation
from measureflow.measures import Empirical
from measureflow_plugins.interaction import InteractionField
from measureflow_plugins.mmd import MMDField

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("small_reductions")


def _weighted(R, N, d, seed, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(R, N, d, generator=gen, dtype=F64) + shift
    w = torch.rand(R, N, generator=gen, dtype=F64) + 0.3
    return Particles(x, w / w.sum(-1, keepdim=True))


@pytest.mark.parametrize("kernel", ["gaussian", "laplace", "energy", "imq", "callable"])
def test_mmd_self_term_is_an_interaction(kernel):
    """With W = 2k: v_MMD[μ](x) = v_W[μ](x) − v_W[β](x) (the self and target halves of MATH.md §6), and
    MMD²(μ, β) = 2E(μ) + 2E(β) − 4E(½(μ + β)) since E(ν) = ∬k dν dν is bilinear."""
    k = (lambda r2: torch.exp(-r2 / 1.28) / (1 + r2)) if kernel == "callable" else kernel
    mu = _weighted(2, 50, 2, 0)
    beta = _weighted(1, 40, 2, 1, shift=0.8)
    mmd = MMDField(Empirical(beta.x[0], beta.weights[0]), kernel=k, bandwidth=0.7)
    pair = InteractionField(kernel=k, bandwidth=0.7, strength=2.0)
    beta_r = Particles(beta.x.expand(2, -1, -1), beta.weights.expand(2, -1))
    x = mu.x
    expected = pair.velocity(0.0, x, mu) - pair.velocity(0.0, x, beta_r)
    assert torch.allclose(mmd.velocity(0.0, x, mu), expected, atol=1e-13, rtol=1e-12)
    mix = Particles(torch.cat([mu.x, beta_r.x], 1), 0.5 * torch.cat([mu.weights, beta_r.weights], 1))
    energy = 2 * pair.energy(mu) + 2 * pair.energy(beta_r) - 4 * pair.energy(mix)
    assert torch.allclose(mmd.energy(mu), energy, atol=1e-12, rtol=1e-10)


def test_quadratic_profile_contracts_to_the_mean_exactly():
    """W(z) = ½|z|² through the callable path and V = ½a|x|²: v = −(x − m) − ax, so m(t) = e^{−at}m₀ and
    x − m shrinks as e^{−(1+a)t}. RK4 global error ≈ t e^{−λt}λ⁵h⁴/5!·|x₀ − m₀| ≈ 2·10⁻⁸ (λ = 1.5, h = 0.025)."""
    a = 0.5
    field = InteractionField(kernel=lambda r2: 0.5 * r2, confinement=a)
    start = _weighted(2, 40, 3, 2, shift=1.0)
    m0 = start.mean()
    end = Simulation(start, field, "rk4", 0.0, 1.0, steps=40, progress=False).run().state
    exact = m0[:, None] * math.exp(-a) + (start.x - m0[:, None]) * math.exp(-(1 + a))
    assert torch.allclose(end.x, exact, atol=5e-8, rtol=0)
    S = start.covariance()
    trace = torch.diagonal(S, dim1=-2, dim2=-1).sum(-1)
    # ½∬½|x − y|²dμdμ = ½ tr Σ and ∫½a|x|² = ½a(tr Σ + |m|²)
    assert torch.allclose(field.energy(start), 0.5 * trace + 0.5 * a * (trace + (m0**2).sum(-1)), atol=1e-12, rtol=0)


def test_repulsion_in_a_harmonic_trap_reaches_the_discrete_equilibrium():
    """1-D, W(z) = −|z| (kernel "energy", strength 1) and V = ½x²: v(xᵢ) = Σₖwₖ sign(xᵢ − xₖ) − xᵢ, so with
    the order fixed each sorted particle relaxes as xᵢ(t) = cᵢ + (xᵢ(0) − cᵢ)e^{−t}, cᵢ = (2i − N − 1)/N —
    the N-point quantiles of the continuum equilibrium, uniform on [−1, 1] (δF = const ⇒ μ = ½)."""
    N = 64
    x0 = torch.linspace(-3.0, 2.0, N, dtype=F64) ** 3 / 4 + 0.1
    field = InteractionField(kernel="energy", confinement=1.0)
    run = Simulation(Particles(x0[None, :, None]), field, "rk4", 0.0, 3.0, steps=120, observers=["energy"],
                     observe_every=1, progress=False).run()
    c = (2 * torch.arange(1, N + 1, dtype=F64) - N - 1) / N
    exact = c + (x0 - c) * math.exp(-3.0)
    # a linear ODE: RK4 global error ≈ t e^{−t}h⁴/5!·max|x₀ − c| ≈ 3·10⁻⁹ at h = 0.025
    assert torch.allclose(run.state.x[0, :, 0], exact, atol=1e-8, rtol=0)
    energy = run.observables["energy"].values[:, 0]
    assert (energy[1:] < energy[:-1]).all()


def test_energy_identity_with_a_confinement():
    """dF/dt = −Σᵢwᵢ|v(xᵢ)|² (MATH.md eq. 0.2) for a repulsive Gaussian W and a quartic V (autograd
    gradient). dF/dt by the 4-point stencil in s ↦ F(x + s v): truncation ∝ s⁴ (1.4·10⁻¹⁰ relative at
    s = 10⁻³ here, so ≈ 6·10⁻¹³ at s = 2.5·10⁻⁴), rounding ≈ ε|F|/(s·Σw|v|²) ≈ 10⁻¹⁴."""
    V = (lambda x: 0.25 * (x**2).sum(-1) ** 2)
    field = InteractionField(kernel="gaussian", bandwidth=0.6, strength=-1.5, confinement=V)
    state = _weighted(1, 80, 2, 3)
    v = field.velocity(0.0, state.x, state)
    explicit = InteractionField(kernel="gaussian", bandwidth=0.6, strength=-1.5, confinement=V,
                                confinement_gradient=lambda x: (x**2).sum(-1, keepdim=True) * x)
    assert torch.allclose(explicit.velocity(0.0, state.x, state), v, atol=1e-13, rtol=0)
    s = 2.5e-4
    F = [float(field.energy(Particles(state.x + c * s * v, state.weights))[0]) for c in (-2, -1, 1, 2)]
    dF = (F[0] - 8 * F[1] + 8 * F[2] - F[3]) / (12 * s)
    dissipation = float((state.weights * (v**2).sum(-1)).sum())
    assert abs(dF + dissipation) < 4e-12 * dissipation


def test_bad_inputs_are_named():
    with pytest.raises(ParameterError, match="not functions of x − y"):
        InteractionField(kernel="poly2")
    with pytest.raises(ParameterError, match="unknown interaction kernel 'coulomb'"):
        InteractionField(kernel="coulomb")
    with pytest.raises(ParameterError, match="bandwidth"):
        InteractionField(bandwidth=-1.0)
    with pytest.raises(ParameterError, match="strength must be finite"):
        InteractionField(strength=math.inf)
    with pytest.raises(ParameterError, match="a ≥ 0"):
        InteractionField(confinement=-1.0)
    with pytest.raises(ParameterError, match="needs the potential"):
        InteractionField(confinement_gradient=lambda x: x)
    with pytest.raises(ParameterError, match="callable confinement only"):
        InteractionField(confinement=1.0, confinement_gradient=lambda x: x)
    gauss = Gaussians(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    with pytest.raises(CapabilityError, match="no Gaussian closure"):
        Simulation(gauss, measureflow.field("interaction"), "rk4", 0.0, 1.0, steps=1)
    with pytest.raises(CapabilityError, match="Particles only"):
        InteractionField().energy(gauss)
    state = _weighted(1, 5, 2, 4)
    with pytest.raises(ShapeError, match="one value per point"):
        InteractionField(confinement=lambda x: x).velocity(0.0, state.x, state)
    with pytest.raises(ShapeError, match=r"\(R, N', 2\)"):
        InteractionField().velocity(0.0, torch.zeros(1, 3, 3, dtype=F64), state)
