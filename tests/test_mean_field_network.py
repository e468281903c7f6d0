"""Mean-field two-layer network (MATH.md §11, MATH-CHECKS.md I): the Riccati matrix B and the closure, particles
vs closure, invariants, the least-squares limit, velocities vs autograd of the first variation, weights, errors."""

import pytest
import torch

import measureflow
from measureflow import CapabilityError, Gaussians, ParameterError, Particles, ShapeError, Simulation, StateError
from measureflow.simulation import Observer
from measureflow_plugins.mean_field_network import MeanFieldNetwork
from samples import relerr, whitened

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")

# d = 3 inputs, d' = 2 outputs (the shapes MATH-CHECKS I used: Σ_UV is 3 × 2), K = 40 noisy linear data.
_g = torch.Generator().manual_seed(5)
K = 40
Z = torch.randn(K, 3, generator=_g, dtype=F64)
W = torch.tensor([[1.0, -0.5, 0.3], [0.2, 0.8, -0.6]], dtype=F64)
Y = Z @ W.T + 0.3 * torch.randn(K, 2, generator=_g, dtype=F64)
_Q = torch.linalg.qr(torch.randn(5, 5, generator=_g, dtype=F64))[0]
SIGMA0 = _Q @ torch.diag(torch.tensor([1.2, 0.9, 0.6, 0.4, 0.25], dtype=F64)) @ _Q.T  # non-diagonal, eig .25 … 1.2
# 1-D regression with a bias input for the ReLU network: z̃ = (z, 1), y = sin(3z) + noise.
_z1 = torch.linspace(-1, 1, 30, dtype=F64)
Z_RELU = torch.stack([_z1, torch.ones_like(_z1)], -1)
Y_RELU = torch.sin(3 * _z1) + 0.1 * torch.randn(30, generator=_g, dtype=F64)


def linear_net():
    return measureflow.field("mean_field_network", inputs=Z, outputs=Y)


def relu_net():
    return measureflow.field("mean_field_network", inputs=Z_RELU, outputs=Y_RELU, activation="relu")


def random_weights(R, N, seed):
    w = torch.rand(R, N, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.2
    return w / w.sum(1, keepdim=True)


def first_variation_by_data(z, y, activation, x, w, p):
    """δf(α)(p) = (2/K)Σ_k ⟨r_k, v⟩σ(⟨u, z_k⟩) written from the data directly (no field code): α = Σ wᵢδ_{xᵢ}."""
    sigma = (lambda s: s) if activation == "linear" else torch.relu
    d = z.shape[1]
    g = torch.einsum("rn,rnkj->rkj", w, x[..., None, d:] * sigma(x[..., :d] @ z.T)[..., None])  # (R, K, d')
    r = g - y
    return 2.0 / z.shape[0] * torch.einsum("rkj,rmj,rmk->rm", r, p[..., d:], sigma(p[..., :d] @ z.T))


# -- the Riccati matrix and the closure ----------------------------------------------------------------------


def test_velocity_matrix_blocks_energy_and_closure():
    """B = −2[[0, S_zz M_UV − S_zy], [M_VU S_zz − S_yz, 0]] (MATH.md §11, sign of §14.3) from data sums; the
    particle velocity is B p; the closure is (b, A) = (Bm, B); the risk monitor equals (1/K)Σ|M_VU z_k − y_k|²."""
    field = linear_net()
    x = whitened(500, torch.zeros(5, dtype=F64), SIGMA0, 0)[None]
    state = Particles(x)
    M = x[0].T @ x[0] / 500
    assert relerr(field.second_moment(state)[0], SIGMA0) < 1e-13  # whitened: the second moment is Σ₀
    S_zz, S_yz = Z.T @ Z / K, Y.T @ Z / K
    B = field.velocity_matrix(state)[0]
    assert torch.allclose(B[3:, :3], -2 * (M[3:, :3] @ S_zz - S_yz), atol=1e-13, rtol=0)
    assert torch.allclose(B[:3, 3:], -2 * (S_zz @ M[:3, 3:] - S_yz.T), atol=1e-13, rtol=0)
    assert B[:3, :3].abs().max() == 0 and B[3:, 3:].abs().max() == 0
    assert torch.allclose(B, B.T, atol=1e-14, rtol=0) and abs(float(torch.trace(B))) == 0.0
    assert torch.allclose(field.velocity(0.0, x, state), x @ B.T, atol=1e-13, rtol=0)
    # Gaussian N(m, Σ): B is built from M = Σ + mmᵀ, and v(x) = Bx means b = Bm, A = B.
    m = torch.tensor([0.3, -0.2, 0.5, 0.1, -0.4], dtype=F64)
    gauss = Gaussians(m, SIGMA0)
    b, A = field.affine(0.0, gauss)
    B_m = field.velocity_matrix(Gaussians(torch.zeros(5, dtype=F64), SIGMA0 + torch.outer(m, m)))
    assert torch.allclose(A, B_m, atol=1e-14, rtol=0) and torch.allclose(b[0], B_m[0] @ m, atol=1e-14, rtol=0)
    # f = tr(M_VU S_zz M_UV) − 2tr(S_yz M_UV) + (1/K)Σ|y|² against the residuals, on particles and on N(0, Σ₀)
    residual = Z @ M[3:, :3].T - Y
    by_data = float((residual**2).sum() / K)
    assert float(field.energy(state)[0]) == pytest.approx(by_data, rel=1e-13)
    assert float(field.energy(Gaussians(torch.zeros(5, dtype=F64), SIGMA0))[0]) == pytest.approx(by_data, rel=1e-12)
    assert torch.allclose(field.predict(state, Z)[0], Z @ M[3:, :3].T, atol=1e-13, rtol=0)


@pytest.mark.parametrize("activation", ["linear", "relu"])
def test_velocity_is_minus_gradient_of_the_first_variation(activation):
    """v = −∇δf with δf from the data sums (autograd, weighted α, R = 2, queries ≠ the particles); the field's
    own first_variation agrees (MATH-CHECKS I: ∇δf to 5.9e-11 by finite differences; autograd is exact)."""
    z, y = (Z, Y) if activation == "linear" else (Z_RELU, Y_RELU[:, None])
    field = MeanFieldNetwork(z, y, activation=activation)
    D = field.dim
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 60, D, generator=g, dtype=F64)
    w = random_weights(2, 60, 2)
    p = torch.randn(2, 25, D, generator=g, dtype=F64).requires_grad_(True)
    delta = first_variation_by_data(z, y, activation, x, w, p)
    (grad,) = torch.autograd.grad(delta.sum(), p)
    state = Particles(x, w)
    v = field.velocity(0.0, p.detach(), state)
    assert torch.allclose(v, -grad, atol=1e-13, rtol=1e-12)
    assert float(v.abs().max()) > 0.1  # not trivially zero
    assert torch.allclose(field.first_variation(state, p.detach()), delta.detach(), atol=1e-13, rtol=1e-12)


@pytest.mark.parametrize("activation", ["linear", "relu"])
def test_first_variation_is_the_mixture_derivative(activation):
    """d/ds f((1 − s)α + sδ_p)|₀ = δf(p) − ∫δf dα (MATH.md §0; MATH-CHECKS I: 5.1e-10 by finite differences,
    exact here by autograd in s through the weights)."""
    z, y = (Z, Y) if activation == "linear" else (Z_RELU, Y_RELU)
    field = MeanFieldNetwork(z, y, activation=activation)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 40, field.dim, generator=g, dtype=F64)
    w = random_weights(1, 40, 4)
    p = torch.randn(1, 1, field.dim, generator=g, dtype=F64)
    s = torch.zeros((), dtype=F64, requires_grad=True)
    mixed = Particles(torch.cat([x, p], 1), torch.cat([(1 - s) * w, s.expand(1, 1)], 1))
    (slope,) = torch.autograd.grad(field.energy(mixed).sum(), s)
    state = Particles(x, w)
    expected = field.first_variation(state, p)[0, 0] - (w * field.first_variation(state, x)).sum()
    assert float(slope) == pytest.approx(float(expected), rel=1e-12, abs=1e-14)
    assert abs(float(expected)) > 1e-2


@pytest.mark.parametrize("activation", ["linear", "relu"])
def test_energy_gradient_is_the_weighted_velocity(activation):
    """∂f/∂pᵢ = wᵢ∇δf(pᵢ) = −wᵢ v(pᵢ): the flow is weighted gradient descent on the neurons, and the energy
    identity df/dt = −Σᵢwᵢ|v(pᵢ)|² (eq. 0.2) follows."""
    field = linear_net() if activation == "linear" else relu_net()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 50, field.dim, generator=g, dtype=F64).requires_grad_(True)
    w = random_weights(2, 50, 8)
    (grad,) = torch.autograd.grad(field.energy(Particles(x, w)).sum(), x)
    v = field.velocity(0.0, x.detach(), Particles(x.detach(), w))
    assert torch.allclose(grad, -w[..., None] * v, atol=1e-14, rtol=1e-12)


# -- particles vs the closure --------------------------------------------------------------------------------


def second_moment_observer(field, every):
    return Observer(lambda state, **_: field.second_moment(state), name="M", every=every)


def test_particles_follow_the_riccati_closure():
    """N = 2·10⁴ whitened neurons (empirical second moment exactly Σ₀) vs the closure [S] (23). ṗ = B(M)p is linear
    in p, so the particles' second moment obeys Ṁ = BM + MBᵀ exactly and only the integrator separates the two:
    MATH-CHECKS I has 1.3e-7, 4.7e-8, 2.5e-8, 1.8e-8 at t = .5 … 2; RK4 at h = .02 gives 1.2e-7 … 3.5e-8 here and
    h = .01 7.1e-9 … 2.1e-9 (×1/16: fourth order). The closure reference runs at h/4 (error ≤ 5e-10)."""
    field = linear_net()
    x0 = whitened(20_000, torch.zeros(5, dtype=F64), SIGMA0, 1)
    particles = Simulation(Particles(x0[None]), field, "rk4", 0.0, 2.0, steps=200,
                           observers=[second_moment_observer(field, 50)], progress=False).run()
    closure = Simulation(Gaussians(torch.zeros(5, dtype=F64), SIGMA0), field, "rk4", 0.0, 2.0, steps=800,
                         observers=[second_moment_observer(field, 200)], progress=False).run()
    a, b = particles.observables["M"], closure.observables["M"]
    assert list(a.times) == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0]) and list(b.times) == list(a.times)
    errors = [relerr(a.values[i], b.values[i]) for i in range(1, 5)]
    assert max(errors) < 1.5e-8, errors
    assert relerr(b.values[-1], b.values[0]) > 0.1  # the moments did move


def test_non_centred_particles_follow_the_closure_from_their_mean_and_covariance():
    """A non-zero mean is handled through M = Σ + mmᵀ: i.i.d. neurons around m ≠ 0 follow the closure started at their
    own empirical N(m̂, Σ̂) — second moment and mean (ṁ = Bm) — to RK4's error (h = .01: ~10⁻⁸)."""
    field = linear_net()
    m = torch.tensor([0.6, -0.4, 0.3, 0.5, -0.7], dtype=F64)
    noise = torch.randn(2000, 5, generator=torch.Generator().manual_seed(11), dtype=F64)
    x0 = m + noise @ torch.linalg.cholesky(SIGMA0).T
    start = Particles(x0[None])
    particles = Simulation(start, field, "rk4", 0.0, 1.0, steps=100, progress=False).run()
    closure = Simulation(Gaussians(start.mean(), start.covariance()), field, "rk4", 0.0, 1.0, steps=400,
                         progress=False).run()
    assert relerr(field.second_moment(particles.state), field.second_moment(closure.state)) < 2e-8
    assert relerr(particles.state.mean(), closure.state.mean) < 2e-8
    assert relerr(closure.state.mean, start.mean()) > 0.05  # the mean moves: ṁ = Bm ≠ 0


def test_invariants_least_squares_limit_and_monotone_risk():
    """Closure on t ∈ [0, 20], RK4 h = .01 (MATH.md §11, MATH-CHECKS I):

    * det M: MATH-CHECKS 4.0e-8 (relative drift); it is a degree-5 invariant, which RK4 keeps to O(h⁴) only —
      measured 8.2e-7, 5.0e-8, 3.1e-9 at h = .02, .01, .005 — so 1e-7 at h = .01;
    * tr M_UU − tr M_VV: linear in M, so every Runge–Kutta method keeps it to round-off (MATH-CHECKS 4.4e-15;
      measured 1.0e-14 after 2000 steps);
    * M_VU(20) = S_yz S_zz⁻¹: MATH-CHECKS 4.9e-14, measured 3e-15 (the slowest rate here makes e^{-λt} ≪ ulp);
    * the risk never increases (round-off allowed near the minimum) and reaches minimal_risk()."""
    field = linear_net()
    every = 50
    observers = [Observer(lambda s, **_: field.determinant(s), name="det", every=every),
                 Observer(lambda s, **_: field.trace_difference(s), name="trace", every=every),
                 Observer("energy", every=every)]
    result = Simulation(Gaussians(torch.zeros(5, dtype=F64), SIGMA0), field, "rk4", 0.0, 20.0, steps=2000,
                        observers=observers, progress=False).run()
    det = result.observables["det"].values.ravel()
    trace = result.observables["trace"].values.ravel()
    risk = result.observables["energy"].values.ravel()
    assert abs(det - det[0]).max() / det[0] < 1e-7
    assert abs(trace - trace[0]).max() < 1e-13 and abs(trace[0]) > 0.1
    limit = field.least_squares()
    assert torch.allclose(limit, torch.linalg.lstsq(Z, Y).solution.T, atol=1e-13, rtol=0)
    assert float((field.network_matrix(result.state)[0] - limit).abs().max()) < 1e-12
    assert (risk[1:] <= risk[:-1] + 1e-14 * risk[:-1]).all() and risk[0] > 10 * risk[-1]
    assert risk[-1] == pytest.approx(float(field.minimal_risk()), rel=1e-12)
    assert float(field.minimal_risk()) == pytest.approx(float(((Z @ limit.T - Y) ** 2).sum() / K), rel=1e-12)


def test_relu_run_descends_and_keeps_each_neurons_balance():
    """ReLU neurons (R = 2, weighted): the risk never increases along the RK4 run, and |u|² − |v|² stays put for every
    neuron (σ is 1-homogeneous). The kinks make RK4 first order for that quantity — measured drift 2.1e-3, 1.0e-3,
    5.0e-4, 2.5e-4 at h = .1, .05, .025, .0125 — while |u|² itself changes by O(1): so below 2e-3 at h = .05, and
    halving h halves it (a real drift would not shrink)."""
    field = relu_net()
    x0 = torch.randn(2, 100, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    start = Particles(x0, random_weights(2, 100, 9))

    def balance(x):
        return x[..., :2].square().sum(-1) - x[..., 2:].square().sum(-1)

    drifts = []
    for steps in (200, 400):
        result = Simulation(start, field, "rk4", 0.0, 10.0, steps=steps, observers=["energy"], observe_every=5,
                            progress=False).run()
        risk = result.observables["energy"].values
        assert (risk[1:] <= risk[:-1]).all() and (risk[-1] < 0.5 * risk[0]).all()
        drifts.append(float((balance(result.state.x) - balance(x0)).abs().max()))
        averaged = field.trace_difference(result.state) - field.trace_difference(start)
        assert float(averaged.abs().max()) <= drifts[-1]
    assert drifts[0] < 2e-3 and 1.7 < drifts[0] / drifts[1] < 2.3, drifts
    assert float((result.state.x[..., :2].square().sum(-1) - x0[..., :2].square().sum(-1)).abs().max()) > 0.3


@pytest.mark.parametrize("activation", ["linear", "relu"])
def test_duplicated_neurons_with_halved_weights_give_the_same_dynamics(activation):
    """Mean-field scaling: g = Σᵢwᵢvᵢσ(⟨uᵢ, z⟩) is an average, so splitting each neuron into two copies of half the
    weight (in shuffled order) changes neither the network nor the trajectory (round-off only)."""
    field = linear_net() if activation == "linear" else relu_net()
    g = torch.Generator().manual_seed(21)
    x0 = torch.randn(1, 40, field.dim, generator=g, dtype=F64)
    w = random_weights(1, 40, 22)
    order = torch.randperm(80, generator=g)
    x2, w2 = torch.cat([x0, x0], 1)[:, order], torch.cat([w, w], 1)[:, order] / 2
    one = Simulation(Particles(x0, w), field, "rk4", 0.0, 2.0, steps=40, progress=False).run().state
    two = Simulation(Particles(x2, w2), field, "rk4", 0.0, 2.0, steps=40, progress=False).run().state
    back = torch.empty_like(two.x)
    back[:, order] = two.x
    assert torch.allclose(back[:, :40], one.x, atol=1e-12, rtol=0)
    assert torch.allclose(back[:, 40:], one.x, atol=1e-12, rtol=0)
    assert relerr(one.x, x0) > 0.01  # the neurons did move
    # ... and copies of a single neuron make that neuron's own output, not N times it
    copies = Particles(x0[:, :1].expand(1, 7, -1).clone())
    u, v = x0[0, 0, : field.input_dim], x0[0, 0, field.input_dim :]
    z = field.data.inputs
    hidden = z @ u if activation == "linear" else torch.relu(z @ u)
    assert torch.allclose(field.predict(copies, z)[0], hidden[:, None] * v, atol=1e-13, rtol=0)


# -- errors --------------------------------------------------------------------------------------------------


def test_bad_input_is_refused_with_the_fix():
    with pytest.raises(ShapeError, match=r"one row per data point.*40 vs 39 rows"):
        MeanFieldNetwork(Z, Y[:39])
    with pytest.raises(ShapeError, match="shared by every replica"):
        MeanFieldNetwork(Z[None], Y)
    with pytest.raises(ParameterError, match="non-finite"):
        MeanFieldNetwork(Z, torch.full_like(Y, float("nan")))
    with pytest.raises(ParameterError, match="unknown activation 'tanh'.*'relu'"):
        MeanFieldNetwork(Z, Y, activation="tanh")
    with pytest.raises(ParameterError, match="inputs is required"):
        MeanFieldNetwork(outputs=Y)
    field = linear_net()
    x = torch.randn(1, 10, 4, dtype=F64)
    with pytest.raises(ShapeError, match=r"R\^5 \(inputs d = 3, outputs d' = 2\); x has dimension 4"):
        field.velocity(0.0, x, Particles(x))
    with pytest.raises(ShapeError, match="the state has dimension 4"):
        field.energy(Particles(x))
    with pytest.raises(ShapeError, match=r"z must have shape \(Q, 3\)"):
        field.predict(Particles(torch.randn(1, 10, 5, dtype=F64)), torch.zeros(4, 2, dtype=F64))
    singular = MeanFieldNetwork(torch.cat([Z[:, :2], Z[:, :1]], 1), Y)
    with pytest.raises(StateError, match="S_zz .* is singular.*linearly independent inputs"):
        singular.least_squares()


def test_relu_has_no_gaussian_closure():
    field = relu_net()
    assert "affine" not in field.capabilities and "affine" in linear_net().capabilities
    gauss = Gaussians(torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64))
    with pytest.raises(CapabilityError, match="no Gaussian closure"):
        Simulation(gauss, field, "rk4", 0.0, 1.0, steps=2)
    with pytest.raises(CapabilityError, match="activation='linear' only.*Particles"):
        field.affine(0.0, gauss)
    with pytest.raises(CapabilityError, match="least-squares limit exists for activation='linear' only"):
        field.least_squares()
    with pytest.raises(CapabilityError, match="Particles state"):
        field.energy(gauss)
    assert field.describe() == {"name": "mean_field_network", "activation": "relu", "input_dim": 2, "output_dim": 1,
                                "data_points": 30}
