import pytest
import torch

from measureflow import Gaussians, Particles, ShapeError, StateError
from measureflow.state import state_from_tensors, state_kind


def test_particles_shapes_and_uniform_weights():
    x = torch.randn(3, 5, 2)
    p = Particles(x)
    assert (p.replicas, p.size, p.dim) == (3, 5, 2)
    w = p.weights_or_uniform()
    assert w.shape == (3, 5) and torch.allclose(w.sum(1), torch.ones(3))
    assert Particles(torch.randn(5, 2)).replicas == 1  # (N, d) is one replica


def test_weighted_moments_match_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 50, 3, generator=g, dtype=torch.float64)
    w = torch.rand(2, 50, generator=g, dtype=torch.float64)
    w = w / w.sum(1, keepdim=True)
    p = Particles(x, w)
    for r in range(2):
        m = (w[r, :, None] * x[r]).sum(0)
        c = ((x[r] - m).T * w[r]) @ (x[r] - m)
        assert torch.allclose(p.mean()[r], m) and torch.allclose(p.covariance()[r], c)


@pytest.mark.parametrize(
    "x, weights, error, words",
    [
        (torch.randn(2, 3, 4, 5), None, ShapeError, "(R, N, d)"),
        (torch.randn(2, 4, 3), torch.full((2, 5), 0.2), ShapeError, "(2, 4)"),
        (torch.randn(2, 4, 3), torch.full((2, 4), 0.3), StateError, "sum to one"),
        (torch.randn(1, 2, 3), torch.tensor([[1.5, -0.5]]), StateError, "non-negative"),
        (torch.zeros(1, 3, 2, dtype=torch.int64), None, StateError, "floating-point"),
    ],
)
def test_particles_bad_input_names_the_problem(x, weights, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        Particles(x, weights)


def test_gaussians_validation():
    g = Gaussians(torch.zeros(2), torch.eye(2))
    assert g.mean.shape == (1, 2) and g.cov.shape == (1, 2, 2)
    with pytest.raises(StateError, match="positive definite"):
        Gaussians(torch.zeros(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(StateError, match="symmetric"):
        Gaussians(torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ShapeError, match="match mean"):
        Gaussians(torch.zeros(3), torch.eye(2))
    with pytest.raises(StateError, match="dtype"):
        Gaussians(torch.zeros(2, dtype=torch.float64), torch.eye(2))


def test_mixed_devices_are_refused_before_any_copy():
    # The "meta" device stands in for a second device on CPU-only machines: any copy from it fails,
    # so reaching the message proves the check ran first.
    with pytest.raises(StateError, match="weights is on meta but x is on cpu"):
        Particles(torch.zeros(1, 3, 2), torch.full((1, 3), 1 / 3, device="meta"))
    with pytest.raises(StateError, match="cov is on meta"):
        Gaussians(torch.zeros(2), torch.eye(2, device="meta"))


def test_gaussian_sampling_is_reproducible_and_has_the_right_moments():
    cov = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    g = Gaussians(torch.tensor([1.0, -1.0], dtype=torch.float64), cov)
    a = g.sample(20000, torch.Generator().manual_seed(3))
    b = g.sample(20000, torch.Generator().manual_seed(3))
    assert torch.equal(a.x, b.x)
    # Standard error of a sample covariance entry is about sqrt(2/n)·|Σ| ≈ 0.02; 5 s.e. bound.
    assert torch.allclose(a.covariance()[0], cov, atol=0.1)
    assert torch.allclose(a.mean()[0], g.mean[0], atol=0.05)


def test_state_round_trip_through_tensors():
    p = Particles(torch.randn(2, 4, 3), torch.full((2, 4), 0.25))
    q = state_from_tensors(state_kind(p), p.tensors())
    assert torch.equal(p.x, q.x) and torch.equal(p.weights, q.weights)
    g = Gaussians(torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2))
    assert state_kind(state_from_tensors("gaussians", g.tensors())) == "gaussians"
    with pytest.raises(StateError):
        state_kind(torch.zeros(3))
