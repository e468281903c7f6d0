"""Operations: what a run does on triggered steps, each with its trigger (HOOMD's shape).

Every step of a run is the same sequence (:mod:`measureflow.run.loop`): advance, record health,
then the operations whose trigger fires, in phase order:

==========  =======================  ==================================================================
phase       operation                what it does
==========  =======================  ==================================================================
measure     :class:`Observer`        measures an observable of the state (values stay on the device)
write       :class:`Record`          a writer writes the frame and the observables measured this step
checkpoint  :class:`Checkpoint`      flushes the writers, then atomically replaces the checkpoint file
callback    :class:`Callback`        a user function ``f(step, time, state)``; a true result stops the run
report      :class:`Progress`        a progress bar
==========  =======================  ==================================================================

Observers and writers also fire on the last step, so a run's final state is always in its file and
its result. Operations that move data to the host (``reads_host``) make the loop check the state's
health first, so a non-finite or blown-up state is never written or checkpointed.

Before the first step every observer declares what it records (its name and the shape of one
sample), so a writer lays out every dataset when it opens: an H5MD file stays in SWMR mode from
open to close and a reader can follow a running file.
"""

from __future__ import annotations

import abc
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from ..errors import CapabilityError, MeasureflowError
from ..triggers import Always, Trigger, as_trigger
from ..validators import check_finite, check_finite_tensor

__all__ = [
    "Operation",
    "Observer",
    "Record",
    "Checkpoint",
    "Callback",
    "Progress",
    "observer_list",
    "progress_enabled",
    "MEASURE",
    "WRITE",
    "CHECKPOINT",
    "CALLBACK",
    "REPORT",
]

MEASURE, WRITE, CHECKPOINT, CALLBACK, REPORT = 10, 20, 30, 40, 50


class Operation(abc.ABC):
    """Base class of operations (see the module docstring).

    Class attributes: ``phase`` (its place in a step), ``reads_host`` (it moves data off the device,
    so the state is checked first), ``on_last`` (it also fires on the last step).
    """

    phase: int = CALLBACK
    reads_host: bool = False
    on_last: bool = False
    trigger: Trigger = Always()

    def fires(self, step: int, time: float, last: bool) -> bool:
        return (self.on_last and last) or bool(self.trigger(step, time))

    def resolve(self, times) -> None:
        """Bind time-based triggers to the run's time grid (called once, before step 0)."""
        self.trigger = as_trigger(self.trigger).resolve(times)

    def start(self, context) -> None:
        """Before step 0 (and after observers declared what they record)."""

    @abc.abstractmethod
    def __call__(self, context) -> bool | None:
        """Run at ``context.step``; a true result asks the run to stop (status ``stopped``)."""

    def finish(self, context, status) -> None:
        """After the last step, however the run ended (release files, record the status)."""

    def flush(self) -> None:
        """Make what was written durable (before a checkpoint)."""


class Observer(Operation):
    """Measures ``function(state, field=…, target=…, t=…, **params)`` on triggered steps.

    ``function`` is a callable or the name of a registered observable (``"mean"``, ``"covariance"``,
    ``"energy"``, ``"w2"``, ``"mmd"``, ``"sinkhorn"`` …). ``every`` is a trigger (an int k means every
    k steps; None: the run's default). ``shape`` is the shape of one sample when known; otherwise it
    is learnt from the first measurement (an observer whose trigger skips step 0 is evaluated once on
    the initial state for it).
    """

    phase = MEASURE
    on_last = True

    def __init__(self, function, name: str | None = None, every=None, target=None, params: dict | None = None,
                 shape: tuple | None = None):
        self.function = function
        self.name = name
        self.every = every
        where = f"observer {name or getattr(function, '__name__', function)!r}"
        self.target = check_finite_tensor(target, "target", where)
        self.params = dict(params or {})
        for key, value in self.params.items():
            # Non-finite parameters are refused here, not at the first measurement.
            if isinstance(value, float):
                check_finite(value, key, where)
            else:
                check_finite_tensor(value, key, where)
        self.shape = None if shape is None else tuple(int(n) for n in shape)
        self.trigger = as_trigger(every) if every is not None else None

    def resolved(self, default_every) -> "Observer":
        """A copy with the registered function looked up, its name and trigger settled."""
        from ..plugins import get_registry

        function, name = self.function, self.name
        if isinstance(function, str):
            name = name or function
            function = get_registry().get("observables", function)
        elif name is None:
            name = getattr(function, "__name__", "observable")
        if not callable(function):
            raise CapabilityError(f"observer {name!r}: {function!r} is not callable")
        every = as_trigger(self.every if self.every is not None else default_every)
        return Observer(function, name, every, self.target, self.params, self.shape)

    def measure(self, state, time: float, context_args: dict) -> torch.Tensor:
        target = self.target if self.target is not None else context_args.get("target")
        value = self.function(state, field=context_args.get("field"), target=target, t=time, **self.params)
        return value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)

    def declare(self, state, time: float, context_args: dict) -> tuple:
        """The shape of one sample (measured once on ``state`` when not given)."""
        if self.shape is None:
            self.shape = tuple(self.measure(state, time, context_args).shape)
        return self.shape

    def __call__(self, context):
        value = self.measure(context.state, context.time, context.observe_args)
        context.measured[self.name] = value
        context.history[self.name].append((context.step, context.time, value))
        if self.shape is None:
            self.shape = tuple(value.shape)

    def __repr__(self) -> str:
        return f"Observer({self.name!r}, every={self.trigger!r})"


class Record(Operation):
    """A writer (:class:`~measureflow.io.Writer`) recording frames and observables on its trigger."""

    phase = WRITE
    reads_host = True
    on_last = True

    def __init__(self, writer):
        self.writer = writer
        self.trigger = as_trigger(getattr(writer, "trigger", None) or Always())
        self.opened = False

    def start(self, context) -> None:
        self.writer.open(context.run_info)
        self.opened = True

    def __call__(self, context):
        frame = context.frame()
        self.writer.write_frame(context.step, context.time, frame)
        if context.measured:
            self.writer.write_observables(context.step, context.time, context.measured)

    def flush(self) -> None:
        if self.opened:
            flush = getattr(self.writer, "flush", None)
            if callable(flush):
                flush()

    def finish(self, context, status) -> None:
        if not self.opened:
            return
        try:
            if status is not None:
                set_status = getattr(self.writer, "set_status", None)
                if callable(set_status):
                    try:
                        set_status(status.code, status.step, status.time, status.message)
                    except Exception:  # noqa: BLE001 - closing the file matters more than the status line
                        pass
        finally:
            self.opened = False
            self.writer.close()

    def __repr__(self) -> str:
        return f"Record({self.writer!r}, every={self.trigger!r})"


class Checkpoint(Operation):
    """Saves the run's checkpoint to ``path`` on its trigger (never on the last step: a completed run
    needs none, unless the run asks for one at its end)."""

    phase = CHECKPOINT
    reads_host = True

    def __init__(self, path, every=None):
        self.path = Path(path)
        self.trigger = as_trigger(every)

    def fires(self, step: int, time: float, last: bool) -> bool:
        return not last and bool(self.trigger(step, time))

    def __call__(self, context):
        context.save_checkpoint()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, every={self.trigger!r})"


class Callback(Operation):
    """Calls ``function(step, time, state)`` on its trigger; a true result stops the run (status
    ``stopped``). The function may read values back to the host: that is its own cost."""

    phase = CALLBACK

    def __init__(self, function: Callable, every=1):
        if not callable(function):
            raise CapabilityError(f"a callback must be callable as f(step, time, state); received {function!r}")
        self.function = function
        self.trigger = as_trigger(every)

    def __call__(self, context):
        return bool(self.function(context.step, context.time, context.state))

    def __repr__(self) -> str:
        return f"Callback({getattr(self.function, '__name__', self.function)!r}, every={self.trigger!r})"


def progress_enabled(progress) -> bool:
    """Whether to show a progress bar: as asked, else on an interactive terminal and never under CI=true."""
    if progress is not None:
        return bool(progress)
    if os.environ.get("CI"):
        return False
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class Progress(Operation):
    """A tqdm progress bar over the run's steps; ``postfix(context) -> dict`` adds live numbers
    (read on the bar's refresh steps only, every ``refresh`` steps)."""

    phase = REPORT
    on_last = True

    def __init__(self, label: str, total: int, unit: str = "step", postfix: Callable | None = None,
                 refresh: int | None = None):
        self.label = label
        self.total = int(total)
        self.unit = unit
        self.postfix = postfix
        self.refresh = max(1, int(refresh)) if refresh else 1
        self.trigger = as_trigger(self.refresh)
        self.bar = None

    def start(self, context) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, initial=context.step, desc=self.label, unit=self.unit,
                        file=sys.stderr, dynamic_ncols=True)

    def __call__(self, context):
        if self.bar is None:
            return
        if self.postfix is not None:
            self.bar.set_postfix(self.postfix(context), refresh=False)
        self.bar.update(context.step - self.bar.n)

    def finish(self, context, status) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def observer_list(observers, default_every) -> list[Observer]:
    """Observers from Observer objects, registered names or callables, with unique names."""
    out = []
    for obs in observers:
        if isinstance(obs, Observer):
            pass
        elif isinstance(obs, str) or callable(obs):
            obs = Observer(obs)
        else:
            raise MeasureflowError(
                f"an observer is an Observer, a registered observable name or a callable; received {obs!r}"
            )
        out.append(obs.resolved(default_every))
    names = [o.name for o in out]
    if len(set(names)) != len(names):
        raise MeasureflowError(f"observer names must be unique; received {names}")
    return out

