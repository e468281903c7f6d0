"""Executors: what runs the jobs of a sweep (DESIGN.md "Sweeps and distribution").

An executor is registered like any plugin, through ``measureflow_register_executors``; this
module registers ``serial`` (the default: every job in the driver's process, one after the
other, needing nothing), ``measureflow_plugins.ray_executor`` registers ``ray``. The interface
is small so that another engine fits through the same hook:

.. code-block:: python

    class MyExecutor(measureflow.sweep.Executor):
        name = "mine"

        def __init__(self, *, workers: int = 4):  # keyword options, from the command line
            ...

        def __enter__(self):                      # optional: start or join the engine
            return self

        def close(self):                          # optional: release it (called by __exit__)
            ...

        def map_unordered(self, function, jobs):  # required
            # call function(job) for every job, wherever the engine puts it, and yield
            # (job, its return value) — or (job, the exception) when the engine lost it —
            # as each finishes, in any order
            ...

    @measureflow.hookimpl
    def measureflow_register_executors(registry):
        registry.add_executor("mine", MyExecutor)

The contract:

* ``function`` is a module-level function (picklable by reference) and ``job`` plain picklable
  data (:class:`measureflow.sweep.Job`); ``function`` catches the runs' own errors and
  returns their outcomes, so an exception reaching the executor means the engine lost the job
  (a killed worker, a lost node): yield it and go on with the others.
* Only the driver writes the sweep's index; executors never touch it. A job writes its runs'
  files and checkpoints, so it must execute where the sweep directory is reachable (a shared
  file system on a cluster).
* The driver may stop iterating early (SIGTERM, a terminated run): ``close`` then cancels what
  is still queued; runs killed mid-way resume from their checkpoints next time. On SIGTERM the
  driver sets the event :attr:`Executor.stopping`; an executor that blocks while it waits for
  results should wait in short slices and return when it is set.
* Options reach the constructor as keyword arguments (``measureflow sweep --executor ray
  --address ... --gpus-per-run 0.5``); an option the constructor does not take is refused with
  the list of those it does.
"""

from __future__ import annotations

import abc
import inspect
import threading
from typing import Any, Callable, Iterable, Iterator

from ..errors import ParameterError
from ..plugins import get_registry, hookimpl

__all__ = ["Executor", "SerialExecutor", "make_executor"]


class Executor(abc.ABC):
    """Base class of sweep executors (see the module docstring for the contract): a subclass
    defines :meth:`map_unordered`, and may override ``__enter__`` and :meth:`close`."""

    name = "executor"

    @property
    def stopping(self) -> threading.Event:
        """Set by the driver when the sweep must stop (SIGTERM)."""
        event = self.__dict__.get("_stopping")
        if event is None:
            event = self.__dict__["_stopping"] = threading.Event()
        return event

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def close(self) -> None:
        """Release the engine and cancel queued jobs; calling it twice is harmless."""

    @abc.abstractmethod
    def map_unordered(self, function: Callable, jobs: Iterable) -> Iterator[tuple[Any, Any]]:
        """Yield ``(job, function(job))`` — or ``(job, exception)`` — for every job as it finishes."""


class SerialExecutor(Executor):
    """Every job in this process, one after the other (the default; needs nothing)."""

    name = "serial"

    def map_unordered(self, function, jobs):
        for job in jobs:
            if self.stopping.is_set():
                return
            try:
                result = function(job)
            except Exception as exc:  # noqa: BLE001 - reported for this job; the others go on
                result = exc
            yield job, result


def make_executor(name: str, **options) -> Executor:
    """Build the registered executor ``name`` with ``options`` (refusing options it does not take)."""
    factory = get_registry().get("executors", name)
    try:
        inspect.signature(factory).bind(**options)
    except TypeError:
        params = [p.name for p in inspect.signature(factory).parameters.values()
                  if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        given = ", ".join(sorted(options))
        raise ParameterError(
            f"executor {name!r} does not take the option(s) {given}; its options are: "
            f"{', '.join(params) or '(none)'}"
        ) from None
    return factory(**options)


@hookimpl
def measureflow_register_executors(registry):
    registry.add_executor("serial", SerialExecutor)
