"""The one run loop: simulations and training loops advance through the same steps.

Per-step order (a documented contract; operations may rely on it):

* **step 0** (before any step): observers that fire at step 0 measure the initial state (the others
  are measured once to learn their shape), writers open with every dataset declared, then writers
  that fire at step 0 write the initial state. A resumed run starts instead from its checkpoint's
  step, with its history, and writers drop what their file holds beyond that step.
* **step k = 1 … n**:

  1. the process advances the state (a solver's steps, an optimiser step);
  2. the health record takes the state's largest |value| on the device, without a host
     synchronisation;
  3. on a *check* step — the last step, every step where an operation that moves data to the host
     fires (writers, checkpoints), and every ``check_every`` steps when that is set — the record is
     read: an unhealthy state ends the run with status ``nonfinite`` or ``blowup`` naming the first
     offending step and time, and that state is neither observed nor written;
  4. the operations that fire run in phase order: observers, writers, checkpoint, callbacks,
     progress (:mod:`measureflow.run.operations`);
  5. stop requests are honoured: the process's own (:meth:`~measureflow.run.Process.stop_request`:
     a terminal event, status ``event``, with the step's state and time at the event; no
     checkpoint is saved then), a callback that returned true (``stopped``), the wall-clock budget
     (``time_budget``), SIGTERM or :meth:`RunLoop.request_stop` (``terminated``); the run then
     flushes its writers and saves a checkpoint when it has a checkpoint path, so ``resume``
     continues it.

A process may take several steps in one call (:meth:`~measureflow.run.Process.steps_at_once`: a
compiled fixed-step simulation); the loop then takes as many (a power of two) as it can without
skipping a step where an operation fires (progress bars aside, which catch up) or a check is due,
records the health peak of each, and treats the last as step k above. Stop requests (wall-clock
budget, SIGTERM) are then honoured at the end of such a run of steps.

A step that cannot be taken (:class:`~measureflow.errors.StepFailure`) ends the run with status
``step_failure`` — or with the health status when the state had already gone bad, the cause rather
than its symptom. Any other exception is recorded as ``interrupted`` in the writers' files, which are
closed with every frame written so far, and then propagates.
"""

from __future__ import annotations

import threading
import time as _time
from typing import Any

import attrs

from ..errors import MeasureflowError, StepFailure, TrajectoryFileError
from ..status import STATUS_COMPLETED, Status
from .health import Health
from .operations import REPORT, WRITE, Checkpoint, Observer, Progress, progress_enabled
from .process import Process
from .signals import install_sigterm
from .specs import Checkpointing, StopPolicy

__all__ = ["RunLoop", "RunOutcome", "RunContext"]


@attrs.frozen
class RunOutcome:
    """How a run went: its last healthy ``state`` at ``steps_done``, its ``status``, the observables'
    ``history`` (name → list of (step, time, value on the device)), ``wall_time`` and the step it
    was resumed from (None for a fresh run)."""

    state: Any
    status: Status
    steps_done: int
    history: dict
    wall_time: float
    resumed_from: int | None = None


class RunContext:
    """What operations see at a step: ``step``, ``time``, ``state``, ``last``, the values ``measured``
    at this step, the ``history``, ``observe_args`` (field, target), ``run_info`` (writers), and
    :meth:`frame` / :meth:`save_checkpoint`."""

    def __init__(self, loop: "RunLoop", history: dict):
        self.loop = loop
        self.process = loop.process
        self.history = history
        self.observe_args = loop.process.observe_args()
        self.step = 0
        self.time = loop.process.time_at(0)
        self.state = None
        self.last = False
        self.measured: dict = {}
        self.run_info = None

    def frame(self):
        return self.process.frame(self.state)

    def save_checkpoint(self) -> None:
        self.loop.save_checkpoint(self)


class RunLoop:
    """Runs ``process`` with ``operations`` under ``stop`` and ``checkpointing`` (module docstring).

    ``progress``: None shows a bar when stderr is a terminal (never under CI=true); True/False force it.
    """

    def __init__(self, process, operations=(), *, stop: StopPolicy | None = None,
                 checkpointing: Checkpointing | None = None, progress: bool | None = None):
        self.process = process
        self.stop = stop if stop is not None else StopPolicy()
        self.checkpointing = checkpointing if checkpointing is not None else Checkpointing()
        ops = list(operations)
        if self.checkpointing.path is not None:
            ops.append(Checkpoint(self.checkpointing.path, self.checkpointing.every))
        self.operations = ops
        self.progress = progress
        self._stop_flag = threading.Event()

    def request_stop(self) -> None:
        """Ask the loop to end cleanly at the end of the current step (as SIGTERM does)."""
        self._stop_flag.set()

    # -- checkpoints ------------------------------------------------------------------------------------
    def save_checkpoint(self, context: RunContext) -> None:
        from ..io.checkpoint import save_checkpoint

        for op in self.operations:
            op.flush()
        process = self.process
        payload = {
            "format": process.checkpoint_format,
            "fingerprint": process.fingerprint(),
            "step": int(context.step),
            "time": float(context.time),
            "process": process.state_dict(context.state),
            "history": {
                name: [(int(s), float(t), v.detach().cpu()) for s, t, v in entries]
                for name, entries in context.history.items()
            },
            "wall_time": float(self._earlier_time + (_time.monotonic() - self._started)),
        }
        save_checkpoint(self.checkpointing.path, payload)

    def _load_checkpoint(self, observers):
        from ..io.checkpoint import load_run_checkpoint

        process = self.process
        payload = load_run_checkpoint(self.checkpointing.path, owner=process.label,
                                      expected_format=process.checkpoint_format,
                                      fingerprint=process.fingerprint(), limit=process.n_steps,
                                      differs=getattr(process, "differs", "other parameters"),
                                      time_at=process.time_at)
        try:
            state = process.load_state_dict(payload["process"])
            device = process.health(state).device
            history = {o.name: [] for o in observers}
            for name, entries in payload["history"].items():
                history[name] = [(int(s), float(t), v.to(device)) for s, t, v in entries]
            return state, int(payload["step"]), history, float(payload.get("wall_time", 0.0))
        except MeasureflowError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
            # Contents that do not have the shape this run saved (a damaged or hand-edited file): one
            # line naming the file, not the traceback of the first access that trips on it.
            detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            raise TrajectoryFileError(
                f"checkpoint {self.checkpointing.path} is damaged: its contents cannot be restored ({detail}); "
                "delete it to start the run over"
            ) from None

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self) -> RunOutcome:
        process = self.process
        self._started = _time.monotonic()
        self._earlier_time = 0.0
        times = process.times()
        ops = self.operations
        for op in ops:
            op.resolve(times)
        observers = [op for op in ops if isinstance(op, Observer)]

        step = 0
        resumed = None
        ckpt = self.checkpointing
        if ckpt.resume and ckpt.path is not None and ckpt.path.exists():
            state, step, history, self._earlier_time = self._load_checkpoint(observers)
            resumed = step
        else:
            state = process.start()
            history = {o.name: [] for o in observers}
        health = Health(self.stop.blowup, process.health(state).device)

        context = RunContext(self, history)
        context.step, context.time, context.state = step, process.time_at(step), state
        context.last = step == process.n_steps
        if progress_enabled(self.progress) and step < process.n_steps:
            ops.append(Progress(process.label, process.n_steps, process.unit, process.postfix,
                                refresh=max(1, process.n_steps // 100)))
        ops.sort(key=lambda op: op.phase)

        started: list = []
        status = None
        step_done = step
        restore_signal = install_sigterm(self._stop_flag) if self.stop.sigterm else (lambda: None)
        try:
            # Step 0: measure, declare, open, write.
            shapes = {}
            for obs in observers:
                if resumed is None and obs.fires(step, context.time, context.last):
                    obs(context)
                elif history.get(obs.name):
                    obs.shape = obs.shape or tuple(history[obs.name][-1][2].shape)
                shapes[obs.name] = obs.declare(state, context.time, context.observe_args)
            context.run_info = process.run_info(state, shapes, resumed)
            for op in ops:
                op.start(context)
                started.append(op)
            if resumed is None:
                for op in ops:
                    if op.phase == WRITE and op.fires(step, context.time, context.last):
                        op(context)
                context.measured = {}

            check_every = self.stop.check_every
            wall_time = self.stop.wall_time
            syncing = [op for op in ops if op.reads_host]
            n = process.n_steps
            # What must see every state it fires on (a progress bar catches up at the next it sees).
            due = [op for op in ops if op.phase != REPORT]
            # A trigger that may do more than answer (not Trigger.pure: a user's function or subclass)
            # is never asked about steps ahead: such a run steps one at a time.
            looks_ahead = all(getattr(getattr(op, "trigger", None), "pure", False) for op in due)
            while step < n:
                k = self._steps_at_once(step, times, due, check_every) if looks_ahead else 1
                try:
                    if k == 1:
                        new_state, peaks = process.advance(state, step), None
                    else:
                        new_state, peaks = process.advance_steps(state, step, k)
                except StepFailure as exc:
                    status = self._health_status(health, state) or Status(
                        "step_failure", step + 1, float(getattr(exc, "time", process.time_at(step + 1))), str(exc))
                    break
                step += k
                t = process.time_at(step)
                last = step == n
                requested = process.stop_request()
                if requested is not None:
                    # The process ended the run inside this step (a terminal event): the state is at
                    # the requested time, and it is the last one observed and written.
                    t, last = requested.time, True
                if peaks is None:
                    health.record(process.health(new_state), step)
                else:
                    health.record_peaks(peaks, step - k + 1)
                if last or (check_every is not None and step % check_every == 0) or any(
                        op.fires(step, t, last) for op in syncing):
                    # The state one step before is held only after a single step.
                    status = self._health_status(health, new_state, state if k == 1 else None, step)
                    if status is not None:
                        break
                state, step_done = new_state, step
                context.step, context.time, context.state, context.last = step, t, state, last
                stop = None
                for op in ops:
                    if op.fires(step, t, last) and op(context):
                        stop = Status("stopped", step, t, "a callback asked the run to stop")
                if context.measured:
                    context.measured = {}
                if stop is None and requested is not None:
                    stop = requested
                if stop is None and wall_time is not None and _time.monotonic() - self._started > wall_time:
                    stop = Status("time_budget", step, t, f"wall-clock budget of {wall_time:g} s reached")
                if stop is None and self._stop_flag.is_set():
                    stop = Status("terminated", step, t, "SIGTERM received; stopped cleanly")
                if stop is not None:
                    # Never checkpoint a state that went bad since the last check.
                    status = self._health_status(health, state) or stop
                    if status is stop and stop is not requested and ckpt.path is not None:
                        self.save_checkpoint(context)
                    break
            if status is None:
                status = Status(STATUS_COMPLETED, step, process.time_at(step))
                if ckpt.at_end and ckpt.path is not None and step > (resumed or 0):
                    self.save_checkpoint(context)
        except BaseException as exc:
            if status is None:
                status = Status("interrupted", step_done, process.time_at(step_done),
                                f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            raise
        finally:
            restore_signal()
            errors = []
            for op in reversed(started):
                try:
                    op.finish(context, status)
                except Exception as exc:  # noqa: BLE001 - finish every operation, then report
                    errors.append(exc)
            if errors and status is not None and status.code != "interrupted":
                raise errors[0]
        return RunOutcome(
            state=state,
            status=status,
            steps_done=step_done,
            history=history,
            wall_time=self._earlier_time + (_time.monotonic() - self._started),
            resumed_from=resumed,
        )

    def _steps_at_once(self, step: int, times, ops, check_every) -> int:
        """How many steps to take from ``step`` in one call: as many as the process allows (a
        compiled fixed-step simulation: several in one graph) while no operation fires and no check
        is due before the last of them, rounded down to a power of two (few graph lengths to
        compile). The steps where something is due are the same as stepping one at a time. Asked
        only where every trigger of ``ops`` is :attr:`~measureflow.triggers.Trigger.pure`."""
        limit = min(self.process.steps_at_once(step), self.process.n_steps - step)
        for j in range(1, limit):
            s = step + j
            if (check_every is not None and s % check_every == 0) or any(op.fires(s, times[s], False) for op in ops):
                limit = j
                break
        return 1 << (max(limit, 1).bit_length() - 1)

    def _health_status(self, health: Health, state=None, previous=None, step: int | None = None) -> Status | None:
        """The status of the first unhealthy step recorded, or None. ``state`` is the state at
        ``step`` and ``previous`` the one before it: when the first bad step is ``step`` itself,
        ``previous`` is finite and the process can say whether the field or the step was at fault."""
        found = health.first_bad()
        if found is None:
            return None
        bad, kind = found
        t = self.process.time_at(bad)
        if kind == "nonfinite":
            if state is None:
                message = Process.diagnose(self.process, bad, None)
            else:
                message = self.process.diagnose(bad, state, previous if bad == step else None)
            return Status("nonfinite", bad, t, message)
        return Status("blowup", bad, t, f"max |value| exceeded the blow-up bound {self.stop.blowup:g}")

