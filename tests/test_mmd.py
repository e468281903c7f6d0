"""MMD flow (MATH.md §6): polynomial closure and exact solution, particles vs closure, kernel fields vs
autograd of MMD², the energy identity (0.2), analytic targets, errors."""

import math

import pytest
import torch

import measureflow
from measureflow import CapabilityError, Gaussians, ParameterError, Particles, ShapeError, Simulation
from measureflow.measures import Empirical, Gaussian, GaussianMixture
from measureflow.observables import mmd as mmd_observable
from measureflow_plugins.mmd import MMDField
from samples import relerr as rel, whitened, standard_gaussian as gamma

F64 = torch.float64
C0 = torch.diag(torch.tensor([4.0, 0.25], dtype=F64))
# d = 3, non-commuting with the target below; eigenvalues ~ 0.3 … 1.6
S3 = torch.tensor([[1.2, 0.4, -0.2], [0.4, 0.8, 0.1], [-0.2, 0.1, 0.5]], dtype=F64)
MB3 = torch.tensor([0.4, -0.3, 0.2], dtype=F64)
SB3 = torch.tensor([[0.9, -0.3, 0.1], [-0.3, 1.1, 0.25], [0.1, 0.25, 0.7]], dtype=F64)


pytestmark = pytest.mark.usefixtures("small_reductions")



# -- polynomial kernels: exact closure ----------------------------------------------------------------------


def test_poly_row_reference_and_closure():
    """Row 8(C − C²): C(½) = diag(1.0139281, 0.9479150) from diag(4, ¼) (MATH.md §6, printed to 7
    decimals); the closure integrated by RK4 lands on the closed form (RK4 error ∝ h⁴: 1.2·10⁻⁹ at
    h = 1/400, so ≈ 7·10⁻¹¹ at h = 1/800)."""
    field = measureflow.field("mmd", target=gamma(2), kernel="poly2")
    start = Gaussians(torch.zeros(2, dtype=F64), C0)
    exact = field.solution(0.5, start)
    reference = torch.diag(torch.tensor([1.0139281, 0.9479150], dtype=F64))
    assert torch.allclose(exact.cov[0], reference, atol=5e-8, rtol=0)
    row = C0 * math.exp(4) @ torch.linalg.inv(torch.eye(2, dtype=F64) - C0 + C0 * math.exp(4))
    assert torch.allclose(exact.cov[0], row, atol=1e-13, rtol=0)
    run = Simulation(start, field, "rk4", 0.0, 0.5, steps=400, observers=["energy"], observe_every=20,
                     progress=False).run()
    assert rel(run.state.cov, exact.cov) < 2e-10
    energy = run.observables["energy"].values[:, 0]
    assert (energy[1:] < energy[:-1]).all()
    # a sample target with the same first two moments is the same target for this kernel
    samples = MMDField(Empirical(whitened(50, torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64), 3)), kernel="poly2")
    b, A = samples.affine(0.0, start)
    assert torch.allclose(A[0], 4.0 * (torch.eye(2, dtype=F64) - C0), atol=1e-12, rtol=0) and b.abs().max() < 1e-12


def test_poly_solution_general_target_d3():
    """Σ(t)⁻¹ = e^{−4tM_β}Σ₀⁻¹e^{−4tM_β} + (I − e^{−8tM_β})M_β⁻¹ for a non-commuting, non-centred target:
    against RK4 of the closure (h = 1/400; RK4 error ≈ 10⁻¹¹ at these rates)."""
    field = MMDField(Gaussian(MB3, SB3), kernel="poly2")
    start = Gaussians(torch.zeros(3, dtype=F64), S3)
    run = Simulation(start, field, "rk4", 0.0, 0.5, steps=200, progress=False).run()
    exact = field.solution(0.5, start)
    assert rel(run.state.cov, exact.cov) < 1e-9
    assert float(run.state.mean.abs().max()) == 0.0  # the homogeneous kernel cannot move a centred mean
    M_b = SB3 + torch.outer(MB3, MB3)
    assert rel(field.solution(40.0, start).cov[0], M_b) < 1e-9  # fixed point M = M_β
    with pytest.raises(CapabilityError, match="centred"):
        field.solution(0.5, Gaussians(MB3, S3))
    with pytest.raises(CapabilityError, match="poly2"):
        MMDField(Gaussian(MB3, SB3), kernel="poly2_affine").solution(0.5, start)


def test_poly_particles_follow_the_closed_form():
    """N = 2·10⁴ particles in d = 3 with exactly whitened moments: the field 4(M_β − M)x is linear, so the
    empirical covariance obeys the closure exactly and only RK4's error separates it from the closed form
    (MATH-CHECKS: 8·10⁻⁸ at h = 0.01; rates here ≤ 8λ_max ≈ 13, so (13h)⁴/5! ≈ 2·10⁻⁷ per unit time)."""
    field = MMDField(Gaussian(MB3, SB3), kernel="poly2")
    x0 = whitened(20_000, torch.zeros(3, dtype=F64), S3, 0)
    state = Particles(x0[None])
    start = Gaussians(torch.zeros(3, dtype=F64), S3)
    for t0, t1 in ((0.0, 0.25), (0.25, 0.5)):
        state = Simulation(state, field, "rk4", t0, t1, steps=25, progress=False).run().state
        assert rel(state.covariance(), field.solution(t1, start).cov) < 3e-7, t1
        assert float(state.mean().abs().max()) < 1e-12


def test_poly_affine_kernel_moves_the_mean():
    """(1 + ⟨x, y⟩)²: v = 4(m_β − m) + 4(M_β − M)x; particles (whitened, non-centred start) against the
    Gaussian closure, both RK4 at h = 0.01 (MATH-CHECKS: cov 1.6·10⁻⁸, mean 1.2·10⁻⁸)."""
    field = MMDField(Gaussian(MB3, SB3), kernel="poly2_affine")
    m0 = torch.tensor([-0.5, 0.2, 0.3], dtype=F64)
    state = Particles(whitened(5000, m0, S3, 1)[None])
    gauss = Gaussians(m0, S3)
    state = Simulation(state, field, "rk4", 0.0, 0.4, steps=40, progress=False).run().state
    gauss = Simulation(gauss, field, "rk4", 0.0, 0.4, steps=40, progress=False).run().state
    assert rel(state.covariance(), gauss.cov) < 1e-7
    assert float((state.mean() - gauss.mean).abs().max()) < 1e-7
    far = Simulation(gauss, field, "rk4", 0.4, 6.0, steps=560, progress=False).run().state
    assert float((far.mean - MB3).abs().max()) < 1e-6 and rel(far.cov[0], SB3) < 1e-6  # reaches β


def test_poly_energies_agree_across_representations():
    """Particles (kernel sums, moment points) = dense wᵀKw − 2wᵀKq + qᵀKq = Gaussian closed form."""
    y = torch.randn(40, 3, generator=torch.Generator().manual_seed(2), dtype=F64) + MB3
    x = torch.randn(1, 30, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    for kernel, k in (("poly2", lambda a, b: (a @ b.T) ** 2), ("poly2_affine", lambda a, b: (1 + a @ b.T) ** 2)):
        field = MMDField(Empirical(y), kernel=kernel)
        dense = k(x[0], x[0]).mean() - 2 * k(x[0], y).mean() + k(y, y).mean()
        assert abs(float(field.energy(Particles(x))[0] - dense)) < 1e-10 * float(k(y, y).mean())
        moments = Gaussians(x[0].mean(0), torch.cov(x[0].T, correction=0))
        assert abs(float(field.energy(moments)[0] - dense)) < 1e-10 * float(k(y, y).mean())
    row = MMDField(gamma(2), kernel="poly2").energy(Gaussians(torch.zeros(2, dtype=F64), C0))
    assert abs(float(row[0]) - float(((C0 - torch.eye(2, dtype=F64)) ** 2).sum())) < 1e-12  # ‖C − I‖²_F


# -- kernel fields: against autograd of MMD² ----------------------------------------------------------------


def _dense_mmd(x, w, y, q, kernel, ell):
    """MMD² by dense matrices, differentiable in x; self pairs enter as k(0) (no gradient), as in the field."""

    def gram(a, b, same):
        sq = ((a[..., :, None, :] - b[..., None, :, :]) ** 2).sum(-1)
        pos = sq > 0
        r = torch.where(pos, sq, torch.ones_like(sq)).sqrt()
        if kernel == "gaussian":
            k = torch.exp(-sq / (2 * ell**2))
        elif kernel == "laplace":
            k = torch.where(pos, torch.exp(-r / ell), torch.ones_like(sq))
        elif kernel == "energy":
            k = torch.where(pos, -r, torch.zeros_like(sq))
        elif kernel == "imq":
            k = (1 + sq / ell**2) ** -0.5
        else:
            k = kernel(sq)
        return k

    xx = torch.einsum("rn,rnm,rm->r", w, gram(x, x, True), w)
    xy = torch.einsum("rn,rnm,m->r", w, gram(x, y[None], False), q)
    yy = q @ gram(y, y, True) @ q
    return xx - 2 * xy + yy


@pytest.mark.parametrize("kernel", ["gaussian", "laplace", "energy", "imq", "callable"])
def test_field_is_minus_the_gradient_of_mmd2(kernel):
    """∂F/∂xᵢ = −wᵢ v(xᵢ) for F = MMD², weighted particles, two replicas, weighted target (float64)."""
    gen = torch.Generator().manual_seed(4)
    R, N, M, d = 2, 60, 45, 2
    x = torch.randn(R, N, d, generator=gen, dtype=F64)
    w = torch.rand(R, N, generator=gen, dtype=F64) + 0.2
    w = w / w.sum(-1, keepdim=True)
    y = torch.randn(M, d, generator=gen, dtype=F64) * 0.7 + torch.tensor([1.0, -0.5], dtype=F64)
    q = torch.rand(M, generator=gen, dtype=F64) + 0.2
    q = q / q.sum()
    ell = 0.8
    k = (lambda r2: torch.exp(-r2 / 1.28) / (1 + r2)) if kernel == "callable" else kernel
    field = MMDField(Empirical(y, q), kernel=k, bandwidth=ell)
    state = Particles(x, w)
    v = field.velocity(0.0, x, state)
    xg = x.clone().requires_grad_(True)
    F = _dense_mmd(xg, w, y, q, k, ell)
    (grad,) = torch.autograd.grad(F.sum(), xg)
    assert torch.allclose(v, -grad / w[..., None], atol=1e-12, rtol=1e-10)
    assert torch.allclose(field.energy(state), F.detach(), atol=1e-12, rtol=1e-10)


def test_energy_identity_along_rbf_particles():
    """dF/dt = −Σᵢwᵢ|v(xᵢ)|² (MATH.md eq. 0.2; MATH-CHECKS 4.4·10⁻¹¹, the factor-2 check). dF/dt is the
    derivative of s ↦ F(x + s v) at 0 by the 4-point stencil, error s⁴F⁽⁵⁾/30 + 3ε|F|/(2s) ≈ 10⁻¹³ at s = 10⁻³."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 150, 2, generator=gen, dtype=F64) * 1.5
    y = torch.randn(120, 2, generator=gen, dtype=F64) * 0.6 + 1.0
    field = MMDField(Empirical(y), kernel="gaussian", bandwidth=1.0)
    state = Particles(x)
    v = field.velocity(0.0, x, state)
    s = 1e-3
    F = [float(field.energy(Particles(x + c * s * v))[0]) for c in (-2, -1, 1, 2)]
    dF = (F[0] - 8 * F[1] + 8 * F[2] - F[3]) / (12 * s)
    dissipation = float((v**2).sum(-1).mean())
    assert abs(dF + dissipation) < 4e-11 * dissipation
    # the Gaussian closure of the polynomial kernel obeys (0.2) in its Gaussian form, −|b|² − tr(AΣAᵀ)
    poly = MMDField(Gaussian(MB3, SB3), kernel="poly2_affine")
    m, S = torch.tensor([0.1, 0.5, -0.4], dtype=F64), S3
    b, A = poly.affine(0.0, Gaussians(m, S))
    Sdot = A[0] @ S + S @ A[0].T
    G = [float(poly.energy(Gaussians(m + c * s * b[0], S + c * s * Sdot))[0]) for c in (-2, -1, 1, 2)]
    dG = (G[0] - 8 * G[1] + 8 * G[2] - G[3]) / (12 * s)
    gauss_dissipation = float((b**2).sum() + torch.trace(A[0] @ S @ A[0].T))
    assert abs(dG + gauss_dissipation) < 1e-9 * gauss_dissipation


def test_energy_decreases_along_a_flow():
    target = Empirical(whitened(200, torch.tensor([1.0, 0.0], dtype=F64), 0.5 * torch.eye(2, dtype=F64), 6))
    field = MMDField(target, kernel="laplace", bandwidth=0.7)
    spread = torch.diag(torch.tensor([2.0, 0.3], dtype=F64))
    start = Particles(whitened(200, torch.zeros(2, dtype=F64), spread, 7)[None])
    run = Simulation(start, field, "rk4", 0.0, 2.0, steps=20, observers=["energy"], observe_every=1,
                     progress=False).run()
    energy = run.observables["energy"].values[:, 0]
    assert (energy[1:] <= energy[:-1] + 1e-14).all() and energy[-1] < 0.5 * energy[0]


def test_field_vanishes_at_the_target():
    """μ = β up to the order of the atoms: both sums add the same terms in another order, so only
    rounding (≈ 10 ε × the largest term) is left."""
    y = torch.randn(80, 2, generator=torch.Generator().manual_seed(8), dtype=F64)
    perm = torch.randperm(80, generator=torch.Generator().manual_seed(9))
    for kernel in ("gaussian", "energy", "poly2_affine"):
        field = MMDField(Empirical(y), kernel=kernel)
        state = Particles(y[perm][None])
        assert float(field.velocity(0.0, state.x, state).abs().max()) < 1e-13
        assert abs(float(field.energy(state)[0])) < 1e-13
    poly = MMDField(Gaussian(MB3, SB3), kernel="poly2")
    b, A = poly.affine(0.0, Gaussians(MB3, SB3))
    assert float(b.abs().max()) < 1e-14 and float(A.abs().max()) < 1e-14


# -- Gaussian kernel against analytic targets ---------------------------------------------------------------


def test_gaussian_kernel_with_analytic_targets_is_exact():
    """Against N(m_β, Σ_β) or a mixture the attraction is ∇ₓ E k(x, Y) in closed form; checked against
    autograd of the expectation and the energies against the (independent) mmd observable."""
    mix = GaussianMixture(torch.tensor([0.3, 0.7], dtype=F64), torch.stack([MB3, -MB3]), torch.stack([SB3, S3]))
    x = torch.randn(2, 50, 3, generator=torch.Generator().manual_seed(10), dtype=F64)
    state = Particles(x)
    for target in (Gaussian(MB3, SB3), mix):
        field = MMDField(target, kernel="gaussian", bandwidth=0.9)
        v = field.velocity(0.0, x, state)
        xg = x.clone().requires_grad_(True)
        F = _dense_analytic(xg, target, 0.9)
        (grad,) = torch.autograd.grad(F.sum(), xg)
        assert torch.allclose(v, -grad * x.shape[1], atol=1e-12, rtol=0)
        expected = mmd_observable(state, target=target, bandwidth=0.9)
        assert torch.allclose(field.energy(state), expected, atol=1e-12, rtol=0)
        gauss = Gaussians(torch.stack([MB3, -MB3]), torch.stack([S3, SB3]))
        expected = mmd_observable(gauss, target=target, bandwidth=0.9)
        assert torch.allclose(field.energy(gauss), expected, atol=1e-12, rtol=0)
    samples = Empirical(whitened(70, MB3, SB3, 11))
    gauss = Gaussians(MB3, S3)
    assert torch.allclose(MMDField(samples, bandwidth=0.9).energy(gauss),
                          mmd_observable(gauss, target=samples, bandwidth=0.9), atol=1e-12, rtol=0)


def _dense_analytic(x, target, ell):
    """MMD² of uniform particles against a Gaussian (mixture) with the expectation written out."""
    from measureflow.observables import gaussian_kernel_expectation as gke

    law = target.as_mixture() if isinstance(target, Gaussian) else target
    N = x.shape[1]
    sq = ((x[..., :, None, :] - x[..., None, :, :]) ** 2).sum(-1)
    own = torch.exp(-sq / (2 * ell**2)).sum((-1, -2)) / N**2
    cross = (gke(x[..., None, :], None, law.means, law.covs, ell) @ law.weights).mean(-1)
    return own - 2 * cross


# -- errors ---------------------------------------------------------------------------------------------------


def test_bad_inputs_are_named():
    g2 = gamma(2)
    with pytest.raises(ParameterError, match="unknown kernel 'rbf'"):
        MMDField(g2, kernel="rbf")
    with pytest.raises(ParameterError, match="bandwidth"):
        MMDField(g2, bandwidth=0.0)
    with pytest.raises(ParameterError, match="samples=<n>"):
        MMDField(g2, kernel="laplace")
    with pytest.raises(ParameterError, match="target must be"):
        MMDField([[0.0, 1.0]])
    with pytest.raises(ParameterError, match="already samples"):
        MMDField(Empirical(torch.zeros(3, 2, dtype=F64)), samples=10)
    field = MMDField(g2, kernel="laplace", samples=64, seed=1)
    assert field.target.points.shape == (1, 64, 2)
    gauss = Gaussians(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    with pytest.raises(CapabilityError, match="does not keep Gaussians"):
        MMDField(g2).affine(0.0, gauss)
    with pytest.raises(CapabilityError, match="no Gaussian closure"):
        Simulation(gauss, MMDField(g2), "rk4", 0.0, 1.0, steps=1)
    with pytest.raises(CapabilityError, match="closed form only"):
        field.energy(gauss)
    p3 = Particles(torch.zeros(1, 4, 3, dtype=F64))
    with pytest.raises(ShapeError, match="d = 2 but the state has d = 3"):
        MMDField(g2).velocity(0.0, p3.x, p3)
    two = Particles(torch.randn(2, 5, 2, dtype=F64), None)
    with pytest.raises(ShapeError, match="3 replicas"):
        MMDField(torch.randn(3, 6, 2, dtype=F64)).velocity(0.0, two.x, two)
