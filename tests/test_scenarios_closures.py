"""The Gaussian-closure table scenario (MATH.md §13) against MATH.md §3–§8's reference numbers."""

import math
from pathlib import Path

import numpy as np
import pytest

import measureflow
from measureflow.scenario import load_scenarios

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"
PNG = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = {"n": 500, "steps": 20, "every": 2, "sinkhorn_n": 150, "sinkhorn_steps": 10, "closure_steps": 200}


def load():
    (scn,) = load_scenarios(SCENARIOS / "closure_table.py").values()
    return scn, scn.function.__globals__


def printed_rows(text: str, rows) -> dict:
    """The report's table: row -> (closure λ₁₁, λ₂₂, MATH λ₁₁, λ₂₂, max |Δ|, off-diag[, rel ½, max rel, bound])."""
    out = {}
    for line in text.splitlines():
        words = line.split()
        if words and words[0] in rows:
            out[words[0]] = [float(w.rstrip("%")) / (100 if w.endswith("%") else 1) for w in words[1:]]
    return out


def test_closure_table_matches_math_and_particles_follow(tmp_path, capsys):
    scn, g = load()
    out, png = tmp_path / "closure.h5", tmp_path / "closure.png"
    result = scn.run({**SMALL, "row": "kl", "out": str(out), "picture": str(png)}, progress=False)
    assert result.ok, result.status
    assert out.exists() and not Path(str(out) + ".ckpt").exists()
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000
    with measureflow.open(out) as traj:
        assert traj.kind == "particles" and traj.size == SMALL["n"]
        assert "covariance" in traj.observables
        assert np.asarray(traj.times)[-1] == pytest.approx(1.0)

    table = printed_rows(capsys.readouterr().out, g["ROWS"])
    assert set(table) == set(g["ROWS"])
    for row, numbers in table.items():
        closure, reference = np.array(numbers[0:2]), np.array(numbers[2:4])
        assert np.array_equal(reference, np.array(g["REFERENCE"][row]))
        # MATH.md prints seven decimals (rounding ≤ 5e-8). RK4's error at h = 0.005 is ≤ 2.5e-8 (at
        # h = 0.01 Fisher and MMD, the fastest rows, are 3.7e-7 and 3.3e-7 off, and RK4 divides that by
        # 16 at half the step); measured |Δ| ≤ 3.7e-8 on all six rows, rounding included. A wrong
        # factor in any Ċ moves these numbers by > 1e-2.
        assert np.abs(closure - reference).max() < 1e-7, row
        assert numbers[5] < 1e-12, row  # the flows keep diag(4, ¼)'s axes: the off-diagonal stays 0
        # Particles against the closure: 4 standard errors of a sample eigenvalue, √(2/n) relative per
        # draw of n points (two draws where γ is sampled), plus Euler–Maruyama's bias h for Langevin
        # (sampling_bound's docstring). The printed bound is recomputed here so the check cannot drift.
        n, steps, _ = g["particle_sizes"](row, SMALL)
        draws = 2 if row in ("w2", "sinkhorn") else 1
        bound = 4 * math.sqrt(draws * 2.0 / n) + (1.0 / steps if row == "kl" else 0.0)
        assert numbers[8] == pytest.approx(bound, abs=1e-4)  # printed to 0.01 %
        assert numbers[6] < bound and numbers[7] < bound, row


def test_closures_against_exact_solutions():
    _, g = load()
    for row in ("kl", "fisher", "w2", "mmd"):
        c = g["closure_numbers"](row, 200)
        # The exact curve is sampled every 0.005, the closure's step, so every observed time is a node.
        index = np.rint(c["times"] / 0.005).astype(int)
        assert np.allclose(c["exact_times"][index], c["times"], atol=1e-12)
        # RK4, h = 0.005: along the path the relative error peaks in the first steps, where the rates
        # are largest (MMD at λ₁ = 4: Jacobian 8 − 16λ = −56; Fisher at λ₂ = ¼: 2/λ² + 2 = 34; local
        # error ∝ (|J|h)⁵): 1.5e-6 (MMD) and 1.2e-6 (Fisher) measured, decaying below 3e-8 by t = ½ as
        # the flows damp errors. A wrong rate or sign is off by > 1e-2.
        exact = c["exact_eig"][index]
        assert np.abs(c["eig"] / exact - 1).max() < 5e-6, row
        # Energies of a gradient flow decrease.
        assert np.all(np.diff(c["energy"]) < 0), row


def test_parameters_are_checked():
    scn, _ = load()
    with pytest.raises(measureflow.ParameterError, match="row must be one of"):
        scn.build({"row": "heat"})
    with pytest.raises(measureflow.ParameterError, match="t = ½ must be observed"):
        scn.build({"steps": 21})
    with pytest.raises(measureflow.ParameterError, match="t = ½ must be observed"):
        scn.build({"steps": 20, "every": 3})


# -- the three Gaussian closures between two anisotropic Gaussians (MATH.md §1.5, §7, §9) ---------------------


def test_gaussian_closures_scenario(tmp_path):
    from test_scenarios_bridges import load, run

    from measureflow.observables import bures_w2

    scn, g = load("gaussian_closures")
    n = 600
    result, params, out = run(scn, tmp_path, n=n, steps=40)
    num = g["numbers"](result, params)
    with measureflow.open(out) as traj:
        assert traj.status.code == "completed" and len(traj.times) == 41
    # Particles under the drifting field vs its Gaussian closure: the particles' moments carry the sampling
    # error of the initial draw, √(2/n) ≈ 5.8 % relative for the largest covariance entry and √(λ_max/n) ≈ 0.08
    # for the mean along the long axis (λ_max = 4); over 41 recorded times, bounds of 2√(2/n) and 3√(λ_max/n).
    # Measured over four seeds: 2.0–3.3 % and 0.015–0.14.
    assert num["drift_cov_error"] < 2 * math.sqrt(2 / n)
    assert num["drift_mean_error"] < 3 * math.sqrt(4 / n)
    # The horizon is three time constants of the slowest mode, so W₂² to β has fallen by about e⁻⁶ (measured
    # 5.8e-3 from 7.3): a factor 100 leaves room for the faster-decaying covariance terms.
    m0, S0, m1, S1 = g["endpoints"](params["anisotropy"], params["angle"], params["separation"])
    assert num["drift_final_w2"] < 0.01 * float(bures_w2(m0, S0, m1, S1))
    # The drifting mean relaxes at different rates along Σ₁'s axes: a curved path (28.6 % of the chord here).
    assert num["drift_bend"] > 0.2
    # The Schrödinger bridge inflates the intermediate ellipses relative to the geodesic (closed forms).
    assert num["sb_inflation"] > 1.1


def test_gaussian_closures_degenerate_cases(tmp_path):
    from test_scenarios_bridges import load

    scn, g = load("gaussian_closures")
    # Isotropic target: ṁ = ε/(1 + ε)(m₁ − m) points at m₁ from everywhere, so the drifting mean path is the chord.
    params = scn.resolve({"anisotropy": 1.0, "n": 50, "steps": 20, "out": str(tmp_path / "iso.h5"), "picture": ""})
    times = np.linspace(0.0, 5.0, 21)
    means, _ = g["drifting_closure"](params, times)
    m0, _, m1, _ = g["endpoints"](1.0, params["angle"], params["separation"])
    assert g["_chord_bend"](means, m0.numpy(), m1.numpy()) < 1e-12
    with pytest.raises(measureflow.ParameterError, match="anisotropy"):
        scn.build({"anisotropy": 0.5})
    with pytest.raises(measureflow.ParameterError, match="regularization"):
        scn.build({"regularization": 0.0})
