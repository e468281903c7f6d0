"""Runs and sweeps never overwrite, invent or silently accept: the reproductions of the issue
"files any HDF5 tool opens after any failure, no hang, no silent wrong result", each as a test.

A tiny deterministic scenario (40 rk4 steps of 30 particles under a linear field) keeps every run
well under a second; the runs that must overlap in time slow it with a sleeping field term.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from measureflow import cli
from measureflow.errors import MeasureflowError, TrajectoryFileError
from measureflow.io import load_checkpoint, save_checkpoint
from measureflow.io import h5md as h5md_module
from measureflow.io.reader import open_trajectory
from measureflow.scenario import load_scenarios
from measureflow.sweep import run_sweep, sweep_table

TINY = textwrap.dedent(
    '''
    """A tiny deterministic run: particles under a stable linear field."""
    import time
    import torch
    import measureflow
    from measureflow import Field, Particles, Simulation, scenario

    class Sleepy(Field):
        name = "sleepy"
        def __init__(self, pause):
            self.pause = pause
        def velocity(self, t, x, state):
            time.sleep(self.pause)
            return torch.zeros_like(x)

    @scenario
    def tiny(n: int = 30, steps: int = 40, pause: float = 0.0, seed: int = 0, out: str = "tiny.h5",
             picture: str = "") -> Simulation:
        """Particles under a linear field."""
        x = torch.randn(1, n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        A = torch.tensor([[-0.5, -2.0], [1.0, -0.5]], dtype=torch.float64)
        field = measureflow.field("linear", A=A, b=torch.zeros(2, dtype=torch.float64))
        if pause:
            field = field + Sleepy(pause)
        writer = measureflow.get_registry().writer("h5md", out, every=2)
        return Simulation(Particles(x), field, "rk4", 0.0, 1.0, steps=steps, writers=[writer],
                          observers=["mean"], observe_every=2, seed=seed)
    '''
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("scenario") / "tiny.py"
    path.write_text(TINY)
    return path


def run(tiny, out, *options, sets=()):
    """``measureflow run tiny.py --set out=OUT ...`` in this process; returns the exit code."""
    argv = ["run", str(tiny), "--set", f"out={out}", "--no-progress", *options]
    for item in sets:
        argv += ["--set", item]
    return cli.main(argv)


def one_line_error(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("measureflow: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def frames(path) -> dict:
    """Every time-dependent dataset (what must be bit-identical across an interruption)."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and name.split("/")[0] in ("particles", "observables"):
                out[name] = obj[()]
        f.visititems(visit)
    return out


def assert_same(a, b):
    fa, fb = frames(a), frames(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    """The uninterrupted run, to compare resumed runs with."""
    out = tmp_path_factory.mktemp("straight") / "straight.h5"
    assert run(tiny, out) == 0
    return out


def stopped_run(tiny, out, at=20, **params):
    """A run stopped cleanly at step ``at`` with its checkpoint beside its file (as SIGTERM leaves it)."""
    (scn,) = load_scenarios(tiny).values()
    sim = scn(out=str(out), **params).with_checkpoint(str(out) + ".ckpt", every=10)
    sim = sim.with_options(callbacks=[lambda step, t, state: step >= at], progress=False)
    result = sim.run()
    assert result.status.code == "stopped" and result.steps_done == at
    assert Path(str(out) + ".ckpt").exists()
    return out


# -- hangs and data loss ----------------------------------------------------------------------------
def test_resume_onto_a_half_truncated_file_refuses_and_keeps_it(tiny, tmp_path, capsys):
    out = stopped_run(tiny, tmp_path / "r.h5")
    with open(out, "r+b") as handle:
        handle.truncate(os.path.getsize(out) // 2)
    before = out.read_bytes()
    assert run(tiny, out, "--resume") == 2
    line = one_line_error(capsys, str(out), "cannot resume at step 20", "--restart")
    # The lost frames are named by their steps when what remains of the file still holds the step
    # numbers and the chunk index; otherwise the truncation itself is named.
    assert re.search(r"cut short and the frames of steps \d+ … 20, which", line) or "is truncated" in line, line
    assert out.read_bytes() == before


def test_resume_of_a_damaged_finished_file_without_checkpoint_refuses(tiny, straight, tmp_path, capsys):
    for damage in ("superblock", "tail"):
        out = tmp_path / f"{damage}.h5"
        shutil.copyfile(straight, out)
        data = bytearray(out.read_bytes())
        if damage == "superblock":
            data[:96] = bytes(96)
        else:
            data[-4096:] = bytes(range(256)) * 16
        out.write_bytes(bytes(data))
        assert run(tiny, out, "--resume") == 2
        one_line_error(capsys, str(out), "cannot resume", "--restart")
        assert out.read_bytes() == bytes(data)  # not started over, not overwritten
    # --restart starts over, and gives the straight run.
    assert run(tiny, out, "--resume", "--restart") == 0
    assert_same(straight, out)


def test_a_new_run_replaces_a_finished_file_only_when_it_ends(tiny, straight, tmp_path, capsys, monkeypatch):
    out = tmp_path / "done.h5"
    shutil.copyfile(straight, out)
    before = out.read_bytes()
    real = h5md_module.H5MDWriter._commit
    calls = {"n": 0}

    def failing_commit(self):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self)

    # A run that fails (the disk fills up) leaves the earlier file as it was, and no temporary.
    monkeypatch.setattr(h5md_module.H5MDWriter, "_commit", failing_commit)
    assert run(tiny, out, sets=["seed=1"]) == 2
    one_line_error(capsys, "ENOSPC")
    monkeypatch.undo()
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.h5", "done.h5.ckpt"]
    # A run that ends replaces it.
    assert run(tiny, out, sets=["seed=1"]) == 0
    with open_trajectory(out) as traj:
        assert traj.parameters["seed"] == 1 and traj.status.code == "completed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.h5"]


def test_resume_onto_a_finished_file_compares_the_fingerprint(tiny, straight, tmp_path, capsys):
    out = tmp_path / "done.h5"
    shutil.copyfile(straight, out)
    before = out.read_bytes()
    # The same run: nothing to do, and the file is not rewritten.
    assert run(tiny, out, "--resume") == 0
    assert "already completed" in capsys.readouterr().err
    assert out.read_bytes() == before
    # Other parameters: refused, whatever they are.
    for change in ("seed=1", "n=31", "steps=41"):
        assert run(tiny, out, "--resume", sets=[change]) == 2
        one_line_error(capsys, str(out), "other parameters", "without --resume")
        assert out.read_bytes() == before


def test_a_moved_run_still_resumes_and_is_still_done(tiny, straight, tmp_path, capsys):
    first = tmp_path / "a"
    out = stopped_run(tiny, first / "m.h5")
    moved = tmp_path / "b"
    shutil.move(first, moved)
    assert run(tiny, moved / "m.h5", "--resume") == 0  # the fingerprint does not hold the paths
    assert_same(straight, moved / "m.h5")
    shutil.move(moved, tmp_path / "c")
    assert run(tiny, tmp_path / "c" / "m.h5", "--resume") == 0
    assert "already completed" in capsys.readouterr().err
    del out


def test_checkpoints_are_verified(tiny, straight, tmp_path, capsys):
    out = stopped_run(tiny, tmp_path / "c.h5")
    ckpt = Path(str(out) + ".ckpt")
    good = ckpt.read_bytes()
    # One changed byte inside the stored tensors: the checksum refuses it.
    data = bytearray(good)
    data[len(data) // 2] ^= 0x40
    ckpt.write_bytes(bytes(data))
    assert run(tiny, out, "--resume") == 2
    one_line_error(capsys, str(ckpt))
    # A valid-looking checkpoint whose step lies past the file's frames: refused, naming the steps.
    ckpt.write_bytes(good)
    payload = load_checkpoint(ckpt)
    payload["step"], payload["time"] = 30, 0.75
    save_checkpoint(ckpt, payload)
    assert run(tiny, out, "--resume") == 2
    one_line_error(capsys, "cannot resume at step 30", "steps 22, 24, 26, 28, 30")
    # A step beyond the run, and a time off the grid.
    payload["step"], payload["time"] = 99999, 0.75
    save_checkpoint(ckpt, payload)
    assert run(tiny, out, "--resume") == 2
    one_line_error(capsys, "99999")
    payload["step"], payload["time"] = 20, 0.51
    save_checkpoint(ckpt, payload)
    assert run(tiny, out, "--resume") == 2
    one_line_error(capsys, "grid")
    # The trajectory deleted: the checkpoint cannot resume it (steps 0 … 20 would be missing).
    ckpt.write_bytes(good)
    out.unlink()
    assert run(tiny, out, "--resume") == 2
    one_line_error(capsys, "cannot resume at step 20", "steps 0 … 20")
    assert not out.exists()
    # With everything intact the resume gives the straight run.
    stopped_run(tiny, out)
    assert run(tiny, out, "--resume") == 0
    assert_same(straight, out)


# -- concurrency ------------------------------------------------------------------------------------
def child_env() -> dict:
    import measureflow

    root = str(Path(measureflow.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
            "OMP_NUM_THREADS": "1"}


def wait_for(path: Path, proc, limit=60.0):
    start = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - start < limit, f"{path} never appeared"
        time.sleep(0.02)


def test_a_second_run_on_the_same_output_is_refused_at_once(tiny, tmp_path, capsys):
    out = tmp_path / "shared.h5"
    first = subprocess.Popen(
        [sys.executable, "-m", "measureflow", "run", str(tiny), "--set", f"out={out}", "--set", "pause=0.02",
         "--no-progress"], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(Path(str(out) + ".lock"), first)
        assert run(tiny, out, "--overwrite", sets=["seed=1", "pause=0.02"]) == 2
        one_line_error(capsys, str(out), f"in use by process {first.pid}")
        assert first.wait(timeout=120) == 0, first.communicate()
    finally:
        if first.poll() is None:
            first.kill()
    with open_trajectory(out) as traj:  # the first run's file, whole
        assert traj.status.code == "completed" and traj.parameters["seed"] == 0 and len(traj) == 21
    assert not Path(str(out) + ".lock").exists()


def test_a_second_sweep_into_the_same_directory_is_refused(tiny, tmp_path):
    out = tmp_path / "sweep"
    first = subprocess.Popen(
        [sys.executable, "-m", "measureflow", "sweep", str(tiny), "--grid", "n=20,21", "--set", "pause=0.02",
         "--out", str(out), "--no-progress"], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        wait_for(out / "sweep.json.lock", first)
        with pytest.raises(MeasureflowError, match=f"in use by process {first.pid}"):
            run_sweep(tiny, {"n": [20, 21]}, "0", out, fixed={"pause": "0.02"}, progress=False)
        assert first.wait(timeout=120) == 0, first.communicate()
    finally:
        if first.poll() is None:
            first.kill()
    table = sweep_table(out)
    assert [row["status"] for row in table.rows] == ["completed", "completed"]


# -- sweeps trust their files -----------------------------------------------------------------------
def test_a_sweep_decides_done_from_the_files(tiny, tmp_path):
    out = tmp_path / "sweep"
    report = run_sweep(tiny, {"n": [20, 21]}, "0", out, progress=False)
    assert report.ok and report.skipped == 0
    index = json.loads((out / "sweep.json").read_text())
    files = [out / record["file"] for record in index["runs"].values()]
    good = files[0].read_bytes()
    files[0].write_bytes(b"")  # a run the index calls completed, whose file is empty
    with open(files[1], "r+b") as handle:  # and one whose file is cut short
        handle.truncate(os.path.getsize(files[1]) // 2)
    table = sweep_table(out)
    assert [row["status"] for row in table.rows] == ["damaged", "damaged"]
    assert all(row.get("mean[0]") is None for row in table.rows)
    report = run_sweep(tiny, {"n": [20, 21]}, "0", out, progress=False)
    assert report.ok and report.skipped == 0  # both run again
    assert files[0].read_bytes() == good  # the same run again: the same file
    report = run_sweep(tiny, {"n": [20, 21]}, "0", out, progress=False)
    assert report.skipped == 2
    assert [row["status"] for row in sweep_table(out).rows] == ["completed", "completed"]
    # A stopped run whose file was then cut short: its checkpoint cannot continue it, so it starts over.
    record = next(iter(index["runs"].values()))
    (scn,) = load_scenarios(tiny).values()
    sim = scn(**record["parameters"]).with_checkpoint(str(files[0]) + ".ckpt", every=10)
    assert sim.with_options(callbacks=[lambda step, t, state: step >= 20], progress=False).run().steps_done == 20
    with open(files[0], "r+b") as handle:
        handle.truncate(os.path.getsize(files[0]) // 2)
    report = run_sweep(tiny, {"n": [20, 21]}, "0", out, progress=False)
    assert report.ok and report.skipped == 1
    assert files[0].read_bytes() == good


def test_collect_writes_no_spreadsheet_formulas(tmp_path):
    from measureflow.sweep.collect import SweepTable

    rows = [{"x": "=HYPERLINK(\"http://x\")", "label": 0, "status": "+cmd", "wall_time": -1.5,
             "y": "-2.5", "z": "@SUM(A1)", "file": "\tfile.h5"},
            {"x": "-", "label": 1, "status": "completed", "wall_time": 0.25, "y": -3, "z": "plain", "file": "a.h5"}]
    lines = SweepTable(rows, ["x"], {}, ["y", "z"]).to_csv().splitlines()
    assert lines[1] == "\"'=HYPERLINK(\"\"http://x\"\")\",0,'+cmd,-1.5,-2.5,'@SUM(A1),'\tfile.h5"
    assert lines[2] == "'-,1,completed,0.25,-3,plain,a.h5"  # numbers, negative ones too, stay numbers


# -- disk full and other I/O errors -----------------------------------------------------------------
def test_disk_full_is_one_line_and_the_run_resumes(tiny, straight, tmp_path, capsys, monkeypatch):
    out = tmp_path / "full.h5"
    real = h5md_module.H5MDWriter._commit
    calls = {"n": 0}

    def failing_commit(self):
        calls["n"] += 1
        if calls["n"] > 5:  # after four checkpoints (one commit at open, one per checkpoint) the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self)

    monkeypatch.setattr(h5md_module.H5MDWriter, "_commit", failing_commit)
    assert run(tiny, out) == 2
    one_line_error(capsys, str(out), "ENOSPC", "No space left on device", "--resume")
    assert Path(str(out) + ".ckpt").exists()
    with open_trajectory(out) as traj:
        committed = len(traj)
        assert committed > 0 and traj.status.code == "interrupted"
    monkeypatch.setattr(h5md_module.H5MDWriter, "_commit", real)
    assert run(tiny, out, "--resume") == 0
    assert_same(straight, out)


# -- files any HDF5 tool opens after a kill ---------------------------------------------------------
def test_sigkilled_run_is_repaired_for_any_hdf5_tool_and_resumes(tiny, straight, tmp_path, capsys):
    out = tmp_path / "killed.h5"
    proc = subprocess.Popen(
        [sys.executable, "-m", "measureflow", "run", str(tiny), "--set", f"out={out}", "--set", "pause=0.02",
         "--no-progress"], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(Path(str(out) + ".ckpt"), proc)  # past the first checkpoint
        time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert cli.main(["info", str(out)]) == 0
    assert "measureflow repair" in capsys.readouterr().out
    assert cli.main(["repair", str(out)]) == 0
    assert "any HDF5 tool opens it" in capsys.readouterr().out
    with h5py.File(out, "r") as f:  # a plain open: no "open for write" flag left
        n = f["measureflow/committed"][0]
        assert n >= 1 and f["particles/trajectory/position/value"].shape[0] == n
    try:
        import pyh5md
    except ImportError:
        pyh5md = None
    if pyh5md is not None:
        with pyh5md.File(str(out), "r") as f:
            assert pyh5md.element(f.particles_group("trajectory"), "position").value.shape[0] == n
    with open_trajectory(out) as traj:
        assert traj.status.code == "interrupted" and not traj.unclosed
    assert run(tiny, out, "--resume", sets=["pause=0.02"]) == 0
    assert_same(straight, out)


# -- output hygiene ---------------------------------------------------------------------------------
def test_writer_paths_must_name_an_hdf5_file(tiny, tmp_path, capsys):
    assert run(tiny, tmp_path / "x.txt") == 2
    one_line_error(capsys, "x.txt", ".h5")
    assert not (tmp_path / "x.txt").exists()


def test_info_escapes_control_characters(straight, tmp_path, capsys):
    out = tmp_path / "ctl.h5"
    shutil.copyfile(straight, out)
    with h5py.File(out, "r+") as f:
        f["measureflow/status"].attrs["message"] = "evil\x1b[2J\n  status       fake\x07"
    assert cli.main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "\x1b" not in text and "\x07" not in text
    assert "evil\\x1b[2J\\n  status       fake\\x07" in text
    assert sum(line.lstrip().startswith("status") for line in text.splitlines()) == 1


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import torch

    path = tmp_path / "run.ckpt"
    save_checkpoint(path, {"step": 1})

    real = torch.save

    def no_space(obj, handle):
        if isinstance(handle, io.BytesIO):  # serialising in memory works; the disk is full
            return real(obj, handle)
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(TrajectoryFileError, match=r"run.ckpt: cannot write the checkpoint \(ENOSPC"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path) == {"step": 1}
    assert not list(tmp_path.glob("*.tmp-*"))


def test_a_disk_too_full_for_the_next_flush_is_refused_before_hdf5_writes(tiny, straight, tmp_path, capsys,
                                                                           monkeypatch):
    import collections

    out = tmp_path / "nearly-full.h5"
    real = os.statvfs
    calls = {"n": 0}
    Fake = collections.namedtuple("Fake", "f_bavail f_frsize")

    def statvfs(path):
        calls["n"] += 1
        return Fake(10, 4096) if calls["n"] > 4 else real(path)  # 40 KiB left after four flushes

    monkeypatch.setattr(h5md_module.os, "statvfs", statvfs)
    assert run(tiny, out) == 2
    one_line_error(capsys, str(out), "bytes needed, 40960 free", "ENOSPC", "--resume")
    monkeypatch.undo()
    with h5py.File(out, "r") as f:  # closed cleanly: no HDF5 write failed halfway
        assert f["measureflow/status"].attrs["status"] == b"interrupted"
    assert run(tiny, out, "--resume") == 0
    assert_same(straight, out)
