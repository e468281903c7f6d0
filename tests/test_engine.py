"""The run engine: solvers as pure step functions, dense output, controllers, channels, triggers,
operations, the one run loop, and a Simulation fixed once checked.

Analytic cases: the linear field ẋ = Ax has x(t) = e^{tA}x₀ (MATH.md §0), so interpolation and
integration errors are measured against a closed form; ∫₀ᵗ|x(s)|²ds for a scalar decay ẋ = −λx is
x₀²(1 − e^{−2λt})/(2λ)."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
import textwrap
import threading
import time

import h5py
import numpy as np
import pytest
import torch

import measureflow
from measureflow import Gaussians, Particles, Simulation
from measureflow.errors import MeasureflowError, StepFailure, TriggerError
from measureflow.fields import Field
from measureflow.integrators import (
    Channel,
    ConstantController,
    DormandPrince5,
    Dynamics,
    ExplicitRungeKutta,
    PIController,
    Stepper,
)
from measureflow.integrators.tableau import DOPRI5, HEUN, RK4
from measureflow.run import Callback
from measureflow.triggers import After, Always, At, Before, Never, On, Periodic, as_trigger

F64 = torch.float64
A = torch.tensor([[-0.5, -2.0], [1.0, -0.5]], dtype=F64)


def linear_field():
    return measureflow.field("linear", A=A)


def exact(x0, t):
    return x0 @ torch.linalg.matrix_exp(t * A).T


def particles(n=8, seed=0):
    return Particles(torch.randn(2, n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64))


def gaussians():
    return Gaussians(torch.tensor([[1.0, -0.5]], dtype=F64), torch.tensor([[[1.0, 0.3], [0.3, 0.5]]], dtype=F64))


# -- solvers are specs: one object, many runs ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["rk4", "dopri5", "euler_maruyama"])
def test_one_integrator_serves_two_runs_with_identical_results(name):
    integrator = measureflow.integrator(name)
    field = measureflow.field("ornstein_uhlenbeck", theta=1.0, sigma=0.5) if name == "euler_maruyama" else linear_field()

    def run():
        return Simulation(particles(), field, integrator, 0.0, 1.0, steps=20, observers=["mean"], seed=4,
                          progress=False).run()

    first, second = run(), run()
    assert torch.equal(first.state.x, second.state.x)
    assert first.integrator_stats == second.integrator_stats
    # and at the same time, from two threads
    results = [None, None]

    def worker(i):
        results[i] = run()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r.state.x, first.state.x) for r in results)
    assert not any(hasattr(integrator, attr) for attr in ("stats", "_dt", "_fsal"))


def test_step_is_a_function_of_its_arguments():
    solver, field, state = ExplicitRungeKutta(RK4), linear_field(), particles()
    a = solver.step(field, 0.0, 0.1, state)
    b = solver.step(field, 0.0, 0.1, state)
    y1, error, dense, solver_state = a
    assert torch.equal(y1.x, b.y.x) and error is None and solver_state is None
    # local error of one RK4 step: (h‖A‖)⁵/5! ≈ 6e-6 relative at h = 0.1, ‖A‖ ≈ 2.3
    torch.testing.assert_close(y1.x, exact(state.x, 0.1), rtol=0, atol=2e-5)
    # dopri5's step returns its embedded error estimate and its first-same-as-last stage
    dp = DormandPrince5()
    y1, error, dense, solver_state = dp.step(field, 0.0, 0.1, state)
    assert error[0].shape == state.x.shape and float(error[0].abs().max()) < 1e-6
    assert solver_state.time == 0.1 and solver_state.derivative[0].shape == state.x.shape


# -- dense output ------------------------------------------------------------------------------------------------
def _dense_error(solver, h):
    field, state = linear_field(), particles()
    _, _, dense, _ = solver.step(field, 0.0, h, state)
    thetas = np.linspace(0.0, 1.0, 11)
    return max(float((dense(float(th * h)).x - exact(state.x, th * h)).abs().max()) for th in thetas)


@pytest.mark.parametrize("solver, order", [(ExplicitRungeKutta(RK4), 4), (DormandPrince5(), 5)])
def test_dense_output_local_error_order(solver, order):
    # Hermite (third-order interpolant: local error O(h⁴)) on rk4; Shampine's fourth-order
    # continuous extension of Dormand–Prince (local error O(h⁵)).
    hs = [0.2, 0.1, 0.05]
    errors = [_dense_error(solver, h) for h in hs]
    slope = np.polyfit(np.log(hs), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.35, (errors, slope)


def test_dense_output_hits_the_step_ends_and_refuses_outside():
    field, state = linear_field(), particles()
    for solver in (ExplicitRungeKutta(HEUN), DormandPrince5(), measureflow.integrator("euler")):
        y1, _, dense, _ = solver.step(field, 0.0, 0.3, state)
        torch.testing.assert_close(dense(0.0).x, state.x, rtol=0, atol=1e-15)
        torch.testing.assert_close(dense(0.3).x, y1.x, rtol=0, atol=1e-14)
        with pytest.raises(ValueError, match="covers t in"):
            dense(0.31)
    g = gaussians()
    y1, _, dense, _ = ExplicitRungeKutta(RK4).step(field, 0.0, 0.2, g)
    mid = dense(0.1)
    assert torch.equal(mid.cov, mid.cov.mT)
    # cubic Hermite interpolation error ≤ h⁴‖ẍ̈‖/384 ≈ (h‖A‖)⁴/384·|m| ≈ 1.3e-4 at h = 0.2
    torch.testing.assert_close(mid.mean, g.mean @ torch.linalg.matrix_exp(0.1 * A).T, rtol=0, atol=3e-4)


def test_stepper_keeps_the_dense_outputs_of_the_last_interval():
    field, state = linear_field(), particles()
    stepper = Stepper(DormandPrince5(rtol=1e-8, atol=1e-10), field, state)
    out = stepper.advance(state, 0.0, 1.0)
    pieces = stepper.carry.dense
    assert len(pieces) == stepper.stats["accepted"] >= 2
    assert pieces[0].t0 == 0.0 and pieces[-1].t1 == 1.0
    assert all(a.t1 == b.t0 for a, b in zip(pieces[:-1], pieces[1:]))
    torch.testing.assert_close(pieces[-1](1.0).x, out.x, rtol=0, atol=1e-14)


# -- controllers ---------------------------------------------------------------------------------------------------
def test_controller_objects_decide_the_steps():
    field, state = linear_field(), particles()
    loose = measureflow.integrator("dopri5", controller=PIController(rtol=1e-3, atol=1e-5))
    tight = measureflow.integrator("dopri5", controller=PIController(rtol=1e-9, atol=1e-11))
    res = {}
    for name, integ in (("loose", loose), ("tight", tight)):
        r = Simulation(state, field, integ, 0.0, 2.0, steps=4, progress=False).run()
        res[name] = (r.integrator_stats["accepted"], float((r.state.x - exact(state.x, 2.0)).abs().max()))
    assert res["tight"][0] > res["loose"][0] and res["tight"][1] < 1e-7 < res["loose"][1]
    # dopri5 under a constant controller is a fixed-step fifth-order method
    errors = []
    for n in (4, 8, 16):
        fixed = measureflow.integrator("dopri5", controller=ConstantController())
        r = Simulation(state, field, fixed, 0.0, 2.0, steps=n, progress=False).run()
        assert r.integrator_stats["accepted"] == n
        errors.append(float((r.state.x - exact(state.x, 2.0)).abs().max()))
    slope = np.polyfit(np.log([1 / 4, 1 / 8, 1 / 16]), np.log(errors), 1)[0]
    assert abs(slope - 5) < 0.5, errors
    with pytest.raises(ValueError, match="no embedded error estimate"):
        ExplicitRungeKutta(RK4, controller=PIController())


def test_step_failure_is_caught_by_type_and_recorded_as_a_status():
    class Stiff(Field):
        name = "stiff"

        def velocity(self, t, x, state):
            return -1e4 * (x - math.cos(t))

    integ = measureflow.integrator("dopri5", rtol=1e-10, atol=1e-12, dt_min=1e-2, first_step=0.5)
    with pytest.raises(StepFailure):
        integ.advance(Stiff(), particles(), 0.0, 1.0)
    result = Simulation(particles(), Stiff(), integ, 0.0, 1.0, steps=4, progress=False).run()
    assert result.status.code == "step_failure" and "dt_min" in result.status.message


# -- channels ------------------------------------------------------------------------------------------------------
class Action(Channel):
    """a(t) = ∫₀ᵗ |ẋ(s)|² ds per particle (the kinetic action along the path)."""

    name = "action"

    def initial(self, state):
        return torch.zeros(state.x.shape[:-1], dtype=state.dtype, device=state.device)

    def rate(self, field, t, state, velocity):
        return velocity.square().sum(-1)


class Decay(Field):
    name = "decay"

    def velocity(self, t, x, state):
        return -0.7 * x


@pytest.mark.parametrize("integrator", ["rk4", "dopri5", "euler_maruyama"])
def test_an_auxiliary_channel_is_integrated_with_the_particles(integrator):
    # ẋ = −λx: |ẋ|² = λ²x₀²e^{−2λt}, so a(t) = λ x₀² (1 − e^{−2λt}) / 2.
    lam, t1 = 0.7, 1.5
    state = particles(n=5)
    steps = 40 if integrator != "euler_maruyama" else 4000
    result = Simulation(state, Decay(), integrator, 0.0, t1, steps=steps, channels=[Action()], progress=False).run()
    expected = lam * state.x.square().sum(-1) * (1 - math.exp(-2 * lam * t1)) / 2
    tol = 1e-7 if integrator != "euler_maruyama" else 2e-3  # Euler: O(h) with h = 3.75e-4
    torch.testing.assert_close(result.state.channels["action"], expected, rtol=tol, atol=tol)
    assert torch.equal(result.state.action, result.state.channels["action"])
    torch.testing.assert_close(result.state.x, state.x * math.exp(-lam * t1), rtol=tol, atol=tol)


def test_channels_are_recorded_with_every_frame(tmp_path):
    state = particles(n=5)
    memory = measureflow.get_registry().writer("memory", every=4)
    path = tmp_path / "run.h5"
    result = Simulation(state, Decay(), "rk4", 0.0, 1.0, steps=8, channels=[Action()], progress=False,
                        writers=[memory, measureflow.get_registry().writer("h5md", path, every=4)]).run()
    lam = 0.7
    for traj in (memory, result, measureflow.open(path)):
        action = np.asarray(traj.channels["action"][:])
        assert action.shape == (3, 2, 5) and list(traj.steps) == [0, 4, 8]
        assert np.array_equal(action[0], np.zeros((2, 5)))
        for k, t in enumerate((0.0, 0.5, 1.0)):
            expected = lam * state.x.square().sum(-1).numpy() * (1 - math.exp(-2 * lam * t)) / 2
            # RK4 at h = 0.125 on ẋ = −0.7x: relative error ~(λh)⁴/5! ≈ 5e-7 per unit time
            np.testing.assert_allclose(action[k], expected, rtol=1e-5, atol=1e-9)
    # resuming into the file keeps the channel's frames together with the positions
    with h5py.File(path, "r") as f:
        assert f["particles/trajectory/action/value"].shape == (3, 10)


# -- pieces and projection -----------------------------------------------------------------------------------------
class Switching(Field):
    """ẋ = a(t)·x with a = −1 before t = 0.5 and +1 after: x(1) = x₀ (e^{−0.5}·e^{0.5})."""

    name = "switching"

    def __init__(self, rate=None):
        self.rate = rate

    def velocity(self, t, x, state):
        rate = self.rate if self.rate is not None else (-1.0 if t < 0.5 else 1.0)
        return rate * x

    def pieces(self, t0, t1):
        if t0 < 0.5 < t1:
            return [(t0, 0.5, Switching(-1.0)), (0.5, t1, Switching(1.0))]
        return [(t0, t1, Switching(-1.0 if t0 < 0.5 else 1.0))]

    def project(self, state):
        return state.with_positions(state.x / state.x.norm(dim=-1, keepdim=True))


def test_every_integrator_cuts_at_pieces_and_projects():
    state = Particles(torch.tensor([[[3.0, 4.0]]], dtype=F64))
    out = Stepper(ExplicitRungeKutta(RK4), Switching(), state).advance(state, 0.0, 1.0)
    # one RK4 step per piece of the linear flow, then back on the unit circle
    torch.testing.assert_close(out.x, torch.tensor([[[0.6, 0.8]]], dtype=F64), rtol=0, atol=1e-15)


# -- triggers ------------------------------------------------------------------------------------------------------
def test_triggers_compose_resolve_and_pickle():
    steps = range(12)
    assert [s for s in steps if (Periodic(3) & After(3))(s)] == [6, 9]
    assert [s for s in steps if (Before(2) | On([7]))(s)] == [0, 1, 7]
    assert [s for s in steps if (~Periodic(2))(s)] == [1, 3, 5, 7, 9, 11]
    assert [s for s in steps if Always()(s)] == list(steps) and not any(Never()(s) for s in steps)
    grid = [0.1 * k for k in range(11)]
    at = At([0.25, 0.5, 2.0]).resolve(grid)
    assert [s for s in range(11) if at(s)] == [3, 5]
    composed = (Periodic(4) | At([0.55])).resolve(grid)
    assert [s for s in range(11) if composed(s)] == [0, 4, 6, 8]
    for trig in (Periodic(3) & After(3), ~On([1, 2]), At([0.5]), Before(4) | Always()):
        assert pickle.loads(pickle.dumps(trig)) == trig
    with pytest.raises(TriggerError, match="lambda.*Ray"):
        as_trigger(lambda step, time: step % 2 == 0)

    def local(step, time):
        return True

    with pytest.raises(TriggerError, match="inside another function"):
        as_trigger(local)
    assert as_trigger(_module_level_trigger)(4) and not as_trigger(_module_level_trigger)(3)


def _module_level_trigger(step, time=None):
    return step % 4 == 0


def test_time_triggers_fire_in_a_run():
    writer = measureflow.get_registry().writer("memory", every=At([0.25, 0.5]))
    Simulation(particles(), linear_field(), "rk4", 0.0, 1.0, steps=10, writers=[writer], progress=False).run()
    assert list(writer.steps) == [3, 5, 10]  # the last frame is always written


# -- operations and the loop -----------------------------------------------------------------------------------
def test_callbacks_are_operations_that_can_stop_a_run(tmp_path):
    seen = []

    def stop_at_seven(step, time, state):
        seen.append(step)
        return step == 7

    result = Simulation(particles(), linear_field(), "rk4", 0.0, 1.0, steps=20, progress=False,
                        callbacks=[Callback(stop_at_seven, every=Periodic(1))], checkpoint=tmp_path / "c.ckpt",
                        writers=[tmp_path / "run.h5"]).run()
    assert result.status.code == "stopped" and result.steps_done == 7 and seen == list(range(1, 8))
    assert (tmp_path / "c.ckpt").exists()  # a stopped run can be continued
    with measureflow.open(tmp_path / "run.h5") as traj:
        assert list(traj.steps)[-1] == 7
    resumed = Simulation(particles(), linear_field(), "rk4", 0.0, 1.0, steps=20, progress=False,
                         checkpoint=tmp_path / "c.ckpt", resume=True, writers=[tmp_path / "run.h5"]).run()
    whole = Simulation(particles(), linear_field(), "rk4", 0.0, 1.0, steps=20, progress=False).run()
    assert resumed.ok and torch.equal(resumed.state.x, whole.state.x)


def test_an_exception_in_an_operation_closes_the_file_with_its_frames(tmp_path):
    def boom(step, time, state):
        if step == 5:
            raise RuntimeError("operation failed")

    path = tmp_path / "run.h5"
    with pytest.raises(RuntimeError, match="operation failed"):
        Simulation(particles(), linear_field(), "rk4", 0.0, 1.0, steps=10, writers=[path], callbacks=[boom],
                   progress=False).run()
    with measureflow.open(path) as traj:
        assert len(traj) == 6  # steps 0 … 5 (step 5 is written before the callback runs), all complete
        assert traj.status.code == "interrupted" and "operation failed" in traj.status.message


def test_observers_are_declared_before_the_first_step_and_the_file_stays_in_swmr(tmp_path):
    path = tmp_path / "run.h5"
    writer = measureflow.get_registry().writer("h5md", path, every=2)
    trace = measureflow.run.Observer(lambda s, **_: s.x.square().sum((-1, -2)), name="trace", every=5)
    Simulation(particles(), linear_field(), "rk4", 0.0, 1.0, steps=10, writers=[writer],
               observers=["mean", trace, measureflow.run.Observer("covariance", every=On([4]))], progress=False).run()
    assert writer.stats["swmr_restarts"] == 0
    with measureflow.open(path) as traj:
        assert list(traj.observables["covariance"].steps) == [4, 10]
        assert list(traj.observables["trace"].steps) == [0, 10]  # steps 5 is not a writer step


_FOLLOWER = textwrap.dedent("""
    import sys, time, h5py
    path, want = sys.argv[1], int(sys.argv[2])
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with h5py.File(path, "r", swmr=True) as f:
                ds = f["particles/trajectory/position/value"]
                obs = f["observables/mean/value"]
                ds.refresh(); obs.refresh()
                n = ds.shape[0]
                if n and (not seen or n > seen[-1]):
                    seen.append(n)
                    assert obs.shape[0] >= 1
                if n >= want:
                    break
        except (OSError, KeyError):
            pass
        time.sleep(0.02)
    print(" ".join(map(str, seen)))
""")


def test_a_reader_follows_a_running_file(tmp_path):
    path = tmp_path / "run.h5"

    def slow(step, t, state):
        time.sleep(0.05)

    follower = tmp_path / "follow.py"
    follower.write_text(_FOLLOWER)
    writer = measureflow.get_registry().writer("h5md", path, every=1, flush_every=1)
    sim = Simulation(particles(), linear_field(), "rk4", 0.0, 1.0, steps=40, writers=[writer], observers=["mean"],
                     callbacks=[slow], progress=False)
    proc = None
    done = threading.Event()

    def start_follower():
        nonlocal proc
        while not path.exists() and not done.is_set():
            time.sleep(0.005)
        proc = subprocess.Popen([sys.executable, str(follower), str(path), "41"], stdout=subprocess.PIPE, text=True)

    starter = threading.Thread(target=start_follower)
    starter.start()
    result = sim.run()
    done.set()
    starter.join()
    out, _ = proc.communicate(timeout=120)
    counts = [int(v) for v in out.split()]
    assert result.ok and writer.stats["swmr_restarts"] == 0
    assert len(counts) >= 3 and counts == sorted(counts) and counts[-1] == 41, counts


# -- a Simulation is fixed once checked ------------------------------------------------------------------------------
def test_simulation_cannot_be_changed_and_with_methods_recheck():
    sim = Simulation(particles(), linear_field(), "rk4", 0.0, 1.0, steps=10, progress=False)
    with pytest.raises(AttributeError, match="fixed once checked"):
        sim.state = particles(seed=1)
    with pytest.raises(AttributeError, match="fixed once checked"):
        sim.progress = True
    other = sim.with_state(particles(seed=1))
    assert other is not sim and torch.equal(other.state.x, particles(seed=1).x) and sim.state is not other.state
    with pytest.raises(measureflow.CapabilityError, match="Gaussian closure"):
        Simulation(particles(), Decay(), "rk4", 0.0, 1.0, steps=10).with_state(gaussians())
    assert sim.with_options(progress=True).progress is True and sim.progress is False
    ck = sim.with_checkpoint("x.ckpt", every=3)
    assert str(ck.checkpoint_path) == "x.ckpt" and ck.checkpoint_trigger(3) and not ck.checkpoint_trigger(4)
    assert sim.with_device("cpu", F64).state.dtype == F64
    with pytest.raises(MeasureflowError, match="unknown options"):
        sim.with_options(colour="red")


def test_stacked_simulations_equal_the_separate_runs():
    ou = measureflow.field("ornstein_uhlenbeck", theta=1.0, sigma=0.5)
    sims = [Simulation(particles(seed=s), ou, "euler_maruyama", 0.0, 1.0, steps=10, seed=s,
                       writers=[measureflow.get_registry().writer("memory")], observers=["mean"], progress=False)
            for s in range(3)]
    alone = [s.run() for s in sims]
    fresh = [s.with_options(writers=[measureflow.get_registry().writer("memory")]) for s in sims]
    batch = Simulation.stack(fresh)
    assert batch.noise_blocks == ((0, 2), (1, 2), (2, 2)) and batch.state.replicas == 6
    result = batch.run()
    for i, single in enumerate(alone):
        assert torch.equal(result.state.x[2 * i:2 * i + 2], single.state.x)
        assert np.array_equal(fresh[i].writers[0].positions, sims[i].writers[0].positions)
    adaptive = [Simulation(particles(seed=s), linear_field(), "dopri5", 0.0, 1.0, steps=10, seed=s, progress=False)
                for s in range(2)]
    with pytest.raises(MeasureflowError, match="cannot stack.*adapts its step"):
        Simulation.stack(adaptive)
