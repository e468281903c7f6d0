"""Stacking simulations: runs that differ only in seed (and initial state) advanced as one batch.

:meth:`measureflow.Simulation.stack` builds one Simulation whose state stacks the runs' initial
states along the replica axis R (run i owns a block of consecutive replicas), whose noise stream
gives each block its own run's stream (``noise_blocks``), and whose writers are
:class:`~measureflow.io.pack.PackWriter` objects handing every run's writer its own block of each
frame and observable sample — so each run's file is the one it writes alone.

Runs stack when their fields, observers, targets, time grids, integrators, channels, state shapes,
stop policies and writer schedules are the same (compared by value: tensors element by element) and
the integrator has a fixed step (an adaptive controller would choose one step for the whole batch).
The batch then equals the separate runs because a field treats replicas independently with shared
parameters (R is a batch axis for every built-in field).
"""

from __future__ import annotations

import types

import numpy as np
import torch

from .errors import MeasureflowError
from .io.pack import PackWriter
from .state import Gaussians, Particles, state_kind

__all__ = ["stack_simulations", "why_not_stackable", "same_value", "stack_states"]

#: How deep :func:`same_value` follows attributes before it gives up (and refuses to pack).
MAX_DEPTH = 12
# Py_TPFLAGS_HEAPTYPE without Py_TPFLAGS_IMMUTABLETYPE: a class defined by a Python class statement
# (built-in and extension types lack one or have both).
_HEAP_TYPE, _IMMUTABLE_TYPE = 1 << 9, 1 << 8


def same_value(a, b, _depth: int = 0, _seen: set | None = None) -> bool:
    """Whether ``a`` and ``b`` hold the same values: tensors and arrays element by element, objects
    attribute by attribute. False whenever in doubt (the caller then does not pack)."""
    if a is b:
        return True
    if type(a) is not type(b) or _depth > MAX_DEPTH:
        return False
    if isinstance(a, torch.Tensor):
        return (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                and bool(torch.equal(a.detach(), b.detach())))
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b))
    if isinstance(a, torch.Generator):
        return a.device == b.device and bool(torch.equal(a.get_state(), b.get_state()))
    if isinstance(a, (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)):
        return a == b
    seen = set() if _seen is None else _seen
    pair = (id(a), id(b))
    if pair in seen:
        return True  # a cycle already being compared
    seen.add(pair)
    depth = _depth + 1
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y, depth, seen) for x, y in zip(a, b))
    if isinstance(a, (set, frozenset)):
        return a == b
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k], depth, seen) for k in a)
    if isinstance(a, (types.MethodType, types.BuiltinMethodType)):
        # A bound method (a DeviceCache's build, say): the same function of owners holding the same
        # values. The owner is often the object being compared, which the cycle check above settles.
        same_function = a.__func__ is b.__func__ if isinstance(a, types.MethodType) else a.__name__ == b.__name__
        return same_function and same_value(a.__self__, b.__self__, depth, seen)
    attrs_a, attrs_b = _attributes(a), _attributes(b)
    if attrs_a is None or attrs_b is None:
        return a == b  # functions, modules, classes: the same object (checked above) or equal
    return attrs_a.keys() == attrs_b.keys() and all(same_value(attrs_a[k], attrs_b[k], depth, seen) for k in attrs_a)


def _attributes(obj) -> dict | None:
    """The attributes of an instance of a Python class; None for anything else (functions,
    classes, modules and C types, which compare with ``==``)."""
    flags = type(obj).__flags__
    if isinstance(obj, type) or not flags & _HEAP_TYPE or flags & _IMMUTABLE_TYPE:
        return None
    out = dict(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if name not in ("__dict__", "__weakref__") and hasattr(obj, name):
                out[name] = getattr(obj, name)
    return out


def why_not_stackable(simulations) -> str | None:
    """Why these Simulations cannot advance as one batch (None when they can)."""
    if not simulations:
        return "there are no simulations to stack"
    lead = simulations[0]
    integrator = lead.integrator
    if getattr(getattr(integrator, "controller", None), "adaptive", getattr(integrator, "adaptive", False)):
        return f"integrator {getattr(integrator, 'name', '?')!r} adapts its step to the whole batch"
    if any(s.noise_blocks for s in simulations):
        return "a simulation already sets noise_blocks (it is itself a stack)"
    first = lead.run_parameters()
    for other in simulations[1:]:
        params = other.run_parameters()
        for part, what in (("time", "time grids"), ("integrator", "integrators"), ("log_density", "log-density channels"),
                           ("gradient", "gradient modes")):
            if params.get(part) != first.get(part):
                return f"their {what} differ"
        if lead.events or other.events:
            return "they have events, which are located on the whole batch's steps"
        a, b = lead.state, other.state
        if (state_kind(a), getattr(a, "size", 0), a.dim, a.dtype, a.device) != (
                state_kind(b), getattr(b, "size", 0), b.dim, b.dtype, b.device):
            return f"their states differ in kind, size, dimension, dtype or device ({a!r} vs {b!r})"
        if not same_value(lead.field, other.field):
            return "their fields differ (e.g. a target drawn from the seed); a batch shares one field"
        if len(lead.observers) != len(other.observers) or not all(
                same_value(x, y) for x, y in zip(lead.observers, other.observers)):
            return "their observers differ"
        if not same_value(lead.target, other.target):
            return "their targets differ"
        if lead.stop != other.stop:
            return "their stop conditions differ"
        if not same_value(lead.channels, other.channels):
            return "their channels differ"
        if lead.recording.callbacks or lead.recording.operations or other.recording.callbacks or other.recording.operations:
            return "they have callbacks or custom operations, which see the whole batch"
        if [type(w) for w in lead.writers] != [type(w) for w in other.writers] or any(
                not same_value(getattr(x, "trigger", None), getattr(y, "trigger", None))
                for x, y in zip(lead.writers, other.writers)):
            return "their writers differ"
    return None


def stack_states(states):
    """The states concatenated along the replica axis."""
    if state_kind(states[0]) == "gaussians":
        return Gaussians(torch.cat([s.mean for s in states]), torch.cat([s.cov for s in states]))
    x = torch.cat([s.x for s in states])
    if all(s.weights is None for s in states):
        return Particles(x)
    return Particles(x, torch.cat([s.weights_or_uniform() for s in states]))


def stack_simulations(simulations, *, parameters: dict | None = None):
    """One Simulation for the batch of ``simulations`` (module docstring); raises MeasureflowError
    naming the reason when they cannot be stacked. The batch has no checkpoint of its own: give it
    one with ``with_checkpoint``."""
    reason = why_not_stackable(simulations)
    if reason is not None:
        raise MeasureflowError(f"cannot stack these {len(simulations)} simulations: {reason}")
    lead = simulations[0]
    run_parameters = [s.run_parameters() for s in simulations]
    states = [s.state for s in simulations]
    writers = [PackWriter([s.writers[j] for s in simulations], run_parameters, states)
               for j in range(len(lead.writers))]
    blocks = [(s.seed, s.state.replicas) for s in simulations]
    # The batch's checkpoint must never be taken for another batch's: the seeds enter its parameters.
    merged = {**lead.parameters, "pack": [p["seed"] for p in run_parameters], **dict(parameters or {})}
    return lead.with_options(state=stack_states(states), writers=writers, noise_blocks=blocks, parameters=merged,
                         checkpoint=None, checkpoint_every=None, resume=False)
