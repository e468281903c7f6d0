"""
Attention: the Gaussian closure and its finite-time blow-up
===========================================================

Tokens move by softmax attention, Γ_θ[μ](x) = Σ_j w_j e^{⟨Qx, Kx_j⟩}Vx_j / Σ_j w_j e^{⟨Qx, Kx_j⟩}, the
mean-field limit of a transformer's layers (MATH §10). Tilting N(m, Σ) by e^{⟨KᵀQx, y⟩} gives
N(m + ΣKᵀQx, Σ), so the closure is b = V(m + ΣKᵀQm), A = VΣKᵀQ. With V = I and KᵀQ = cI a
centred Gaussian solves Σ(t) = Σ₀(I − 2ctΣ₀)⁻¹, which blows up at t* = 1/(2cλ_max(Σ₀)).
"""

import os

import matplotlib.pyplot as plt
import torch

import measureflow
from measureflow import Gaussians, Simulation

FAST = os.environ.get("MEASUREFLOW_DOCS_FAST", "0") not in ("", "0")
N = 800 if FAST else 3000

F64 = dict(dtype=torch.float64)
c = 0.5
field = measureflow.field("attention", Q=c * torch.eye(2, **F64), K=torch.eye(2, **F64), V=torch.eye(2, **F64))
cov0 = torch.tensor([[1.0, 0.3], [0.3, 0.5]], **F64)
start = Gaussians(torch.zeros(2, **F64), cov0)
t_star = 1 / (2 * c * torch.linalg.eigvalsh(cov0).max().item())
print(f"predicted blow-up time t* = {t_star:.4f}")

# %%
# The closure against the closed form at t*/2, and particles from the same Gaussian.

t1 = t_star / 2
closure = Simulation(start, field, "rk4", t0=0.0, t1=t1, steps=200, writers=["memory"]).run()
exact = cov0 @ torch.linalg.inv(torch.eye(2, **F64) - 2 * c * t1 * cov0)
closure_err = (closure.state.cov[0] - exact).abs().max().item()
print(f"closure |Σ − Σ*|max at t*/2 = {closure_err:.2e}")
assert closure_err < 1e-8       # RK4 at h = t*/400 on a smooth, non-stiff ODE

particles = start.sample(N, torch.Generator().manual_seed(0))
by_particles = Simulation(particles, field, "rk4", t0=0.0, t1=t1, steps=25,
                          writers=[measureflow.get_registry().writer("memory", every=5)]).run()
own = Gaussians(particles.mean(), particles.covariance())
own_exact = own.cov[0] @ torch.linalg.inv(torch.eye(2, **F64) - 2 * c * t1 * own.cov[0])
relative = ((by_particles.state.covariance()[0] - own_exact).norm() / own_exact.norm()).item()
print(f"particles vs the closed form from their own moments: relative error {relative:.2%}")
# The softmax weights e^{c⟨x, x_j⟩} are a Monte Carlo average whose error grows like e^{hᵀΣh}/N
# (MATH §10 reports 1.0 % at t*/2 for N = 10⁴): allow 10/√N.
assert relative < 10 / N ** 0.5

# %%
# The picture: the closure's largest variance against 1/(1 − t/t*)-type growth, to the blow-up.

near = Simulation(start, field, "rk4", t0=0.0, t1=0.95 * t_star, steps=400, writers=["memory"]).run()
lam = torch.linalg.eigvalsh(torch.as_tensor(near.covs[:, 0])).max(dim=-1).values
t = torch.as_tensor(near.times)
lam0 = torch.linalg.eigvalsh(cov0).max()
fig, ax = plt.subplots(figsize=(6.5, 3.8))
ax.semilogy(t, lam, label="closure: λ_max(Σ(t))")
ax.semilogy(t, lam0 / (1 - 2 * c * t * lam0), "k--", lw=1, label="λ₀/(1 − 2ctλ₀)")
ax.axvline(t_star, color="C3", lw=0.8, ls=":", label="t*")
ax.set_xlabel("t")
ax.legend(fontsize=8)
ax.set_title("attention with KᵀQ = cI: the covariance blows up at t*")
plt.show()
