"""Same seeds, same bits: this tree's runs against a baseline revision's, dataset by dataset.

Five small runs of ``scenarios/relaxation.py`` go through the command line (the one interface
both sides of a rewrite of the run engine share) once with this working tree's code and once with
the code of ``--baseline`` (default 293b048, the last commit before the rewrite), checked out as a
temporary ``git worktree`` and removed afterwards:

* ``particles-rk4``: 2 × 400 particles, a non-normal linear field, classical RK4, 100 steps;
* ``gaussians-default``: 3 Gaussian replicas, the same field, the default integrator (RK4);
* ``ou-euler-maruyama``: 2 × 400 particles, Ornstein–Uhlenbeck noise, Euler–Maruyama, seed 3;
* ``particles-dopri5``: 300 particles, adaptive Dormand–Prince between 10 output times;
* ``sweep-pack``: ``measureflow sweep --grid t1=1,2 --seeds 0-3 --pack`` on the OU field
  (8 runs advanced as 2 packed batches, each run written to its own file).

Each side runs in a fresh process whose ``PYTHONPATH`` holds symlinks into its tree, with one
intra-op thread, and each side's scenario file is its own tree's. For every pair of files
(for the sweep: runs matched by parameters and seed label through ``sweep.json``) every numeric
dataset under ``/particles``, ``/observables`` and ``/measureflow/gaussians`` (``value``, ``step``,
``time``, weights, replica ids) must have the same dtype, shape and bytes, and
``/measureflow/status`` the same status code, step and time. ``/parameters`` and ``/h5md``
(versions, descriptions) are not compared; neither is the status message (prose).

Usage::

    python benchmarks/same_bits.py                       # against 293b048; exit 1 on any difference
    python benchmarks/same_bits.py --baseline main --keep /tmp/samebits   # keep both sides' files

About 40 s on the 2-core development machine (ten command-line runs, mostly importing torch).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from trees import CURRENT_TREE, DEFAULT_BASELINE, baseline_tree, child_env, git, import_check, make_pyroot, sigterm_as_exit

#: Groups whose numeric datasets must agree bit for bit.
COMPARED_GROUPS = ("particles", "observables", "measureflow/gaussians")
#: Attributes of /measureflow/status that must agree (the message is prose and may be reworded).
STATUS_ATTRIBUTES = ("status", "step", "time")
SCENARIO = Path("scenarios") / "relaxation.py"


@dataclass(frozen=True)
class RunSpec:
    """One command-line run: ``measureflow run`` (one file) or ``measureflow sweep --pack`` (a directory)."""

    name: str
    command: str  # "run" or "sweep"
    settings: tuple[str, ...]  # KEY=VALUE for --set
    seed: int | None = None  # the run's seed (run) or the sweep seed (sweep)
    sweep_options: tuple[str, ...] = ()

    def argv(self, tree: Path, out: Path, seed_offset: int) -> list[str]:
        """The arguments after ``python -m measureflow``; ``out`` is a file (run) or directory (sweep)."""
        sets = [*self.settings, "picture="]
        if self.command == "run":
            sets += [f"seed={self.seed + seed_offset}", f"out={out}"]
            extra: list[str] = []
        else:
            extra = [*self.sweep_options, "--sweep-seed", str(self.seed + seed_offset), "--out", str(out)]
        argv = [self.command, str(tree / SCENARIO), "--no-progress", *extra]
        for setting in sets:
            argv += ["--set", setting]
        return argv


RUNS = (
    RunSpec("particles-rk4", "run",
            ("state=particles", "n=400", "replicas=2", "integrator=rk4", "steps=100", "every=10"), seed=7),
    RunSpec("gaussians-default", "run",
            ("state=gaussians", "replicas=3", "integrator=", "steps=100", "every=10"), seed=0),
    RunSpec("ou-euler-maruyama", "run",
            ("field=ornstein_uhlenbeck", "state=particles", "n=400", "replicas=2", "integrator=euler_maruyama",
             "steps=100", "every=10"), seed=3),
    RunSpec("particles-dopri5", "run",
            ("state=particles", "n=300", "integrator=dopri5", "steps=10", "every=1"), seed=5),
    RunSpec("sweep-pack", "sweep",
            ("field=ornstein_uhlenbeck", "state=particles", "n=200", "steps=50", "every=10"), seed=0,
            sweep_options=("--grid", "t1=1,2", "--seeds", "0-3", "--pack")),
)


@dataclass
class Comparison:
    """What one run's comparison found."""

    files: int = 0
    datasets: int = 0
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, other: "Comparison", prefix: str = "") -> None:
        self.files += other.files
        self.datasets += other.datasets
        self.differences += [prefix + d for d in other.differences]
        self.notes += [prefix + n for n in other.notes]


def numeric_datasets(f: h5py.File) -> dict[str, h5py.Dataset]:
    found: dict[str, h5py.Dataset] = {}
    for group in COMPARED_GROUPS:
        if group not in f:
            continue

        def collect(name, obj, group=group):
            if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "biufc":
                found[f"{group}/{name}"] = obj

        f[group].visititems(collect)
    return found


def describe_difference(name: str, a: np.ndarray, b: np.ndarray) -> str | None:
    """None when ``a`` and ``b`` are the same bits; else where and how they first differ."""
    if a.dtype != b.dtype:
        return f"{name}: dtype {a.dtype} (baseline) vs {b.dtype} (current)"
    if a.shape != b.shape:
        return f"{name}: shape {a.shape} (baseline) vs {b.shape} (current)"
    if a.tobytes() == b.tobytes():
        return None
    if a.dtype.kind not in "biufc":  # text: the status code
        return f"{name}: {a.tolist()!r} (baseline) vs {b.tolist()!r} (current)"
    # Bytes differ. array_equal(equal_nan) still says equal for 0.0 vs -0.0 or another NaN payload.
    equal_nan = a.dtype.kind in "fc"
    if np.array_equal(a, b, equal_nan=equal_nan):
        return f"{name}: equal values but different bits (signed zero or NaN payload)"
    same = (a == b) | (np.isnan(a) & np.isnan(b)) if equal_nan else (a == b)
    where = np.argwhere(~np.asarray(same))
    first = tuple(int(i) for i in where[0]) if a.ndim else ()
    delta = np.abs(a.astype(np.complex128 if a.dtype.kind == "c" else np.float64)
                   - b.astype(np.complex128 if b.dtype.kind == "c" else np.float64))
    return (f"{name}: {len(where)} of {a.size} elements differ, first at {first}: "
            f"{a[first].item()!r} vs {b[first].item()!r} (max |diff| {np.nanmax(delta):.3g})")


def compare_status(fa: h5py.File, fb: h5py.File) -> str | None:
    group = "measureflow/status"
    if group not in fa or group not in fb:
        missing = [side for side, f in (("baseline", fa), ("current", fb)) if group not in f]
        return f"/{group} missing in {' and '.join(missing)}"
    for key in STATUS_ATTRIBUTES:
        a, b = fa[group].attrs.get(key), fb[group].attrs.get(key)
        if a is None or b is None:
            return f"/{group} attribute {key!r}: {a!r} (baseline) vs {b!r} (current)"
        difference = describe_difference(f"/{group} attribute {key!r}", np.asarray(a), np.asarray(b))
        if difference:
            return difference
    return None


def compare_files(baseline: Path, current: Path) -> Comparison:
    """Every numeric dataset of the compared groups, and the status, of two H5MD files."""
    result = Comparison(files=1)
    with h5py.File(baseline, "r") as fa, h5py.File(current, "r") as fb:
        da, db = numeric_datasets(fa), numeric_datasets(fb)
        for name in sorted(set(da) - set(db)):
            result.differences.append(f"{name}: only in the baseline file")
        for name in sorted(set(db) - set(da)):
            result.differences.append(f"{name}: only in the current file")
        for name in sorted(set(da) & set(db)):
            result.datasets += 1
            difference = describe_difference(name, da[name][()], db[name][()])
            if difference:
                result.differences.append(difference)
        status = compare_status(fa, fb)
        if status:
            result.differences.append(status)
    if result.datasets == 0:
        result.differences.append("no numeric dataset found under " + ", ".join(f"/{g}" for g in COMPARED_GROUPS))
    return result


def sweep_runs(directory: Path) -> dict[tuple, dict]:
    """The runs of a sweep index keyed by (seed label, parameters except the output path and seed)."""
    index = json.loads((directory / "sweep.json").read_text())
    runs = {}
    for entry in index["runs"].values():
        identity = {k: v for k, v in entry["parameters"].items() if k not in ("out", "seed")}
        runs[(json.dumps(entry.get("label"), sort_keys=True), json.dumps(identity, sort_keys=True))] = entry
    return runs


def compare_sweeps(baseline: Path, current: Path) -> Comparison:
    result = Comparison()
    ra, rb = sweep_runs(baseline), sweep_runs(current)
    for key in sorted(set(ra) ^ set(rb)):
        side = "baseline" if key in ra else "current"
        result.differences.append(f"run label={key[0]} {key[1]} only in the {side} sweep")
    if not ra:
        result.differences.append("the baseline sweep recorded no run")
    for key in sorted(set(ra) & set(rb)):
        a, b = ra[key], rb[key]
        where = f"[label {key[0]}, {a['file']}] "
        if a["parameters"].get("seed") != b["parameters"].get("seed"):
            result.differences.append(f"{where}derived seed {a['parameters'].get('seed')} (baseline) vs "
                                      f"{b['parameters'].get('seed')} (current)")
        if a.get("status") != b.get("status"):
            result.differences.append(f"{where}index status {a.get('status')!r} vs {b.get('status')!r}")
        if a["file"] != b["file"]:
            result.notes.append(f"{where}file named {b['file']} in the current sweep")
        result.add(compare_files(baseline / a["file"], current / b["file"]), prefix=where)
    return result


def run_side(python: str, pyroot: Path, spec: RunSpec, tree: Path, out: Path, seed_offset: int, log: Path):
    """One side of one run; returns (exit code, seconds, argv)."""
    argv = [python, "-m", "measureflow", *spec.argv(tree, out, seed_offset)]
    start = time.perf_counter()
    with open(log, "w") as handle:
        # cwd = the output directory: whatever a scenario writes relative to it stays there.
        code = subprocess.run(argv, env=child_env(pyroot), cwd=log.parent, stdout=handle,
                              stderr=subprocess.STDOUT).returncode
    return code, time.perf_counter() - start, argv


def shell_line(argv: list[str], labels: dict[str, str]) -> str:
    """The command line after the interpreter, with long paths shortened to labels."""
    line = " ".join(["measureflow", *argv[3:]])
    for path, label in labels.items():
        line = line.replace(path, label)
    return line


def self_test(python: str, scratch: Path) -> int:
    """Check the comparison on doctored copies of one file written by this tree; 0 when it works.

    Each doctoring must be reported (one value moved by one ulp, 0.0 turned into -0.0, a dataset
    cast to float32, a dataset removed, another status code), and an edit of /parameters must not.
    """
    pyroot = make_pyroot(CURRENT_TREE, scratch / "current-pyroot")
    import_check(python, pyroot, CURRENT_TREE)
    spec = RUNS[0]
    original = scratch / "original.h5"
    code, _, _ = run_side(python, pyroot, spec, CURRENT_TREE, original, 0, scratch / "original.log")
    if code != 0:
        print((scratch / "original.log").read_text()[-2000:])
        return 1

    def one_ulp(f):
        value = f["particles/trajectory/position/value"]
        row = value[-1]
        row[0, 0] = np.nextafter(row[0, 0], np.inf)
        value[-1] = row

    def signed_zero(f):
        times = f["observables/mean/time"]
        assert times[0] == 0.0
        times[0] = -0.0

    def cast(f):
        data = f["observables/w2_to_exact/value"][()]
        del f["observables/w2_to_exact/value"]
        f["observables/w2_to_exact/value"] = data.astype(np.float32)

    def remove(f):
        del f["observables/covariance/step"]

    def status(f):
        f["measureflow/status"].attrs["status"] = np.bytes_(b"nonfinite")

    def parameters(f):
        del f["parameters/measureflow"]
        f["parameters/measureflow"] = np.bytes_(b"{}")

    cases = [("unchanged", None, False), ("one ulp in the last frame", one_ulp, True),
             ("0.0 -> -0.0 in a time", signed_zero, True), ("value cast to float32", cast, True),
             ("a step dataset removed", remove, True), ("status code changed", status, True),
             ("/parameters rewritten (ignored)", parameters, False)]
    failures = 0
    for name, doctor, should_differ in cases:
        copy = scratch / "doctored.h5"
        shutil.copyfile(original, copy)
        if doctor is not None:
            with h5py.File(copy, "r+") as f:
                doctor(f)
        found = compare_files(original, copy).differences
        ok = bool(found) == should_differ
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {found[0] if found else 'identical'}")
    print("self-test passed" if not failures else f"self-test: {failures} case(s) FAILED")
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE,
                        help=f"git revision to compare against (default {DEFAULT_BASELINE})")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep both sides' files and logs in this directory (default: a temporary one, removed)")
    parser.add_argument("--python", default=sys.executable, help="interpreter both sides run with")
    parser.add_argument("--runs", nargs="+", choices=[r.name for r in RUNS], default=[r.name for r in RUNS],
                        help="only these runs")
    # Shifts every seed of the current side by one: the comparison must then fail for every run
    # that draws random numbers. A check of this script, not of the code under test.
    parser.add_argument("--perturb-seed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--self-test", action="store_true",
                        help="check the comparison itself on doctored copies of one file (no baseline needed)")
    args = parser.parse_args(argv)

    if args.self_test:
        scratch = Path(tempfile.mkdtemp(prefix="same_bits-selftest-"))
        try:
            return self_test(args.python, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="same_bits-"))
    outputs = args.keep.resolve() if args.keep else scratch / "out"
    specs = [r for r in RUNS if r.name in args.runs]
    results: dict[str, Comparison] = {}
    lines: dict[str, str] = {}
    failed_runs: dict[str, str] = {}
    try:
        with sigterm_as_exit(), baseline_tree(args.baseline, scratch) as (btree, bpyroot, commit):
            sides = {
                "baseline": (btree, bpyroot),
                "current": (CURRENT_TREE, make_pyroot(CURRENT_TREE, scratch / "current-pyroot")),
            }
            for side, (tree, pyroot) in sides.items():
                import_check(args.python, pyroot, tree)
            edited = " with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
            print(f"baseline {args.baseline} = {commit[:10]}; current = {CURRENT_TREE} "
                  f"(HEAD {git('rev-parse', '--short=10', 'HEAD')}{edited})")
            print(f"outputs in {outputs}\n")
            for spec in specs:
                paths = {}
                for side, (tree, pyroot) in sides.items():
                    folder = outputs / side
                    folder.mkdir(parents=True, exist_ok=True)
                    target = folder / (spec.name if spec.command == "sweep" else f"{spec.name}.h5")
                    if target.is_dir():
                        shutil.rmtree(target)  # a sweep into an old directory would skip its runs
                    elif target.exists():
                        target.unlink()
                    offset = 1 if (args.perturb_seed and side == "current") else 0
                    code, seconds, full = run_side(args.python, pyroot, spec, tree, target, offset,
                                                   folder / f"{spec.name}.log")
                    lines.setdefault(spec.name, shell_line(full, {str(tree): "TREE", str(folder): "OUT"}))
                    print(f"  {spec.name:<20} {side:<8} exit {code}  {seconds:5.1f} s")
                    if code != 0:
                        tail = (folder / f"{spec.name}.log").read_text()[-2000:]
                        failed_runs[spec.name] = f"{side} exited with {code}"
                        print(f"    {side} failed; end of its log:\n{tail}")
                    paths[side] = target
                if spec.name in failed_runs:
                    continue
                if spec.command == "sweep":
                    results[spec.name] = compare_sweeps(paths["baseline"], paths["current"])
                else:
                    results[spec.name] = compare_files(paths["baseline"], paths["current"])
    finally:
        # With --keep the outputs live elsewhere; scratch then only held the pyroot and the worktree.
        shutil.rmtree(scratch, ignore_errors=True)

    print("\ncommands (TREE = the side's tree, OUT = its output folder; as the baseline side ran them):")
    for spec in specs:
        print(f"  {spec.name}: {lines.get(spec.name, '(not run)')}")
    print()
    print("| run | files | datasets compared | identical | first difference |")
    print("|---|---:|---:|---|---|")
    all_same = True
    for spec in specs:
        if spec.name in failed_runs:
            print(f"| {spec.name} | — | — | error | {failed_runs[spec.name]} |")
            all_same = False
            continue
        r = results[spec.name]
        same = not r.differences
        all_same &= same
        first = r.differences[0] if r.differences else ""
        more = f" (+{len(r.differences) - 1} more)" if len(r.differences) > 1 else ""
        print(f"| {spec.name} | {r.files} | {r.datasets} | {'yes' if same else 'NO'} | {first}{more} |")
    for spec in specs:
        for note in results.get(spec.name, Comparison()).notes:
            print(f"note ({spec.name}): {note}")
    print(f"\n{'all identical' if all_same else 'DIFFERENCES FOUND'}; {time.perf_counter() - started:.1f} s")
    if args.keep:
        print(f"files kept in {outputs}")
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
