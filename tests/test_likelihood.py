"""measureflow.likelihood: log p(x) and bits per dimension under a flow (MATH.md §15.1)."""

from __future__ import annotations

import math

import pytest
import scipy.linalg
import torch
from torch import nn

import measureflow
from measureflow.measures import GaussianMixture

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


def mixture():
    return GaussianMixture(
        torch.tensor([0.5, 0.3, 0.2], dtype=F64),
        torch.tensor([[2.0, 0.0], [-1.0, 1.5], [-1.0, -1.5]], dtype=F64),
        torch.tensor([[[0.3, 0.1], [0.1, 0.2]], [[0.2, 0.0], [0.0, 0.4]], [[0.25, -0.05], [-0.05, 0.15]]], dtype=F64),
    )


def test_exact_flow_matching_likelihood_is_the_data_log_pdf():
    # The exact field between a GMM (with covariances) and N(0, σ²I) transports the data law itself to the
    # noise, so log N(x₁; 0, σ²I) + ∫∇·v dt = log p_data(x) up to the solver tolerance (dopri5 at 1e-9).
    data = mixture()
    field = measureflow.field("flow_matching", data=data, sigma=1.5)
    x = data.sample(40, torch.Generator().manual_seed(0))
    result = measureflow.likelihood(field, x, integrator=measureflow.integrator("dopri5", rtol=1e-9, atol=1e-9),
                                    batch_size=16)
    assert result.log_prob.shape == (40,) and result.t0 == 0.0 and result.t1 == 1.0
    assert torch.allclose(result.log_prob, data.log_density(x), rtol=0, atol=1e-6)
    assert torch.allclose(result.bits_per_dim, -data.log_density(x) / (2 * math.log(2)), rtol=0, atol=1e-6)
    assert abs(result.mean_bits_per_dim - float(result.bits_per_dim.mean())) == 0


class LinearNet(nn.Module):
    """v(x, t) = W x: a 'learned' network whose flow map is e^{tW}."""

    def __init__(self, W):
        super().__init__()
        self.W = nn.Parameter(W.clone())

    def forward(self, x, t):
        return x @ self.W.T


def test_learned_field_likelihood_by_hutchinson_and_exact_trace():
    # log p(x) = log N(e^W x; 0, I) + tr W for the learned linear net; the exact trace is exact up to RK4's
    # error in x₁ (h = 0.05: ~1e-7); Hutchinson with Rademacher probes is exact for the diagonal part and
    # unbiased for the rest: its mean over 400 points lies within 3 standard errors.
    W = torch.tensor([[-0.3, 0.8], [-0.4, 0.2]], dtype=F64)
    field = measureflow.field("learned", model=LinearNet(W).to(F64))
    x = torch.randn(400, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    x1 = x @ torch.tensor(scipy.linalg.expm(W.numpy())).T
    expected = -0.5 * (x1 * x1).sum(-1) - math.log(2 * math.pi) + float(torch.trace(W))
    exact = measureflow.likelihood(field, x, integrator="rk4", steps=20)
    assert torch.allclose(exact.log_prob, expected, rtol=0, atol=1e-6)
    est = measureflow.likelihood(field, x, integrator="rk4", steps=20, log_density="hutchinson", batch_size=100)
    err = est.log_prob - expected
    assert float(err.std()) > 0
    assert abs(float(err.mean())) <= 3 * float(err.std()) / math.sqrt(len(err))


def test_bad_likelihood_input():
    field = measureflow.field("flow_matching", data=mixture(), sigma=1.0)
    with pytest.raises(measureflow.ShapeError, match=r"\(n, d\)"):
        measureflow.likelihood(field, torch.zeros(1, 3, 2, dtype=F64))
    with pytest.raises(measureflow.MeasureflowError, match="log_density"):
        measureflow.likelihood(field, torch.zeros(3, 2, dtype=F64), noise=object())


def test_likelihood_on_the_command_line(tmp_path, capsys):
    # A saved network on the CLI gives the per-point log p of the library call on the same field.
    import numpy as np

    from measureflow import training
    from measureflow.cli import main

    model = training.VelocityMLP(2, hidden=16, depth=2, dtype=F64, generator=torch.Generator().manual_seed(0))
    training.save_model(model, tmp_path / "m.pt")
    x = torch.randn(40, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    np.save(tmp_path / "x.npy", x.numpy())
    code = main(["likelihood", str(tmp_path / "m.pt"), str(tmp_path / "x.npy"), "--integrator", "rk4",
                 "--steps", "10", "--no-progress", "-o", str(tmp_path / "logp.npy")])
    assert code == 0 and "bits per dimension" in capsys.readouterr().out
    field = measureflow.field("learned", path=tmp_path / "m.pt")
    expected = measureflow.likelihood(field, x, integrator="rk4", steps=10).log_prob
    assert np.allclose(np.load(tmp_path / "logp.npy"), expected.numpy(), rtol=0, atol=1e-10)
