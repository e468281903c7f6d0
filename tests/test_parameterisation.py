"""Velocity, score, x̂₀ and ε̂ parameterisations and their conversions (MATH.md §15.2); models of
each kind trained and used as fields."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import measureflow
from measureflow.errors import ParameterError
from measureflow.measures import Gaussian, GaussianMixture
from measureflow.parameterisation import PREDICTIONS, check_prediction, convert
from measureflow.schedules import get
from measureflow.training import load_model, save_model, train_velocity

F64 = torch.float64
SIGMA = 1.5
# schedule name, parameters, interior times (away from a = 0 and b = 0)
SCHEDULES = [
    ("linear", {}, (0.2, 0.5, 0.8)),
    ("cosine", {}, (0.2, 0.5, 0.8)),
    ("overshoot", {}, (0.2, 0.4, 0.8)),
    ("vp", {}, (0.3, 1.0, 2.5)),
    ("lipman", {"sigma_min": 0.01}, (0.1, 0.5, 0.8)),
]


def data_mixture():
    means = torch.tensor([[1.0, -0.5], [-1.0, 1.0], [0.3, 0.4]], dtype=F64)
    covs = torch.stack([torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=F64), 0.2 * torch.eye(2, dtype=F64),
                        torch.tensor([[0.4, -0.1], [-0.1, 0.6]], dtype=F64)])
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2], dtype=F64), means, covs)


@pytest.mark.parametrize("name, params, times", SCHEDULES, ids=[s[0] for s in SCHEDULES])
def test_conversions_between_the_four_parameterisations_are_exact(name, params, times):
    schedule = get(name, **params)
    field = measureflow.field("flow_matching", data=data_mixture(), sigma=SIGMA, schedule=schedule)
    z = 1.3 * torch.randn(1, 64, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    for t in times:
        exact = {
            "velocity": field.velocity(t, z),
            "score": field.score(t, z),
            "x0": field.posterior_mean(t, z),
            "noise": field.noise_prediction(t, z),
        }
        for source, target in itertools.product(PREDICTIONS, PREDICTIONS):
            out = convert(exact[source], z, t, source=source, target=target, schedule=schedule, sigma=SIGMA)
            torch.testing.assert_close(out, exact[target], rtol=0, atol=1e-12, msg=f"{source} → {target} at t = {t}")


def test_conversions_take_one_time_per_point():
    schedule = get("cosine")
    z = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=F64)
    score = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    v = convert(score, z, t, source="score", target="velocity", schedule=schedule)
    for i in range(5):
        torch.testing.assert_close(v[i], convert(score[i], z[i], float(t[i]), source="score", target="velocity",
                                                 schedule=schedule), rtol=0, atol=1e-14)
    # the book's linear form: v = −(z + tσ²s)/(1 − t) (MATH.md §1.2)
    lin = convert(score, z, 0.3, source="score", target="velocity", schedule=get("linear"), sigma=2.0)
    torch.testing.assert_close(lin, -(z + 0.3 * 4.0 * score) / 0.7, rtol=0, atol=1e-14)


def test_unknown_prediction_lists_the_valid_ones():
    with pytest.raises(ParameterError, match="'velocity', 'score', 'x0', 'noise'"):
        check_prediction("epsilon")
    with pytest.raises(ParameterError, match="unknown prediction type 'v'"):
        train_velocity(Gaussian(torch.zeros(1), torch.eye(1)), Gaussian(torch.zeros(1), torch.eye(1)), steps=1,
                       prediction="v", progress=False)


def test_non_velocity_models_need_a_noise_target_of_the_given_sigma():
    data = Gaussian(torch.zeros(1), torch.eye(1))
    with pytest.raises(ParameterError, match="N\\(0, σ²I\\)"):
        train_velocity(data, Gaussian(torch.ones(1), torch.eye(1)), steps=1, prediction="score", progress=False)


@pytest.mark.slow
def test_denoising_score_matching_learns_the_score_of_a_1d_mixture():
    """DSM (|bσ s_θ + X₁/σ|², MATH.md §15.2) on a two-component 1-D GMM, linear path, noise N(0, 1):
    relative L²(ρₜ) error of the learned score against the exact mixture score below 5 % at
    t ∈ {0.2, 0.5, 0.8}. Measured 4.5 %, 2.0 %, 0.8 % (float32, 5000 steps of 512); the error at small
    t shrinks with training (15 % after 2000 steps), and 2·10⁴ evaluation points put its Monte-Carlo
    spread well under 0.5 %."""
    weights, means, variances = [0.4, 0.6], [[-1.2], [1.0]], [[[0.16]], [[0.36]]]
    data = GaussianMixture(torch.tensor(weights), torch.tensor(means), torch.tensor(variances))
    noise = Gaussian(torch.zeros(1), torch.eye(1))
    steps = 5000
    result = train_velocity(data, noise, "linear", prediction="score", steps=steps, batch_size=512, lr=1e-2, seed=0,
                            dtype=torch.float32, t_range=(0.1, 0.9),
                            model={"hidden": 128, "depth": 3, "time_frequencies": 8}, progress=False,
                            lr_scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=steps))
    learned = measureflow.field("learned", model=result)
    exact = measureflow.field("flow_matching", sigma=1.0, data=GaussianMixture(
        torch.tensor(weights, dtype=F64), torch.tensor(means, dtype=F64), torch.tensor(variances, dtype=F64)))
    g = torch.Generator().manual_seed(5)
    for t in (0.2, 0.5, 0.8):
        x = exact.marginal(t).sample(20_000, g)
        s = exact.score(t, x)
        s_hat = learned.marginal_score(t, x.float()).double()
        assert float((s_hat - s).square().mean().sqrt() / s.square().mean().sqrt()) < 0.05, t


@pytest.fixture(scope="module")
def small_models():
    """A model of every kind on the linear path from 2-D Gaussian data to N(0, I) (60 steps: these
    tests check the plumbing, not the fit)."""
    data = Gaussian(torch.tensor([1.0, -1.0]), torch.tensor([[0.5, 0.1], [0.1, 0.3]]))
    noise = Gaussian(torch.zeros(2), torch.eye(2))
    return {p: train_velocity(data, noise, "linear", prediction=p, steps=60, batch_size=64, seed=1,
                              model={"hidden": 16, "depth": 2}, progress=False) for p in PREDICTIONS}


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_a_learned_model_of_any_kind_is_a_velocity_field_and_a_score(small_models, prediction, tmp_path):
    result = small_models[prediction]
    assert result.config.get("prediction", "velocity") == prediction
    # score and noise predictions give no velocity where a = 0 (t = 1 on the linear path): stop short of it
    field = measureflow.field("learned", model=result, time_range=(0.0, 0.99))
    assert field.prediction == prediction
    x = torch.randn(1, 10, 2, generator=torch.Generator().manual_seed(0))
    raw = field.predict(0.4, x)
    for kind in PREDICTIONS:
        expected = convert(raw, x, 0.4, source=prediction, target=kind, schedule=get("linear"))
        torch.testing.assert_close(field.as_prediction(kind, 0.4, x), expected, rtol=0, atol=0)
    torch.testing.assert_close(field.velocity(0.4, x, None), field.as_prediction("velocity", 0.4, x), rtol=0, atol=0)
    torch.testing.assert_close(field.marginal_score(0.4, x), field.as_prediction("score", 0.4, x), rtol=0, atol=0)
    # the file keeps what the network predicts and on which path
    path = save_model(result.model, tmp_path / "model.pt")
    again = measureflow.field("learned", path=path, time_range=(0.0, 0.99))
    assert (again.prediction, again.schedule.name, again.sigma) == (prediction, "linear", 1.0)
    torch.testing.assert_close(again.velocity(0.4, x, None), field.velocity(0.4, x, None), rtol=0, atol=0)
    # and flow_sde finds the score by itself: a stochastic sampler from the noise end
    sde = measureflow.field("flow_sde", flow=field, noise=1.0, direction="reverse")
    state = measureflow.Particles(torch.randn(1, 50, 2, generator=torch.Generator().manual_seed(2)))
    out = measureflow.Simulation(state, sde, "sra", 0.0, 0.8, steps=8, seed=0, progress=False).run()
    assert out.status.ok and bool(torch.isfinite(out.state.x).all())
    if prediction in ("score", "noise"):
        with pytest.raises(measureflow.errors.TimeRangeError, match="singular at t = 1"):
            measureflow.field("learned", model=result).check_time(1.0)


def test_a_network_predicting_a_score_needs_its_path():
    model = load_model_like_velocity_mlp()
    with pytest.raises(ParameterError, match="needs its path"):
        measureflow.field("learned", model=model, prediction="score")
    with pytest.raises(ParameterError, match="valid ones are"):
        measureflow.field("learned", model=model, prediction="eps", schedule="linear")
    plain = measureflow.field("learned", model=model)  # a velocity on an unknown path: no score
    assert plain.marginal_score is None
    with pytest.raises(ParameterError, match="needs the score"):
        measureflow.field("flow_sde", flow=plain, noise=0.5)


def load_model_like_velocity_mlp():
    from measureflow.training import VelocityMLP

    return VelocityMLP(2, hidden=8, depth=1)
