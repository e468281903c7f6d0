"""Diagnostics: Gaussian FM map vs Brenier (MATH.md §1.5), path statistics, score conservativity (§2).

Reference numbers are those of MATH.md / MATH-CHECKS.md. Closed-form quantities are computed in
float64 and compared at a few ulps of their size (1e-12) unless a discretisation error is involved;
those tolerances are derived next to the assertion.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import measureflow as mf
from measureflow import diagnostics as D
from measureflow.errors import ParameterError, ShapeError, StateError
from measureflow.io import MemoryWriter
from measureflow.measures import GaussianMixture
from measureflow.observables import bures_w2
from samples import whitened

F64 = torch.float64
S0 = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=F64)
S1 = torch.tensor([[1.0, 0.8], [0.8, 1.2]], dtype=F64)
T_FM = torch.tensor([[0.59534, 0.76306], [0.19076, 1.50148]], dtype=F64)
T_OT = torch.tensor([[0.67893, 0.39525], [0.39525, 1.33233]], dtype=F64)


def rotation(d: int, omega: float) -> torch.Tensor:
    """Ω with Ω₀₁ = −ω, Ω₁₀ = ω (antisymmetric), so Ωx = ω(−x₂, x₁, 0, …)."""
    om = torch.zeros(d, d, dtype=F64)
    om[0, 1], om[1, 0] = -omega, omega
    return om


class LambdaSchedule:
    """Z_t = a(t) X₀ + b(t) X₁ from two callables; derivatives by autograd (schedule protocol)."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def coefficients(self, t):
        tt = torch.as_tensor(t, dtype=F64).detach().requires_grad_(True)
        with torch.enable_grad():
            a, b = self.a(tt), self.b(tt)
            da = torch.autograd.grad(a.sum(), tt)[0]
            db = torch.autograd.grad(b.sum(), tt)[0]
        return a.detach(), da, b.detach(), db


LINEAR = LambdaSchedule(lambda t: 1 - t, lambda t: t)
COSINE = LambdaSchedule(lambda t: torch.cos(math.pi * t / 2), lambda t: torch.sin(math.pi * t / 2))
OVERSHOOT = LambdaSchedule(lambda t: (1 - t) * (1 - 2 * t), lambda t: t * torch.ones_like(t))


# ------------------------------------------------------------------------------------------------
# Gaussian flow-matching map vs Brenier (MATH.md §1.5)
# ------------------------------------------------------------------------------------------------


def test_reference_maps_match_math():
    # MATH.md prints five decimals: rounding error ≤ 5e-6.
    assert torch.allclose(D.fm_terminal_map(S0, S1), T_FM, rtol=0, atol=5e-6)
    assert torch.allclose(D.brenier_map(S0, S1), T_OT, rtol=0, atol=5e-6)


def test_reference_costs_and_bures():
    fm = D.transport_cost(D.fm_terminal_map(S0, S1), S0)
    ot = D.transport_cost(D.brenier_map(S0, S1), S0)
    zero = torch.zeros(2, dtype=F64)
    # MATH.md prints six decimals: rounding error ≤ 5e-7.
    assert abs(float(fm) - 0.817144) <= 5e-7
    assert abs(float(ot) - 0.651957) <= 5e-7
    # The Brenier cost is W₂² (Bures); two spectral evaluations of the same quantity: round-off only.
    assert abs(float(ot) - float(bures_w2(zero, S0, zero, S1))) <= 1e-12
    # With means the cost adds |m₁ − m₀|², for both maps alike.
    m0, m1 = torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([0.5, 0.25], dtype=F64)
    shifted = D.transport_cost(D.brenier_map(S0, S1), S0, m0, m1)
    assert abs(float(shifted) - float(bures_w2(m0, S0, m1, S1))) <= 1e-12
    assert abs(float(D.transport_cost(D.fm_terminal_map(S0, S1), S0, m0, m1)) - (0.8171444378826 + 5.3125)) <= 1e-10


def test_both_maps_push_sigma0_to_sigma1():
    for T in (D.fm_terminal_map(S0, S1), D.brenier_map(S0, S1)):
        assert (T @ S0 @ T.T - S1).abs().max() <= 1e-12
    # MATH-CHECKS E: T^FM is not symmetric (relative asymmetry 0.45) and differs from T^OT by 0.29.
    Tf, To = D.fm_terminal_map(S0, S1), D.brenier_map(S0, S1)
    fro = torch.linalg.matrix_norm
    assert abs(float(fro(Tf - Tf.T) / fro(Tf)) - 0.45) < 5e-3
    assert abs(float(fro(Tf - To) / fro(To)) - 0.29) < 5e-3
    assert torch.equal(To, To.T) and bool((torch.linalg.eigvalsh(To) > 0).all())


def test_commuting_covariances_give_equal_maps():
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(3), dtype=F64))
    lam0 = torch.tensor([2.0, 0.7, 0.3], dtype=F64)
    lam1 = torch.tensor([0.5, 1.9, 4.0], dtype=F64)
    A, B = q @ torch.diag(lam0) @ q.T, q @ torch.diag(lam1) @ q.T
    assert bool(D.commute(A, B)) and not bool(D.commute(S0, S1))
    expected = q @ torch.diag((lam1 / lam0).sqrt()) @ q.T  # diag √(λ₁/λ₀) in the common eigenbasis
    assert (D.fm_terminal_map(A, B) - expected).abs().max() <= 1e-12
    assert (D.brenier_map(A, B) - expected).abs().max() <= 1e-12
    # Σ₀ = I: both maps are Σ₁^{1/2}.
    eye = torch.eye(2, dtype=F64)
    root = D.brenier_map(eye, S1)
    assert (root @ root - S1).abs().max() <= 1e-12
    assert (D.fm_terminal_map(eye, S1) - root).abs().max() <= 1e-12
    assert bool(D.commute(eye, S1))


def test_batched_maps_and_criterion():
    g = torch.Generator().manual_seed(4)
    m = torch.randn(5, 3, 3, generator=g, dtype=F64)
    a = m @ m.transpose(-1, -2) + 0.5 * torch.eye(3, dtype=F64)
    m = torch.randn(5, 3, 3, generator=g, dtype=F64)
    b = m @ m.transpose(-1, -2) + 0.5 * torch.eye(3, dtype=F64)
    b[0] = 2 * a[0] + torch.eye(3, dtype=F64)  # a commuting pair inside the batch
    fm, ot = D.fm_terminal_map(a, b), D.brenier_map(a, b)
    assert fm.shape == ot.shape == (5, 3, 3)
    for r in range(5):
        assert (fm[r] - D.fm_terminal_map(a[r], b[r])).abs().max() <= 1e-12
        assert (ot[r] - D.brenier_map(a[r], b[r])).abs().max() <= 1e-12
    assert D.commute(a, b).tolist() == [True, False, False, False, False]
    costs = D.transport_cost(ot, a)
    zero = torch.zeros(5, 3, dtype=F64)
    assert (costs - bures_w2(zero, a, zero, b)).abs().max() <= 1e-11
    assert bool((D.transport_cost(fm, a)[1:] > costs[1:]).all())  # OT is strictly cheaper when not commuting


def _rk4_flow_maps(schedules, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RK4 of Ṫ = A_t T, A_t = (aa'Σ₀ + bb'Σ₁)Σ_t⁻¹ (MATH.md 1.5), batched over schedules; T at t = ½ and 1."""
    h = 1.0 / steps
    grid = torch.arange(2 * steps + 1, dtype=F64) * (h / 2)  # every node and midpoint RK4 visits
    a, da, b, db = (torch.stack(c) for c in zip(*(s.coefficients(grid) for s in schedules)))  # (S, 2·steps + 1)
    sigma_t = a[..., None, None] ** 2 * S0 + b[..., None, None] ** 2 * S1
    rate = (a * da)[..., None, None] * S0 + (b * db)[..., None, None] * S1
    A = torch.linalg.solve(sigma_t, rate.transpose(-1, -2)).transpose(-1, -2)  # rate Σ_t⁻¹ (Σ_t symmetric)
    T = torch.eye(2, dtype=F64).expand(len(schedules), 2, 2)
    half = None
    for k in range(steps):
        start, mid, end = A[:, 2 * k], A[:, 2 * k + 1], A[:, 2 * k + 2]
        k1 = start @ T
        k2 = mid @ (T + h / 2 * k1)
        k3 = mid @ (T + h / 2 * k2)
        k4 = end @ (T + h * k3)
        T = T + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if k + 1 == steps // 2:
            half = T
    return half, T


def test_terminal_map_is_schedule_independent_and_flow_map_solves_the_ode():
    schedules = (LINEAR, COSINE, OVERSHOOT)
    half, one = _rk4_flow_maps(schedules, 1600)
    terminal = D.fm_terminal_map(S0, S1)
    # RK4 global error O(h⁴): measured 6e-15 / 2e-14 / 2e-13 (linear / cosine / overshoot) at h = 1/1600,
    # falling 16× per halving of h; the overshoot schedule has the largest derivatives.
    for s, T_half, T_one in zip(schedules, half, one):
        assert (T_one - terminal).abs().max() <= 1e-12
        assert (D.fm_flow_map(0.5, S0, S1, s) - T_half).abs().max() <= 1e-12
        assert (D.fm_flow_map(1.0, S0, S1, s) - terminal).abs().max() <= 1e-12
    # [B] (28) for the linear schedule, default argument and explicit coefficient pair.
    C = D.whitened_target(S0, S1)
    ev, U = torch.linalg.eigh(C)
    r0 = torch.diag(torch.tensor([2.0, 0.5], dtype=F64).sqrt())
    t = 0.3
    expected = r0 @ U @ torch.diag(((1 - t) ** 2 + t**2 * ev).sqrt()) @ U.T @ torch.linalg.inv(r0)
    assert (D.fm_flow_map(t, S0, S1) - expected).abs().max() <= 1e-12
    assert (D.fm_flow_map(t, S0, S1, schedule=(1 - t, t)) - expected).abs().max() <= 1e-12
    # A tensor of times gives a batch of maps, T_0 = I.
    maps = D.fm_flow_map(torch.tensor([0.0, 0.3, 1.0], dtype=F64), S0, S1)
    assert maps.shape == (3, 2, 2)
    assert (maps[0] - torch.eye(2, dtype=F64)).abs().max() <= 1e-12
    assert (maps[1] - expected).abs().max() <= 1e-12
    # Every intermediate Gaussian is Σ_t = a²Σ₀ + b²Σ₁ (MATH.md 1.5), here on the overshoot path.
    a, _, b, _ = OVERSHOOT.coefficients(0.7)
    T = D.fm_flow_map(0.7, S0, S1, OVERSHOOT)
    assert (T @ S0 @ T.T - (a**2 * S0 + b**2 * S1)).abs().max() <= 1e-12


def test_gaussian_map_errors():
    with pytest.raises(StateError, match="positive definite"):
        D.fm_terminal_map(torch.diag(torch.tensor([1.0, 0.0], dtype=F64)), S1)
    with pytest.raises(ShapeError, match="same dimension"):
        D.brenier_map(S0, torch.eye(3, dtype=F64))
    with pytest.raises(ShapeError, match=r"\(\.\.\., d, d\)"):
        D.fm_terminal_map(torch.ones(3, dtype=F64), S1)
    with pytest.raises(ParameterError, match="coefficients"):
        D.fm_flow_map(0.5, S0, S1, schedule=(1.0, 2.0, 3.0))


# ------------------------------------------------------------------------------------------------
# Trajectories
# ------------------------------------------------------------------------------------------------


def test_straight_constant_speed_paths_have_straightness_one():
    g = torch.Generator().manual_seed(5)
    x0, x1 = torch.randn(2, 3, 40, 2, generator=g, dtype=F64)
    times = torch.tensor([0.0, 0.1, 0.15, 0.5, 0.9, 2.0], dtype=F64)  # uneven frames, constant speed
    s = (times - times[0]) / (times[-1] - times[0])
    frames = x0 + s[:, None, None, None] * (x1 - x0)  # (T, R, N, d)
    out = D.straightness(frames, times)
    assert out.shape == (3,)
    assert (out - 1).abs().max() <= 1e-12
    cost = D.path_transport_cost(frames, times)
    endpoint = ((x1 - x0) ** 2).sum(-1).mean(-1)
    assert (cost.endpoint - endpoint).abs().max() <= 1e-12
    assert (cost.kinetic - endpoint / 2.0).abs().max() <= 1e-12  # speed |x₁ − x₀| / 2 for a duration 2
    assert (cost.excess).abs().max() <= 1e-12
    # (T, N, d) input gives a scalar; a backward run (decreasing times) gives the same number.
    single = D.straightness(frames[:, 0], times)
    assert single.shape == () and abs(float(single) - 1) <= 1e-12
    assert abs(float(D.straightness(frames[:, 0].flip(0), times.flip(0))) - 1) <= 1e-12


def test_curved_and_accelerating_paths():
    K, radius = 64, 1.5
    theta = math.pi * torch.arange(K + 1, dtype=F64) / K
    centres = torch.tensor([[0.0, 0.0], [3.0, -1.0]], dtype=F64)
    half_circle = centres + radius * torch.stack([torch.cos(theta), torch.sin(theta)], -1)[:, None, :]
    # Chords of length 2r sin(π/2K) every 1/K: ∫|ẋ|² = (2rK sin(π/2K))², endpoint (2r)².
    exact = 1 / (K * math.sin(math.pi / (2 * K))) ** 2
    assert abs(float(D.straightness(half_circle)) - exact) <= 1e-12
    # Continuum limit (2/π)²: exact = (2/π)² (u/sin u)² with u = π/2K, i.e. (2/π)²(1 + u²/3 + O(u⁴)).
    u = math.pi / (2 * K)
    assert abs(exact / (2 / math.pi) ** 2 - 1 - u**2 / 3) <= u**4
    # x = t² x₁ on K frames: ∫|ẋ|² = (4K² − 1)/(3K²)|x₁|², straightness 3K²/(4K² − 1) → 3/4.
    t = torch.linspace(0, 1, K + 1, dtype=F64)
    x1 = torch.tensor([[1.0, 2.0]], dtype=F64)
    accelerating = t[:, None, None] ** 2 * x1
    assert abs(float(D.straightness(accelerating, t)) - 3 * K**2 / (4 * K**2 - 1)) <= 1e-12
    # Weighted mix of one straight and one curved particle: ratio of weighted means.
    straight = torch.stack([t * 2 * radius, torch.zeros_like(t)], -1)  # same endpoint distance 2r
    both = torch.stack([straight, half_circle[:, 0]], 1)  # (T, 2, d)
    w = torch.tensor([0.25, 0.75], dtype=F64)
    kin_straight, kin_curved = (2 * radius) ** 2, (2 * radius * K * math.sin(math.pi / (2 * K))) ** 2
    expected = (2 * radius) ** 2 / (0.25 * kin_straight + 0.75 * kin_curved)
    assert abs(float(D.straightness(both, t, weights=w)) - expected) <= 1e-12


def test_gaussian_paths_cost_fm_vs_mccann():
    # Exactly whitened samples of N(0, Σ₀): sample averages of quadratic forms are the population ones.
    x = whitened(4000, torch.zeros(2, dtype=F64), S0, seed=6)
    times = torch.linspace(0, 1, 41, dtype=F64)
    fm = torch.einsum("tij,nj->tni", D.fm_flow_map(times, S0, S1), x)
    To = D.brenier_map(S0, S1)
    interpolation = (1 - times)[:, None, None] * torch.eye(2, dtype=F64) + times[:, None, None] * To
    mccann = torch.einsum("tij,nj->tni", interpolation, x)
    fm_cost, ot_cost = D.path_transport_cost(fm, times), D.path_transport_cost(mccann, times)
    # Endpoint costs are the closed forms of MATH.md §1.5 up to summation round-off over 4000 points.
    assert abs(float(fm_cost.endpoint) - 0.8171444378826) <= 1e-11
    assert abs(float(ot_cost.endpoint) - 0.6519570384149) <= 1e-11
    # McCann paths are straight at constant speed; FM paths are curved (and cost more kinetic energy).
    assert abs(float(ot_cost.straightness) - 1) <= 1e-12
    assert abs(float(ot_cost.kinetic) - 0.6519570384149) <= 1e-11
    assert float(fm_cost.straightness) < 0.999 and float(fm_cost.kinetic) > float(fm_cost.endpoint)
    # FM kinetic energy → ∫ tr(A_t Σ_t A_tᵀ) dt (= 1.650412, fine trapezoid of (1.5)); the chord sum
    # underestimates it by O(h²): the error falls 100× from 40 to 400 intervals.
    t = torch.linspace(0, 1, 20001, dtype=F64)[:, None, None]
    sigma_t = (1 - t) ** 2 * S0 + t**2 * S1
    A = (t * S1 - (1 - t) * S0) @ torch.linalg.inv(sigma_t)
    reference = float(torch.trapezoid(((A @ sigma_t) * A).sum((-1, -2)), t[:, 0, 0]))
    assert abs(reference - 1.650412) < 1e-6
    fine_times = torch.linspace(0, 1, 401, dtype=F64)
    fine = D.path_transport_cost(torch.einsum("tij,nj->tni", D.fm_flow_map(fine_times, S0, S1), x), fine_times)
    coarse_error, fine_error = reference - float(fm_cost.kinetic), reference - float(fine.kinetic)
    assert coarse_error > 0 and 80 < coarse_error / fine_error < 120


def test_trajectory_file_and_memory_writer(tmp_path, monkeypatch):
    # v = λx from x₀: RK4 frames are x_k = r^k x₀ with r = Σ_{n≤4} (λh)ⁿ/n!, so every path is a straight
    # ray with geometric speed: straightness (r^K − 1)(r + 1) / (K (r − 1)(r^K + 1)) for every particle.
    lam, K = -1.0, 20
    x0 = torch.randn(2, 30, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    memory = MemoryWriter()
    path = tmp_path / "ray.h5"
    field = mf.field("linear", A=lam * torch.eye(2, dtype=F64))
    writers = [str(path), memory]
    mf.Simulation(mf.Particles(x0), field, "rk4", 0.0, 1.0, steps=K, writers=writers, progress=False).run()
    z = lam / K
    r = 1 + z + z**2 / 2 + z**3 / 6 + z**4 / 24
    expected = (r**K - 1) * (r + 1) / (K * (r - 1) * (r**K + 1))
    assert abs(expected - 2 / lam * math.tanh(lam / 2)) < 1e-3  # continuum value (2/λ) tanh(λ/2)
    # Expected is a closed form of the RK4 frames; the tolerance covers round-off of 20 RK4 steps.
    with mf.open(path) as traj:
        eager = D.straightness(torch.as_tensor(np.asarray(traj.positions)), traj.times)
        lazy = D.straightness(traj)
        monkeypatch.setattr(D, "_FRAME_BUDGET", 2 * 30 * 2 * 3)  # read three frames at a time
        blocked = D.path_transport_cost(traj)
    assert lazy.shape == (2,)
    assert (lazy - expected).abs().max() <= 1e-12
    assert (eager - lazy).abs().max() <= 1e-14
    assert (blocked.straightness - lazy).abs().max() <= 1e-14
    assert (D.straightness(memory) - expected).abs().max() <= 1e-12


def test_path_errors():
    with pytest.raises(ShapeError, match="T ≥ 2"):
        D.straightness(torch.zeros(1, 4, 2))
    with pytest.raises(ShapeError, match="one entry per frame"):
        D.straightness(torch.zeros(3, 4, 2), times=[0.0, 1.0])
    with pytest.raises(ParameterError, match="strictly"):
        D.straightness(torch.zeros(3, 4, 2), times=[0.0, 1.0, 0.5])
    with pytest.raises(ShapeError, match="weights"):
        D.straightness(torch.zeros(3, 4, 2), weights=torch.ones(5))


# ------------------------------------------------------------------------------------------------
# Score conservativity (MATH.md §2)
# ------------------------------------------------------------------------------------------------

OMEGA, RADIUS = 0.7, 0.8  # MATH-CHECKS F: loop 2πωr² = 2.814867, max|J − Jᵀ| = 2ω = 1.4


@pytest.fixture(scope="module")
def mixture_score():
    """Exact score of the three-Dirac data of MATH.md §1.6 smoothed as on the linear path at t = ½."""
    c = torch.tensor([[2.0, 0.0], [-1.0, math.sqrt(3)], [-1.0, -math.sqrt(3)]], dtype=F64)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    a, b, sigma = 0.5, 0.5, 1.0
    return GaussianMixture(w, a * c, (b * sigma) ** 2 * torch.eye(2, dtype=F64).expand(3, 2, 2)).score


def rotated(score, omega=OMEGA):
    def field(x):
        return score(x) + omega * torch.stack([-x[..., 1], x[..., 0]], -1)

    return field


def test_exact_score_is_conservative(mixture_score):
    centres = torch.tensor([[0.0, 0.0], [0.7, -0.4], [1.0, 1.0], [-1.2, 0.3]], dtype=F64)
    loops = D.circle_loops(centres, RADIUS, 4096)
    result = D.loop_integral(mixture_score, loops)
    # On a circle the trapezoid sum is (sin h/h) × a spectrally accurate periodic rule: round-off only
    # (MATH-CHECKS: ≤ 6e-16); the loop normaliser is O(1).
    assert result.circulation.abs().max() <= 1e-13
    assert result.ratio.max() <= 1e-13
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(8), dtype=F64) * 1.5
    # Exact Jacobians (autograd) are symmetric to round-off of entries of size ≈ 1/b² = 4.
    assert float(D.jacobian_asymmetry(mixture_score, x, method="jacrev")) <= 1e-12
    assert float(D.jacobian_asymmetry(mixture_score, x, method="autograd")) <= 1e-12
    # Central differences: O(h²)|∂³s| + O(ε|s|/h) with h ≈ 6e-6, about 1e-9 here (MATH-CHECKS: 6e-10).
    assert float(D.jacobian_asymmetry(mixture_score, x, method="central")) <= 1e-8


def test_rotated_score_loop_and_asymmetry(mixture_score):
    field = rotated(mixture_score)
    K = 4096
    loops = D.circle_loops(torch.tensor([[0.0, 0.0], [0.7, -0.4], [1.0, 1.0]], dtype=F64), RADIUS, K)
    result = D.loop_integral(field, loops)
    # The trapezoid sum of the rotation over the inscribed K-gon is exactly 2ω × its area ω K r² sin(2π/K);
    # the score part contributes round-off (previous test).
    polygon = OMEGA * K * RADIUS**2 * math.sin(2 * math.pi / K)
    assert (result.circulation - polygon).abs().max() <= 1e-12
    assert abs(round(float(result.circulation[0]), 6) - 2.814866) <= 1e-12  # MATH.md §2: 2.814866
    # vs 2πωr² = 2.814867: polygon error (2π/K)²/6 relative = 3.9e-7.
    exact = 2 * math.pi * OMEGA * RADIUS**2
    assert (result.circulation - exact).abs().max() <= exact * (2 * math.pi / K) ** 2 / 6 * 1.01
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(9), dtype=F64)
    per_point = D.jacobian_asymmetry(field, x, reduce="none")
    assert per_point.shape == (100,)
    assert (per_point - 2 * OMEGA).abs().max() <= 1e-12
    assert abs(float(D.jacobian_asymmetry(field, x, method="central")) - 2 * OMEGA) <= 1e-8


def test_brownian_bridge_loops(mixture_score):
    g = torch.Generator().manual_seed(10)
    x0 = torch.tensor([[0.3, -0.2], [1.0, 0.5]], dtype=F64)
    fine = D.brownian_bridge_loops(x0, U=9.0, steps=20000, count=4, generator=g)
    assert fine.shape == (2, 4, 20000, 2)
    assert torch.equal(fine[..., 0, :], x0[:, None, :].expand(2, 4, 2))  # X_0 = x₀; X_U = x₀ closes it
    coarse = fine[..., ::20, :]  # the same paths on [V]'s 1000-step mesh
    exact_fine, exact_coarse = D.loop_integral(mixture_score, fine), D.loop_integral(mixture_score, coarse)
    rot_fine, rot_coarse = (D.loop_integral(rotated(mixture_score), p) for p in (fine, coarse))
    # For a gradient field the trapezoid error per step is O(|dx|³) with random sign: O(mesh) overall
    # (MATH-CHECKS: 1.2e-4 at 10³ steps, 2.3e-8 at 10⁵); it falls with the mesh, the rotated one does not.
    assert float(exact_fine.ratio.max()) < float(exact_coarse.ratio.max()) / 5
    # MATH-CHECKS F at 10³ steps: 1.2e-4 (exact) vs 1.1e-2 (rotated); the rotated one does not vanish.
    assert float(exact_coarse.ratio.mean()) < 0.1 * float(rot_coarse.ratio.mean())
    # The rotated circulation converges (to 2ω × the Lévy area) while the normaliser ∮|x||dx| grows like
    # √steps on a Brownian path (its length diverges): ratios are comparable only at equal mesh.
    assert (rot_fine.circulation - rot_coarse.circulation).abs().mean() < 0.1 * rot_coarse.circulation.abs().mean()
    assert ((rot_fine.normaliser / rot_coarse.normaliser) / math.sqrt(20) - 1).abs().max() < 0.05
    # The rotation's trapezoid sum on a polygon is exactly 2ω × its shoelace (Lévy) area.
    p = fine - x0[:, None, None, :]
    q = torch.roll(p, -1, dims=-2)
    shoelace = 0.5 * (p[..., 0] * q[..., 1] - p[..., 1] * q[..., 0]).sum(-1)
    pure = D.loop_integral(lambda y: OMEGA * torch.stack([-y[..., 1], y[..., 0]], -1), fine)
    assert (pure.circulation - 2 * OMEGA * shoelace).abs().max() <= 1e-10
    # Bridge variance: Var X_u = u(1 − u/U) per coordinate, 9/4 at u = U/2 (8000 paths: s.e. 1.6 %).
    many = D.brownian_bridge_loops(torch.zeros(2, dtype=F64), steps=100, count=8000,
                                   generator=torch.Generator().manual_seed(11))
    var = many[:, 50, :].var(0)
    assert ((var - 2.25).abs() / 2.25).max() < 5 * math.sqrt(2 / 8000)


def test_stein_residual_null_space():
    g = torch.Generator().manual_seed(12)
    m = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    B = torch.randn(3, 3, generator=g, dtype=F64)
    sigma = B @ B.T + 0.5 * torch.eye(3, dtype=F64)
    omega = torch.randn(3, 3, generator=g, dtype=F64)
    omega = omega - omega.T
    rho = mf.measures.Gaussian(m, sigma)
    x = rho.sample(500, g)
    null = D.stein_residual(lambda y: (y - m) @ (sigma @ omega).T, rho.score, x)
    assert null.shape == (500,)
    # ∇·e = tr(ΣΩ) = 0 and s·e = −(x − m)ᵀΩ(x − m) = 0: round-off of O(|x − m|²|Ω|) terms.
    assert null.abs().max() <= 1e-12
    plain = D.stein_residual(lambda y: y @ omega.T, rho.score(x), x)
    expected = -torch.einsum("ni,ij,nj->n", x - m, torch.linalg.inv(sigma) @ omega, x)
    assert (plain - expected).abs().max() <= 1e-11
    assert float(plain.abs().max()) > 0.5
    # e = Ωx is in the null space of the standard normal.
    std = mf.measures.Gaussian(torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64))
    assert D.stein_residual(lambda y: y @ omega.T, std.score, x, method="central").abs().max() <= 1e-8


def test_divergence_and_jacobian_methods():
    def cubic(y):
        return y * (y**2).sum(-1, keepdim=True)

    x = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(13), dtype=F64)
    r2 = (x**2).sum(-1)
    assert (D.divergence(cubic, x) - 5 * r2).abs().max() <= 1e-12  # ∇·(x|x|²) = (d + 2)|x|²
    expected = r2[..., None, None] * torch.eye(3, dtype=F64) + 2 * x[..., :, None] * x[..., None, :]
    for method in ("auto", "jacrev", "autograd"):
        assert (D.jacobian(cubic, x, method=method) - expected).abs().max() <= 1e-12
    assert (D.jacobian(cubic, x, method="central") - expected).abs().max() <= 1e-8

    def branching(y):  # data-dependent Python control flow: vmap refuses it, plain autograd does not
        return cubic(y) if bool((y.abs() < 100).all()) else y

    with pytest.raises(RuntimeError):
        D.jacobian(branching, x, method="jacrev")
    assert (D.jacobian(branching, x) - expected).abs().max() <= 1e-12
    with pytest.raises(ParameterError, match="method"):
        D.jacobian(cubic, x, method="forward")


def test_field_wrapper_and_report(mixture_score):
    A = torch.tensor([[0.3, -1.1], [0.4, -0.2]], dtype=F64)
    field = mf.field("linear", A=A, b=torch.tensor([0.5, 0.0], dtype=F64))
    with pytest.raises(ParameterError, match="t="):
        D.as_vector_field(field)
    v = D.as_vector_field(field, t=0.0)
    x = torch.randn(6, 7, 2, generator=torch.Generator().manual_seed(14), dtype=F64)
    assert (D.jacobian(v, x) - A).abs().max() <= 1e-14
    K = 256
    loops = D.circle_loops(torch.tensor([[0.0, 0.0], [2.0, 1.0]], dtype=F64), 0.5, K)
    report = D.conservativity_report(field, x, loops, t=0.0)
    # The trapezoid rule is exact for a linear field on each chord: ∮ = (A₂₁ − A₁₂) × polygon area.
    polygon = (A[1, 0] - A[0, 1]) * K / 2 * 0.25 * math.sin(2 * math.pi / K)
    assert abs(report["loop_circulation_max"] - float(polygon)) <= 1e-12
    assert abs(report["jacobian_asymmetry_max"] - 1.5) <= 1e-14
    assert report["points"] == 42 and report["loops"] == 2
    exact = D.conservativity_report(mixture_score, x, [loops, D.circle_loops(torch.zeros(2, dtype=F64), 1.0, 512)])
    assert exact["loops"] == 3
    assert exact["jacobian_asymmetry_max"] <= 1e-12 and exact["loop_ratio_max"] <= 1e-13
    assert set(exact) == {
        "points", "jacobian_asymmetry_max", "jacobian_asymmetry_mean", "jacobian_scale_mean",
        "loops", "loop_circulation_max", "loop_ratio_max", "loop_ratio_mean",
    }


def test_loop_builders_and_errors():
    loops = D.circle_loops(torch.zeros(4, dtype=F64), torch.tensor(2.0, dtype=F64), 8, plane=(1, 3))
    assert loops.shape == (8, 4)
    assert torch.allclose(loops[:, 1] ** 2 + loops[:, 3] ** 2, torch.full((8,), 4.0, dtype=F64), atol=1e-14)
    assert loops[:, [0, 2]].abs().max() == 0
    assert D.circle_loops([0.0, 0.0], 1.0, 5).dtype == F64
    with pytest.raises(ShapeError, match="plane"):
        D.circle_loops(torch.zeros(2), 1.0, 8, plane=(0, 2))
    with pytest.raises(ShapeError, match="K ≥ 3"):
        D.loop_integral(lambda y: y, torch.zeros(2, 2))
    with pytest.raises(ShapeError, match="returned shape"):
        D.loop_integral(lambda y: y[..., :1], torch.randn(5, 2))
    with pytest.raises(ParameterError, match="steps"):
        D.brownian_bridge_loops(torch.zeros(2), steps=2)
    # float32 in, float32 out.
    x32 = torch.randn(10, 2)
    assert D.jacobian_asymmetry(lambda y: -y, x32).dtype == torch.float32
