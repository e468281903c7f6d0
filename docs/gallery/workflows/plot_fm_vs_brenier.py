"""
Diagnostics: the flow-matching map is not the optimal-transport map
====================================================================

Between two Gaussians with the independent coupling, the flow-matching field (MATH §1.4) realises at
t = 1 the map T^FM = Σ₀^{1/2}C^{1/2}Σ₀^{-1/2}, C = Σ₀^{-1/2}Σ₁Σ₀^{-1/2}; the Brenier (optimal) map is
T^OT = Σ₀^{-1/2}(Σ₀^{1/2}Σ₁Σ₀^{1/2})^{1/2}Σ₀^{-1/2}. Both push Σ₀ to Σ₁; they agree only when the
covariances commute (MATH §1.5). This example integrates the flow-matching field on particles,
measures the transport cost of their paths with :mod:`measureflow.diagnostics`, and compares it with
the two closed forms.
"""

import os

import matplotlib.pyplot as plt
import torch

import measureflow
from measureflow import Simulation
from measureflow.couplings import brenier_map, transport_cost
from measureflow.diagnostics import fm_terminal_map, path_transport_cost
from measureflow.measures import Gaussian

FAST = os.environ.get("MEASUREFLOW_DOCS_FAST", "0") not in ("", "0")
N = 2000 if FAST else 20000

F64 = dict(dtype=torch.float64)
S0 = torch.diag(torch.tensor([2.0, 0.5], **F64))
S1 = torch.tensor([[1.0, 0.8], [0.8, 1.2]], **F64)

# %%
# The closed forms and MATH's reference numbers.

T_fm, T_ot = fm_terminal_map(S0, S1), brenier_map(S0, S1)
cost_fm, cost_ot = transport_cost(T_fm, S0).item(), transport_cost(T_ot, S0).item()
print("T^FM =\n", T_fm.numpy().round(5), "\nT^OT =\n", T_ot.numpy().round(5))
print(f"transport cost: flow matching {cost_fm:.6f}, optimal {cost_ot:.6f} (= W₂²)")
assert abs(cost_fm - 0.817144) < 5e-7 and abs(cost_ot - 0.651957) < 5e-7     # MATH quotes 6 decimals

# %%
# Particles from N(0, Σ₀) under the flow-matching field with endpoints N(0, Σ₀) → N(0, Σ₁). In the
# noising convention the data sit at t = 0, so the forward run carries Σ₀ to Σ₁.

zero = torch.zeros(2, **F64)
field = measureflow.field("flow_matching", data=Gaussian(zero, S0), noise=Gaussian(zero, S1))
x0 = Gaussian(zero, S0).particles(N, torch.Generator().manual_seed(0))
run = Simulation(x0, field, "rk4", t0=0.0, t1=1.0, steps=50, writers=["memory"]).run()
path = path_transport_cost(run.positions, run.times)
endpoint = path.endpoint.item()
print(f"particles: E|T(X) − X|² = {endpoint:.4f}, kinetic energy E∫|ẋ|²dt = {path.kinetic.item():.4f}, "
      f"straightness {path.straightness.item():.4f}")
# Linear field: each particle moves by exactly T^FM, so E|T(X) − X|² is the closed form evaluated on the
# sample, whose covariance is Σ₀ up to sampling error √(2/N) relative: allow four of those.
assert abs(endpoint / cost_fm - 1) < 4 * (2 / N) ** 0.5
# The paths are not straight (the field's A_t is not symmetric), so the kinetic energy exceeds the cost.
assert path.kinetic.item() > endpoint

# %%
# The picture: where a grid of points goes under each map.

g = torch.stack(torch.meshgrid(torch.linspace(-2, 2, 9, **F64), torch.linspace(-1, 1, 5, **F64), indexing="ij"), -1).reshape(-1, 2)
fig, ax = plt.subplots(figsize=(6, 4.5))
for T, colour, label in [(T_fm, "C0", f"flow matching (cost {cost_fm:.3f})"), (T_ot, "C3", f"Brenier (cost {cost_ot:.3f})")]:
    y = g @ T.T
    for a, b in zip(g, y):
        ax.plot([a[0], b[0]], [a[1], b[1]], color=colour, lw=0.8, alpha=0.7)
    ax.plot(y[:, 0], y[:, 1], ".", color=colour, label=label)
ax.plot(g[:, 0], g[:, 1], "k.", ms=3)
ax.set_aspect("equal")
ax.legend(fontsize=8)
ax.set_title("two maps from N(0, Σ₀) to N(0, Σ₁)")
plt.show()
