"""Porous-medium flow by the blob method against the Barenblatt solution (MATH.md §15.8).

Particles start at quantiles of the Barenblatt profile at t = 1 and run to t = 8 (RK4 with steps inside
the blob scheme's stability bound h ≲ 2.8ε/(2ρ_max)); the fitted growth exponent of the
second moment must be 2a/d within 2 % (the blob method errs by O(ε), measured 0.1 % for d = 1 and 1 %
for d = 2 at these sizes).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import measureflow
from measureflow import ParameterError, Simulation
from measureflow_plugins.porous_medium import (
    barenblatt_exponent,
    barenblatt_particles,
    barenblatt_profile,
    barenblatt_second_moment,
)


def test_barenblatt_profile_has_unit_mass_and_its_second_moment():
    for d in (1, 2):
        a, _ = barenblatt_exponent(2.0, d)
        n = 4001 if d == 1 else 801
        axis = torch.linspace(-6.0, 6.0, n, dtype=torch.float64)
        cell = (12.0 / (n - 1)) ** d
        grid = axis[:, None] if d == 1 else torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
        for t in (1.0, 3.0):
            rho = barenblatt_profile(t, grid, 2.0)
            # trapezoid-free Riemann sums of a Lipschitz profile: error O(cell) ~ 1e-4
            assert abs(float(rho.sum()) * cell - 1.0) < 2e-3
            m2 = float((rho * (grid**2).sum(-1)).sum()) * cell
            assert abs(m2 / barenblatt_second_moment(t, 2.0, d) - 1.0) < 2e-3
        assert barenblatt_second_moment(2.0, 2.0, d) / barenblatt_second_moment(1.0, 2.0, d) == pytest.approx(2 ** (2 * a / d))


@pytest.mark.parametrize("d, n, epsilon", [(1, 200, 1e-2), (2, 500, 2e-2)])
def test_second_moment_grows_with_the_barenblatt_exponent(d, n, epsilon):
    m = 2.0
    a, _ = barenblatt_exponent(m, d)
    start = barenblatt_particles(n, m, d)
    field = measureflow.field("porous_medium", m=m, epsilon=epsilon)
    # h = 0.025 keeps hλ < 2.8 (RK4's stability bound) for λ ≈ 2ρ̃_max/ε over the whole run
    result = Simulation(start, field, "rk4", t0=1.0, t1=8.0, steps=280, writers=["memory"], observers=["energy"],
                        observe_every=1).run()
    assert result.ok
    m2 = (result.positions**2).sum(-1).mean(-1)[:, 0]
    slope = np.polyfit(np.log(result.times), np.log(m2), 1)[0]
    assert abs(slope / (2 * a / d) - 1.0) < 0.02
    energy = result.observables["energy"].values[:, 0]
    assert (np.diff(energy) < 0).all()


def test_porous_medium_errors_and_geometry():
    with pytest.raises(ParameterError, match="m must be > 1"):
        measureflow.field("porous_medium", m=1.0)
    start = barenblatt_particles(50, 2.0, 1)
    # F is defined on positive measures: an unbalanced Fisher–Rao flow is allowed and changes the mass
    field = measureflow.field("porous_medium", m=2.0, epsilon=0.05, geometry="fisher_rao", rate=1.0, balanced=False)
    out = Simulation(start, field, "rk4", t1=0.5, steps=5).run().state
    assert float(out.weights.sum()) < 1.0
