"""The run loop: exactness on affine fields, triggers, stop conditions, results."""

import math
import time

import numpy as np
import pytest
import torch

import measureflow
from measureflow import Field, Gaussians, MeasureflowError, Particles, Periodic, Simulation
from measureflow.simulation import Observer
from measureflow.run import RunLoop
from measureflow.run.health import Health

A = torch.tensor([[-0.5, -2.0], [1.0, -0.5]], dtype=torch.float64)
B = torch.tensor([0.5, 0.0], dtype=torch.float64)
M0 = torch.tensor([2.0, -1.0], dtype=torch.float64)
S0 = torch.tensor([[1.5, 0.6], [0.6, 0.8]], dtype=torch.float64)


def memory_writer(every=1):
    return measureflow.get_registry().writer("memory", every=every)


def test_particles_follow_the_linear_flow_map():
    """For v = b + Ax the flow is affine, so the particles' empirical mean and covariance are
    pushed forward exactly; only RK4's local error O(h⁵)·n ≈ 1e-9 separates them."""
    field = measureflow.field("linear", A=A, b=B)
    start = Gaussians(M0.expand(2, -1), S0.expand(2, -1, -1)).sample(500, torch.Generator().manual_seed(1))
    result = Simulation(start, field, "rk4", 0.0, 2.0, steps=100, progress=False).run()
    assert result.ok and result.steps_done == 100
    empirical0 = Gaussians(start.mean(), start.covariance())
    exact = field.solution(2.0, empirical0)
    assert torch.allclose(result.state.mean(), exact.mean, atol=1e-8)
    assert torch.allclose(result.state.covariance(), exact.cov, atol=1e-8)


def test_gaussian_state_matches_the_closed_form_and_stays_spd():
    field = measureflow.field("linear", A=A, b=B)
    start = Gaussians(M0, S0)
    for name, steps, tol in [("euler", 4000, 5e-3), ("rk4", 100, 1e-7), ("dopri5", 10, 1e-6)]:
        result = Simulation(start, field, name, 0.0, 2.0, steps=steps, progress=False).run()
        exact = field.solution(2.0, start)
        assert result.ok
        assert torch.allclose(result.state.cov, exact.cov, atol=tol), name
        assert torch.allclose(result.state.mean, exact.mean, atol=tol), name
        assert torch.equal(result.state.cov, result.state.cov.transpose(-1, -2))
        assert torch.linalg.cholesky_ex(result.state.cov)[1].eq(0).all()


def test_backward_integration_inverts_the_forward_run():
    field = measureflow.field("linear", A=A, b=B)
    start = Gaussians(M0, S0)
    forward = Simulation(start, field, "rk4", 0.0, 1.0, steps=50, progress=False).run().state
    back = Simulation(forward, field, "rk4", 1.0, 0.0, steps=50, progress=False).run().state
    assert torch.allclose(back.cov, start.cov, atol=1e-8) and torch.allclose(back.mean, start.mean, atol=1e-8)


def test_ornstein_uhlenbeck_particles_reach_the_exact_law():
    """Euler–Maruyama is weakly first order: at h = 0.01 the variance bias is ~θh·s² ≈ 3e-3;
    with 2·20000 particles the sampling s.e. of a covariance entry is ≈ 0.005."""
    field = measureflow.field("ornstein_uhlenbeck", theta=1.0, sigma=0.8, center=torch.tensor([0.0, 1.0]))
    start = Gaussians(M0.expand(2, -1), S0.expand(2, -1, -1))
    particles = start.sample(20000, torch.Generator().manual_seed(2))
    result = Simulation(particles, field, None, 0.0, 1.0, steps=100, seed=5, progress=False).run()
    exact = field.solution(1.0, start)
    assert torch.allclose(result.state.mean(), exact.mean, atol=0.03)
    assert torch.allclose(result.state.covariance(), exact.cov, atol=0.04)
    again = Simulation(particles, field, None, 0.0, 1.0, steps=100, seed=5, progress=False).run()
    assert torch.equal(again.state.x, result.state.x)  # the seed fixes the noise stream
    other = Simulation(particles, field, None, 0.0, 1.0, steps=100, seed=6, progress=False).run()
    assert not torch.equal(other.state.x, result.state.x)


def test_triggers_writers_and_observables():
    field = measureflow.field("linear", A=A, b=B)
    start = Gaussians(M0, S0)
    writer = memory_writer(every=Periodic(3))
    result = Simulation(
        start, field, "rk4", 0.0, 1.0, steps=10, writers=[writer],
        observers=["mean", Observer("covariance", every=5), Observer(lambda s, **_: s.cov.diagonal(dim1=-2, dim2=-1).sum(-1), name="trace", every=2)],
        progress=False,
    ).run()
    assert list(writer.steps) == [0, 3, 6, 9, 10]  # the last step is always written
    assert np.allclose(writer.times, [0.0, 0.3, 0.6, 0.9, 1.0])
    assert list(result.observables["covariance"].steps) == [0, 5, 10]
    assert list(result.observables["trace"].steps) == [0, 2, 4, 6, 8, 10]
    assert list(result.observables["mean"].steps) == list(range(11))  # default: every max(1, n//100)
    final_cov = result.observables["covariance"].values[-1, 0]
    assert np.allclose(final_cov, result.state.cov[0].numpy())
    assert np.allclose(result.grid, np.linspace(0, 1, 11))


class Exploding(Field):
    """v = x² in one dimension blows up at t = 1/x₀ (x₀ = 2 → t = 0.5)."""

    name = "exploding"

    def velocity(self, t, x, state):
        return x * x


class PoisonAfter(Field):
    name = "poison"

    def velocity(self, t, x, state):
        return torch.full_like(x, math.nan) if t >= 0.5 else torch.zeros_like(x)


def test_blowup_and_nonfinite_stop_with_step_and_time_and_keep_frames():
    start = Particles(torch.full((1, 3, 1), 2.0, dtype=torch.float64))
    writer = memory_writer(every=1)
    result = Simulation(start, Exploding(), "euler", 0.0, 1.0, steps=100, writers=[writer], blowup=1e3,
                        check_every=7, progress=False).run()
    assert result.status.code == "blowup"
    # Explicit Euler for x' = x², x₀ = 2, h = 0.01 first exceeds 1e3 at step 53 (computed by hand-iteration below).
    x, k = 2.0, 0
    while x <= 1e3:
        x, k = x + 0.01 * x * x, k + 1
    assert result.status.step == k and math.isclose(result.status.time, k / 100)
    assert list(writer.steps) == list(range(k))  # every frame before the event, nothing after
    assert result.steps_done == k - 1

    poisoned = Simulation(start, PoisonAfter(), "euler", 0.0, 1.0, steps=10, check_every=100, progress=False).run()
    # The step leaving t = 0.5 produces NaN; it is step 6 (t = 0.6) and is detected at the last-step check.
    assert poisoned.status.code == "nonfinite" and poisoned.status.step == 6
    assert "NaN" in poisoned.status.message


class PoisonLate(Field):
    name = "poison_late"

    def velocity(self, t, x, state):
        return torch.full_like(x, math.nan) if t >= 0.6525 else torch.ones_like(x)


def test_health_found_in_a_later_block_without_intermediate_reads():
    # No writer and no check_every: the flags are read once, at the end, after several blocks of
    # recorded peaks have been folded on the device. The first offending step must still be found.
    start = Particles(torch.full((1, 3, 1), 2.0, dtype=torch.float64))
    late = Simulation(start, PoisonLate(), "euler", 0.0, 1.0, steps=200, progress=False).run()
    # The velocity turns NaN when the step starts at t ≥ 0.6525, i.e. step k with (k − 1)/200 ≥ 0.6525: k = 132.
    assert late.status.code == "nonfinite" and late.status.step == 132
    # x' = x² blows past 1e3 at step k (hand iteration), then overflows to inf and NaN in later steps and
    # later blocks: the first event, and its kind, are what the run reports.
    blown = Simulation(start, Exploding(), "euler", 0.0, 2.0, steps=400, blowup=1e3, progress=False).run()
    x, k = 2.0, 0
    while x <= 1e3:
        x, k = x + 0.005 * x * x, k + 1
    assert blown.status.code == "blowup" and blown.status.step == k


class Riccati(Field):
    """Σ̇ = 2Σ², m = 0 (v = Σx): Σ(t) = Σ₀(1 − 2tΣ₀)⁻¹ blows up at t* = 1/(2λ_max(Σ₀))."""

    name = "riccati_cov"

    def affine(self, t, state):
        return torch.zeros_like(state.mean), state.cov.clone()


def test_blowup_is_reported_before_a_later_step_failure():
    # Σ₀ = 1 in 1-D: t* = ½. RK4 with h = 0.05 passes the bound 1e3 a few steps before t*, and the
    # steps after it leave the SPD cone (a step failure). Without intermediate reads the run must
    # still report the first event, the blow-up, not the failure it caused.
    start = Gaussians(torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, 1, dtype=torch.float64))
    result = Simulation(start, Riccati(), "rk4", 0.0, 1.0, steps=20, blowup=1e3, progress=False).run()
    assert result.status.code == "blowup", result.status
    assert 0.45 <= result.status.time <= 0.6  # RK4 lags the exact blow-up by a step or two


class Slow(Field):
    name = "slow"

    def velocity(self, t, x, state):
        time.sleep(0.02)
        return torch.zeros_like(x)


def test_wall_clock_budget_stops_the_run():
    start = Particles(torch.zeros(1, 2, 1))
    result = Simulation(start, Slow(), "euler", 0.0, 1.0, steps=1000, wall_time=0.2, progress=False).run()
    assert result.status.code == "time_budget"
    assert 0 < result.steps_done < 1000 and result.status.step == result.steps_done


def test_grid_and_assembly_errors():
    field = measureflow.field("linear", A=A, b=B)
    start = Gaussians(M0, S0)
    with pytest.raises(MeasureflowError, match="exactly one of steps"):
        Simulation(start, field, "rk4", 0.0, 1.0)
    with pytest.raises(MeasureflowError, match="does not divide"):
        Simulation(start, field, "rk4", 0.0, 1.0, dt=0.3)
    assert Simulation(start, field, "rk4", 0.0, 1.0, dt=0.25).n_steps == 4
    with pytest.raises(measureflow.CapabilityError, match="no Gaussian closure"):
        Simulation(start, Exploding(), "rk4", 0.0, 1.0, steps=2)
    with pytest.raises(measureflow.UnknownPluginError, match="registered integrators"):
        Simulation(start, field, "rk5", 0.0, 1.0, steps=2)
    noisy = measureflow.field("ornstein_uhlenbeck")
    particles = Particles(torch.zeros(1, 2, 2))
    with pytest.raises(measureflow.CapabilityError, match="euler_maruyama"):
        Simulation(particles, noisy, "rk4", 0.0, 1.0, steps=2)
    with pytest.raises(measureflow.TimeRangeError, match=r"\[0, inf\]"):
        Simulation(particles, noisy, None, -1.0, 1.0, steps=2)


def test_progress_bar_is_silent_off_a_terminal(capsys):
    field = measureflow.field("linear", A=A, b=B)
    Simulation(Gaussians(M0, S0), field, "rk4", 0.0, 1.0, steps=5).run()
    assert "step" not in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_health_records_the_largest_absolute_value_as_the_infinity_norm_does(dtype):
    """A step's peak is max |value| over every value of any shape: NaN if one is NaN, inf if one is ±inf,
    the largest magnitude of a negative value included (the same as torch.linalg.vector_norm(ord=inf))."""
    g = torch.Generator().manual_seed(5)
    cases = [torch.randn(2, 7, 3, generator=g, dtype=dtype) * 4.0 for _ in range(4)]
    cases[1].view(-1)[9] = -50.0  # the peak is a negative value's magnitude
    cases[2].view(-1)[4] = -math.inf
    cases[3].view(-1)[[2, 30]] = torch.tensor([math.inf, math.nan], dtype=dtype)
    cases.append(torch.empty(0, dtype=dtype))
    health = Health(None, "cpu", block=8)
    for step, values in enumerate(cases):
        health.record(values, step)
    # (vector_norm refuses no values; the record takes their peak as 0)
    expected = torch.stack([torch.linalg.vector_norm(v, ord=math.inf) if v.numel() else torch.zeros((), dtype=dtype)
                            for v in cases])
    torch.testing.assert_close(health.peaks[: len(cases)], expected, equal_nan=True, rtol=0, atol=0)
    assert health.peaks[1].item() == 50.0 and health.peaks[2].item() == math.inf and health.first_bad() == (2, "nonfinite")


@pytest.mark.parametrize("bound", [None, 10.0, float("inf")])
def test_health_answers_the_first_bad_step_whenever_asked(bound):
    """Health.first_bad, asked at random steps (its one-read answer for a clean pending block, its fold
    otherwise; blocks of 4 folded on the device in between), names the first step whose peak is NaN,
    infinite or beyond the bound, and its kind, as a direct scan of the peaks does."""
    rng = np.random.default_rng(3)
    for trial in range(40):
        peaks = rng.uniform(0.0, 9.0, 30)
        for at in rng.choice(30, size=rng.integers(0, 3), replace=False):
            peaks[at] = rng.choice([np.nan, np.inf, 11.0])
        health = Health(bound, "cpu", block=4)
        for step, peak in enumerate(peaks):
            health.record(torch.tensor([peak]), step)
            if rng.random() < 0.3 or step == len(peaks) - 1:
                seen = peaks[: step + 1]
                bad = ~np.isfinite(seen) | ((seen > bound) if bound is not None else False)
                expected = None
                if bad.any():
                    first = int(np.argmax(bad))
                    expected = (first, "nonfinite" if not np.isfinite(seen[first]) else "blowup")
                assert health.first_bad() == expected


@pytest.mark.gpu
def test_data_leaves_the_device_only_where_a_writer_writes(monkeypatch):
    # CUDA's sync debug mode raises on any device→host synchronisation. It is switched off only
    # inside the writer and the health read (which runs on writing steps), so a sync anywhere else
    # in the loop — the integrator, the observers, the triggers — fails the run.
    device = torch.device("cuda")
    sync_ok = []

    def allowing_syncs(function, label):
        def wrapped(*args, **kwargs):
            torch.cuda.set_sync_debug_mode(0)
            try:
                return function(*args, **kwargs)
            finally:
                sync_ok.append(label)
                torch.cuda.set_sync_debug_mode("error")
        return wrapped

    monkeypatch.setattr(Health, "first_bad", allowing_syncs(Health.first_bad, "health"))
    writer = memory_writer(every=Periodic(5))
    monkeypatch.setattr(writer, "write_frame", allowing_syncs(writer.write_frame, "frame"))
    monkeypatch.setattr(writer, "write_observables", allowing_syncs(writer.write_observables, "observables"))
    field = measureflow.field("ornstein_uhlenbeck", theta=1.0, sigma=0.5)
    start = Particles(torch.randn(2, 1000, 2, dtype=torch.float32, device=device))
    field.velocity(0.0, start.x, start)  # the field's one copy of its centre to the device, made beforehand
    sim = Simulation(start, field, "euler_maruyama", 0.0, 1.0, steps=20, writers=[writer],
                     observers=["mean"], observe_every=1, seed=0, progress=False)
    loop = RunLoop.run

    def looping(self):  # the detector covers the loop; the Result is then built on the host
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return loop(self)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(RunLoop, "run", looping)
    try:
        result = sim.run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert result.status.ok and result.state.x.device.type == "cuda"
    assert list(writer.steps) == [0, 5, 10, 15, 20]
    assert sync_ok.count("health") == 4  # steps 5, 10, 15 and 20: the writing steps after step 0


def test_explicit_time_grid_is_followed_and_recorded(tmp_path):
    # A geometric grid: each step is a fixed RK4 step between consecutive grid times, so the result
    # equals advancing by hand over the same grid (bit for bit), and the file records those times.
    field = measureflow.field("linear", A=torch.tensor([[-1.0, 0.5], [0.0, -2.0]], dtype=torch.float64))
    start = measureflow.Particles(torch.randn(1, 50, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    times = [0.001 * (1000 ** (k / 20)) for k in range(21)]
    out = tmp_path / "grid.h5"
    result = Simulation(start, field, "rk4", times=times, writers=[str(out)], progress=False).run()
    step = measureflow.integrator("rk4")
    state = start
    for a, b in zip(times[:-1], times[1:]):
        state = step.advance(field, state, a, b)
    assert torch.equal(result.state.x, state.x)
    with measureflow.open(out) as traj:
        assert np.allclose(traj.times, times, rtol=0, atol=1e-15)
    with pytest.raises(measureflow.MeasureflowError, match="strictly"):
        Simulation(start, field, "rk4", times=[0.0, 0.5, 0.5, 1.0])
    with pytest.raises(measureflow.MeasureflowError, match="not several"):
        Simulation(start, field, "rk4", times=[0.0, 1.0], steps=4)
    with pytest.raises(measureflow.MeasureflowError, match="disagrees"):
        Simulation(start, field, "rk4", t1=2.0, times=[0.0, 1.0])


def test_noise_does_not_replay_an_initial_draw_with_the_same_seed():
    # Initial particles drawn with manual_seed(seed) and Simulation(seed=seed): the first noise
    # increments must not be the initial draw's normals (that correlates state and noise).
    from measureflow.integrators import noise_seed

    seed = 3
    x0 = torch.randn(1, 4000, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    field = measureflow.field("ornstein_uhlenbeck", theta=1e-9, sigma=1.0)  # Brownian motion to 1e-9
    h = 1e-2
    out = Simulation(Particles(x0), field, "euler_maruyama", 0.0, h, steps=1, seed=seed, progress=False).run()
    increments = (out.state.x - x0).flatten() / math.sqrt(h)
    # independent standard normals: the sample correlation is N(0, 1/4000), |ρ| < 0.1 is 6σ
    rho = torch.corrcoef(torch.stack([increments, x0.flatten()]))[0, 1]
    assert abs(float(rho)) < 0.1
    assert noise_seed(seed) != seed and noise_seed(seed) == noise_seed(seed)
