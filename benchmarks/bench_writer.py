"""H5MDWriter against a bare h5py append loop at the same frame sizes and chunking.

The bare loop is the floor for appending to HDF5 from Python: per frame it resizes and assigns the
value, step and time datasets of one element (what H5MD asks for), in the same chunk layout, with
SWMR mode on as in the writer. The writer adds: host copy of a torch tensor, shape checks,
book-keeping of complete rows and, on its schedule, two-phase flushes (data, then row counts); it
saves calls by staging rows and appending them in batches (one resize and one write per dataset).

A second table answers the question a user asks: what does writing cost a whole run? It times
the same ``Simulation`` (N particles, d = 2, an Ornstein–Uhlenbeck field under Euler–Maruyama,
``--steps`` steps) with no writer, with an H5MD writer every 10th step (default flush schedule) and
with the same writer on its background thread (``background=True``: the run's thread only copies the
frame into a staging buffer and hands whole batches to the thread), interleaving the three so that machine noise hits them alike. The background share is the
time the run's thread spends in the writer; the wall-time difference also carries the writing
thread's competition for the cores (on a loaded machine it has none to spare).

Every file is deleted as soon as its run is timed. Kept, the files of the earlier runs (8 MB each at
N = 10⁴) are written back to the disk by the kernel while the later runs write theirs, and a write
into the page cache then took several times longer (3.1 against 0.22 ms a MiB right after 200 MB
were written and kept): the result said more about how many runs
came before than about the writer (a single run's file is written back after it ends). A long run's
own file is written back while it runs, on the same cores: ``--dir /dev/shm`` (memory, nothing to
write back) separates that cost of the disk from the writer's.

Usage::

    python benchmarks/bench_writer.py [--frames 100] [--repeats 3] [--sizes 10000 100000] [--quick] [--threads 1] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from benchkit import add_standard_arguments, prepare_machine

import measureflow as mf
from measureflow.io import RunInfo
from measureflow.io import layout as L
from measureflow.io.h5md import STEP_CHUNK, H5MDWriter


def bench_writer(path: Path, x: torch.Tensor, frames: int, **options) -> float:
    R, N, d = x.shape
    start = time.perf_counter()
    writer = H5MDWriter(path, **options)
    writer.open(RunInfo(kind="particles", replicas=R, size=N, dim=d, dtype=str(x.dtype).removeprefix("torch.")))
    state = mf.Particles(x)
    for step in range(frames):
        writer.write_frame(step, 0.01 * step, state)
    writer.close()
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def bench_bare(path: Path, x: torch.Tensor, frames: int) -> float:
    R, N, d = x.shape
    start = time.perf_counter()
    host = x.reshape(R * N, d).numpy()
    with h5py.File(path, "w", libver="latest", rdcc_nbytes=L.CHUNK_CACHE_BYTES) as f:
        sample = (R * N, d)
        chunks = L.chunk_shape(sample, host.dtype.itemsize, L.FRAME_CHUNK_BYTES, L.FRAME_CHUNK_FRAMES)
        value = f.create_dataset("value", shape=(0, *sample), maxshape=(None, *sample), chunks=chunks, dtype=host.dtype)
        steps = f.create_dataset("step", shape=(0,), maxshape=(None,), chunks=(STEP_CHUNK,), dtype=np.int64)
        times = f.create_dataset("time", shape=(0,), maxshape=(None,), chunks=(STEP_CHUNK,), dtype=np.float64)
        f.swmr_mode = True
        for i in range(frames):
            value.resize(i + 1, axis=0)
            value[i] = host
            steps.resize(i + 1, axis=0)
            steps[i] = i
            times.resize(i + 1, axis=0)
            times[i] = 0.01 * i
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


class TimedWriter(H5MDWriter):
    """An H5MDWriter that adds up the wall time spent inside its own methods. A method called by another
    (the close's final ``flush``, a scheduled one inside ``write_frame``) is inside the caller's time and
    is not counted again: until 2026-12-07 12:55 UTC it was, which put the final flush (about 2 ms at
    N = 10⁴) twice into the shares recorded before (``benchmarks/README.md`` says where)."""

    spent = 0.0
    _depth = 0

    def _timed(self, method, *args):
        if self._depth:
            return method(self, *args)
        self._depth = 1
        start = time.perf_counter()
        try:
            return method(self, *args)
        finally:
            self.spent += time.perf_counter() - start
            self._depth = 0

    def open(self, run):
        return self._timed(H5MDWriter.open, run)

    def write_frame(self, step, time_, state):
        return self._timed(H5MDWriter.write_frame, step, time_, state)

    def write_observables(self, step, time_, values):
        return self._timed(H5MDWriter.write_observables, step, time_, values)

    def flush(self):
        return self._timed(H5MDWriter.flush)

    def close(self):
        return self._timed(H5MDWriter.close)


def bench_run(path: Path | None, n: int, steps: int, every: int = 10, background: bool = False) -> tuple[float, float]:
    """(wall time of a whole run, time the run's thread spent inside the writer), an H5MD frame every ``every``
    steps; ``background``: H5MDWriter(background=True), whose thread's own time is not the run's."""
    field = mf.field("ornstein_uhlenbeck", theta=1.0, sigma=0.5)
    x = torch.randn(1, n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    writers = [TimedWriter(path, every=every, background=background)] if path is not None else []
    simulation = mf.Simulation(mf.Particles(x), field, "euler_maruyama", 0.0, 1.0, steps=steps,
                               writers=writers, seed=0, progress=False)
    start = time.perf_counter()
    simulation.run()
    elapsed = time.perf_counter() - start
    if path is not None:
        path.unlink()
    return elapsed, (writers[0].spent if writers else 0.0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=2)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--steps", type=int, default=500, help="steps of the whole-run comparison")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the files are written (default: the system's temporary directory)")
    add_standard_arguments(parser, "writer", "N = 10⁴, 20 frames, 100 steps, 2 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.frames, args.steps, args.repeats = [10_000], 20, 100, 2
    env = prepare_machine(args)
    rows = []
    dtype = getattr(torch, args.dtype)
    print(f"h5py {h5py.__version__}, HDF5 {h5py.version.hdf5_version}, torch {torch.__version__}")
    print(f"R = 1, d = {args.dim}, {args.dtype}, {args.frames} frames, median of {args.repeats} runs")
    print(
        f"{'N':>8} {'MB/frame':>9} {'bare ms/frame':>14} {'writer ms/frame':>16} {'ratio':>6} "
        f"{'writer, flush every 10':>24}"
    )
    print(f"files in {args.dir or tempfile.gettempdir()}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        for n in args.sizes:
            x = torch.randn(1, n, args.dim, dtype=dtype)
            results = {"bare": [], "writer": [], "flush10": []}
            for r in range(args.repeats):
                results["bare"].append(bench_bare(tmp / f"bare{r}.h5", x, args.frames))
                results["writer"].append(bench_writer(tmp / f"w{r}.h5", x, args.frames))
                results["flush10"].append(bench_writer(tmp / f"f{r}.h5", x, args.frames, flush_every=10))
            per = {k: 1e3 * statistics.median(v) / args.frames for k, v in results.items()}
            mb = x.numel() * x.element_size() / 1e6
            rows.append({"part": "frames", "N": n, "MB_per_frame": mb, "ms_per_frame": per})
            print(
                f"{n:>8} {mb:>9.2f} {per['bare']:>14.3f} {per['writer']:>16.3f} "
                f"{per['writer'] / per['bare']:>6.2f} {per['flush10']:>17.3f} ({per['flush10'] / per['bare']:.2f}×)"
            )

        print(f"\nwhole run: {args.steps} Euler–Maruyama steps of an OU field, d = 2, frame every 10th step, "
              f"median of {max(args.repeats, 5)} interleaved runs")
        print("(the share is the time inside the writer's methods over the run's time: robust to machine noise;")
        print(" the difference of wall times measures the same thing but carries the noise of two runs)")
        print(f"{'N':>8} {'no writer s':>12} {'h5md writer s':>14} {'writer share':>13} {'wall-time difference':>21}"
              f" {'background s':>13} {'bg share':>9} {'bg wall diff':>13}")
        for n in args.sizes:
            bare, written, shares, bg, bg_shares = [], [], [], [], []
            for r in range(max(args.repeats, 5)):
                bare.append(bench_run(None, n, args.steps)[0])
                total, spent = bench_run(tmp / f"run{n}_{r}.h5", n, args.steps)
                written.append(total)
                shares.append(spent / total)
                total, spent = bench_run(tmp / f"bg{n}_{r}.h5", n, args.steps, background=True)
                bg.append(total)
                bg_shares.append(spent / total)
            b, w, g = statistics.median(bare), statistics.median(written), statistics.median(bg)
            rows.append({"part": "run", "N": n, "steps": args.steps, "no_writer_s": b, "writer_s": w,
                         "writer_share": statistics.median(shares), "background_writer_s": g,
                         "background_writer_share": statistics.median(bg_shares)})
            print(f"{n:>8} {b:>12.3f} {w:>14.3f} {100 * statistics.median(shares):>12.1f}% "
                  f"{100 * (w / b - 1):>20.1f}% {g:>13.3f} {100 * statistics.median(bg_shares):>8.1f}% "
                  f"{100 * (g / b - 1):>12.1f}%", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    env["files_in"] = str(args.dir or tempfile.gettempdir())
    args.out.with_suffix(".json").write_text(json.dumps({"environment": env, "results": rows}, indent=2))
    print(f"written: {args.out.with_suffix('.json')}")

if __name__ == "__main__":
    main()
