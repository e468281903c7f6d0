"""Sweeps with the serial executor: planning, keys and seeds, the index, skipping, failures,
a killed-then-resumed sweep (a real subprocess and SIGKILL), packing, devices, collect and plot."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from measureflow import ParameterError, cli
from measureflow.scenario import load_scenarios
from measureflow.sweep import (
    INDEX_NAME,
    SweepIndex,
    derive_seed,
    parse_grid,
    parse_seeds,
    plan_runs,
    run_key,
    run_sweep,
)

TINY = textwrap.dedent(
    '''
    """A tiny stochastic scenario for sweeps: 16 particles under Ornstein–Uhlenbeck noise."""
    import time
    import torch
    import measureflow
    from measureflow import Field, Gaussians, Simulation, scenario

    class Sleepy(Field):
        name = "sleepy"
        def __init__(self, pause):
            self.pause = pause
        def velocity(self, t, x, state):
            time.sleep(self.pause)
            return torch.zeros_like(x)

    @scenario
    def tiny(n: int = 16, sigma: float = 0.5, steps: int = 20, pause: float = 0.0, fail: bool = False,
             replicas: int = 1, seed: int = 0, out: str = "tiny.h5", picture: str = "tiny.png") -> Simulation:
        """Particles relaxing under OU noise."""
        if fail:
            raise measureflow.ParameterError("this grid point fails on purpose")
        field = measureflow.field("ornstein_uhlenbeck", theta=1.0, sigma=sigma)
        if pause:
            field = field + Sleepy(pause)
        start = Gaussians(torch.ones(replicas, 2, dtype=torch.float64),
                          torch.eye(2, dtype=torch.float64).expand(replicas, 2, 2))
        particles = start.sample(n, torch.Generator().manual_seed(seed))
        writer = measureflow.get_registry().writer("h5md", out, every=5)
        return Simulation(particles, field, "euler_maruyama", 0.0, 1.0, steps=steps, writers=[writer],
                          observers=["mean", "covariance"], observe_every=5, seed=seed)
    '''
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, single_thread):
    path = tmp_path_factory.mktemp("scenario") / "tiny.py"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def tiny_scenario(tiny):
    (scn,) = load_scenarios(tiny).values()
    return scn


def datasets(path):
    """Every dataset of a trajectory, the run parameters without the output path."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]
        f.visititems(visit)
    params = json.loads(out.pop("parameters/measureflow"))
    params["parameters"].pop("out")
    out["parameters"] = params
    return out


def assert_same_files(dir_a, dir_b):
    files = sorted(p.name for p in Path(dir_a).glob("*.h5"))
    assert files and files == sorted(p.name for p in Path(dir_b).glob("*.h5"))
    for name in files:
        a, b = datasets(Path(dir_a) / name), datasets(Path(dir_b) / name)
        assert a.keys() == b.keys(), name
        for key in a:
            if key == "parameters":
                assert a[key] == b[key], name
            else:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")


def index_of(directory):
    return SweepIndex.load(directory).runs


def test_grid_and_seed_labels_parse():
    assert parse_grid(["n=10, 100", "field=linear"]) == {"n": ["10", "100"], "field": ["linear"]}
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("0-2,7, 5") == [0, 1, 2, 5, 7]
    for bad, match in (("n", "key=v1,v2"), ("n=", "lists no values")):
        with pytest.raises(ParameterError, match=match):
            parse_grid([bad])
    with pytest.raises(ParameterError, match="given twice"):
        parse_grid(["n=1", "n=2"])
    with pytest.raises(ParameterError, match="runs backwards"):
        parse_seeds("5-2")
    with pytest.raises(ParameterError, match="neither a number nor a range"):
        parse_seeds("a-b")


def test_plan_keys_are_stable_and_seeds_do_not_depend_on_order(tiny_scenario, tmp_path):
    runs = plan_runs(tiny_scenario, {"sigma": ["0.5", "1"], "n": ["8", "16"]}, [0, 1, 2], tmp_path)
    assert len(runs) == 12 and len({r.key for r in runs}) == 12
    first = runs[0]
    assert first.parameters["sigma"] == 0.5 and first.parameters["n"] == 8 and first.label == 0
    assert first.parameters["picture"] == "" and first.parameters["out"] == str(tmp_path.absolute() / f"{first.key}.h5")
    # The key is a hash of canonical JSON: fixed across processes and versions, blind to outputs and key order.
    params = dict(first.parameters)
    assert run_key("tiny", params) == first.key
    assert run_key("tiny", dict(reversed(list(params.items())), out="elsewhere.h5", picture="x.png")) == first.key
    assert run_key("tiny", {"a": 1, "seed": 3}) == "0994bc39be1b02c7"
    assert derive_seed(0, "tiny", {"a": 1}, 0) == 3093498572
    # The same run gets the same seed and key whatever the grid order, the other runs or the labels around it.
    reordered = plan_runs(tiny_scenario, {"n": ["16", "8"], "sigma": ["1", "0.5"]}, [2, 0], tmp_path)
    seeds = {r.key: r.parameters["seed"] for r in runs}
    assert all(seeds[r.key] == r.parameters["seed"] for r in reordered)
    assert len(set(seeds.values())) == 12
    assert plan_runs(tiny_scenario, {}, [0], tmp_path, sweep_seed=1)[0].parameters["seed"] != \
        plan_runs(tiny_scenario, {}, [0], tmp_path)[0].parameters["seed"]


def test_unsweepable_scenarios_and_bad_options_are_refused(tiny, tiny_scenario, tmp_path):
    script = tmp_path / "plain.py"
    script.write_text("from measureflow import scenario\n@scenario\ndef plain(n: int = 3):\n    return None\n")
    (plain,) = load_scenarios(script).values()
    with pytest.raises(ParameterError, match=r"declares `out: str`.*and `seed: int`.*lacks out and seed"):
        plan_runs(plain, {}, [0], tmp_path)
    with pytest.raises(ParameterError, match="seeds come from --seeds"):
        plan_runs(tiny_scenario, {"seed": ["1"]}, [0], tmp_path)
    with pytest.raises(ParameterError, match="no parameter 'colour'"):
        plan_runs(tiny_scenario, {"colour": ["red"]}, [0], tmp_path)
    with pytest.raises(ParameterError, match="cannot read --set n='x' as int"):
        plan_runs(tiny_scenario, {"n": ["x"]}, [0], tmp_path)
    with pytest.raises(ParameterError, match="not a floating-point dtype"):
        run_sweep(script, out=tmp_path / "o", dtype="int8")
    with pytest.raises(ParameterError, match="executor 'serial' does not take the option"):
        run_sweep(tiny, out=tmp_path / "o", executor_options={"address": "auto"})
    assert not (tmp_path / "o").exists()


def test_index_records_runs_failures_and_reruns_skip_completed(tiny, tmp_path):
    out = tmp_path / "sweep"
    report = run_sweep(tiny, {"sigma": ["0.5", "1"], "fail": ["false", "true"]}, "0-1", out, progress=False)
    assert report.total == 8 and report.skipped == 0
    assert report.counts == {"completed": 4, "failed": 4} and not report.ok
    runs = index_of(out)
    assert len(runs) == 8
    for key, record in runs.items():
        assert record["file"] == f"{key}.h5"
        if record["parameters"]["fail"]:
            assert record["status"] == "failed" and "fails on purpose" in record["message"]
            assert "Traceback" in record["error"] and "ParameterError" in record["error"]
            assert not (out / record["file"]).exists()
        else:
            assert record["status"] == "completed" and record["wall_time"] > 0 and record["error"] is None
            assert set(record["observables"]) == {"mean[0]", "mean[1]", "covariance[0][0]", "covariance[0][1]",
                                                  "covariance[1][0]", "covariance[1][1]"}
            with h5py.File(out / record["file"], "r") as f:
                np.testing.assert_array_equal(f["observables/mean/value"][-1].mean(axis=0),
                                              [record["observables"]["mean[0]"], record["observables"]["mean[1]"]])
            assert not (out / (record["file"] + ".ckpt")).exists()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    again = run_sweep(tiny, {"sigma": ["0.5", "1"], "fail": ["false", "true"]}, "0-1", out, progress=False)
    assert again.skipped == 4 and again.counts == {"failed": 4}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")} == mtimes
    # A completed run the index missed (driver killed before its next index write) is found in its file.
    index = SweepIndex.load(out)
    lost = next(k for k, r in index.runs.items() if r["status"] == "completed")
    index.runs[lost].update(status="pending", observables={})
    index.save()
    third = run_sweep(tiny, {"sigma": ["0.5", "1"]}, "0-1", out, progress=False)
    assert third.skipped == 4 and third.ok
    assert index_of(out)[lost]["status"] == "completed" and index_of(out)[lost]["observables"]


def test_cli_sweep_collect_and_plot(tiny, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = cli.main(["sweep", str(tiny), "--grid", "sigma=0.25,0.5,1", "--seeds", "0-1", "--set", "steps=10",
                     "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and "6 runs: 6 completed (0 already completed)" in printed
    assert cli.main(["collect", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("shared: n=16, steps=10, pause=0.0, fail=False, replicas=1")
    assert table[1].split()[:4] == ["sigma", "label", "status", "wall_time"] and "covariance[1][1]" in table[1]
    assert len(table) == 2 + 6 + 1 and table[-1] == f"wrote {out / 'sweep.csv'}"
    rows = (out / "sweep.csv").read_text().splitlines()
    assert len(rows) == 7 and rows[0].startswith("sigma,label,status,wall_time,mean[0]")
    # Larger noise, larger stationary variance σ²/2θ: the table shows it.
    variance = {}
    for row in rows[1:]:
        cells = dict(zip(rows[0].split(","), row.split(",")))
        variance.setdefault(float(cells["sigma"]), []).append(float(cells["covariance[0][0]"]))
    assert np.mean(variance[0.25]) < np.mean(variance[0.5]) < np.mean(variance[1.0])
    png = tmp_path / "v.png"
    assert cli.main(["plot", str(out), "--x", "sigma", "--y", "covariance[0][0]", "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["plot", str(out), "--x", "sigma", "--y", "energy"]) == 2
    assert "'energy' is not a final observable" in capsys.readouterr().err
    assert cli.main(["plot", str(out)]) == 2
    assert "needs --x PARAMETER --y OBSERVABLE; parameters that vary: sigma" in capsys.readouterr().err
    assert cli.main(["collect", str(tmp_path)]) == 2
    assert "no sweep index" in capsys.readouterr().err
    failing = cli.main(["sweep", str(tiny), "--grid", "fail=true", "--out", str(tmp_path / "f"), "--no-progress"])
    assert failing == 3 and "1 failed" in capsys.readouterr().out


def test_packed_runs_equal_unpacked_runs(tiny, tmp_path):
    grid = {"replicas": ["1", "2"]}
    alone = run_sweep(tiny, grid, "0-2", tmp_path / "alone", progress=False)
    packed = run_sweep(tiny, grid, "0-2", tmp_path / "packed", pack=True, progress=False)
    assert alone.ok and packed.ok and packed.total == 6
    assert_same_files(tmp_path / "alone", tmp_path / "packed")
    a, b = index_of(tmp_path / "alone"), index_of(tmp_path / "packed")
    assert all(b[k]["pack"] == 3 and a[k]["pack"] == 1 for k in a)
    assert all(a[k]["observables"] == b[k]["observables"] for k in a)
    assert not list((tmp_path / "packed").glob("*.ckpt"))


def test_runs_that_cannot_be_packed_run_one_by_one(tiny, tiny_scenario, tmp_path, capfd):
    from measureflow.packing import why_not_stackable
    from measureflow.sweep import place

    runs = plan_runs(tiny_scenario, {}, [0, 1], tmp_path)
    sims = [place(tiny_scenario, run, torch.device("cpu"), None) for run in runs]
    assert why_not_stackable(sims) is None
    sims[1].field.sigma = 0.7
    assert "fields differ" in why_not_stackable(sims)
    sims[1].field.sigma = 0.5
    sims[1].observers[0].params["extra"] = 1
    assert "observers differ" in why_not_stackable(sims)
    # A pack whose build fails falls back to the runs alone, which record their own error.
    report = run_sweep(tiny, {"fail": ["true"]}, "0-1", tmp_path / "f", pack=True, progress=False)
    assert report.counts == {"failed": 2}
    assert "not packed (building them raised ParameterError" in capfd.readouterr().err


def test_device_and_dtype(tiny, tmp_path):
    from measureflow.sweep import resolve_device

    report = run_sweep(tiny, {}, "0", tmp_path / "f32", device="cpu", dtype="float32", progress=False)
    assert report.ok
    (record,) = index_of(tmp_path / "f32").values()
    assert record["device"] == "cpu"
    with h5py.File(tmp_path / "f32" / record["file"], "r") as f:
        assert f["particles/trajectory/position/value"].dtype == np.float32
    (default,) = plan_runs(load_scenarios(tiny)["tiny"], {}, [0], tmp_path)
    assert default.key != record["file"][:-3]  # the dtype is part of what a run computes
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ParameterError, match="0 CUDA device"):
            resolve_device("cuda:0")
    with pytest.raises(ParameterError, match="is not a device"):
        run_sweep(tiny, {}, "0", tmp_path / "x", device="gpu0")


def test_killed_sweep_resumes_to_the_same_files(tiny, tmp_path):
    grid = {"pause": ["0.04"]}
    reference = run_sweep(tiny, grid, "0-2", tmp_path / "reference", progress=False)
    assert reference.ok
    out = tmp_path / "killed"
    order = [r.key for r in plan_runs(load_scenarios(tiny)["tiny"], {"pause": ["0.04"]}, [0, 1, 2], out)]
    second = out / f"{order[1]}.h5.ckpt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "measureflow", "sweep", str(tiny), "--grid", "pause=0.04",
                             "--seeds", "0-2", "--out", str(out), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not second.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the second run never checkpointed"
        time.sleep(0.01)
    time.sleep(0.2)  # mid-run, past its first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert second.exists() and not (out / f"{order[2]}.h5").exists()
    again = run_sweep(tiny, grid, "0-2", out, progress=False)
    assert again.ok and again.skipped == 1 and again.counts == {"completed": 2}
    with h5py.File(out / f"{order[1]}.h5", "r") as f:
        assert list(f["measureflow/status"].attrs["resumed_from"]) and not second.exists()
    assert_same_files(tmp_path / "reference", out)
    assert (out / INDEX_NAME).exists() and not list(out.glob(f"{INDEX_NAME}.tmp-*"))


def test_sigterm_stops_a_packed_sweep_which_resumes_as_a_batch(tiny, tmp_path):
    grid = {"pause": ["0.04"]}
    reference = run_sweep(tiny, grid, "0-2", tmp_path / "reference", pack=True, progress=False)
    out = tmp_path / "stopped"

    def terminate_when_checkpointed():
        deadline = time.monotonic() + 30
        while not list(out.glob("pack-*.ckpt")) and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)  # the run's handler ends it cleanly after this step

    thread = threading.Thread(target=terminate_when_checkpointed)
    thread.start()
    stopped = run_sweep(tiny, grid, "0-2", out, pack=True, progress=False)
    thread.join()
    assert stopped.stopped and stopped.counts == {"terminated": 3} and "stopped early" in stopped.summary()
    assert {r["status"] for r in index_of(out).values()} == {"terminated"}
    (checkpoint,) = out.glob("pack-*.ckpt")
    again = run_sweep(tiny, grid, "0-2", out, pack=True, progress=False)
    assert reference.ok and again.ok and again.counts == {"completed": 3} and not checkpoint.exists()
    assert_same_files(tmp_path / "reference", out)


def test_the_ray_executor_without_ray_names_the_extra_to_install(monkeypatch):
    from measureflow import PluginError
    from measureflow.sweep import make_executor

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails, as where it is not installed
    with pytest.raises(PluginError, match=r'install it with pip install -e "\.\[ray\]"'):
        make_executor("ray", gpus_per_run=0.5)


def test_an_executor_defines_map_unordered_and_serial_reports_errors_per_job():
    from measureflow.sweep import Executor, SerialExecutor

    class Incomplete(Executor):
        name = "incomplete"

    with pytest.raises(TypeError, match="map_unordered"):
        Incomplete()
    results = list(SerialExecutor().map_unordered(lambda job: 6 // job, [3, 0, 2]))
    assert [job for job, _ in results] == [3, 0, 2] and results[0][1] == 2 and results[2][1] == 3
    assert isinstance(results[1][1], ZeroDivisionError)


def test_sweep_modules_import_one_way():
    # grid ← run ← pack ← driver (executors and collect beside them): run never reaches pack, no
    # module imports one that imports it back, and no private name crosses a module boundary.
    import ast

    import measureflow.sweep as package

    allowed = {"grid": set(), "run": {"grid"}, "pack": {"grid", "run"}, "executors": set(), "collect": {"grid"},
               "driver": {"grid", "run", "pack", "executors"}}
    folder = Path(package.__file__).parent
    assert {p.stem for p in folder.glob("*.py")} == {*allowed, "__init__"}
    for name, may in allowed.items():
        tree = ast.parse((folder / f"{name}.py").read_text())
        siblings, private = set(), []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    siblings |= {node.module} if node.module else {a.name for a in node.names}
                private += [a.name for a in node.names if a.name.startswith("_")]
        assert siblings <= may, f"{name}.py imports {sorted(siblings - may)}"
        assert not private, f"{name}.py imports private names {private}"



ROTATION = textwrap.dedent(
    '''
    """Gaussians under the rotation v(x) = Ax, A = [[0, −1], [1, 0]]: an odd seed starts thin along x₁."""
    import torch
    import measureflow
    from measureflow import Gaussians, Simulation, scenario

    @scenario
    def rotation(steps: int = 4, seed: int = 0, out: str = "rotation.h5") -> Simulation:
        """A rotation whose first Heun step takes a thin start out of the SPD cone."""
        s = 1e-3 if seed % 2 else 0.5
        start = Gaussians(torch.tensor([[1.0, 0.0]], dtype=torch.float64),
                          torch.diag(torch.tensor([s, 1.0], dtype=torch.float64))[None])
        field = measureflow.field("linear", A=[[0.0, -1.0], [1.0, 0.0]])
        writer = measureflow.get_registry().writer("h5md", out)
        return Simulation(start, field, "heun", 0.0, 1.0, steps=steps, writers=[writer], seed=seed)
    '''
)


def test_a_batch_whose_gaussian_step_was_split_runs_one_by_one(tmp_path, capfd):
    # Heun on Σ̇ = AΣ + ΣAᵀ from Σ₀ = diag(s, 1) with h = 1/4 gives Σ₁ = Σ₀ + hδJ − h²δK (δ = s − 1,
    # J = [[0, 1], [1, 0]], K = diag(1, −1)), whose determinant is < 0 for s = 10⁻³ (the step is
    # split) and > 0 for s = 1/2 (no split when alone). In a batch both share the split steps and the
    # s = 1/2 run's mean would differ from its own run's, so the batch must not stand for the runs.
    script = tmp_path / "rotation.py"
    script.write_text(ROTATION)
    runs = plan_runs(load_scenarios(script)["rotation"], {}, [0, 1, 2, 3], tmp_path)
    assert {r.parameters["seed"] % 2 for r in runs} == {0, 1}  # thin and thick starts share the grid point
    alone = run_sweep(script, {}, "0-3", tmp_path / "alone", progress=False)
    capfd.readouterr()
    packed = run_sweep(script, {}, "0-3", tmp_path / "packed", pack=True, progress=False)
    assert alone.ok and packed.ok
    assert "4 runs not packed (the integrator split steps for the whole batch)" in capfd.readouterr().err
    assert all(record["pack"] == 1 for record in index_of(tmp_path / "packed").values())
    assert_same_files(tmp_path / "alone", tmp_path / "packed")
    assert not list((tmp_path / "packed").glob("*.ckpt"))
