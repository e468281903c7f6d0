"""Run another git revision's code beside this tree's: the shared machinery of the A/B tools.

A *tree* is a directory holding ``measureflow/`` and ``plugins/`` (the working tree these scripts
live in, or a temporary ``git worktree`` of a baseline revision). Python imports a tree's code
when ``PYTHONPATH`` names a folder holding two symlinks, ``measureflow -> TREE/measureflow`` and
``measureflow_plugins -> TREE/plugins``: a PYTHONPATH entry comes before the editable install's
finder, so whatever measureflow the interpreter has installed is shadowed. :func:`import_check`
confirms that for each tree before anything is measured, so a comparison can never silently run
the same code twice.

Used by ``same_bits.py`` and ``bench_loop.py``; not part of the package.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

#: The last commit before the run-engine rewrite (solvers as step functions, one run loop).
DEFAULT_BASELINE = "293b048"

#: This working tree: the directory above benchmarks/.
CURRENT_TREE = Path(__file__).resolve().parents[1]


def git(*args: str, cwd: Path = CURRENT_TREE) -> str:
    """Run git in ``cwd``; raise with git's own message when it fails."""
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {cwd}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def make_pyroot(tree: Path, where: Path) -> Path:
    """Create ``where`` holding the two import symlinks into ``tree``; return ``where``."""
    where.mkdir(parents=True, exist_ok=True)
    for name, target in (("measureflow", tree / "measureflow"), ("measureflow_plugins", tree / "plugins")):
        if not target.is_dir():
            raise FileNotFoundError(f"{target} does not exist: {tree} is not a measureflow tree")
        link = where / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target.resolve(), target_is_directory=True)
    return where


def child_env(pyroot: Path, threads: int = 1) -> dict[str, str]:
    """The environment of a child that imports the tree behind ``pyroot``, on ``threads`` threads (default 1).

    One intra-op thread on both sides: it makes timings comparable on a shared machine, and it
    keeps torch's reductions in one fixed summation order, so bit-for-bit comparisons do not
    depend on how many cores happened to be free. Timing scripts may ask for more (``--threads``).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = str(pyroot)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # leave no __pycache__ in a tree we do not own
    env.pop("MEASUREFLOW_STRICT_PLUGINS", None)
    return env


def import_check(python: str, pyroot: Path, tree: Path) -> dict[str, str]:
    """Import measureflow with ``pyroot`` and fail unless both packages come from ``tree``."""
    probe = ("import json, measureflow, measureflow_plugins; print(json.dumps({'measureflow': measureflow.__file__, "
             "'measureflow_plugins': measureflow_plugins.__file__}))")
    # cwd matters: ``python -c`` and ``python -m`` put it first on sys.path, before PYTHONPATH, so a
    # child started inside a tree imports that tree. The pyroot itself is a neutral directory.
    done = subprocess.run([python, "-c", probe], env=child_env(pyroot), cwd=pyroot, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"importing measureflow from {tree} failed:\n{done.stderr[-3000:]}")
    files = json.loads(done.stdout.strip().splitlines()[-1])
    for name, file in files.items():
        if not Path(file).resolve().is_relative_to(tree.resolve()):
            raise RuntimeError(f"{name} was imported from {file}, not from {tree}: PYTHONPATH={pyroot} did "
                               "not shadow the installed package, so the comparison would not compare two trees")
    return files


@contextlib.contextmanager
def baseline_tree(revision: str, workdir: Path):
    """A detached ``git worktree`` of ``revision`` under ``workdir`` with its pyroot; removed on exit.

    Yields ``(tree, pyroot, commit)``. The worktree is removed (``git worktree remove --force`` and
    ``git worktree prune``) however the block ends, SIGTERM included, so ``git worktree list``
    keeps no leftover entry.
    """
    try:
        commit = git("rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")
    except RuntimeError:
        raise SystemExit(f"baseline revision {revision!r} is not a commit of this repository "
                         f"({CURRENT_TREE}); fetch it or pass --baseline REV") from None
    tree = workdir / f"baseline-{commit[:10]}"
    git("worktree", "add", "--detach", str(tree), commit)
    try:
        yield tree, make_pyroot(tree, tree / ".pyroot"), commit
    finally:
        try:
            git("worktree", "remove", "--force", str(tree))
        finally:
            shutil.rmtree(tree, ignore_errors=True)
            git("worktree", "prune")


@contextlib.contextmanager
def sigterm_as_exit():
    """Turn SIGTERM into SystemExit for the block, so ``finally`` clauses (worktree removal) run."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
