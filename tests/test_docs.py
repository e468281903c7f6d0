"""The documentation: its code examples run, and the site builds with warnings as errors.

* The README's Python blocks and the tutorials' run as written, in order, in one namespace per
  page, inside a temporary directory (they write ``runs/...``). A block preceded by a line
  ``<!-- not run by the tests: why -->`` (README) or ``% not run by the tests: why`` (MyST) is
  skipped: the comment says why (a sweep of 20 runs, a Ray cluster).
* Docstring examples (``>>>``) anywhere in ``measureflow`` and ``measureflow_plugins`` run as
  doctests.
* ``test_docs_build`` builds the site exactly as the README says (``python -m sphinx -W -b html``),
  with every gallery script executed at the tiny sizes of ``MEASUREFLOW_DOCS_FAST=1``: each script
  still asserts its numbers against MATH's closed forms, with tolerances that follow its sample size.
  It takes 2–3 minutes on two cores, so it is marked ``docs``: ``pytest -m docs`` runs it alone and
  ``pytest -m "not docs"`` leaves it out.
"""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SKIP_MARK = re.compile(r"^\s*(<!--|%)\s*not run by the tests", re.IGNORECASE)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, code) of every ```python fence in a Markdown file, minus the marked ones."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            j = start
            while lines[j].strip() != "```":
                j += 1
            skipped = i > 0 and SKIP_MARK.match(lines[i - 1])
            if not skipped:
                blocks.append((start + 1, "\n".join(lines[start:j])))
            i = j + 1
        else:
            i += 1
    return blocks


def run_page(path: Path, namespace: dict) -> int:
    blocks = python_blocks(path)
    for line, code in blocks:
        try:
            exec(compile(code, f"{path.relative_to(ROOT)}:{line}", "exec"), namespace)
        except Exception as error:  # name the block, keep the traceback
            raise AssertionError(f"{path.relative_to(ROOT)}, the python block at line {line} failed: {error!r}") from error
    return len(blocks)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_python_blocks_run(in_tmp):
    namespace = {"__name__": "readme"}
    assert run_page(ROOT / "README.md", namespace) >= 3
    # The quickstart's run wrote its file, and its numbers are the closed form's: the covariance the
    # run recorded from 1000 samples is within sampling error of the exact one (√(2/N) relative,
    # five of those), so the printed comparison means what the README says.
    assert (in_tmp / "runs" / "quick.h5").exists()
    result, field, start = namespace["result"], namespace["field"], namespace["start"]
    exact = field.solution(2.0, start).cov[0]
    recorded = result.state.covariance()[0]
    assert float((recorded - exact).abs().max() / exact.abs().max()) < 5 * (2 / 1000) ** 0.5


def test_tutorials_run_in_order(in_tmp):
    """first_simulation writes runs/quick.h5, which reading_files then reads."""
    tutorials = DOCS / "tutorials"
    for page in ["first_simulation.md", "reading_files.md", "writing_a_scenario.md", "third_party_field.md",
                 "likelihoods_events_gradients.md", "stochastic_sampling.md", "changing_mass.md"]:
        namespace = {"__name__": f"tutorial_{page[:-3]}"}
        assert run_page(tutorials / page, namespace) >= 1, page
    # writing_a_scenario defines a scenario: its parameters are what the page says.
    scenario = namespace_of(tutorials / "writing_a_scenario.md")["spin_down"]
    assert scenario.resolve({"n": "40"})["n"] == 40


def namespace_of(page: Path) -> dict:
    namespace = {"__name__": "page"}
    run_page(page, namespace)
    return namespace


def _modules():
    for package_name in ("measureflow", "measureflow_plugins"):
        package = importlib.import_module(package_name)
        yield package
        for info in pkgutil.walk_packages(package.__path__, package_name + "."):
            if info.name.endswith("__main__"):
                continue
            yield importlib.import_module(info.name)


def test_docstring_examples_run_as_doctests(in_tmp):
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    found = 0
    for module in _modules():
        for test in finder.find(module):
            if test.examples:
                found += len(test.examples)
                runner.run(test)
    # The triggers, the Gaussian measure and measureflow.field carry examples at least.
    assert found >= 10, f"only {found} docstring examples found"
    assert runner.failures == 0, f"{runner.failures} of {found} docstring examples failed (see the output above)"


def _sphinx_available() -> bool:
    try:
        for name in ("sphinx", "furo", "myst_parser", "sphinx_gallery", "numpydoc"):
            importlib.import_module(name)
    except ImportError:
        return False
    return True


@pytest.mark.docs
def test_docs_build(tmp_path):
    if not _sphinx_available():
        if os.environ.get("CI"):
            pytest.fail('the docs extra is not installed: pip install -e ".[docs]"')
        pytest.skip('the docs extra is not installed: pip install -e ".[docs]"')
    env = dict(os.environ, MEASUREFLOW_DOCS_FAST="1", MPLBACKEND="agg")
    out = tmp_path / "html"
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-E", "-b", "html",
               "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"the docs build failed:\n{done.stderr[-6000:]}\n{done.stdout[-2000:]}"
    # Every gallery script ran and produced its page with a figure.
    scripts = sorted(p.stem for p in (DOCS / "gallery").rglob("plot_*.py"))
    pages = {p.stem for p in (out / "auto_gallery").rglob("plot_*.html")}
    assert set(scripts) <= pages, f"gallery pages missing: {sorted(set(scripts) - pages)}"
    for script in scripts:
        html = next((out / "auto_gallery").rglob(f"{script}.html")).read_text(encoding="utf-8")
        assert "sphx-glr-single-img" in html or "sphx-glr-multi-img" in html or "<video" in html, \
            f"{script}: no figure on its page"
    # References to measureflow objects resolve: an unresolved one renders as a bare <code> that no
    # link encloses.
    unresolved = set()
    for page in out.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        for match in re.finditer(r'(.{2})<code class="xref py py-\w+ docutils literal notranslate"><span class="pre">'
                                 r'(measureflow[\w.]*)</span>', text):
            if match.group(1) != '">':
                unresolved.add((page.relative_to(out).as_posix(), match.group(2)))
    assert not unresolved, f"unresolved references to measureflow objects: {sorted(unresolved)[:20]}"
