"""The flow-matching map between two Gaussians against the Brenier (optimal) map (MATH.md §1.4–1.5).

X₀ ~ N(0, Σ₀) and X₁ ~ N(0, Σ₁) coupled independently; the exact flow-matching field of
Zₜ = aₜX₀ + bₜX₁ is affine, v(z) = Aₜz with Aₜ = (aa'Σ₀ + bb'Σ₁)Σₜ⁻¹ (eq. 1.5), and moves the state
from t = 0 to t = 1 by the linear map (whatever the scalar schedule)

    T^FM = Σ₀^{½} C^{½} Σ₀^{−½},   C = Σ₀^{−½} Σ₁ Σ₀^{−½}            ([B] (29)),

while the optimal map is T^OT = Σ₀^{−½}(Σ₀^{½}Σ₁Σ₀^{½})^{½}Σ₀^{−½} ([B] (30)). Both push Σ₀ to Σ₁; they
agree iff Σ₀Σ₁ = Σ₁Σ₀. Cases:

* ``reference``: Σ₀ = diag(2, 0.5), Σ₁ = [[1, 0.8], [0.8, 1.2]] (MATH.md §1.5): T^FM ≠ T^OT, transport
  costs tr((T − I)Σ₀(T − I)ᵀ) = 0.817144 (FM) > 0.651957 = W₂² (OT);
* ``commuting``: Σ₀ = R diag(2, 0.5)Rᵀ, Σ₁ = R diag(1, 1.2)Rᵀ, R the rotation by 30°: T^FM = T^OT =
  R diag(√(1/2), √2.4)Rᵀ.

The state is either a Gaussian (``state=gaussians``: three replicas N(m, Σ₀) with m = 0, e₁, e₂, whose
means move by the flow map, so the simulated map is read off their final means) or particles
drawn from N(0, Σ₀) (``state=particles``; the flow is linear, so a least-squares fit of the final on
the initial positions recovers the simulated map with no sampling error). The run writes an H5MD
trajectory with the squared W₂ distance to the exact path N(0, a²Σ₀ + b²Σ₁); the report prints both
closed-form maps, their costs and the simulated map, and draws where each map sends points of Σ₀'s
ellipse.

    python scenarios/fm_vs_brenier.py
    measureflow run scenarios/fm_vs_brenier.py --set case=commuting --set state=gaussians
"""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np
import torch

import measureflow
from measureflow import Gaussians, Particles, Simulation, scenario
from measureflow.diagnostics import brenier_map, commutation_defect, fm_flow_map, fm_terminal_map, transport_cost
from measureflow.measures import Gaussian
from measureflow.parameters import OneOf, Picture, Points, Steps
from measureflow.simulation import Observer

CASES = ("reference", "commuting")
#: MATH.md §1.5 reference numbers (six decimals).
REFERENCE_COSTS = {"fm": 0.817144, "ot": 0.651957}


def covariances(case: str, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ₀, Σ₁) of the case."""
    if case == "reference":
        S0 = torch.diag(torch.tensor([2.0, 0.5], dtype=dtype))
        S1 = torch.tensor([[1.0, 0.8], [0.8, 1.2]], dtype=dtype)
        return S0, S1
    if case == "commuting":
        angle = math.pi / 6
        R = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=dtype)
        S0 = R @ torch.diag(torch.tensor([2.0, 0.5], dtype=dtype)) @ R.T
        S1 = R @ torch.diag(torch.tensor([1.0, 1.2], dtype=dtype)) @ R.T
        return 0.5 * (S0 + S0.T), 0.5 * (S1 + S1.T)
    raise measureflow.ParameterError(f"case must be one of {', '.join(CASES)}; received {case!r}")


def make_field(case: str, schedule: str):
    S0, S1 = covariances(case)
    zero = torch.zeros(2, dtype=torch.float64)
    return measureflow.field("flow_matching", data=Gaussian(zero, S0), noise=Gaussian(zero, S1), schedule=schedule)


def start_state(case: str, state: str, n: int, seed: int):
    S0, _ = covariances(case)
    if state == "gaussians":
        # Means 0, e₁, e₂: the flow is linear, so the differences of the final means are T's columns.
        means = torch.cat([torch.zeros(1, 2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)])
        return Gaussians(means, S0.expand(3, 2, 2).clone())
    if state == "particles":
        law = Gaussian(torch.zeros(2, dtype=torch.float64), S0)
        return Particles(law.sample(n, torch.Generator().manual_seed(seed))[None])
    raise measureflow.ParameterError(f"state must be 'particles' or 'gaussians'; received {state!r}")


def w2_to_path(state, *, field=None, t=0.0, **_):
    """Squared W₂ between the state's (first replica's) Gaussian moments and the exact path law at t."""
    from measureflow.observables import bures_w2

    exact = field.path(t)
    if isinstance(state, Gaussians):
        mean, cov = state.mean[:1], state.cov[:1]
    else:
        mean, cov = state.mean(), state.covariance()
    return bures_w2(mean, cov, exact.mean.to(mean), exact.cov.to(cov))


def simulated_map(start, final) -> torch.Tensor:
    """The linear map the run applied: from the replicas' means (Gaussians) or by least squares (particles)."""
    if isinstance(final, Gaussians):
        return (final.mean[1:] - final.mean[:1]).T
    x0, x1 = start.x[0], final.x[0]
    # x1 = x0 Tᵀ exactly for a linear flow, so the fit has no sampling error (only round-off).
    return torch.linalg.lstsq(x0, x1).solution.T


@scenario
def fm_vs_brenier(
    case: Annotated[str, OneOf(*CASES)] = "reference",
    state: Annotated[str, OneOf("particles", "gaussians")] = "particles",
    schedule: str = "linear",
    n: Points = 4000,
    steps: Steps = 100,
    seed: int = 0,
    out: str = "runs/fm_vs_brenier.h5",
    picture: Picture = "runs/fm_vs_brenier.png",
) -> Simulation:
    """Σ₀ pushed to Σ₁ by the flow-matching field, compared with the Brenier map."""
    field = make_field(case, schedule)
    return Simulation(
        start_state(case, state, n, seed),
        field,
        "rk4",
        t0=0.0,
        t1=1.0,
        steps=steps,
        writers=[measureflow.get_registry().writer("h5md", out, every=max(1, steps // 50))] if out else [],
        observers=["mean", "covariance", Observer(w2_to_path, name="w2_to_path")],
        observe_every=max(1, steps // 50),
        seed=seed,
    )


def closed_forms(case: str) -> dict:
    S0, S1 = covariances(case)
    fm, ot = fm_terminal_map(S0, S1), brenier_map(S0, S1)
    return {
        "S0": S0,
        "S1": S1,
        "fm": fm,
        "ot": ot,
        "fm_cost": float(transport_cost(fm, S0)),
        "ot_cost": float(transport_cost(ot, S0)),
        "defect": float(commutation_defect(S0, S1)),
    }


def _matrix(T: torch.Tensor) -> str:
    return "[[{:+.6f}, {:+.6f}], [{:+.6f}, {:+.6f}]]".format(*T.reshape(-1).tolist())


@fm_vs_brenier.report
def report(result, params):
    ref = closed_forms(params["case"])
    start = start_state(params["case"], params["state"], params["n"], params["seed"])
    final = result.state
    T = simulated_map(start, final)
    S0, S1 = ref["S0"], ref["S1"]
    print(f"case {params['case']}: ‖Σ₀Σ₁ − Σ₁Σ₀‖/(‖Σ₀‖‖Σ₁‖) = {ref['defect']:.3e}; schedule {params['schedule']}, "
          f"{params['state']}, RK4 with {params['steps']} steps")
    print(f"  T^FM closed form  {_matrix(ref['fm'])}   cost {ref['fm_cost']:.6f}")
    print(f"  T^OT (Brenier)    {_matrix(ref['ot'])}   cost {ref['ot_cost']:.6f} = W₂²")
    print(f"  T from the run    {_matrix(T)}   cost {float(transport_cost(T, S0)):.6f}")
    print(f"  max |T_run − T^FM| = {float((T - ref['fm']).abs().max()):.2e}   "
          f"max |T_run − T^OT| = {float((T - ref['ot']).abs().max()):.2e}   "
          f"max |T^FM − T^OT| = {float((ref['fm'] - ref['ot']).abs().max()):.2e}")
    print(f"  asymmetry ‖T − Tᵀ‖: FM {float(torch.linalg.matrix_norm(ref['fm'] - ref['fm'].T)):.3e}, "
          f"OT {float(torch.linalg.matrix_norm(ref['ot'] - ref['ot'].T)):.1e} (the Brenier map is symmetric)")
    if isinstance(final, Gaussians):
        cov = final.cov[0]
        print(f"  final covariance error max |Σ(1) − Σ₁| = {float((cov - S1).abs().max()):.2e}")
    else:
        x0, x1 = start.x[0], final.x[0]
        moved = ((x1 - x0) ** 2).sum(-1)
        cov = final.covariance()[0]
        se = float(moved.std()) / math.sqrt(moved.numel())
        print(f"  particles: mean |x(1) − x(0)|² = {float(moved.mean()):.5f} ± {se:.5f} "
              f"(closed-form FM cost {ref['fm_cost']:.5f}); sample covariance at t = 1 "
              f"{_matrix(cov)} (Σ₁ up to sampling error)")
    if params["picture"]:
        draw(params, ref, T, start, final)
        print(f"wrote {params['picture']}")


def draw(params, ref: dict, T_run: torch.Tensor, start, final, markers: int = 12):
    from pathlib import Path

    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from measureflow.plot import plot_covariance_ellipses

    S0, S1 = ref["S0"].numpy(), ref["S1"].numpy()
    fm, ot, run = ref["fm"].numpy(), ref["ot"].numpy(), T_run.numpy()
    field = make_field(params["case"], params["schedule"])
    # Marker points on the 1.5-σ ellipse of Σ₀, coloured by angle: where does each one go?
    theta = np.linspace(0, 2 * np.pi, markers, endpoint=False)
    evals, evecs = np.linalg.eigh(S0)
    root = evecs @ np.diag(np.sqrt(evals)) @ evecs.T
    pts = 1.5 * np.stack([np.cos(theta), np.sin(theta)], 1) @ root.T
    colours = colormaps["hsv"](theta / (2 * np.pi))
    ts = np.linspace(0, 1, 101)
    Tt = fm_flow_map(torch.tensor(ts), ref["S0"], ref["S1"], field.schedule).numpy()  # (101, 2, 2)
    curves = np.einsum("kij,mj->mki", Tt, pts)

    fig = Figure(figsize=(15.5, 5.4), layout="constrained")
    axes = [fig.add_subplot(1, 3, k + 1) for k in range(3)]
    lim = 1.15 * max(np.abs(pts).max(), np.abs(pts @ fm.T).max(), np.abs(pts @ ot.T).max(), 2.2)

    def frame(ax, title):
        plot_covariance_ellipses(np.zeros(2), S0, ax, n_std=1.5, color="0.6", mean_path=False, linewidth=1.0)
        plot_covariance_ellipses(np.zeros(2), S1, ax, n_std=1.5, color="black", mean_path=False, linewidth=1.4)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal", adjustable="box")
        ax.set_title(title, fontsize="medium")

    ax = axes[0]
    if isinstance(start, Particles):
        show = min(1500, start.size)
        ax.scatter(start.x[0, :show, 0], start.x[0, :show, 1], s=2, color="0.75", label="particles, t = 0")
        ax.scatter(final.x[0, :show, 0], final.x[0, :show, 1], s=2, color="C0", alpha=0.5, label="particles, t = 1")
    frame(ax, "1.5-σ ellipses: Σ₀ (grey) and Σ₁ (black)")
    ax.scatter(pts[:, 0], pts[:, 1], s=40, c=colours, edgecolors="black", linewidths=0.5, zorder=5,
               label="marker points x on Σ₀'s ellipse")
    ax.legend(fontsize="x-small", loc="lower left")

    ax = axes[1]
    frame(ax, f"flow matching ({params['schedule']}): cost {ref['fm_cost']:.6f}")
    for m in range(markers):
        # Independent coupling: Σₜ = a²Σ₀ + b²Σ₁ shrinks mid-way, so the paths bend in and out.
        ax.plot(curves[m, :, 0], curves[m, :, 1], color=colours[m], lw=1.0,
                label="paths t ↦ Tₜx of the closed form" if m == 0 else None)
    ax.scatter(pts[:, 0], pts[:, 1], s=14, c=colours, zorder=4)
    img = pts @ fm.T
    ax.scatter(img[:, 0], img[:, 1], s=50, c=colours, edgecolors="black", linewidths=0.5, zorder=5, label="T^FM x")
    sim = pts @ run.T
    ax.scatter(sim[:, 0], sim[:, 1], s=60, marker="x", color="black", linewidths=0.9, zorder=6,
               label="T x, map measured on the run")
    ax.legend(fontsize="x-small", loc="lower left")

    ax = axes[2]
    frame(ax, f"Brenier map: cost {ref['ot_cost']:.6f} = W₂²")
    img_ot = pts @ ot.T
    for m in range(markers):
        ax.plot([pts[m, 0], img_ot[m, 0]], [pts[m, 1], img_ot[m, 1]], color=colours[m], lw=1.0)
        ax.plot([img_ot[m, 0], img[m, 0]], [img_ot[m, 1], img[m, 1]], color="0.3", lw=0.8, ls=":")
    ax.scatter(pts[:, 0], pts[:, 1], s=14, c=colours, zorder=4)
    ax.scatter(img_ot[:, 0], img_ot[:, 1], s=50, c=colours, edgecolors="black", linewidths=0.5, zorder=5,
               label="T^OT x (straight McCann paths)")
    ax.scatter(img[:, 0], img[:, 1], s=40, facecolors="none", edgecolors=colours, linewidths=1.2, zorder=5,
               label="T^FM x (dotted: offset from T^OT x)")
    ax.legend(fontsize="x-small", loc="lower left")
    same = "the maps agree" if ref["defect"] < 1e-12 else "same target ellipse, points rotated along it"
    fig.suptitle(f"{params['case']} pair: Σ₀ → Σ₁ by flow matching and by the Brenier map ({same}; MATH.md §1.5)",
                 fontsize="medium")
    Path(params["picture"]).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(params["picture"], dpi=110)


if __name__ == "__main__":
    fm_vs_brenier.main()
