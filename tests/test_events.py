"""Events located on dense output (MATH.md §15.4) against their closed-form times."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import torch

import measureflow
from measureflow import Event, Gaussians, Particles, Simulation
from measureflow.errors import MeasureflowError, ShapeError
from measureflow.events import crossing, eigenvalue_above

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
A = np.array([[-0.5, -2.0], [1.0, -0.5]])  # README's A
C = np.array([0.5, 0.0])
M0 = np.array([2.0, -1.0])
T_STAR = 1.7069141  # MATH.md §15.4 (7 decimals); the exact root is computed below to 1e-15


def mean_exact(t: float) -> np.ndarray:
    aug = np.zeros((3, 3))
    aug[:2, :2], aug[:2, 2] = A * t, C * t
    E = scipy.linalg.expm(aug)
    return E[:2, :2] @ M0 + E[:2, 2]


def exact_zeros():
    first = scipy.optimize.brentq(lambda t: mean_exact(t)[0], 1.0, 2.5, xtol=1e-15)
    second = scipy.optimize.brentq(lambda t: mean_exact(t)[0], 3.0, 4.0, xtol=1e-15)
    return first, second


def linear():
    return measureflow.field("linear", A=torch.tensor(A), b=torch.tensor(C))


def first_mean_component(t, state):
    return state.mean[:, 0] if isinstance(state, Gaussians) else state.mean()[:, 0]


def gaussian_start():
    return Gaussians(torch.tensor(M0), torch.tensor([[1.5, 0.6], [0.6, 0.8]], dtype=F64))


def particle_start():
    # One particle at m0 follows the mean exactly under an affine field.
    return Particles(torch.tensor(M0)[None, None, :])


def test_math_reference_root():
    assert abs(exact_zeros()[0] - T_STAR) < 5e-8


@pytest.mark.parametrize("state", [gaussian_start, particle_start], ids=["gaussians", "particles"])
@pytest.mark.parametrize("solver", ["dopri5", "rk4"])
def test_first_zero_of_the_mean_is_located_to_1e8(state, solver):
    # dopri5 at tol 1e-12 is accurate far below 1e-8; RK4 at 100 steps on [0, 2] (h = 0.02) has a
    # global error ~h⁴ ≈ 1e-9 and its Hermite interpolant a local one of the same order.
    t_first, _ = exact_zeros()
    integrator = measureflow.integrator("dopri5", rtol=1e-12, atol=1e-12) if solver == "dopri5" else "rk4"
    steps = 4 if solver == "dopri5" else 100
    result = Simulation(state(), linear(), integrator, t1=2.0, steps=steps, progress=False,
                        events=[Event(first_mean_component, terminal=True)]).run()
    assert result.status.code == "event"
    (record,) = result.events
    assert abs(record.t - t_first) < 1e-8
    assert record.replica == 0 and record.terminal and record.name == "first_mean_component"
    assert abs(result.status.time - record.t) == 0 and abs(result.final_time - record.t) == 0
    # The run's final state is the state at the event, where the first mean component vanishes.
    assert abs(float(first_mean_component(record.t, result.state)[0])) < 1e-8


def test_recorded_events_keep_the_run_going_and_respect_direction():
    first, second = exact_zeros()
    solver = measureflow.integrator("dopri5", rtol=1e-12, atol=1e-12)
    both = Event(first_mean_component, name="both")
    falling = Event(first_mean_component, direction=-1, name="falling")
    rising = Event(first_mean_component, direction=+1, name="rising")
    result = Simulation(gaussian_start(), linear(), solver, t1=4.0, steps=8, progress=False,
                        events=[both, falling, rising]).run()
    assert result.status.code == "completed"
    got = sorted((r.name, round(r.t, 9)) for r in result.events)
    # m₁ falls through 0 at the first zero and rises through it at the second.
    assert got == sorted([("both", round(first, 9)), ("both", round(second, 9)),
                          ("falling", round(first, 9)), ("rising", round(second, 9))])
    assert [r.t for r in result.events] == sorted(r.t for r in result.events)
    for r in result.events:
        assert isinstance(r.state, Gaussians) and r.state.replicas == 1
        assert abs(float(r.state.mean[0, 0])) < 1e-8


def test_each_replica_crosses_at_its_own_time():
    # Replica 1 starts from 2·m0 with b = 0 scaled too: a linear field with b = 0 keeps m₁'s zeros, so
    # use two different starting means and compare each with its own exact root.
    field = measureflow.field("linear", A=torch.tensor(A))
    starts = np.array([[2.0, -1.0], [1.0, 1.0]])

    def root(m0):
        def f(t):
            return (scipy.linalg.expm(A * t) @ m0)[0]
        grid = np.linspace(0.0, 3.0, 301)
        values = [f(t) for t in grid]
        k = next(i for i in range(300) if values[i] * values[i + 1] < 0)
        return scipy.optimize.brentq(f, grid[k], grid[k + 1], xtol=1e-15)

    state = Gaussians(torch.tensor(starts), torch.eye(2, dtype=F64).expand(2, 2, 2))
    solver = measureflow.integrator("dopri5", rtol=1e-12, atol=1e-12)
    result = Simulation(state, field, solver, t1=3.0, steps=3, progress=False,
                        events=[Event(first_mean_component)]).run()
    firsts = {}
    for r in result.events:
        firsts.setdefault(r.replica, r.t)
    for r, m0 in enumerate(starts):
        assert abs(firsts[r] - root(m0)) < 1e-8


def attention_blowup():
    root = math.sqrt(0.5) * torch.eye(2, dtype=F64)  # KᵀQ = cI, c = 1/2
    field = measureflow.field("attention", Q=root, K=root)
    angle = 0.3
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, -s], [s, c]], dtype=F64)
    cov = rot @ torch.diag(torch.tensor([1.0, 0.25], dtype=F64)) @ rot.T  # λ_max = 1
    return field, Gaussians(torch.zeros(2, dtype=F64), cov), 1.0 / (2 * 0.5 * 1.0)


def test_attention_blowup_event_stops_just_before_t_star():
    # Σ(t) = Σ₀(I − 2ctΣ₀)⁻¹ (MATH.md §10): 1/λ_max(Σ(t)) = 1/λ_max(Σ₀) − 2ct falls linearly to 0 at t*,
    # so eigenvalue_above(B) fires at t* − 1/(2cB) exactly; the run integrates up to the singular t*
    # itself, and the event still ends it cleanly just before.
    field, start, t_star = attention_blowup()
    bound = 1e4
    solver = measureflow.integrator("dopri5", rtol=1e-10, atol=1e-10)  # t error ~3e-11 here
    result = Simulation(start, field, solver, t1=t_star, steps=1, progress=False, blowup=None,
                        events=[eigenvalue_above(bound)]).run()
    assert result.status.code == "event"
    (record,) = result.events
    assert abs(record.t + 1 / (2 * 0.5 * bound) - t_star) < 1e-8
    assert abs(float(torch.linalg.eigvalsh(result.state.cov)[0, -1]) - bound) < 1e-8 * bound


def test_crossing_of_an_observable_level():
    # The second moment of the particle's mean |m(t)|² falls below a level: compare with the exact root.
    level = 1.0

    def sq_norm(state):
        return (state.mean() ** 2).sum(-1)

    def excess(t):
        return float(mean_exact(t) @ mean_exact(t)) - level

    grid = np.linspace(0.0, 4.0, 401)
    k = next(i for i in range(400) if excess(grid[i]) > 0 >= excess(grid[i + 1]))
    t_exact = scipy.optimize.brentq(excess, grid[k], grid[k + 1], xtol=1e-15)
    solver = measureflow.integrator("dopri5", rtol=1e-12, atol=1e-12)
    result = Simulation(particle_start(), linear(), solver, t1=4.0, steps=4, progress=False,
                        events=[crossing(sq_norm, level, terminal=True)]).run()
    assert abs(result.events[0].t - t_exact) < 1e-8


def test_events_are_written_to_the_trajectory_file(tmp_path):
    solver = measureflow.integrator("dopri5", rtol=1e-10, atol=1e-10)
    result = Simulation(particle_start(), linear(), solver, t1=4.0, steps=8, progress=False,
                        writers=[tmp_path / "run.h5"], events=[Event(first_mean_component)]).run()
    with measureflow.open(tmp_path / "run.h5") as traj:
        events = traj.events
    assert list(events["name"]) == ["first_mean_component"] * 2
    assert np.allclose(events["time"], [r.t for r in result.events], rtol=0, atol=0)
    assert events["position"].shape == (2, 1, 2)
    assert np.allclose(events["position"][:, 0, 0], 0.0, atol=1e-8)


# -- bad input ----------------------------------------------------------------------------------------------
def test_event_of_the_wrong_shape_is_refused_before_any_step():
    def whole(t, state):
        return state.mean()  # (R, d), not (R,)

    with pytest.raises(ShapeError, match=r"event 'whole'.*shape \(1,\)"):
        Simulation(particle_start(), linear(), "rk4", steps=4, progress=False, events=[Event(whole)]).run()


def test_bad_event_arguments():
    with pytest.raises(MeasureflowError, match="direction"):
        Event(first_mean_component, direction=2)
    with pytest.raises(MeasureflowError, match="Event"):
        Simulation(particle_start(), linear(), "rk4", steps=4, events=[first_mean_component])


def test_runs_with_events_are_not_stacked():
    sims = [Simulation(particle_start(), linear(), "rk4", t1=1.0, steps=4, seed=s, progress=False,
                       events=[Event(first_mean_component)]) for s in (0, 1)]
    with pytest.raises(MeasureflowError, match="events"):
        Simulation.stack(sims)
