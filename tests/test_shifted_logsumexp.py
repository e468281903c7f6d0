"""The one-pass shifted log-sum-exp (measureflow.reductions.logsumexp) and single-pass Sinkhorn.

Pinned to the dense float64 log-sum-exp and to the two-pass streaming softmax it replaces in the
Sinkhorn half-sweep (MATH.md §7), on the eager path and on the fused (compiled) one.
"""

import shutil

import numpy as np
import ot
import pytest
import torch

import measureflow.reductions as red
from measureflow.errors import StateError
from measureflow.reductions import sinkhorn_potentials, softmax_average, symmetric_potential
from measureflow.reductions.logsumexp import shifted_logsumexp

F64 = torch.float64


def _problem(R, N, M, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(R, N, d, generator=gen, dtype=F64)
    k = 0.8 * torch.randn(R, M, d, generator=gen, dtype=F64) + 0.5
    lw = torch.randn(R, M, generator=gen, dtype=F64) * 3.0
    lw[:, 3] = -torch.inf  # an excluded point
    return q.to(dtype), k.to(dtype), lw.to(dtype)


def _dense(q, k, lw, scale):
    c = ((q.double()[:, :, None] - k.double()[:, None]) ** 2).sum(-1)
    return torch.logsumexp(lw.double()[:, None] - scale * c, dim=-1)


@pytest.mark.parametrize("d", [2, 7])  # 7 > direct_max_dim: the centred GEMM form of the eager path
def test_float64_matches_dense_for_good_and_bad_bounds(d):
    """Within 1e-12 of the dense float64 LSE whatever the bound: near the answer (one pass), off by ±10³
    (every row overflows or underflows and is redone in two passes), or mixed. float64 rounding of sums of
    ~10² terms of size ~e^{±40} leaves ~1e-14 relative; 1e-12 absolute on |LSE| ≲ 60 is that with margin."""
    q, k, lw = _problem(2, 37, 53, d, F64, seed=d)
    scale = 1.7
    exact = _dense(q, k, lw, scale)
    mixed = exact.clone()
    mixed[0, ::3] += 1e3
    mixed[1, ::4] -= 1e3
    broken = exact.clone()
    broken[0, :4] = torch.tensor([torch.inf, -torch.inf, torch.nan, 1e300])
    for bound in (exact + 0.3, exact - 5.0, torch.zeros_like(exact), exact + 1e3, mixed, broken):
        lse = shifted_logsumexp(q, k, lw, bound, scale=scale)
        assert torch.allclose(lse, exact, atol=1e-12, rtol=0)


def test_float32_matches_the_two_pass_softmax():
    """float32: within 1e-6·max(1, |LSE|) of the two-pass streaming softmax on the same inputs (both are
    float32 sums of positive terms, each ~1e-7 relative; the logs agree to a few ulps)."""
    q, k, lw = _problem(3, 64, 80, 2, torch.float32, seed=3)
    scale = 2.5
    _, two_pass = softmax_average(q, k, log_weights=lw, scale=scale, return_logsumexp=True)
    for bound in (two_pass + 0.1, two_pass + 200.0):
        lse = shifted_logsumexp(q, k, lw, bound, scale=scale)
        assert lse.dtype == torch.float32
        assert ((lse - two_pass).abs() / two_pass.abs().clamp_min(1.0)).max() < 1e-6


HAS_COMPILER = shutil.which("g++") is not None or shutil.which("c++") is not None


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_fused_path_matches_the_eager_path(monkeypatch, dtype):
    """The compiled one-pass sum (polynomial exp in float32) agrees with the eager one: float64 to 1e-12,
    float32 to 1e-6 relative (exp32's 2.2e-7 plus float32 summation)."""
    if not HAS_COMPILER:
        pytest.skip("torch.compile on CPU needs a C++ compiler; none found")
    q, k, lw = _problem(2, 40, 70, 2, dtype, seed=11)
    exact = _dense(q, k, lw, 0.9).to(dtype)
    bound = exact + 0.2
    bound[0, :5] += 500.0  # rows the fused pass overflows: redone in two passes
    eager = shifted_logsumexp(q, k, lw, bound, scale=0.9)
    monkeypatch.setattr(red, "config", red.ReductionConfig(compile="on"))
    fused = shifted_logsumexp(q, k, lw, bound, scale=0.9)
    tol = 1e-12 if dtype == F64 else 1e-6
    assert ((fused - eager).abs() / eager.abs().clamp_min(1.0)).max() < tol


def test_bad_arguments_are_named():
    q, k, lw = _problem(1, 4, 5, 2, F64, seed=0)
    with pytest.raises(StateError, match="scale must be > 0"):
        shifted_logsumexp(q, k, lw, torch.zeros(1, 4, dtype=F64), scale=0.0)
    with pytest.raises(StateError, match="bound must have shape"):
        shifted_logsumexp(q, k, lw, torch.zeros(1, 5, dtype=F64), scale=1.0)


def _clouds(dtype, seed=5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 60, 2, generator=gen, dtype=F64)
    y = 0.7 * torch.randn(2, 45, 2, generator=gen, dtype=F64) + torch.tensor([1.0, 0.0], dtype=F64)
    w = torch.rand(2, 60, generator=gen, dtype=F64) + 0.2
    qy = torch.rand(2, 45, generator=gen, dtype=F64) + 0.2
    return (x.to(dtype), torch.log(w / w.sum(-1, keepdim=True)).to(dtype),
            y.to(dtype), torch.log(qy / qy.sum(-1, keepdim=True)).to(dtype))


def test_single_pass_sinkhorn_equals_the_two_pass_path():
    """Same sweeps, same potentials: a fixed number of sweeps (tol=None, so both take the same ω path)
    from a cold ε-scaled start, where the first sweeps' bounds are poor and rows fall back, then settle.
    float64: the paths differ by rounding only, < 1e-12 on potentials of size ~1. float32: each half-sweep
    agrees with the two-pass one to ~1e-7 relative (test above), but 30 over-relaxed sweeps amplify float32
    rounding to a few 1e-6 on either path (measured 3-8e-6 for both against float64), so both are pinned to
    the float64 solution at 1e-5 relative, and the single pass must be no less accurate than the two-pass
    path beyond that noise."""
    for eps in (0.05, 0.5):  # 0.05: exponents reach ~10²/ε, far outside float32's range
        kw = dict(relaxation=1.4, tol=None, max_iter=30, epsilon_scaling=0.5)
        f1, g1, *_ = sinkhorn_potentials(*_clouds(F64), eps, single_pass=True, **kw)
        f2, g2, *_ = sinkhorn_potentials(*_clouds(F64), eps, single_pass=False, **kw)
        assert (f1 - f2).abs().max() < 1e-12 and (g1 - g2).abs().max() < 1e-12
        x, lw = _clouds(F64)[:2]
        s1, *_ = symmetric_potential(x, lw, eps, tol=None, max_iter=20, single_pass=True)
        s2, *_ = symmetric_potential(x, lw, eps, tol=None, max_iter=20, single_pass=False)
        assert (s1 - s2).abs().max() < 1e-12
        errors = []
        for single in (True, False):
            f, g, *_ = sinkhorn_potentials(*_clouds(torch.float32), eps, single_pass=single, **kw)
            errors.append(max(((f.double() - f1).abs() / f1.abs().clamp_min(1.0)).max(),
                              ((g.double() - g1).abs() / g1.abs().clamp_min(1.0)).max()))
        assert errors[0] < 1e-5 and errors[1] < 1e-5


def test_single_pass_potentials_match_pot():
    """POT's log-domain Sinkhorn gives the same potentials up to the shift (f + c, g − c) at ε = 0.1, where a
    naive exp of the shifted terms would underflow: both stop at marginal errors ≤ 1e-12, so 1e-9."""
    x, lw, y, lq = _clouds(F64, seed=9)
    eps = 0.1
    f, g, *_ = sinkhorn_potentials(x[:1], lw[:1], y[:1], lq[:1], eps, tol=1e-13, max_iter=20000)
    X, Y, W, Q = x[0].numpy(), y[0].numpy(), lw[0].exp().numpy(), lq[0].exp().numpy()
    _, log = ot.sinkhorn(W, Q, ot.dist(X, Y), eps, method="sinkhorn_log", numItermax=50000, stopThr=1e-14,
                         log=True)
    fp, gp = eps * (log["log_u"] - np.log(W)), eps * (log["log_v"] - np.log(Q))
    f, g = f[0].numpy(), g[0].numpy()
    c = np.mean(f - fp)
    assert np.abs(f - c - fp).max() < 1e-9 and np.abs(g + c - gp).max() < 1e-9


def test_a_kernel_compiled_under_one_thread_is_not_reused_under_two(monkeypatch):
    """Inductor's CPU kernels are parallel only when compiled with more than one torch thread, so the
    serial and parallel variants are kept apart (torch.compile replaced by the identity: no compile here)."""
    from measureflow.reductions import fused

    monkeypatch.setattr(fused, "kernels", {})
    monkeypatch.setattr(fused.torch, "compile", lambda fn, **kw: fn)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = fused.compiled_kernel("probe", (2, True), lambda d, p: (lambda: ("serial", d)))
        torch.set_num_threads(2)
        parallel = fused.compiled_kernel("probe", (2, True), lambda d, p: (lambda: ("parallel", d)))
        again = fused.compiled_kernel("probe", (2, True), lambda d, p: (lambda: ("other", d)))
    finally:
        torch.set_num_threads(saved)
    assert serial() == ("serial", 2) and parallel() == ("parallel", 2) and again is parallel
    assert sorted(fused.kernels) == [("probe", 2, True, False), ("probe", 2, True, True)]


def test_single_pass_unbalanced_sinkhorn_equals_the_two_pass_path():
    """With reach ρ the c-transforms are damped by λ = 1/(1 + ε/ρ); the bound is the previous potential over
    λ (the undamped transform's value at the fixed point). float64 rounding only: 1e-12."""
    x, lw, y, lq = _clouds(F64)
    kw = dict(relaxation=1.2, tol=None, max_iter=25, reach=0.7)
    f1, g1, *_ = sinkhorn_potentials(x, lw, y, lq, 0.2, single_pass=True, **kw)
    f2, g2, *_ = sinkhorn_potentials(x, lw, y, lq, 0.2, single_pass=False, **kw)
    assert (f1 - f2).abs().max() < 1e-12 and (g1 - g2).abs().max() < 1e-12
    s1, *_ = symmetric_potential(x, lw, 0.2, tol=None, max_iter=20, reach=0.7, single_pass=True)
    s2, *_ = symmetric_potential(x, lw, 0.2, tol=None, max_iter=20, reach=0.7, single_pass=False)
    assert (s1 - s2).abs().max() < 1e-12
