"""Devices: no host synchronisation inside a step, compiled reductions on CUDA, GPU placement of sweeps.

A step of a CUDA run must not wait for the device except where the run moves data to the host: a
writer writing, a checkpoint, the health read on those steps (measureflow/run/loop.py documents the
per-step order). One read-back per step drains the launch queue, so the next step's kernels start
only after the host has caught up, and on small problems the GPU idles most of the time.

* On any machine, :class:`HostReads` records what would synchronise on CUDA while a Simulation runs:
  the ATen operations that hand a device value to the host (``item``, ``float``/``int``/``bool`` of
  a tensor, ``nonzero``, ``equal``, boolean-mask indexing, the error checks behind ``linalg.inv``,
  ``cholesky`` and ``solve``, ``eigh``/``svd``), Python-level ``tolist``/``numpy``/``cpu``, and a
  field's constant converted again at every step (on CUDA, a blocking copy from the host). Outside
  the writer's methods and the health read, a run must record none. The CPU cannot see a
  device-to-host copy made by ``.to("cpu")``; the CUDA test below can.
* On a GPU (``@pytest.mark.gpu``; tests/conftest.py skips them where CUDA is absent) the same runs go
  under ``torch.cuda.set_sync_debug_mode("error")``, which raises at any synchronising CUDA call;
  compiled (Triton) reductions are compared with the eager path; a Ray sweep's runs are placed on
  GPUs through ``num_gpus``.

The runs: particles (R = 2, N = 256, d = 2) under the ``mmd`` field (Gaussian kernel, a kernel sum
over the particles themselves and over a sample of the target: the fused reduction on CUDA), by
``rk4``, and by ``euler_maruyama`` with Ornstein–Uhlenbeck noise added; 80 steps, so that the health
record folds a full 64-step block between two writes; an H5MD writer on steps 0, 10 and 80 only.
"""

from __future__ import annotations

import json
import logging
import textwrap
import traceback
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import measureflow
from measureflow import Particles, Simulation
from measureflow import reductions as red
from measureflow.measures import Gaussian
from measureflow.run import Callback, RunLoop
from measureflow.run.health import Health
from measureflow.simulation import SimulationProcess
from measureflow.triggers import On

CUDA = torch.device("cuda")
WRITE_STEPS = (0, 10, 80)  # 64 steps without a write in between: a full health block folds
STEPS = 80

# ATen operations that return a device value to the host (on CUDA each one waits for the device).
SYNCING_OPS = frozenset({
    "aten._local_scalar_dense",  # item(), float(t), int(t), bool(t)
    "aten.is_nonzero",
    "aten.equal",
    "aten.nonzero",
    "aten.masked_select",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.repeat_interleave",  # without output_size: the output length is read back
    "aten._linalg_check_errors",  # linalg.inv, cholesky, solve, … (their *_ex forms do not check)
    "aten._linalg_eigh",  # eigh, eigvalsh: documented to synchronise on CUDA
    "aten._linalg_svd",
    "aten.linalg_eig",
})
# Indexing ops that read a boolean mask's true count back (x[mask], x[mask] = v).
MASK_INDEXING = frozenset({"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"})
HOST_METHODS = ("tolist", "numpy", "cpu")


def _mask_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _caller() -> str:
    """The innermost frame of measureflow's own code (or the test's) that made the call."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if "measureflow" in frame.filename or "plugins" in frame.filename or frame.filename.endswith("test_device.py"):
            return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
    return "?"


class HostReads(TorchDispatchMode):
    """Records host reads (see the module docstring) made during a run's steps.

    ``step`` is the step being taken (set by the patched SimulationProcess.advance; None before the
    first step, whose set-up is not counted); inside :meth:`allowed` nothing is recorded, and the
    label of each allowed block is noted with its step in ``allowed_at``.

    Also recorded, from step 2 on: a conversion (``aten._to_copy``) of a tensor that no operation of
    the run made — a field's constant converted at every evaluation. On CUDA a constant kept on the
    host makes that a blocking host-to-device copy at every step (a first-use copy, on step 1, is
    what a per-device cache does once). The CPU sees it only when the conversion changes the dtype
    (a float64 constant, a float32 state), which the runs below arrange.
    """

    def __init__(self):
        super().__init__()
        self.step = None
        self.paused = 0
        self.reads: list[tuple[int, str, str]] = []
        self.allowed_at: list[tuple[str, int | None]] = []
        self.made: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id → tensor made by the run

    def note(self, what: str) -> None:
        if self.step is not None and not self.paused:
            self.reads.append((self.step, what, _caller()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in SYNCING_OPS or (name in MASK_INDEXING and _mask_index(args)):
            self.note(name)
        elif name == "aten._to_copy" and (self.step or 0) >= 2 and self.made.get(id(args[0])) is not args[0]:
            self.note("aten._to_copy of a constant")
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.made[id(t)] = t
        return out

    def allowed(self, function, label: str):
        def wrapped(*args, **kwargs):
            self.allowed_at.append((label, self.step))
            self.paused += 1
            try:
                return function(*args, **kwargs)
            finally:
                self.paused -= 1
        return wrapped


def watched_writer(path, allow):
    """An H5MD writer on WRITE_STEPS whose methods run inside ``allow(method, label)``."""
    writer = measureflow.get_registry().writer("h5md", str(path), every=On(list(WRITE_STEPS)))
    for method in ("open", "write_frame", "write_observables", "flush", "set_status", "close"):
        setattr(writer, method, allow(getattr(writer, method), method))
    return writer


def sync_case(integrator: str, device: torch.device, path, allow) -> Simulation:
    """The run of the module docstring on ``device``, writing to ``path``."""
    g = torch.Generator().manual_seed(3)
    start = Particles(torch.randn(2, 256, 2, generator=g).to(device))
    target = (torch.randn(300, 2, generator=g) * 0.7 + torch.tensor([1.5, 0.0])).to(device)
    field = measureflow.field("mmd", target=target, bandwidth=0.8)
    if integrator == "euler_maruyama":
        field = field + measureflow.field("ornstein_uhlenbeck", theta=0.5, sigma=0.3)
    return Simulation(start, field, integrator, 0.0, 0.7, steps=STEPS, writers=[watched_writer(path, allow)],
                      observers=["mean", "covariance"], observe_every=5, seed=1, progress=False)


def count_host_reads(monkeypatch, simulation: Simulation, reads: HostReads):
    """Run ``simulation`` under ``reads``, the health read allowed; returns its Result. Counted: from
    the first step to the end of the run loop (the Result is then built on the host, after the run)."""
    advance, loop = SimulationProcess.advance, RunLoop.run

    def stepping(process, state, step):
        reads.step = step + 1
        return advance(process, state, step)

    def looping(self):
        try:
            return loop(self)
        finally:
            reads.step = None

    monkeypatch.setattr(SimulationProcess, "advance", stepping)
    monkeypatch.setattr(RunLoop, "run", looping)
    monkeypatch.setattr(Health, "first_bad", reads.allowed(Health.first_bad, "health"))
    for method in HOST_METHODS:
        original = getattr(torch.Tensor, method)

        def host(self, *args, _original=original, _method=method, **kwargs):
            reads.note(f"Tensor.{_method}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, host)
    with reads:
        result = simulation.run()
    monkeypatch.undo()
    return result


# -- any machine: host reads counted -----------------------------------------------------------------------


@pytest.mark.parametrize("integrator", ["rk4", "euler_maruyama"])
def test_steps_read_nothing_back_except_where_the_writer_writes(integrator, tmp_path, monkeypatch, single_thread):
    # The eager reductions: dynamo does not trace under a dispatch mode (and a failed compile would turn
    # the fused path off for the whole process); the CUDA test below runs the compiled path.
    monkeypatch.setattr(red.config, "compile", "off")
    reads = HostReads()
    simulation = sync_case(integrator, torch.device("cpu"), tmp_path / "run.h5", reads.allowed)
    with pytest.MonkeyPatch.context() as mp:
        result = count_host_reads(mp, simulation, reads)
    assert result.status.ok, result.status
    assert reads.reads == [], "host reads inside steps that write nothing:\n" + "\n".join(map(str, reads.reads))
    # The health record is read on the writing steps only (and the last one, which writes too).
    assert sorted({s for label, s in reads.allowed_at if label == "health"}) == list(WRITE_STEPS[1:])
    # Frames: step 0 written before the first step, then the writing steps.
    assert [s for label, s in reads.allowed_at if label == "write_frame"] == [None, *WRITE_STEPS[1:]]


def peek(step, time, state):
    """A callback that reads a value back (what a user's callback may do, at its own cost)."""
    return bool(state.x.abs().max() > 1e6)


def test_host_read_counter_sees_a_read_in_a_step_that_writes_nothing(tmp_path, monkeypatch, single_thread):
    """The detector is live: a callback reading a value back on step 7 is reported, at step 7 only."""
    monkeypatch.setattr(red.config, "compile", "off")
    reads = HostReads()
    simulation = sync_case("rk4", torch.device("cpu"), tmp_path / "run.h5", reads.allowed)
    simulation = simulation.with_options(callbacks=[Callback(peek, every=On([7]))])
    with pytest.MonkeyPatch.context() as mp:
        result = count_host_reads(mp, simulation, reads)
    assert result.status.ok
    assert [(step, what) for step, what, _ in reads.reads] == [(7, "aten._local_scalar_dense")], reads.reads


def test_mmd_against_an_analytic_target_reads_nothing_back(monkeypatch, single_thread):
    """The closed-form Gaussian-kernel expectation (inverse and Cholesky factor of ℓ²I + Σ) stays on the device."""
    monkeypatch.setattr(red.config, "compile", "off")
    field = measureflow.field("mmd", target=Gaussian(torch.tensor([1.0, 0.0]), torch.eye(2) * 0.5), bandwidth=0.8)
    x = torch.randn(2, 64, 2, generator=torch.Generator().manual_seed(0))
    state = Particles(x)
    field.velocity(0.0, x, state)  # first use: the target's copies for this device and dtype
    reads = HostReads()
    reads.step = 1
    with reads:
        v = field.velocity(0.0, x, state)
    assert torch.isfinite(v).all()
    assert reads.reads == [], reads.reads


# -- GPU: synchronisation, compiled reductions, placement ----------------------------------------------------


def sync_debug_allowed(function, label, allowed_at):
    """``function`` with CUDA's sync debug mode off while it runs (a writer, the health read)."""
    def wrapped(*args, **kwargs):
        allowed_at.append(label)
        torch.cuda.set_sync_debug_mode(0)
        try:
            return function(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("error")
    return wrapped


def run_under_sync_debug(simulation: Simulation, monkeypatch, allowed_at: list):
    """``simulation.run()`` with CUDA's sync debug mode raising from the loop's start to its end (the
    Result is then built on the host: its observables become numpy arrays)."""
    monkeypatch.setattr(Health, "first_bad", sync_debug_allowed(Health.first_bad, "health", allowed_at))
    loop = RunLoop.run

    def looping(self):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return loop(self)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(RunLoop, "run", looping)
    try:
        return simulation.run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        monkeypatch.setattr(RunLoop, "run", loop)


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:Synchronization debug mode")
@pytest.mark.parametrize("integrator", ["rk4", "euler_maruyama"])
def test_cuda_steps_synchronise_only_where_the_writer_writes(integrator, tmp_path, monkeypatch):
    monkeypatch.setattr(red.config, "compile", "on")  # the fused (Triton) kernel sums, whatever the size
    monkeypatch.setattr(red.fused, "failure", None)
    allowed_at: list = []
    allow = lambda function, label: sync_debug_allowed(function, label, allowed_at)  # noqa: E731
    simulation = sync_case(integrator, CUDA, tmp_path / "warm.h5", allow)
    # One-off costs first: the compile of the fused kernels and the target's copy on the device.
    assert simulation.run().status.ok
    simulation = simulation.with_options(writers=[watched_writer(tmp_path / "run.h5", allow)])
    allowed_at.clear()
    result = run_under_sync_debug(simulation, monkeypatch, allowed_at)
    assert result.status.ok and result.state.x.device.type == "cuda"
    assert red.fused.failure is None, red.fused.failure
    assert allowed_at.count("health") == len(WRITE_STEPS) - 1  # read on steps 10 and 80 only
    # The detector is live: a sync on a step that writes nothing (step 7) fails the run.
    peeking = simulation.with_options(writers=[watched_writer(tmp_path / "peek.h5", allow)],
                                      callbacks=[Callback(peek, every=On([7]))])
    with pytest.raises(RuntimeError, match="synchroniz"):
        run_under_sync_debug(peeking, monkeypatch, [])


def _dense_kernel_sum(kernel, h, x, y, w):
    """float64 S and G by the plain N×M formula (G by autograd of ΣᵢSᵢ)."""
    x = x.double().requires_grad_(True)
    r2 = ((x[:, :, None, :] - y.double()[:, None, :, :]) ** 2).sum(-1)
    r = (r2 + 1e-300).sqrt()
    k = {"gaussian": torch.exp(-r2 / (2 * h * h)), "laplace": torch.exp(-r / h), "energy": -r,
         "imq": (1 + r2 / (h * h)).rsqrt()}[kernel]
    S = (k * w.double()[:, None, :]).sum(-1)
    (G,) = torch.autograd.grad(S.sum(), x)
    return S.detach(), G


def _close(a, b, rtol):
    err = float((a.double() - b.double()).abs().max() / b.double().abs().max())
    assert err <= rtol, f"max-norm relative difference {err:.2e} > {rtol:.0e}"


@pytest.fixture
def on_cuda_paths(monkeypatch):
    """A function running a reduction call on the fused (compiled) and on the eager CUDA path."""
    pytest.importorskip("triton", reason="the fused CUDA path is compiled by Triton")

    def both(call):
        out = {}
        for mode in ("on", "off"):
            monkeypatch.setattr(red, "config", red.ReductionConfig(compile=mode))
            monkeypatch.setattr(red.fused, "failure", None)
            out[mode] = call()
            torch.cuda.synchronize()
            assert red.fused.failure is None, f"the fused CUDA path failed: {red.fused.failure}"
        return out["on"], out["off"]

    return both


# float32 tolerance, relative to the max-norm: each entry sums M = 5000 float32 terms, in different
# orders on the two paths (Triton's tree reductions over 4096-column blocks; cuBLAS GEMMs or eager
# row sums), which differ by ≲ √M·ε₃₂ ≈ 4·10⁻⁶ typically and log₂(M)·ε₃₂·(sum of |terms|) ≈ 10⁻⁶ for
# tree sums; the exponential adds 2 ulp. 2·10⁻⁵ is the fused CPU path's tolerance (test_reductions).
RTOL32 = 2e-5
# The eager path's gradient for the smooth kernels is one GEMM, G = c·(xᵢΣⱼgᵢⱼ − Σⱼgᵢⱼyⱼ), which cancels:
# its float32 error is ≈ ε₃₂·|xᵢ − ȳ|·Σⱼgᵢⱼ against |Gᵢ|, measured 2.1·10⁻⁵ of max|G| on the CPU for these
# clouds (the fused path, summing gᵢⱼ(xᵢ − yⱼ) directly, 1.4·10⁻⁷). 10⁻⁴ leaves a 5× margin and stays
# 10× below what a dropped block or a wrong rescale does (≥ 10⁻³).
RTOL32_GEMM_GRADIENT = 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["gaussian", "laplace", "energy", "imq"])
def test_compiled_kernel_sums_on_cuda_equal_the_eager_path(kernel, on_cuda_paths):
    g = torch.Generator().manual_seed(5)
    R, N, M, d, h = 2, 3000, 5000, 2, 0.7  # two fused column blocks
    x = torch.randn(R, N, d, generator=g)
    y = torch.randn(R, M, d, generator=g) * 1.2 + 0.3
    w = torch.rand(R, M, generator=g, dtype=torch.float64)
    w = (w / w.sum(-1, keepdim=True)).float()
    xc, yc, wc = x.to(CUDA), y.to(CUDA), w.to(CUDA)
    fused, eager = on_cuda_paths(lambda: red.kernel_sum(xc, yc, weights=wc, kernel=kernel, bandwidth=h,
                                                         gradient="both"))
    S_ref, G_ref = _dense_kernel_sum(kernel, h, x[:, :256], y, w)
    for (S, G), grad_rtol in ((fused, RTOL32), (eager, RTOL32_GEMM_GRADIENT)):
        assert S.device.type == "cuda" and S.dtype == torch.float32
        _close(S[:, :256].cpu(), S_ref, RTOL32)
        _close(G[:, :256].cpu(), G_ref, grad_rtol)
    _close(fused[0], eager[0], RTOL32)
    _close(fused[1], eager[1], RTOL32_GEMM_GRADIENT)


@pytest.mark.gpu
@pytest.mark.parametrize("score, d", [("sqdist", 2), ("bilinear", 3)])
def test_compiled_softmax_averages_on_cuda_equal_the_eager_path(score, d, on_cuda_paths):
    g = torch.Generator().manual_seed(6)
    R, N, M, scale = 2, 3000, 5000, 0.8
    q = torch.randn(R, N, d, generator=g)
    k = torch.randn(R, M, d, generator=g) * 1.1
    v = torch.randn(R, M, 3, generator=g)
    lw = torch.randn(R, M, generator=g) * 0.5
    qc, kc, vc, lwc = q.to(CUDA), k.to(CUDA), v.to(CUDA), lw.to(CUDA)
    fused, eager = on_cuda_paths(lambda: red.softmax_average(qc, kc, vc, log_weights=lwc, score=score, scale=scale,
                                                             return_logsumexp=True))
    s = (q[:, :256, None, :].double() * k[:, None].double()).sum(-1) * scale if score == "bilinear" else \
        -scale * ((q[:, :256, None, :].double() - k[:, None].double()) ** 2).sum(-1)
    s = s + lw.double()[:, None, :]
    avg_ref = torch.softmax(s, -1) @ v.double()
    lse_ref = torch.logsumexp(s, -1)
    for avg, lse in (fused, eager):
        _close(avg[:, :256].cpu(), avg_ref, RTOL32)
        _close(lse[:, :256].cpu(), lse_ref, RTOL32)
    _close(fused[0], eager[0], RTOL32)
    _close(fused[1], eager[1], RTOL32)


# A scenario whose runs record where they ran: the GPUs Ray gave the task, what CUDA shows there, the
# device the sweep placed the run on, and when it ran (a short pause per step makes runs overlap).
WHERE = textwrap.dedent(
    '''
    """Particles under OU noise; each run writes where it ran beside its file."""
    import json, os, time
    import torch
    import measureflow
    from measureflow import Field, Particles, Simulation, scenario

    class Pause(Field):
        name = "pause"
        def __init__(self, seconds):
            self.seconds = seconds
        def velocity(self, t, x, state):
            time.sleep(self.seconds)
            return torch.zeros_like(x)

    @scenario
    def where(n: int = 64, steps: int = 10, pause: float = 0.3, seed: int = 0, out: str = "where.h5",
              device: str = "cpu") -> Simulation:
        """Records CUDA_VISIBLE_DEVICES, Ray's GPU ids, the GPU's UUID and the run's device."""
        import ray
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        record = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
                  "ray_gpu_ids": [str(i) for i in ray.get_gpu_ids()], "visible": visible,
                  "uuid": str(torch.cuda.get_device_properties(0).uuid) if visible else None,
                  "device": device, "start": time.time()}
        field = measureflow.field("ornstein_uhlenbeck", theta=1.0, sigma=0.5) + Pause(pause)
        start = Particles(torch.randn(1, n, 2, generator=torch.Generator().manual_seed(seed)).to(device))
        sim = Simulation(start, field, "euler_maruyama", 0.0, 1.0, steps=steps, writers=[out], seed=seed)
        with open(out + ".where.json", "w") as f:
            json.dump(record, f)
        return sim
    '''
)


@pytest.fixture
def gpu_ray(tmp_path):
    """A local Ray cluster with this machine's GPUs (a running one is joined), and the WHERE scenario."""
    ray = pytest.importorskip("ray")
    gpus = torch.cuda.device_count()
    if gpus < 1:
        pytest.skip("needs at least one GPU")
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=max(4, 2 * gpus), num_gpus=gpus, include_dashboard=False, logging_level=logging.WARNING)
        started = True
    if ray.cluster_resources().get("GPU", 0) < 1:
        if started:
            ray.shutdown()
        pytest.skip("the running Ray cluster has no GPU")
    scenario = tmp_path / "where.py"
    scenario.write_text(WHERE)
    yield ray, gpus, scenario
    if started:
        ray.shutdown()


def where_records(directory: Path) -> list[dict]:
    from measureflow.sweep import SweepIndex

    runs = SweepIndex.load(directory).runs
    assert runs and all(r["status"] == "completed" for r in runs.values()), runs
    out = []
    for record in runs.values():
        where = json.loads(Path(str(directory / record["file"]) + ".where.json").read_text())
        where["index_device"] = record["device"]
        where["end"] = (directory / record["file"]).stat().st_mtime  # the writer closes the file last
        out.append(where)
    return out


@pytest.mark.gpu
def test_ray_sweep_places_each_run_on_its_own_gpu(gpu_ray, tmp_path):
    from measureflow.sweep import run_sweep

    ray, gpus, scenario = gpu_ray
    # One GPU per run where there are several; with one GPU, two runs share it (0.5 each).
    per_run = 1.0 if gpus >= 2 else 0.5
    runs = 2 * max(gpus, 2)
    report = run_sweep(scenario, {}, f"0-{runs - 1}", tmp_path / "gpu", executor="ray",
                       executor_options={"gpus_per_run": per_run}, device="auto", progress=False)
    assert report.ok, report.summary()
    records = where_records(tmp_path / "gpu")
    assert len(records) == runs
    for r in records:
        # Ray sets CUDA_VISIBLE_DEVICES to the task's GPU: the run sees one device, as cuda:0.
        assert r["visible"] == 1 and r["CUDA_VISIBLE_DEVICES"] == ",".join(r["ray_gpu_ids"]), r
        assert len(r["ray_gpu_ids"]) == 1 and r["device"].startswith("cuda") and r["index_device"].startswith("cuda")
    if gpus >= 2:
        # Runs that overlapped in time held different GPUs; every GPU served some run.
        for a in records:
            for b in records:
                if a is not b and a["start"] < b["end"] and b["start"] < a["end"]:
                    assert a["uuid"] != b["uuid"], (a, b)
        assert len({r["uuid"] for r in records}) == gpus
    else:
        # Fractional placement: every run got the one GPU, two at a time (each run takes ≥ 3 s).
        assert len({r["uuid"] for r in records}) == 1 and len({r["CUDA_VISIBLE_DEVICES"] for r in records}) == 1
        assert any(a is not b and a["start"] < b["end"] and b["start"] < a["end"] for a in records for b in records), \
            "no two runs shared the GPU at the same time"


@pytest.mark.gpu
def test_ray_run_that_reserves_no_gpu_sees_none(gpu_ray, tmp_path):
    """The ray executor's contract (plugins/ray_executor.py): a task that reserves no GPU sees none,
    so ``--device auto`` runs it on the CPU."""
    from measureflow.sweep import run_sweep

    ray, gpus, scenario = gpu_ray
    report = run_sweep(scenario, {}, "0-1", tmp_path / "cpu", executor="ray", executor_options={"gpus_per_run": 0},
                       device="auto", progress=False)
    assert report.ok, report.summary()
    for r in where_records(tmp_path / "cpu"):
        assert r["visible"] == 0 and r["device"] == "cpu" and not r["CUDA_VISIBLE_DEVICES"], r
