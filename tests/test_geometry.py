"""Fisher–Rao and Wasserstein–Fisher–Rao geometries on Gaussian states (MATH.md §15.6, §3).

Reference numbers are MATH.md's, printed to 7 decimals: a comparison with them is limited by that
rounding (5e-8), so it is made at 1e-7 after RK4 at h = 1/400 (local error O(h⁵), global ~1e-11 here);
the closed form of pure FR is compared with the integrated closure at 1e-10.
"""

from __future__ import annotations

import pytest
import torch

import measureflow
from measureflow import CapabilityError, Gaussians, ParameterError, Simulation
from measureflow.measures import Gaussian

F64 = torch.float64
C0 = torch.diag(torch.tensor([4.0, 0.25], dtype=F64))
GAMMA = Gaussian(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
# MATH.md §15.6 pure-FR case
M0 = torch.tensor([-1.0, 2.0], dtype=F64)
MB = torch.tensor([1.0, -0.5], dtype=F64)
SB = torch.tensor([[1.5, 0.4], [0.4, 0.7]], dtype=F64)
FR_MEAN = torch.tensor([1.0974162, 1.4689206], dtype=F64)
FR_COV = torch.tensor([[2.2173931, 0.1269309], [0.1269309, 0.3309667]], dtype=F64)


def _run(field, state, t1=0.5, steps=200):
    result = Simulation(state, field, "rk4", t1=t1, steps=steps).run()
    assert result.ok
    return result.state


@pytest.mark.parametrize("rate, expected", [(0.0, (2.1036383, 0.7240904)), (1.0, (1.3767245, 0.7923166))])
def test_wfr_kl_toward_gamma_matches_math(rate, expected):
    # α = 0 is the plain Wasserstein KL flow of §3; α = 1 the WFR row of §15.6.
    kwargs = {} if rate == 0.0 else {"geometry": "wfr", "rate": rate}
    field = measureflow.field("kl", target=GAMMA, **kwargs)
    out = _run(field, Gaussians(torch.zeros(2, dtype=F64), C0))
    want = torch.diag(torch.tensor(expected, dtype=F64))
    assert torch.allclose(out.cov[0], want, atol=1e-7, rtol=0)
    assert torch.allclose(out.mean[0], torch.zeros(2, dtype=F64), atol=1e-14)


def test_pure_fisher_rao_closed_form_and_closure():
    field = measureflow.field("kl", target=Gaussian(MB, SB), geometry="fisher_rao", rate=1.0)
    start = Gaussians(M0, C0)
    exact = field.solution(0.5, start)
    # the printed reference (7 decimals)
    assert torch.allclose(exact.mean[0], FR_MEAN, atol=1e-7, rtol=0)
    assert torch.allclose(exact.cov[0], FR_COV, atol=1e-7, rtol=0)
    # the closure integrated by RK4 reproduces the closed form to 1e-10 (RK4 global error ~1e-11)
    out = _run(field, start, steps=400)
    assert torch.allclose(out.mean, exact.mean, atol=1e-10, rtol=0)
    assert torch.allclose(out.cov, exact.cov, atol=1e-10, rtol=0)


def test_wfr_mean_equation_and_energy_identity():
    """ṁ = (I + αΣ)P(m_β − m) and dF/dt = −|b|² − tr(AΣAᵀ) − α Var(δF), Var = ½tr((MΣ)²) + gᵀΣg."""
    alpha = 0.7
    target = Gaussian(MB, SB)
    wfr = measureflow.field("kl", target=target, geometry="wfr", rate=alpha)
    plain = measureflow.field("kl", target=target)
    S = torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=F64)
    state = Gaussians(M0, S)
    P = torch.linalg.inv(SB)
    b, _ = wfr.affine(0.0, state)
    want = (torch.eye(2, dtype=F64) + alpha * S) @ P @ (MB - M0)
    assert torch.allclose(b[0], want, atol=1e-13)
    # energy identity by central differences along the closure (h = 1e-4: error O(h²) ~ 1e-8 relative)
    h = 1e-4
    fwd = _run(wfr, state, t1=h, steps=4)
    bwd = Simulation(state, wfr, "rk4", t0=0.0, t1=-h, steps=4).run().state
    dF = (wfr.energy(fwd) - wfr.energy(bwd)) / (2 * h)
    bw, Aw = plain.affine(0.0, state)
    dissipation = (bw * bw).sum() + torch.einsum("rij,rjk,rik->r", Aw, S[None], Aw)
    M = P - torch.linalg.inv(S)
    g = P @ (M0 - MB)
    var = 0.5 * torch.trace(M @ S @ M @ S) + g @ S @ g
    assert torch.allclose(dF, -(dissipation + alpha * var), rtol=1e-7, atol=0)


def test_geometry_errors():
    with pytest.raises(CapabilityError, match=r"has no first variation.*fields with one: .*kl.*mmd"):
        measureflow.field("w2", target=GAMMA, geometry="wfr")
    with pytest.raises(ParameterError, match="geometry must be one of"):
        measureflow.field("kl", target=GAMMA, geometry="hellinger")
    with pytest.raises(ParameterError, match="rate"):
        measureflow.field("kl", target=GAMMA, geometry="wfr", rate=-1.0)
    with pytest.raises(ParameterError, match="rate= is the Fisher–Rao rate"):
        measureflow.field("kl", target=GAMMA, geometry="wasserstein", rate=1.0)
    with pytest.raises(ParameterError, match="positive measures"):
        measureflow.field("kl", target=GAMMA, geometry="wfr", balanced=False)
    # a closure that is not the gradient of a quadratic first variation is refused on Gaussians
    smoothed = measureflow.field("kl", target=GAMMA, mode="smoothed", epsilon=0.1)
    with pytest.raises(CapabilityError, match="no first variation"):
        measureflow.field("kl", target=GAMMA, mode="smoothed", epsilon=0.1, geometry="wfr")
    assert smoothed is not None
    assert measureflow.field("kl", target=GAMMA, geometry="wasserstein").name == "kl"


# -- particles: moving weights ------------------------------------------------------------------------------


def _cloud(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, 2, generator=g, dtype=F64)
    w = torch.rand(1, n, generator=g, dtype=F64) + 0.5
    y = torch.randn(80, 2, generator=g, dtype=F64) * 0.5 + torch.tensor([1.0, 0.5], dtype=F64)
    return measureflow.Particles(x, w / w.sum()), y


def _energy_rate(field, state, h):
    """dF/dt at t = 0 by central differences of RK4 runs over ±h (error O(h²))."""
    fwd = Simulation(state, field, "rk4", t1=h, steps=1).run().state
    bwd = Simulation(state, field, "rk4", t1=-h, steps=1).run().state
    return float((field.energy(fwd) - field.energy(bwd)) / (2 * h))


def _predicted_rate(field, state, alpha, balanced=True):
    """−∫|∇δF|² dμ − α Var_μ(δF) (balanced) or −α∫δF² dμ (unbalanced) (MATH.md §15.6)."""
    w = state.weights
    v = field.velocity(0.0, state.x, state)
    phi = field.first_variation(0.0, state.x, state)
    spread = (w * phi**2).sum() - ((w * phi).sum() ** 2 if balanced else 0.0)
    return float(-(w * (v**2).sum(-1)).sum() - alpha * spread)


def _check_identity(field, state, alpha, balanced=True):
    want = _predicted_rate(field, state, alpha, balanced)
    # The central difference errs by O(h²) (the RK4 runs add O(h⁵)): the error must fall ~4× per halving.
    # A wrong identity leaves an error that does not shrink with h, which this ratio catches; the
    # size bound only rules out gross mistakes (the O(h²) constant depends on the field's third derivative).
    errors = [abs(_energy_rate(field, state, h) - want) for h in (4e-3, 2e-3)]
    assert errors[1] < errors[0] / 3.5
    assert errors[1] < 1e-3 * abs(want)


@pytest.mark.parametrize("balanced", [True, False])
def test_wfr_mmd_energy_identity_to_second_order(balanced):
    from measureflow.measures import Empirical

    state, y = _cloud()
    alpha = 2.0
    field = measureflow.field("mmd", target=Empirical(y), bandwidth=1.0, geometry="wfr", rate=alpha,
                              balanced=balanced)
    _check_identity(field, state, alpha, balanced)


@pytest.mark.parametrize("name", ["interaction", "sinkhorn"])
def test_wfr_energy_identity_other_fields(name):
    from measureflow.measures import Empirical

    state, y = _cloud()
    alpha = 1.5
    kwargs = {
        "interaction": dict(kernel="gaussian", strength=-1.0, confinement=1.0),
        # tight Sinkhorn tolerance: the potentials' error enters δF and the energy
        "sinkhorn": dict(target=Empirical(y), epsilon=0.5, tol=1e-11),
    }[name]
    _check_identity(measureflow.field(name, geometry="wfr", rate=alpha, **kwargs), state, alpha)


def test_balanced_weights_sum_to_one_every_step_and_are_written(tmp_path):
    from measureflow.measures import Empirical

    state, y = _cloud()
    field = measureflow.field("mmd", target=Empirical(y), bandwidth=1.0, geometry="wfr", rate=3.0)
    path = tmp_path / "wfr.h5"
    result = Simulation(state, field, "rk4", t1=1.0, steps=40, writers=["memory", path], observers=["energy"]).run()
    assert result.ok
    frames = result.weight_frames
    assert frames.shape == (41, 1, 60)
    assert abs(frames.sum(-1) - 1.0).max() < 1e-12
    assert (frames > 0).all()
    assert abs(frames[-1] - frames[0]).max() > 1e-3  # they did move
    energy = result.observables["energy"].values[:, 0]
    assert (torch.diff(torch.as_tensor(energy)) < 0).all()
    with measureflow.open(path) as traj:
        assert traj.weight_frames.shape == (41, 1, 60)
        assert abs(traj.weight_frames[:] - frames).max() == 0.0
        assert abs(traj.weights_at(17) - frames[17]).max() == 0.0
        assert abs(traj.weights - frames[0]).max() == 0.0


def test_unbalanced_mass_changes_and_resumes(tmp_path):
    from measureflow.measures import Empirical

    state, y = _cloud()
    field = measureflow.field("mmd", target=Empirical(y), bandwidth=1.0, geometry="wfr", rate=2.0, balanced=False)
    full = Simulation(state, field, "rk4", t1=1.0, steps=20).run()
    assert abs(float(full.state.weights.sum()) - 1.0) > 1e-2
    # a checkpoint holds the unnormalised weights and the resumed run ends on the same state
    ckpt = tmp_path / "run.ckpt"
    sim = Simulation(state, field, "rk4", t1=1.0, steps=20, checkpoint=ckpt, checkpoint_every=5,
                     callbacks=[lambda step, t, s: step >= 10])
    assert sim.run().status.code == "stopped"
    resumed = sim.with_options(callbacks=(), resume=True).run()
    assert torch.allclose(resumed.state.weights, full.state.weights, atol=1e-14, rtol=0)


def test_negative_weights_stop_the_run_as_nonfinite_keeping_frames(tmp_path):
    from measureflow.measures import Empirical

    state, y = _cloud()
    # Euler with hα = 50 sends weights with δF above the mean negative at the first step
    field = measureflow.field("mmd", target=Empirical(y), bandwidth=1.0, geometry="fisher_rao", rate=50.0)
    path = tmp_path / "bad.h5"
    result = Simulation(state, field, "euler", t1=3.0, steps=3, writers=[path]).run()
    assert result.status.code == "nonfinite"
    assert result.steps_done == 0
    with measureflow.open(path) as traj:
        assert len(traj) == 1
        assert traj.status.code == "nonfinite"
        assert abs(traj.weight_frames[0] - state.weights.numpy()).max() == 0.0


def test_pure_fisher_rao_keeps_positions():
    state, y = _cloud()
    from measureflow.measures import Empirical

    field = measureflow.field("sinkhorn", target=Empirical(y), epsilon=0.5, geometry="fisher_rao", rate=1.0)
    out = Simulation(state, field, "rk4", t1=0.2, steps=4).run().state
    assert torch.equal(out.x, state.x)
    assert abs(float(out.weights.sum()) - 1.0) < 1e-12


def test_birth_death_langevin_gets_the_mode_masses_right():
    """KL to 0.8 N((−4, 0), I) + 0.2 N((4, 0), I) from equal masses in the two modes: plain Langevin cannot
    cross the barrier (mass stays ½), WFR birth–death (δF = log(K_ε*μ) + V) moves the weights."""
    from measureflow.measures import GaussianMixture

    means = torch.tensor([[-4.0, 0.0], [4.0, 0.0]], dtype=F64)
    target = GaussianMixture(torch.tensor([0.8, 0.2], dtype=F64), means, torch.eye(2, dtype=F64).expand(2, 2, 2))
    g = torch.Generator().manual_seed(1)
    n = 400
    x = torch.randn(1, n, 2, generator=g, dtype=F64)
    x[:, : n // 2] += means[0]
    x[:, n // 2:] += means[1]
    start = measureflow.Particles(x)
    masses = {}
    for label, kw in (("langevin", {}), ("wfr", {"geometry": "wfr", "rate": 1.0})):
        field = measureflow.field("kl", target=target, epsilon=0.2, **kw)
        out = Simulation(start, field, "euler_maruyama", t1=5.0, steps=500, seed=3).run()
        assert out.ok
        w = out.state.weights_or_uniform()[0]
        masses[label] = (float(w[out.state.x[0, :, 0] < 0].sum()), 1.0 / float((w**2).sum()))
    mass, n_eff = masses["wfr"]
    # sampling standard error of a weighted mode mass, with Kish's effective sample size
    se = (0.8 * 0.2 / n_eff) ** 0.5
    assert abs(mass - 0.8) < 3 * se
    assert abs(masses["langevin"][0] - 0.8) / 0.8 > 0.2


# -- the unbalanced Sinkhorn divergence (reach ρ) and its flows ----------------------------------------------


def _unbalanced_case():
    from measureflow.measures import Empirical

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 50, 2, generator=g, dtype=F64)
    y = torch.randn(70, 2, generator=g, dtype=F64) * 0.6 + torch.tensor([1.5, 0.5], dtype=F64)
    w = torch.rand(1, 50, generator=g, dtype=F64) + 0.5
    state = measureflow.Particles(x).with_weights(1.3 * w / w.sum())  # mass 1.3
    return state, Empirical(y)


def test_unbalanced_sinkhorn_velocity_and_first_variation_are_the_energy_gradients():
    state, target = _unbalanced_case()
    field = measureflow.field("sinkhorn", target=target, epsilon=0.5, reach=2.0, tol=1e-14, max_iter=20000,
                              warm_start=False)
    v = field.velocity(0.0, state.x, state)[0]
    phi = field.first_variation(0.0, state.x, state)[0]
    h = 1e-5  # central differences: O(h²) ~ 1e-10 against potentials converged to 1e-14·ε
    for i, k in [(0, 0), (7, 1), (31, 0)]:
        step = torch.zeros_like(state.x)
        step[0, i, k] = h
        dx = (field.energy(state.with_positions(state.x + step)) - field.energy(state.with_positions(state.x - step))) / (2 * h)
        assert float(dx / state.weights[0, i]) == pytest.approx(-float(v[i, k]), rel=1e-7, abs=1e-9)
        dw = torch.zeros_like(state.weights)
        dw[0, i] = h
        dm = (field.energy(state.with_weights(state.weights + dw)) - field.energy(state.with_weights(state.weights - dw))) / (2 * h)
        assert float(dm) == pytest.approx(float(phi[i]), rel=1e-7, abs=1e-9)
    far = measureflow.field("sinkhorn", target=target, epsilon=0.5, reach=2.0)
    with pytest.raises(CapabilityError, match="no Gaussian closure"):
        far.affine(0.0, Gaussians(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64)))


def test_unbalanced_sinkhorn_wfr_energy_identity():
    state, target = _unbalanced_case()
    alpha = 1.0
    field = measureflow.field("sinkhorn", target=target, epsilon=0.5, reach=2.0, tol=1e-12, geometry="wfr",
                              rate=alpha, balanced=False)
    _check_identity(field, state, alpha, balanced=False)
    with pytest.raises(ParameterError, match="positive measures"):
        measureflow.field("sinkhorn", target=target, epsilon=0.5, geometry="wfr", balanced=False)
