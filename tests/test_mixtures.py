"""Gaussian-mixture state and variational inference by Wasserstein gradient flow (MATH.md §15.7, §3).

K = 1 toward a Gaussian: the unscented cubature is exact for the quadratic integrands, so the mixture
flow is §3's closure and RK4 (h = 1/400, global error ~1e-12) matches the closed form to 1e-10. A GMM
target equal to the state gives rates that vanish identically (∇log β − ∇log ρ = 0 pointwise), a fixed
point to rounding.
"""

from __future__ import annotations

import pytest
import torch

import measureflow
from measureflow import GaussianMixtures, Gaussians, Simulation, StateError, CapabilityError
from measureflow.measures import Empirical, Gaussian, GaussianMixture
from measureflow.mixtures import kl_divergence, use_expectation, Expectation

F64 = torch.float64
MB = torch.tensor([1.0, -0.5], dtype=F64)
SB = torch.tensor([[1.5, 0.4], [0.4, 0.7]], dtype=F64)
M0 = torch.tensor([-1.0, 2.0], dtype=F64)
C0 = torch.diag(torch.tensor([4.0, 0.25], dtype=F64))


def test_single_component_equals_the_kl_closure(tmp_path):
    field = measureflow.field("kl", target=Gaussian(MB, SB))
    start = GaussianMixtures(torch.ones(1, dtype=F64), M0[None], C0[None])
    path = tmp_path / "mix.h5"
    result = Simulation(start, field, "rk4", t1=0.5, steps=200, writers=["memory", path]).run()
    assert result.ok
    exact = field.solution(0.5, Gaussians(M0, C0))
    assert torch.allclose(result.state.means[:, 0], exact.mean, atol=1e-10, rtol=0)
    assert torch.allclose(result.state.covs[:, 0], exact.cov, atol=1e-10, rtol=0)
    # the mixture KL (cubature, exact here up to log Z = 0 for a normalised Gaussian) is the closed form
    same = Gaussians(result.state.means[:, 0], result.state.covs[:, 0])
    assert torch.allclose(field.energy(result.state), field.energy(same), atol=1e-12, rtol=0)
    with measureflow.open(path) as traj:
        assert traj.kind == "mixtures" and traj.size == 1
        assert traj.means.shape == (201, 1, 1, 2) and traj.covs.shape == (201, 1, 1, 2, 2)
        assert abs(traj.covs[-1] - result.covs[-1]).max() == 0.0
        assert abs(traj.mixture_weights[:] - 1.0).max() == 0.0
        fig = measureflow.plot.plot_run(traj, out=tmp_path / "mix.png")
        assert len([c for c in fig.axes[0].collections if c.get_gid() == "covariance_ellipses"]) == 1
    assert (tmp_path / "mix.png").stat().st_size > 0


def _target():
    w = torch.tensor([0.3, 0.7], dtype=F64)
    m = torch.tensor([[-2.0, 0.0], [1.0, 1.0]], dtype=F64)
    c = torch.stack([torch.eye(2, dtype=F64), torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=F64)])
    return w, m, c


@pytest.mark.parametrize("geometry", [{}, {"geometry": "wfr", "rate": 1.0}])
def test_target_with_the_same_components_is_a_fixed_point(geometry):
    w, m, c = _target()
    field = measureflow.field("kl", target=GaussianMixture(w, m, c), **geometry)
    out = Simulation(GaussianMixtures(w, m, c), field, "rk4", t1=1.0, steps=10).run().state
    assert torch.allclose(out.means, m, atol=1e-10, rtol=0)
    assert torch.allclose(out.covs, c, atol=1e-10, rtol=0)
    assert torch.allclose(out.weights, w, atol=1e-10, rtol=0)


def test_kl_decreases_toward_a_multimodal_target_and_fr_moves_the_weights():
    target = GaussianMixture(torch.tensor([0.5, 0.2, 0.3], dtype=F64),
                             torch.tensor([[-3.0, 0.0], [3.0, 1.0], [0.0, 3.0]], dtype=F64),
                             torch.stack([torch.eye(2, dtype=F64) * 0.7, torch.eye(2, dtype=F64),
                                          torch.tensor([[1.0, 0.4], [0.4, 0.6]], dtype=F64)]))
    start = GaussianMixtures(torch.full((3,), 1.0 / 3, dtype=F64),
                             torch.tensor([[-2.0, -0.5], [2.0, 0.0], [0.0, 2.0]], dtype=F64),
                             torch.eye(2, dtype=F64).expand(3, 2, 2))
    # Gauss–Hermite with 8 nodes per axis: exact to degree 15, so the KL estimate is accurate enough
    # for its monotone decrease to be seen at every frame
    fine = Expectation("gauss_hermite", order=8)
    field = use_expectation(measureflow.field("kl", target=target, geometry="wfr", rate=1.0), "gauss_hermite", order=8)
    result = Simulation(start, field, "rk4", t1=8.0, steps=80, writers=["memory"]).run()
    assert result.ok
    kls = [float(kl_divergence(field, GaussianMixtures(torch.as_tensor(w), torch.as_tensor(m), torch.as_tensor(c)),
                               fine)) for w, m, c in zip(result.mixture_weights, result.means, result.covs)]
    assert all(b <= a + 1e-12 for a, b in zip(kls, kls[1:]))
    assert kls[-1] < 1e-3 * kls[0]
    weights = torch.as_tensor(result.mixture_weights[-1][0])
    assert abs(weights.sum() - 1.0) < 1e-12
    # the components converge to the target's, and the Fisher–Rao part carries the weights along
    assert torch.allclose(weights, target.weights, atol=3e-3)


def test_mixture_errors():
    with pytest.raises(StateError, match="sum to one"):
        GaussianMixtures(torch.tensor([0.5, 0.6]), torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2))
    with pytest.raises(StateError, match="positive definite; component 1"):
        GaussianMixtures(torch.tensor([0.5, 0.5]), torch.zeros(2, 2), torch.stack([torch.eye(2), -torch.eye(2)]))
    with pytest.raises(StateError, match="symmetric"):
        GaussianMixtures(torch.ones(1), torch.zeros(1, 2), torch.tensor([[[1.0, 0.5], [0.0, 1.0]]]))
    with pytest.raises(measureflow.ShapeError, match=r"\(R, K, d, d\)"):
        GaussianMixtures(torch.ones(1), torch.zeros(1, 2), torch.eye(3)[None])
    state = GaussianMixtures(torch.ones(1), torch.zeros(1, 2), torch.eye(2)[None])
    with pytest.raises(CapabilityError, match="cannot move a GaussianMixtures state"):
        Simulation(state, measureflow.field("w2", target=Gaussian(torch.zeros(2), torch.eye(2))), "rk4")
    with pytest.raises(CapabilityError, match="has no density"):
        Simulation(state, measureflow.field("kl", target=Empirical(torch.randn(10, 2)), epsilon=0.1), "rk4")


def test_pure_fisher_rao_moves_only_the_weights_to_the_targets():
    w, m, c = _target()
    field = use_expectation(measureflow.field("kl", target=GaussianMixture(w, m, c), geometry="fisher_rao", rate=2.0),
                            "gauss_hermite", order=8)
    start = GaussianMixtures(torch.tensor([0.8, 0.2], dtype=F64), m, c)
    out = Simulation(start, field, "rk4", t1=6.0, steps=60).run().state
    assert torch.equal(out.means[0], m) and torch.equal(out.covs[0], c)
    # the overlap of the two components slows the relaxation a little; at αt = 12 it is long done
    assert torch.allclose(out.weights[0], w, atol=1e-4)
    assert abs(float(out.weights.sum()) - 1.0) < 1e-12


def test_seeded_sample_expectations_are_reproducible_and_close():
    field = use_expectation(measureflow.field("kl", target=Gaussian(MB, SB)), "samples", samples=4000, seed=3)
    start = GaussianMixtures(torch.ones(1, dtype=F64), M0[None], C0[None])
    runs = [Simulation(start, field, "rk4", t1=0.5, steps=20).run().state for _ in range(2)]
    assert torch.equal(runs[0].covs, runs[1].covs)  # the draws are fixed: an ODE, run twice the same
    exact = measureflow.field("kl", target=Gaussian(MB, SB)).solution(0.5, Gaussians(M0, C0))
    # Monte Carlo with 4000 fixed draws: relative error of second moments ~ √(2/4000) ≈ 2 %
    assert torch.allclose(runs[0].covs[:, 0], exact.cov, rtol=0.06, atol=0.02)
