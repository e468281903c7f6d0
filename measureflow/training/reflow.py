"""Rectified flow ("reflow"): couple by the current flow map and refit (MATH.md §15.2).

Round 1 fits a velocity v¹ by flow matching with the product coupling (:func:`train_velocity`).
Round k + 1 draws X₀ from the source, pushes it through the flow map Φᵏ of vᵏ (the ODE ẋ = vᵏ_t(x)
from t = 0 to 1), and refits on the pairs (X₀, Φᵏ(X₀)) — a deterministic coupling, so the new
interpolant's paths cross less. Each round records

* the transport cost E|Φᵏ(X₀) − X₀|², non-increasing over rounds (Liu et al.), and
* the straightness of the flow's paths, E|x₁ − x₀|² / E∫|ẋ|²dt ∈ (0, 1]
  (:func:`measureflow.diagnostics.straightness`; 1 for straight constant-speed paths),
  which increases.

Between Gaussians the 1-rectified map is the flow-matching map T^FM of MATH.md §1.5, not the
Brenier map T^OT.
"""

from __future__ import annotations

import copy

import attrs
import numpy as np
import torch

from ..diagnostics import straightness
from ..fields import Field
from ..state import Particles
from ..validators import check_int
from .velocity import TrainingResult, sample_points, train_velocity

__all__ = ["reflow", "ReflowResult", "ReflowRound", "flow_map"]


class _NetworkField(Field):
    """v_t(x) = model(x, t), evaluated without autograd (the flow map of a trained model)."""

    name = "network"
    time_range = (0.0, 1.0)

    def __init__(self, model):
        self.model = model

    def velocity(self, t, x, state):
        with torch.no_grad():
            return self.model(x, t)


def flow_map(model, x0: torch.Tensor, steps: int = 50, integrator: str = "rk4"):
    """(Φ(x0), frames): x0 (N, d) pushed from t = 0 to 1 by the network's ODE with ``steps`` equal
    steps; ``frames`` (steps + 1, N, d) are the positions at the grid times (for straightness)."""
    from ..integrators import Stepper
    from ..plugins import get_registry

    steps = check_int(steps, "steps", "flow_map")
    solver = get_registry().integrator(integrator)
    state = Particles(x0[None])
    stepper = Stepper(solver, _NetworkField(model), state)
    frames = [state.x[0]]
    for k in range(steps):
        state = stepper.advance(state, k / steps, (k + 1) / steps)
        frames.append(state.x[0])
    return state.x[0], torch.stack(frames)


@attrs.frozen(eq=False)
class ReflowRound:
    """One round: its training result, the transport cost E|Φ(X₀) − X₀|² and the straightness of its
    flow on ``pairs`` source samples (the same in every round), and those samples' images Φ(X₀)."""

    round: int
    training: TrainingResult
    transport_cost: float
    straightness: float
    x0: torch.Tensor
    x1: torch.Tensor

    @property
    def model(self):
        return self.training.model


@attrs.frozen(eq=False)
class ReflowResult:
    """The rounds of :func:`reflow`, first to last."""

    rounds: tuple

    @property
    def costs(self) -> np.ndarray:
        return np.array([r.transport_cost for r in self.rounds])

    @property
    def straightness(self) -> np.ndarray:
        return np.array([r.straightness for r in self.rounds])

    @property
    def model(self):
        """The last round's network."""
        return self.rounds[-1].model


def reflow(source, target, schedule="linear", *, rounds: int = 3, pairs: int = 4096, ode_steps: int = 50,
           integrator: str = "rk4", steps: int = 1000, seed: int = 0, warm_start: bool = True,
           progress: bool | None = None, **train_options) -> ReflowResult:
    """Rectified flow over ``rounds`` rounds (module docstring).

    Parameters
    ----------
    source, target:
        as for :func:`train_velocity` (measures or point clouds); round 1 pairs them independently.
    rounds:
        number of fits (round 1 is plain flow matching; each further round refits on (X₀, Φ(X₀))).
    pairs:
        source samples drawn per round: pushed through the round's flow map to measure it and, for
        the next round, to pair.
    ode_steps, integrator:
        how the flow map is integrated (equal steps on [0, 1]).
    steps, seed, train_options:
        passed to :func:`train_velocity` for every round (seed + round number per round).
    warm_start:
        start each refit from the previous round's network (True) or from a fresh one.
    """
    rounds = check_int(rounds, "rounds", "reflow")
    pairs = check_int(pairs, "pairs", "reflow")
    out = []
    model = train_options.pop("model", None)
    coupling = train_options.pop("coupling", "independent")
    x0 = x1 = None
    for k in range(1, rounds + 1):
        if k == 1:
            result = train_velocity(source, target, schedule, coupling=coupling, model=model, steps=steps,
                                    seed=seed, progress=progress, **train_options)
        else:
            start = copy.deepcopy(out[-1].model) if warm_start else model
            result = train_velocity(x0, x1, schedule, coupling="paired", model=start, steps=steps, seed=seed + k - 1,
                                    progress=progress, **train_options)
        net = result.model.eval()
        params = list(net.parameters())
        device, dtype = params[0].device, params[0].dtype
        # the same source sample every round, so that the rounds' costs differ by their maps only
        x0 = sample_points(source, pairs, torch.Generator(device=device).manual_seed(seed + 1000), device, dtype)
        x1, frames = flow_map(net, x0, ode_steps, integrator)
        cost = float((x1 - x0).square().sum(-1).mean())
        times = torch.linspace(0.0, 1.0, ode_steps + 1, dtype=torch.float64)
        s = float(straightness(frames.detach().double().cpu(), times))
        out.append(ReflowRound(k, result, cost, s, x0.detach(), x1.detach()))
        net.train()
    return ReflowResult(tuple(out))
