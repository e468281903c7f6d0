"""
Stochastic sampling, log-densities and events
=============================================

Three keywords of a run beyond positions. ``flow_sde`` turns a flow with a known score into a family
of SDEs dX = [u + ½g²∇log q] ds + g dW with the same marginals for every noise level g (MATH §15.2).
``log_density="exact"`` carries d log ρ/dt = −∇·v along each particle (MATH §15.1), which for a
linear field is compared with the exact Gaussian log-density. An ``Event`` locates a sign change of
a function of the state on the solver's dense output (MATH §15.4).
"""

import os

import matplotlib.pyplot as plt
import numpy as np
import torch

import measureflow
from measureflow import Event, Gaussians, Particles, Simulation
from measureflow.measures import Gaussian

FAST = os.environ.get("MEASUREFLOW_DOCS_FAST", "0") not in ("", "0")
N = 2000 if FAST else 20000
STEPS = 50 if FAST else 100
F64 = dict(dtype=torch.float64)

# %%
# One marginal, several noise levels
# ----------------------------------
# The exact flow-matching field from N(0, I) (t = 1) to the data law N(m, Σ) (t = 0), run forward in
# s = 1 − t with ``direction="reverse"``; g = 0 is the probability-flow ODE. SRA1 has weak order 2
# (bias ~1e-4 here, far below the sampling error), so the sample covariance must match Σ within three
# standard errors SE(Σ̂ᵢⱼ) = √((ΣᵢᵢΣⱼⱼ + Σᵢⱼ²)/N) for every g.

mean = torch.tensor([1.0, -0.5], **F64)
cov = torch.tensor([[2.0, 0.6], [0.6, 0.8]], **F64)
flow = measureflow.field("flow_matching", data=Gaussian(mean, cov), sigma=1.0)
noise = torch.randn(1, N, 2, generator=torch.Generator().manual_seed(0), **F64)
se_cov = torch.sqrt((cov.diag()[:, None] * cov.diag()[None, :] + cov**2) / N)
samples = {}
for g in (0.0, 0.5, 1.5):
    sde = measureflow.field("flow_sde", flow=flow, noise=g, direction="reverse")
    samples[g] = Simulation(Particles(noise), sde, "sra", 0.0, 1.0, steps=STEPS, seed=1).run().state
    z = ((samples[g].covariance()[0] - cov) / se_cov).abs().max().item()
    print(f"g = {g:<4} covariance {samples[g].covariance()[0].numpy().round(4).tolist()}, "
          f"largest deviation {z:.2f} standard errors (N = {N})")
    assert z < 3
print(f"exact    covariance {cov.numpy().tolist()}")

# %%
# The log-density channel
# -----------------------
# ẋ = Ax + b with tr A = −1 from N(m₀, Σ₀): the law stays Gaussian, with the mean and covariance of
# the exact flow map x ↦ e^{At}x + ∫₀ᵗe^{As}b ds. The channel starts at log p₀(x) and RK4 carries it
# with the positions; the positions' error O(h⁴) (h = 0.01) bounds the mismatch far below 1e-6.

A = torch.tensor([[-0.5, -2.0], [1.0, -0.5]], **F64)
b = torch.tensor([0.5, 0.0], **F64)
linear = measureflow.field("linear", A=A, b=b)
m0, cov0 = torch.tensor([2.0, -1.0], **F64), torch.tensor([[1.5, 0.6], [0.6, 0.8]], **F64)
law0 = Gaussian(m0, cov0)
x0 = law0.sample(200, torch.Generator().manual_seed(2), replicas=1)
T = 1.0
run = Simulation(Particles(x0, channels={"log_density": law0.log_density(x0)}), linear, "rk4",
                 t0=0.0, t1=T, steps=100, log_density="exact").run()
augmented = torch.zeros(3, 3, **F64)
augmented[:2, :2], augmented[:2, 2] = A * T, b * T
E = torch.linalg.matrix_exp(augmented)
law_t = Gaussian(E[:2, :2] @ m0 + E[:2, 2], E[:2, :2] @ cov0 @ E[:2, :2].T)
exact = law_t.log_density(run.state.x)
error = (run.state.log_density - exact).abs().max().item()
print(f"log-density at t = {T:g}: largest error against the exact Gaussian {error:.2e}")
assert error < 1e-6

# %%
# An event
# --------
# The mean's first component of the same linear flow from m₀ = (2, −1) crosses zero at
# t = 1.7069141 and 3.6622577 (MATH §15.4); RK4's dense output locates both.

events = Simulation(Gaussians(m0, cov0), linear, "rk4", t1=4.0, steps=200, writers=["memory"],
                    events=[Event(lambda t, s: s.mean[:, 0], name="m1_zero")]).run()
times = [e.t for e in events.events]
print(f"zero crossings of m₁: {[round(t, 7) for t in times]}   MATH [1.7069141, 3.6622577]")
# RK4 at h = 0.02 has a global error ~h⁴ ≈ 1e-7 and its Hermite interpolant one of the same order.
assert len(times) == 2 and abs(times[0] - 1.7069141) < 1e-6 and abs(times[1] - 3.6622577) < 1e-6

# %%
# The picture: the samples for the two noise levels (the ODE's are the same law), the channel
# against the exact log-density, and m₁(t) with the located crossings.

fig, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 4.2))
for j, g in enumerate((0.5, 1.5)):
    pts = samples[g].x[0, :2000].numpy()
    left.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.3, color=f"C{j}", label=f"g = {g}")
left.set_aspect("equal")
left.legend(markerscale=4, fontsize=8)
left.set_title("flow_sde samples, same marginal")
middle.plot(exact[0].numpy(), run.state.log_density[0].numpy(), "o", ms=3)
lims = [float(exact.min()), float(exact.max())]
middle.plot(lims, lims, color="grey", lw=0.8)
middle.set_xlabel("exact log p_t(x)")
middle.set_ylabel("channel")
middle.set_title("log-density channel, linear field")
right.plot(events.times, events.means[:, 0, 0], color="C0")
right.axhline(0.0, color="grey", lw=0.8)
right.plot(times, np.zeros(len(times)), "x", color="C3", ms=8, label="events")
right.set_xlabel("t")
right.set_title("m₁(t) and its zero crossings")
right.legend(fontsize=8)
plt.show()
