"""The mean-field network scenarios (ReLU regression, linear-network Riccati flow) at small sizes (MATH.md §11)."""

import numpy as np
import pytest
from test_scenarios_bridges import load, run

import measureflow

pytestmark = pytest.mark.usefixtures("single_thread")


def test_relu_network_fits_the_data(tmp_path):
    scn, g = load("mean_field_relu")
    result, params, out = run(scn, tmp_path, n=60, points=20, t1=40.0, steps=200, frames=12)
    numbers = g["summary"](result, params)
    with measureflow.open(out) as traj:
        written = sorted(g["frame_steps"](200, 12).steps)
        assert list(np.asarray(traj.steps)) == written and traj.positions.shape == (len(written), 1, 60, 3)
        assert traj.times[-1] == pytest.approx(40.0)
        risk_file = np.ravel(np.asarray(traj.observables["energy"].values[:]))
    # Gradient flow of the risk: never increases (round-off allowed). Measured at this size 0.52 → 0.037 (the
    # variance of sin(3z) on the data is 0.55, the noise variance 0.01), so 0.2 of the start leaves a margin.
    assert numbers["monotone"]
    assert numbers["final_risk"] < 0.2 * numbers["start_risk"]
    assert risk_file[-1] == pytest.approx(numbers["final_risk"], rel=1e-12)
    # ∫(|u|² − |v|²) is conserved by the flow; RK4 across the ReLU kinks keeps it to first order in h = 0.2
    # (measured 5.4e-3; a dynamics without the balance would move it by O(1)).
    assert numbers["balance_drift"] < 1e-2


def test_relu_frames_are_checked():
    scn, _ = load("mean_field_relu")
    with pytest.raises(measureflow.ParameterError, match="frames must lie between 2 and steps"):
        scn.build({"steps": 10, "frames": 20})


def test_linear_network_particles_match_the_closure(tmp_path):
    scn, g = load("linear_network_riccati")
    result, params, out = run(scn, tmp_path, n=300, t1=6.0, steps=300, every=20)
    numbers = g["summary"](result, params)
    with measureflow.open(out) as traj:
        assert traj.positions.shape == (16, 1, 300, 5)
        M = np.asarray(traj.observables["second_moment"].values[:])
        assert M.shape[-2:] == (5, 5)
    # The closure is exact for the particles' empirical second moment, so only RK4 (h = .02) separates them:
    # measured 3.5e-7 at this size (2.3e-8 at h = .01 with the defaults: fourth order, ×1/16).
    assert numbers["max_closure_gap"] < 1e-6
    # ‖M_VU − S_yz S_zz⁻¹‖ falls from 1.5 at the rate of the slowest mode (measured 1.8e-7 at t = 6, 8e-12 at t = 10).
    assert numbers["final_distance"] < 1e-5 and numbers["distance"][0] > 1.0
    assert numbers["risk"][-1] - numbers["minimal_risk"] < 1e-12  # measured 3.7e-14: f − min f ∝ distance²
    # Invariants: det M to RK4's O(h⁴) (measured 2.4e-7 at h = .02); the particles' tr M_UU − tr M_VV,
    # a per-neuron quadratic invariant, likewise (measured 4.3e-9).
    assert numbers["det_drift"].max() < 1e-6 and numbers["trace_drift"].max() < 1e-8
