"""Is a learned score a gradient? The study of Vuong et al. [V] (MATH.md §2).

Two parts:

1. **Flow level** ([V] Fig. 4; the Simulation this scenario returns). The OU probability flow of
   data N(0, Σ₀) (σ = 1) in OU time τ, with an error e added to the score term of its velocity:

   * ``perturbation="stein"``: e(x) = Σ_τΩx, Ω antisymmetric — in the Stein null space of N(0, Σ_τ)
     (div(ρe) = 0), so the marginals do not change;
   * ``perturbation="rotation"``: e(x) = Ωx — not in the null space: the marginals drift;
   * ``perturbation="none"``: the exact flow.

   The state is the Gaussian law itself, integrated by RK4 from τ_min to τ₁ on its closure; the
   report prints the relative covariance error against the exact Σ_τ = e^{−2τ}Σ₀ + (1 − e^{−2τ})I for
   all three (MATH-CHECKS: 4.8·10⁻⁸ against 116 % for its Σ₀, Ω).

2. **Score level** ([V] Figs. 1b–c, 2–3; in the report, ``train_steps`` > 0). A score network is
   trained by denoising score matching on Neal's funnel (v ~ N(0, s²), xᵢ | v ~ N(0, eᵛ), in
   ``dim`` dimensions) along the OU/variance-preserving path, then at each of ``n_times`` OU times the
   integral constraint ∮ s_θ·dx (normalised by the loop's length, on rotation-path and
   projection-path loops around noised data) and the differential constraint max |∂ᵢs_j − ∂ⱼsᵢ| are
   measured. An exact score gives zero for both (up to quadrature); a network does not.

    python scenarios/score_conservativity.py
    measureflow run scenarios/score_conservativity.py --set train_steps=0 --set perturbation=rotation
"""

from __future__ import annotations

import math
from typing import Annotated

import torch

import measureflow
from measureflow import Gaussians, Simulation, scenario
from measureflow.diagnostics import jacobian_asymmetry, loop_integral, projection_loops, rotation_loops
from measureflow.fields import Field
from measureflow.measures import Gaussian
from measureflow.parameters import OneOf, Picture, PositiveFloat, Range, Size, Steps
from measureflow.simulation import Observer

F64 = torch.float64
PERTURBATIONS = ("none", "stein", "rotation")
SIGMA0 = torch.tensor([[4.0, 0.0], [0.0, 0.25]], dtype=F64)


def exact_cov(tau: float, sigma0: torch.Tensor = SIGMA0) -> torch.Tensor:
    """Σ_τ = e^{−2τ}Σ₀ + (1 − e^{−2τ})I of the OU flow from N(0, Σ₀), σ = 1 (MATH.md §2)."""
    return math.exp(-2 * tau) * sigma0 - math.expm1(-2 * tau) * torch.eye(sigma0.shape[-1], dtype=sigma0.dtype)


class ScoreError(Field):
    """e(x) = Mx added to the OU velocity: M = Σ_τΩ (``stein``) or Ω (``rotation``); affine, so the
    Gaussian closure is (b, A) = (Mm, M)."""

    name = "score_error"

    def __init__(self, kind: str, omega: float, sigma0: torch.Tensor = SIGMA0):
        if kind not in PERTURBATIONS:
            raise measureflow.ParameterError(f"perturbation must be one of {PERTURBATIONS}; received {kind!r}")
        self.kind, self.sigma0 = kind, sigma0
        self.Omega = omega * torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=F64)

    def matrix(self, tau: float, like: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return torch.zeros(2, 2, dtype=like.dtype)
        if self.kind == "rotation":
            return self.Omega.to(like.dtype)
        return (exact_cov(tau, self.sigma0) @ self.Omega).to(like.dtype)

    def velocity(self, t, x, state):
        return x @ self.matrix(float(t), x).T

    def affine(self, t, state):
        M = self.matrix(float(t), state.mean)
        return state.mean @ M.T, M.expand(state.mean.shape[0], -1, -1)


def relative_cov_error(state, *, t=0.0, **_):
    exact = exact_cov(float(t)).to(state.cov)
    return ((state.cov - exact).flatten(1).norm(dim=-1) / exact.norm())


def flow_run(perturbation: str, omega: float, tau_min: float, tau1: float, steps: int, every: int = 1) -> Simulation:
    ou = measureflow.field("ou_bridge", data=Gaussian(torch.zeros(2, dtype=F64), SIGMA0), sigma=1.0,
                           tau_min=tau_min, tau_max=max(12.0, tau1))
    field = ou + ScoreError(perturbation, omega)
    start = Gaussians(torch.zeros(1, 2, dtype=F64), exact_cov(tau_min)[None])
    return Simulation(start, field, "rk4", tau_min, tau1, steps=steps, observe_every=every,
                      observers=[Observer(relative_cov_error, name="relative_cov_error")], progress=False)


# -- the funnel and the learned score ---------------------------------------------------------------------


def neal_funnel(n: int, dim: int, scale: float = 1.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Neal's funnel: v ~ N(0, scale²), xᵢ | v ~ N(0, eᵛ) for i = 2 … dim; returns (n, dim) = (v, x)."""
    v = scale * torch.randn(n, 1, generator=generator)
    x = torch.exp(0.5 * v) * torch.randn(n, dim - 1, generator=generator)
    return torch.cat([v, x], dim=-1)


def train_score(dim: int, steps: int, seed: int):
    from measureflow.training import train_velocity

    data = neal_funnel(20_000, dim, generator=torch.Generator().manual_seed(seed))
    noise = Gaussian(torch.zeros(dim), torch.eye(dim))
    result = train_velocity(data, noise, "vp", prediction="score", steps=steps, batch_size=512, lr=3e-3, seed=seed,
                            t_range=(0.01, 3.0), model={"hidden": 128, "depth": 3}, progress=False,
                            lr_scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=steps))
    return measureflow.field("learned", model=result, time_range=(0.01, 3.0)), data


def constraint_study(score, data: torch.Tensor, taus, loops: int, seed: int) -> dict:
    """Per OU time τ: mean normalised |∮ s·dx| / ∮|dx| on rotation and projection loops around noised
    data, and mean max |J − Jᵀ| of s at noised data (MATH.md §2, [V] Figs. 2–3)."""
    g = torch.Generator().manual_seed(seed)
    x0 = data[torch.randint(data.shape[0], (loops,), generator=g)]
    out = {"tau": [], "rotation": [], "projection": [], "asymmetry": []}
    for tau in taus:
        def s(y, tau=tau):
            return score.marginal_score(tau, y)

        row = {}
        for kind, build in (("rotation", rotation_loops), ("projection", projection_loops)):
            pts = build(x0, tau, count=1, generator=g)[:, 0]  # (loops, K, d)
            with torch.no_grad():
                circ = loop_integral(s, pts).circulation.abs()
            length = (torch.roll(pts, -1, dims=-2) - pts).norm(dim=-1).sum(-1)
            row[kind] = float((circ / length).mean())
        noised = math.exp(-tau) * x0 + math.sqrt(-math.expm1(-2 * tau)) * torch.randn(x0.shape, generator=g)
        row["asymmetry"] = float(jacobian_asymmetry(s, noised, method="autograd").mean())
        out["tau"].append(float(tau))
        for key, value in row.items():
            out[key].append(value)
    return out


# -- the scenario ---------------------------------------------------------------------------------------------


@scenario
def score_conservativity(
    perturbation: Annotated[str, OneOf(*PERTURBATIONS)] = "stein",
    omega: float = 0.7,
    tau_min: PositiveFloat = 0.01,
    tau1: PositiveFloat = 1.0,
    steps: Steps = 100,
    dim: Annotated[int, Range(1, 1024)] = 4,
    train_steps: Annotated[int, Size(minimum=0)] = 2000,
    n_times: int = 8,
    loops: int = 16,
    seed: int = 0,
    picture: Picture = "runs/score_conservativity.png",
) -> Simulation:
    """OU flow with a score error in or out of the Stein null space; constraint violations of a learned score."""
    return flow_run(perturbation, omega, tau_min, tau1, steps)


@score_conservativity.report
def report(result, params):
    errors = {}
    for kind in PERTURBATIONS:
        run = result if kind == params["perturbation"] else flow_run(
            kind, params["omega"], params["tau_min"], params["tau1"], params["steps"]).run()
        errors[kind] = run
        final = float(run.observables["relative_cov_error"].values[-1].max())
        print(f"OU flow + {kind:8s} score error: relative covariance error at τ = {params['tau1']:g}: {final:.3e}")
    study = None
    if params["train_steps"] > 0:
        score, data = train_score(params["dim"], params["train_steps"], params["seed"])
        taus = torch.logspace(math.log10(0.02), math.log10(2.0), params["n_times"]).tolist()
        study = constraint_study(score, data, taus, params["loops"], params["seed"])
        for k, tau in enumerate(study["tau"]):
            print(f"k = {k}  τ = {tau:.3f}: |∮s·dx|/∮|dx| rotation {study['rotation'][k]:.3e}, projection "
                  f"{study['projection'][k]:.3e}; max|J − Jᵀ| {study['asymmetry'][k]:.3e}")
    if params["picture"]:
        draw(errors, study, params["picture"])
        print(f"wrote {params['picture']}")
    return {"errors": {k: float(v.observables["relative_cov_error"].values[-1].max()) for k, v in errors.items()},
            "study": study}


def draw(errors, study, path):
    from matplotlib.figure import Figure

    panels = 3 if study is not None else 1
    fig = Figure(figsize=(4.2 * panels, 3.6))
    ax = fig.add_subplot(1, panels, 1)
    for kind, run in errors.items():
        series = run.observables["relative_cov_error"]
        ax.semilogy(series.times, series.values.reshape(len(series.times), -1)[:, 0].clip(1e-16), label=kind)
    ax.set_xlabel("OU time τ")
    ax.set_ylabel("relative covariance error")
    ax.set_title("flow level ([V] Fig. 4)")
    ax.legend(fontsize=8)
    if study is not None:
        k = range(len(study["tau"]))
        ax = fig.add_subplot(1, panels, 2)
        ax.semilogy(k, study["rotation"], "o-", label="rotation path")
        ax.semilogy(k, study["projection"], "s-", label="projection path")
        ax.set_xlabel("time index k")
        ax.set_ylabel("|∮ s·dx| / ∮|dx|")
        ax.set_title("integral constraint ([V] Fig. 3a)")
        ax.legend(fontsize=8)
        ax = fig.add_subplot(1, panels, 3)
        ax.semilogy(k, study["asymmetry"], "o-")
        ax.set_xlabel("time index k")
        ax.set_ylabel("max |∂ᵢsⱼ − ∂ⱼsᵢ|")
        ax.set_title("differential constraint ([V] Fig. 3c)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    score_conservativity.main()
