"""Damaged, truncated, killed and contested trajectory files: never a hang, never a silent wrong result.

Every open of a damaged file runs in a forked child with a time limit, so a reader that spins fails
the test instead of hanging the suite.
"""

from __future__ import annotations

import multiprocessing
import shutil
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import measureflow as mf
from measureflow.errors import TrajectoryFileError
from measureflow.io import RunInfo
from measureflow.io.h5md import H5MDWriter
from measureflow.io.reader import open_trajectory

R, N, D = 2, 40, 3
#: Seconds an open may take before the test calls it a hang (an open takes milliseconds; the
#: margin covers a loaded machine, and a spinning reader never returns at all).
OPEN_LIMIT = 20.0


def frame(step: int) -> torch.Tensor:
    base = torch.arange(R * N * D, dtype=torch.float64).reshape(R, N, D)
    return 1.0 + step + 1e-3 * base  # never zero: a frame of zeros is a chunk read past the end


def info(**kwargs) -> RunInfo:
    return RunInfo(kind="particles", replicas=R, size=N, dim=D, parameters={"seed": 1},
                   observable_names=["energy"], observable_shapes={"energy": (R,)}, **kwargs)


def write(writer: H5MDWriter, steps) -> None:
    for s in steps:
        x = frame(s)
        writer.write_frame(s, 0.1 * s, mf.Particles(x))
        writer.write_observables(s, 0.1 * s, {"energy": x.sum(dim=(1, 2))})


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, bytes]:
    """A finished file and the file a killed writer leaves (a copy taken while it held the file)."""
    root = tmp_path_factory.mktemp("safety")
    finished = root / "finished.h5"
    writer = H5MDWriter(finished, flush_frames=4, flush_seconds=None)
    writer.open(info())
    write(writer, range(60))
    writer.set_status("completed", 59, 5.9)
    writer.close()
    live = root / "live.h5"
    writer = H5MDWriter(live, flush_frames=4, flush_seconds=None)
    writer.open(info())
    write(writer, range(60))
    writer.flush()
    killed = root / "killed.h5"
    shutil.copyfile(live, killed)  # what a SIGKILL leaves: the flushed file, still flagged "open for write"
    writer.close()
    return {"finished": finished.read_bytes(), "killed": killed.read_bytes()}


def _open_in_child(path: str, conn) -> None:
    try:
        with open_trajectory(path) as traj:
            n = len(traj)
            frames = traj.positions[:] if n else np.zeros((0, R, N, D))
            conn.send(("ok", n, frames, traj.steps.tolist()))
    except TrajectoryFileError as exc:
        conn.send(("error", str(exc)))
    except BaseException:  # noqa: BLE001 - reported to the parent as a failure
        conn.send(("raised", traceback.format_exc()))


def open_with_limit(path: Path):
    """Open ``path`` in a forked child; fail if it has not answered within OPEN_LIMIT seconds."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_open_in_child, args=(str(path), child))
    proc.start()
    child.close()
    ready = parent.poll(OPEN_LIMIT)
    if not ready:
        proc.kill()
        proc.join()
        pytest.fail(f"opening {path} did not return within {OPEN_LIMIT} s (the reader hangs)")
    answer = parent.recv()
    proc.join()
    return answer


def check_answer(answer, path: Path):
    if answer[0] == "raised":
        pytest.fail(f"opening {path} raised something other than a one-line TrajectoryFileError:\n{answer[1]}")
    if answer[0] == "error":
        message = answer[1]
        assert "\n" not in message and str(path) in message, message
        assert "delete" in message or "restore" in message or "not an HDF5 file" in message, message
        return
    _, n, frames, steps = answer
    # Whatever opens must be true: consecutive steps and every frame what was written (no zeros).
    assert steps == list(range(n))
    for k in range(n):
        np.testing.assert_array_equal(frames[k], frame(k).numpy())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["finished", "killed"]), fraction=st.floats(0.0, 1.0))
@example(kind="finished", fraction=0.5)
@example(kind="killed", fraction=0.5)
@example(kind="finished", fraction=0.0)
@example(kind="finished", fraction=1000.0 / 300_000)
def test_truncated_files_give_one_line_and_never_hang(files, tmp_path, kind, fraction):
    data = files[kind]
    size = int(fraction * len(data)) if fraction > 0.01 else int(fraction * 100_000) % len(data)
    path = tmp_path / f"{kind}-{size}.h5"
    path.write_bytes(data[:size])
    check_answer(open_with_limit(path), path)


@pytest.mark.parametrize("kind", ["finished", "killed"])
def test_overwritten_metadata_gives_one_line_and_never_hangs(files, tmp_path, kind):
    data = bytearray(files[kind])
    # The superblock zeroed; the last 4 KiB (metadata written at close) overwritten.
    cases = {"superblock": (0, 96), "tail": (len(data) - 4096, len(data))}
    for name, (a, b) in cases.items():
        damaged = bytearray(data)
        damaged[a:b] = b"\x00" * (b - a) if name == "superblock" else bytes(range(256)) * ((b - a) // 256)
        path = tmp_path / f"{kind}-{name}.h5"
        path.write_bytes(bytes(damaged))
        check_answer(open_with_limit(path), path)
