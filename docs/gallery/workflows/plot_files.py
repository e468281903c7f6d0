"""
Write a run to an H5MD file and read it back
============================================

A simulation with an H5MD writer produces a file that any HDF5 reader opens:
``/particles/trajectory/position/{step,time,value}`` with values shaped [frames][R·N][d],
``/observables/<name>/{step,time,value}``, and the run's parameters as JSON. This example writes
the README's quickstart run, reads it three ways (``measureflow.open``, plain ``h5py``, the plot
package) and checks the file against the run and the closed form.
"""

import json
import os
import tempfile
from pathlib import Path

import h5py
import matplotlib.pyplot as plt
import numpy as np
import torch

import measureflow
from measureflow import Gaussians, Simulation

FAST = os.environ.get("MEASUREFLOW_DOCS_FAST", "0") not in ("", "0")
N = 300 if FAST else 2000
out = Path(tempfile.mkdtemp()) / "quick.h5"

field = measureflow.field("linear", A=torch.tensor([[-0.5, -2.0], [1.0, -0.5]], dtype=torch.float64))
start = Gaussians(torch.tensor([2.0, -1.0], dtype=torch.float64), torch.eye(2, dtype=torch.float64))
particles = start.sample(N, torch.Generator().manual_seed(0))
result = Simulation(particles, field, "rk4", t0=0.0, t1=2.0, steps=200,
                    writers=[measureflow.get_registry().writer("h5md", out, every=20)],
                    observers=["mean", "covariance"], observe_every=20).run()
print(result.status)

# %%
# With measureflow's reader: the same trajectory protocol as the Result (lazy frames).

with measureflow.open(out) as traj:
    print(traj.status, "| frames:", len(traj.times), "| observables:", sorted(traj.observables))
    last = np.asarray(traj.positions[-1])
    # frames are read lazily: copy what you need while the file is open
    final_covariance = np.asarray(traj.observables["covariance"].values[-1][0])
    print("covariance at t = 2 (file):", final_covariance.round(6).tolist())

# %%
# With h5py alone: the layout is plain HDF5 (H5MD 1.1).

with h5py.File(out, "r") as f:
    position = f["particles/trajectory/position"]
    print("value", position["value"].shape, "| time", position["time"][:3], "...")
    parameters = json.loads(f["parameters/measureflow"][()])
    print("recorded keys:", sorted(parameters)[:6], "...")
    final_by_h5py = position["value"][-1]

# %%
# The numbers: the file holds the run's final positions bit for bit, and the covariance the run
# recorded matches the closed form Σ(t) = e^{tA}Σ₀e^{tAᵀ} from the sample's own moments to RK4's error.

assert np.array_equal(final_by_h5py.reshape(1, N, 2), result.positions[-1])
assert np.array_equal(last, result.positions[-1])
own = field.solution(2.0, Gaussians(particles.mean(), particles.covariance()))
err = np.abs(final_covariance - own.cov[0].numpy()).max()
print(f"file covariance vs closed form from the sample's moments: {err:.2e}")
assert err < 1e-8           # RK4, h = 0.01 on a non-stiff linear ODE

# %%
# The plot package reads the same file (``measureflow plot FILE`` does this from the shell).

from measureflow.plot import plot_run

picture = out.with_suffix(".png")
plot_run(out, out=picture)            # a matplotlib Figure, saved as `measureflow plot` saves it
fig, ax = plt.subplots(figsize=(9, 6))
ax.imshow(plt.imread(picture))
ax.set_axis_off()
plt.show()
