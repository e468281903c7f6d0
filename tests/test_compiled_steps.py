"""Compiled steps: ``Simulation(compile=True)`` and ``train_velocity(compile=True)`` against eager.

A compiled step runs the same operations as an eager one; inductor may fuse and reorder the
elementwise sums (y + h Σ bᵢkᵢ in one loop, FMA contraction), so results agree to a few units in the
last place per step, not bit for bit. The tolerances below are that: float64, |x| ≲ 5 after ≤ 20
steps of a few roundings each: ≲ 20 · 4 · 5 · 2⁻⁵³ ≈ 5e-14, tested at 1e-12; float32: the same
count of float32 roundings (2⁻²⁴ ≈ 6e-8 relative) gives ≲ 2e-5 at worst and about 1e-6 in
practice (errors of opposite signs cancel), tested at 1e-5.
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch

import measureflow
from measureflow import Particles, Simulation
from measureflow.errors import ParameterError
from measureflow.integrators import compile_available
from measureflow.measures import Gaussian
from measureflow.run import Callback
from measureflow.triggers import Periodic
from measureflow.training import VelocityMLP, train_velocity

pytestmark = pytest.mark.skipif(
    not compile_available() or not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
    reason="torch.compile (with a C++ compiler for CPU inductor) is unavailable here",
)


@pytest.fixture
def tracing_only(monkeypatch):
    """Compile with the aot_eager backend: the same tracing, guards and recompiles as inductor without
    generating code (seconds less per compile), for the tests that check the step's logic."""
    from measureflow.integrators import compiled as steps
    from measureflow.training import compiled as training

    monkeypatch.setattr(steps, "backend", "aot_eager")
    monkeypatch.setattr(training, "backend", "aot_eager")


@pytest.fixture
def short_chunks(monkeypatch):
    """Chunks of at most 2 steps: the inductor tests check the generated code of a chunk (the same
    per-step arithmetic at any length) without paying the compile of an 8-step graph (several single steps' compile)."""
    from measureflow.integrators import compiled as steps

    monkeypatch.setattr(steps, "max_steps_at_once", 2)


def _counters():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _net(dtype):
    return VelocityMLP(2, hidden=16, depth=2, generator=torch.Generator().manual_seed(3)).to(dtype)


def _x0(dtype, n=64):
    return torch.randn(1, n, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype)


def _run(field, x0, compile, method="rk4", steps=20, **kw):
    return Simulation(Particles(x0), field, method, 0.0, 1.0, steps=steps, progress=False, compile=compile,
                      **kw).run()


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_compiled_rk4_equals_eager_on_a_learned_field(dtype, tol, short_chunks):
    field = measureflow.field("learned", model=_net(dtype))
    x0 = _x0(dtype)
    compiled, eager = _run(field, x0, True), _run(field, x0, False)  # 10 chunks of 2 steps
    assert compiled.ok and compiled.state.x.dtype == dtype
    assert float((compiled.state.x - eager.state.x).abs().max()) <= tol
    # one step at a time (a check due at every step): the same per-step arithmetic as in a chunk
    single = _run(field, x0, True, check_every=1)
    assert float((compiled.state.x - single.state.x).abs().max()) <= tol
    assert compiled.integrator_stats == eager.integrator_stats == {"nfev": 80, "steps": 20, "accepted": 20,
                                                                   "rejected": 0}


def test_compiled_rk4_on_the_linear_field_matches_eager_and_the_exact_flow(short_chunks):
    # v(x) = A x: x(1) = exp(A) x(0) (MATH.md §0, linear fields).
    A = torch.tensor([[-0.5, 1.0], [-1.0, -0.5]], dtype=torch.float64)
    field = measureflow.field("linear", A=A)
    x0 = _x0(torch.float64)
    compiled, eager = _run(field, x0, True), _run(field, x0, False)
    assert float((compiled.state.x - eager.state.x).abs().max()) <= 1e-12
    exact = x0 @ torch.linalg.matrix_exp(A).T
    # rk4 is exact to order 4 in hA: n = 20 steps of local error ≤ (h‖A‖)⁵/5! · |x| (the damping of A
    # only shrinks it), about 1.6e-7 here against a bound of 2e-7.
    h, norm = 1 / 20, float(torch.linalg.matrix_norm(A, ord=2))
    bound = 20 * (h * norm) ** 5 / 120 * float(x0.norm(dim=-1).max())
    assert float((compiled.state.x - exact).abs().max()) < bound


def test_a_run_compiles_once_not_once_per_step(tracing_only):
    field = measureflow.field("learned", model=_net(torch.float64))
    x0 = _x0(torch.float64)
    # the graphs of this field and shape, once: 23 = 8 + 8 + 4 + 2 + 1 steps, every chunk length
    # (an 8-step chunk from the initial state and from an 8-step chunk's output: layouts differ)
    _run(field, x0, True, steps=23)
    before = _counters()
    # another step size and more steps (8 + 8 + 8 + 8 + 4 + 1): times are graph inputs, not constants
    result = _run(field, x0, True, steps=37)
    assert result.ok and _counters() == before


def test_compiled_dopri5_takes_the_eager_steps(tracing_only):
    field = measureflow.field("learned", model=_net(torch.float64))
    x0 = _x0(torch.float64)
    method = measureflow.integrator("dopri5", rtol=1e-6, atol=1e-8)
    compiled, eager = _run(field, x0, True, method, steps=2), _run(field, x0, False, method, steps=2)
    assert compiled.integrator_stats == eager.integrator_stats
    assert float((compiled.state.x - eager.state.x).abs().max()) <= 1e-12


def test_a_resumed_compiled_run_equals_the_uninterrupted_one(tmp_path, tracing_only):
    field = measureflow.field("learned", model=_net(torch.float64))
    x0 = _x0(torch.float64)
    ckpt = tmp_path / "c.ckpt"
    stop = Callback(lambda step, time, state: step == 7, every=Periodic(1))
    first = _run(field, x0, True, checkpoint=ckpt, callbacks=[stop])
    assert first.status.code == "stopped" and first.steps_done == 7
    resumed = _run(field, x0, True, checkpoint=ckpt, resume=True)
    whole = _run(field, x0, True)
    assert resumed.ok and torch.equal(resumed.state.x, whole.state.x)


class _NotTraceable:
    """Rotation field that refuses to be traced (stands for any field dynamo cannot follow)."""

    name = "not_traceable"
    time_range = (-np.inf, np.inf)

    def velocity(self, t, x, state):
        if torch.compiler.is_compiling():
            raise RuntimeError("cannot be traced")
        return torch.stack([-x[..., 1], x[..., 0]], dim=-1)


def test_a_field_dynamo_cannot_trace_runs_eagerly_with_the_eager_result(tracing_only):
    x0 = _x0(torch.float64, n=8)
    compiled, eager = _run(_NotTraceable(), x0, True), _run(_NotTraceable(), x0, False)
    # dynamo runs the field's frame eagerly and still compiles the stage arithmetic around it
    assert compiled.ok and float((compiled.state.x - eager.state.x).abs().max()) <= 1e-12


def test_a_compile_that_fails_warns_once_and_the_run_goes_on_eagerly(monkeypatch):
    from measureflow.integrators import compiled as steps

    def broken(solver, device, steps=0):
        def fail(*args):
            raise RuntimeError("backend compiler failed")

        return fail

    monkeypatch.setattr(steps, "_compiled_update", broken)
    field = measureflow.field("learned", model=_net(torch.float64))
    x0 = _x0(torch.float64, n=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = _run(field, x0, True)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "backend compiler failed" in messages[0] and "eager steps" in messages[0]
    eager = _run(field, x0, False)
    assert torch.equal(compiled.state.x, eager.state.x) and compiled.integrator_stats == eager.integrator_stats


# -- several steps per compiled graph -----------------------------------------------------------------------
@pytest.fixture
def chunks(monkeypatch):
    """The (first, last) step of every multi-step call a run makes."""
    from measureflow.simulation import SimulationProcess

    taken = []
    advance_steps = SimulationProcess.advance_steps

    def spy(self, state, step, k):
        taken.append((step, step + k))
        return advance_steps(self, state, step, k)

    monkeypatch.setattr(SimulationProcess, "advance_steps", spy)
    return taken


def test_a_compiled_fixed_step_run_takes_its_steps_in_chunks_equal_to_single_steps(tracing_only, chunks):
    field = measureflow.field("learned", model=_net(torch.float64))
    x0 = _x0(torch.float64)
    chunked = _run(field, x0, True)
    assert chunks == [(0, 8), (8, 16), (16, 20)]  # powers of two up to max_steps_at_once (8)
    del chunks[:]
    single = _run(field, x0, True, check_every=1)  # a check due at every step: one step at a time
    assert chunks == []
    eager = _run(field, x0, False)
    # the same graph operations step after step, so the same bits as one step at a time (aot_eager)
    assert torch.equal(chunked.state.x, single.state.x)
    assert float((chunked.state.x - eager.state.x).abs().max()) <= 1e-12
    assert chunked.integrator_stats == eager.integrator_stats
    # dopri5 under a constant controller: fixed steps with its first-same-as-last stage carried along
    dopri = measureflow.integrator("dopri5", controller=measureflow.integrators.ConstantController())
    del chunks[:]
    chunked, eager = _run(field, x0, True, dopri, steps=6), _run(field, x0, False, dopri, steps=6)
    assert chunks == [(0, 4), (4, 6)]
    assert float((chunked.state.x - eager.state.x).abs().max()) <= 1e-12
    assert chunked.integrator_stats == eager.integrator_stats  # FSAL: 6 evaluations for the first step, 5 after


def test_chunks_stop_where_observers_callbacks_and_checkpoints_fire(tmp_path, tracing_only, chunks):
    field = measureflow.field("learned", model=_net(torch.float64))
    x0 = _x0(torch.float64)
    seen = []
    callback = Callback(lambda step, time, state: seen.append(step), every=Periodic(7))
    kw = dict(observers=["mean"], observe_every=5, callbacks=[callback])
    chunked = _run(field, x0, True, checkpoint=tmp_path / "c.ckpt", checkpoint_every=6, **kw)
    eager = _run(field, x0, False, **kw)
    due = {s for s in range(1, 21) if s % 5 == 0 or s % 7 == 0 or s % 6 == 0}
    assert chunks and all(not (a < s < b) for a, b in chunks for s in due)
    assert seen == [7, 14, 7, 14]
    mean_c, mean_e = chunked.observables["mean"], eager.observables["mean"]
    assert list(mean_c.steps) == list(mean_e.steps) == [0, 5, 10, 15, 20]
    assert np.abs(np.asarray(mean_c.values) - np.asarray(mean_e.values)).max() <= 1e-12


_asked = []


def _counting_trigger(step, time):
    _asked.append(step)
    return step % 5 == 0


def test_a_trigger_that_may_do_more_than_answer_is_asked_once_per_step(tracing_only, chunks):
    """A user's function trigger could count its calls: the run never asks it about steps ahead, so a
    compiled run with one steps one at a time, and the trigger sees each step once, in order."""
    from measureflow.triggers import FunctionTrigger, Periodic

    field = measureflow.field("learned", model=_net(torch.float64))
    x0 = _x0(torch.float64)
    seen = []
    callback = Callback(lambda step, time, state: seen.append(step), every=FunctionTrigger(_counting_trigger))
    del _asked[:]
    result = _run(field, x0, True, callbacks=[callback])
    assert result.ok and chunks == []
    assert _asked == list(range(1, 21)) and seen == [5, 10, 15, 20]
    assert not FunctionTrigger(_counting_trigger).pure and not (Periodic(2) | FunctionTrigger(_counting_trigger)).pure
    assert (Periodic(2) & ~Periodic(3)).pure  # built-in triggers only answer: chunks go on around them
    _run(field, x0, True, callbacks=[Callback(lambda step, time, state: None, every=Periodic(2) & ~Periodic(3))])
    assert chunks


def test_a_chunked_run_resumes_bit_for_bit(tmp_path, tracing_only, chunks):
    field = measureflow.field("learned", model=_net(torch.float64))
    x0 = _x0(torch.float64)
    ckpt = tmp_path / "c.ckpt"
    stop = Callback(lambda step, time, state: step == 8, every=Periodic(8))
    first = _run(field, x0, True, checkpoint=ckpt, checkpoint_every=8, callbacks=[stop])
    assert first.status.code == "stopped" and first.steps_done == 8
    del chunks[:]
    resumed = _run(field, x0, True, checkpoint=ckpt, checkpoint_every=8, resume=True)
    assert chunks == [(8, 16), (16, 20)]
    whole = _run(field, x0, True, checkpoint=tmp_path / "w.ckpt", checkpoint_every=8)
    assert resumed.ok and torch.equal(resumed.state.x, whole.state.x)
    assert resumed.integrator_stats == whole.integrator_stats


@pytest.mark.parametrize("blowup", [None, 1e6])
def test_a_chunked_run_reports_the_first_bad_step_as_a_step_by_step_run(tracing_only, chunks, blowup):
    # v = 60 x, h = 0.05: rk4 multiplies x by 1 + z + z²/2 + z³/6 + z⁴/24 = 16.4 per step (z = 3), so
    # |x| ≲ 4 passes 1e6 near step 5 and overflows float64 (1.8e308) near step 308·ln10/ln16.4 ≈ 253:
    # inside a chunk (not at a check), found at the run's end; 300 steps over [0, 15].
    A = 60.0 * torch.eye(2, dtype=torch.float64)
    field = measureflow.field("linear", A=A)
    x0 = _x0(torch.float64, n=8)
    kw = dict(steps=300, blowup=blowup)
    chunked = Simulation(Particles(x0), field, "rk4", 0.0, 15.0, progress=False, compile=True, **kw).run()
    assert chunks  # it did take several steps at once
    eager = Simulation(Particles(x0), field, "rk4", 0.0, 15.0, progress=False, **kw).run()
    assert chunked.status.code == eager.status.code == ("nonfinite" if blowup is None else "blowup")
    assert chunked.status.step == eager.status.step
    assert f"step {eager.status.step}" in chunked.status.message or blowup is not None


def test_compile_refuses_a_stochastic_integrator_in_one_line():
    field = measureflow.field("ornstein_uhlenbeck", theta=1.0, sigma=0.5)
    with pytest.raises(ParameterError, match="explicit Runge–Kutta") as err:
        Simulation(Particles(_x0(torch.float64)), field, "euler_maruyama", 0.0, 1.0, steps=5, compile=True)
    assert "\n" not in str(err.value)


# -- training --------------------------------------------------------------------------------------------------
def _train(compile, steps=25, **kw):
    dtype = torch.float64
    source = Gaussian(torch.zeros(2, dtype=dtype), torch.eye(2, dtype=dtype))
    target = torch.randn(500, 2, generator=torch.Generator().manual_seed(1), dtype=dtype) + 2.0
    return train_velocity(source, target, "linear", model=_net(dtype), steps=steps, batch_size=64, lr=1e-2,
                          seed=2, progress=False, compile=compile, **kw)


def test_compiled_training_follows_the_eager_loss_curve():
    compiled, eager = _train(True), _train(False)
    # Same draws, same optimiser; gradients agree to rounding, and 25 Adam steps of a small network
    # amplify a 1e-16 difference by far less than 1e6.
    np.testing.assert_allclose(compiled.losses, eager.losses, rtol=1e-10)
    for a, b in zip(compiled.model.parameters(), eager.model.parameters()):
        assert float((a - b).detach().abs().max()) < 1e-10


def test_later_compiled_trainings_of_new_networks_reuse_the_graph():
    """Each train_velocity(compile=True) compiles with the same inductor options (one pass object per
    process): a new network of the same shape is no new graph, so a process that trains many times
    never reaches torch's recompile limit and never falls back to eager steps unannounced."""
    first = _train(True)
    before = _counters()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to eager warns
        later = [_train(True, steps=3) for _ in range(3)]
    assert _counters() == before
    assert all(np.isfinite(r.losses).all() for r in later) and np.isfinite(first.losses).all()


def test_compiled_training_resumes_bit_for_bit(tmp_path, tracing_only):
    ckpt = tmp_path / "t.ckpt"

    def crash(step, loss, model):
        if step == 13:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        _train(True, checkpoint=ckpt, checkpoint_every=10, callback=crash)
    resumed = _train(True, checkpoint=ckpt, checkpoint_every=10, resume=True)
    whole = _train(True)
    assert np.array_equal(resumed.losses, whole.losses)
    for a, b in zip(resumed.model.parameters(), whole.model.parameters()):
        assert torch.equal(a, b)


def _traced(fn, *args):
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn, tracing_mode="fake")(*args)


def _targets(graph_module):
    return [node.target for node in graph_module.graph.nodes if node.op == "call_function"]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-15), (torch.float32, 1e-6)])
def test_bias_into_pointwise_rewrites_linear_layers_followed_by_elementwise_work(dtype, tol):
    """addmm(b, x, W) whose uses are all elementwise becomes mm(x, W) + b; one whose result leaves the
    graph (or feeds a matrix product) stays an addmm. Same values to one rounding: |Wx + b| ≲ 10 here,
    so 2 ulp of 10 is 4e-15 (f64) / 2e-6 (f32) absolute, tested relative to the output scale."""
    from measureflow.compile_passes import BiasIntoPointwise

    aten = torch.ops.aten
    gen = torch.Generator().manual_seed(3)
    x, w1, w2 = (torch.randn(*s, generator=gen, dtype=dtype) for s in ((256, 11), (64, 11), (2, 64)))
    b1, b2 = torch.randn(64, generator=gen, dtype=dtype), torch.randn(2, generator=gen, dtype=dtype)

    def mlp(x, w1, b1, w2, b2):
        hidden = torch.nn.functional.silu(torch.nn.functional.linear(x, w1, b1))
        return torch.nn.functional.linear(hidden, w2, b2)  # a graph output: stays fused

    graph_module = _traced(mlp, x, w1, b1, w2, b2)
    assert _targets(graph_module).count(aten.addmm.default) == 2
    BiasIntoPointwise()(graph_module.graph)
    graph_module.recompile()
    targets = _targets(graph_module)
    assert targets.count(aten.addmm.default) == 1 and targets.count(aten.mm.default) == 1
    assert aten.add.Tensor in targets
    expected = mlp(x, w1, b1, w2, b2)
    assert torch.allclose(graph_module(x, w1, b1, w2, b2), expected, rtol=0, atol=tol * float(expected.abs().max()))


def test_bias_into_pointwise_keys_the_compile_cache():
    """The pass names itself in torch's cache key: graphs compiled with and without it never collide."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    from measureflow.compile_passes import BiasIntoPointwise, inductor_options

    options = inductor_options()
    assert isinstance(options["post_grad_custom_post_pass"], CustomGraphPass)
    assert BiasIntoPointwise().uuid() == options["post_grad_custom_post_pass"].uuid() != ""
