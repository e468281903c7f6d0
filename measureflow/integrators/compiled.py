"""Compiled solver steps: one explicit Runge–Kutta step — every stage, every field evaluation and the
update — as one ``torch.compile`` graph (``Simulation(..., compile=True)``).

A small network stepped in small batches spends most of its time launching kernels and crossing
Python (a step of rk4 on a 3 × 64 MLP is about 60 small operators); a compiled step fuses the
elementwise work into a few generated loops and runs the field's layers without the interpreter in
between. :class:`CompiledStep` wraps a solver for one run:

* what is compiled is :meth:`ExplicitRungeKutta.stage_update <measureflow.integrators.ExplicitRungeKutta.stage_update>`
  with the run's field (:meth:`Dynamics.evaluate <measureflow.integrators.Dynamics.evaluate>`):
  k₁ … k_s, y' = y + h Σ bᵢkᵢ and the embedded error estimate. Everything around it — packing the
  state, the first-same-as-last stage, the counters, dense output, the step-size controller — stays
  as in an eager step, so fixed-step (``euler``, ``heun``, ``midpoint``, ``rk4``) and adaptive
  (``dopri5``) methods alike are compiled, and a run's results, checkpoints and resumption behave
  as before;
* times and step sizes enter the graph as one float64 tensor (t₀, t₁, h), so a run compiles once,
  not once per step (a Python float would be a constant of the graph); the field therefore sees its
  stage times as 0-dim tensors. A field that reads t as a Python number (``float(t)``,
  ``math.exp(t)``) still works but recompiles at every new time until torch's recompile limit sends
  it back to eager; such a field gains nothing from ``compile=True``. A first-same-as-last method
  compiles twice (without, then with the carried first stage), a new shape or dtype once more.
  Likewise a field or network that changes its own Python attributes at every call (a call
  counter) is guarded on them and recompiles at every step: keep such state out of the field.
  Compiled graphs are cached per process and method, so later runs of the same field reuse them;
* on CPU the graph goes to inductor's default mode; on CUDA to ``mode="reduce-overhead"`` (CUDA
  graphs: one launch per step), whose outputs live in a pool the next replay overwrites, so they are
  copied out before the step returns;
* the results equal an eager step's up to floating-point rounding: inductor may fuse and reorder
  the elementwise sums (y + h Σ bᵢkᵢ is accumulated in one loop instead of a buffer per stage),
  about one unit in the last place per operation; matrix products are the same library calls;
* a field the compiler cannot trace whole is compiled in pieces (graph breaks), still correct; a
  compile or a compiled call that fails where the eager step succeeds warns once and the run goes
  on with eager steps (:attr:`CompiledStep.failure` says why).

Several steps per graph. A fixed-step run of particles takes runs of steps with nothing due in
between — no observer, writer, checkpoint, callback or health check — as one graph of 2, 4 or 8
steps (:meth:`CompiledStep.steps`, :data:`max_steps_at_once`; the run loop chooses the length,
:class:`~measureflow.integrators.Stepper` and the process say when it may): a step of a small network
costs tens of microseconds of Python, dispatch and guards around a compiled call, which a chunk
pays once. Inside the graph every step is the same sequence of operations as a single compiled
step, with the times the run's grid gives that step (t₀, t₁ and h = t₁ − t₀ from the same floats),
so a chunk's result equals stepping one at a time (bit for bit in practice: the tests check it
under the tracing backend; inductor may round a fused sum differently across graphs); the graph
also returns the largest |x| after each step, so the health record still names the first
non-finite or blown-up step; the solver state and dense output are the last step's. Each length is
compiled once per process, method, shape and dtype (a graph of k steps takes several times a single
step's compile; at most 8 bounds it), and cached on disk with the single-step graphs.

Stochastic solvers (they draw noise, which a graph would have to replay) are not compiled:
``Simulation(..., compile=True)`` refuses them with a one-line error.
"""

from __future__ import annotations

import math
import threading
import types
import warnings

import torch

from ..compile_passes import inductor_options
from ..reductions.compile_cache import use_lasting_directory

__all__ = ["CompiledStep", "compilable", "compile_available", "max_steps_at_once"]

#: The torch.compile backend of compiled steps ("aot_eager" traces the same graphs without generating
#: code: faster to compile, for checks of the tracing itself).
backend = "inductor"

#: The most fixed-size steps :meth:`CompiledStep.steps` takes in one graph; a run takes chunks of
#: 1, 2, 4 … this many steps, each length compiled once per process, method and shape.
max_steps_at_once = 8

#: Whether CPU graphs take :class:`~measureflow.compile_passes.BiasIntoPointwise` (a linear layer's
#: bias added in the elementwise loop after the GEMM instead of copied into its output first).
bias_into_pointwise = True

_lock = threading.Lock()
#: Compiled updates of this process, by (method, device type).
_updates: dict = {}


def compile_available() -> bool:
    """Whether this torch has a working ``torch.compile`` (2.0 or later, dynamo supported here)."""
    try:
        import torch._dynamo  # noqa: F401 - import alone fails where dynamo is unsupported

        return hasattr(torch, "compile") and torch._dynamo.is_dynamo_supported()
    except Exception:  # noqa: BLE001 - any failure means "no compile here"
        return False


def compilable(solver) -> bool:
    """Whether ``solver``'s steps can be compiled: it has a pure ``stage_update`` and a ``step`` that
    takes it as ``update=`` (:class:`~measureflow.integrators.ExplicitRungeKutta` and its subclasses)."""
    return callable(getattr(solver, "stage_update", None)) and callable(getattr(solver, "evaluations", None))


def _update(solver, dynamics, times, y0, k1):
    t0, t1, h = times.unbind()
    return solver.stage_update(dynamics.evaluate, t0, t1, h, y0, k1)


def _steps(solver, dynamics, times, y0, k1):
    # times: one row (t0, t1, h) per step; its length is fixed per code object (_compiled_update),
    # so the loop unrolls into one graph of that many steps.
    peaks = []
    y, start, ks, error = y0, y0, None, None
    for row in times.unbind():
        t0, t1, h = row.unbind()
        start = y
        y, ks, error = solver.stage_update(dynamics.evaluate, t0, t1, h, y, k1)
        k1 = ks[-1] if solver.tableau.fsal else None
        peaks.append(torch.linalg.vector_norm(y[0], ord=math.inf))
    return y, start, ks, error, torch.stack(peaks)


def _compiled_update(solver, device: torch.device, steps: int = 0):
    """The compiled update of ``solver`` on ``device``: one step (``steps=0``, :func:`_update`) or
    ``steps`` steps in one graph (:func:`_steps`)."""
    passes = bias_into_pointwise and device.type == "cpu" and backend == "inductor"
    key = (solver.tableau, solver.name, type(solver), device.type, backend, steps, passes)
    with _lock:
        fn = _updates.get(key)
        if fn is None:
            # torch.compile caches graphs on the code object (and stops after a few variants): one
            # code object per method, device and number of steps keeps runs of different methods
            # (and chunks of different lengths) from crowding out each other's graphs.
            tag = "".join(c if c.isalnum() else "_" for c in solver.name)
            source = _steps if steps else _update
            name = f"compiled_step_{tag}_{device.type}_{backend}" + (f"_x{steps}" if steps else "") + ("_p" if passes else "")
            code = source.__code__.replace(co_name=name)
            fresh = types.FunctionType(code, source.__globals__, code.co_name)
            mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
            use_lasting_directory()  # the compiled code outlives the process (as the fused reductions')
            # torch.compile takes a mode or options, not both: CUDA graphs on a GPU, the passes on CPU.
            options = {"options": inductor_options()} if passes else {"mode": mode}
            fn = torch.compile(fresh, backend=backend, **options)
            _updates[key] = fn
    return fn


class CompiledStep:
    """``solver`` (an :class:`~measureflow.integrators.ExplicitRungeKutta`) whose steps run
    compiled (see the module docstring); one per run, made by the run's
    :class:`~measureflow.integrators.Stepper` when asked with ``compile=True``.

    It answers to everything a solver does (``name``, ``order``, ``controller``, ``init``…) with
    the wrapped solver's values (attribute look-ups fall through to it), so controllers and the run
    loop see no difference.
    """

    def __init__(self, solver):
        if not compilable(solver):
            raise TypeError(f"CompiledStep needs an explicit Runge–Kutta solver; received {solver!r}")
        self.solver = solver
        #: why this run went back to eager steps (the first compiled step that failed), or None
        self.failure: str | None = None

    def __getattr__(self, name):
        # Called only for what this class does not define itself (step, steps, failure…): every
        # other attribute — name, order, controller, init, check… — is the wrapped solver's.
        if name == "solver":  # not yet set (copy/unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.solver, name)

    def __repr__(self) -> str:
        return f"CompiledStep({self.solver!r})"

    def step(self, dynamics, t0, t1, y, solver_state=None, *, dt=None):
        """One step as :meth:`ExplicitRungeKutta.step`, its tensor work compiled."""
        if self.failure is not None:
            return self.solver.step(dynamics, t0, t1, y, solver_state, dt=dt)
        device = y.device
        compiled, solver = _compiled_update(self.solver, device), self.solver
        if device.type == "cuda":
            compiled = _copied_out(compiled)

        def update(dyn, t0, t1, h, y0, k1):
            # Times as one float64 tensor: graph inputs, where Python floats would be baked-in
            # constants forcing a compile per step.
            times = torch.tensor((t0, t1, h), dtype=torch.float64, device=device)
            return compiled(solver, dyn, times, y0, k1)

        try:
            return self.solver.step(dynamics, t0, t1, y, solver_state, dt=dt, update=update)
        except Exception as exc:  # noqa: BLE001 - decided below, by whether the eager step works
            result = self.solver.step(dynamics, t0, t1, y, solver_state, dt=dt)  # raises the field's own error
            self._fail(exc, dynamics)
            return result

    def steps(self, dynamics, times, y, solver_state=None):
        """``len(times) - 1`` consecutive steps t₀ → t₁ → … of a particle state ``y`` without
        auxiliary channels, as one compiled graph (fixed-step runs: the run loop takes them where
        nothing is due between t₀ and the last time). Returns ``(result, peaks)``: the
        :class:`~measureflow.integrators.StepResult` of the last step (its state, first-same-as-last
        stage and dense output, as that step taken alone gives them) and the largest |x| after each
        step (a tensor on the device, for the run's health record). Each step's times are the ones
        a step-by-step run uses (t₀, t₁ and h = t₁ − t₀ from the same floats), so results equal
        stepping one at a time up to the rounding a compiled step allows. Counts the field
        evaluations; the caller counts the steps."""
        solver, dyn = self.solver, dynamics
        n = len(times) - 1
        y0 = dyn.pack(y)
        k1 = None
        if solver_state is not None and solver.continues(dyn, times[0], y, solver_state):
            k1 = solver_state.derivative
        if self.failure is None:
            rows = torch.tensor([(a, b, b - a) for a, b in zip(times[:-1], times[1:])], dtype=torch.float64,
                                device=y0[0].device)
            compiled = _compiled_update(solver, y0[0].device, n)
            if y0[0].device.type == "cuda":
                compiled = _copied_out(compiled)
            try:
                y1, start, ks, error, peaks = compiled(solver, dyn, rows, y0, k1)
            except Exception as exc:  # noqa: BLE001 - the eager steps below decide whether the field fails
                failed = exc
            else:
                evaluations = solver.evaluations(k1) + (n - 1) * solver.evaluations(ks[-1] if solver.tableau.fsal else None)
                dyn.stats["nfev"] += evaluations
                return solver.result(dyn, times[-2], times[-1], y, start, y1, ks, error), peaks
        # Eager, one step at a time: after a failed compile (whose failure is reported once the
        # eager steps show the field itself works).
        peaks = []
        for a, b in zip(times[:-1], times[1:]):
            result = solver.step(dyn, a, b, y, solver_state)
            y, solver_state = result.y, result.solver_state
            peaks.append(torch.linalg.vector_norm(y.x, ord=math.inf))
        if self.failure is None:
            self._fail(failed, dynamics)
        return result, torch.stack(peaks)

    def _fail(self, exc, dynamics) -> None:
        self.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        warnings.warn(
            f"measureflow: compiling the {self.name!r} step of field "
            f"{getattr(getattr(dynamics, 'field', None), 'name', '?')!r} failed ({self.failure}); "
            "this run goes on with eager steps",
            RuntimeWarning,
            stacklevel=3,
        )


def _copied_out(update):
    """A CUDA-graph update whose outputs are copied out of the graph's pool (the next replay
    overwrites it) before the step keeps them."""

    def call(*args):
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs were copied out
        out = update(*args)
        copy = lambda ts: None if ts is None else tuple(t.clone() for t in ts)  # noqa: E731
        if len(out) == 5:  # several steps (_steps)
            y1, start, ks, error, peaks = out
            return copy(y1), copy(start), [copy(k) for k in ks], copy(error), peaks.clone()
        y1, ks, error = out
        return copy(y1), [copy(k) for k in ks], copy(error)

    return call
