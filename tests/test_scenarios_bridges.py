"""The bridge scenarios (1-D OU bridge, schedule comparison, flow-matching map vs Brenier) against MATH.md."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import measureflow
from measureflow.diagnostics import brenier_map, fm_terminal_map, transport_cost
from measureflow.scenario import load_scenarios

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"
PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("single_thread")


def load(name):
    (scn,) = load_scenarios(SCENARIOS / f"{name}.py").values()
    return scn, scn.function.__globals__


def run(scn, tmp_path, picture=True, **params):
    out = tmp_path / f"{scn.name}_{len(list(tmp_path.iterdir()))}.h5"
    png = tmp_path / (out.stem + ".png")
    params = {"out": str(out), "picture": str(png) if picture else "", **params}
    result = scn.run(params, progress=False)
    assert result.ok, result.status
    assert out.exists() and not Path(str(out) + ".ckpt").exists()
    if picture:
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000
    return result, scn.resolve(params), out


# -- 1-D Gaussian mixture through the OU bridge (MATH.md §2) ----------------------------------------------


def test_reverse_probability_flow_reaches_the_exact_mixture(tmp_path):
    scn, g = load("gmm_bridge_1d")
    n = 4000
    result, params, out = run(scn, tmp_path, n=n, steps=150, frames=30, direction="reverse", sampler="ode")
    field = g["make_field"]("reverse", "ode", 1.0, params["tau_min"], params["tau_max"])
    numbers = g["final_numbers"](result, params, field)
    # In 1-D the probability flow keeps the order of the particles, so its flow map is the quantile map
    # F_end⁻¹ ∘ F_start and F_end(x(end)) − F_start(x(start)) is the integrator's error alone. RK4 with
    # h = 6/150 = 0.04: 3.9e-5 measured (3.6e-6 at h = 0.02, ×(2)^4 ≈ 5.7e-5 by the order); a wrong
    # score (sign, σ², τ ↔ s) moves quantiles by O(0.1).
    assert numbers["quantile_error"] < 1e-4
    # Hence the KS distance is the starting draw's own, up to that drift.
    assert abs(numbers["ks"] - numbers["start_ks"]) <= numbers["quantile_error"] + 1e-12
    # ... and the starting draw is N(0, 1), within e^{-6}·(E X²)^{1/2} ≈ 4e-3 of ρ_τmax in W₂ (MATH.md
    # §1.3 iii): Kolmogorov's law bounds √N·D by 1.95 for exact samples with probability 99.9 %.
    assert math.sqrt(n) * numbers["ks"] < 1.95
    # Moments: 4 Monte-Carlo standard errors (s.e. of the mean 0.027; the start-up bias is ≤ 4e-3,
    # the integrator's ~1e-4).
    assert abs(numbers["mean"] - numbers["exact_mean"]) < 4 * numbers["mean_se"]
    assert abs(numbers["variance"] - numbers["exact_variance"]) < 4 * numbers["variance_se"]
    with measureflow.open(out) as traj:
        assert traj.kind == "particles" and traj.size == n
        ks = np.asarray(traj.observables["ks_to_exact"].values[:])
        # Frames evenly spaced in √τ, snapped to the 150 steps (two targets near τ_min share one): 30
        # distinct, from τ_max to τ_min, 11 of them at τ ≤ 1 where the paths bend (31/√6 ≈ 13 targets
        # there, less the shared ones; evenly spaced in τ would give 5).
        written = sorted(g["frame_steps"](field, 150, 30).steps)
        assert list(np.asarray(traj.steps)) == written and len(written) == 30
        tau = np.array([field.tau(t) for t in traj.times])
        assert tau[0] == pytest.approx(6.0) and tau[-1] == pytest.approx(1e-3)
        assert np.sum(tau <= 1.0 + 1e-9) >= 10
        # The observer measured the same distance at the last frame (against ρ at τ_min).
        assert ks.shape[0] == len(traj.times)
        assert abs(float(np.ravel(ks[-1])[0]) - numbers["ks"]) < 1e-12


def test_stochastic_reverse_sampler_reaches_the_exact_mixture(tmp_path):
    scn, g = load("gmm_bridge_1d")
    n = 2000
    result, params, out = run(scn, tmp_path, picture=False, n=n, steps=500, frames=10, direction="reverse",
                              sampler="sde", seed=1)
    field = g["make_field"]("reverse", "sde", 1.0, params["tau_min"], params["tau_max"])
    numbers = g["final_numbers"](result, params, field)
    assert "quantile_error" not in numbers  # an SDE has no flow map
    # Euler–Maruyama has weak order 1: with h = 6/500 = 0.012 its bias in the KS distance, measured
    # with 10⁵ particles, is 0.011 (0.017 at h = 0.024, 0.007 at h = 0.006). The Monte-Carlo bound
    # is Kolmogorov's 99.9 % quantile 1.95/√N = 0.044.
    assert numbers["ks"] < 1.95 / math.sqrt(n) + 0.012
    # The variance bias at this step is −0.03 (same measurement); 4 s.e. of 2000 samples is 0.26.
    assert abs(numbers["variance"] - numbers["exact_variance"]) < 4 * numbers["variance_se"] + 0.03
    assert abs(numbers["mean"] - numbers["exact_mean"]) < 4 * numbers["mean_se"]


def test_forward_flow_and_parameter_errors(tmp_path):
    scn, g = load("gmm_bridge_1d")
    result, params, _ = run(scn, tmp_path, picture=False, n=1000, steps=150, frames=5, direction="forward")
    field = g["make_field"]("forward", "ode", 1.0, params["tau_min"], params["tau_max"])
    numbers = g["final_numbers"](result, params, field)
    # Started from exact samples of ρ_τmin: the same quantile identity, the same RK4 bound as above.
    assert numbers["quantile_error"] < 1e-4 and numbers["tau"] == params["tau_max"]
    with pytest.raises(measureflow.ParameterError, match="direction must be one of forward, reverse"):
        scn.build({"direction": "backward"})
    with pytest.raises(measureflow.ParameterError, match="sampler must be 'ode'"):
        scn.build({"sampler": "langevin"})


# -- three Diracs, three schedules (MATH.md §1.6) -------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "vp", "overshoot"])
def test_three_diracs_cluster_fractions_and_spread(tmp_path, schedule):
    scn, g = load("schedule_comparison")
    n = 2000
    drawn = schedule == "overshoot"
    # ratio 0.05 (|Δlog t| per RK4 step) instead of 0.02: against ratio 0.005 the end points move by
    # ≤ 0.4 % of b_tmin per particle and the RMS by < 6e-5 relative, far below the errors below.
    result, params, out = run(scn, tmp_path, picture=drawn, schedule=schedule, n=n, frames=10, ratio=0.05,
                              figure_particles=40 if drawn else 0)
    field = g["make_field"](schedule)
    numbers = g["cluster_numbers"](result.state.x[0], field)
    assert numbers["t_min"] == pytest.approx(1e-3)
    # Exact law at t_min: Σ wⱼ N(a cⱼ, b²I) (MATH.md §1.6), so each fraction is binomial(N, wⱼ)/N;
    # 3.5 binomial σ for each of the three (a fixed seed; chance of a false alarm 0.14 %).
    assert max(abs(z) for z in numbers["z"]) < 3.5
    # RMS distance to the nearest scaled atom = b√2: |ε|²/b² ~ χ²₂ has mean 2, variance 4, so the
    # sample RMS has relative s.e. 1/(2√N) = 1.1 %; 4 s.e.
    assert numbers["rms"] / numbers["exact_rms"] == pytest.approx(1.0, abs=4 / (2 * math.sqrt(n)))
    expected_b = {"linear": 1e-3, "overshoot": 1e-3, "vp": math.sqrt(-math.expm1(-2e-3))}[schedule]
    assert numbers["exact_rms"] == pytest.approx(expected_b * math.sqrt(2), rel=1e-12)
    with measureflow.open(out) as traj:
        rms = np.ravel(np.asarray(traj.observables["nearest_centre_rms"].values[:]))
        times = np.asarray(traj.times)
        assert len(rms) == len(times) == 11 and rms[-1] == pytest.approx(numbers["rms"], rel=1e-9)
        # Noise end: the cloud is N(0, I) around centres a ≈ 0, RMS ≈ √2 (d = 2); it collapses to b√2.
        assert rms[0] > 0.5 and rms[-1] < 0.1 * rms[0]
    # The file's times are the field's own: 11 of the geometric grid's nodes from the noise end to t_min,
    # evenly spaced in log t up to the rounding of 10 frames to the grid's steps.
    t_max = field.time_range[1]
    steps = math.ceil(math.log(t_max / 1e-3) / 0.05)
    assert times[0] == t_max and times[-1] == pytest.approx(1e-3, rel=1e-12)
    gaps = -np.diff(np.log(times)) / (math.log(t_max / 1e-3) / steps)
    assert np.allclose(gaps, np.round(gaps), atol=1e-9)
    assert set(np.round(gaps).astype(int)) <= {steps // 10, steps // 10 + 1}


def test_overshoot_detour_comes_back_at_one_half():
    scn, g = load("schedule_comparison")
    params = scn.resolve({"figure_particles": 40, "ratio": 0.05})
    over_path, over_t, _ = g["generate_paths"]("overshoot", params)
    lin_path, lin_t, _ = g["generate_paths"]("linear", params)
    half = int(np.argmin(np.abs(over_t - 0.5)))
    assert over_t[half] == 0.5
    # z/b moves by du/dr = E[X | rX + Y = u], r = a/b, for any schedule (derived from eq. 1.3). The
    # overshoot's r leaves 0 at t = 1 and is back at 0 at t = ½, so z(½) = b(½)·z(1)/b(1) = z(1)/2
    # exactly. RK4 error: 2.9e-8 at ratio 0.02, 1.1e-6 at 0.05 (×(2.5)⁴ ≈ 39); a wrong a' gives O(0.1).
    assert np.abs(over_path[half] - 0.5 * over_path[0]).max() < 1e-5
    # Between t = ½ and t_min, r runs over the linear schedule's values, so the two schedules send each
    # draw to the same place in its cluster, (x − a cⱼ)/b. Each integration's own error at ratio 0.05
    # (against ratio 0.005) is ≤ 5e-4 in these units (3.5e-4 between the two measured); different end
    # points would differ by O(1).
    over = g["scaled_offsets"](over_path, over_t, "overshoot", params)
    lin = g["scaled_offsets"](lin_path, lin_t, "linear", params)
    assert np.abs(over - lin).max() < 2e-3
    # Yet the paths differ: on (½, 1) the centres aₜcⱼ are reflected through 0 (a < 0).
    field = g["make_field"]("overshoot")
    assert all(field.coefficients(t)[0] < 0 for t in (0.6, 0.75, 0.9))
    k = int(np.argmin(np.abs(lin_t - 0.5)))
    assert np.abs(lin_path[k] - over_path[half]).max() > 0.1


def test_schedule_parameter_is_checked():
    scn, _ = load("schedule_comparison")
    with pytest.raises(measureflow.ParameterError, match="schedule must be one of linear, vp, overshoot"):
        scn.build({"schedule": "sigmoid"})


# -- flow-matching map vs Brenier (MATH.md §1.5) -------------------------------------------------------


def test_reference_pair_numbers():
    _, g = load("fm_vs_brenier")
    ref = g["closed_forms"]("reference")
    # MATH.md §1.5 prints six decimals: 1e-6 covers the rounding (≤ 5e-7) and float64 round-off.
    assert ref["fm_cost"] == pytest.approx(0.817144, abs=1e-6)
    assert ref["ot_cost"] == pytest.approx(0.651957, abs=1e-6)
    # The matrices are printed with five decimals.
    fm = torch.tensor([[0.59534, 0.76306], [0.19076, 1.50148]], dtype=torch.float64)
    ot = torch.tensor([[0.67893, 0.39525], [0.39525, 1.33233]], dtype=torch.float64)
    assert torch.allclose(ref["fm"], fm, atol=5e-6) and torch.allclose(ref["ot"], ot, atol=5e-6)
    # Both push Σ₀ to Σ₁ (round-off level).
    for T in (ref["fm"], ref["ot"]):
        assert torch.allclose(T @ ref["S0"] @ T.T, ref["S1"], atol=1e-12)


def test_commuting_pair_maps_coincide():
    _, g = load("fm_vs_brenier")
    ref = g["closed_forms"]("commuting")
    assert ref["defect"] < 1e-15
    # Common eigenbasis R (30°): T = R diag(√(1/2), √2.4) Rᵀ for both maps, cost
    # 2(√(1/2) − 1)² + 0.5(√2.4 − 1)² (MATH.md §1.5); round-off level.
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    R = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    T = R @ torch.diag(torch.tensor([math.sqrt(0.5), math.sqrt(2.4)], dtype=torch.float64)) @ R.T
    assert torch.allclose(ref["fm"], T, atol=1e-12) and torch.allclose(ref["ot"], T, atol=1e-12)
    cost = 2 * (math.sqrt(0.5) - 1) ** 2 + 0.5 * (math.sqrt(2.4) - 1) ** 2
    assert ref["fm_cost"] == pytest.approx(cost, abs=1e-12) and ref["ot_cost"] == pytest.approx(cost, abs=1e-12)


@pytest.mark.parametrize("case", ["reference", "commuting"])
@pytest.mark.parametrize("schedule", ["linear", "overshoot"])
def test_simulated_gaussian_map_is_the_flow_matching_map(tmp_path, case, schedule):
    scn, g = load("fm_vs_brenier")
    S0, S1 = g["covariances"](case)
    errors, cov_errors = {}, {}
    for steps in (25, 50):
        result, params, out = run(scn, tmp_path, picture=False, case=case, state="gaussians", schedule=schedule,
                                  steps=steps)
        T = g["simulated_map"](None, result.state)
        errors[steps] = float((T - fm_terminal_map(S0, S1)).abs().max())
        cov_errors[steps] = float((result.state.cov - S1).abs().max())
    # The terminal map is the same for every scalar schedule (MATH.md §1.5); what is left is RK4's
    # global error, O(h⁴): halving h divides it by ≈ 16 (8–32 allowed). At h = 0.02 the map error is
    # < 5e-7 (measured 5e-9 linear, 1.4e-7 overshoot, whose a = 0 crossing makes the field vary
    # fastest) and the covariance error < 2e-5 (4e-8 linear, 7e-6 overshoot).
    assert errors[50] < 5e-7 and cov_errors[50] < 2e-5
    assert 8 < errors[25] / errors[50] < 32
    assert 8 < cov_errors[25] / cov_errors[50] < 32
    if case == "reference":
        ot = brenier_map(*g["covariances"](case))
        assert float((T - ot).abs().max()) > 0.3  # the run realises T^FM, not the Brenier map


def test_particles_follow_the_same_linear_map(tmp_path):
    scn, g = load("fm_vs_brenier")
    n = 3000
    result, params, out = run(scn, tmp_path, picture=True, case="reference", state="particles", n=n, steps=50)
    start = g["start_state"]("reference", "particles", n, params["seed"])
    T = g["simulated_map"](start, result.state)
    S0, S1 = g["covariances"]("reference")
    # The flow is linear, so the least-squares fit recovers RK4's map exactly: same bound as the
    # Gaussian state at h = 0.02 (5e-9 measured).
    assert float((T - fm_terminal_map(S0, S1)).abs().max()) < 2e-7
    # E|T(X) − X|² = 0.817144 (MATH.md §1.5): 4 Monte-Carlo standard errors of the sample mean.
    moved = ((result.state.x[0] - start.x[0]) ** 2).sum(-1)
    se = float(moved.std()) / math.sqrt(n)
    assert abs(float(moved.mean()) - 0.817144) < 4 * se
    assert float(transport_cost(T, S0)) == pytest.approx(0.817144, abs=1e-6)
    with measureflow.open(out) as traj:
        assert {"mean", "covariance", "w2_to_path"} <= set(traj.observables)
        w2 = np.ravel(np.asarray(traj.observables["w2_to_path"].values[:]))
        # Sample moments of 3000 points: W₂² to the exact path law is O(d/N) ≈ 1e-3, never O(1).
        assert w2.max() < 1e-2


def test_case_and_state_are_checked():
    scn, _ = load("fm_vs_brenier")
    with pytest.raises(measureflow.ParameterError, match="case must be one of reference, commuting"):
        scn.build({"case": "rotated"})
    with pytest.raises(measureflow.ParameterError, match="state must be one of particles, gaussians"):
        scn.build({"state": "cloud"})
