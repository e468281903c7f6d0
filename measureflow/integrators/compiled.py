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

Stochastic solvers (they draw noise, which a graph would have to replay) are not compiled:
``Simulation(..., compile=True)`` refuses them with a one-line error.
"""

from __future__ import annotations

import threading
import types
import warnings

import torch

from ..reductions.compile_cache import use_lasting_directory

__all__ = ["CompiledStep", "compilable", "compile_available"]

#: The torch.compile backend of compiled steps ("aot_eager" traces the same graphs without generating
#: code: faster to compile, for checks of the tracing itself).
backend = "inductor"

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


def _compiled_update(solver, device: torch.device):
    key = (solver.tableau, solver.name, type(solver), device.type, backend)
    with _lock:
        fn = _updates.get(key)
        if fn is None:
            # torch.compile caches graphs on the code object (and stops after a few variants): one
            # code object per method and device keeps runs of different methods from crowding out
            # each other's graphs.
            tag = "".join(c if c.isalnum() else "_" for c in solver.name)
            code = _update.__code__.replace(co_name=f"compiled_step_{tag}_{device.type}_{backend}")
            fresh = types.FunctionType(code, _update.__globals__, code.co_name)
            mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
            use_lasting_directory()  # the compiled code outlives the process (as the fused reductions')
            fn = torch.compile(fresh, mode=mode, backend=backend)
            _updates[key] = fn
    return fn


class CompiledStep:
    """``solver`` (an :class:`~measureflow.integrators.ExplicitRungeKutta`) whose steps run
    compiled (see the module docstring); one per run, made by the run's
    :class:`~measureflow.integrators.Stepper` when asked with ``compile=True``.

    It answers to everything a solver does (``name``, ``order``, ``controller``, ``init``…) with
    the wrapped solver's values, so controllers and the run loop see no difference.
    """

    def __init__(self, solver):
        if not compilable(solver):
            raise TypeError(f"CompiledStep needs an explicit Runge–Kutta solver; received {solver!r}")
        self.solver = solver
        self.name = solver.name
        self.order = solver.order
        self.adaptive = solver.adaptive
        self.stochastic = solver.stochastic
        self.needs = solver.needs
        self.controller = solver.controller
        self.tableau = solver.tableau
        #: why this run went back to eager steps (the first compiled step that failed), or None
        self.failure: str | None = None

    @property
    def options(self) -> dict:
        return self.solver.options

    @property
    def error_order(self) -> int:
        return self.solver.error_order

    def init(self, dynamics, t0, y):
        return self.solver.init(dynamics, t0, y)

    def continues(self, dynamics, t0, y, solver_state) -> bool:
        return self.solver.continues(dynamics, t0, y, solver_state)

    def check(self, field, state) -> None:
        self.solver.check(field, state)

    def uses_noise(self, field) -> bool:
        return self.solver.uses_noise(field)

    @property
    def max_halvings(self):
        return self.solver.max_halvings

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
            self.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            warnings.warn(
                f"measureflow: compiling the {self.name!r} step of field "
                f"{getattr(getattr(dynamics, 'field', None), 'name', '?')!r} failed ({self.failure}); "
                "this run goes on with eager steps",
                RuntimeWarning,
                stacklevel=2,
            )
            return result


def _copied_out(update):
    """A CUDA-graph update whose outputs are copied out of the graph's pool (the next replay
    overwrites it) before the step keeps them."""

    def call(*args):
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs were copied out
        y1, ks, error = update(*args)
        copy = lambda ts: None if ts is None else tuple(t.clone() for t in ts)  # noqa: E731
        return copy(y1), [copy(k) for k in ks], copy(error)

    return call
