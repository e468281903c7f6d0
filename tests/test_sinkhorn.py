"""Sinkhorn-divergence flow (MATH.md §7): Gaussian closure and its row, potentials and plans against POT,
the particle field against the closure, the particle flow against the boxed ODE, errors."""

import numpy as np
import ot
import pytest
import torch

import measureflow
from measureflow import CapabilityError, Gaussians, ParameterError, Particles, ShapeError, Simulation
from measureflow.measures import Empirical, Gaussian, GaussianMixture
from measureflow.observables import gaussian_sinkhorn_divergence, sinkhorn as sinkhorn_observable
from measureflow_plugins.sinkhorn import SinkhornField
from samples import relerr as rel, whitened, standard_gaussian as gamma, spectral

F64 = torch.float64
C0 = torch.diag(torch.tensor([4.0, 0.25], dtype=F64))
S3 = torch.tensor([[1.2, 0.4, -0.2], [0.4, 0.8, 0.1], [-0.2, 0.1, 0.5]], dtype=F64)
MB3 = torch.tensor([0.4, -0.3, 0.2], dtype=F64)
SB3 = torch.tensor([[0.9, -0.3, 0.1], [-0.3, 1.1, 0.25], [0.1, 0.25, 0.7]], dtype=F64)


pytestmark = pytest.mark.usefixtures("small_reductions")




def boxed_row(C, eps):
    """Ċ = (16C + ε²I)^{1/2} − (16C² + ε²I)^{1/2} (MATH.md §7, §13), evaluated independently with numpy."""
    return spectral(C, lambda lam: np.sqrt(16 * lam + eps**2) - np.sqrt(16 * lam**2 + eps**2))


def boxed_solution(C0, t, eps, steps=2000):
    """The boxed ODE keeps C₀'s eigenvectors (its right side is a spectral function of C), so each
    eigenvalue follows λ̇ = √(16λ + ε²) − √(16λ² + ε²); RK4 with 2000 steps (error ≪ 10⁻¹⁰)."""
    lam, U = np.linalg.eigh(C0)
    rate = (lambda l: np.sqrt(16 * l + eps**2) - np.sqrt(16 * l**2 + eps**2))
    h = t / steps
    for _ in range(steps):
        k1 = rate(lam)
        k2 = rate(lam + h / 2 * k1)
        k3 = rate(lam + h / 2 * k2)
        k4 = rate(lam + h * k3)
        lam = lam + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return U @ np.diag(lam) @ U.T


# -- Gaussian closure -----------------------------------------------------------------------------------------


def test_gaussian_row_reference_values():
    """diag(4, ¼) → diag(1.8787632, 0.6358442) at t = ½, ε = 1, and S₁(N(0, diag(4, ¼)), γ) = 1.2170010
    (MATH.md §7, printed to 7 decimals). Against the boxed ODE the closure's RK4 error is ∝ h⁴:
    1.6·10⁻¹¹ at h = 1/400, 10⁻¹² at h = 1/800."""
    field = measureflow.field("sinkhorn", target=gamma(2), epsilon=1.0)
    start = Gaussians(torch.zeros(2, dtype=F64), C0)
    assert abs(float(field.energy(start)[0]) - 1.2170010) < 5e-8
    run = Simulation(start, field, "rk4", 0.0, 0.5, steps=400, observers=["energy"], observe_every=20,
                     progress=False).run()
    end = run.state
    energy = run.observables["energy"].values[:, 0]
    assert (energy[1:] < energy[:-1]).all()
    assert torch.allclose(end.cov[0], torch.diag(torch.tensor([1.8787632, 0.6358442], dtype=F64)), atol=5e-8, rtol=0)
    assert np.allclose(end.cov[0].numpy(), boxed_solution(C0.numpy(), 0.5, 1.0), atol=5e-12, rtol=0)
    assert float(end.mean.abs().max()) == 0.0


def test_closure_is_the_constrained_gradient_of_janati():
    """Non-commuting, non-centred target in d = 3: A equals MATH.md's 2(C_σ(Σ, Σ_β)ᵀ − C_σ(Σ, Σ)ᵀ)Σ⁻¹ (written
    out with numpy) and −2∇_Σ S_ε of the closed form (central differences, error ~h² ≈ 10⁻¹⁰), b = −∇_m S_ε
    (MATH.md eq. 0.3)."""
    eps = 0.7
    s2 = eps / 2
    m = torch.tensor([0.1, 0.5, -0.4], dtype=F64)
    field = SinkhornField(Gaussian(MB3, SB3), epsilon=eps)
    b, A = field.affine(0.0, Gaussians(m, S3))
    S, Sb = S3.numpy(), SB3.numpy()
    root, inv_root = spectral(S, np.sqrt), spectral(S, lambda lam: lam**-0.5)
    D = spectral(4 * root @ Sb @ root + s2**2 * np.eye(3), np.sqrt)
    cross = 0.5 * (root @ D @ inv_root - s2 * np.eye(3))
    own = 0.5 * (spectral(4 * S @ S + s2**2 * np.eye(3), np.sqrt) - s2 * np.eye(3))
    literal = 2 * (cross.T - own.T) @ np.linalg.inv(S)
    assert np.allclose(A[0].numpy(), literal, atol=1e-12, rtol=0)

    def F(mean, cov):
        return float(gaussian_sinkhorn_divergence(mean, cov, MB3, SB3, eps))

    h = 1e-5
    grad_S = torch.zeros(3, 3, dtype=F64)
    for i in range(3):
        for j in range(3):
            E = torch.zeros(3, 3, dtype=F64)
            E[i, j] += 0.5
            E[j, i] += 0.5  # symmetric direction: dF = tr(∇_Σ F dΣ)
            grad_S[i, j] = (F(m, S3 + h * E) - F(m, S3 - h * E)) / (2 * h)
    grad_m = torch.tensor([(F(m + h * e, S3) - F(m - h * e, S3)) / (2 * h) for e in torch.eye(3, dtype=F64)], dtype=F64)
    assert rel(A[0], -2 * grad_S) < 1e-8
    assert torch.allclose(b[0], -grad_m, atol=1e-8, rtol=0) and torch.allclose(b[0], 2 * (MB3 - m), atol=1e-15, rtol=0)


def test_closure_rows_and_limits():
    """Toward γ: 2AC = the boxed row; ε → 0 gives the W2 row 4(C^{1/2} − C); ε·row → 8(C − C²) as ε → ∞
    (MATH-CHECKS: 2·10⁻⁵ at ε = 1000, the O(1/ε) remainder)."""
    C = S3.numpy()

    def rate(eps):
        b, A = SinkhornField(gamma(3), epsilon=eps).affine(0.0, Gaussians(torch.zeros(3, dtype=F64), S3))
        return (A[0] @ S3 + S3 @ A[0].T).numpy()

    assert np.allclose(rate(0.7), boxed_row(C, 0.7), atol=1e-12, rtol=0)
    w2 = 4 * (spectral(C, np.sqrt) - C)
    assert np.linalg.norm(rate(1e-7) - w2) < 1e-6 * np.linalg.norm(w2)
    poly = 8 * (C - C @ C)
    assert np.linalg.norm(1000.0 * rate(1000.0) - poly) < 1e-4 * np.linalg.norm(poly)


def test_gaussian_energy_identity_and_fixed_point():
    """dS_ε/dt = −|b|² − tr(AΣAᵀ) along the closure (MATH.md eq. 0.2), 4-point stencil at s = 10⁻³
    (truncation ~s⁴ ≈ 10⁻¹², rounding ε|S|/s ≈ 10⁻¹³); b = A = 0 at the target."""
    field = SinkhornField(Gaussian(MB3, SB3), epsilon=0.7)
    m = torch.tensor([0.1, 0.5, -0.4], dtype=F64)
    b, A = field.affine(0.0, Gaussians(m, S3))
    Sdot = A[0] @ S3 + S3 @ A[0].T
    s = 1e-3
    G = [float(field.energy(Gaussians(m + c * s * b[0], S3 + c * s * Sdot))[0]) for c in (-2, -1, 1, 2)]
    dG = (G[0] - 8 * G[1] + 8 * G[2] - G[3]) / (12 * s)
    dissipation = float((b**2).sum() + torch.trace(A[0] @ S3 @ A[0].T))
    assert abs(dG + dissipation) < 1e-9 * dissipation
    b, A = field.affine(0.0, Gaussians(MB3, SB3))
    assert float(b.abs().max()) == 0.0 and float(A.abs().max()) < 1e-13


# -- particles: potentials, plans and velocities against POT ---------------------------------------------------


def _weighted_problem(seed, N=40, M=30):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 2, generator=gen, dtype=F64) * torch.tensor([1.5, 0.7], dtype=F64)
    w = torch.rand(N, generator=gen, dtype=F64) + 0.3
    y = torch.randn(M, 2, generator=gen, dtype=F64) * 0.8 + torch.tensor([1.0, -0.5], dtype=F64)
    q = torch.rand(M, generator=gen, dtype=F64) + 0.3
    return x, w / w.sum(), y, q / q.sum()


def test_potentials_plans_and_velocity_against_pot():
    """POT's log-domain Sinkhorn (ot.sinkhorn, method="sinkhorn_log", cost |x − y|², reg ε) gives the
    same plans Πᵢⱼ = wᵢqⱼe^{(fᵢ + gⱼ − Cᵢⱼ)/ε} and potentials up to the shift (f + c, g − c); the velocity at
    the particles is 2(Σⱼ Πᵢⱼyⱼ − Σₖ Π^{μμ}ᵢₖxₖ)/wᵢ with POT's plans; S_ε equals the observable (ot.solve).
    Both solvers stop at marginal errors ≤ 10⁻¹², so agreement to 10⁻⁹ is the expected level."""
    eps = 0.5
    x, w, y, q = _weighted_problem(0)
    state = Particles(x[None], w[None])
    field = SinkhornField(Empirical(y, q), epsilon=eps, tol=1e-13, max_iter=5000)
    pot = field.potentials(state)
    f, g, f_mm = pot["f_mu_beta"][0].numpy(), pot["g_mu_beta"][0].numpy(), pot["f_mu_mu"][0].numpy()
    X, W, Y, Q = x.numpy(), w.numpy(), y.numpy(), q.numpy()

    def pot_solve(a, wa, b, wb):
        _, log = ot.sinkhorn(wa, wb, ot.dist(a, b), eps, method="sinkhorn_log", numItermax=20000,
                             stopThr=1e-14, log=True)
        return eps * (log["log_u"] - np.log(wa)), eps * (log["log_v"] - np.log(wb))

    fp, gp = pot_solve(X, W, Y, Q)
    shift = np.mean(f - fp)
    assert np.allclose(f - shift, fp, atol=1e-9, rtol=0) and np.allclose(g + shift, gp, atol=1e-9, rtol=0)
    plan = W[:, None] * Q[None] * np.exp((fp[:, None] + gp[None] - ot.dist(X, Y)) / eps)
    ours = W[:, None] * Q[None] * np.exp((f[:, None] + g[None] - ot.dist(X, Y)) / eps)
    assert np.abs(ours - plan).max() < 1e-11 and np.abs(plan.sum(0) - Q).max() < 1e-11
    fa, ga = pot_solve(X, W, X, W)
    assert np.allclose(f_mm, 0.5 * (fa + ga), atol=1e-9, rtol=0)  # the symmetric solution of (μ, μ)
    self_plan = W[:, None] * W[None] * np.exp((fa[:, None] + ga[None] - ot.dist(X, X)) / eps)
    expected = 2 * (plan @ Y - self_plan @ X) / W[:, None]
    v = field.velocity(0.0, state.x, state)[0].numpy()
    assert np.allclose(v, expected, atol=1e-9, rtol=0)
    energy = field.energy(state)
    assert torch.allclose(energy, sinkhorn_observable(state, target=Empirical(y, q), epsilon=eps, tol=1e-12),
                          atol=1e-9, rtol=0)


def test_velocity_off_the_particles_and_options_agree():
    """The potentials extend by the c-transform: at any point v is the dense softmax formula; every solver
    option (plain or fixed over-relaxation, ε-scaling, cold or warm start) reaches the same fixed point."""
    eps = 0.8
    x, w, y, q = _weighted_problem(1)
    state = Particles(x[None], w[None])
    base = SinkhornField(Empirical(y, q), epsilon=eps, tol=1e-12, max_iter=5000)
    queries = torch.randn(1, 25, 2, generator=torch.Generator().manual_seed(2), dtype=F64) * 2
    v = base.velocity(0.0, queries, state)
    pot = base.potentials(state)

    def bary(points, logw, phi):
        logits = logw + (phi - ((queries[0, :, None] - points) ** 2).sum(-1)) / eps
        return torch.softmax(logits, -1) @ points

    dense = 2 * (bary(y, q.log(), pot["g_mu_beta"][0]) - bary(x, w.log(), pot["f_mu_mu"][0]))
    assert torch.allclose(v[0], dense, atol=1e-12, rtol=0)
    ref = base.velocity(0.0, state.x, state)
    for options in ({"relaxation": 1.0}, {"relaxation": 1.5}, {"epsilon_scaling": 0.5}, {"warm_start": False}):
        other = SinkhornField(Empirical(y, q), epsilon=eps, tol=1e-12, max_iter=5000, **options)
        assert torch.allclose(other.velocity(0.0, state.x, state), ref, atol=1e-9, rtol=0), options
    moved = Particles(state.x + 0.05, state.weights)
    warm = base.velocity(0.0, moved.x, moved)  # starts from the cached potentials
    base.reset()
    assert torch.allclose(base.velocity(0.0, moved.x, moved), warm, atol=1e-9, rtol=0)


def test_replicas_are_independent():
    """R = 2 weighted replicas, one target per replica, equal the two single-replica fields."""
    x0, w0, y0, q0 = _weighted_problem(3)
    x1, w1, y1, q1 = _weighted_problem(4)
    state = Particles(torch.stack([x0, x1]), torch.stack([w0, w1]))
    target = Particles(torch.stack([y0, y1]), torch.stack([q0, q1]))
    both = SinkhornField(target, epsilon=0.6, tol=1e-12)
    v, energy = both.velocity(0.0, state.x, state), both.energy(state)
    for r, (x, w, y, q) in enumerate(((x0, w0, y0, q0), (x1, w1, y1, q1))):
        one = SinkhornField(Empirical(y, q), epsilon=0.6, tol=1e-12)
        single = Particles(x[None], w[None])
        assert torch.allclose(v[r], one.velocity(0.0, single.x, single)[0], atol=1e-10, rtol=0)
        assert torch.allclose(energy[r], one.energy(single)[0], atol=1e-10, rtol=0)


def test_field_vanishes_when_mu_is_beta():
    """μ = β with the atoms permuted: f_μβ and f_μμ solve the same problem (up to the shift (c, −c), which the
    softmax ignores), so v = 0 up to the potentials' tolerance (10⁻¹²·ε, times 2·diameter ≈ 10⁻¹¹)."""
    y = whitened(150, torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64), 5)
    perm = torch.randperm(150, generator=torch.Generator().manual_seed(6))
    field = SinkhornField(Empirical(y), epsilon=1.0, tol=1e-12)
    state = Particles(y[perm][None])
    assert float(field.velocity(0.0, state.x, state).abs().max()) < 1e-10
    assert abs(float(field.energy(state)[0])) < 1e-10


def test_particle_field_matches_the_gaussian_closure():
    """The field on whitened Gaussian samples (N = M = 1200, non-commuting non-centred target, ε = 1),
    regressed on x, gives the closure's (b, A). A carries the finite-N error of the field, O(N^{-1/2})
    (MATH-CHECKS: 0.38 % at N = 2500; here 0.7–1.0 % over seeds at N = 1200, 0.4–0.55 % at 2500); 2 % is
    2× that, while σ² = ε instead of ε/2 would move A by 4.9 %. b = 2(m_β − m) exactly when the marginals
    hold, i.e. up to 2·tol·max|y| ≈ 10⁻⁷ at tol = 10⁻⁸."""
    m, S = torch.tensor([0.5, -0.3], dtype=F64), torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=F64)
    mb, Sb = torch.tensor([-1.0, 0.5], dtype=F64), torch.tensor([[1.0, -0.4], [-0.4, 0.8]], dtype=F64)
    N = 1200
    x = whitened(N, m, S, 0)
    field = SinkhornField(Empirical(whitened(N, mb, Sb, 1)), epsilon=1.0, tol=1e-8)
    v = field.velocity(0.0, x[None], Particles(x[None]))[0]
    b_hat = v.mean(0)
    A_hat = (v - b_hat).T @ (x - m) / N @ torch.linalg.inv(S)
    b, A = SinkhornField(Gaussian(mb, Sb), epsilon=1.0).affine(0.0, Gaussians(m, S))
    assert rel(A_hat, A[0]) < 0.02
    assert float((b_hat - b[0]).abs().max()) < 1e-7


def test_particle_flow_follows_the_boxed_ode():
    """N = M = 300 whitened samples, ε = 1, target γ, C₀ non-diagonal: the particles' covariance against the
    boxed ODE at t = 0.3 … 1.2 (RK4, h = 0.3; time error ≲ 0.05 %, from h = 0.1 vs 0.3). The finite-N
    error is O(N^{-1/2}): MATH-CHECKS has 0.13–0.21 % at N = 1200, which scales to ≈ 0.4 % at N = 300
    (observed 0.24–0.52 % over four seeds, 0.14–0.30 % at N = 600); 1 % is 2× that, while ε = 2 in place of
    ε = 1 would move C by 2.7–4.3 %. The energy S_ε decreases at every step (MATH.md eq. 0.2)."""
    C = torch.tensor([[3.0, 1.0], [1.0, 0.6]], dtype=F64)
    N = 300
    state = Particles(whitened(N, torch.zeros(2, dtype=F64), C, 0)[None])
    field = SinkhornField(Empirical(whitened(N, torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64), 1)),
                          epsilon=1.0, tol=1e-5)
    energies = [float(field.energy(state)[0])]
    for k in range(4):
        state = Simulation(state, field, "rk4", 0.3 * k, 0.3 * (k + 1), steps=1, progress=False).run().state
        exact = torch.from_numpy(boxed_solution(C.numpy(), 0.3 * (k + 1), 1.0))
        assert rel(state.covariance()[0], exact) < 0.01, 0.3 * (k + 1)
        energies.append(float(field.energy(state)[0]))
    assert all(b < a for a, b in zip(energies, energies[1:])) and energies[-1] < 0.1 * energies[0]
    # both means are 0, so ṁ = b = 0 up to the marginal errors, |ṁ| ≤ 2·tol·max|x| ≈ 10⁻⁴
    assert float(state.mean().abs().max()) < 1e-4


# -- errors ---------------------------------------------------------------------------------------------------


def test_bad_inputs_are_named():
    g2 = gamma(2)
    for kwargs, match in (
        ({"epsilon": 0.0}, "epsilon"),
        ({"tol": -1.0}, "tol"),
        ({"max_iter": 0}, "max_iter"),
        ({"check_every": True}, "check_every"),
        ({"relaxation": 2.5}, r"relaxation must be 'auto' or a number in \[1, 2\)"),
        ({"epsilon_scaling": 1.5}, r"epsilon_scaling must lie in \(0, 1\)"),
    ):
        with pytest.raises(ParameterError, match=match):
            SinkhornField(g2, **kwargs)
    eye = torch.eye(2, dtype=F64)
    mix = GaussianMixture(torch.tensor([0.5, 0.5], dtype=F64), eye, eye.expand(2, 2, 2))
    with pytest.raises(ParameterError, match="samples=<n>"):
        SinkhornField(mix)
    p = Particles(torch.randn(1, 10, 2, dtype=F64))
    with pytest.raises(CapabilityError, match="samples=<n>"):
        SinkhornField(g2).velocity(0.0, p.x, p)
    assert SinkhornField(g2, samples=40).velocity(0.0, p.x, p).shape == p.x.shape
    gauss = Gaussians(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    samples = SinkhornField(Empirical(torch.randn(12, 2, dtype=F64)))
    with pytest.raises(CapabilityError, match="needs a Gaussian target"):
        samples.affine(0.0, gauss)
    with pytest.raises(CapabilityError, match="no Gaussian closure"):
        Simulation(gauss, samples, "rk4", 0.0, 1.0, steps=1)
    with pytest.raises(CapabilityError, match="Gaussian target only"):
        samples.energy(gauss)
    p3 = Particles(torch.zeros(1, 4, 3, dtype=F64))
    with pytest.raises(ShapeError, match="d = 2 but the state has d = 3"):
        samples.velocity(0.0, p3.x, p3)
    with pytest.raises(ShapeError, match="3 replicas"):
        SinkhornField(torch.randn(3, 6, 2, dtype=F64)).velocity(0.0, torch.zeros(2, 4, 2, dtype=F64),
                                                               Particles(torch.randn(2, 4, 2, dtype=F64)))
    stubborn = SinkhornField(Empirical(torch.randn(12, 2, dtype=F64) * 3), epsilon=0.05, max_iter=3, tol=1e-12)
    with pytest.warns(RuntimeWarning, match="max_iter = 3"):
        stubborn.velocity(0.0, p.x, p)
