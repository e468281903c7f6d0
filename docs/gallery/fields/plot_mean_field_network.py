"""
A two-layer linear network: neurons as particles, the Riccati closure, least squares
====================================================================================

A neuron p = (u, v) ∈ R^d × R^{d'} contributes v⟨u, z⟩ to the network g(z) = M_VU z, M_VU = ∫ vuᵀ dα.
Gradient descent on the risk f(α) = (1/K)Σ_k|g(z_k) − y_k|² moves every neuron by ṗ = B(M)p with
B = −2[[0, S_zz M_UV − S_zy], [M_VU S_zz − S_yz, 0]] (MATH §11, [S] eq. 23), so the second moment
solves the Riccati equation Ṁ = BM + MBᵀ. The network converges to the least-squares fit
M_VU(∞) = S_yz S_zz⁻¹, and det M and tr M_UU − tr M_VV are conserved.
"""

import os

import matplotlib.pyplot as plt
import torch

import measureflow
from measureflow import Gaussians, Particles, Simulation

FAST = os.environ.get("MEASUREFLOW_DOCS_FAST", "0") not in ("", "0")
N = 200 if FAST else 2000
T1, STEPS = (6.0, 150) if FAST else (10.0, 1000)

F64 = dict(dtype=torch.float64)
g = torch.Generator().manual_seed(1)
z = torch.randn(40, 3, generator=g, **F64)                      # K = 40 inputs in d = 3
W = torch.randn(2, 3, generator=g, **F64)
y = z @ W.T + 0.3 * torch.randn(40, 2, generator=g, **F64)      # d' = 2 outputs
field = measureflow.field("mean_field_network", inputs=z, outputs=y)
neurons = Particles(0.5 * torch.randn(1, N, 5, generator=torch.Generator().manual_seed(0), **F64))

# %%
# Particles and the closure from their own moments (ṗ = B(M)p is linear in p given M, so the
# closure is exact for the empirical second moment).

run = Simulation(neurons, field, "rk4", 0.0, T1, steps=STEPS, observers=["energy"], observe_every=STEPS // 50).run()
closure = Simulation(Gaussians(neurons.mean(), neurons.covariance()), field, "rk4", 0.0, T1, steps=STEPS,
                     observers=["energy"], observe_every=STEPS // 50).run()

limit = field.least_squares()
M_particles = field.network_matrix(run.state)[0]
M_closure = field.network_matrix(closure.state)[0]
print(f"least squares S_yz S_zz⁻¹ =\n{limit.numpy()}")
print(f"|M_VU(particles) − M_VU(closure)| = {(M_particles - M_closure).abs().max().item():.2e}")
print(f"|M_VU(T) − least squares| = {(M_particles - limit).abs().max().item():.2e}")
det0, det1 = field.determinant(neurons)[0].item(), field.determinant(run.state)[0].item()
tr0, tr1 = field.trace_difference(neurons)[0].item(), field.trace_difference(run.state)[0].item()
print(f"det M: {det0:.6e} → {det1:.6e};  tr M_UU − tr M_VV: {tr0:.6f} → {tr1:.6f}")
# Same linear ODE from the same moments: they differ by RK4's discretisation of p vs of M, O(h⁴).
assert (M_particles - M_closure).abs().max().item() < 1e-6
# The distance to the fit decays exponentially (MATH §11: 5·10⁻¹⁴ at t = 20); at t = 6 or 10 it is small.
assert (M_particles - limit).abs().max().item() < 1e-2
# det M has degree d + d' = 5 in M: RK4 keeps it to O(h⁴) relative; the trace difference likewise.
assert abs(det1 / det0 - 1) < 1e-4 and abs(tr1 - tr0) < 1e-6

# %%
# The picture: the risk over time, particles and closure.

risk = run.observables["energy"]
risk_closure = closure.observables["energy"]
floor = ((z @ limit.T - y) ** 2).sum(dim=1).mean().item()
fig, ax = plt.subplots(figsize=(6.5, 3.8))
ax.semilogy(risk.times, risk.values[:, 0] - floor, "o", ms=3, label="particles")
ax.semilogy(risk_closure.times, risk_closure.values[:, 0] - floor, label="Riccati closure")
ax.set_xlabel("t")
ax.set_ylabel("risk − least-squares risk")
ax.legend(fontsize=8)
ax.set_title("mean-field training of a linear two-layer network")
plt.show()
