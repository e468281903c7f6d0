"""Integrators: convergence orders, adaptive control, Euler–Maruyama statistics, Gaussian SPD
safeguards, checkpoint state and registration. Everything runs in float64 unless said otherwise
so that the measured orders are not polluted by round-off."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import measureflow
from measureflow import Gaussians, Particles
from measureflow.errors import CapabilityError, TimeRangeError, UnknownPluginError
from measureflow.fields import Field
from measureflow.integrators import (
    DOPRI5,
    EULER,
    HEUN,
    MIDPOINT,
    RK4,
    ButcherTableau,
    DormandPrince5,
    EulerMaruyama,
    ExplicitRungeKutta,
    PIController,
    StepFailure,
    Stepper,
)
from measureflow.integrators import builtin
from measureflow.plugins import Registry

F64 = torch.float64
FIXED = {"euler": (EULER, 1), "heun": (HEUN, 2), "midpoint": (MIDPOINT, 2), "rk4": (RK4, 4)}


# -- test fields -------------------------------------------------------------------------------------
class Riccati(Field):
    """ẋ = −2t x² (nonlinear and time-dependent): x(t) = x₀ / (1 + x₀ (t² − t₀²))."""

    name = "riccati"

    def __init__(self):
        self.times = []

    def velocity(self, t, x, state):
        self.times.append(t)
        return -2.0 * t * x * x

    @staticmethod
    def exact(x0, t, t0=0.0):
        return x0 / (1.0 + x0 * (t * t - t0 * t0))


class MeanDrift(Field):
    """ẋᵢ = m(μ) (the weighted mean, a mean-field velocity): m(t) = m₀eᵗ, xᵢ(t) = xᵢ₀ + m₀(eᵗ − 1).
    A method that fed the step's initial measure to later stages would fall to order 1."""

    name = "mean_drift"

    def velocity(self, t, x, state):
        assert state.x is x  # the measure handed over is the stage's own particles
        return state.mean()[:, None, :].expand_as(x)

    @staticmethod
    def exact(state, t):
        m0 = state.mean()[:, None, :]
        return state.x + m0 * math.expm1(t)


class Linear(Field):
    """v(x) = Ax + c with constant (possibly non-normal) A; Gaussian closure b = Am + c, A."""

    name = "linear_test"

    def __init__(self, A, c=None):
        self.A = torch.as_tensor(A, dtype=F64)
        self.c = torch.zeros(self.A.shape[0], dtype=F64) if c is None else torch.as_tensor(c, dtype=F64)

    def velocity(self, t, x, state):
        return x @ self.A.T + self.c

    def affine(self, t, state):
        R = state.mean.shape[0]
        return state.mean @ self.A.T + self.c, self.A.expand(R, -1, -1)

    def exact(self, state: Gaussians, t):
        d = self.A.shape[0]
        aug = torch.zeros(d + 1, d + 1, dtype=F64)
        aug[:d, :d] = self.A * t
        aug[:d, d] = self.c * t
        E = torch.linalg.matrix_exp(aug)
        Phi, shift = E[:d, :d], E[:d, d]
        return state.mean @ Phi.T + shift, Phi @ state.cov @ Phi.T


class OUClosure(Field):
    """dX = −θX dt + σ dW. Drift for particles, diffusion σ, and the probability-flow closure
    b = −θm, A = −θI + ½σ²Σ⁻¹ (nonlinear in Σ): Σ(t) = s²I + e^{−2θt}(Σ₀ − s²I), s² = σ²/2θ."""

    name = "ou_test"

    def __init__(self, theta=1.0, sigma=1.0):
        self.theta, self.sigma = theta, sigma

    def velocity(self, t, x, state):
        return -self.theta * x

    def diffusion(self, t):
        return self.sigma

    def affine(self, t, state):
        S = state.cov
        eye = torch.eye(state.dim, dtype=state.dtype)
        if state.dim == 2:
            # Adjugate over determinant: LAPACK's inverse costs ~0.1 ms per call on tiny matrices.
            adj = torch.stack([S[:, 1, 1], -S[:, 0, 1], -S[:, 1, 0], S[:, 0, 0]], dim=-1).reshape(S.shape)
            inv = adj / (S[:, 0, 0] * S[:, 1, 1] - S[:, 0, 1] * S[:, 1, 0])[:, None, None]
        else:
            inv = torch.linalg.inv(S)
        return -self.theta * state.mean, -self.theta * eye + 0.5 * self.sigma**2 * inv

    def exact(self, state: Gaussians, t):
        s2 = self.sigma**2 / (2 * self.theta)
        eye = torch.eye(state.dim, dtype=F64)
        return state.mean * math.exp(-self.theta * t), s2 * eye + math.exp(-2 * self.theta * t) * (state.cov - s2 * eye)


class Rotation(Field):
    """v(x) = w J x with J the 90° rotation: rigid rotation of a thin ellipse, exactly SPD forever,
    but a large linear update Σ + h(AΣ + ΣAᵀ) leaves the cone."""

    name = "rotation"

    def __init__(self, w=1.0):
        self.A = w * torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=F64)

    def affine(self, t, state):
        return torch.zeros_like(state.mean), self.A.expand(state.replicas, -1, -1)

    def exact(self, state, t):
        Phi = torch.linalg.matrix_exp(self.A * t)
        return state.mean, Phi @ state.cov @ Phi.T


class NaNClosure(Field):
    name = "nan_closure"

    def affine(self, t, state):
        return torch.full_like(state.mean, math.nan), torch.zeros_like(state.cov)


# -- helpers ------------------------------------------------------------------------------------------
def integrate(integrator, field, state, t0, t1, n, generator=None, stats=None):
    """n equal output intervals with one Stepper (its counters go into ``stats`` when given)."""
    stepper = Stepper(integrator, field, state, noise=generator)
    times = np.linspace(t0, t1, n + 1)
    for a, b in zip(times[:-1], times[1:]):
        state = stepper.advance(state, float(a), float(b))
    if stats is not None:
        stats.update(stepper.stats)
    return state


def slope(hs, errors):
    return float(np.polyfit(np.log(hs), np.log(errors), 1)[0])


def particles(R=2, N=5, d=2, seed=0, weighted=False, low=0.5, high=1.5):
    g = torch.Generator().manual_seed(seed)
    x = low + (high - low) * torch.rand((R, N, d), generator=g, dtype=F64)
    w = None
    if weighted:
        w = torch.rand((R, N), generator=g, dtype=F64) + 0.5
        w = w / w.sum(dim=1, keepdim=True)
    return Particles(x, w)


def gaussians(R=3, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn((R, d), generator=g, dtype=F64)
    B = torch.randn((R, d, d), generator=g, dtype=F64)
    return Gaussians(m, B @ B.transpose(-1, -2) + 0.5 * torch.eye(d, dtype=F64))


def assert_spd_symmetric(state: Gaussians):
    S = state.cov
    assert torch.equal(S, S.transpose(-1, -2))
    assert bool((torch.linalg.eigvalsh(S) > 0).all())


# Step counts for the order fits: small enough for the asymptotic regime, large enough that RK4's
# error (~1e-10 at the finest) stays far above float64 round-off (~1e-15).
NS = (16, 32, 64, 128)
# The fitted slope differs from the order by the next error term, O(h) relative to the leading one;
# over this range it moves the slope by < 0.1 for these smooth problems, hence ±0.15.
ORDER_TOL = 0.15


# -- tableaus -------------------------------------------------------------------------------------------
def test_tableaus_satisfy_their_order_conditions():
    # All conditions up to order 4 and five of the nine of order 5: enough to catch a coefficient
    # typo (row sums are also validated at construction).
    for tab in (EULER, HEUN, MIDPOINT, RK4, DOPRI5):
        s = tab.stages
        A = np.zeros((s, s))
        for i, row in enumerate(tab.a):
            A[i, :i] = row
        b, c = np.array(tab.b), np.array(tab.c)
        conds = [(b @ np.ones(s), 1.0)]
        if tab.order >= 2:
            conds += [(b @ c, 1 / 2)]
        if tab.order >= 3:
            conds += [(b @ c**2, 1 / 3), (b @ A @ c, 1 / 6)]
        if tab.order >= 4:
            conds += [(b @ c**3, 1 / 4), (b @ (c * (A @ c)), 1 / 8), (b @ A @ c**2, 1 / 12), (b @ A @ A @ c, 1 / 24)]
        if tab.order >= 5:
            conds += [(b @ c**4, 1 / 5), (b @ (c**2 * (A @ c)), 1 / 10), (b @ (A @ c) ** 2, 1 / 20),
                      (b @ A @ c**3, 1 / 20), (b @ A @ A @ A @ c, 1 / 120)]
        for got, want in conds:
            assert abs(got - want) < 1e-14, (tab.name, got, want)
    # The embedded fourth-order solution of DOPRI5 is order 4 but not 5.
    bh = np.array(DOPRI5.b) - np.array(DOPRI5.b_error)
    c = np.array(DOPRI5.c)
    assert abs(bh @ c**3 - 1 / 4) < 1e-14 and abs(bh @ c**4 - 1 / 5) > 1e-4


def test_tableau_validation_names_the_problem():
    with pytest.raises(ValueError, match="row 1 of a sums"):
        ButcherTableau("bad", 2, c=[0, 1], a=[[], [0.5]], b=[0.5, 0.5])
    with pytest.raises(ValueError, match="sum to"):
        ButcherTableau("bad", 1, c=[0], a=[[]], b=[0.9])


# -- fixed-step orders on particles ----------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FIXED))
def test_fixed_step_order_nonlinear_time_dependent(name):
    tab, order = FIXED[name]
    field, state = Riccati(), particles()
    errors = []
    for n in NS:
        out = integrate(ExplicitRungeKutta(tab), field, state, 0.0, 1.0, n)
        errors.append(float((out.x - Riccati.exact(state.x, 1.0)).abs().max()))
    assert abs(slope([1 / n for n in NS], errors) - order) < ORDER_TOL


@pytest.mark.parametrize("name", list(FIXED))
def test_fixed_step_order_mean_field_uses_stage_measure(name):
    tab, order = FIXED[name]
    field, state = MeanDrift(), particles(weighted=True)
    errors = []
    for n in NS:
        out = integrate(ExplicitRungeKutta(tab), field, state, 0.0, 1.0, n)
        errors.append(float((out.x - MeanDrift.exact(state, 1.0)).abs().max()))
    assert abs(slope([1 / n for n in NS], errors) - order) < ORDER_TOL


@pytest.mark.parametrize("name", list(FIXED))
def test_fixed_step_backward_integration(name):
    # Start from the exact x(1) and integrate back to 0; the error must shrink at the method's order.
    tab, order = FIXED[name]
    field, start = Riccati(), particles()
    at_one = start.with_positions(Riccati.exact(start.x, 1.0))
    errors = []
    for n in NS:
        out = integrate(ExplicitRungeKutta(tab), field, at_one, 1.0, 0.0, n)
        errors.append(float((out.x - start.x).abs().max()))
    assert abs(slope([1 / n for n in NS], errors) - order) < ORDER_TOL


def test_fixed_step_stats_and_weights_untouched():
    integ = ExplicitRungeKutta(RK4)
    state = particles(weighted=True)
    stats = {}
    out = integrate(integ, Riccati(), state, 0.0, 1.0, 10, stats=stats)
    assert stats == {"nfev": 40, "steps": 10, "accepted": 10, "rejected": 0}
    assert out.weights is state.weights
    assert integ.order == 4 and not integ.adaptive and not integ.stochastic and integ.name == "rk4"


# -- fixed-step orders on Gaussians -------------------------------------------------------------------------
GAUSS_FIELDS = {
    "linear": lambda: Linear([[-0.5, 2.0], [0.0, -1.0]], c=[0.3, -0.2]),  # non-normal A
    "ou": lambda: OUClosure(theta=1.0, sigma=0.8),  # closure nonlinear in Σ
}


@pytest.mark.parametrize("fname", list(GAUSS_FIELDS))
@pytest.mark.parametrize("name", list(FIXED))
def test_fixed_step_gaussian_order(name, fname):
    tab, order = FIXED[name]
    field, state = GAUSS_FIELDS[fname](), gaussians()
    m_ex, S_ex = field.exact(state, 1.0)
    errors = []
    for n in NS:
        stats = {}
        out = integrate(ExplicitRungeKutta(tab), field, state, 0.0, 1.0, n, stats=stats)
        assert stats["rejected"] == 0
        assert_spd_symmetric(out)
        errors.append(max(float((out.mean - m_ex).abs().max()), float((out.cov - S_ex).abs().max())))
    assert abs(slope([1 / n for n in NS], errors) - order) < ORDER_TOL


def test_euler_gaussian_step_is_the_pushforward():
    field, state = Linear([[-0.5, 2.0], [0.0, -1.0]]), gaussians()
    h = 0.3
    out = ExplicitRungeKutta(EULER).advance(field, state, 0.0, h)
    M = torch.eye(2, dtype=F64) + h * field.A
    expected = M @ state.cov @ M.T
    torch.testing.assert_close(out.cov, 0.5 * (expected + expected.mT), rtol=0, atol=1e-14)
    torch.testing.assert_close(out.mean, state.mean + h * (state.mean @ field.A.T), rtol=0, atol=1e-15)


def test_big_euler_step_stays_spd_through_pushforward():
    # Thin ellipse diag(1, 1e-3) under a rotation: the linear update Σ + h(AΣ + ΣAᵀ) at h = 0.5 has a
    # negative eigenvalue, the pushforward (I + hA)Σ(I + hA)ᵀ cannot.
    field = Rotation()
    state = Gaussians(torch.zeros(1, 2, dtype=F64), torch.diag(torch.tensor([1.0, 1e-3], dtype=F64))[None])
    h = 0.5
    S, A = state.cov, field.A
    linear = S + h * (A @ S + S @ A.T)
    assert float(torch.linalg.eigvalsh(linear).min()) < 0
    stepper = Stepper(ExplicitRungeKutta(EULER), field, state)
    out = stepper.advance(state, 0.0, h)
    assert stepper.stats["rejected"] == 0
    assert_spd_symmetric(out)


def unchecked_steps(tab, field, state, h, steps=1):
    """Σ after ``steps`` unchecked steps of size h (what the safeguard refuses to return)."""
    from measureflow.integrators import Dynamics, combine, rk_stages

    dynamics = Dynamics(field, state)
    y = dynamics.pack(state)
    for j in range(steps):
        ks = rk_stages(tab, dynamics.rate, j * h, y, h)
        y = combine(y, h, tab.b, ks)
    return y[1]


def test_rk_step_leaving_the_cone_is_substepped():
    field = Rotation()
    state = Gaussians(torch.zeros(2, 2, dtype=F64), torch.diag(torch.tensor([1.0, 1e-3], dtype=F64)).expand(2, 2, 2))
    for tab in (HEUN, MIDPOINT, RK4):
        stepper = Stepper(ExplicitRungeKutta(tab), field, state)
        out = stepper.advance(state, 0.0, 2.0)  # a 2-radian turn in one step
        stats = stepper.stats
        assert stats["rejected"] > 0, tab.name  # the single step did leave the cone
        assert stats["accepted"] >= 2 and (stats["accepted"] & (stats["accepted"] - 1)) == 0
        assert_spd_symmetric(out)
        # The result is exactly n plain steps of h/n, n the first power of two that stays SPD (the
        # safeguard buys positivity; accuracy remains the step size's business).
        n = stats["accepted"]
        plain = integrate(ExplicitRungeKutta(tab), field, state, 0.0, 2.0, n)
        assert torch.equal(out.cov, plain.cov) and torch.equal(out.mean, plain.mean)
        coarser = unchecked_steps(tab, field, state, 2.0 / (n // 2), steps=n // 2)
        assert float(torch.linalg.eigvalsh(coarser).min()) < 0  # half as many substeps leave the cone


def test_rk_step_leaving_the_cone_raises_step_failure_after_max_halvings():
    field = Rotation()
    state = Gaussians(torch.zeros(1, 2, dtype=F64), torch.diag(torch.tensor([1.0, 1e-3], dtype=F64))[None])
    integ = ExplicitRungeKutta(HEUN, max_halvings=1)
    with pytest.raises(StepFailure) as info:
        integ.advance(field, state, 2.0, 3.0)
    exc = info.value
    assert exc.reason == "covariance left the SPD cone"
    assert 2.0 <= exc.time < 3.0
    assert isinstance(exc, measureflow.MeasureflowError) and isinstance(exc, RuntimeError)
    assert "2 substeps" in str(exc)
    with pytest.raises(StepFailure, match="non-finite"):
        ExplicitRungeKutta(RK4, max_halvings=2).advance(NaNClosure(), gaussians(), 0.0, 0.1)


class RandomAffine(Field):
    """v(x) = A_r x with one matrix per replica."""

    def __init__(self, A):
        self.A = A

    def affine(self, t, state):
        return (self.A @ state.mean[..., None])[..., 0], self.A


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.1, 3.0),
    h=st.floats(-2.0, 2.0),
    name=st.sampled_from(list(FIXED)),
)
def test_gaussian_output_always_symmetric_spd(seed, scale, h, name):
    # Any field, any step: either a symmetric SPD covariance comes back or StepFailure is raised.
    g = torch.Generator().manual_seed(seed)
    A = scale * torch.randn((4, 3, 3), generator=g, dtype=F64)
    state = gaussians(R=4, d=3, seed=seed % 1000)
    stepper = Stepper(ExplicitRungeKutta(FIXED[name][0]), RandomAffine(A), state)
    try:
        out = stepper.advance(state, 0.0, h)
    except StepFailure as exc:
        assert exc.reason in ("covariance left the SPD cone", "non-finite Gaussian parameters")
        return
    assert_spd_symmetric(out)
    assert stepper.stats["steps"] == stepper.stats["accepted"] + stepper.stats["rejected"]


# -- Dormand–Prince ---------------------------------------------------------------------------------------
def test_dopri5_error_scales_with_tolerance():
    field, state = Riccati(), particles()
    exact = Riccati.exact(state.x, 2.0)
    errs = {}
    for tol in (1e-4, 1e-6, 1e-8):
        stepper = Stepper(DormandPrince5(rtol=tol, atol=tol), field, state)
        out = stepper.advance(state, 0.0, 2.0)
        errs[tol] = float((out.x - exact).abs().max())
        # Local error control gives a global error of the order of the tolerance (|x| ≤ 1.5 here);
        # a factor 10 covers the accumulation over the steps.
        assert errs[tol] <= 10 * tol, (tol, errs[tol])
        assert stepper.stats["steps"] == stepper.stats["accepted"] + stepper.stats["rejected"]
    assert errs[1e-8] <= 1e-2 * errs[1e-4]  # at least two decades over four decades of tolerance
    assert errs[1e-6] < errs[1e-4] and errs[1e-8] < errs[1e-6]


def test_dopri5_lands_exactly_on_save_times_and_respects_dt_max():
    field, state = Riccati(), particles()
    stepper = Stepper(DormandPrince5(rtol=1e-7, atol=1e-9, dt_max=0.15), field, state)
    grid = [0.0, 0.3, 0.7, 1.2, 2.0]
    for a, b in zip(grid[:-1], grid[1:]):
        field.times.clear()
        state = stepper.advance(state, a, b)
        assert b in field.times  # the last stage is evaluated at t1 exactly
        assert min(field.times) >= a and max(field.times) == b  # no stage beyond the save time
        assert stepper.carry.controller_state["dt"] <= 0.15
    torch.testing.assert_close(state.x, Riccati.exact(particles().x, 2.0), rtol=0, atol=1e-6)


def test_dopri5_backward_integration():
    field, start = Riccati(), particles()
    at_two = start.with_positions(Riccati.exact(start.x, 2.0))
    out = DormandPrince5(rtol=1e-9, atol=1e-11).advance(field, at_two, 2.0, 0.0)
    torch.testing.assert_close(out.x, start.x, rtol=0, atol=1e-7)


def test_dopri5_state_dict_round_trip_reproduces_identical_steps():
    grid = [0.0, 0.5, 1.0, 1.5, 2.0]
    kwargs = dict(rtol=1e-6, atol=1e-9)
    # Uninterrupted run.
    f_a, state_a = Riccati(), particles()
    integ_a = Stepper(DormandPrince5(**kwargs), f_a, state_a)
    for a, b in zip(grid[:-1], grid[1:]):
        state_a = integ_a.advance(state_a, a, b)
    # Interrupted after two intervals; a new stepper resumes from the saved dict and a rebuilt state.
    f_b, state_b = Riccati(), particles()
    integ_b = Stepper(DormandPrince5(**kwargs), f_b, state_b)
    for a, b in zip(grid[:2], grid[1:3]):
        state_b = integ_b.advance(state_b, a, b)
    saved = json.loads(json.dumps(integ_b.state_dict()))
    f_c, state_c = Riccati(), Particles(state_b.x.clone())
    resumed = Stepper(DormandPrince5(**kwargs), f_c, state_c)
    resumed.load_state_dict(saved)
    for a, b in zip(grid[2:-1], grid[3:]):
        state_c = resumed.advance(state_c, a, b)
    assert torch.equal(state_c.x, state_a.x)
    after = [t for t in f_a.times if t > 1.0]
    assert after == [t for t in f_c.times if t > 1.0]  # the same stage times, bit for bit
    assert resumed.state_dict()["controller"]["dt"] == integ_a.state_dict()["controller"]["dt"]
    assert resumed.stats["accepted"] == integ_a.stats["accepted"]
    # Without the saved controller state the restart picks a new first step: the runs differ.
    f_d, state_d = Riccati(), Particles(state_b.x.clone())
    fresh = Stepper(DormandPrince5(**kwargs), f_d, state_d)
    for a, b in zip(grid[2:-1], grid[3:]):
        state_d = fresh.advance(state_d, a, b)
    assert [t for t in f_d.times if t > 1.0] != after


def test_dopri5_reuses_last_stage_across_calls():
    field, state = Riccati(), particles()
    integ = Stepper(DormandPrince5(first_step=0.05), field, state)
    state = integ.advance(state, 0.0, 0.5)
    nfev = integ.stats["nfev"]
    steps = integ.stats["steps"]
    integ.advance(state, 0.5, 1.0)
    # FSAL: six new evaluations per step, none for the first stage of the new call.
    assert integ.stats["nfev"] - nfev == 6 * (integ.stats["steps"] - steps)


def test_dopri5_gaussians_accurate_and_rejects_steps_leaving_the_cone():
    field, state = OUClosure(theta=1.0, sigma=0.8), gaussians()
    out = DormandPrince5(rtol=1e-8, atol=1e-10).advance(field, state, 0.0, 1.0)
    m_ex, S_ex = field.exact(state, 1.0)
    torch.testing.assert_close(out.mean, m_ex, rtol=0, atol=1e-7)
    torch.testing.assert_close(out.cov, S_ex, rtol=0, atol=1e-7)
    assert_spd_symmetric(out)
    # A huge first step on a thin rotating ellipse leaves the cone: rejected, shrunk, never returned.
    rot = Rotation(w=3.0)
    thin = Gaussians(torch.zeros(1, 2, dtype=F64), torch.diag(torch.tensor([1.0, 1e-4], dtype=F64))[None])
    integ = Stepper(DormandPrince5(rtol=1.0, atol=1.0, first_step=2.0), rot, thin)
    out = integ.advance(thin, 0.0, 2.0)
    assert integ.stats["rejected"] > 0
    assert_spd_symmetric(out)


def test_dopri5_step_failure_below_dt_min():
    class Stiff(Field):
        def velocity(self, t, x, state):
            return -1e4 * (x - math.cos(t))

    integ = DormandPrince5(rtol=1e-10, atol=1e-12, dt_min=1e-2, first_step=0.5)
    with pytest.raises(StepFailure, match="dt_min") as info:
        integ.advance(Stiff(), particles(), 0.0, 1.0)
    assert info.value.reason.startswith("step size fell below dt_min")
    assert 0.0 <= info.value.time < 1.0


def test_pi_controller_rules():
    ctl = PIController(rtol=1e-6, atol=1e-8, dt_min=1e-6, dt_max=1.0)
    assert ctl.alpha == pytest.approx(0.17) and ctl.beta == pytest.approx(0.04)
    assert ctl.factor(1e-10, 1.0, True) == 10.0  # capped growth (0.9 · 1e10^0.17 ≈ 45)
    assert ctl.factor(0.5, 0.5, True) == pytest.approx(0.9 * 0.5**-0.17 * 0.5**0.04)
    # Steady state: the factor is 1 at ‖e‖ = 0.9^(1/(α − β)) ≈ 0.445 of the tolerance.
    steady = 0.9 ** (1 / 0.13)
    assert ctl.factor(steady, steady, True) == pytest.approx(1.0)
    assert ctl.factor(4.0, 0.1, False) < 1.0 and ctl.factor(1.2, 0.1, False) <= 1.0
    assert ctl.factor(math.nan, 1.0, False) == 0.2
    assert ctl.clamp(5.0) == 1.0 and ctl.clamp(0.0) == 1e-6
    with pytest.raises(ValueError, match="both be 0"):
        PIController(rtol=0, atol=0)


# -- Euler–Maruyama -----------------------------------------------------------------------------------------
def _em_ou(h, seed, R=4, N=250_000, theta=1.0, sigma=1.0, x0=1.0):
    field = OUClosure(theta=theta, sigma=sigma)
    state = Particles(torch.full((R, N, 1), x0, dtype=F64))
    gen = torch.Generator().manual_seed(seed)
    out = integrate(EulerMaruyama(), field, state, 0.0, 1.0, round(1 / h), gen)
    return out.x.reshape(-1)


def test_euler_maruyama_weak_order_on_ou():
    theta, sigma, x0 = 1.0, 1.0, 1.0
    mean_ex = x0 * math.exp(-theta)
    var_ex = sigma**2 / (2 * theta) * (1 - math.exp(-2 * theta))
    hs = (0.2, 0.1, 0.05)
    bias_mean, bias_var = [], []
    for k, h in enumerate(hs):
        x = _em_ou(h, seed=100 + k)
        M = x.numel()
        mean, var = float(x.mean()), float(x.var())
        # The EM chain is exactly Gaussian with mean x0(1 − θh)ⁿ and variance σ²h Σ_k (1 − θh)^{2k}:
        # compare with those at 5 standard errors (CLT: sd/√M for the mean, var·√(2/(M−1)) for the variance).
        n, q = round(1 / h), 1 - theta * h
        mean_h = x0 * q**n
        var_h = sigma**2 * h * (1 - q ** (2 * n)) / (1 - q * q)
        se_mean, se_var = math.sqrt(var_h / M), var_h * math.sqrt(2 / (M - 1))
        assert abs(mean - mean_h) < 5 * se_mean
        assert abs(var - var_h) < 5 * se_var
        # Against the SDE's exact law: CLT error plus the O(h) bias, whose leading terms are
        # −x0 e^{−θ} θ²h/2 for the mean and ≈ σ²h(θ/2)(1 + e^{−2θ}(2θ − 1)) for the variance (≤ 0.6 h here);
        # 1.5× covers the O(h²) remainder at h = 0.2.
        assert abs(mean - mean_ex) < 5 * se_mean + 1.5 * x0 * math.exp(-theta) * theta**2 * h / 2
        assert abs(var - var_ex) < 5 * se_var + 1.5 * 0.6 * h
        bias_mean.append(abs(mean - mean_ex))
        bias_var.append(abs(var - var_ex))
    # The bias shrinks linearly in h (weak order 1). Over a factor 4 in h the sampling noise (~7 % of
    # the smallest bias) moves the fitted slope by < 0.1.
    assert abs(slope(hs, bias_mean) - 1) < 0.2
    assert abs(slope(hs, bias_var) - 1) < 0.2


def test_euler_maruyama_reproducible_from_seed():
    field = OUClosure()
    state = particles(R=2, N=100, d=3)
    runs = []
    for seed in (7, 7, 8):
        gen = torch.Generator().manual_seed(seed)
        runs.append(integrate(EulerMaruyama(), field, state, 0.0, 1.0, 5, gen).x)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    # The noise stream lives in the generator: restoring its state reproduces the continuation.
    gen = torch.Generator().manual_seed(3)
    integ = EulerMaruyama()
    mid = integ.advance(field, state, 0.0, 0.1, gen)
    saved = gen.get_state()
    a = integ.advance(field, mid, 0.1, 0.2, gen).x
    gen2 = torch.Generator()
    gen2.set_state(saved)
    b = EulerMaruyama().advance(field, mid, 0.1, 0.2, gen2).x
    assert torch.equal(a, b)


def test_euler_maruyama_float32_and_noise_scale():
    class Pure(Field):  # dX = σ dW: one step adds σ√h ξ
        def velocity(self, t, x, state):
            return torch.zeros_like(x)

        def diffusion(self, t):
            return 2.0

    state = Particles(torch.zeros(1, 200_000, 1, dtype=torch.float32))
    out = EulerMaruyama().advance(Pure(), state, 0.0, 0.25, torch.Generator().manual_seed(0))
    assert out.x.dtype == torch.float32
    # sd = σ√h = 1; its estimator's standard error is ~1/√(2M) ≈ 1.6e-3, so 1e-2 is > 6 SE.
    assert abs(float(out.x.std()) - 1.0) < 1e-2


def test_euler_maruyama_without_diffusion_is_euler_and_draws_nothing():
    field, state = Riccati(), particles()
    gen = torch.Generator().manual_seed(1)
    before = gen.get_state()
    em = integrate(EulerMaruyama(), field, state, 0.0, 1.0, 8, gen)
    eu = integrate(ExplicitRungeKutta(EULER), field, state, 0.0, 1.0, 8)
    assert torch.equal(em.x, eu.x)
    assert torch.equal(gen.get_state(), before)


def test_euler_maruyama_gaussian_path_is_euler_pushforward():
    field, state = OUClosure(theta=1.0, sigma=0.8), gaussians()
    em = integrate(EulerMaruyama(), field, state, 0.0, 1.0, 8, torch.Generator().manual_seed(0))
    eu = integrate(ExplicitRungeKutta(EULER), field, state, 0.0, 1.0, 8)
    assert torch.equal(em.mean, eu.mean) and torch.equal(em.cov, eu.cov)
    assert_spd_symmetric(em)


def test_euler_maruyama_refuses_backward_steps():
    with pytest.raises(TimeRangeError, match="forward in time only"):
        EulerMaruyama().advance(OUClosure(), particles(), 1.0, 0.5, torch.Generator())


def test_deterministic_integrators_refuse_noisy_particles():
    field, state = OUClosure(), particles()
    for integ in (ExplicitRungeKutta(RK4), DormandPrince5()):
        with pytest.raises(CapabilityError, match="euler_maruyama"):
            integ.check(field, state)
        with pytest.raises(CapabilityError, match="euler_maruyama"):
            integ.advance(field, state, 0.0, 0.1)
    # On a Gaussian state the closure already is the law's velocity: allowed.
    ExplicitRungeKutta(RK4).check(field, gaussians())
    EulerMaruyama().check(field, state)


def test_gaussian_state_needs_a_closure():
    with pytest.raises(CapabilityError, match="affine"):
        ExplicitRungeKutta(RK4).advance(Riccati(), gaussians(d=1), 0.0, 0.1)


# -- registration --------------------------------------------------------------------------------------------
NAMES = {"euler", "heun", "midpoint", "rk4", "dopri5", "euler_maruyama", "stochastic_heun", "sra", "milstein"}


def test_builtin_hook_registers_every_integrator():
    registry = Registry()
    builtin.measureflow_register_integrators(registry)
    assert set(registry.names("integrators")) == NAMES
    for name, (tab, order) in FIXED.items():
        integ = registry.integrator(name)
        assert (integ.name, integ.order, integ.adaptive, integ.stochastic) == (name, order, False, False)
    dp = registry.integrator("dopri5", rtol=1e-3, atol=1e-5, dt_max=0.5)
    assert (dp.name, dp.order, dp.adaptive, dp.stochastic) == ("dopri5", 5, True, False)
    assert dp.controller.rtol == 1e-3 and dp.options["dt_max"] == 0.5
    json.dumps(dp.options)
    em = registry.integrator("euler_maruyama")
    assert (em.name, em.order, em.adaptive, em.stochastic) == ("euler_maruyama", 1, False, True)
    assert registry.integrator("rk4", max_halvings=3).max_halvings == 3
    with pytest.raises(UnknownPluginError, match="registered integrators: dopri5, euler, euler_maruyama"):
        registry.integrator("rk45")


def test_registry_lookup_through_get_registry():
    for module in ("measureflow.io.builtin", "measureflow.observables", "measureflow_plugins.linear"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not available")
        pytest.importorskip(module)
    registry = measureflow.get_registry()
    assert NAMES <= set(registry.names("integrators"))
    assert isinstance(measureflow.integrator("rk4"), ExplicitRungeKutta)
    assert registry.owner_of("integrators", "dopri5") == "measureflow.integrators.builtin"


def test_step_failure_pickles_with_reason_and_time():
    import pickle

    exc = pickle.loads(pickle.dumps(StepFailure("covariance left the SPD cone", 1.5, "detail")))
    assert (exc.reason, exc.time) == ("covariance left the SPD cone", 1.5)


# -- device ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:Synchronization debug mode")
def test_fixed_step_particle_path_never_synchronises():
    device = torch.device("cuda")
    field = OUClosure()
    state = Particles(torch.rand(2, 1000, 3, device=device))
    gen = torch.Generator(device=device).manual_seed(0)
    mean_field = MeanDrift()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for tab in (EULER, HEUN, MIDPOINT, RK4):
            ExplicitRungeKutta(tab).advance(mean_field, state, 0.0, 0.1)
        out = EulerMaruyama().advance(field, state, 0.0, 0.1, gen)
        with pytest.raises(RuntimeError):  # the detector is live: reading a value back is caught
            float(out.x.sum())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.x.device.type == "cuda"


@pytest.mark.gpu
def test_cuda_results_match_cpu():
    device = torch.device("cuda")
    field = Riccati()
    cpu = particles()
    gpu = Particles(cpu.x.to(device))
    for make in (lambda: ExplicitRungeKutta(RK4), DormandPrince5):
        integ_cpu, integ_gpu = make(), make()
        a = integrate(integ_cpu, field, cpu, 0.0, 1.0, 4)
        b = integrate(integ_gpu, field, gpu, 0.0, 1.0, 4)
        torch.testing.assert_close(b.x.cpu(), a.x, rtol=0, atol=1e-12)
    g_cpu = gaussians()
    g_gpu = g_cpu.to(device)
    lin = Linear([[-0.5, 2.0], [0.0, -1.0]])
    lin.A, lin.c = lin.A.to(device), lin.c.to(device)
    out = integrate(ExplicitRungeKutta(RK4), lin, g_gpu, 0.0, 1.0, 8)
    assert out.cov.device.type == "cuda"
    assert_spd_symmetric(out.to("cpu"))
    # A CPU generator drives CUDA noise too (drawn on the CPU, copied over).
    noisy = EulerMaruyama().advance(OUClosure(), gpu, 0.0, 0.1, torch.Generator().manual_seed(0))
    assert noisy.x.device.type == "cuda"
