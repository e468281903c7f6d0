"""Relaxation under an affine field whose Gaussian solution is known.

Particles drawn from N(m0, Σ0) (or the Gaussian state itself) move under

* ``linear``: v(x) = b + A x with a non-normal, stable A — Σ(t) = e^{tA} Σ0 e^{tAᵀ};
* ``ornstein_uhlenbeck``: dX = −θ(X − c)dt + σ dW (stochastic; Euler–Maruyama on particles) —
  Σ(t) = s²I + e^{−2θt}(Σ0 − s²I), s² = σ²/(2θ).

The run writes an H5MD trajectory with the mean, the covariance, the energy (where the field has
one) and the squared W2 distance to the exact law, then prints the error of the final mean and
covariance against the closed form and draws the run. An event records each zero of the first mean
component m₁(t), located on the solver's dense output (MATH.md §15.4: for ``linear`` from m₀ = (2, −1)
the first is at t* = 1.7069141; a particle cloud's sample mean crosses near it).

    python scenarios/relaxation.py --set state=gaussians
    measureflow run scenarios/relaxation.py --set field=ornstein_uhlenbeck --set n=4000
"""

from __future__ import annotations

from typing import Annotated

import torch

import measureflow
from measureflow import Event, Gaussians, Simulation, scenario
from measureflow.parameters import Count, OneOf, Picture, Size, Steps
from measureflow.simulation import Observer


def initial_law(dtype=torch.float64) -> Gaussians:
    mean = torch.tensor([2.0, -1.0], dtype=dtype)
    cov = torch.tensor([[1.5, 0.6], [0.6, 0.8]], dtype=dtype)
    return Gaussians(mean, cov)


def make_field(name: str):
    if name == "linear":
        # Non-normal and stable: the eigenvalues are −0.5 ± 1.5i, A Aᵀ ≠ Aᵀ A.
        A = torch.tensor([[-0.5, -2.0], [1.0, -0.5]], dtype=torch.float64)
        return measureflow.field("linear", A=A, b=torch.tensor([0.5, 0.0], dtype=torch.float64))
    if name == "ornstein_uhlenbeck":
        return measureflow.field("ornstein_uhlenbeck", theta=1.0, sigma=0.8, center=torch.tensor([0.0, 1.0]))
    return measureflow.field(name)


def start_state(params: dict):
    """The initial state: the law itself, or n particles drawn from it with the run's seed."""
    law = initial_law()
    replicas = params["replicas"]
    gaussians = Gaussians(law.mean.expand(replicas, -1), law.cov.expand(replicas, -1, -1))
    if params["state"] == "gaussians":
        return gaussians
    if params["state"] == "particles":
        return gaussians.sample(params["n"], torch.Generator().manual_seed(params["seed"]))
    raise measureflow.ParameterError(f"state must be 'particles' or 'gaussians'; received {params['state']!r}")


def exact_w2(state, *, field=None, target=None, t=0.0, **_):
    """Squared W2 between the current state's Gaussian moments and the exact law at time t."""
    from measureflow.observables import bures_w2

    exact = field.solution(t, initial_law(state.dtype))
    if isinstance(state, Gaussians):
        mean, cov = state.mean, state.cov
    else:
        mean, cov = state.mean(), state.covariance()
    return bures_w2(mean, cov, exact.mean.to(mean), exact.cov.to(cov))


#: MATH.md §15.4: first zero of m₁(t) under the README's linear field from m₀ = (2, −1).
FIRST_ZERO = 1.7069141


def first_mean_component(t, state):
    """m₁ of each replica (the event whose zeros the run records)."""
    return state.mean[:, 0] if isinstance(state, Gaussians) else state.mean()[:, 0]


@scenario
def relaxation(
    field: str = "linear",
    state: Annotated[str, OneOf("particles", "gaussians")] = "particles",
    n: Annotated[int, Size(times=("replicas",))] = 2000,
    replicas: Count = 1,
    t1: float = 2.0,
    steps: Steps = 200,
    integrator: str = "",
    every: Count = 10,
    seed: int = 0,
    out: str = "runs/relaxation.h5",
    picture: Picture = "runs/relaxation.png",
) -> Simulation:
    """Particles or a Gaussian relaxing under an affine field with a closed-form solution."""
    f = make_field(field)
    start = start_state(dict(state=state, n=n, replicas=replicas, seed=seed))
    observers = ["mean", "covariance", Observer(exact_w2, name="w2_to_exact")]
    if "energy" in f.capabilities and not (state == "particles" and field == "ornstein_uhlenbeck"):
        observers.append("energy")
    return Simulation(
        start,
        f,
        integrator or None,
        t0=0.0,
        t1=t1,
        steps=steps,
        writers=[measureflow.get_registry().writer("h5md", out, every=every)] if out else [],
        observers=observers,
        observe_every=every,
        seed=seed,
        events=[Event(first_mean_component, name="mean_crosses_zero")],
    )


@relaxation.report
def report(result, params):
    sim_field = make_field(params["field"])
    exact = sim_field.solution(params["t1"], initial_law())
    final = result.state
    if isinstance(final, Gaussians):
        mean, cov = final.mean, final.cov
    else:
        mean, cov = final.mean(), final.covariance()
    mean_err = (mean - exact.mean).norm(dim=-1).max().item()
    cov_err = (cov - exact.cov).flatten(1).norm(dim=-1).max().item()
    print(f"final mean error |m - m*| = {mean_err:.3e}; covariance error |S - S*|_F = {cov_err:.3e}")
    crossings = [e for e in result.events if e.replica == 0]
    if crossings:
        note = f" (MATH.md §15.4: {FIRST_ZERO})" if params["field"] == "linear" else ""
        print(f"m₁ first crosses 0 at t = {crossings[0].t:.9f}{note}; {len(crossings)} crossing(s) in [0, {params['t1']:g}]")
    if not isinstance(final, Gaussians) and params["field"] != "ornstein_uhlenbeck":
        # The error above is mostly the sampling error of the initial cloud. An affine flow moves
        # the cloud's own moments exactly like a Gaussian's, so this isolates the integrator's error.
        start = start_state(params)
        own = sim_field.solution(params["t1"], Gaussians(start.mean(), start.covariance()))
        mean_err = (mean - own.mean).norm(dim=-1).max().item()
        cov_err = (cov - own.cov).flatten(1).norm(dim=-1).max().item()
        print(f"against the flow of the sample's own moments: mean error {mean_err:.3e}; covariance error {cov_err:.3e}")
    if params["out"] and params["picture"]:
        from measureflow import plot

        plot.plot_run(params["out"], out=params["picture"])
        print(f"wrote {params['picture']}")


if __name__ == "__main__":
    relaxation.main()
