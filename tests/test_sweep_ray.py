"""Sweeps on a real local Ray cluster (one per test session): completed and failing runs, a run
whose worker is killed (SIGKILL) mid-way, a sweep whose driver is killed (SIGKILL), each resumed by
the next sweep, and files identical to serial runs."""

import logging
import os
import signal
import threading
import time
from pathlib import Path

import h5py
import pytest

from measureflow import ParameterError
from measureflow.sweep import SweepIndex, run_sweep
from test_sweep import TINY, assert_same_files

ray = pytest.importorskip("ray")


@pytest.fixture(scope="session")
def ray_address():
    """A two-CPU local cluster shared by the session's Ray tests; the sweeps join it."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("scenario") / "tiny.py"
    path.write_text(TINY)
    return path


def test_ray_runs_complete_fail_alone_and_match_serial_files(tiny, tmp_path, ray_address):
    grid = {"sigma": ["0.5", "1"], "fail": ["false", "true"]}
    report = run_sweep(tiny, grid, "0", tmp_path / "ray", executor="ray", progress=False)
    assert report.counts == {"completed": 2, "failed": 2} and ray.is_initialized()
    runs = SweepIndex.load(tmp_path / "ray").runs
    failed = [r for r in runs.values() if r["status"] == "failed"]
    assert len(failed) == 2 and all("fails on purpose" in r["message"] and "Traceback" in r["error"] for r in failed)
    serial = run_sweep(tiny, grid, "0", tmp_path / "serial", progress=False)
    assert serial.counts == report.counts
    assert_same_files(tmp_path / "serial", tmp_path / "ray")
    mine = SweepIndex.load(tmp_path / "serial").runs
    assert all(mine[k]["observables"] == runs[k]["observables"] for k in runs)
    with pytest.raises(ParameterError, match="--gpus-per-run 1: the Ray cluster has 0 GPU"):
        run_sweep(tiny, {}, "0", tmp_path / "gpu", executor="ray", executor_options={"gpus_per_run": 1}, progress=False)


def _holder(path: Path) -> int | None:
    """The process that holds ``path`` open (Linux /proc), other than this one."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd")):
                return int(pid)
        except OSError:
            continue
    return None


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the run's worker through /proc")
def test_killed_ray_run_is_reported_and_resumes_to_the_serial_files(tiny, tmp_path, ray_address):
    grid = {"pause": ["0.04"]}
    out = tmp_path / "killed"
    killed = {}

    def kill_a_worker():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            for checkpoint in out.glob("*.h5.ckpt"):
                file = checkpoint.with_suffix("")
                time.sleep(0.2)  # mid-run, past its first checkpoint
                pid = _holder(file)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    killed[file.name] = pid
                    return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_a_worker)
    killer.start()
    first = run_sweep(tiny, grid, "0-2", out, executor="ray", progress=False)
    killer.join()
    (name,) = killed
    assert first.counts == {"completed": 2, "failed": 1}
    ((key, status, message),) = first.unfinished
    assert f"{key}.h5" == name and status == "failed" and "WorkerCrashedError" in message
    assert (out / (name + ".ckpt")).exists()
    again = run_sweep(tiny, grid, "0-2", out, executor="ray", progress=False)
    assert again.ok and again.skipped == 2 and again.counts == {"completed": 1}
    assert not list(out.glob("*.ckpt"))
    with h5py.File(out / name, "r") as f:
        assert list(f["measureflow/status"].attrs["resumed_from"])
    reference = run_sweep(tiny, grid, "0-2", tmp_path / "serial", progress=False)
    assert reference.ok
    assert_same_files(tmp_path / "serial", out)


def test_killed_ray_sweep_driver_resumes_to_the_serial_files(tiny, tmp_path, ray_address):
    # The sweep's own process (the Ray driver, joined to the session's cluster through --address) is
    # killed with SIGKILL while a run is past its first checkpoint; the cluster then reaps that driver's
    # tasks. Re-running the same command resumes the interrupted run from its checkpoint and gives the
    # files an uninterrupted serial sweep writes.
    import subprocess
    import sys

    grid = {"pause": ["0.04"]}
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "measureflow", "sweep", str(tiny), "--grid", "pause=0.04",
                             "--seeds", "0-2", "--out", str(out), "--no-progress", "--executor", "ray",
                             "--address", ray_address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 90
    while not list(out.glob("*.h5.ckpt")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no run ever checkpointed"
        time.sleep(0.01)
    time.sleep(0.2)  # mid-run, past a first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    interrupted = {p.name[: -len(".ckpt")] for p in out.glob("*.h5.ckpt")}
    assert interrupted
    # Wait until the dead driver's tasks have let go of every file of the sweep (a task may have been
    # between runs, or just opened its file, when the driver died) before the next sweep writes them.
    deadline = time.monotonic() + 60
    while any(_holder(p) is not None for p in out.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    again = run_sweep(tiny, grid, "0-2", out, executor="ray", progress=False)
    assert again.ok and not list(out.glob("*.ckpt")), (again.counts, again.unfinished)
    for name in interrupted:
        with h5py.File(out / name, "r") as f:
            assert list(f["measureflow/status"].attrs["resumed_from"])
    assert run_sweep(tiny, grid, "0-2", tmp_path / "serial", progress=False).ok
    assert_same_files(tmp_path / "serial", out)
