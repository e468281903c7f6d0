"""One-step generators trained by explicit Euler steps of a particle field (MATH.md §9, last paragraph)."""

import math
import os
import signal
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from torch import nn

import measureflow
from measureflow import Gaussians
from measureflow.errors import CapabilityError, MeasureflowError, ParameterError, ShapeError, TimeRangeError
from measureflow.fields import Field
from measureflow.io import load_checkpoint, save_checkpoint
from measureflow.scenario import Runnable
from measureflow.training import GeneratorMLP, GeneratorTraining, ResidualGenerator, train_generator
from measureflow.measures import Gaussian

pytestmark = pytest.mark.usefixtures("small_reductions")

F64 = torch.float64


def ring(n, seed=0):
    """Eight Gaussians (radius 2, std 0.15) in 2-D, float32."""
    g = torch.Generator().manual_seed(seed)
    angle = 2 * math.pi * torch.randint(8, (n,), generator=g) / 8
    return 2.0 * torch.stack([angle.cos(), angle.sin()], -1) + 0.15 * torch.randn(n, 2, generator=g)


DATA = ring(200)


def whitened(n, generator):
    """Standard normal latents whose batch mean is exactly 0 and batch covariance exactly I (population
    normalisation), so a batch has the moments of the law and the field sees no sampling error."""
    z = torch.randn(n, 2, generator=generator, dtype=F64)
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(z.T @ z / n)
    return torch.linalg.solve_triangular(chol, z.T, upper=False).T


def whitened_1d(n, generator):
    return whitened(n, generator)[:, :1]


def affine(k, d, a, L):
    net = nn.Linear(k, d).to(F64)
    with torch.no_grad():
        net.bias.copy_(torch.as_tensor(a, dtype=F64))
        net.weight.copy_(torch.as_tensor(L, dtype=F64).reshape(d, k))
    return net


# -- exactness on Gaussians: one iteration = the particle Euler step of the closure -------------------------


def test_one_direct_iteration_is_the_euler_step_of_the_gaussian_closure():
    # MATH.md §6: the (1 + ⟨x, y⟩)² MMD field is affine in x for every μ, v(x) = b + A(x − m) with
    # b = 4(M_β − M)m + 4(m_β − m), A = 4(M_β − M), M the uncentred second moment. Target N(−1, 0.5), state
    # N(a, b²) = N(0.5, 2.25): M_β = 1.5, M = 2.5, so A = −4 and b = −8.
    target = Gaussian(torch.tensor([-1.0], dtype=F64), torch.tensor([[0.5]], dtype=F64))
    field = measureflow.field("mmd", target=target, kernel="poly2_affine")
    a, b, tau = 0.5, 1.5, 0.05
    G = affine(1, 1, [a], [b])
    bf, A = field.affine(0.0, Gaussians(torch.tensor([[a]], dtype=F64), torch.tensor([[[b * b]]], dtype=F64)))
    assert bf.item() == pytest.approx(-8.0, rel=1e-12) and A.item() == pytest.approx(-4.0, rel=1e-12)
    # Whitened latents: the batch's mean and variance are a and b² exactly, so w = b + A(x − a) exactly and
    # x⁺ = x + τw is affine in ζ. The least-squares fit of a' + b'ζ has Hessian 2I (batch mean 0, variance
    # 1), so gradient descent with lr 1/4 halves the error per step: 60 steps leave 2⁻⁶⁰ of it.
    result = train_generator(G, field, whitened_1d, iterations=1, batch=512, step=tau, inner_steps=60,
                             optimizer=lambda p: torch.optim.SGD(p, lr=0.25), eval_batch=16, progress=False)
    a_new, b_new = G.bias.item(), G.weight.item()
    mean_euler = a + tau * bf.item()
    var_particles = (1 + tau * A.item()) ** 2 * b * b  # (I + τA)Σ(I + τA)ᵀ
    assert a_new == pytest.approx(mean_euler, abs=1e-13) and a_new == pytest.approx(0.1, abs=1e-13)
    assert b_new**2 == pytest.approx(var_particles, abs=1e-12) and b_new**2 == pytest.approx(1.44, abs=1e-12)
    # The explicit Euler step of the closure ODE Σ̇ = 2AΣ (eq. 0.1) is Σ(1 + 2τA) = 1.35: the particle step
    # exceeds it by exactly τ²A²Σ = 0.09, the O(τ²) gap between the two Euler schemes.
    var_closure = b * b * (1 + 2 * tau * A.item())
    assert b_new**2 - var_closure == pytest.approx(tau**2 * A.item() ** 2 * b * b, abs=1e-12)
    # The Euler target was met to rounding, and the monitor is ∫|w|² = b_f² + A²Σ.
    assert result.fit[0] < 1e-20
    assert result.velocity_sq[0] == pytest.approx(64.0 + 16.0 * 2.25, rel=1e-12)


def test_one_residual_iteration_in_2d_is_the_particle_euler_step():
    # Non-commuting, non-centred 2-D target; an affine residual field U(x) = c + Kx represents w exactly,
    # and LBFGS (stepped with a closure) solves the 6-parameter least squares to rounding.
    target = Gaussian(torch.tensor([1.0, -0.5], dtype=F64), torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=F64))
    field = measureflow.field("mmd", target=target, kernel="poly2_affine")
    a = torch.tensor([0.3, 0.2], dtype=F64)
    L = torch.tensor([[1.2, 0.0], [0.5, 0.7]], dtype=F64)
    base = affine(2, 2, a, L)
    tau = 0.02

    def lbfgs(params):
        return torch.optim.LBFGS(params, lr=1, max_iter=200, tolerance_grad=1e-15, tolerance_change=0,
                                 history_size=20, line_search_fn="strong_wolfe")

    result = train_generator(base, field, whitened, iterations=1, batch=400, step=tau, mode="residual",
                             inner_steps=1, optimizer=lbfgs, residual_model=lambda d: nn.Linear(d, d),
                             eval_batch=16, progress=False)
    G = result.generator
    assert isinstance(G, ResidualGenerator) and len(G) == 1 and G.steps == [tau] and G.base is base
    S = L @ L.T
    b, A = field.affine(0.0, Gaussians(a[None], S[None]))
    step = torch.eye(2, dtype=F64) + tau * A[0]
    # The new generator is affine: read its mean and covariance off exactly (offset and Jacobian).
    with torch.no_grad():
        m_new = G(torch.zeros(1, 2, dtype=F64))[0]
        J = torch.stack([G(torch.eye(2, dtype=F64)[i:i + 1])[0] - m_new for i in range(2)], 1)
    assert torch.allclose(m_new, a + tau * b[0], rtol=0, atol=1e-12)
    assert torch.allclose(J @ J.T, step @ S @ step.T, rtol=0, atol=1e-11)
    assert result.fit[0] < 1e-20


# -- the distance to the data decreases ----------------------------------------------------------------------


FIELDS = {
    # name: (field, step τ); the velocities' scales differ (a displacement, 2× one, a kernel gradient).
    "drifting": (lambda: measureflow.field("drifting", target=DATA, epsilon=0.2), 1.0),
    "sinkhorn": (lambda: measureflow.field("sinkhorn", target=DATA, epsilon=0.5, tol=1e-3), 0.25),
    "mmd": (lambda: measureflow.field("mmd", target=DATA, bandwidth=0.5), 2.0),
}


@pytest.mark.parametrize("name", list(FIELDS))
def test_generator_approaches_the_data(name):
    if name not in measureflow.get_registry().names("fields"):
        pytest.skip(f"{name} field not registered")
    make, tau = FIELDS[name]
    result = train_generator(dict(hidden=32, depth=2), make(), 2, iterations=60, batch=96, step=tau, inner_steps=5,
                             lr=5e-3, data=DATA, eval_batch=150, every=15, mmd_bandwidth=0.5, sinkhorn_epsilon=None,
                             seed=1, progress=False)
    assert result.ok and list(result.steps) == [0, 15, 30, 45, 60]
    mmd = result.distances["mmd"]
    # The initial generator puts every sample near the origin, inside the ring: MMD² ≈ 1.1. Measured after 60
    # iterations (seeds 1–3): 0.027–0.032 (drifting), 0.030–0.032 (sinkhorn), 0.032–0.038 (mmd), near the
    # floor set by the finite evaluation batch and the continuous generator between the modes; a generator
    # left in place keeps 1.1. The drifting field starts slowest (0.18–0.47 at iteration 15: from a collapsed
    # batch B_ε[μ] ≈ 0 and B_ε[β] is a weak pull toward the ring's centre of mass).
    assert mmd[0] > 1.0
    assert mmd[-1] < 0.06 * mmd[0]
    assert mmd[1:].max() < mmd[0] and mmd[-1] < mmd[1]
    assert result.fit.shape == (60,) and np.isfinite(result.velocity_sq).all()


# -- file, resumption, monitors -----------------------------------------------------------------------------


def small_run(tmp_path=None, name="run", **kw):
    params = dict(iterations=12, batch=48, step=0.25, inner_steps=3, lr=3e-3, data=DATA[:100], eval_batch=60, every=4,
                  mmd_bandwidth=0.5, sinkhorn_epsilon=1.0, seed=3, progress=False, checkpoint_every=5)
    params.update(kw)
    if tmp_path is not None:
        params.setdefault("out", tmp_path / f"{name}.h5")
    field = measureflow.field("sinkhorn", target=DATA[:100], epsilon=0.5, tol=1e-3)
    return train_generator(dict(hidden=16, depth=2), field, 2, **params)


def same_modules(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k] for k in sa)


@pytest.mark.parametrize("mode", ["direct", "residual"])
def test_interrupted_training_resumes_bit_for_bit(tmp_path, mode):
    reference = small_run(tmp_path, "reference", mode=mode)
    ckpt = tmp_path / "train.ckpt"

    def crash(i, generator):
        if i == 8:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        small_run(tmp_path, "resumed", mode=mode, checkpoint=ckpt, callback=crash)
    assert load_checkpoint(ckpt)["step"] == 5
    resumed = small_run(tmp_path, "resumed", mode=mode, checkpoint=ckpt, resume=True)
    assert resumed.ok and same_modules(resumed.generator, reference.generator)
    for key in ("velocity_sq", "fit", "steps", "snapshots"):
        assert np.array_equal(getattr(resumed, key), getattr(reference, key)), key
    for key in ("mmd", "sinkhorn"):
        assert np.array_equal(resumed.distances[key], reference.distances[key]), key
    # The trajectory written across the interruption equals the uninterrupted one, row for row.
    with measureflow.open(tmp_path / "reference.h5") as ref, measureflow.open(tmp_path / "resumed.h5") as res:
        assert np.array_equal(ref.steps, res.steps) and np.array_equal(ref.positions[:], res.positions[:])
        for name in ("velocity_sq", "fit", "mmd", "sinkhorn"):
            assert np.array_equal(ref.observables[name].steps, res.observables[name].steps)
            assert np.array_equal(ref.observables[name].values[:], res.observables[name].values[:]), name
        assert res.status.code == "completed" and res.status.resumed_from == (5,)
    # A run with other settings refuses the checkpoint instead of mixing two trainings.
    with pytest.raises(MeasureflowError, match="different run"):
        small_run(mode=mode, checkpoint=ckpt, resume=True, step=0.3)


def mmd_run(tmp_path, name, **kw):
    """A small run on the MMD field, which keeps no warm start between calls."""
    params = dict(iterations=12, batch=48, step=0.5, inner_steps=3, lr=3e-3, data=DATA[:100], eval_batch=60, every=4,
                  mmd_bandwidth=0.5, sinkhorn_epsilon=None, seed=3, progress=False, checkpoint_every=5,
                  out=tmp_path / f"{name}.h5")
    params.update(kw)
    field = measureflow.field("mmd", target=DATA[:100], bandwidth=0.5)
    return train_generator(dict(hidden=16, depth=2), field, 2, **params)


def test_sigterm_stops_training_with_a_checkpoint_and_resume_matches(tmp_path):
    reference = mmd_run(tmp_path, "reference")
    ckpt = tmp_path / "train.ckpt"

    def terminate(i, generator):
        if i == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = mmd_run(tmp_path, "resumed", checkpoint=ckpt, callback=terminate)
    # Stopped at the end of iteration 7, between scheduled checkpoints (5, 10): the stop saved one there.
    assert stopped.status.code == "terminated" and stopped.status.step == 7 and stopped.iterations == 7
    assert np.array_equal(stopped.fit, reference.fit[:7]) and list(stopped.steps) == [0, 4]
    assert load_checkpoint(ckpt)["step"] == 7
    with measureflow.open(tmp_path / "resumed.h5") as traj:
        assert traj.status.code == "terminated" and list(traj.observables["fit"].steps) == list(range(1, 8))
    resumed = mmd_run(tmp_path, "resumed", checkpoint=ckpt, resume=True)
    assert resumed.ok and same_modules(resumed.generator, reference.generator)
    for key in ("velocity_sq", "fit", "steps", "snapshots"):
        assert np.array_equal(getattr(resumed, key), getattr(reference, key)), key
    assert np.array_equal(resumed.distances["mmd"], reference.distances["mmd"])
    with measureflow.open(tmp_path / "reference.h5") as ref, measureflow.open(tmp_path / "resumed.h5") as res:
        assert np.array_equal(ref.steps, res.steps) and np.array_equal(ref.positions[:], res.positions[:])
        for name in ("velocity_sq", "fit", "mmd"):
            assert np.array_equal(ref.observables[name].steps, res.observables[name].steps), name
            assert np.array_equal(ref.observables[name].values[:], res.observables[name].values[:]), name
        assert res.status.code == "completed" and res.status.resumed_from == (7,)


def test_generator_training_is_a_fixed_runnable(tmp_path):
    base = GeneratorMLP(2, 2, hidden=8, depth=1, generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    field = measureflow.field("mmd", target=DATA[:50], bandwidth=0.5)
    options = dict(iterations=4, batch=16, eval_batch=8, every=2, data=DATA[:50], sinkhorn_epsilon=None)
    training = GeneratorTraining(base, field, 2, options=options, out=tmp_path / "g.h5", progress=False)
    assert isinstance(training, Runnable) and training.n_steps == 4
    assert training.writers[0].path == tmp_path / "g.h5"
    # New runs, never a changed one.
    labelled = training.with_options(parameters={"a": 1}, description="d", every=1)
    assert training.parameters == {} and training.options["every"] == 2
    assert labelled.parameters == {"a": 1} and labelled.description == "d" and labelled.options["every"] == 1
    saving = training.with_checkpoint(tmp_path / "g.ckpt", every=2, resume=True)
    assert training.checkpoint_path is None and not training.resume
    assert saving.checkpoint_path == Path(tmp_path / "g.ckpt") and saving.resume and saving.checkpoint_trigger == 2
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        training.out = None
    # run() trains a copy of the module: every run starts from the same weights.
    first, second = training.run(), training.run()
    assert first.ok and same_modules(first.generator, second.generator) and np.array_equal(first.fit, second.fit)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ParameterError, match="not keyword arguments of train_generator"):
        GeneratorTraining(None, field, 2, options={"iteration": 3})
    with pytest.raises(ParameterError, match="as attributes"):
        GeneratorTraining(None, field, 2, options={"checkpoint": "x.ckpt"})
    with pytest.raises(ParameterError, match="unknown options"):
        training.with_options(colour="red")


def test_trajectory_file_is_readable_and_plots(tmp_path):
    result = small_run(tmp_path, "file", iterations=10, every=4, sinkhorn_epsilon=None)
    path = tmp_path / "file.h5"
    with measureflow.open(path) as traj:
        # Frames at iterations 0, 4, 8 and the last, 10; step = time = iteration.
        assert traj.kind == "particles" and traj.replicas == 1 and traj.size == 60 and traj.dim == 2
        assert list(traj.steps) == [0, 4, 8, 10] and list(traj.times) == [0.0, 4.0, 8.0, 10.0]
        assert np.allclose(traj.positions[3][0], result.snapshots[-1], rtol=1e-6, atol=1e-6)
        obs = traj.observables
        assert set(obs) == {"velocity_sq", "fit", "mmd"}
        assert list(obs["velocity_sq"].steps) == list(range(1, 11))
        assert np.allclose(np.ravel(obs["velocity_sq"].values[:]), result.velocity_sq, rtol=1e-6)
        assert np.allclose(np.ravel(obs["mmd"].values[:]), result.distances["mmd"], rtol=1e-12)
        assert traj.parameters["field"]["name"] == "sinkhorn" and traj.status.code == "completed"
    png = tmp_path / "file.png"
    from measureflow import cli

    assert cli.main(["plot", str(path), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seed_fixes_the_run_and_progress_bar(capsys):
    params = dict(data=None, iterations=6, every=3)
    first, second = small_run(**params), small_run(**params)
    assert same_modules(first.generator, second.generator) and np.array_equal(first.fit, second.fit)
    other = small_run(seed=4, **params)
    assert not same_modules(first.generator, other.generator)
    small_run(progress=True, **params)
    assert "train_generator sinkhorn" in capsys.readouterr().err


class _Broken(Field):
    """A field that returns NaN from iteration ``bad`` on, or a velocity of the wrong shape."""

    name = "broken"

    def __init__(self, bad=3, shape=None, dim=2):
        self.calls, self.bad, self.shape, self.dim = 0, bad, shape, dim

    def velocity(self, t, x, state):
        self.calls += 1
        if self.shape is not None:
            return x[..., :self.shape]
        return -x if self.calls < self.bad else torch.full_like(x, math.nan)


def test_nonfinite_field_ends_training_with_a_status(tmp_path):
    result = train_generator(dict(hidden=8, depth=1), _Broken(bad=3), 2, iterations=10, batch=16, eval_batch=8,
                             every=5, out=tmp_path / "bad.h5", progress=False)
    assert result.status.code == "nonfinite" and result.status.step == 3 and not result.ok
    # What was recorded before the first bad iteration is kept, nothing after it.
    assert result.iterations == 2 and np.isfinite(result.fit).all() and list(result.steps) == [0]
    with measureflow.open(tmp_path / "bad.h5") as traj:
        assert list(traj.steps) == [0] and traj.status.code == "nonfinite"
        assert list(traj.observables["fit"].steps) == [1, 2]


def test_bad_inputs_are_refused_with_a_useful_message(tmp_path):
    field = measureflow.field("mmd", target=DATA, bandwidth=0.5)
    common = dict(iterations=2, batch=8, eval_batch=8, progress=False)
    with pytest.raises(ShapeError, match="generator outputs d = 3 but field 'mmd' has dimension d = 2"):
        train_generator(GeneratorMLP(2, 3, hidden=8), field, 2, **common)
    with pytest.raises(ShapeError, match=r"the latent sampler returned shape \(8, 2, 1\)"):
        train_generator(None, field, lambda n, g: torch.randn(n, 2, 1, generator=g), **common)
    with pytest.raises(ShapeError, match="z must have shape"):
        train_generator(GeneratorMLP(3, 2, hidden=8), field, 2, **common)
    with pytest.raises(ShapeError, match="generator mapped latents of shape"):
        train_generator(nn.Flatten(0), field, 2, **common)
    with pytest.raises(ShapeError, match="returned a velocity of shape"):
        train_generator(None, _Broken(shape=1), 2, data=DATA, **common)
    with pytest.raises(ShapeError, match="data has d = 3"):
        train_generator(None, field, 2, data=torch.zeros(5, 3), **common)
    with pytest.raises(ParameterError, match="mode must be one of 'direct', 'residual'"):
        train_generator(None, field, 2, mode="implicit", **common)
    with pytest.raises(ParameterError, match="step must be positive"):
        train_generator(None, field, 2, step=0.0, **common)
    with pytest.raises(ParameterError, match="iterations must be a positive integer"):
        train_generator(None, field, 2, iterations=0, batch=8)
    with pytest.raises(ParameterError, match="resume=True needs a checkpoint"):
        train_generator(None, field, 2, resume=True, **common)
    with pytest.raises(ParameterError, match="latent must be a latent dimension"):
        train_generator(None, field, "normal", **common)
    with pytest.raises(ParameterError, match="residual_model applies to mode='residual'"):
        train_generator(None, field, 2, residual_model={}, **common)
    with pytest.raises(ParameterError, match="output dimension is unknown"):
        train_generator(None, _Broken(dim=None), 2, **common)
    langevin = measureflow.field("kl", target=Gaussian(torch.zeros(2), torch.eye(2)))
    with pytest.raises(CapabilityError, match="noise term"):
        train_generator(None, langevin, 2, **common)

    class Late(_Broken):
        time_range = (0.0, 0.5)

    with pytest.raises(TimeRangeError, match=r"t in \[0, 1\]"):
        train_generator(GeneratorMLP(2, 2), Late(), 2, step=0.1, iterations=11, batch=8, eval_batch=8)
    ckpt = tmp_path / "other.ckpt"
    save_checkpoint(ckpt, {"format": "something else"})
    with pytest.raises(MeasureflowError, match="not a train_generator mmd checkpoint"):
        train_generator(None, field, 2, checkpoint=ckpt, resume=True, **common)
