"""One command that checks measureflow on a GPU and measures it against its peers.

Sections, in this order (each skipped with a note once the time budget is spent):

1. **device**: name, memory, compute capability, driver, torch / CUDA / cuDNN / Triton versions, and
   the peers found (pykeops, geomloss, ray).
2. **tests**: ``pytest -m gpu`` in a subprocess with a timeout, over the test modules that hold
   gpu-marked tests (tests/test_device.py and others; without CUDA every one of them is skipped).
3. **kernel sums**: the Gaussian kernel sum and its gradient (benchmarks/bench_reductions.py's
   implementations and timing) at N = M = 10⁵ and 10⁶, d = 2 and 64, float32, measureflow against
   plain KeOps and GeomLoss (KeOps backend); a peer that is not installed is skipped with a note,
   and a size whose time, extrapolated ×(N/N_prev)² from the size below, would overrun the budget.
4. **attention**: one evaluation of the attention field at N = 10⁴ and 10⁵, d = 64, float32
   (benchmarks/bench_attention.py's problem and implementations) against
   ``scaled_dot_product_attention`` under each backend that runs here (flash, memory-efficient,
   cuDNN, math), plus SDPA's flash backend in bfloat16 for reference (flash has no float32 kernel).
5. **MMD flow**: 10⁶ particles in 2-D under the ``mmd`` field (Gaussian kernel, analytic Gaussian
   target: one N × N kernel sum per step) for 100 Euler steps with an H5MD writer every 10 steps;
   the writer's share of the run is the time spent inside its methods (open, write_frame, flush,
   set_status, close; the device is synchronised before each call, outside its timer) over the
   run's wall-clock time. A first, untimed 2-step run compiles the kernel and times a step; fewer
   steps are run (and said) if 100 would overrun the budget.
6. **packed sweep**: 64 runs of scenarios/relaxation.py (benchmarks/bench_sweep.py's sweep: OU
   particles under Euler–Maruyama, observables and a checkpoint every 10 steps, grid n × t1 ∈ {1, 2}
   × 16 seeds) with ``--pack``, one grid point (16 runs) at a time, alternately on the device and on
   the CPU, in runs per minute; a side stops with the other when the budget runs out.

Results: one markdown table (``gpu_check.md``) and the raw numbers (``gpu_check.json``) in ``--out``
(default: a new temporary directory; never benchmarks/results/), with the targets of an H100 —
kernel sum ≥ 3× KeOps at N = 10⁶, d = 2; attention field within 1.5× of SDPA's flash backend; the
writer under 5 % of the MMD flow — marked met, not met or not measured. A target is judged only
where its measurement was made as stated (on CUDA, at its size).

Usage::

    python benchmarks/gpu_check.py                         # on a GPU node: under 8 minutes on one H100
    python benchmarks/gpu_check.py --device cpu --quick    # smoke run anywhere (small sizes)
    python benchmarks/gpu_check.py --sections kernels attention --budget 300 --out /tmp/check

The script imports the measureflow tree it lives in (it builds a temporary folder of import links
when that tree is not what Python would import), so a plain checkout runs it without installing.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
SECTIONS = ("tests", "kernels", "attention", "flow", "sweep")
# Seconds each section may use at most (the global budget is checked as well).
CAPS = {"tests": 170.0, "kernels": 120.0, "attention": 40.0, "flow": 100.0, "sweep": 60.0}


def ensure_tree() -> str | None:
    """Make ``import measureflow`` (and ``measureflow_plugins``) load this tree; return the PYTHONPATH
    entry added for subprocesses, or None when Python already imports this tree."""
    def origin(name):
        spec = importlib.util.find_spec(name)
        return Path(spec.origin).resolve().parent if spec is not None and spec.origin else None

    if origin("measureflow") == ROOT / "measureflow" and origin("measureflow_plugins") == ROOT / "plugins":
        return None
    sys.path.insert(0, str(BENCHMARKS))
    from trees import make_pyroot  # noqa: E402 - the same import links the A/B tools use

    pyroot = make_pyroot(ROOT, Path(tempfile.mkdtemp(prefix="gpu_check-pyroot-")))
    sys.path.insert(0, str(pyroot))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pyroot), os.environ.get("PYTHONPATH")]))
    return str(pyroot)


PYROOT = ensure_tree()

import torch  # noqa: E402

import measureflow  # noqa: E402
from measureflow import Particles, Simulation, reductions  # noqa: E402
from measureflow.measures import Gaussian  # noqa: E402

sys.path.insert(0, str(BENCHMARKS))
import bench_attention  # noqa: E402
import bench_reductions  # noqa: E402
import bench_sweep  # noqa: E402


# -- helpers ------------------------------------------------------------------------------------------


class Budget:
    """The run's time budget: ``left()`` seconds remain; ``section(cap)`` gives one section's allowance."""

    def __init__(self, seconds: float):
        self.total = seconds
        self.start = time.monotonic()

    def used(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.total - self.used()

    def section(self, cap: float) -> "Deadline":
        return Deadline(min(cap, self.left()))


class Deadline:
    """Seconds left for one section."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + max(0.0, seconds)

    def left(self) -> float:
        return self.end - time.monotonic()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def fmt_s(seconds) -> str:
    if seconds is None:
        return "—"
    return f"{seconds:.3g} s" if seconds < 100 else f"{seconds:.0f} s"


def fmt_n(n: int) -> str:
    exponent = int(round(math.log10(n))) if n > 0 else 0
    if 10**exponent == n and exponent >= 4:
        return "10" + "".join("⁰¹²³⁴⁵⁶⁷⁸⁹"[int(c)] for c in str(exponent))
    return f"{n:,}"


def row(section, what, size="", ours="", peer="", ratio="", target="", status="", note="", **numbers) -> dict:
    """One line of the results table (and of the JSON, with the raw ``numbers``)."""
    return {"section": section, "what": what, "size": size, "measureflow": ours, "peer": peer, "ratio": ratio,
            "target": target, "status": status, "note": note, "numbers": numbers}


def skipped(section: str, why: str) -> dict:
    return row(section, "skipped", note=why, status="not measured")


def is_h100(info: dict) -> bool:
    return "H100" in str(info.get("name", ""))


# -- 1. device ------------------------------------------------------------------------------------------


def driver_version() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        value = pynvml.nvmlSystemGetDriverVersion()
        return value.decode() if isinstance(value, bytes) else str(value)
    except Exception:  # noqa: BLE001 - a label only
        return "unknown"


def device_info(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "measureflow": str(Path(measureflow.__file__).resolve().parent),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                    multiprocessors=p.multi_processor_count, driver=driver_version(),
                    cudnn=torch.backends.cudnn.version(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    else:
        info.update(name=platform.processor() or platform.machine())
    for package in ("triton", "pykeops", "geomloss", "ray", "h5py", "pot"):
        info[package] = version(package)
    return info


# -- 2. tests ---------------------------------------------------------------------------------------------


def section_tests(args, device, deadline: Deadline, out: Path) -> list[dict]:
    timeout = max(10.0, min(args.pytest_timeout, deadline.left()))
    log = out / "pytest-gpu.log"
    # Only the modules holding gpu-marked tests are collected: the others may import packages a GPU
    # node lacks (POT, …) and would count as collection errors although none of their tests is selected.
    modules = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").glob("test_*.py")
                     if "mark.gpu" in path.read_text())
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rfEs", *modules]
    print(f"  $ {' '.join(command)}   (timeout {timeout:.0f} s, log {log})", flush=True)
    start = time.monotonic()
    with open(log, "w") as sink:
        process = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code, timed_out = None, True
    seconds = time.monotonic() - start
    text = log.read_text(errors="replace")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)",
                                                "\n".join(text.splitlines()[-3:]))}
    failing = [line.split(" - ")[0] for line in text.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    for line in failing:
        print(f"  {line}", flush=True)
    if timed_out:
        progress_line = re.compile(r"[.FEsxX]+( +\[ *\d+%\])?")
        progress = [line.split(" [")[0] for line in text.splitlines() if progress_line.fullmatch(line)]
        done = sum(len(line) for line in progress)  # -q prints one character per test
        summary, status = f"timed out after {seconds:.0f} s (about {done} tests reported)", "TIMED OUT"
    else:
        summary = ", ".join(f"{n} {k}" for k, n in counts.items() if k != "deselected") or f"exit code {code}"
        status = "passed" if code == 0 else ("no tests ran" if code == 5 else "FAILED")
    note = "; ".join(failing[:6]) + (" …" if len(failing) > 6 else "")
    if device.type != "cuda" and not failing:
        note = "no CUDA device: every gpu test is skipped here"
    return [row("tests", "pytest -m gpu", ours=summary, status=status, note=note,
                seconds=seconds, counts=counts, exit_code=code, timed_out=timed_out, failing=failing, log=str(log))]


# -- 3. kernel sums ---------------------------------------------------------------------------------------


KEOPS_TARGET = 3.0
KEOPS_TARGET_TEXT = f"≥ {KEOPS_TARGET:g} (KeOps / measureflow)"
PACKAGES = {"keops": "pykeops", "geomloss": "geomloss"}  # peer → the package that provides it
LABELS = {"measureflow": "measureflow", "keops": "KeOps", "geomloss": "GeomLoss"}


def section_kernels(args, device, deadline: Deadline, info: dict) -> list[dict]:
    sizes = [2000, 5000] if args.quick else [100_000, 1_000_000]
    dims = [2, 64]
    repeats = 1 if args.quick else 2
    previous_compile = reductions.config.compile
    reductions.config.compile = "on"  # steady state: the compile happens in the warm-up call
    rows: list[dict] = []
    last: dict = {}  # (implementation, d) → (N, seconds) of its last measurement
    try:
        # d = 2 at both sizes first: the target's row (N = 10⁶, d = 2) comes before the d = 64 rows.
        for d in dims:
            for n in sizes:
                rows.extend(_kernel_size(args, device, deadline, info, n, d, repeats, first=(n, d) == (sizes[0], dims[0]),
                                         last=last))
                free(device)
    finally:
        reductions.config.compile = previous_compile
    if not any(r["target"] for r in rows):  # the target row never came up (quick sizes)
        rows.append(row("kernel sums", "KeOps vs measureflow", "N = M = 10⁶, d = 2", target=KEOPS_TARGET_TEXT,
                        status="not measured", note="quick sizes" if args.quick else "N = 10⁶ not reached"))
    return rows


def _kernel_size(args, device, deadline, info, n: int, d: int, repeats: int, first: bool, last: dict) -> list[dict]:
    """The rows of one (N, d): measureflow, then each peer against it."""
    size = f"N = M = {fmt_n(n)}, d = {d}"
    g = torch.Generator(device=device).manual_seed(args.seed + d)
    x = torch.randn(n, d, generator=g, device=device)
    y = torch.randn(n, d, generator=g, device=device)
    w = torch.rand(n, generator=g, device=device, dtype=torch.float64)
    w = (w / w.sum()).float()
    w = w / w.sum()  # float32 renormalisation, as bench_reductions.py
    h = math.sqrt(d) / 2
    S64, G64 = bench_reductions.reference(x, y, w, h, min(256, n))
    rows, ours = [], None
    for name in ("measureflow", *PACKAGES):
        label = LABELS[name]
        is_target = (n, d, name) == (1_000_000, 2, "keops")
        target = KEOPS_TARGET_TEXT if is_target else ""
        what = "measureflow S and ∇S" if name == "measureflow" else f"{label} vs measureflow"

        def note_only(note):
            rows.append(row("kernel sums", what, size, target=target, status="not measured" if is_target else "",
                            note=note))

        if name != "measureflow" and not installed(PACKAGES[name]):
            if first or is_target:  # said once, and on the target's row
                note_only(f"{label} not installed (pip install {PACKAGES[name]})")
            continue
        if name != "measureflow" and ours is None:
            note_only("not run: measureflow was not measured at this size")
            continue
        fn = bench_reductions.ours if name == "measureflow" else bench_reductions.PEERS[name]
        previous = last.get((name, d))
        estimate = None if previous is None else previous[1] * (n / previous[0]) ** 2 * repeats
        if estimate is not None and estimate > deadline.left():
            note_only(f"skipped: about {estimate:.0f} s estimated from N = {fmt_n(previous[0])}, "
                      f"{deadline.left():.0f} s left")
            continue
        try:
            warmup, best, peak, _, (S, G) = bench_reductions.measure(fn, (x, y, w, h), device, repeats, long_run=5.0)
        except Exception as exc:  # noqa: BLE001 - a failing implementation is reported, the others go on
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            print(f"  {size:<24} {label:<12} failed: {message}", flush=True)
            note_only(f"failed: {message}")
            free(device)
            continue
        last[(name, d)] = (n, best)
        k = S64.shape[0]
        err = max(bench_reductions.rel(S[:k], S64), bench_reductions.rel(G[:k], G64))
        print(f"  {size:<24} {label:<12} {best:9.4f} s  (warm-up {warmup:.2f} s, peak "
              f"{bench_reductions.fmt_bytes(peak)}, error vs float64 {err:.1e})", flush=True)
        numbers = dict(N=n, d=d, impl=name, seconds=best, warmup_seconds=warmup, peak_bytes=peak, err64=err)
        if name == "measureflow":
            ours = (best, S, G)
            rows.append(row("kernel sums", what, size, ours=fmt_s(best),
                            note=f"error vs float64 {err:.1e}; warm-up {warmup:.1f} s", **numbers))
            continue
        ratio = best / ours[0]
        diff = max(bench_reductions.rel(S, ours[1]), bench_reductions.rel(G, ours[2]))
        status, note = "", f"differs from measureflow by {diff:.1e}; error vs float64 {err:.1e}"
        if is_target:
            if device.type == "cuda":
                status = "met" if ratio >= KEOPS_TARGET else "not met"
                if not is_h100(info):
                    note += f"; target set for an H100, this GPU is {info.get('name')}"
            else:
                status, note = "not measured", note + "; target is for CUDA"
        rows.append(row("kernel sums", what, size, ours=fmt_s(ours[0]), peer=fmt_s(best), ratio=f"{ratio:.2f}",
                        target=target, status=status, note=note, reldiff=diff, ratio_value=ratio, **numbers))
        del S, G
    return rows


# -- 4. attention -----------------------------------------------------------------------------------------


ATTENTION_TARGET = 1.5


def sdpa_backends(q4, k4, v4, device):
    """name → callable of SDPA under one backend (those this torch knows)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for label, backend in (("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"),
                           ("cudnn", "CUDNN_ATTENTION")):
        if not hasattr(SDPBackend, backend) or (device.type != "cuda" and label != "flash"):
            continue  # the memory-efficient and cuDNN kernels exist for CUDA only

        def call(backend=getattr(SDPBackend, backend)):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q4, k4, v4, scale=1.0)[0, 0]

        out[f"SDPA {label}"] = call
    return out


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def section_attention(args, device, deadline: Deadline, info: dict) -> list[dict]:
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # As bench_attention.py: one thread, whose timings do not depend on what else the cores run.
        torch.set_num_threads(1)
    try:
        return _attention(args, device, deadline, info)
    finally:
        torch.set_num_threads(threads)


def _attention(args, device, deadline: Deadline, info: dict) -> list[dict]:
    sizes = [1000, 4000] if args.quick else [10_000, 100_000]
    d = 64
    rows = []
    last = None  # (n, seconds of one round of every implementation)
    for n in sizes:
        if last is not None:
            estimate = last[1] * (n / last[0]) ** 2 * 4
            if estimate > deadline.left():
                rows.append(row("attention", "measureflow field vs SDPA", f"N = {fmt_n(n)}, d = {d}",
                                status="not measured", note=f"skipped: about {estimate:.0f} s estimated, "
                                                            f"{deadline.left():.0f} s left"))
                continue
        x, Q, K, V = (t.to(device) for t in bench_attention.problem(n, d, seed=n))
        impls, (q, k, v) = bench_attention.implementations(x, Q, K, V, max_gib=args.max_gib)
        impls = {name: fn for name, (fn, why) in impls.items() if fn is not None and name != "SDPA"}
        q4, k4, v4 = q[None, None], k[None, None], v[None, None]
        impls.update(sdpa_backends(q4, k4, v4, device))
        impls["SDPA default"] = lambda: torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, scale=1.0)[0, 0]
        ref = bench_attention.reference(q, k, v, min(256, n))
        errors, unavailable, peak = {}, {}, {}
        for name, fn in list(impls.items()):  # warm-up: first-call costs, accuracy, availability
            try:
                with bench_reductions.PeakMemory(device) as mem:
                    _, result = timed(fn, device)
            except RuntimeError as exc:
                why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                unavailable[name] = "no kernel for these inputs here" if "No viable backend" in why else why[:100]
                del impls[name]
                free(device)
                continue
            peak[name] = mem.bytes
            errors[name] = float((result[: ref.shape[0]].double() - ref).abs().max() / ref.abs().max())
            del result
        if device.type == "cuda" and "SDPA flash" in unavailable:
            qb, kb, vb = (t.to(torch.bfloat16) for t in (q4, k4, v4))
            flash_bf16 = sdpa_backends(qb, kb, vb, device).get("SDPA flash")
            try:
                timed(flash_bf16, device)
                impls["SDPA flash (bfloat16)"] = flash_bf16
            except RuntimeError as exc:
                unavailable["SDPA flash (bfloat16)"] = str(exc).splitlines()[0][:160]
        rounds = 3 if args.quick else (5 if n <= 20_000 else 3)
        samples = {name: [] for name in impls}
        round_start = time.monotonic()
        for r in range(rounds):
            for name, fn in impls.items():
                samples[name].append(timed(fn, device)[0])
            if r == 0:
                last = (n, time.monotonic() - round_start)
            if deadline.left() < 0:
                break
        median = {name: statistics.median(ts) for name, ts in samples.items()}
        field = median["measureflow field"]
        size = f"N = {fmt_n(n)}, d = {d}"
        print(f"  {size}: " + ", ".join(f"{name} {t:.4f} s" for name, t in median.items()), flush=True)
        for name, why in unavailable.items():
            print(f"  {size}: {name} not available here: {why}", flush=True)
        # The target compares with SDPA's flash backend; where flash has no float32 kernel (CUDA), with
        # the fastest float32 fused backend that runs.
        fused = [b for b in ("SDPA flash", "SDPA efficient", "SDPA cudnn") if b in median]
        reference = min(fused, key=median.get) if fused else None
        is_target_size = n == 100_000
        rows.append(row("attention", "measureflow reduction (softmax_average on Qx, Kx, Vx)", size,
                        ours=fmt_s(median["measureflow reduction"]),
                        note=f"error vs float64 {errors['measureflow reduction']:.1e}",
                        seconds=median["measureflow reduction"], N=n))
        for name in [b for b in median if b.startswith("SDPA")]:
            ratio = field / median[name]
            status, target, note = "", "", f"error vs float64 {errors.get(name, float('nan')):.1e}"
            if name == reference:
                target = f"≤ {ATTENTION_TARGET:g} (measureflow / SDPA flash)"
                if name != "SDPA flash":
                    note += (f"; SDPA flash did not run on float32 inputs here, so the target is read against "
                             f"{name}, the fastest float32 fused backend")
                if device.type == "cuda" and is_target_size:
                    status = "met" if ratio <= ATTENTION_TARGET else "not met"
                    if not is_h100(info):
                        note += f"; target set for an H100, this GPU is {info.get('name')}"
                else:
                    status = "not measured"
                    note += "; target is for CUDA at N = 10⁵"
            if "bfloat16" in name:
                note = "bfloat16 inputs: not like for like, shown for scale"
            rows.append(row("attention", f"measureflow field vs {name}", size, ours=fmt_s(field),
                            peer=fmt_s(median[name]), ratio=f"{ratio:.2f}", target=target, status=status, note=note,
                            field_seconds=field, peer_seconds=median[name], ratio_value=ratio, N=n,
                            peak_bytes=peak.get(name), field_peak_bytes=peak.get("measureflow field")))
        for name, why in unavailable.items():
            if "bfloat16" not in name:
                rows.append(row("attention", f"measureflow field vs {name}", size, note=f"not available: {why}"))
        del x, Q, K, V, q, k, v, q4, k4, v4, impls, ref
        free(device)
    if not any(r["status"] in ("met", "not met") for r in rows) and not any(r["target"] for r in rows):
        rows.append(row("attention", "measureflow field vs SDPA flash", "N = 10⁵, d = 64",
                        target=f"≤ {ATTENTION_TARGET:g} (measureflow / SDPA flash)", status="not measured",
                        note="quick sizes" if args.quick else "N = 10⁵ not reached"))
    return rows


# -- 5. MMD flow with a writer ------------------------------------------------------------------------------


WRITER_TARGET = 0.05
WRITER_METHODS = ("open", "write_frame", "write_observables", "flush", "set_status", "close")


def timed_writer(path: Path, every: int, device: torch.device):
    """An H5MD writer whose methods add their time to ``seconds`` (the device is synchronised before
    each call, outside the timer, so a method is not charged for the steps still queued)."""
    writer = measureflow.get_registry().writer("h5md", str(path), every=every)
    seconds = {"total": 0.0, "calls": 0}
    for method in WRITER_METHODS:
        original = getattr(writer, method, None)
        if original is None:
            continue

        def wrapped(*a, _original=original, **kw):
            sync(device)
            start = time.perf_counter()
            try:
                return _original(*a, **kw)
            finally:
                seconds["total"] += time.perf_counter() - start
                seconds["calls"] += 1

        setattr(writer, method, wrapped)
    return writer, seconds


def section_flow(args, device, deadline: Deadline, info: dict, out: Path) -> list[dict]:
    n = 4000 if args.quick else 1_000_000
    steps = 20 if args.quick else 100
    every = 5 if args.quick else 10
    dt = 0.01
    size = f"N = {fmt_n(n)}, d = 2, {steps} Euler steps, a frame every {every}"
    target = f"< {WRITER_TARGET:.0%} of the run"
    g = torch.Generator(device=device).manual_seed(args.seed)
    start = Particles(torch.randn(1, n, 2, generator=g, device=device))
    field = measureflow.field("mmd", target=Gaussian(torch.tensor([1.5, 0.0]), 0.5 * torch.eye(2)), bandwidth=1.0)

    def simulation(k, writers=()):
        return Simulation(start, field, "euler", 0.0, k * dt, steps=k, writers=list(writers), seed=args.seed,
                          progress=False)

    # Untimed: the fused kernel's compile and the target's copy on the device; then one timed probe.
    probe = time.perf_counter()
    simulation(2).run()
    sync(device)
    compile_seconds = time.perf_counter() - probe
    per_step, _ = timed(lambda: simulation(2).run(), device)
    per_step /= 2
    planned = steps
    affordable = int((deadline.left() - 5.0) / (1.15 * per_step)) if per_step > 0 else steps
    note = f"{per_step:.3g} s per step (first run {compile_seconds:.1f} s, with the compile)"
    if affordable < steps:
        planned = (affordable // every) * every
        if planned < 2 * every:
            return [row("MMD flow", "H5MD writer share", size, target=target, status="not measured",
                        note=f"skipped: {steps} steps need about {steps * per_step:.0f} s, "
                             f"{deadline.left():.0f} s left; {note}")]
        note += f"; cut to {planned} steps by the time budget"
    path = out / "mmd-flow.h5"
    writer, writer_seconds = timed_writer(path, every, device)
    seconds, result = timed(lambda: simulation(planned, [writer]).run(), device)
    size_bytes = path.stat().st_size if path.exists() else 0
    if not args.keep_files:
        path.unlink(missing_ok=True)
    share = writer_seconds["total"] / seconds
    frames = planned // every + 1
    print(f"  {size}: run {seconds:.2f} s ({result.status.code}), writer {writer_seconds['total']:.3f} s in "
          f"{writer_seconds['calls']} calls ({frames} frames, {size_bytes / 2**20:.0f} MiB) = {share:.1%}", flush=True)
    status = "not measured"
    if device.type == "cuda" and n == 1_000_000 and planned == steps and result.status.ok:
        status = "met" if share < WRITER_TARGET else "not met"
        if not is_h100(info):
            note += f"; target set for an H100, this GPU is {info.get('name')}"
    elif device.type != "cuda":
        note += "; target is for CUDA at N = 10⁶"
    ours = f"run {fmt_s(seconds)}, writer {fmt_s(writer_seconds['total'])}"
    return [row("MMD flow", "H5MD writer share", size, ours=ours,
                ratio=f"{share:.1%}", target=target, status=status,
                note=f"{frames} frames, {size_bytes / 2**20:.0f} MiB; {note}",
                run_seconds=seconds, writer_seconds=writer_seconds["total"], writer_calls=writer_seconds["calls"],
                share=share, steps=planned, per_step_seconds=per_step, compile_seconds=compile_seconds,
                file_bytes=size_bytes, status_code=result.status.code)]


# -- 6. packed sweep ----------------------------------------------------------------------------------------


def section_sweep(args, device, deadline: Deadline, out: Path) -> list[dict]:
    from measureflow.sweep import run_sweep

    n_values = (250, 1000) if args.quick else (10_000, 100_000)
    steps = 20 if args.quick else 100
    seeds = 16
    points = [(n, t1) for n in n_values for t1 in (1, 2)]
    sides = {"device": str(device), "cpu": "cpu"}
    done = {side: {"runs": 0, "seconds": 0.0} for side in sides}
    last = {}  # side → (n, seconds) of its last batch
    cut = None
    for k, (n, t1) in enumerate(points):
        for side, where in sides.items():
            # A batch costs about what the side's last one did, scaled by n (frames and checkpoints
            # grow with it) and by t1 (none of the work does).
            if side in last:
                estimate = last[side][1] * n / last[side][0]
                if estimate * 1.2 > deadline.left():
                    cut = (f"stopped after {done[side]['runs']} runs a side: the next batch needs about "
                           f"{estimate:.0f} s, {deadline.left():.0f} s left")
                    break
            directory = out / f"sweep-{side}-{k}"
            start = time.perf_counter()
            report = run_sweep(bench_sweep.SCENARIO, {"n": [str(n)], "t1": [str(t1)]}, f"0-{seeds - 1}", directory,
                               fixed={"field": "ornstein_uhlenbeck", "steps": steps, "every": 10}, pack=True,
                               device=where, progress=False)
            seconds = time.perf_counter() - start
            if not report.ok:
                raise RuntimeError(f"the packed sweep on {where} did not complete: {report.summary()}")
            done[side]["runs"] += sum(report.counts.values())
            done[side]["seconds"] += seconds
            last[side] = (n, seconds)
            print(f"  n = {n}, t1 = {t1}: {seeds} runs on {where} in {seconds:.2f} s", flush=True)
            if not args.keep_files:
                shutil.rmtree(directory, ignore_errors=True)
        if cut:
            break
    runs = min(d["runs"] for d in done.values())
    if runs == 0:
        return [row("packed sweep", "runs per minute", status="not measured", note=cut or "no batch ran")]
    rate = {side: 60.0 * d["runs"] / d["seconds"] for side, d in done.items()}
    size = f"{done['device']['runs']} runs, n ∈ {{{', '.join(fmt_n(v) for v in n_values)}}}, {steps} steps, --pack"
    note = "scenarios/relaxation.py (OU, Euler–Maruyama), frames, observables and checkpoints every 10 steps"
    if cut:
        note += f"; {cut}"
    return [row("packed sweep", f"runs / min on {device} vs CPU", size, ours=f"{rate['device']:.0f} runs/min",
                peer=f"CPU {rate['cpu']:.0f} runs/min", ratio=f"{rate['device'] / rate['cpu']:.2f}", note=note,
                runs_per_minute=rate, runs=done)]


# -- output -------------------------------------------------------------------------------------------------


COLUMNS = ("section", "what", "size", "measureflow", "peer", "ratio", "target", "status", "note")


def markdown(info: dict, rows: list[dict], args, elapsed: float) -> str:
    head = ", ".join(f"{k}={v}" for k, v in info.items())
    lines = [
        "# measureflow GPU check (benchmarks/gpu_check.py)",
        "",
        f"{head}; mode={'quick' if args.quick else 'full'}; budget={args.budget:g} s; elapsed={elapsed:.0f} s",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]).replace("|", "\\|") for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a smoke run")
    parser.add_argument("--quick", action="store_true", help="small sizes everywhere (a smoke run)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for gpu_check.md, gpu_check.json and the pytest log "
                             "(default: a new temporary one)")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds for the whole check (default 450); sections past it are skipped with a note")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--pytest-timeout", type=float, default=CAPS["tests"], help="seconds for pytest -m gpu")
    parser.add_argument("--max-gib", type=float, default=16.0, help="attention: skip SDPA math above this estimate")
    parser.add_argument("--keep-files", action="store_true", help="keep the MMD flow's file and the sweeps' files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    budget = Budget(args.budget)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here (use --device cpu for a smoke run)")
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device {args.device}: cuda, cuda:N or cpu")
    out = args.out if args.out is not None else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    if out.resolve().is_relative_to((BENCHMARKS / "results").resolve()):
        parser.error("--out: benchmarks/results/ holds the recorded tables; write the check elsewhere")
    out.mkdir(parents=True, exist_ok=True)

    info = device_info(device)
    print("device: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    if PYROOT:
        print(f"importing this tree through {PYROOT}", flush=True)

    rows: list[dict] = []
    runners = {
        "tests": lambda dl: section_tests(args, device, dl, out),
        "kernels": lambda dl: section_kernels(args, device, dl, info),
        "attention": lambda dl: section_attention(args, device, dl, info),
        "flow": lambda dl: section_flow(args, device, dl, info, out),
        "sweep": lambda dl: section_sweep(args, device, dl, out),
    }
    names = {"tests": "tests", "kernels": "kernel sums", "attention": "attention", "flow": "MMD flow",
             "sweep": "packed sweep"}
    for section in SECTIONS:
        if section not in args.sections:
            continue
        left = budget.left()
        print(f"\n== {names[section]} ({left:.0f} s of the budget left)", flush=True)
        if left < 5:
            rows.append(skipped(names[section], f"time budget of {args.budget:g} s spent"))
            print("  skipped: time budget spent", flush=True)
            continue
        started = time.monotonic()
        try:
            rows.extend(runners[section](budget.section(CAPS[section])))
        except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others' results
            message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            print(f"  FAILED: {message}", flush=True)
            rows.append(row(names[section], "section failed", status="FAILED", note=message))
        free(device)
        print(f"  ({time.monotonic() - started:.1f} s)", flush=True)

    elapsed = budget.used()
    text = markdown(info, rows, args, elapsed)
    (out / "gpu_check.md").write_text(text)
    (out / "gpu_check.json").write_text(json.dumps({"environment": info, "mode": "quick" if args.quick else "full",
                                                    "budget": args.budget, "elapsed": elapsed, "rows": rows},
                                                   indent=2, default=str))
    print("\n" + text)
    print(f"written: {out / 'gpu_check.md'} and {out / 'gpu_check.json'} ({elapsed:.0f} s)")
    failed = any(r["status"] in ("FAILED", "TIMED OUT") for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
