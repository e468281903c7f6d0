"""H5MDWriter(background=True): a writing thread that changes nothing on disk.

The same run written in the foreground and by the background thread gives the same file, byte for
byte (HDF5 sees the same calls in the same order; only the thread differs); every flush — the one
before each checkpoint included — waits for the thread, so what a flush reports durable is on disk;
an error of the thread reaches the run's thread at its next call of the writer. The crash guarantees
(SIGKILL, SIGTERM, exit) are the foreground's tests run with background=True (tests/test_io.py).
"""

import errno

import h5py
import numpy as np
import pytest
import torch

import measureflow as mf
from measureflow.io import RunInfo
from measureflow.io import h5md
from measureflow.io.h5md import H5MDWriter, valid_rows


def _simulate(path, background, state):
    field = mf.field("ornstein_uhlenbeck", theta=1.0, sigma=0.5)
    writer = H5MDWriter(path, every=2, flush_frames=3, flush_seconds=None, background=background)
    sim = mf.Simulation(state, field, "euler_maruyama" if isinstance(state, mf.Particles) else "rk4", 0.0, 1.0,
                        steps=20, writers=[writer], observers=["mean"], observe_every=2, seed=4, progress=False)
    sim.run()
    return writer


@pytest.mark.parametrize("kind", ["particles", "gaussians"])
def test_background_file_is_byte_identical(tmp_path, kind):
    if kind == "particles":
        state = mf.Particles(torch.randn(2, 50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    else:
        state = mf.Gaussians(torch.zeros(2, 2, dtype=torch.float64),
                             torch.eye(2, dtype=torch.float64).expand(2, 2, 2).clone())
    fg, bg = tmp_path / "fg.h5", tmp_path / "bg.h5"
    w_fg = _simulate(fg, False, state)
    w_bg = _simulate(bg, True, state)
    assert w_bg.frames == w_fg.frames == 11 and w_bg.stats == w_fg.stats
    assert fg.read_bytes() == bg.read_bytes()


def _run(R=1, N=8, d=2):
    return RunInfo(kind="particles", replicas=R, size=N, dim=d, parameters={},
                   observable_names=["energy"], observable_shapes={"energy": (R,)})


def _write_frames(writer, steps, N=8):
    """Frames of N points in 2-d, every coordinate equal to the frame's step, at time 0.1 · step."""
    for step in steps:
        writer.write_frame(step, 0.1 * step, mf.Particles(torch.full((1, N, 2), float(step), dtype=torch.float64)))


def test_flush_waits_for_the_thread_and_frames_own_their_memory(tmp_path):
    """After flush() every frame handed over is committed; the state tensor, changed in place right after
    write_frame, does not change what was written (the frame was copied before the call returned)."""
    path = tmp_path / "t.h5"
    writer = H5MDWriter(path, flush_frames=None, flush_seconds=None, background=True)
    writer.open(_run())
    x = torch.zeros(1, 8, 2, dtype=torch.float64)
    for step in range(6):
        x.fill_(step)
        writer.write_frame(step, 0.1 * step, mf.Particles(x))
        writer.write_observables(step, 0.1 * step, {"energy": x.sum(dim=(1, 2))})
    x.fill_(-1.0)
    writer.flush()
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        assert valid_rows(f)["particles/trajectory/position"] == 6
        values = f["particles/trajectory/position/value"][:6]
        np.testing.assert_array_equal(values, np.arange(6, dtype=np.float64)[:, None, None] * np.ones((1, 8, 2)))
        np.testing.assert_array_equal(f["observables/energy/value"][:6, 0], 16.0 * np.arange(6))
    writer.close()


def test_rows_held_for_the_writing_thread_and_rows_copied_at_once_mix_in_one_batch(tmp_path):
    """A host tensor of the file's dtype is cloned and copied into the batch by the writing thread; one of
    another dtype is converted into the batch at the call. Frames alternating the two land in their rows."""
    path = tmp_path / "t.h5"
    writer = H5MDWriter(path, flush_frames=None, flush_seconds=None, background=True)
    writer.open(RunInfo(kind="particles", replicas=1, size=8, dim=2, dtype="float32"))
    x = torch.zeros(1, 8, 2, dtype=torch.float32)
    for step in range(7):
        x.fill_(step + 0.5)
        writer.write_frame(step, 0.1 * step, mf.Particles(x if step % 2 else x.double()))
    assert writer._frame_elements[0].batch > 7  # all seven rows are one batch, handed over by the flush
    x.fill_(-1.0)
    writer.close()
    with h5py.File(path, "r") as f:
        values = f["particles/trajectory/position/value"][:]
    np.testing.assert_array_equal(values, (np.arange(7, dtype=np.float32) + 0.5)[:, None, None] * np.ones((1, 8, 2)))


def test_a_frame_interrupted_between_its_elements_is_dropped_with_its_held_row(tmp_path, monkeypatch):
    """An interruption after the positions of a frame were staged (held for the writing thread) but before
    its channel was: close keeps the complete frames before it, each with its own positions and channel."""
    path = tmp_path / "t.h5"
    writer = H5MDWriter(path, flush_frames=None, flush_seconds=None, background=True)
    writer.open(RunInfo(kind="particles", replicas=1, size=4, dim=2, dtype="float64", channels={"charge": ()}))
    stage = h5md._Element.stage

    def interrupted(el, step, time, value, **options):
        if step == 3 and el.path.endswith("charge"):
            raise KeyboardInterrupt
        stage(el, step, time, value, **options)

    monkeypatch.setattr(h5md._Element, "stage", interrupted)
    x, charge = torch.zeros(1, 4, 2, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64)
    with pytest.raises(KeyboardInterrupt):
        for step in range(5):
            x.fill_(step)
            charge.fill_(10.0 * step)
            writer.write_frame(step, 0.1 * step, mf.Particles(x, channels={"charge": charge}))
    assert [len(el.held) for el in writer._frame_elements] == [4, 3]  # frame 3's positions are held
    writer.close()
    with h5py.File(path, "r") as f:
        assert valid_rows(f)["particles/trajectory/position"] == 3
        np.testing.assert_array_equal(f["particles/trajectory/position/value"][:3], np.arange(3.0)[:, None, None] * np.ones((1, 4, 2)))
        np.testing.assert_array_equal(f["particles/trajectory/charge/value"][:3], 10.0 * np.arange(3.0)[:, None] * np.ones((1, 4)))


def test_fill_held_copies_each_held_row_into_its_place():
    values = np.zeros((4, 3))
    h5md.fill_held(values, [(0, torch.ones(3, dtype=torch.float64)), (2, torch.full((3,), 2.0, dtype=torch.float64))])
    np.testing.assert_array_equal(values, [[1, 1, 1], [0, 0, 0], [2, 2, 2], [0, 0, 0]])
    h5md.fill_held(values, [(i, torch.full((3,), 5.0 + i, dtype=torch.float64)) for i in range(4)])
    np.testing.assert_array_equal(values, 5.0 + np.arange(4)[:, None] * np.ones((1, 3)))


def test_an_error_of_the_thread_reaches_the_next_call(tmp_path, monkeypatch):
    """A step out of order is refused at the call, as in the foreground (rows are staged on the run's
    thread). An I/O error of the writing thread reaches the run's thread at its next flush; close raises
    it too and the file keeps the rows of the flush before it."""
    monkeypatch.setattr(h5md, "STAGE_BYTES", 0)  # every row goes to the writing thread at once
    path = tmp_path / "e.h5"
    writer = H5MDWriter(path, flush_frames=None, flush_seconds=None, background=True)
    writer.open(_run())
    x = torch.ones(1, 8, 2, dtype=torch.float64)
    writer.write_frame(0, 0.0, mf.Particles(x))
    writer.write_frame(1, 0.1, mf.Particles(x))
    with pytest.raises(ValueError, match="not after the last written step 1"):
        writer.write_frame(1, 0.2, mf.Particles(x))
    writer.flush()

    def vanish(self, *args):
        raise OSError(errno.EIO, "the disk went away")

    monkeypatch.setattr(h5md._Element, "append_rows", vanish)
    writer.write_frame(2, 0.2, mf.Particles(x))  # handed to the thread: the call returns
    with pytest.raises(mf.errors.TrajectoryFileError, match="cannot write a frame .*EIO"):
        writer.flush()
    with pytest.raises(mf.errors.TrajectoryFileError, match="cannot write a frame"):
        writer.close()
    with h5py.File(path, "r") as f:
        assert f["particles/trajectory/position/step"][:].tolist() == [0, 1]
    writer.close()  # idempotent


def test_shape_errors_are_raised_at_the_call(tmp_path):
    writer = H5MDWriter(tmp_path / "s.h5", background=True)
    writer.open(_run())
    with pytest.raises(mf.errors.ShapeError):
        writer.write_frame(0, 0.0, mf.Particles(torch.ones(1, 7, 2, dtype=torch.float64)))
    writer.close()


def _datasets(path) -> dict:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("kind", ["particles", "gaussians"])
def test_batched_rows_give_the_datasets_of_rows_written_at_once(tmp_path, monkeypatch, kind, background):
    """Staging rows and appending them in batches changes no dataset: the file holds the same datasets,
    shapes and values as one written row by row (STAGE_BYTES = 0: one resize and write per row)."""
    if kind == "particles":
        state = mf.Particles(torch.randn(2, 50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    else:
        state = mf.Gaussians(torch.zeros(2, 2, dtype=torch.float64),
                             torch.eye(2, dtype=torch.float64).expand(2, 2, 2).clone())
    batched = _simulate(tmp_path / "batched.h5", background, state)
    assert batched._frame_elements[0].batch > 3  # rows were staged between the flushes (every 3 frames)
    monkeypatch.setattr(h5md, "STAGE_BYTES", 0)
    rows = _simulate(tmp_path / "rows.h5", False, state)
    assert rows._frame_elements[0].batch == 1 and batched.stats == rows.stats
    a, b = _datasets(tmp_path / "batched.h5"), _datasets(tmp_path / "rows.h5")
    assert sorted(a) == sorted(b) and any(name.endswith("/value") for name in a)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("background", [False, True])
def test_a_live_reader_sees_the_flushed_frames_while_rows_are_staged(tmp_path, background):
    """A reader opening the file while the run goes on (SWMR) sees whole frames up to the last flush, even
    with later rows staged in memory or half appended; close appends and commits the rest."""
    path = tmp_path / "live.h5"
    writer = H5MDWriter(path, flush_frames=None, flush_seconds=None, background=background)
    writer.open(_run())
    x = torch.zeros(1, 8, 2, dtype=torch.float64)
    for step in range(8):
        if step == 5:
            writer.flush()
        x.fill_(step)
        writer.write_frame(step, 0.1 * step, mf.Particles(x))
        writer.write_observables(step, 0.1 * step, {"energy": x.sum(dim=(1, 2))})
    assert writer.frames == 8
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        valid = valid_rows(f)
        assert valid["particles/trajectory/position"] == valid["observables/energy"] == 5
        np.testing.assert_array_equal(f["particles/trajectory/position/value"][:5, 0, 0], np.arange(5.0))
        np.testing.assert_array_equal(f["particles/trajectory/position/step"][:5], np.arange(5))
    writer.close()
    with h5py.File(path, "r") as f:
        assert valid_rows(f)["particles/trajectory/position"] == 8
        np.testing.assert_array_equal(f["particles/trajectory/position/value"][:, 0, 0], np.arange(8.0))
        np.testing.assert_array_equal(f["observables/energy/value"][:, 0], 16.0 * np.arange(8))


@pytest.mark.parametrize("replacing", [False, True])
def test_an_error_creating_the_file_ends_the_run_with_the_same_line(tmp_path, monkeypatch, replacing):
    """In the background the new file is created by the writing thread (open returns at once): an error
    there reaches the run at its first frame, and the run ends with the foreground's one-line error; the
    lock is released, and an earlier file at the path is kept as it was, with no temporary left beside it."""
    real = H5MDWriter._create

    def full(self, run):
        real(self, run)  # the file exists, half made, when the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(H5MDWriter, "_create", full)
    state = mf.Particles(torch.randn(1, 20, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    messages = []
    for background in (False, True):
        folder = tmp_path / ("bg" if background else "fg")
        folder.mkdir()
        path = folder / "t.h5"
        if replacing:
            path.write_bytes(b"an earlier run")
        with pytest.raises(mf.errors.TrajectoryFileError) as raised:
            _simulate(path, background, state)
        message = str(raised.value)
        assert "\n" not in message and "cannot create the trajectory file" in message and "No space left" in message
        messages.append(message.replace(str(folder), "FOLDER"))
        assert not (folder / "t.h5.lock").exists()
        names = sorted(p.name for p in folder.iterdir())
        if replacing:
            assert names == ["t.h5"] and path.read_bytes() == b"an earlier run"
    assert messages[0] == messages[1]


def test_whole_chunks_go_to_the_file_as_they_are_and_batches_realign_after_a_flush(tmp_path, monkeypatch):
    """A full batch of whole chunks is written to the file as it is (no chunk cache, nothing left for a
    later flush to write), in both modes alike (the files are the same bytes); a reader still trusts
    only the rows of the last flush. A flush hands over part of a batch (rows 32–39 of 16-row chunks):
    the next batch is 8 rows, so the one after fills a whole chunk again (rows 48–63)."""
    monkeypatch.setattr(h5md, "STAGE_BYTES", 16 * 8 * 2 * 8)  # 16 rows of (8, 2) float64: one chunk
    direct, flushed = [], []
    real_direct = h5md._write_whole_chunks
    monkeypatch.setattr(h5md, "_write_whole_chunks",
                        lambda ds, rows, first, c: (direct.append((first, len(rows))), real_direct(ds, rows, first, c)))
    real_flush = h5py.Dataset.flush
    monkeypatch.setattr(h5py.Dataset, "flush", lambda ds: (flushed.append(ds.name), real_flush(ds)))
    files = []
    for background in (False, True):
        path = tmp_path / f"{background}.h5"
        writer = H5MDWriter(path, flush_frames=None, flush_seconds=None, background=background)
        writer.open(_run())
        _write_frames(writer, range(40))
        writer._work and writer._work.drain()
        assert writer._frame_elements[0].batch == 16 and writer.frames == 40
        assert direct == [(0, 16), (16, 16)] and flushed == []
        with h5py.File(path, "r", libver="latest", swmr=True) as f:
            assert valid_rows(f)["particles/trajectory/position"] == 0  # nothing flushed yet
        writer.flush()
        _write_frames(writer, range(40, 70))
        writer._work and writer._work.drain()
        assert direct == [(0, 16), (16, 16), (48, 16)]
        direct.clear()
        writer.close()
        with h5py.File(path, "r") as f:
            assert valid_rows(f)["particles/trajectory/position"] == 70
            np.testing.assert_array_equal(f["particles/trajectory/position/value"][:, :, :],
                                          np.broadcast_to(np.arange(70.0)[:, None, None], (70, 8, 2)))
            np.testing.assert_array_equal(f["particles/trajectory/position/step"][:], np.arange(70))
        files.append(path.read_bytes())
    assert files[0] == files[1]


def test_compressed_chunks_go_through_the_chunk_cache(tmp_path, monkeypatch):
    """With a filter the chunk's bytes on disk are not the rows: full batches go through HDF5's chunk
    cache, which is written out at once (not at the next commit), and the rows read back."""
    monkeypatch.setattr(h5md, "STAGE_BYTES", 16 * 8 * 2 * 8)
    direct, flushed = [], []
    monkeypatch.setattr(h5md, "_write_whole_chunks", lambda *a: direct.append(a))
    real_flush = h5py.Dataset.flush
    monkeypatch.setattr(h5py.Dataset, "flush", lambda ds: (flushed.append(ds.name), real_flush(ds)))
    path = tmp_path / "gzip.h5"
    writer = H5MDWriter(path, flush_frames=None, flush_seconds=None, compression="gzip")
    writer.open(_run())
    _write_frames(writer, range(40))
    assert direct == [] and flushed == ["/particles/trajectory/position/value"] * 2  # after rows 16 and 32
    writer.close()
    with h5py.File(path, "r") as f:
        assert f["particles/trajectory/position/value"].compression == "gzip"
        np.testing.assert_array_equal(f["particles/trajectory/position/value"][:, 0, 0], np.arange(40.0))


def test_a_batch_is_one_chunk_of_a_frame_of_ten_thousand_particles():
    """Staged batches are whole chunks of about STAGE_BYTES (1 MiB): 6 rows of 160 kB (N = 10⁴, d = 2,
    float64); rows over a quarter of it are staged up to MAX_STAGE_BYTES so a batch holds at least 4;
    rows over 1 MiB (N = 10⁵) are not staged."""
    def batch(n):
        chunks = h5md._value_chunks((n, 2), np.dtype(np.float64), True)
        return h5md._batch((n, 2), 8, chunks[0]), chunks[0]

    assert batch(10_000) == (6, 6)
    assert batch(20_000) == (12, 3)  # 320 kB rows: four chunks of three
    assert batch(1_000) == (64, 16)  # 16 kB rows: 1 MiB of whole chunks
    assert batch(100_000)[0] == 1


def test_a_later_writer_of_the_same_layout_stages_into_the_earlier_ones_buffers(tmp_path, monkeypatch):
    """A closed writer's staging buffers go to the process's pool (their pages stay mapped) and the next
    writer of that layout takes them; what it writes is unchanged. The pool keeps at most PER_LAYOUT sets
    a layout and MAX_BYTES in all, the least recently returned layout going first."""
    from measureflow.io import staging

    monkeypatch.setattr(staging, "pool", staging.StagingPool())
    first = []
    for i in range(2):
        path = tmp_path / f"{i}.h5"
        writer = H5MDWriter(path, flush_frames=None, flush_seconds=None)
        writer.open(_run(N=1000))
        _write_frames(writer, range(1), N=1000)
        first.append(writer._frame_elements[0].stage_value)
        _write_frames(writer, range(1, 70), N=1000)  # one batch of 64 rows and 6 staged at close
        kept = writer._frame_elements[0].stage_value
        writer.close()
        with h5py.File(path, "r") as f:
            np.testing.assert_array_equal(f["particles/trajectory/position/value"][:, 0, 0], np.arange(70.0))
        assert staging.pool.nbytes == kept.nbytes + 2 * 64 * 8  # its one set (values, steps, times) kept
    assert first[1] is kept is first[0]  # the second writer staged into the first one's buffer

    pool = staging.StagingPool(max_bytes=3 * 800, per_layout=2)
    sets = [(np.zeros((4, 10)), np.zeros(4, np.int64), np.zeros(4)) for _ in range(3)]  # 320 + 32 + 32 bytes
    for s in sets:
        pool.give(s)
    assert pool.nbytes == 2 * 384  # two sets of this layout kept, the third not
    other = (np.zeros((2, 10)), np.zeros(2, np.int64), np.zeros(2))  # 192 bytes, another layout
    pool.give(other)
    pool.give((np.zeros((2, 10)), np.zeros(2, np.int64), np.zeros(2)))
    assert pool.nbytes <= 3 * 800 and pool.take(2, (10,), np.float64) is not None
    assert pool.take(4, (10,), np.float64)[0] is sets[1][0]  # the last returned first
    assert pool.take(3, (10,), np.float64) is None


def test_the_writing_thread_lets_the_run_take_the_interpreter_between_hdf5_calls(tmp_path, monkeypatch):
    """let_the_run_go_on() releases the interpreter lock (sleep(0)) on a writing thread only: the run's
    thread never sleeps in it, and a background writer's thread calls it between its HDF5 calls."""
    from measureflow.io import background

    slept = []
    real_sleep = background.time.sleep
    monkeypatch.setattr(background.time, "sleep", lambda s: (slept.append((s, background._worker.__dict__.get("active"))),
                                                             real_sleep(s)))
    background.let_the_run_go_on()
    assert slept == []
    writer = H5MDWriter(tmp_path / "y.h5", flush_frames=None, flush_seconds=None, background=True)
    writer.open(_run())
    _write_frames(writer, range(20))
    writer.close()
    assert slept and all(s == 0 and active for s, active in slept)
    with h5py.File(tmp_path / "y.h5", "r") as f:
        np.testing.assert_array_equal(f["particles/trajectory/position/value"][:, 0, 0], np.arange(20.0))
