"""Scenarios, the command line, and resuming killed runs (real subprocesses, real signals)."""

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

import measureflow
from measureflow import ParameterError
from measureflow.scenario import load_scenarios

ROOT = Path(__file__).resolve().parents[1]
RELAXATION = ROOT / "scenarios" / "relaxation.py"


def cli(*args, check=True, **kwargs):
    run = subprocess.run([sys.executable, "-m", "measureflow", *map(str, args)], capture_output=True, text=True, **kwargs)
    if check and run.returncode != 0:
        raise AssertionError(f"measureflow {' '.join(map(str, args))} failed ({run.returncode}):\n{run.stdout}\n{run.stderr}")
    return run


@pytest.mark.parametrize("state", ["particles", "gaussians"])
def test_relaxation_scenario_matches_the_closed_form(tmp_path, state):
    (relaxation,) = load_scenarios(RELAXATION).values()
    out = tmp_path / f"{state}.h5"
    result = relaxation.run({"state": state, "n": "4000", "out": str(out), "picture": "", "replicas": "2"}, progress=False)
    assert result.ok and out.exists() and not Path(str(out) + ".ckpt").exists()
    field = measureflow.field("linear", A=torch.tensor([[-0.5, -2.0], [1.0, -0.5]], dtype=torch.float64),
                              b=torch.tensor([0.5, 0.0], dtype=torch.float64))
    start = Gaussians = measureflow.Gaussians(torch.tensor([2.0, -1.0], dtype=torch.float64),
                                              torch.tensor([[1.5, 0.6], [0.6, 0.8]], dtype=torch.float64))
    exact = field.solution(2.0, start)
    if state == "gaussians":
        # RK4 with h = 0.01: global error ~ 1e-9.
        assert torch.allclose(result.state.cov, exact.cov, atol=1e-8)
        assert torch.allclose(result.state.mean, exact.mean, atol=1e-8)
        # the recorded event: m₁'s first zero at t* = 1.7069141 (MATH.md §15.4), in both replicas
        firsts = {}
        for event in result.events:
            firsts.setdefault(event.replica, event.t)
        assert sorted(firsts) == [0, 1] and all(abs(t - 1.7069141248811) < 1e-8 for t in firsts.values())
    else:
        # The flow map is exact on the sample; the residual is the sampling error of 4000 points
        # pushed through e^{2A} (contracting, |e^{2A}| ≈ e^{-1}): s.e. ≈ 0.03·e^{-1} per entry.
        assert torch.allclose(result.state.covariance(), exact.cov, atol=0.05)
        assert torch.allclose(result.state.mean(), exact.mean, atol=0.05)
    with measureflow.open(out) as traj:
        assert traj.kind == state and traj.replicas == 2
        assert list(traj.steps) == list(range(0, 201, 10))
        assert set(traj.observables) >= {"mean", "covariance", "w2_to_exact"}
        w2 = np.asarray(traj.observables["w2_to_exact"].values[:])
        if state == "gaussians":
            assert w2.max() < 1e-12  # the Gaussian run *is* the exact law (up to RK4 error squared)


def test_scenario_parameters_are_validated():
    (relaxation,) = load_scenarios(RELAXATION).values()
    with pytest.raises(ParameterError, match="no parameter 'nn'.*its parameters are: field, state, n"):
        relaxation.resolve({"nn": "3"})
    with pytest.raises(ParameterError, match="cannot read --set n='many' as int"):
        relaxation.resolve({"n": "many"})
    assert relaxation.resolve({"n": "12", "t1": "0.5"})["n"] == 12


def test_cli_run_info_plot_and_errors(tmp_path):
    out = tmp_path / "run.h5"
    cli("run", RELAXATION, "--set", "n=300", "--set", "steps=20", "--set", f"out={out}", "--set", f"picture={tmp_path / 'r.png'}", "--no-progress")
    assert (tmp_path / "r.png").stat().st_size > 1000
    info = cli("info", out).stdout
    assert "particles" in info and "linear" in info and "rk4" in info
    cli("plot", out, "-o", tmp_path / "p.png", "--animate", tmp_path / "p.gif")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "p.gif").read_bytes()[:6] in (b"GIF89a", b"GIF87a")
    bad = cli("run", RELAXATION, "--set", "colour=red", check=False)
    assert bad.returncode == 2 and "no parameter 'colour'" in bad.stderr
    missing = cli("info", tmp_path / "absent.h5", check=False)
    assert missing.returncode == 2 and "absent.h5" in missing.stderr
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.arange(3)
    not_ours = cli("info", foreign, check=False)
    assert not_ours.returncode == 2 and "foreign.h5" in not_ours.stderr
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    assert cli("plot", text, "-o", tmp_path / "x.png", check=False).returncode == 2
    params = cli("run", RELAXATION, "--params").stdout
    assert "n (int ≥ 1, fits in memory) = 2000" in params
    # With --set, --params shows the values the run would use, checked.
    assert "n (int ≥ 1, fits in memory) = 50" in cli("run", RELAXATION, "--set", "n=50", "--params").stdout


def test_scenario_file_runs_as_a_script(tmp_path):
    out = tmp_path / "s.h5"
    run = subprocess.run(
        [sys.executable, str(RELAXATION), "--set", "state=gaussians", "--set", f"out={out}", "--set", "picture=", "--no-progress"],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "covariance error" in run.stdout and out.exists()
    bad = subprocess.run([sys.executable, str(RELAXATION), "--set", "state=cloud", "--no-progress"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "state must be one of particles, gaussians" in bad.stderr
    assert "Traceback" not in bad.stderr


SLOW_SCENARIO = textwrap.dedent(
    '''
    """A stochastic run slow enough to be killed part-way (5 ms per step)."""
    import time
    import torch
    import measureflow
    from measureflow import Field, Gaussians, Simulation, scenario

    class Sleepy(Field):
        name = "sleepy"
        def velocity(self, t, x, state):
            time.sleep(0.005)
            return torch.zeros_like(x)

    @scenario
    def slow(steps: int = 300, out: str = "slow.h5", seed: int = 3) -> Simulation:
        field = measureflow.field("ornstein_uhlenbeck", theta=1.0, sigma=0.7) + Sleepy()
        start = Gaussians(torch.zeros(2, 2, dtype=torch.float64) + 1.0, torch.eye(2, dtype=torch.float64).expand(2, 2, 2))
        particles = start.sample(64, torch.Generator().manual_seed(0))
        writer = measureflow.get_registry().writer("h5md", out, every=7)
        return Simulation(particles, field, "euler_maruyama", 0.0, 1.0, steps=steps, writers=[writer],
                          observers=["mean"], observe_every=7, seed=seed)
    '''
)


def _frames(path):
    """Every dataset of the file except the parameters (which name the output path)."""
    out = {}
    # SWMR read: a killed writer leaves the file marked open for writing.
    with h5py.File(path, "r", swmr=True) as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and not name.startswith("parameters"):
                out[name] = obj[()]
        f.visititems(visit)
    return out


def _wait_for(path, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.01)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_killed_run_resumes_to_the_same_frames(tmp_path, how):
    script = tmp_path / "slow.py"
    script.write_text(SLOW_SCENARIO)
    reference = tmp_path / "reference.h5"
    cli("run", script, "--set", f"out={reference}", "--no-progress")

    target = tmp_path / "killed.h5"
    checkpoint = Path(str(target) + ".ckpt")
    proc = subprocess.Popen([sys.executable, "-m", "measureflow", "run", str(script), "--set", f"out={target}", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(checkpoint)
    time.sleep(0.3)  # let it get past the first checkpoint, mid-interval
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, "the run finished before it was interrupted; make it slower"
    assert checkpoint.exists()
    if how == "SIGTERM":
        assert "terminated" in err
        with measureflow.open(target) as traj:
            assert traj.status.code == "terminated"
    partial = _frames(target)["particles/trajectory/position/step"]
    assert 0 < len(partial) < len(_frames(reference)["particles/trajectory/position/step"])

    cli("run", script, "--set", f"out={target}", "--resume", "--no-progress")
    assert not checkpoint.exists()
    got, want = _frames(target), _frames(reference)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    again = cli("run", script, "--set", f"out={target}", "--resume", "--no-progress")
    assert "already completed" in again.stderr


def test_cli_run_compiles_a_scenario_on_request(tmp_path):
    """--compile runs the scenario's Simulation with compile=True (recorded in the file's parameters, so
    the run resumes compiled); a scenario whose steps cannot be compiled is refused in one line."""
    out = tmp_path / "c.h5"
    cli("run", RELAXATION, "--compile", "--set", "n=64", "--set", "steps=8", "--set", f"out={out}",
        "--set", "picture=", "--no-progress")
    with measureflow.open(out) as traj:
        assert traj.parameters["compile"] is True and len(traj) > 1
    noisy = cli("run", ROOT / "scenarios" / "birth_death_sampling.py", "--compile", "--set", "n=20",
                "--set", "steps=4", "--set", f"out={tmp_path / 'b.h5'}", check=False)
    assert noisy.returncode == 2
    lines = [line for line in noisy.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "compile" in lines[0]
