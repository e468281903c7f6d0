"""Parameter fuzz: every scenario's declared parameters get valid, boundary and invalid values
(negative, zero, NaN, inf, huge, wrong type, empty), through the ``--set`` text path and as Python
values, and the run is built at tiny sizes. A draw either builds or ends in one measureflow error
with a one-line message; any other exception (a raw traceback for the user) fails the test.

Draws are derandomised (the same examples on every machine) and bounded by ``max_examples``, so
the test takes a fixed amount of work: 800 draws, about 10–20 s on one core.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from measureflow.errors import MeasureflowError
from measureflow.scenario import load_scenarios, parse_assignments

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "scenarios"

#: Sizes small enough that every scenario builds in well under a second; only the parameters a
#: scenario declares are used.
TINY = dict(n=8, m=8, steps=2, every=1, frames=2, picture="", train_steps=2, n_atoms=16, hidden=4, depth=1,
            batch_size=8, diag_points=8, bridges=2, bridge_steps=2, exact_steps=2, n_data=16, iterations=2, batch=8,
            eval_batch=16, sinkhorn_n=8, sinkhorn_steps=2, closure_steps=2, figure_particles=8, points=8, count=4)

#: Where the run writes is the file-safety tests' subject; here it stays in a temporary folder.
NOT_FUZZED = ("out",)

SCENARIOS = [scn for path in sorted(SCENARIO_DIR.glob("*.py")) for scn in load_scenarios(path).values()]

# Huge values are absurd (beyond any memory) rather than merely large: a valid-but-expensive size
# would make the test slow without testing more.
HUGE_INTS = [10**12, 2**63, 10**30]
INT_VALUES = st.one_of(
    st.integers(-3, 40),
    st.sampled_from([0, 1, -1, -(2**63), *HUGE_INTS, 2.5, math.nan, math.inf, True, False, "", "abc", "1e3",
                     "3.0", " 4", "-0", None, [1]]),
)
FLOAT_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-2.0, 10.0),
    st.sampled_from([0.0, -0.0, 1e-300, 1e-12, 1e308, -1.0, math.nan, math.inf, -math.inf, True, "", "abc",
                     "nan", "-inf", "1e309", 3, None]),
)
STR_VALUES = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["", "abc", "0", "-1", "nan", "none", "/nonexistent/x.png", "x.txt", "a.png", "1,2,3",
                     "cuda", "cpu", 3, None]),
)
BOOL_VALUES = st.sampled_from([True, False, "true", "no", "maybe", "", 1, 0, 2, math.nan, None])


def _values_for(param):
    kind = param.type
    base = {int: INT_VALUES, float: FLOAT_VALUES, bool: BOOL_VALUES}.get(kind, STR_VALUES)
    return st.one_of(base, st.just(param.default))


@st.composite
def _draws(draw):
    scn = draw(st.sampled_from(SCENARIOS))
    names = [n for n in scn.parameters if n not in NOT_FUZZED]
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
    values = {n: draw(_values_for(scn.parameters[n])) for n in chosen}
    as_text = draw(st.booleans())
    return scn, values, as_text


def _overrides(scn, values: dict, as_text: bool, out: Path) -> dict:
    tiny = {k: v for k, v in TINY.items() if k in scn.parameters}
    tiny["out"] = str(out / f"{scn.name}.h5")
    # A path that a scenario writes beside (trained weights next to `weights_from`) stays in the
    # run folder: the drawn "/nonexistent/…" becomes a missing folder there.
    values = {k: (str(out / v.lstrip("/")) if isinstance(v, str) and v.startswith("/nonexistent") else v)
              for k, v in values.items()}
    if as_text:  # the `measureflow run --set key=value` path: every value arrives as text
        items = [f"{k}={'' if v is None else v}" for k, v in values.items()]
        return {**tiny, **parse_assignments(items, scn.name)}
    return {**tiny, **values}


DRAWS = {"count": 0, "built": 0, "refused": 0}


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=800, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(draw=_draws())
def test_every_scenario_parameter_value_builds_or_is_refused_in_one_line(draw, run_folder):
    scn, values, as_text = draw
    threads = torch.get_num_threads()  # scenarios set the thread count from `threads`
    here = os.getcwd()
    os.chdir(run_folder)  # relative paths drawn (`a.png`, `x.txt`) land in the run folder
    DRAWS["count"] += 1
    try:
        scn.build(_overrides(scn, values, as_text, run_folder))
        DRAWS["built"] += 1
    except MeasureflowError as exc:
        DRAWS["refused"] += 1
        message = str(exc)
        assert message.strip() and "\n" not in message, f"{scn.name} {values}: a message of several lines: {message!r}"
        assert "Traceback" not in message
    finally:
        torch.set_num_threads(threads)
        os.chdir(here)


def test_the_fuzz_tried_both_outcomes():
    # Runs after the fuzz in this module (file order): a fuzz that only ever refused (or only
    # built) would test nothing about the other side.
    print(f"parameter fuzz: {DRAWS['count']} draws, {DRAWS['built']} built, {DRAWS['refused']} refused in one line")
    if DRAWS["count"]:
        assert DRAWS["built"] > 0 and DRAWS["refused"] > 0, DRAWS
