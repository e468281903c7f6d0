"""
Flow matching: three Diracs generated from noise
================================================

The exact flow-matching field v_t(z) = E[a'_tX₀ + b'_tX₁ | Z_t = z], Z_t = a_tX₀ + b_tX₁, between
data X₀ = three weighted Diracs and noise X₁ ~ N(0, I) (MATH §1, noising convention: data at t = 0).
Generation integrates it backwards from t = 1 to t_min = 10⁻³ on a geometric grid. The exact law at
every t is Σ_j w_j N(a_t c_j, b_t² I): the particles land on the three atoms in the proportions
w = (0.5, 0.3, 0.2), at RMS distance b_{t_min}√2 from their atom (MATH §1.6).
"""

import math
import os

import matplotlib.pyplot as plt
import torch

import measureflow
from measureflow import Particles, Simulation
from measureflow.measures import GaussianMixture

FAST = os.environ.get("MEASUREFLOW_DOCS_FAST", "0") not in ("", "0")
N = 1000 if FAST else 5000
STEPS = 150 if FAST else 300

atoms = torch.tensor([[2.0, 0.0], [-1.0, math.sqrt(3)], [-1.0, -math.sqrt(3)]], dtype=torch.float64)
weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
field = measureflow.field("flow_matching", data=GaussianMixture.diracs(atoms, weights), schedule="linear", sigma=1.0)
noise = Particles(torch.randn(1, N, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64))

# %%
# The field's own grid: geometric toward the singular data end (Δt/t constant, MATH §1.3).

times = field.generation_times(STEPS)
result = Simulation(noise, field, "rk4", times=times,
                    writers=[measureflow.get_registry().writer("memory", every=STEPS // 6)]).run()
print(result.status)

# %%
# The numbers
# -----------

x = result.state.x[0]
t_min = times[-1]
a, b = 1 - t_min, t_min                       # linear schedule: a_t = 1 − t, b_t = t
distances = torch.cdist(x, a * atoms)
nearest = distances.argmin(dim=1)
fractions = torch.bincount(nearest, minlength=3).double() / N
rms = distances.min(dim=1).values.pow(2).mean().sqrt().item()
print(f"fractions {fractions.numpy()} vs weights {weights.numpy()}")
print(f"RMS distance to the nearest atom {rms:.4e} vs b√2 = {b * math.sqrt(2):.4e}")
# Cluster counts are multinomial: three binomial standard deviations √(w(1 − w)/N) each.
binomial = (weights * (1 - weights) / N).sqrt()
assert ((fractions - weights).abs() <= 3 * binomial).all()
# The squared distance is b²·χ²₂, whose mean over N points has relative spread 1/√N (MATH §1.6
# reports 0.4 % at N = 2·10⁴): the RMS is within 3/(2√N) of b√2, relatively.
assert abs(rms / (b * math.sqrt(2)) - 1) < 1.5 / N ** 0.5 + 1e-3

# %%
# The picture: the cloud from the noise end to the data end.

shown = [0, 2, 4, len(result.times) - 1]
fig, axes = plt.subplots(1, 4, figsize=(11, 3.2), sharex=True, sharey=True)
for ax, k in zip(axes, shown):
    frame = result.positions[k][0][:5000]
    ax.scatter(frame[:, 0], frame[:, 1], s=1, alpha=0.3)
    ax.set_title(f"t = {result.times[k]:.3g}", fontsize=10)
    ax.set_aspect("equal")
axes[0].set_xlim(-3.5, 3.5)
axes[0].set_ylim(-3.5, 3.5)
fig.suptitle("flow matching, linear schedule: generation runs from t = 1 back to t_min")
plt.show()
