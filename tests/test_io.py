"""Trajectory files (H5MD 1.1), the in-memory writer, the lazy reader and checkpoints.

Stored values are compared exactly: the writer copies arrays to HDF5 without arithmetic, so any
difference would be a bug, not round-off.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import measureflow as mf
from measureflow.errors import ParameterError, ShapeError, TrajectoryFileError
from measureflow.io import (
    MemoryWriter,
    RecordedTrajectory,
    RunInfo,
    Series,
    Snapshot,
    Trajectory,
    TrajectoryFile,
    Writer,
    completed_status,
    load_checkpoint,
    save_checkpoint,
    valid_rows,
)
from measureflow.io import h5md as h5md_module
from measureflow.io import layout as L
from measureflow.io.h5md import H5MDWriter, rebuild_file
from measureflow.io.reader import FrameArray, open_trajectory
from measureflow.status import Status

R, N, D = 2, 7, 3


def positions(step: int, dtype=torch.float64) -> torch.Tensor:
    """Deterministic frame content: every value encodes (step, replica, particle, axis)."""
    r = torch.arange(R, dtype=dtype)[:, None, None]
    n = torch.arange(N, dtype=dtype)[None, :, None]
    d = torch.arange(D, dtype=dtype)[None, None, :]
    return step + 0.1 * r + 0.01 * n + 0.001 * d


def run_info(**kwargs) -> RunInfo:
    kwargs.setdefault("parameters", {"seed": 3, "field": {"name": "linear"}, "integrator": "rk4"})
    kwargs.setdefault("observable_names", ["energy", "mean"])
    kwargs.setdefault("observable_shapes", {"energy": (R,), "mean": (R, D)})
    return RunInfo(kind="particles", replicas=R, size=N, dim=D, dtype="float64", **kwargs)


def write_steps(writer, steps, dt=0.25):
    for s in steps:
        x = positions(s)
        writer.write_frame(s, s * dt, mf.Particles(x))
        writer.write_observables(s, s * dt, {"energy": x.sum(dim=(1, 2)), "mean": x.mean(dim=1)})


def write_file(path, steps=range(11), **kwargs):
    writer = H5MDWriter(path, **kwargs)
    writer.open(run_info())
    write_steps(writer, steps)
    writer.close()
    return writer


def tree(path) -> dict[str, tuple]:
    """Every object of the file: path -> ('group',) or ('dataset', shape, dtype)."""
    out = {}
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = ("dataset", obj.shape, obj.dtype.kind)
            else:
                out[name] = ("group",)

        f.visititems(visit)
    return out


def element_data(path) -> dict[str, np.ndarray]:
    """The data of every time-dependent element (what a resumed run must reproduce exactly)."""
    out = {}
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            if L.is_element(obj):
                for key in ("step", "time", "value"):
                    out[f"{name}/{key}"] = obj[key][()]

        f.visititems(visit)
    return out


# -- layout -----------------------------------------------------------------------------------------
def test_particle_layout_follows_h5md_1_1(tmp_path):
    path = tmp_path / "run.h5"
    weights = np.arange(1, N + 1, dtype=float)[None].repeat(R, 0)
    weights /= weights.sum(1, keepdims=True)
    writer = H5MDWriter(path)
    writer.open(run_info(weights=weights, author="Ada"))
    write_steps(writer, range(4))
    writer.close()

    frames = 4
    group = [("group",)]
    expected = {
        "h5md": group[0],
        "h5md/author": group[0],
        "h5md/creator": group[0],
        "h5md/modules": group[0],
        "h5md/modules/measureflow": group[0],
        "particles": group[0],
        "particles/trajectory": group[0],
        "particles/trajectory/box": group[0],
        "particles/trajectory/position": group[0],
        "particles/trajectory/position/step": ("dataset", (frames,), "i"),
        "particles/trajectory/position/time": ("dataset", (frames,), "f"),
        "particles/trajectory/position/value": ("dataset", (frames, R * N, D), "f"),
        "particles/trajectory/weight": ("dataset", (R * N,), "f"),
        "particles/trajectory/replica": ("dataset", (R * N,), "i"),
        "observables": group[0],
        "observables/energy": group[0],
        "observables/energy/step": ("dataset", (frames,), "i"),
        "observables/energy/time": ("dataset", (frames,), "f"),
        "observables/energy/value": ("dataset", (frames, R), "f"),
        "observables/mean": group[0],
        "observables/mean/step": ("dataset", (frames,), "i"),
        "observables/mean/time": ("dataset", (frames,), "f"),
        "observables/mean/value": ("dataset", (frames, R, D), "f"),
        "parameters": group[0],
        "parameters/measureflow": ("dataset", (), "O"),
        "measureflow": group[0],
        "measureflow/committed": ("dataset", (3,), "i"),
        "measureflow/status": group[0],
    }
    assert tree(path) == expected

    with h5py.File(path, "r") as f:
        version = f["h5md"].attrs["version"]
        assert version.dtype.kind == "i" and version.tolist() == [1, 1]
        assert L.text(f["h5md/author"].attrs["name"]) == "Ada"
        assert L.text(f["h5md/creator"].attrs["name"]) == "measureflow"
        assert L.text(f["h5md/creator"].attrs["version"]) == mf.__version__
        assert f["h5md/modules/measureflow"].attrs["version"].tolist() == list(L.MODULE_VERSION)
        # H5MD asks for fixed-length strings in its metadata.
        assert h5py.check_string_dtype(f["h5md/creator"].attrs.get_id("name").dtype).length is not None
        box = f["particles/trajectory/box"].attrs
        assert int(box["dimension"]) == D and np.ndim(box["dimension"]) == 0
        assert L.text(box["boundary"]) == ["none"] * D
        assert f["particles/trajectory/replica"][()].tolist() == [r for r in range(R) for _ in range(N)]
        np.testing.assert_array_equal(f["particles/trajectory/weight"][()], weights.reshape(-1))
        pos = f["particles/trajectory/position"]
        assert pos["step"].dtype == np.int64 and pos["time"].dtype == np.float64
        assert pos["step"][()].tolist() == [0, 1, 2, 3]
        np.testing.assert_array_equal(pos["time"][()], [0.0, 0.25, 0.5, 0.75])
        np.testing.assert_array_equal(pos["value"][2], positions(2).reshape(R * N, D).numpy())
        np.testing.assert_array_equal(f["observables/mean/value"][3], positions(3).mean(1).numpy())
        assert json.loads(f["parameters/measureflow"][()])["seed"] == 3
        assert f["measureflow/committed"][()].tolist() == [4, 4, 4]


def test_gaussian_layout_has_an_h5md_view_of_the_means(tmp_path):
    path = tmp_path / "g.h5"
    Rg, d = 3, 2
    state = mf.Gaussians(torch.zeros(Rg, d), torch.eye(d).expand(Rg, d, d).clone())
    writer = H5MDWriter(path)
    writer.open(RunInfo.from_state(state, observable_names=["w2"], observable_shapes={"w2": (Rg,)}))
    for s in range(5):
        writer.write_frame(s, 0.1 * s, state.with_parameters(state.mean + s, state.cov * (s + 1)))
        writer.write_observables(s, 0.1 * s, {"w2": torch.full((Rg,), float(s))})
    writer.close()
    writer.set_status("completed", 4, 0.4, "")  # after close: written straight to the file
    objects = tree(path)
    # The H5MD view: /particles/gaussians with a box and links to the means (no second copy of the data).
    assert sorted(name for name in objects if name.startswith("particles")) == [
        "particles", "particles/gaussians", "particles/gaussians/box"]
    with h5py.File(path, "r") as f:
        assert f["particles/gaussians/box"].attrs["dimension"] == d
        link = f["particles/gaussians"].get("position", getlink=True)
        assert isinstance(link, h5py.SoftLink) and link.path == "/measureflow/gaussians/mean"
        np.testing.assert_array_equal(f["particles/gaussians/position/value"][3], np.full((Rg, d), 3.0))
        assert f["particles/gaussians/position/step"][()].tolist() == list(range(5))
        assert f["particles/gaussians/covariance/value"].shape == (5, Rg, d, d)
    assert objects["measureflow/gaussians/mean/value"] == ("dataset", (5, Rg, d), "f")
    assert objects["measureflow/gaussians/cov/value"] == ("dataset", (5, Rg, d, d), "f")
    for element in ("mean", "cov"):
        assert objects[f"measureflow/gaussians/{element}/step"] == ("dataset", (5,), "i")
        assert objects[f"measureflow/gaussians/{element}/time"] == ("dataset", (5,), "f")
    with open_trajectory(path) as traj:
        assert (traj.kind, traj.replicas, traj.size, traj.dim, len(traj)) == ("gaussians", Rg, 0, d, 5)
        assert traj.positions is None and traj.weights is None
        mean, cov = traj.gaussians
        np.testing.assert_array_equal(mean[4], np.full((Rg, d), 4.0))
        np.testing.assert_array_equal(cov[2], np.broadcast_to(3 * np.eye(d), (Rg, d, d)))
        assert cov.shape == (5, Rg, d, d)
        assert traj.status.code == "completed" and "completed at step 4" in traj.summary()


def test_parameters_round_trip_as_json(tmp_path):
    params = {
        "seed": np.int64(7),
        "field": {"name": "mmd", "bandwidth": np.float32(0.5), "A": torch.eye(2)},
        "grid": (0.0, 1.0, 11),
        "versions": {"measureflow": mf.__version__, "torch": torch.__version__, "plugins": {"x": "1.0"}},
        "limits": [math.inf, -1e-300],
        "unicode": "σ² → ∞",
        "flags": {True, False},
    }
    run = run_info(parameters=params)
    assert run.parameters["seed"] == 7 and run.parameters["grid"] == [0.0, 1.0, 11]
    path = tmp_path / "p.h5"
    writer = H5MDWriter(path)
    writer.open(run)
    writer.close()
    with open_trajectory(path) as traj:
        assert traj.parameters == run.parameters
        assert traj.versions["torch"] == torch.__version__
    with pytest.raises(ParameterError, match=r"parameters\['bad'\]"):
        run_info(parameters={"bad": object()})


# -- growth and flushing -----------------------------------------------------------------------------
def test_datasets_grow_by_exactly_the_frames_written(tmp_path):
    """Between flushes rows wait in the staging buffers (never an extent beyond the rows written); each
    flush appends them, so after it every dataset holds exactly the frames written."""
    writer = H5MDWriter(tmp_path / "g.h5", flush_frames=None, flush_seconds=None)
    writer.open(run_info())
    f = writer._file
    for k in range(1, 8):
        write_steps(writer, [k - 1])
        assert writer.frames == k
        for flushed in (False, True):
            if flushed:
                writer.flush()
            for name in ("particles/trajectory/position", "observables/energy", "observables/mean"):
                for key in ("step", "time", "value"):
                    ds = f[f"{name}/{key}"]
                    assert ds.shape[0] == k if flushed else ds.shape[0] <= k, (name, key, flushed)
                    assert ds.chunks is not None and ds.maxshape[0] is None
    writer.close()
    assert writer.frames == 7


def test_flush_schedule_counts_frames_and_seconds(tmp_path, monkeypatch):
    writer = H5MDWriter(tmp_path / "a.h5", flush_frames=3, flush_seconds=None)
    writer.open(run_info())
    write_steps(writer, range(7))
    assert writer.stats["flushes"] == 2  # after frames 3 and 6
    writer.close()
    assert writer.stats["flushes"] == 3  # and at close

    now = [100.0]
    monkeypatch.setattr(h5md_module, "_clock", lambda: now[0])
    writer = H5MDWriter(tmp_path / "b.h5", flush_every=10.0)
    assert (writer.flush_frames, writer.flush_seconds) == (None, 10.0)
    writer.open(run_info())
    write_steps(writer, range(3))
    assert writer.stats["flushes"] == 0
    now[0] += 10.5
    write_steps(writer, [3])
    assert writer.stats["flushes"] == 1
    writer.close()
    writer.close()  # idempotent
    writer.flush()  # harmless when closed
    assert writer.stats["flushes"] == 2
    with pytest.raises(RuntimeError, match="closed"):
        write_steps(writer, [4])


@pytest.mark.parametrize("at", ["value", "step"])
@pytest.mark.parametrize("staged", [False, True])
def test_interrupted_write_is_cut_back_on_close(tmp_path, monkeypatch, staged, at):
    """A write interrupted between two h5py calls leaves no partial row. In the positions' write: rows
    written at once (STAGE_BYTES = 0), the frame whose write_frame raised is lost; staged rows,
    write_frame only copies, the batch write of the flush is interrupted, and close appends the staged
    rows again, so every frame whose write_frame returned is in the file. In the write of the steps
    (they wait for the flush's commit), close writes them again: every frame is in the file."""
    if not staged:
        monkeypatch.setattr(h5md_module, "STAGE_BYTES", 0)
    path = tmp_path / "i.h5"
    writer = H5MDWriter(path)
    writer.open(run_info())
    write_steps(writer, range(3))
    if staged or at == "step":
        writer.flush()
        write_steps(writer, [3])
    real_write = h5md_module._write_slab

    def interrupt(ds, rows, first):  # like a SIGTERM handler raising between two h5py calls
        if ds.name.endswith(f"position/{at}"):  # extended already, not written
            raise KeyboardInterrupt
        real_write(ds, rows, first)

    monkeypatch.setattr(h5md_module, "_write_slab", interrupt)
    with pytest.raises(KeyboardInterrupt):
        writer.flush() if staged or at == "step" else write_steps(writer, [3])
    monkeypatch.setattr(h5md_module, "_write_slab", real_write)
    writer.set_status("interrupted", 3, 0.75, "SIGTERM")
    writer.close()
    kept = [0, 1, 2, 3] if staged or at == "step" else [0, 1, 2]
    with open_trajectory(path) as traj:
        assert len(traj) == len(kept) and traj.steps.tolist() == kept
        assert traj.status.code == "interrupted" and traj.status.message == "SIGTERM"
        np.testing.assert_array_equal(np.asarray(traj.positions[len(kept) - 1]), positions(kept[-1]).numpy())
    assert tree(path)["particles/trajectory/position/value"][1][0] == len(kept)


def test_steps_must_increase(tmp_path):
    writer = H5MDWriter(tmp_path / "s.h5")
    writer.open(run_info())
    write_steps(writer, [0, 1])
    with pytest.raises(ValueError, match="not after the last written step 1"):
        writer.write_frame(1, 0.0, mf.Particles(positions(1)))
    with pytest.raises(ShapeError, match=r"\(R, N, d\)"):
        writer.write_frame(5, 0.0, mf.Particles(torch.zeros(R, N + 1, D)))
    writer.close()


# -- observables ------------------------------------------------------------------------------------
def test_observables_values_and_late_layout(tmp_path):
    path = tmp_path / "o.h5"
    writer = H5MDWriter(path)
    # "mean" has no declared shape: laid out at its first write.
    writer.open(run_info(observable_shapes={"energy": (R,)}))
    write_steps(writer, range(5))
    writer.write_observables(5, 1.25, {"extra": 2.0})
    with pytest.raises(ShapeError, match="observable 'energy'"):
        writer.write_observables(6, 1.5, {"energy": torch.zeros(R + 1)})
    writer.close()
    with open_trajectory(path) as traj:
        obs = traj.observables
        assert list(obs) == ["energy", "mean", "extra"]
        assert obs["energy"].steps.tolist() == list(range(5))
        np.testing.assert_array_equal(obs["energy"].times, np.arange(5) * 0.25)
        assert obs["mean"].values.shape == (5, R, D)
        np.testing.assert_array_equal(obs["mean"].values[3], positions(3).mean(1).numpy())
        energies = np.stack([positions(s).sum((1, 2)).numpy() for s in range(5)])
        np.testing.assert_array_equal(obs["energy"].values[:], energies)
        assert obs["extra"].values[:].tolist() == [2.0]


# -- memory writer ----------------------------------------------------------------------------------
def test_memory_writer_keeps_host_arrays():
    memory = MemoryWriter(every=2)
    assert memory.trigger(4) and not memory.trigger(3)
    memory.open(run_info())
    write_steps(memory, range(4))
    assert memory.positions.shape == (4, R, N, D) and isinstance(memory.positions, np.ndarray)
    np.testing.assert_array_equal(memory.positions[2], positions(2).numpy())
    assert memory.steps.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(memory.weights, np.full((R, N), 1 / N))
    assert memory.observables["mean"].values.shape == (4, R, D)
    memory.set_status("completed", 3, 0.75)
    assert memory.status.code == "completed"
    # Resuming in the same object drops what lies after the resume step.
    memory.open(run_info(resume_step=1))
    assert memory.steps.tolist() == [0, 1] and memory.observables["energy"].steps.tolist() == [0, 1]

    g = MemoryWriter()
    state = mf.Gaussians(torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2).clone())
    g.open(RunInfo.from_state(state))
    g.write_frame(0, 0.0, state)
    assert g.means.shape == (1, 2, 2) and g.covs.shape == (1, 2, 2, 2) and g.positions is None


# -- the trajectory protocol ------------------------------------------------------------------------
def protocol_members(traj) -> dict:
    """Every member of the protocol, read into plain values (lazy arrays read whole)."""

    def read(value):
        return None if value is None else np.asarray(value)

    obs = {name: (series.name, read(series.steps), read(series.times), read(series.values[:]))
           for name, series in traj.observables.items()}
    return {
        "shape": (traj.kind, traj.replicas, traj.size, traj.dim, len(traj), traj.frames),
        "steps": read(traj.steps), "times": read(traj.times), "positions": read(traj.positions),
        "weights": read(traj.weights), "means": read(traj.means), "covs": read(traj.covs),
        "observables": obs, "status": traj.status, "parameters": traj.parameters,
    }


def assert_same_members(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        if key == "observables":
            assert list(a[key]) == list(b[key])
            for name in a[key]:
                for x, y in zip(a[key][name], b[key][name]):
                    np.testing.assert_array_equal(x, y, err_msg=f"{key}[{name}]")
        elif isinstance(a[key], np.ndarray) or isinstance(b[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key


def test_file_and_memory_answer_the_protocol_alike(tmp_path):
    # The same frames written to a file and to memory read back identically through every member.
    path = tmp_path / "same.h5"
    writers = [H5MDWriter(path), MemoryWriter()]
    for writer in writers:
        writer.open(run_info())
        write_steps(writer, range(6))
        writer.set_status("completed", 5, 1.25, "")
        writer.close()
    memory = writers[1]
    with open_trajectory(path) as traj:
        assert isinstance(traj, TrajectoryFile) and isinstance(traj, Trajectory) and isinstance(memory, Trajectory)
        on_file = protocol_members(traj)
        assert traj.gaussians is None and traj.source == str(path)
    on_memory = protocol_members(memory)
    assert on_file["status"] == Status("completed", 5, 1.25) and on_file["status"].resumed_from == ()
    assert on_file["shape"] == ("particles", R, N, D, 6, 6)
    # The file stores the parameters as JSON: what it holds is what RunInfo made JSON-able.
    assert on_file["parameters"] == run_info().parameters
    assert_same_members(on_file, on_memory)
    assert isinstance(memory.observables["energy"], Series) and memory.observables["energy"].name == "energy"

    # Gaussians: means and covs per frame, the same through `gaussians`.
    state = mf.Gaussians(torch.zeros(2, 3, dtype=torch.float64), torch.eye(3, dtype=torch.float64).expand(2, 3, 3))
    path = tmp_path / "g.h5"
    writers = [H5MDWriter(path), MemoryWriter()]
    for writer in writers:
        writer.open(RunInfo.from_state(state, parameters={"seed": 1}))
        for s in range(3):
            writer.write_frame(s, 0.5 * s, state.with_parameters(state.mean + s, state.cov * (s + 1)))
        writer.close()
    with open_trajectory(path) as traj:
        on_file = protocol_members(traj)
        means, covs = traj.gaussians
        np.testing.assert_array_equal(means[2], np.full((2, 3), 2.0))
        np.testing.assert_array_equal(covs[:], traj.covs[:])
    assert on_file["status"].code == "closed"  # closed without a run status
    on_memory = protocol_members(writers[1])
    assert on_memory["status"] is None
    on_file["status"] = None
    assert_same_members(on_file, on_memory)


def test_snapshot_and_recorded_trajectory():
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    w = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25] * 4])
    snap = Snapshot(mf.Particles(x, w), time=2.5, step=7, parameters={"field": {"name": "linear"}},
                    observables={"energy": torch.tensor([1.0, 2.0]),
                                 "w2": Series("w2", np.arange(3), np.arange(3) * 0.5, np.ones((3, 2)))})
    assert isinstance(snap, Trajectory) and len(snap) == 1 and snap.frames == 1
    assert (snap.kind, snap.replicas, snap.size, snap.dim) == ("particles", 2, 4, 3)
    assert snap.steps.tolist() == [7] and snap.times.tolist() == [2.5]
    assert snap.positions.shape == (1, 2, 4, 3) and snap.positions.dtype == np.float32
    np.testing.assert_array_equal(snap.positions[0], x.numpy())
    np.testing.assert_array_equal(snap.weights, w.numpy().astype(np.float64))
    assert snap.means is None and snap.covs is None and snap.gaussians is None and snap.status is None
    assert list(snap.observables) == ["energy", "w2"]  # the given order
    energy = snap.observables["energy"]
    assert energy.steps.tolist() == [7] and energy.times.tolist() == [2.5] and energy.values.tolist() == [[1.0, 2.0]]
    assert len(snap.observables["w2"]) == 3  # a series is kept as given
    assert snap.parameters == {"field": {"name": "linear"}}

    g = Snapshot(mf.Gaussians(torch.ones(2), 2 * torch.eye(2)))
    assert (g.kind, g.replicas, g.size, g.dim, len(g)) == ("gaussians", 1, 0, 2, 1)
    assert g.positions is None and g.weights is None
    means, covs = g.gaussians
    np.testing.assert_array_equal(means, np.ones((1, 1, 2)))
    np.testing.assert_array_equal(covs, 2 * np.eye(2)[None, None])
    with pytest.raises(mf.StateError, match="Particles or measureflow.Gaussians"):
        Snapshot(np.zeros((3, 2)))

    recorded = RecordedTrajectory("gaussians", 1, 0, 2, parameters={"seed": 0})
    assert len(recorded) == 0 and recorded.means.shape == (0, 1, 2) and recorded.covs.shape == (0, 1, 2, 2)
    for s in range(4):
        recorded.record_frame(s, 0.1 * s, mf.Gaussians(torch.full((1, 2), float(s)), torch.eye(2)[None]))
        recorded.record_observables(s, 0.1 * s, {"bures": torch.tensor([float(s)])})
    recorded.drop_after(1)
    assert recorded.steps.tolist() == [0, 1] and recorded.observables["bures"].values.tolist() == [[0.0], [1.0]]
    recorded.status = Status("completed", 1, 0.1)
    assert recorded.status.ok
    with pytest.raises(TypeError, match="Status"):
        recorded.status = {"status": "completed"}
    with pytest.raises(ShapeError, match=r"mean \(1, 2\)"):
        recorded.record_frame(5, 0.5, mf.Gaussians(torch.zeros(3, 2), torch.eye(2).expand(3, 2, 2)))
    with pytest.raises(ValueError, match="kind"):
        RecordedTrajectory("points", 1, 1, 1)


def test_protocols_are_abstract():
    with pytest.raises(TypeError, match="abstract"):
        Trajectory()
    with pytest.raises(TypeError, match="abstract"):
        Writer()

    class Incomplete(Writer):  # no close(): cannot be instantiated
        def open(self, run):
            pass

        def write_frame(self, step, time, state):
            pass

        def write_observables(self, step, time, values):
            pass

    with pytest.raises(TypeError, match="close"):
        Incomplete()


def test_completed_status(tmp_path):
    assert completed_status(tmp_path / "missing.h5") is None
    (tmp_path / "text.h5").write_text("not a trajectory")
    assert completed_status(tmp_path / "text.h5") is None
    path = tmp_path / "run.h5"
    writer = write_file(path, range(3))
    assert completed_status(path) is None  # closed without a status
    writer.set_status("completed", 2, 0.5)
    assert completed_status(path) == Status("completed", 2, 0.5)
    writer.set_status("nonfinite", 2, 0.5, "NaN in x")
    assert completed_status(path) is None


# -- reader -----------------------------------------------------------------------------------------
def test_reader_is_lazy(tmp_path, monkeypatch):
    path = tmp_path / "lazy.h5"
    write_file(path, range(11))
    reads = []
    real_getitem = h5py.Dataset.__getitem__

    def spy(self, key, *args, **kwargs):
        reads.append(self.name)
        return real_getitem(self, key, *args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    traj = mf.open(path)
    assert (traj.kind, traj.replicas, traj.size, traj.dim, len(traj)) == ("particles", R, N, D, 11)
    pos = traj.positions
    obs = traj.observables
    _ = traj.parameters
    assert isinstance(pos, FrameArray) and isinstance(pos.dataset, h5py.Dataset)
    assert pos.shape == (11, R, N, D)
    assert isinstance(obs["mean"].values.dataset, h5py.Dataset)
    assert not [name for name in reads if name.endswith("/value")], reads

    reads.clear()
    np.testing.assert_array_equal(pos[5], positions(5).numpy())
    assert reads == ["/particles/trajectory/position/value"]  # one frame, one read
    np.testing.assert_array_equal(pos[-1, 1, 2], positions(10)[1, 2].numpy())
    np.testing.assert_array_equal(pos[[7, 2]], np.stack([positions(7).numpy(), positions(2).numpy()]))
    np.testing.assert_array_equal(pos[1:9:3, 0], np.stack([positions(s)[0].numpy() for s in (1, 4, 7)]))
    assert traj.steps.tolist() == list(range(11))
    with pytest.raises(IndexError):
        pos[11]
    summary = traj.summary()
    expected = ("particles", "R=2", "N=7", "d=3", "frames       11", "linear", "rk4", "seed         3", "energy [11, 2]")
    for text in expected:
        assert text in summary, (text, summary)
    traj.close()


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(TrajectoryFileError, match="missing.h5: no such file"):
        mf.open(tmp_path / "missing.h5")
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(TrajectoryFileError, match="notes.h5: is not an HDF5 file"):
        mf.open(text)
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(TrajectoryFileError, match="plain.h5: .*not an H5MD file"):
        mf.open(plain)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f.create_group("h5md").attrs["version"] = np.array([1, 1])
        f.create_group("particles/all/position")
    with pytest.raises(TrajectoryFileError, match="foreign.h5: .*not written by measureflow"):
        mf.open(foreign)
    # Resuming into a foreign file is refused rather than damaging it.
    writer = H5MDWriter(foreign)
    with pytest.raises(TrajectoryFileError, match="not a measureflow trajectory"):
        writer.open(run_info(resume_step=3))


def test_pyh5md_reads_our_files(tmp_path):
    pyh5md = pytest.importorskip("pyh5md")
    path = tmp_path / "ext.h5"
    write_file(path, range(6))
    with pyh5md.File(str(path), "r") as f:
        part = f.particles_group("trajectory")
        pos = pyh5md.element(part, "position")
        assert pos.element_type == "TimeElement"
        assert pos.step[()].tolist() == list(range(6))
        np.testing.assert_array_equal(pos.time[()], np.arange(6) * 0.25)
        np.testing.assert_array_equal(pos.value[4], positions(4).reshape(R * N, D).numpy())
        weight = pyh5md.element(part, "weight")
        assert weight.element_type == "FixedElement"
        energy = pyh5md.element(f["observables"], "energy")
        np.testing.assert_array_equal(energy.value[2], positions(2).sum((1, 2)).numpy())
        assert energy.step[()].tolist() == list(range(6))


# -- resume -----------------------------------------------------------------------------------------
def test_resume_truncates_and_reproduces_the_straight_run(tmp_path):
    straight = tmp_path / "straight.h5"
    write_file(straight, range(11))
    resumed = tmp_path / "resumed.h5"
    write_file(resumed, range(11))  # the run went on past its checkpoint at step 5
    writer = H5MDWriter(resumed)
    writer.open(run_info(resume_step=5))
    assert writer.frames == 6
    write_steps(writer, range(6, 11))
    writer.close()
    a, b = element_data(straight), element_data(resumed)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    with open_trajectory(resumed) as traj:
        assert traj.status.resumed_from == (5,)
    # A file without the frames the checkpoint promises is refused, and left as it was.
    short = tmp_path / "short.h5"
    write_file(short, range(3))
    before = element_data(short)
    writer = H5MDWriter(short)
    with pytest.raises(TrajectoryFileError, match=r"steps 3, 4, 5 \(steps 3 … 5\).*--restart"):
        writer.open(run_info(resume_step=5))
    writer.close()
    after = element_data(short)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_resume_refuses_a_different_run(tmp_path):
    path = tmp_path / "r.h5"
    write_file(path, range(3))
    other = RunInfo(kind="particles", replicas=R, size=N + 1, dim=D, resume_step=1)
    with pytest.raises(TrajectoryFileError, match="cannot resume"):
        H5MDWriter(path).open(other)


# -- crashes (real processes) -----------------------------------------------------------------------
CHILD = """
import itertools, signal, sys, time
import torch
import measureflow as mf
from measureflow.io import RunInfo
from measureflow.io.h5md import H5MDWriter

path, mode = sys.argv[1], sys.argv[2]
R, N, D = {R}, {N}, {D}

def positions(step):
    r = torch.arange(R, dtype=torch.float64)[:, None, None]
    n = torch.arange(N, dtype=torch.float64)[None, :, None]
    d = torch.arange(D, dtype=torch.float64)[None, None, :]
    return step + 0.1 * r + 0.01 * n + 0.001 * d

run = RunInfo(kind="particles", replicas=R, size=N, dim=D, parameters={{"seed": 3}},
              observable_names=["energy", "mean"], observable_shapes={{"energy": (R,), "mean": (R, D)}})
flush = dict(flush_frames=5, flush_seconds=None) if mode != "atexit" else dict(flush_frames=None, flush_seconds=None)
writer = H5MDWriter(path, **flush, background={BG})
writer.open(run)

# A flag, as the simulation loop does: an exception raised from the handler could land inside a
# finaliser, where Python ignores it.
terminated = []
signal.signal(signal.SIGTERM, lambda signum, frame: terminated.append(signum))
for step in itertools.count():
    if terminated:
        writer.set_status("interrupted", step - 1, (step - 1) * 0.25, "SIGTERM")
        writer.close()
        break
    x = positions(step)
    writer.write_frame(step, step * 0.25, mf.Particles(x))
    writer.write_observables(step, step * 0.25, {{"energy": x.sum(dim=(1, 2)), "mean": x.mean(dim=1)}})
    if step == 12:
        print("ready", flush=True)
        if mode == "atexit":
            break  # leave without closing: the interpreter's exit must close the file
    if step > 12:
        time.sleep(0.0005)
    if step > 200_000:
        break
"""


def child_env() -> dict:
    """Environment for child interpreters: they import the same measureflow as this process."""
    root = str(Path(mf.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}


def start_child(tmp_path, path, mode, background=False):
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD.format(R=R, N=N, D=D, BG=background)))
    command = [sys.executable, str(script), str(path), mode]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", line
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def check_consistent(traj, at_least):
    n = len(traj)
    assert n >= at_least
    assert traj.steps.tolist() == list(range(n))
    np.testing.assert_array_equal(traj.times, np.arange(n) * 0.25)
    for k in (0, n // 2, n - 1):
        np.testing.assert_array_equal(traj.positions[k], positions(k).numpy())
    energy = traj.observables["energy"]
    assert energy.steps.tolist() == list(range(len(energy)))
    np.testing.assert_array_equal(energy.values[-1], positions(len(energy) - 1).sum((1, 2)).numpy())
    return n


@pytest.mark.parametrize("background", [False, True])  # the writing thread keeps the crash guarantees
def test_file_survives_sigkill_and_resumes(tmp_path, background):
    path = tmp_path / "killed.h5"
    proc = start_child(tmp_path, path, "kill", background)
    time.sleep(0.05)  # let it write (and flush) a few more frames
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    with open_trajectory(path) as traj:
        assert traj.unclosed and "not closed" in traj.summary()
        # The writer's provisional status survives the kill: "running" from step -1, never "completed".
        assert (traj.status.code, traj.status.step, traj.status.ok) == ("running", -1, False)
        assert math.isnan(traj.status.time)
    assert completed_status(path) is None
    with open_trajectory(path) as traj:
        n = check_consistent(traj, at_least=10)
        # Flushes happen every 5 frames, each after the step's observables.
        assert n % 5 == 0 and len(traj.observables["energy"]) == n

    # Resume from a checkpoint a few frames before the end of the file: the SWMR flags left by the
    # killed writer force a rebuild, and the result equals an uninterrupted run.
    resume = n - 3
    writer = H5MDWriter(path)
    writer.open(run_info(resume_step=resume))
    write_steps(writer, range(resume + 1, n + 4))
    writer.close()
    straight = tmp_path / "straight.h5"
    write_file(straight, range(n + 4))
    a, b = element_data(straight), element_data(path)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not list(tmp_path.glob("*.tmp-*"))  # the rebuild's temporary was renamed over the file


@pytest.mark.parametrize("background", [False, True])  # the writing thread is drained on SIGTERM and at exit
def test_sigterm_and_exit_leave_a_closed_file(tmp_path, background):
    path = tmp_path / "term.h5"
    proc = start_child(tmp_path, path, "term", background)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    with h5py.File(path, "r") as f:  # a plain (non-SWMR) open works: the file was closed
        n = f["particles/trajectory/position/value"].shape[0]
        assert f["particles/trajectory/position/step"].shape[0] == n
    with open_trajectory(path) as traj:
        assert not traj.unclosed
        check_consistent(traj, at_least=13)
        assert traj.status.code == "interrupted"

    path = tmp_path / "exit.h5"
    proc = start_child(tmp_path, path, "atexit", background)
    assert proc.wait(timeout=30) == 0
    with open_trajectory(path) as traj:
        assert not traj.unclosed
        assert check_consistent(traj, at_least=13) == 13
        assert traj.status.code == "closed"


def test_rebuild_keeps_only_committed_rows(tmp_path):
    path = tmp_path / "c.h5"
    write_file(path, range(8))
    with h5py.File(path, "r+") as f:  # pretend the last two rows never reached a flush
        f[L.COMMITTED][...] = [6, 6, 6]
    with open_trajectory(path) as traj:
        assert len(traj) == 6 and len(traj.observables["mean"]) == 6
    with h5py.File(path, "r") as f:
        assert valid_rows(f) == {
            "particles/trajectory/position": 6, "observables/energy": 6, "observables/mean": 6}
    keep = rebuild_file(path)
    assert keep["particles/trajectory/position"] == 6
    assert tree(path)["particles/trajectory/position/value"][1][0] == 6


# -- checkpoints ------------------------------------------------------------------------------------
def test_checkpoint_round_trip_and_errors(tmp_path):
    path = tmp_path / "run.ckpt"
    generator = torch.Generator().manual_seed(4)
    payload = {
        "step": 10,
        "time": 0.5,
        "state": {"x": torch.randn(2, 3, 2)},
        "rng": generator.get_state(),
        "integrator": {"dt": 0.01, "name": "dopri5"},
        "blob": b"\x00\x01",
        "seed": np.int64(3),
    }
    save_checkpoint(path, payload)
    back = load_checkpoint(path)
    assert back["step"] == 10 and back["seed"] == 3 and back["blob"] == b"\x00\x01"
    torch.testing.assert_close(back["state"]["x"], payload["state"]["x"], rtol=0, atol=0)
    assert torch.equal(back["rng"], generator.get_state())
    assert not list(tmp_path.glob("*.tmp-*"))
    with pytest.raises(TypeError, match=r"payload\['bad'\]"):
        save_checkpoint(path, {"bad": np.zeros(2)})
    with pytest.raises(TrajectoryFileError, match="nothing.ckpt: no such file"):
        load_checkpoint(tmp_path / "nothing.ckpt")
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(path.read_bytes()[:40])
    with pytest.raises(TrajectoryFileError, match="broken.ckpt: cannot be read"):
        load_checkpoint(broken)


def test_checkpoint_crash_before_rename_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "run.ckpt"
    save_checkpoint(path, {"step": 1})
    # In-process failure at the rename: the old checkpoint stays, the temporary is removed.
    from measureflow.io import atomic

    def fail(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(OSError, match="disk gone"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1 and not list(tmp_path.glob("*.tmp-*"))

    # A real crash (SIGKILL) between writing the temporary and renaming it.
    script = tmp_path / "crash.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, signal
            from measureflow.io import atomic, checkpoint
            atomic.os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)
            checkpoint.save_checkpoint({str(path)!r}, {{"step": 3}})
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], timeout=60, env=child_env())
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(path)["step"] == 1
    leftovers = list(tmp_path.glob("run.ckpt.tmp-*"))
    assert len(leftovers) == 1 and load_checkpoint(leftovers[0])["step"] == 3  # complete, never renamed
    # The next save removes the dead writer's temporary (its process is gone); a live one's stays.
    alive = tmp_path / f"run.ckpt.tmp-{os.getppid()}"
    alive.write_bytes(b"in progress")
    save_checkpoint(path, {"step": 4})
    assert load_checkpoint(path)["step"] == 4
    assert list(tmp_path.glob("run.ckpt.tmp-*")) == [alive]


def test_atomic_replace_keeps_the_old_file_when_the_writer_fails(tmp_path):
    from measureflow.io.atomic import atomic_replace

    path = tmp_path / "sub" / "index.json"
    with atomic_replace(path) as tmp:
        assert tmp.parent == path.parent and not path.exists()
        tmp.write_text("old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_replace(path) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("writer failed")
    assert path.read_text() == "old" and sorted(p.name for p in path.parent.iterdir()) == ["index.json"]


def test_rebuild_removes_its_temporary_when_it_fails(tmp_path, monkeypatch):
    from measureflow.io import atomic

    path = tmp_path / "r.h5"
    write_file(path, range(4))
    before = path.read_bytes()

    def fail(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(OSError, match="disk gone"):
        rebuild_file(path, upto_step=1)
    assert path.read_bytes() == before and not list(tmp_path.glob("*.tmp-*"))


# -- registration and RunInfo -----------------------------------------------------------------------
def test_builtin_registration(tmp_path):
    from measureflow.io import builtin
    from measureflow.plugins import Registry

    registry = Registry()
    builtin.measureflow_register_writers(registry)
    assert registry.names("writers") == ["h5md", "memory"]
    writer = registry.writer("h5md", tmp_path / "r.h5", 5, flush_every=3)
    assert isinstance(writer, H5MDWriter) and writer.trigger(10) and not writer.trigger(11)
    assert writer.flush_frames == 3
    assert isinstance(registry.writer("memory"), MemoryWriter)


def test_runinfo_validates_at_the_boundary():
    with pytest.raises(ShapeError, match=r"\(R, N\) = \(2, 7\)"):
        run_info(weights=np.ones((2, 6)) / 6)
    with pytest.raises(ValueError):
        RunInfo(kind="cloud", replicas=1, size=1, dim=1)
    with pytest.raises(ShapeError, match="size 0"):
        RunInfo(kind="gaussians", replicas=1, size=3, dim=2)
    info = RunInfo.from_state(mf.Particles(torch.zeros(3, 4, 2, dtype=torch.float32)))
    assert (info.kind, info.replicas, info.size, info.dim, info.dtype) == ("particles", 3, 4, 2, "float32")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_tensors_are_copied_to_the_host_on_write(tmp_path):
    dev = torch.device("cuda")
    path = tmp_path / "gpu.h5"
    state = mf.Gaussians(torch.zeros(R, D, device=dev), torch.eye(D, device=dev).expand(R, D, D).clone())
    writer = H5MDWriter(path)
    writer.open(RunInfo.from_state(state, observable_names=["a", "b", "c"]))
    for s in range(3):
        writer.write_frame(s, 0.5 * s, state.with_parameters(state.mean + s, state.cov * (s + 1)))
        # "b" and "c" (same device and dtype) travel in one transfer, "a" (float64) in another.
        values = {
            "a": torch.full((R,), float(s), device=dev, dtype=torch.float64),
            "b": state.mean + s,
            "c": state.cov[:, 0, 0] * s,
        }
        writer.write_observables(s, 0.5 * s, values)
    writer.close()
    with open_trajectory(path) as traj:
        mean, cov = traj.gaussians
        np.testing.assert_array_equal(mean[2], np.full((R, D), 2.0))
        np.testing.assert_array_equal(cov[1], np.broadcast_to(2 * np.eye(D), (R, D, D)))
        assert traj.observables["a"].values[:].tolist() == [[0.0] * R, [1.0] * R, [2.0] * R]
        np.testing.assert_array_equal(traj.observables["b"].values[2], np.full((R, D), 2.0))
        np.testing.assert_array_equal(traj.observables["c"].values[:, 0], [0.0, 1.0, 2.0])
    memory = MemoryWriter()
    memory.open(RunInfo.from_state(mf.Particles(positions(0).to(dev))))
    memory.write_frame(0, 0.0, mf.Particles(positions(1).to(dev)))
    np.testing.assert_array_equal(memory.positions[0], positions(1).numpy())
