"""Couplings of mini-batches and the Gaussian Brenier map / McCann interpolation (MATH.md §0, §1.1, §1.5).

Closed-form Gaussian quantities are computed in float64 and compared at 1e-12 (a few hundred ulps of
O(1) numbers through two eigendecompositions) unless MATH.md prints rounded digits; Monte-Carlo
tolerances are binomial bounds derived next to the assertion.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import ot
import pytest
import torch

from measureflow import couplings as C
from measureflow import diagnostics as D
from measureflow.errors import ParameterError, ShapeError, StateError
from measureflow.observables import bures_w2

F64 = torch.float64
S0 = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=F64)
S1 = torch.tensor([[1.0, 0.8], [0.8, 1.2]], dtype=F64)
T_OT = torch.tensor([[0.67893, 0.39525], [0.39525, 1.33233]], dtype=F64)
W2_SQ = 0.651957
M0 = torch.tensor([1.0, -2.0], dtype=F64)
M1 = torch.tensor([0.5, 0.25], dtype=F64)


def batch(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64) + shift


def weights(n: int, seed: int) -> torch.Tensor:
    w = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.2
    return w / w.sum()


def random_spd(R: int, d: int, seed: int) -> torch.Tensor:
    m = torch.randn(R, d, d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return m @ m.transpose(-1, -2) + 0.3 * torch.eye(d, dtype=F64)


def binomial_bound(p, n: int, z: float = 5.0):
    """z binomial standard deviations of a frequency with probability p over n draws.

    z = 5 puts the two-sided normal tail at 5.7e-7 per cell, so even over ~100 cells a correct
    sampler fails with probability < 1e-4 (Bonferroni); the seeds are fixed, so the outcome is too.
    """
    p = torch.as_tensor(p, dtype=F64)
    return z * torch.sqrt(p * (1 - p) / n)


# ------------------------------------------------------------------------------------------------
# independent
# ------------------------------------------------------------------------------------------------


def test_independent_pairs_rows_as_given():
    x0, x1 = batch(50, 3, 0), batch(50, 3, 1)
    a, b = C.get("independent")(x0, x1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, x0) and torch.equal(b, x1)
    # Unequal sizes without weights: x0 keeps its rows, x1's rows are drawn (uniformly, with replacement).
    i, j = C.get("independent").pairs(x0, x1[:20], generator=torch.Generator().manual_seed(0))
    assert torch.equal(i, torch.arange(50)) and j.shape == (50,) and bool(((j >= 0) & (j < 20)).all())
    assert len(set(j.tolist())) > 1


def test_independent_weighted_draws_follow_the_product():
    x0, x1 = batch(6, 2, 0), batch(4, 2, 1)
    w0, w1 = weights(6, 2), weights(4, 3)
    coupling = C.IndependentCoupling()
    plan = coupling.plan(x0, x1, w0, w1)
    assert torch.allclose(plan, w0[:, None] * w1[None, :], rtol=0, atol=1e-16)
    gen = torch.Generator().manual_seed(5)
    draws = [coupling.pairs(x0, x1, generator=gen, w0=w0, w1=w1) for _ in range(2000)]
    i, j = torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])
    n = i.numel()
    joint = torch.zeros(6, 4, dtype=F64).index_put_((i, j), torch.ones(n, dtype=F64), accumulate=True) / n
    assert bool(((joint - plan).abs() <= binomial_bound(plan, n)).all())


# ------------------------------------------------------------------------------------------------
# exact OT
# ------------------------------------------------------------------------------------------------


def test_exact_ot_uniform_batches_give_the_optimal_permutation():
    x0, x1 = batch(64, 2, 0), batch(64, 2, 1, shift=1.0)
    a, b = C.get("exact_ot")(x0, x1)
    i, j = C.get("exact_ot").pairs(x0, x1)
    # A permutation: every row of x0 once, in order, every row of x1 once.
    assert torch.equal(i, torch.arange(64)) and torch.equal(torch.sort(j).values, torch.arange(64))
    assert torch.equal(a, x0) and torch.equal(b, x1[j])
    # Its cost is the optimum of POT's own solver on POT's cost matrix (two float64 solves of one LP: round-off).
    M = ot.dist(x0.numpy(), x1.numpy())
    uniform = np.full(64, 1 / 64)
    cost = M[np.arange(64), j.numpy()].mean()
    assert abs(cost - ot.emd2(uniform, uniform, M)) <= 1e-12
    # No exchange of two partners lowers it (2-cyclical monotonicity of an optimal plan).
    diag = M[np.arange(64), j.numpy()]
    swapped = M[:, j.numpy()]  # swapped[k, l] = C(k, σ(l))
    assert (diag[:, None] + diag[None, :] <= swapped + swapped.T + 1e-12).all()
    # And it beats every one of 200 random pairings, by a wide margin (2.16 against ≥ 5.09 here).
    gen = torch.Generator().manual_seed(9)
    random_costs = [M[np.arange(64), torch.randperm(64, generator=gen).numpy()].mean() for _ in range(200)]
    assert cost < 0.7 * min(random_costs)


def test_exact_ot_weighted_pairs_reproduce_the_plan():
    x0, x1 = batch(12, 2, 3), batch(9, 2, 4)
    w0, w1 = weights(12, 5), weights(9, 6)
    coupling = C.get("exact_ot")
    plan = coupling.plan(x0, x1, w0, w1)
    # The plan is POT's optimum with the right marginals.
    M = ot.dist(x0.numpy(), x1.numpy())
    assert abs(float((plan.numpy() * M).sum()) - ot.emd2(w0.numpy(), w1.numpy(), M)) <= 1e-12
    assert (plan.sum(1) - w0).abs().max() <= 1e-15 and (plan.sum(0) - w1).abs().max() <= 1e-15
    gen = torch.Generator().manual_seed(11)
    draws = [coupling.pairs(x0, x1, generator=gen, w0=w0, w1=w1) for _ in range(1000)]
    i, j = torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])
    n = i.numel()  # 12 000 pairs
    joint = torch.zeros(12, 9, dtype=F64).index_put_((i, j), torch.ones(n, dtype=F64), accumulate=True) / n
    # Pairs off the support of π never occur; on it, each frequency is binomial(n, πᵢⱼ), and so are the
    # marginal frequencies (binomial(n, w0ᵢ), binomial(n, w1ⱼ)).
    assert bool((joint[plan == 0] == 0).all())
    assert bool(((joint - plan).abs() <= binomial_bound(plan, n)).all())
    assert bool(((joint.sum(1) - w0).abs() <= binomial_bound(w0, n)).all())
    assert bool(((joint.sum(0) - w1).abs() <= binomial_bound(w1, n)).all())


def test_pairs_are_reproducible_from_a_seed():
    x0, x1 = batch(40, 2, 7), batch(30, 2, 8)
    w0, w1 = weights(40, 9), weights(30, 10)
    for coupling in (C.get("exact_ot"), C.get("sinkhorn", epsilon=0.5), C.get("independent")):
        first = coupling.pairs(x0, x1, generator=torch.Generator().manual_seed(123), w0=w0, w1=w1)
        again = coupling.pairs(x0, x1, generator=torch.Generator().manual_seed(123), w0=w0, w1=w1)
        other = coupling.pairs(x0, x1, generator=torch.Generator().manual_seed(124), w0=w0, w1=w1)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1]), coupling.name
        assert not (torch.equal(first[0], other[0]) and torch.equal(first[1], other[1])), coupling.name


def test_zero_weights_are_never_paired():
    x0, x1 = batch(10, 2, 12), batch(8, 2, 13)
    w0, w1 = weights(10, 14), weights(8, 15)
    w0[[2, 7]] = 0
    w1[5] = 0
    w0, w1 = w0 / w0.sum(), w1 / w1.sum()
    for coupling in (C.get("exact_ot"), C.get("sinkhorn", epsilon=0.3), C.get("independent")):
        plan = coupling.plan(x0, x1, w0, w1)
        assert bool(torch.isfinite(plan).all()), coupling.name
        assert bool((plan[[2, 7]] == 0).all() and (plan[:, 5] == 0).all()), coupling.name
        i, j = coupling.pairs(x0, x1, generator=torch.Generator().manual_seed(0), w0=w0, w1=w1)
        assert not bool(torch.isin(i, torch.tensor([2, 7])).any() or (j == 5).any()), coupling.name


def test_weights_within_round_off_of_one_are_accepted():
    # float32 weights summing to 1 + 4e-6 (within the float32 allowance 1e-5 √B) are renormalised, so
    # the solvers see marginals of equal mass; POT's emd refuses totals that differ by more than 1e-6.
    x0, x1 = batch(6, 2, 33), batch(5, 2, 34)
    w0 = torch.full((6,), 1 / 6, dtype=torch.float32)
    w0[0] += 4e-6
    for name in ("exact_ot", "sinkhorn"):
        plan = C.get(name).plan(x0, x1, w0=w0)
        assert abs(float(plan.sum()) - 1) <= 1e-12, name
    with pytest.raises(StateError, match="sum to one"):
        C.get("exact_ot").plan(x0, x1, w0=w0 * 1.001)


def test_squared_distances_match_explicit_differences():
    # Large d and an offset far from the origin: the expansion is taken about the joint mean.
    x0, x1 = batch(30, 500, 16, shift=100.0), batch(20, 500, 17, shift=100.0)
    explicit = ((x0[:, None, :] - x1[None, :, :]) ** 2).sum(-1)
    # Error ~ d ε (|x0 − c|² + |x1 − c|²) ≈ 500 · 2.2e-16 · 2000 ≈ 2e-10 absolute on entries ≈ 1000.
    assert (C.squared_distances(x0, x1) - explicit).abs().max() <= 1e-9
    assert bool((C.squared_distances(x0, x0).diagonal() <= 1e-9).all())


# ------------------------------------------------------------------------------------------------
# Sinkhorn
# ------------------------------------------------------------------------------------------------


def test_sinkhorn_marginals_within_solver_tolerance():
    x0, x1 = batch(40, 2, 18), batch(25, 2, 19, shift=0.5)
    w0, w1 = weights(40, 20), weights(25, 21)
    for tol in (1e-6, 1e-10):
        plan = C.get("sinkhorn", epsilon=0.5, tol=tol, max_iter=100_000).plan(x0, x1, w0, w1)
        # POT stops once the Euclidean norm of the marginal violation is below stopThr = tol.
        assert float((plan.sum(1) - w0).norm()) <= tol and float((plan.sum(0) - w1).norm()) <= tol
        assert bool((plan > 0).all())  # entropic plans have full support
    # Uniform weights, rows kept: every row of x0 once, partners drawn from the row conditionals.
    paired0, paired1 = C.get("sinkhorn", epsilon=0.5)(x0, x1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(paired0, x0) and paired1.shape == x0.shape


def test_sinkhorn_cost_tends_to_the_exact_cost():
    x0, x1 = batch(12, 2, 22), batch(9, 2, 23)
    w0, w1 = weights(12, 24), weights(9, 25)
    M = ot.dist(x0.numpy(), x1.numpy())
    exact = ot.emd(w0.numpy(), w1.numpy(), M)
    W = float((exact * M).sum())
    # OT_ε minimality against π* gives 0 ≤ ⟨π_ε, C⟩ − W ≤ ε KL(π* | w0 ⊗ w1) (π_ε feasible to tol = 1e-10:
    # it can undercut W by at most max C · √B1 · tol ≈ 1e-8).
    support = exact > 0
    kl = float((exact[support] * np.log(exact[support] / np.outer(w0.numpy(), w1.numpy())[support])).sum())
    gaps = []
    for eps in (1.0, 0.1, 0.01):
        plan = C.get("sinkhorn", epsilon=eps, tol=1e-10, max_iter=200_000).plan(x0, x1, w0, w1)
        gap = float((plan.numpy() * M).sum()) - W
        assert -1e-8 <= gap <= eps * kl + 1e-8, eps
        gaps.append(gap)
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-2 * gaps[0]


def test_sinkhorn_warns_when_it_stops_short():
    x0, x1 = batch(20, 2, 26), batch(20, 2, 27, shift=2.0)
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        C.get("sinkhorn", epsilon=0.05, max_iter=3).plan(x0, x1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        C.get("sinkhorn", epsilon=2.0, tol=1e-8, max_iter=10_000).plan(x0, x1)


# ------------------------------------------------------------------------------------------------
# Gaussians (MATH.md §1.5)
# ------------------------------------------------------------------------------------------------


def test_brenier_map_reference_case():
    T, shift = C.gaussian_brenier_map(torch.zeros(2, dtype=F64), S0, torch.zeros(2, dtype=F64), S1)
    # MATH.md prints five decimals (T) and six (cost): rounding error ≤ 5e-6 and 5e-7.
    assert torch.allclose(T, T_OT, rtol=0, atol=5e-6)
    assert torch.equal(shift, torch.zeros(2, dtype=F64))
    assert abs(float(C.transport_cost(T, S0)) - W2_SQ) <= 5e-7
    # The same number from the independent Bures formula of the observables.
    zero = torch.zeros(2, dtype=F64)
    assert abs(float(C.transport_cost(T, S0)) - float(bures_w2(zero, S0, zero, S1))) <= 1e-12
    # Symmetric positive definite, and pushes Σ₀ to Σ₁.
    assert torch.equal(T, T.T) and bool((torch.linalg.eigvalsh(T) > 0).all())
    assert (T @ S0 @ T.T - S1).abs().max() <= 1e-12
    assert torch.equal(C.brenier_map(S0, S1), T)


def test_brenier_map_with_means():
    T, shift = C.gaussian_brenier_map(M0, S0, M1, S1)
    # T(x) = m₁ + T^OT (x − m₀): the mean goes to m₁ and shift = m₁ − T m₀.
    assert (T @ M0 + shift - M1).abs().max() <= 1e-12
    assert (shift - (M1 - T_OT @ M0)).abs().max() <= 5e-6 * 3  # |m₀|₁ = 3 times the print rounding of T_OT
    x = batch(5, 2, 28)
    assert (x @ T.T + shift - (M1 + (x - M0) @ T.T)).abs().max() <= 1e-12
    # Cost with means: W₂² = Bures + |m₁ − m₀|², whichever way the affine map is described.
    w2 = float(bures_w2(M0, S0, M1, S1))
    assert abs(float(C.transport_cost(T, S0, M0, shift=shift)) - w2) <= 1e-12
    assert abs(float(C.transport_cost(T, S0, M0, M1)) - w2) <= 1e-12
    assert abs(w2 - (W2_SQ + float(((M1 - M0) ** 2).sum()))) <= 5e-7


def test_mccann_interpolation_formula_endpoints_and_geodesic():
    eye = torch.eye(2, dtype=F64)
    W = math.sqrt(float(bures_w2(M0, S0, M1, S1)))
    for t in (0.0, 0.25, 0.5, 0.9, 1.0):
        m, S = C.mccann_interpolation(t, M0, S0, M1, S1)
        Tt = (1 - t) * eye + t * T_OT
        # Against the printed T^OT: its 5e-6 rounding enters Σ_t at most ≈ 2 · 5e-6 · ‖Σ₀ T_t‖ ≲ 3e-5.
        assert (S - Tt @ S0 @ Tt.T).abs().max() <= 3e-5
        assert (m - ((1 - t) * M0 + t * M1)).abs().max() <= 1e-15
        # Constant-speed geodesic: W₂(μ₀, μ_t) = t W₂(μ₀, μ₁), W₂(μ_t, μ₁) = (1 − t) W₂(μ₀, μ₁)
        # (checked with the independent Bures formula; square roots of O(1) numbers: 1e-7 covers
        # the √ of round-off near W₂ = 0 at the endpoints).
        assert abs(math.sqrt(max(float(bures_w2(M0, S0, m, S)), 0.0)) - t * W) <= 1e-7
        assert abs(math.sqrt(max(float(bures_w2(m, S, M1, S1)), 0.0)) - (1 - t) * W) <= 1e-7
    m, S = C.mccann_interpolation(0.0, M0, S0, M1, S1)
    assert (S - S0).abs().max() <= 1e-12 and torch.equal(m, M0)
    m, S = C.mccann_interpolation(1.0, M0, S0, M1, S1)
    assert (S - S1).abs().max() <= 1e-12 and (m - M1).abs().max() <= 1e-15


def test_gaussian_maps_batched_over_replicas():
    R, d = 4, 3
    a, b = random_spd(R, d, 29), random_spd(R, d, 30)
    m0, m1 = batch(R, d, 31), batch(R, d, 32)
    T, shift = C.gaussian_brenier_map(m0, a, m1, b)
    assert T.shape == (R, d, d) and shift.shape == (R, d)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=F64)
    m_t, S_t = C.mccann_interpolation(t, m0, a, m1, b)
    costs = C.transport_cost(T, a, m0, shift=shift)
    for r in range(R):
        Tr, sr = C.gaussian_brenier_map(m0[r], a[r], m1[r], b[r])
        assert (T[r] - Tr).abs().max() <= 1e-12 and (shift[r] - sr).abs().max() <= 1e-12
        mr, Sr = C.mccann_interpolation(float(t[r]), m0[r], a[r], m1[r], b[r])
        assert (S_t[r] - Sr).abs().max() <= 1e-12 and (m_t[r] - mr).abs().max() <= 1e-12
        assert (T[r] @ a[r] @ T[r] - b[r]).abs().max() <= 1e-10 * float(b[r].abs().max())
    assert (costs - bures_w2(m0, a, m1, b)).abs().max() <= 1e-10
    # A tensor of times with one pair of Gaussians gives one interpolant per time.
    m_t, S_t = C.mccann_interpolation(t, M0, S0, M1, S1)
    assert m_t.shape == (4, 2) and S_t.shape == (4, 2, 2)


def test_one_implementation_behind_both_names():
    assert D.brenier_map is C.brenier_map and D.transport_cost is C.transport_cost


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: C.get("warp"), ParameterError, "known couplings are"),
        (lambda: C.get("sinkhorn", epsilon=0.0), ParameterError, "epsilon must be positive"),
        (lambda: C.get("sinkhorn", epsilon=-1), ParameterError, "epsilon must be positive"),
        (lambda: C.get("sinkhorn", epsilon=float("nan")), ParameterError, "epsilon must be positive"),
        (lambda: C.get("sinkhorn", epsilon="small"), ParameterError, "epsilon must be positive"),
        (lambda: C.get("sinkhorn", method="fast"), ParameterError, "unknown method"),
        (lambda: C.get("sinkhorn", tol=0), ParameterError, "tol must be positive"),
        (lambda: C.get("exact_ot", max_iter=0), ParameterError, "positive integer"),
        (lambda: C.get("exact_ot", eps=1), ParameterError, "its parameters are"),
        (lambda: C.get(C.ExactOTCoupling(), max_iter=5), ParameterError, "build it with them"),
    ],
)
def test_bad_parameters(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("name", ["independent", "exact_ot", "sinkhorn"])
def test_bad_batches_and_weights(name):
    c = C.get(name)
    x0, x1 = batch(5, 2, 0), batch(4, 2, 1)
    w0 = weights(5, 2)
    with pytest.raises(ShapeError, match=r"shape \(B, d\)"):
        c(x0[None], x1)
    with pytest.raises(ShapeError, match="same dimension d"):
        c(x0, batch(4, 3, 1))
    with pytest.raises(StateError, match="torch.Tensor"):
        c(x0.numpy(), x1)
    with pytest.raises(ShapeError, match=r"w0 must have shape \(5,\)"):
        c(x0, x1, w0=w0[:4])
    with pytest.raises(StateError, match="sum to one"):
        c(x0, x1, w0=2 * w0)
    with pytest.raises(StateError, match="non-negative"):
        c(x0, x1, w1=torch.tensor([0.5, 0.7, -0.2, 0.0], dtype=F64))


def test_non_finite_batch_is_refused():
    x0 = batch(5, 2, 0)
    x0[2, 1] = float("nan")
    for name in ("exact_ot", "sinkhorn"):
        with pytest.raises(StateError, match="finite"):
            C.get(name)(x0, batch(5, 2, 1))


@pytest.mark.filterwarnings("ignore:numItermax reached")
def test_exact_ot_stopped_early_is_refused():
    with pytest.raises(ParameterError, match="raise max_iter"):
        C.get("exact_ot", max_iter=3).plan(batch(30, 2, 0), batch(30, 2, 1))


@pytest.mark.filterwarnings("ignore:Warning. numerical errors")
def test_sinkhorn_underflow_is_refused_with_advice():
    with pytest.raises(StateError, match="method='sinkhorn_log' or a larger epsilon"):
        C.get("sinkhorn", epsilon=1e-4, method="sinkhorn", max_iter=10).plan(batch(10, 2, 0), 10 * batch(10, 2, 1))


def test_bad_gaussian_arguments():
    zero = torch.zeros(2, dtype=F64)
    with pytest.raises(StateError, match="S0 must be positive definite"):
        C.gaussian_brenier_map(zero, torch.diag(torch.tensor([1.0, 0.0], dtype=F64)), zero, S1)
    with pytest.raises(StateError, match="S1 must be positive semidefinite"):
        C.brenier_map(S0, torch.diag(torch.tensor([1.0, -0.5], dtype=F64)))
    with pytest.raises(ShapeError, match="same dimension"):
        C.brenier_map(S0, torch.eye(3, dtype=F64))
    with pytest.raises(ShapeError, match=r"m0 must have shape \(\.\.\., 2\)"):
        C.gaussian_brenier_map(torch.zeros(3, dtype=F64), S0, zero, S1)
    with pytest.raises(ParameterError, match=r"t must lie in \[0, 1\]"):
        C.mccann_interpolation(1.5, zero, S0, zero, S1)
    with pytest.raises(ParameterError, match=r"t must lie in \[0, 1\]"):
        C.mccann_interpolation(float("nan"), zero, S0, zero, S1)
    with pytest.raises(ParameterError, match="either m1"):
        C.transport_cost(T_OT, S0, zero, M1, shift=zero)
    with pytest.raises(ShapeError, match=r"\(\.\.\., d, d\)"):
        C.transport_cost(T_OT, zero)


def test_describe_is_json_able():
    import json

    c = C.get("sinkhorn", epsilon=0.2)
    assert json.loads(json.dumps(c.describe())) == {
        "name": "sinkhorn", "epsilon": 0.2, "method": "sinkhorn_log", "max_iter": 1000, "tol": 1e-6,
    }
    assert C.get(c) is c


# -- entropic plan and Schrödinger bridge of Gaussians (MATH.md §7) -----------------------------------------


@pytest.mark.parametrize("eps", [0.1, 1.0, 3.0])
def test_entropic_cross_covariance_is_the_entropic_plan(eps):
    # The entropic plan is the coupling whose density against μ₀ ⊗ μ₁ is e^{(f(x) + g(y) − |x − y|²)/ε}:
    # its only x–y interaction is e^{2⟨x, y⟩/ε}. For a Gaussian joint law with covariance
    # J = [[Σ₀, C], [Cᵀ, Σ₁]] that interaction is e^{−xᵀ(J⁻¹)ₓᵧ y}, so (J⁻¹)ₓᵧ = −(2/ε) I characterises
    # C exactly (with the marginals fixed). Round-off: one 4×4 inverse of an O(1/ε)-conditioned matrix.
    Cx = C.entropic_cross_covariance(S0, S1, eps)
    J = torch.cat([torch.cat([S0, Cx], 1), torch.cat([Cx.T, S1], 1)], 0)
    interaction = torch.linalg.inv(J)[:2, 2:]
    assert (interaction + (2.0 / eps) * torch.eye(2, dtype=F64)).abs().max() <= 1e-11 / eps
    assert bool((torch.linalg.eigvalsh(J) > 0).all())


def test_entropic_cross_covariance_limits_and_1d_formula():
    # ε → 0: the optimal plan's Cov(X, T(X)) = Σ₀ T^OT; the gap is O(σ²) = O(ε).
    gap = (C.entropic_cross_covariance(S0, S1, 1e-8) - S0 @ C.brenier_map(S0, S1)).abs().max()
    assert gap <= 1e-8
    # ε → ∞: the product coupling, C = O(1/ε).
    assert C.entropic_cross_covariance(S0, S1, 1e6).abs().max() <= 1e-5
    # 1-D: C = ½(√(4ab + σ⁴) − σ²).
    a, b, eps = 2.0, 0.7, 1.3
    s2 = eps / 2
    got = C.entropic_cross_covariance(torch.tensor([[a]], dtype=F64), torch.tensor([[b]], dtype=F64), eps)
    assert abs(float(got) - 0.5 * (math.sqrt(4 * a * b + s2 * s2) - s2)) <= 1e-14


@pytest.mark.parametrize("eps", [0.2, 2.0])
def test_schrodinger_interpolation_is_markov(eps):
    # The Schrödinger bridge restricted to [0, t] is the bridge between its own marginals for the
    # reference run for time t, i.e. entropic at εt; restricted to [t, 1], entropic at ε(1 − t).
    # With X_t = (1 − t)X₀ + tX₁ + σB_t: Cov(X₀, X_t) = (1 − t)Σ₀ + tC and Cov(X_t, X₁) = (1 − t)C + tΣ₁
    # must equal those entropic cross-covariances. This checks Σ_t, including the bridge variance
    # σ² t(1 − t) with σ² = ε/2, against an identity the formula was not built from.
    Cx = C.entropic_cross_covariance(S0, S1, eps)
    for t in (0.25, 0.5, 0.8):
        m, S = C.schrodinger_interpolation(t, M0, S0, M1, S1, eps)
        assert (C.entropic_cross_covariance(S0, S, eps * t) - ((1 - t) * S0 + t * Cx)).abs().max() <= 1e-12
        assert (C.entropic_cross_covariance(S, S1, eps * (1 - t)) - ((1 - t) * Cx + t * S1)).abs().max() <= 1e-12
        assert (m - ((1 - t) * M0 + t * M1)).abs().max() <= 1e-15


def test_schrodinger_interpolation_endpoints_inflation_and_geodesic_limit():
    m, S = C.schrodinger_interpolation(0.0, M0, S0, M1, S1, 1.0)
    assert (S - S0).abs().max() <= 1e-15 and torch.equal(m, M0)
    m, S = C.schrodinger_interpolation(1.0, M0, S0, M1, S1, 1.0)
    assert (S - S1).abs().max() <= 1e-15 and (m - M1).abs().max() <= 1e-15
    # 1-D, Σ₀ = Σ₁ = 1: Σ_t = 1 + t(1 − t)(√(4 + σ⁴) − 2) > 1, the inflation the geodesic lacks.
    one = torch.ones(1, 1, dtype=F64)
    zero = torch.zeros(1, dtype=F64)
    for eps in (0.5, 2.0):
        s2 = eps / 2
        for t in (0.3, 0.5):
            _, S = C.schrodinger_interpolation(t, zero, one, zero, one, eps)
            assert abs(float(S) - (1 + t * (1 - t) * (math.sqrt(4 + s2 * s2) - 2))) <= 1e-14
    # ε → 0: the W₂ geodesic (McCann), to O(ε).
    t = torch.tensor([0.2, 0.5, 0.9], dtype=F64)
    _, S_sb = C.schrodinger_interpolation(t, M0, S0, M1, S1, 1e-7)
    _, S_w2 = C.mccann_interpolation(t, M0, S0, M1, S1)
    assert (S_sb - S_w2).abs().max() <= 1e-6


def test_entropic_gaussians_bad_input():
    with pytest.raises(ParameterError, match="epsilon"):
        C.entropic_cross_covariance(S0, S1, 0.0)
    with pytest.raises(ParameterError, match="t must lie"):
        C.schrodinger_interpolation(1.5, M0, S0, M1, S1, 1.0)
    with pytest.raises((ShapeError, StateError)):
        C.entropic_cross_covariance(S0, torch.eye(3, dtype=F64), 1.0)


def test_a_user_coupling_implements_plan_and_pairs():
    """Coupling is abstract: both methods are required; calling one gathers the pairs it returns."""

    class PlanOnly(C.Coupling):
        def plan(self, x0, x1, w0=None, w1=None):
            return torch.eye(x0.shape[0], dtype=torch.float64) / x0.shape[0]

    with pytest.raises(TypeError, match="pairs"):
        PlanOnly()

    class Reversed(PlanOnly):
        name = "reversed"

        def pairs(self, x0, x1, generator=None, w0=None, w1=None):
            i = torch.arange(x0.shape[0])
            return i, i.flip(0)

    x0 = torch.arange(3.0)[:, None]
    a, b = Reversed()(x0, 10 + x0)
    assert a[:, 0].tolist() == [0.0, 1.0, 2.0] and b[:, 0].tolist() == [12.0, 11.0, 10.0]
    assert Reversed().describe() == {"name": "reversed"}
