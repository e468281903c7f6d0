"""The transport scenarios (interpolants, three Diracs, diffusion vs OT) against MATH.md §1.1, §1.5, §1.6."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import numpy as np
import ot
import pytest
import torch

import measureflow
from measureflow.couplings import squared_distances
from measureflow.scenario import load_scenarios

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"
F64 = torch.float64
NUMBER = r"([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"


pytestmark = pytest.mark.usefixtures("single_thread")


def load(name: str):
    (found,) = load_scenarios(SCENARIOS / f"{name}.py").values()
    return found, sys.modules[found.function.__module__]


def run(name: str, tmp_path, capsys, draw: bool = True, **params):
    """Run a scenario into tmp_path (with its picture when ``draw``); returns (result, report text, module)."""
    scn, module = load(name)
    out, picture = tmp_path / f"{name}.h5", tmp_path / f"{name}.png"
    result = scn.run({**params, "out": str(out), "picture": str(picture) if draw else ""}, progress=False)
    text = capsys.readouterr().out
    assert result.ok, result.status
    assert out.exists() and not Path(str(out) + ".ckpt").exists()
    if draw:
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 20_000
        assert f"wrote {picture}" in text
    else:
        assert not picture.exists()
    with measureflow.open(out) as traj:
        assert traj.kind == "particles" and len(traj) >= 2 and traj.status.code == "completed"
    return result, text, module


def value(text: str, pattern: str) -> float:
    found = re.search(pattern + r"\s*=?\s*" + NUMBER, text)
    assert found, f"{pattern!r} not in the report:\n{text}"
    return float(found.group(1))


def uniform(k: int) -> np.ndarray:
    return np.full(k, 1.0 / k)


# -- interpolants (MATH.md §1.1) ----------------------------------------------------------------------------


def coupling_line(text: str, coupling: str) -> dict:
    line = next(ln for ln in text.splitlines() if ln.strip().startswith(coupling + " ("))
    return {key: value(line, re.escape(label)) for key, label in
            (("pairs", "pairs"), ("cost", "cost"), ("kinetic", "kinetic"), ("straightness", "straightness"),
             ("ratio", "W2^2(a_1/2, a_1)/W2^2(a_0, a_1)"))}


@pytest.mark.parametrize("coupling, n, m, draw", [("curved", 24, 17, True), ("ot", 20, 20, False)])
def test_interpolants_costs_and_straightness(tmp_path, capsys, coupling, n, m, draw):
    result, text, module = run("interpolants", tmp_path, capsys, draw, coupling=coupling, n=n, m=m, steps=50, every=1)
    x, y = module.endpoints(n, m, 0)
    cost = squared_distances(x, y).numpy()
    w2 = ot.emd2(uniform(n), uniform(m), cost)
    assert value(text, r"W2\^2\(alpha, beta\) by POT emd2") == pytest.approx(w2, rel=1e-9)
    rows = {c: coupling_line(text, c) for c in module.COUPLINGS}
    product, best, curved = rows["product"], rows["ot"], rows["curved"]
    # Product: all n·m pairs, cost Σ pᵢqⱼ|xᵢ − yⱼ|²; linear paths are straight at constant speed.
    assert product["pairs"] == n * m and product["cost"] == pytest.approx(cost.mean(), rel=1e-9)
    # OT: the optimal plan (at most n + m − 1 pairs; a permutation when n = m) costs W₂² ≤ product.
    assert best["pairs"] <= n + m - 1
    if n == m:
        assert best["pairs"] == n
    assert best["cost"] == pytest.approx(w2, rel=1e-9) and best["cost"] <= product["cost"]
    for row in (product, best):
        # Straight rays at constant speed: action = cost exactly; the printed 10 digits are the rounding.
        assert row["straightness"] == pytest.approx(1.0, abs=2e-10)
        assert row["kinetic"] == pytest.approx(row["cost"], rel=1e-9)
    # McCann's interpolation is a constant-speed geodesic: W₂(α_½, α₁) = ½ W₂(α₀, α₁).
    assert best["ratio"] == pytest.approx(0.25, abs=2e-10)
    # The curved bridge keeps the optimal pairs (same endpoints, same cost) but its paths are longer.
    assert curved["cost"] == pytest.approx(w2, rel=1e-9) and curved["straightness"] < 0.99
    plan = measureflow.couplings.get("exact_ot").plan(x, y)
    i, j = (plan > 0).nonzero(as_tuple=True)
    pi = plan[i, j] / plan[i, j].sum()
    xi, yj = x[i], y[j]
    # Cosine bridge ż = (π/2)(−sin·x + cos·y): ∫₀¹|ż|² = (π²/8)(|x|² + |y|²) − (π/2)x·y per pair.
    squares, cross = (xi**2).sum(-1) + (yj**2).sum(-1), (xi * yj).sum(-1)
    exact = float((pi * ((math.pi**2 / 8) * squares - (math.pi / 2) * cross)).sum())
    # The action is summed over frames Δt = 0.02 apart (chords), which falls short by
    # Δt²/12 · E∫|z̈|²dt + O(Δt⁴) with z̈ = −(π/2)²z, E∫|z̈|² = (π/2)⁴ Σπ[(|x|² + |y|²)/2 + (2/π) x·y];
    # the O(Δt⁴) remainder is ~(πΔt/2)² ≈ 10⁻³ of it.
    zz = float((pi * (squares / 2 + (2 / math.pi) * cross)).sum())
    shortfall = 0.02**2 / 12 * (math.pi / 2) ** 4 * zz
    assert exact - curved["kinetic"] == pytest.approx(shortfall, rel=1e-2)
    # The run itself: RK4 on the label velocities lands every pair on its target — exactly (to rounding)
    # for the constant velocities of the linear schedule; for the cosine bridge RK4 is Simpson's rule on
    # f = (π/2)(−sin·x + cos·y), error ≤ h⁴/2880·max|f⁗| = (0.02)⁴/2880·(π/2)⁵·(|x| + |y|) < 5·10⁻⁹ here.
    ran = module.make_pairs(coupling, x, y)
    tol = 1e-12 if coupling == "ot" else 1e-8
    assert torch.allclose(result.state.x[0], ran.x1, rtol=0, atol=tol)
    assert value(text, r"max \|Z_1 - y_pair\|") < tol


# -- three Diracs (MATH.md §1.6) ----------------------------------------------------------------------------


@pytest.mark.parametrize("schedule, exact_rms, draw", [("linear", 1.414e-3, True), ("vp", 0.0632, False)])
def test_three_dirac_reverse_flow(tmp_path, capsys, schedule, exact_rms, draw):
    n = 2000
    # 100 geometric steps (|Δlog t| = 0.069 linear, 0.094 vp): the positions agree with a 1600-step run to
    # 5.6·10⁻³·b_{t_min} (linear) and 6.8·10⁻⁴·b (vp) at worst, RMS 2·10⁻⁴·b: far inside the
    # Monte-Carlo tolerances below.
    result, text, module = run("three_diracs", tmp_path, capsys, draw, schedule=schedule, n=n, steps=100, every=10)
    t_max = module.NOISE_END[schedule]
    with measureflow.open(tmp_path / "three_diracs.h5") as traj:
        times = np.asarray(traj.times)
    # The file holds the schedule's own times: every 10th node of tₖ = t_max (t_min/t_max)^{k/100}.
    assert times == pytest.approx(t_max * (1e-3 / t_max) ** (np.arange(0, 101, 10) / 100), rel=1e-12)
    fractions = [float(v) for v in re.search(r"cluster fractions = ([\d. ]+)", text).group(1).split()]
    weights = np.array(module.WEIGHTS)
    # Binomial counts: each fraction within 3 standard deviations √(w(1 − w)/n) of its weight.
    assert np.all(np.abs(np.array(fractions) - weights) < 3 * np.sqrt(weights * (1 - weights) / n)), fractions
    printed_exact = value(text, r"exact b\(t_min\)\*sigma\*sqrt\(2\)")
    assert printed_exact == pytest.approx(exact_rms, rel=5e-4)  # MATH.md §1.6 to its 4 digits
    # |z − acⱼ|²/b² ~ χ²₂ under the exact law: the sample RMS has relative sd 1/(2√n) = 1.1 %; allow 4.
    rms = value(text, r"RMS distance to the nearest scaled atom")
    assert rms == pytest.approx(printed_exact, rel=4 / (2 * math.sqrt(n)))
    # The report's numbers are those of the final state (the run, not a recomputation).
    landed = module.landing(result.state.x[0], schedule, 1.0, 1e-3)
    assert fractions == pytest.approx(landed["fractions"].tolist(), abs=1e-4)


def test_three_dirac_forward_noising(tmp_path, capsys):
    """Forward pairs in OU time: the run reproduces Zτ = aτX + bτY of its own pairs, whose law at τ = 12
    has E|Z|² = e^{−24}Σwⱼ|cⱼ|² + 2(1 − e^{−24})σ² (MATH.md §1.4 (b))."""
    n = 1500
    result, text, module = run("three_diracs", tmp_path, capsys, False, schedule="vp", direction="forward", n=n,
                               steps=100, every=10)
    _, field, times = module.configure("vp", "forward", n, 1.0, 1e-3, 0, 100)
    assert times[0] == 1e-3 and times[-1] == 12.0
    exact_positions = field.pairs.interpolate(times[-1], "vp").x
    # RK4 is Simpson's rule on the label velocity a'X + b'Y, b' ≈ (2τ)^{−1/2}; the geometric steps grow to
    # Δτ ≈ 0.9 near τ = 12, where h⁵|f⁗|/2880 adds up to 1.0·10⁻⁶·|Y|: 3.3·10⁻⁶ measured (|Y| ≤ 3.2),
    # 2.1·10⁻⁷ at 200 steps. A wrong clock or grid misses by O(1).
    assert torch.allclose(result.state.x, exact_positions, rtol=0, atol=1e-5)
    got = value(text, r"E\|Z\|\^2 at t = 12 is")
    exact = value(text, r"; exact")
    assert exact == pytest.approx(2.0, rel=1e-9)
    # |Z|² ≈ σ²χ²₂ at τ = 12: the sample mean has relative sd 1/√n = 2.6 %; allow 4.
    assert got == pytest.approx(exact, rel=4 / math.sqrt(n))


# -- diffusion paths vs OT rays (MATH.md §1.5) ---------------------------------------------------------------


def path_numbers(text: str, label: str) -> dict:
    line = next(ln for ln in text.splitlines() if ln.strip().startswith(label))
    return {key: value(line, key) for key in ("cost", "kinetic", "duration", "straightness")}


@pytest.mark.parametrize("data, schedule, draw", [("atoms", "cosine", True), ("gaussian", "cosine", False),
                                                  ("atoms", "vp", False)])
def test_diffusion_paths_against_ot_rays(tmp_path, capsys, data, schedule, draw):
    n = 150
    result, text, module = run("diffusion_vs_ot", tmp_path, capsys, draw, data=data, schedule=schedule, n=n,
                               steps=100, every=2)
    flow, rays = path_numbers(text, "probability flow:"), path_numbers(text, "OT rays:")
    with measureflow.open(tmp_path / "diffusion_vs_ot.h5") as traj:
        z = torch.as_tensor(np.asarray(traj.positions[0]))[0]
        x = torch.as_tensor(np.asarray(traj.positions[len(traj) - 1]))[0]
        times = np.asarray(traj.times)
    assert torch.equal(x, result.state.x[0])
    # The file holds the schedule's own times (τ for vp), every 2nd node of the grid: geometric from the
    # noise end to t_min = 10⁻³ for atoms, uniform in t for the smooth field of Gaussian data.
    t_max, k = module.NOISE_END[schedule], np.arange(0, 101, 2) / 100
    grid = t_max + (1e-3 - t_max) * k if data == "gaussian" else t_max * (1e-3 / t_max) ** k
    assert times == pytest.approx(grid, rel=1e-12, abs=1e-15)
    assert flow["duration"] == pytest.approx(t_max - 1e-3, abs=5e-7)  # printed with 6 decimals
    w2 = ot.emd2(uniform(n), uniform(n), squared_distances(z, x).numpy())
    assert value(text, r"W2\^2\(noise, generated\) by POT emd2") == pytest.approx(w2, rel=1e-7)
    # The rays are the optimal pairing, straight at constant speed: cost = action = W₂², straightness 1.
    assert rays["cost"] == pytest.approx(w2, rel=1e-7) and rays["kinetic"] == pytest.approx(w2, rel=1e-7)
    assert rays["straightness"] == pytest.approx(1.0, abs=1e-11)
    # The flow's pairing costs at least W₂² (a permutation the minimum runs over); by Cauchy–Schwarz its
    # action over the unit clock is at least its cost, and its paths are curved.
    assert flow["cost"] == pytest.approx(float(((x - z) ** 2).sum(-1).mean()), rel=1e-7)
    assert flow["cost"] >= w2 - 1e-8  # printed with 8 decimals
    assert flow["duration"] * flow["kinetic"] >= flow["cost"] and flow["straightness"] < 0.95
    agreement = value(text, r"share of particles [^=]*")
    if data == "gaussian":
        # Noise σ²I commutes with Σ₀, so the flow map is the Brenier map (MATH.md §1.5): its pairing of
        # the noise with the generated points is itself optimal.
        assert agreement == 1.0 and flow["cost"] == pytest.approx(w2, abs=1e-8)
        a, _, b, _ = (float(v) for v in measureflow.schedules.get("cosine").coefficients(1e-3))
        law = module.data_law("gaussian", 6, 0)
        target = a * a * law.cov + b * b * torch.eye(2, dtype=F64)
        T, shift = measureflow.couplings.gaussian_brenier_map(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64),
                                                              a * law.mean(), target)
        # RK4 on the uniform grid (100 steps, h = 0.01) of this smooth field: error 1.3·10⁻⁹, falling
        # 16-fold per halving of h; a wrong grid or clock misses by O(1).
        assert torch.allclose(x, z @ T.T + shift, rtol=0, atol=1e-8)
    else:
        assert 0.5 < agreement <= 1.0
    if schedule == "vp":
        # The OU flow (ou_bridge, −x − σ²∇log ρ_τ, run backwards in τ) is the flow-matching field of the vp
        # schedule (a, b) = (e^{−τ}, √(1 − e^{−2τ})) (MATH.md §1.3, §2): on the same grid both land on the
        # same points up to round-off (2·10⁻¹⁵ measured).
        law = module.data_law(data, 6, 0)
        fm = measureflow.field("flow_matching", data=law, schedule="vp", sigma=1.0, t_min=1e-3, t_max=12.0)
        same = measureflow.Simulation(measureflow.Particles(z[None]), fm, "rk4", times=fm.generation_times(100),
                                      progress=False).run()
        assert torch.allclose(same.state.x[0], x, rtol=0, atol=1e-12)
