"""The ``ray`` sweep executor: one Ray task per job (a run, or a packed batch of runs).

Install it with ``pip install -e ".[ray]"``. Options (``measureflow sweep --executor ray ...``):

``address``
    join an existing cluster (``auto`` for the one ``ray start`` launched on this node, or
    ``HOST:PORT`` of its head). Without it, $RAY_ADDRESS is joined when set, and otherwise a
    local cluster is started with this machine's cores (``num_cpus``, ``num_gpus`` override
    what Ray detects) and shut down when the sweep ends.
``gpus_per_run``
    GPUs each task reserves (fractions allowed: 0.25 puts four runs on one GPU). Ray sets
    CUDA_VISIBLE_DEVICES for the task, so a run sees only its own GPU — as ``cuda:0`` — and
    ``--device auto`` picks it; a task that reserves none sees no GPU.
``cpus_per_run``
    CPUs each task reserves (default 1); Ray gives the task as many intra-op threads.

Tasks are submitted at once and their results collected as they finish (``ray.wait``), so the
driver records each run in the sweep index as soon as it ends. A task is not retried: a run
that fails is recorded, and one whose worker died is reported as failed and resumes from its
checkpoint when the sweep is run again. If the driver is killed, Ray ends its tasks.
"""

from __future__ import annotations

import logging
import os

from measureflow.errors import ParameterError, PluginError
from measureflow.sweep import Executor
from measureflow.plugins import hookimpl
from measureflow.validators import check_nonnegative

INSTALL_HINT = 'pip install -e ".[ray]"'
WAIT_SECONDS = 0.5


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise PluginError(
            f"the ray executor needs Ray, which is not installed here ({exc}); install it with {INSTALL_HINT} "
            "(or pip install 'ray>=2.9'), or run the sweep with --executor serial"
        ) from None
    return ray


class RayExecutor(Executor):
    """Runs each job as a Ray task (see the module docstring for the options)."""

    name = "ray"

    def __init__(self, *, address: str | None = None, gpus_per_run: float = 0.0, cpus_per_run: float = 1.0,
                 num_cpus: int | None = None, num_gpus: int | None = None):
        for option, value in (("gpus_per_run", gpus_per_run), ("cpus_per_run", cpus_per_run)):
            check_nonnegative(value, f"--{option.replace('_', '-')}")
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        if self.address is not None and (num_cpus is not None or num_gpus is not None):
            raise ParameterError(
                "num_cpus / num_gpus size a local Ray cluster; an existing one (--address) has its own"
            )
        self.gpus_per_run = float(gpus_per_run)
        self.cpus_per_run = float(cpus_per_run)
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self._ray = _import_ray()
        self._started = False
        self._pending: dict = {}

    def __enter__(self):
        ray = self._ray
        if not ray.is_initialized():
            options = dict(include_dashboard=False, logging_level=logging.WARNING)
            if self.address is not None:
                ray.init(address=self.address, **options)
            else:
                ray.init(num_cpus=self.num_cpus or os.cpu_count() or 1, num_gpus=self.num_gpus, **options)
            self._started = True
        try:
            self._check_resources(ray.cluster_resources())
        except BaseException:
            self.close()
            raise
        return self

    def _check_resources(self, resources: dict) -> None:
        # A task asking for more than any node has would wait forever.
        wanted = (("GPU", self.gpus_per_run, "--gpus-per-run"), ("CPU", self.cpus_per_run, "--cpus-per-run"))
        for key, need, option in wanted:
            have = float(resources.get(key, 0))
            if need > have:
                raise ParameterError(
                    f"{option} {need:g}: the Ray cluster has {have:g} {key}(s) in all, so no run could start; "
                    f"lower {option} or join a cluster with {key}s (--address)"
                )

    def map_unordered(self, function, jobs):
        ray = self._ray
        # Ray may leave CUDA_VISIBLE_DEVICES alone for a task that reserves no GPU, which would then
        # see every GPU of its node: such a task hides them itself, as the option promises.
        hide_gpus = self.gpus_per_run == 0
        task = ray.remote(run_job).options(num_cpus=self.cpus_per_run, num_gpus=self.gpus_per_run, max_retries=0)
        self._pending = {task.remote(function, job, hide_gpus): job for job in jobs}
        while self._pending and not self.stopping.is_set():
            refs = list(self._pending)
            # Short waits, so that a SIGTERM of the driver is seen while runs go on.
            ready, rest = ray.wait(refs, num_returns=1, timeout=WAIT_SECONDS)
            if not ready:
                continue
            if rest:
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                ready += more
            for ref in ready:
                job = self._pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the engine lost this job; the others go on
                    result = exc
                yield job, result

    def close(self) -> None:
        ray = self._ray
        for ref in list(self._pending):
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - already finished or gone
                pass
        self._pending = {}
        if self._started:
            self._started = False
            ray.shutdown()


@hookimpl
def measureflow_register_executors(registry):
    registry.add_executor("ray", RayExecutor)


def run_job(function, job, hide_gpus: bool):
    """One task: ``function(job)``, with no GPU visible when ``hide_gpus`` (CUDA_VISIBLE_DEVICES
    emptied before the run touches CUDA). A module-level function, as ``ray.remote`` requires."""
    if hide_gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return function(job)
