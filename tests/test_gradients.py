"""Gradients through a run, backprop and continuous adjoint (MATH.md §15.5)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

import measureflow
from measureflow import Gaussians, Particles, Simulation
from measureflow.errors import CapabilityError, MeasureflowError

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
A0 = np.array([[-0.5, -2.0], [1.0, -0.5]])  # README's A
M0 = np.array([2.0, -1.0])
T = 1.0


def closed_form():
    """L = |e^{AT} m0|²: ∂L/∂A = 2T·L_exp((AT)ᵀ, m(T)m0ᵀ), ∂L/∂m0 = 2 e^{ATᵀ} m(T)."""
    E = scipy.linalg.expm(A0 * T)
    mT = E @ M0
    dA = 2 * T * scipy.linalg.expm_frechet((A0 * T).T, np.outer(mT, M0), compute_expm=False)
    return dA, 2 * E.T @ mT


def test_closed_form_against_central_differences():
    # The reference itself (MATH.md §15.5 checked it to 3e-10 by central differences).
    dA, _ = closed_form()
    h = 1e-6
    fd = np.zeros((2, 2))
    for i in range(2):
        for j in range(2):
            P = np.zeros((2, 2))
            P[i, j] = h
            up, down = scipy.linalg.expm((A0 + P) * T) @ M0, scipy.linalg.expm((A0 - P) * T) @ M0
            fd[i, j] = (up @ up - down @ down) / (2 * h)
    assert np.allclose(fd, dA, rtol=0, atol=1e-8)


def solvers():
    return {
        # RK4 at h = 0.005: global error ~h⁴ ≈ 1e-10 in m(T) and in its derivatives.
        "rk4": ("rk4", 200),
        "dopri5": (measureflow.integrator("dopri5", rtol=1e-11, atol=1e-11), 4),
    }


@pytest.mark.parametrize("mode", ["backprop", "adjoint"])
@pytest.mark.parametrize("solver", ["rk4", "dopri5"])
def test_gradient_of_a_terminal_loss_matches_the_frechet_derivative(mode, solver):
    integrator, steps = solvers()[solver]
    A = torch.tensor(A0, requires_grad=True)
    x0 = torch.tensor(M0)[None, None].clone().requires_grad_(True)  # one particle follows the mean exactly
    result = Simulation(Particles(x0), measureflow.field("linear", A=A), integrator, t1=T, steps=steps,
                        gradient=mode, progress=False).run()
    loss = (result.state.x ** 2).sum()
    gA, gx = torch.autograd.grad(loss, (A, x0))
    dA, dx = closed_form()
    assert np.allclose(gA.numpy(), dA, rtol=0, atol=1e-8)
    assert np.allclose(gx.numpy()[0, 0], dx, rtol=0, atol=1e-8)


def test_backprop_through_a_gaussian_state():
    A = torch.tensor(A0, requires_grad=True)
    start = Gaussians(torch.tensor(M0), torch.eye(2, dtype=F64))
    result = Simulation(start, measureflow.field("linear", A=A), "rk4", t1=T, steps=200, gradient="backprop",
                        progress=False).run()
    (gA,) = torch.autograd.grad((result.state.mean ** 2).sum(), A)
    assert np.allclose(gA.numpy(), closed_form()[0], rtol=0, atol=1e-8)


def attention_run(mode, integrator, steps=40):
    g = torch.Generator().manual_seed(0)
    Q0, K0, V0 = (0.5 * torch.randn(2, 2, generator=g, dtype=F64) for _ in range(3))
    x = torch.randn(1, 24, 2, generator=g, dtype=F64)
    Q, K, V = (m.clone().requires_grad_(True) for m in (Q0, K0, V0))
    x0 = x.clone().requires_grad_(True)
    field = measureflow.field("attention", Q=Q, K=K, V=V)
    result = Simulation(Particles(x0), field, integrator, t1=1.0, steps=steps, gradient=mode, progress=False).run()
    loss = (result.state.x ** 2).sum() + result.state.x[..., 0].sum()
    return torch.autograd.grad(loss, (Q, K, V, x0))


def test_adjoint_and_backprop_agree_for_attention_parameters():
    # Backprop differentiates the RK4 solution exactly; the adjoint integrates the continuous adjoint
    # with the same RK4 steps: they differ by the solver's error, O(h⁴) ≈ 1e-7 relative at h = 1/40.
    back = attention_run("backprop", "rk4")
    adj = attention_run("adjoint", "rk4")
    for name, a, b in zip("QKVx", back, adj):
        assert float(a.abs().max()) > 1e-2, name  # a real gradient
        assert torch.allclose(a, b, rtol=0, atol=1e-6 * float(a.abs().max())), name


def test_adjoint_memory_holds_step_times_only():
    # The adjoint keeps the forward's step boundaries (host floats) and no tensor per step.
    A = torch.tensor(A0, requires_grad=True)
    sim = Simulation(Particles(torch.tensor(M0)[None, None]), measureflow.field("linear", A=A), "rk4", t1=T,
                     steps=50, gradient="adjoint", progress=False)
    result = sim.run()
    node = result.state.x.grad_fn
    plan = node.plan if hasattr(node, "plan") else None
    assert plan is not None and len(plan.steps) == 50
    assert all(isinstance(t, float) for step in plan.steps for t in step)


def test_no_gradient_keyword_leaves_runs_as_before():
    A = torch.tensor(A0)
    result = Simulation(Particles(torch.tensor(M0)[None, None]), measureflow.field("linear", A=A), "rk4", t1=T,
                        steps=10, progress=False).run()
    assert not result.state.x.requires_grad


# -- bad input ----------------------------------------------------------------------------------------------
def test_gradient_through_exact_ot_is_refused_naming_the_field():
    target = torch.randn(1, 8, 2, dtype=F64)
    field = measureflow.field("w2", target=target)
    x = torch.randn(1, 8, 2, dtype=F64)
    with pytest.raises(CapabilityError, match="field 'w2' is not differentiable"):
        Simulation(Particles(x), field, "rk4", steps=2, gradient="backprop")


def test_unknown_gradient_mode_and_adjoint_limits():
    x = Particles(torch.tensor(M0)[None, None])
    field = measureflow.field("linear", A=torch.tensor(A0))
    with pytest.raises(MeasureflowError, match="gradient must be one of"):
        Simulation(x, field, "rk4", steps=2, gradient="reverse")
    with pytest.raises(CapabilityError, match="Gaussians state use gradient='backprop'"):
        Simulation(Gaussians(torch.tensor(M0), torch.eye(2, dtype=F64)), field, "rk4", steps=2, gradient="adjoint")
    with pytest.raises(CapabilityError, match="log_density"):
        Simulation(x, field, "rk4", steps=2, gradient="adjoint", log_density="exact")


def test_backprop_through_the_log_density_channel():
    # log ρ_T(x_T) = log ρ_0(x_0) − T·tr A, so ∂/∂A of the channel summed over N particles is −N·T·I; the
    # field hides its declared divergence, so the gradient flows through the autograd trace.
    class Opaque(measureflow.Field):
        name = "opaque"

        def __init__(self, inner):
            self.inner = inner

        def velocity(self, t, x, state):
            return self.inner.velocity(t, x, state)

        def trainable(self):
            return self.inner.trainable()

    A = torch.tensor(A0, requires_grad=True)
    x = torch.randn(1, 5, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    result = Simulation(Particles(x), Opaque(measureflow.field("linear", A=A)), "rk4", t1=T, steps=10,
                        gradient="backprop", log_density="exact", progress=False).run()
    (gA,) = torch.autograd.grad(result.state.log_density.sum(), A)
    assert torch.allclose(gA, -5 * T * torch.eye(2, dtype=F64), rtol=0, atol=1e-12)


def test_backprop_through_the_hutchinson_channel():
    # Rademacher probes: εᵀAε has ∂/∂Aᵢᵢ = εᵢ² = 1 whatever the draw, so the diagonal of ∂/∂A of the channel
    # summed over N particles is −N·T exactly (rk4 integrates the constant rate exactly); the single probe's
    # vector–Jacobian pass must keep the graph that the backward pass through the run still needs.
    class Opaque(measureflow.Field):
        name = "opaque"

        def __init__(self, inner):
            self.inner = inner

        def velocity(self, t, x, state):
            return self.inner.velocity(t, x, state)

        def trainable(self):
            return self.inner.trainable()

    A = torch.tensor(A0, requires_grad=True)
    x = torch.randn(1, 5, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    def run(**kw):
        return Simulation(Particles(x), Opaque(measureflow.field("linear", A=A)), "rk4", t1=T, steps=10,
                          gradient="backprop", progress=False, **kw).run().state

    end = run(log_density="hutchinson")
    # A loss on both the positions and the channel: the positions' backward pass crosses the field's graph
    # after the probe's pass has been taken through it.
    (g_both,) = torch.autograd.grad(end.log_density.sum() + (end.x ** 2).sum(), A)
    (g_x,) = torch.autograd.grad((run().x ** 2).sum(), A)
    assert torch.allclose(torch.diagonal(g_both - g_x), torch.full((2,), -5 * T, dtype=F64), rtol=0, atol=1e-10)


def test_adjoint_reaches_a_depth_dependent_attention_table():
    # θ(t) as a layer table (pieces of the run): the adjoint rebuilds each layer with its graph to the table.
    g = torch.Generator().manual_seed(3)
    table = [0.3 * torch.randn(3, 2, 2, generator=g, dtype=F64) for _ in range(3)]
    x = torch.randn(1, 20, 2, generator=g, dtype=F64)
    grads = {}
    for mode in ("backprop", "adjoint"):
        Q, K, V = (m.clone().requires_grad_(True) for m in table)
        field = measureflow.field("attention", Q=Q, K=K, V=V, layer_times=[0.0, 1 / 3, 2 / 3])
        end = Simulation(Particles(x), field, "rk4", t1=1.0, steps=12, gradient=mode, progress=False).run()
        grads[mode] = torch.autograd.grad((end.state.x ** 2).sum(), (Q, K, V))
    for a, b in zip(grads["backprop"], grads["adjoint"]):
        assert float(a.abs().max()) > 1e-3
        assert torch.allclose(a, b, rtol=0, atol=1e-6 * float(a.abs().max()))
