import math

import pytest
import torch

import measureflow
from measureflow import CapabilityError, Field, Gaussians, Particles, TimeRangeError
from measureflow.fields import capabilities, check_compatible


class Shift(Field):
    name = "shift"

    def __init__(self, c):
        self.c = c

    def velocity(self, t, x, state):
        return torch.full_like(x, self.c)

    def affine(self, t, state):
        return torch.full_like(state.mean, self.c), torch.zeros_like(state.cov)

    def energy(self, state):
        return torch.full((state.replicas,), self.c)


class Local(Field):
    name = "local"
    time_range = (0.0, 1.0)

    def velocity(self, t, x, state):
        return -x


class Noisy(Field):
    name = "noisy"

    def velocity(self, t, x, state):
        return torch.zeros_like(x)

    def diffusion(self, t):
        return 2.0


def test_capabilities_are_detected_from_overrides():
    assert capabilities(Shift(1.0)) == {"velocity", "affine", "energy"}
    assert capabilities(Local()) == {"velocity"}
    assert capabilities(Noisy()) == {"velocity", "diffusion"}


def test_sum_and_scale_compose_every_part():
    p = Particles(torch.randn(1, 4, 2))
    g = Gaussians(torch.zeros(2), torch.eye(2))
    f = Shift(1.0) + 3 * Shift(2.0)
    assert torch.allclose(f.velocity(0.0, p.x, p), torch.full_like(p.x, 7.0))
    b, A = f.affine(0.0, g)
    assert torch.allclose(b, torch.full_like(b, 7.0))
    assert torch.allclose(f.energy(g), torch.tensor([7.0]))
    h = Shift(1.0) - Shift(1.0)
    assert torch.allclose(h.velocity(0.0, p.x, p), torch.zeros_like(p.x))
    mixed = Shift(1.0) + Local()
    assert "affine" not in mixed.capabilities
    with pytest.raises(CapabilityError, match="local"):
        mixed.affine(0.0, g)


def test_noise_adds_in_quadrature_and_scales_as_a_time_change():
    f = Noisy() + Noisy()
    assert math.isclose(f.diffusion(0.0), math.sqrt(8.0))
    assert math.isclose((4 * Noisy()).diffusion(0.0), 4.0)  # √4 · 2
    with pytest.raises(CapabilityError, match="negative"):
        -1 * Noisy()


def test_from_potential_is_minus_the_gradient():
    def U(t, x, state):
        return 0.5 * (x**2).sum(-1) + x[..., 0]

    f = measureflow.from_potential(U, name="quadratic")
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    v = f.velocity(0.0, x, Particles(x))
    expected = -x.clone()
    expected[..., 0] -= 1.0
    assert torch.allclose(v, expected)
    bad = measureflow.from_potential(lambda t, x, s: x.sum())
    with pytest.raises(measureflow.ShapeError, match="one value per point"):
        bad.velocity(0.0, x, Particles(x))


def test_assembly_refuses_what_cannot_run():
    g = Gaussians(torch.zeros(2), torch.eye(2))
    with pytest.raises(CapabilityError, match="no Gaussian closure"):
        check_compatible(Local(), g)
    p = Particles(torch.randn(1, 3, 2))
    with pytest.raises(CapabilityError, match="euler_maruyama"):
        check_compatible(Noisy(), p, stochastic_integrator=False)
    check_compatible(Noisy(), p, stochastic_integrator=True)


def test_time_range_errors_name_the_safe_range():
    with pytest.raises(TimeRangeError, match=r"\[0, 1\]"):
        Local().check_time(1.5)
    Local().check_time(1.0)
