"""
Affine fields: particles and a Gaussian relax together
=======================================================

The ``linear`` field v(x) = b + Ax moves a Gaussian to a Gaussian, so the same run can advance a
cloud of particles and the Gaussian state itself, and both can be compared with the closed form
m(t) = e^{tA}m₀ + ∫₀ᵗ e^{(t−s)A}b ds, Σ(t) = e^{tA}Σ₀e^{tAᵀ} (MATH §0, eq. 0.1).

A is non-normal and stable (eigenvalues −0.5 ± 1.5i), so the cloud spirals in while it is sheared.
"""

import os

import matplotlib.pyplot as plt
import torch

import measureflow
from measureflow import Gaussians, Simulation

FAST = os.environ.get("MEASUREFLOW_DOCS_FAST", "0") not in ("", "0")
N = 500 if FAST else 4000

A = torch.tensor([[-0.5, -2.0], [1.0, -0.5]], dtype=torch.float64)
b = torch.tensor([0.5, 0.0], dtype=torch.float64)
field = measureflow.field("linear", A=A, b=b)
start = Gaussians(torch.tensor([2.0, -1.0], dtype=torch.float64),
                  torch.tensor([[1.5, 0.6], [0.6, 0.8]], dtype=torch.float64))
particles = start.sample(N, torch.Generator().manual_seed(0))

# %%
# One simulation per state type; both record every 10th of 200 RK4 steps in memory.

gaussian_run = Simulation(start, field, "rk4", t0=0.0, t1=2.0, steps=200, writers=["memory"]).run()
particle_run = Simulation(particles, field, "rk4", t0=0.0, t1=2.0, steps=200,
                          writers=[measureflow.get_registry().writer("memory", every=10)],
                          observers=["mean", "covariance"], observe_every=10).run()
print(gaussian_run.status, particle_run.status)

# %%
# The numbers
# -----------
# The Gaussian state follows the closed form to RK4's error (h = 0.01, error ∝ h⁴). The particles'
# moments differ from the exact law by the sampling error of the first draw (∝ N^{-1/2}), but an
# affine flow moves a cloud's own mean and covariance exactly as it moves a Gaussian's: against the
# flow of the sample's moments the error is again RK4's.

exact = field.solution(2.0, start)
gauss_err = (gaussian_run.state.cov - exact.cov).abs().max().item()
own = field.solution(2.0, Gaussians(particles.mean(), particles.covariance()))
particle_err = (particle_run.state.covariance() - own.cov).abs().max().item()
sampling_err = (particle_run.state.covariance() - exact.cov).abs().max().item()
print(f"exact covariance at t = 2:\n{exact.cov[0].numpy()}")
print(f"Gaussian state  |Σ − Σ*|max = {gauss_err:.2e}")
print(f"particles vs their own moments' flow |Σ − Σ*|max = {particle_err:.2e}")
print(f"particles vs the exact law (sampling error, N = {N}) = {sampling_err:.2e}")
assert gauss_err < 1e-8 and particle_err < 1e-8
assert sampling_err < 10 * (2 / N) ** 0.5

# %%
# The picture: the cloud at five times, with the two-standard-deviation ellipse of the Gaussian
# state at the same times.

from measureflow.plot import plot_covariance_ellipses

frames = particle_run.positions
times = particle_run.times
fig, ax = plt.subplots(figsize=(6, 5))
for k, colour in zip([0, 5, 10, 15, 20], plt.cm.viridis([0.0, 0.25, 0.5, 0.75, 1.0])):
    x = frames[k][0]
    ax.scatter(x[:, 0], x[:, 1], s=2, color=colour, alpha=0.4, label=f"t = {times[k]:.1f}")
picked = [0, 50, 100, 150, 200]
plot_covariance_ellipses(gaussian_run.means[picked, 0], gaussian_run.covs[picked, 0], ax=ax,
                         times=gaussian_run.times[picked])
ax.set_aspect("equal")
ax.legend(loc="upper left", markerscale=4, fontsize=8)
ax.set_title("linear field: particles and the Gaussian state")
plt.show()
