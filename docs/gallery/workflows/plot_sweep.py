"""
A sweep: the sampling error of the relaxation scenario against N
================================================================

``measureflow sweep`` (and :func:`measureflow.sweep.run_sweep` from Python) runs a scenario over a
grid of parameters × seeds, one H5MD file per run, and keeps an index; ``measureflow collect``
tabulates it. Here the ``relaxation`` scenario runs particles under the affine field for several
particle counts N and seeds with the serial executor; its observable ``w2_to_exact`` is the squared
W₂ distance between the particles' Gaussian moments and the exact law. The distance itself scales
like N^{-1/2}: its square like 1/N. The same call with ``executor="ray"`` runs one Ray task per run
(see the sweep tutorial for a cluster and SLURM).
"""

import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from measureflow.sweep import run_sweep, sweep_table

FAST = os.environ.get("MEASUREFLOW_DOCS_FAST", "0") not in ("", "0")
SIZES = [100, 400, 1600] if FAST else [100, 400, 1600, 6400]
SEEDS = "0-3" if FAST else "0-5"

# sphinx-gallery runs this file from its own folder; the scenario lives at the repository's root.
here = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
scenario = next(p / "scenarios" / "relaxation.py" for p in [here, *here.parents] if (p / "scenarios" / "relaxation.py").exists())
out = Path(tempfile.mkdtemp()) / "relax"

report = run_sweep(scenario, grid={"n": SIZES}, seeds=SEEDS, out=out,
                   fixed={"steps": 40, "t1": 2.0, "every": 40, "picture": ""}, progress=False)
table = sweep_table(out)
print(table.format())

# %%
# The numbers: every run completed, and the mean squared distance falls like 1/N. A least-squares
# slope of log W₂² against log N of −1 ± 0.35 allows for the spread of few seeds.

assert all(row["status"] == "completed" for row in table.rows)
by_n = {n: np.mean([row["w2_to_exact"] for row in table.rows if row["n"] == n]) for n in SIZES}
slope = np.polyfit(np.log(SIZES), np.log([by_n[n] for n in SIZES]), 1)[0]
print("mean W₂² by N:", {n: f"{v:.2e}" for n, v in by_n.items()}, f"| slope {slope:.2f}")
assert abs(slope + 1) < 0.35

# %%
# The picture (``measureflow plot DIR --x n --y w2_to_exact`` draws the same from the shell).

fig, ax = plt.subplots(figsize=(6, 3.8))
for row in table.rows:
    ax.loglog(row["n"], row["w2_to_exact"], "o", color="C0", alpha=0.4, ms=4)
ax.loglog(SIZES, [by_n[n] for n in SIZES], "-", color="C0", label="mean over seeds")
ax.loglog(SIZES, [by_n[SIZES[0]] * SIZES[0] / n for n in SIZES], "k--", lw=1, label="∝ 1/N")
ax.set_xlabel("particles N")
ax.set_ylabel("W₂² to the exact law at t = 2")
ax.legend(fontsize=8)
plt.show()
