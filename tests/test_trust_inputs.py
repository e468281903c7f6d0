"""Bad inputs end in one clear line, never a silent wrong result or a raw traceback (issue 12).

Each case is a reproduction from the issue: a non-finite input refused at construction, a run that
goes non-finite naming what did, and scenario / CLI parameters refused before any work with one
``measureflow: error:`` line and exit code 2. The CLI cases call ``measureflow.cli.main`` in
process (the code path of the ``measureflow`` command, without a Python start-up per case): an
exception other than a measureflow error would propagate and fail the test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import measureflow
from measureflow import Gaussians, Particles, Simulation
from measureflow.cli import main
from measureflow.errors import MeasureflowError, ParameterError, ShapeError, StateError, TrajectoryFileError
from measureflow.fields import Field
from measureflow.io.checkpoint import load_checkpoint, save_checkpoint
from measureflow.run import Observer

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "scenarios"
NAN, INF = math.nan, math.inf
F64 = torch.float64


def cloud(n=6, d=2, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


# -- 5. non-finite inputs are refused at construction ------------------------------------------------------

NON_FINITE = {
    "particle weight NaN": lambda: Particles(cloud(5), torch.tensor([0.2, 0.2, 0.2, 0.2, NAN], dtype=F64)),
    "particle weights all NaN": lambda: Particles(cloud(5), torch.full((5,), NAN, dtype=F64)),
    "particle position NaN": lambda: Particles(torch.tensor([[0.0, 1.0], [NAN, 2.0]], dtype=F64)),
    "particle position inf": lambda: Particles(torch.tensor([[0.0, INF]], dtype=F64)),
    "channel NaN": lambda: Particles(cloud(3)[None], channels={"log_density": torch.full((1, 3), NAN, dtype=F64)}),
    "Gaussian state mean NaN": lambda: Gaussians(torch.tensor([NAN, 0.0], dtype=F64), torch.eye(2, dtype=F64)),
    "Gaussian state cov inf": lambda: Gaussians(torch.zeros(2, dtype=F64), torch.tensor([[1.0, INF], [INF, 1.0]], dtype=F64)),
    "Gaussian measure mean NaN": lambda: measureflow.measures.Gaussian(torch.tensor([NAN, 0.0]), torch.eye(2)),
    "Empirical point NaN": lambda: measureflow.measures.Empirical(torch.tensor([[NAN, 0.0]])),
    "sliced_wasserstein target weights NaN": lambda: measureflow.field(
        "sliced_wasserstein", target=cloud(20), weights=torch.full((20,), NAN, dtype=F64)),
    "kl smoothed target samples NaN": lambda: measureflow.field(
        "kl", target=torch.tensor([[0.0, NAN], [1.0, 1.0]], dtype=F64), mode="smoothed", epsilon=0.1),
    "mmd target NaN": lambda: measureflow.field("mmd", target=torch.tensor([[NAN, 0.0]], dtype=F64)),
    "linear A NaN": lambda: measureflow.field("linear", A=torch.tensor([[NAN, 0.0], [0.0, -1.0]])),
    "OU center inf": lambda: measureflow.field("ornstein_uhlenbeck", center=torch.tensor([INF, 0.0])),
    "OU theta NaN": lambda: measureflow.field("ornstein_uhlenbeck", theta=NAN),
    "observer target NaN": lambda: Observer("w2", target=torch.tensor([[NAN, 0.0]], dtype=F64)),
    "simulation target NaN": lambda: Simulation(Particles(cloud()), measureflow.field("linear", A=-torch.eye(2)),
                                                "euler", steps=2, target=torch.full((3, 2), NAN, dtype=F64)),
}


@pytest.mark.parametrize("case", sorted(NON_FINITE))
def test_non_finite_inputs_are_refused_at_construction(case):
    with pytest.raises(MeasureflowError, match="finite") as caught:
        NON_FINITE[case]()
    assert "\n" not in str(caught.value)


def test_nan_weights_name_the_entry():
    # NaN passes both `w < 0` and `|Σw − 1| > tol` (comparisons with NaN are false): it is tested first.
    with pytest.raises(StateError, match=r"Particles.weights must be finite; entry \[0, 4\] of the weights is nan"):
        Particles(cloud(5), torch.tensor([0.2, 0.2, 0.2, 0.2, NAN], dtype=F64))


class PoisonAfterHalf(Field):
    """v = 0 before t = ½, NaN from then on: the field, not the step, is at fault."""

    name = "poison"

    def velocity(self, t, x, state):
        return torch.full_like(x, NAN) if t >= 0.5 else torch.zeros_like(x)

    def affine(self, t, state):
        b = torch.full_like(state.mean, NAN if t >= 0.5 else 0.0)
        return b, torch.zeros_like(state.cov)


class Stiff(Field):
    """v = −1000 x: explicit Euler with h = 0.5 multiplies x by −499 a step, finite velocities all along."""

    name = "stiff"

    def velocity(self, t, x, state):
        return -1000.0 * x


def test_a_non_finite_field_output_is_named_instead_of_blaming_the_step():
    start = Particles(torch.full((1, 3, 1), 2.0, dtype=F64))
    result = Simulation(start, PoisonAfterHalf(), "euler", 0.0, 1.0, steps=10, check_every=1, progress=False).run()
    status = result.status
    # The step leaving t = 0.5 is step 6; the state before it (step 5) is finite, the velocity there is not.
    assert status.code == "nonfinite" and status.step == 6
    assert "positions became non-finite" in status.message and "'poison' returned a non-finite velocity" in status.message
    assert "smaller step will not help" in status.message


def test_a_step_too_large_is_named_as_such():
    start = Particles(torch.full((1, 3, 1), 2.0, dtype=F64))
    # |x| grows by 499 a step: past 1.8e308 (float64's largest) after ⌈log(9e307)/log(499)⌉ = 115 steps.
    status = Simulation(start, Stiff(), "euler", 0.0, 100.0, steps=200, check_every=1, blowup=None,
                        progress=False).run().status
    assert status.code == "nonfinite" and status.step == 115
    assert "positions became non-finite" in status.message and "try more steps" in status.message


def test_a_late_detection_still_names_the_quantity():
    start = Particles(torch.full((1, 3, 1), 2.0, dtype=F64))
    status = Simulation(start, PoisonAfterHalf(), "euler", 0.0, 1.0, steps=10, progress=False).run().status
    assert status.code == "nonfinite" and status.step == 6
    assert "positions became non-finite" in status.message and "check_every=1" in status.message


@pytest.mark.parametrize("integrator", ["euler", "rk4"])
def test_a_gaussian_step_failure_names_the_field_output(integrator):
    start = Gaussians(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    status = Simulation(start, PoisonAfterHalf(), integrator, steps=10, progress=False).run().status
    assert status.code == "step_failure"
    assert "'poison' returned a non-finite affine closure" in status.message


# -- 6. API parameters: one line naming what is wrong ---------------------------------------------------------

def particles():
    return Particles(cloud(10))


API_CASES = {
    "field named without its parameter": (
        lambda: Simulation(particles(), "linear", "euler", steps=3), ParameterError, "field 'linear' needs the parameter 'A'"),
    "unknown field parameter": (
        lambda: measureflow.field("linear", B=1), ParameterError, "field 'linear' has no parameter 'B'"),
    "mmd without target": (lambda: measureflow.field("mmd"), ParameterError, "needs the parameter 'target'"),
    "steps=True": (lambda: Simulation(particles(), "ornstein_uhlenbeck", steps=True), MeasureflowError,
                   "steps must be a positive integer; received True"),
    "observe_every=0": (lambda: Simulation(particles(), "ornstein_uhlenbeck", steps=3, observers=["mean"],
                                           observe_every=0), ParameterError, "observe_every must be a positive integer"),
    "writer every=0": (lambda: measureflow.get_registry().writer("memory", every=0), ParameterError,
                       "trigger period"),
    "checkpoint_every=0": (lambda: Simulation(particles(), "ornstein_uhlenbeck", steps=3, checkpoint="c.ckpt",
                                              checkpoint_every=0), ParameterError, "checkpoint_every must be"),
    "checkpoint_every=True": (lambda: Simulation(particles(), "ornstein_uhlenbeck", steps=3, checkpoint="c.ckpt",
                                                 checkpoint_every=True), ParameterError, "checkpoint_every must be"),
    "OU center of the wrong dimension": (
        lambda: Simulation(particles(), measureflow.field("ornstein_uhlenbeck", center=torch.zeros(3)),
                           "euler_maruyama", steps=3), ShapeError, "d = 3 dimensions but the state has d = 2"),
    "linear A of the wrong dimension": (
        lambda: Simulation(particles(), measureflow.field("linear", A=-torch.eye(3)), "euler", steps=3),
        ShapeError, "d = 3 dimensions"),
    "OU theta negative": (lambda: measureflow.field("ornstein_uhlenbeck", theta=-1.0), ParameterError,
                          "theta must be positive"),
    "Periodic(0)": (lambda: measureflow.triggers.Periodic(0), ParameterError, "period must be an integer >= 1"),
    "plot replica out of range": (
        lambda: measureflow.plot.plot_run(Simulation(particles(), "ornstein_uhlenbeck", steps=2, progress=False).run(),
                                          replica=5), ParameterError, "replica 5 does not exist"),
}


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_api_parameters_are_refused_in_one_line(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build, error, text = API_CASES[case]
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)")) as caught:
        build()
    assert "\n" not in str(caught.value)


# -- 6. scenario parameters through the CLI: refused before any work ---------------------------------------------

def cli(capsys, *argv):
    """``measureflow ARGV`` in process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def run_fails(capsys, tmp_path, scenario, *sets, expect):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "folder.png").mkdir()
    args = ["run", SCENARIOS / f"{scenario}.py", "--no-progress", "--set", f"out={tmp_path / 'r.h5'}", "--set", "picture="]
    for item in sets:
        args += ["--set", item.format(tmp=tmp_path)]
    code, _, err = cli(capsys, *args)
    assert code == 2, err
    assert err.startswith("measureflow: error: ") and err.count("\n") == 1, err
    assert expect in err, err
    # Refused before any work: no trajectory file, no checkpoint.
    assert not (tmp_path / "r.h5").exists() and not (tmp_path / "r.h5.ckpt").exists()
    return err


SCENARIO_CASES = [
    ("relaxation", ("n=-5",), "n must be a positive integer; received -5"),
    ("relaxation", ("n=1000000000000",), "n = 1000000000000 × replicas needs at least"),
    ("relaxation", ("n=1e3",), "cannot read --set n='1e3' as int"),
    ("relaxation", ("every=0",), "every must be a positive integer; received 0"),
    ("sliced_wasserstein_flow", ("every=-2",), "every must be a positive integer; received -2"),
    ("relaxation", ("replicas=0",), "replicas must be a positive integer; received 0"),
    ("relaxation", ("t1=nan",), "t1 must be finite"),
    ("relaxation", ("steps=true",), "cannot read --set steps='true' as int"),
    ("relaxation", ("state=cloud",), "state must be one of particles, gaussians"),
    ("relaxation", ("field=mmd",), "field 'mmd' needs the parameter 'target'"),
    ("relaxation", ("picture={tmp}/a_file/x.png",), "a_file' is not a folder"),
    ("relaxation", ("picture={tmp}/folder.png",), "is a directory; give a file name"),
    ("relaxation", ("picture=x.txt",), "picture must end in .png, .pdf, .svg"),
    ("attention_blowup", ("n=1",), "n must be an integer ≥ 3; received 1"),
    ("mmd_kernels", ("threads=-3",), "threads must be a non-negative integer; received -3"),
    ("mmd_kernels", ("threads=100000",), "threads must be at most 1024"),
    ("mmd_kernels", ("bandwidth=inf",), "bandwidth must be positive and finite"),
    ("schedule_comparison", ("ratio=1e-300",), "ratio must be ≥ 0.0001"),
    ("three_diracs", ("sigma=1e308",), "sigma must be at most 1e+06"),
    ("learned_moons", ("depth=1000000",), "depth must be at most 64"),
]


@pytest.mark.parametrize("scenario, sets, expect", SCENARIO_CASES, ids=[f"{s}:{','.join(v)}" for s, v, _ in SCENARIO_CASES])
def test_scenario_parameters_are_refused_before_any_work(scenario, sets, expect, capsys, tmp_path):
    run_fails(capsys, tmp_path, scenario, *sets, expect=expect)


def test_a_picture_folder_is_made_before_the_run(capsys, tmp_path):
    # `picture=/nonexistent/x.png` used to fail after a completed run: its folder is now checked
    # (an existing ancestor that can be written) and made before the run, like the output file's.
    picture = tmp_path / "new" / "sub" / "x.png"
    code, _, err = cli(capsys, "run", SCENARIOS / "relaxation.py", "--no-progress", "--set", "n=10", "--set", "steps=2",
                       "--set", f"out={tmp_path / 'r.h5'}", "--set", f"picture={picture}")
    assert code == 0 and picture.stat().st_size > 0, err


def test_params_checks_the_set_values(capsys):
    code, out, err = cli(capsys, "run", SCENARIOS / "relaxation.py", "--set", "n=50", "--params")
    assert code == 0 and "n (int ≥ 1, fits in memory) = 50" in out
    code, out, err = cli(capsys, "run", SCENARIOS / "relaxation.py", "--set", "n=0", "--params")
    assert code == 2 and "n must be a positive integer; received 0" in err and not out


def test_scenario_api_refuses_a_bool_for_an_int(tmp_path):
    from measureflow.scenario import load_scenarios

    (scn,) = load_scenarios(SCENARIOS / "relaxation.py").values()
    with pytest.raises(ParameterError, match="n must be a whole number; received True"):
        scn.build({"n": True, "out": str(tmp_path / "r.h5")})


# -- 6. plot and info on bad requests and damaged contents -------------------------------------------------------

@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run.h5"
    weights = torch.full((1, 10), 0.1, dtype=F64)
    weights[0, 0], weights[0, 1] = 0.15, 0.05  # not uniform: the picture scales markers by weight
    sim = Simulation(Particles(cloud(10)[None], weights), "ornstein_uhlenbeck", "euler_maruyama", steps=4,
                     writers=[str(out)], observers=["mean"], observe_every=1, progress=False)
    assert sim.run().ok
    return out


def damaged_copy(run_file, tmp_path, edit):
    path = tmp_path / "damaged.h5"
    path.write_bytes(run_file.read_bytes())
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def test_plot_to_a_missing_folder_is_refused_before_drawing(run_file, capsys, tmp_path):
    missing = tmp_path / "nonexistent"
    code, _, err = cli(capsys, "plot", run_file, "-o", missing / "x.png")
    assert code == 2 and f"the folder '{missing}' does not exist" in err and err.count("\n") == 1
    assert not missing.exists()


def test_plot_to_a_directory_is_refused(run_file, capsys, tmp_path):
    code, _, err = cli(capsys, "plot", run_file, "-o", tmp_path)
    assert code == 2 and "is a directory" in err


def test_plot_of_a_missing_replica_is_one_line(run_file, capsys, tmp_path):
    code, _, err = cli(capsys, "plot", run_file, "-o", tmp_path / "x.png", "--replica", "5")
    assert code == 2 and "replica 5 does not exist; the trajectory has 1 replica(s)" in err and err.count("\n") == 1


def test_plot_of_garbage_weights_is_one_line(run_file, capsys, tmp_path):
    def poison(f):
        w = f["particles/trajectory/weight"]
        w[...] = np.full(w.shape, np.nan)

    code, _, err = cli(capsys, "plot", damaged_copy(run_file, tmp_path, poison), "-o", tmp_path / "x.png")
    assert code == 2 and "weights hold NaN" in err and err.count("\n") == 1


def test_plot_of_garbage_positions_draws_what_is_finite(run_file, capsys, tmp_path):
    def poison(f):
        value = f["particles/trajectory/position/value"]
        data = value[...]
        data[1, :3] = np.nan
        data[2, 0] = np.inf
        value[...] = data

    code, out, err = cli(capsys, "plot", damaged_copy(run_file, tmp_path, poison), "-o", tmp_path / "x.png")
    assert code == 0 and (tmp_path / "x.png").stat().st_size > 0, err


@pytest.mark.parametrize("text", ["[1, 2]", "\"a string\"", "3"])
def test_a_parameters_dataset_that_is_not_a_json_object_is_one_line(run_file, capsys, tmp_path, text):
    def replace(f):
        del f["parameters/measureflow"]
        f.create_dataset("parameters/measureflow", data=text, dtype=h5py.string_dtype("utf-8"))

    damaged = damaged_copy(run_file, tmp_path, replace)
    code, _, err = cli(capsys, "info", damaged)
    assert code == 2 and "/parameters/measureflow is not a JSON object" in err and err.count("\n") == 1


# -- 6. malformed checkpoint contents --------------------------------------------------------------------------

class StopAt:
    def __init__(self, step):
        self.step = step

    def __call__(self, step, time, state):
        return step >= self.step


def stopped_run(tmp_path):
    """A stochastic run stopped at step 2 of 6, its checkpoint saved (noise-generator state included)."""
    ckpt = tmp_path / "run.ckpt"
    sim = Simulation(Particles(cloud(8)), "ornstein_uhlenbeck", "euler_maruyama", steps=6, observers=["mean"],
                     observe_every=1, checkpoint=ckpt, checkpoint_every=1, callbacks=[StopAt(2)], progress=False)
    assert sim.run().status.code == "stopped" and ckpt.exists()
    return sim, ckpt


CORRUPTIONS = {
    "history not a dict": lambda p: p.__setitem__("history", [1, 2, 3]),
    "history entries malformed": lambda p: p.__setitem__("history", {"mean": [(1, "x")]}),
    "noise generator state garbage": lambda p: p["process"].__setitem__("noise", torch.zeros(3, dtype=torch.uint8)),
    "state tensors missing": lambda p: p["process"].__setitem__("tensors", {}),
    "integrator state wrong": lambda p: p["process"].__setitem__("integrator", "nonsense"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_malformed_checkpoint_contents_are_one_line(case, tmp_path):
    sim, ckpt = stopped_run(tmp_path)
    payload = load_checkpoint(ckpt)
    CORRUPTIONS[case](payload)
    save_checkpoint(ckpt, payload)
    with pytest.raises(TrajectoryFileError, match=r"checkpoint .*run\.ckpt is damaged") as caught:
        sim.with_checkpoint(ckpt, every=1, resume=True).with_options(callbacks=()).run()
    assert "\n" not in str(caught.value) and "delete it" in str(caught.value)


def test_a_good_checkpoint_still_resumes(tmp_path):
    sim, ckpt = stopped_run(tmp_path)
    resumed = sim.with_checkpoint(ckpt, every=1, resume=True).with_options(callbacks=()).run()
    assert resumed.ok and resumed.steps_done == 6
    assert json.dumps(resumed.status.code) == '"completed"'


@pytest.mark.parametrize("value", [math.nan, math.inf, torch.tensor([1.0, math.nan])])
def test_an_observer_refuses_non_finite_parameters_when_built(value):
    # Refused at construction (one line naming the observer and the parameter), not at step 0.
    with pytest.raises(ParameterError, match=r"observer 'mmd': bandwidth must be finite"):
        Observer("mmd", params={"bandwidth": value})
    assert Observer("mmd", params={"bandwidth": 0.5}).params == {"bandwidth": 0.5}
