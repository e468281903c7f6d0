"""Scenarios of changing mass and richer states (MATH.md §15.6–15.8) at small sizes."""

import numpy as np
import pytest
from test_scenarios_bridges import load, run

import measureflow

pytestmark = pytest.mark.usefixtures("single_thread")


def test_birth_death_sampling_gets_the_masses_langevin_misses(tmp_path, capsys):
    scn, g = load("birth_death_sampling")
    result, params, out = run(scn, tmp_path, n=200, steps=400)
    wfr = g["summary"](result)
    # sampling standard error √(0.8·0.2/N_eff) (Kish's N_eff, ~130 here): the WFR mass within 3 of them
    assert abs(wfr["mass"] - 0.8) < 3 * wfr["se"]
    printed = capsys.readouterr().out
    assert "langevin  mass of the left mode 0.5000" in printed  # the barrier is never crossed
    with measureflow.open(out) as traj:
        frames = traj.weight_frames
        assert frames is not None and frames.shape == (len(traj), 1, 200)
        assert abs(np.asarray(frames[-1]).sum() - 1.0) < 1e-12
    with pytest.raises(measureflow.ParameterError, match="mode must be one of"):
        scn.build({"mode": "jump"})


def test_mixture_vi_converges_with_fisher_rao_weights(tmp_path):
    scn, g = load("mixture_vi")
    result, params, out = run(scn, tmp_path, steps=80)
    kl = np.ravel(result.observables["energy"].values)
    # Gauss–Hermite (8 nodes per axis) KL: non-increasing to rounding, and down by more than 10³
    assert np.all(np.diff(kl) <= 1e-12) and kl[-1] < 1e-3 * kl[0]
    assert np.allclose(result.state.weights[0].numpy(), [0.5, 0.2, 0.3], atol=3e-3)
    fixed, _ = scn.build({**params, "geometry": "wasserstein", "out": ""})
    stuck = fixed.with_options(progress=False).run()
    # without Fisher–Rao the weights stay ⅓ and the KL cannot reach 0
    assert np.allclose(stuck.state.weights.numpy(), 1 / 3) and stuck.observables["energy"].values[-1, 0] > 0.05


@pytest.mark.parametrize("d, n, epsilon", [(1, 200, 0.01), (2, 400, 0.02)])
def test_barenblatt_exponent(tmp_path, d, n, epsilon):
    scn, g = load("barenblatt")
    result, params, out = run(scn, tmp_path, picture=d == 1, d=d, n=n, epsilon=epsilon)
    a, _ = g["barenblatt_exponent"](2.0, d)
    assert abs(g["exponent"](result) / (2 * a / d) - 1.0) < 0.02


def test_barenblatt_refuses_m_of_one_by_its_parameter_rule():
    """m → 1 is the heat equation: the exponent's range is (1, 100], said before any work."""
    scn, _ = load("barenblatt")
    with pytest.raises(measureflow.ParameterError, match="m must be greater than 1") as err:
        scn.build({"m": 1.0})
    assert "\n" not in str(err.value)
    assert "in (1, 100]" in measureflow.parameters.Range(1.0, 100.0, open_below=True).describe()
