"""Fisher–Rao and Wasserstein–Fisher–Rao geometries on Gaussian states (MATH.md §15.6, §3).

Reference numbers are MATH.md's, printed to 7 decimals: a comparison with them is limited by that
rounding (5e-8), so it is made at 1e-7 after RK4 at h = 1/400 (local error O(h⁵), global ~1e-11 here);
the closed form of pure FR is compared with the integrated closure at 1e-10.
"""

from __future__ import annotations

import pytest
import torch

import measureflow
from measureflow import CapabilityError, Gaussians, ParameterError, Simulation
from measureflow.measures import Gaussian

F64 = torch.float64
C0 = torch.diag(torch.tensor([4.0, 0.25], dtype=F64))
GAMMA = Gaussian(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
# MATH.md §15.6 pure-FR case
M0 = torch.tensor([-1.0, 2.0], dtype=F64)
MB = torch.tensor([1.0, -0.5], dtype=F64)
SB = torch.tensor([[1.5, 0.4], [0.4, 0.7]], dtype=F64)
FR_MEAN = torch.tensor([1.0974162, 1.4689206], dtype=F64)
FR_COV = torch.tensor([[2.2173931, 0.1269309], [0.1269309, 0.3309667]], dtype=F64)


def _run(field, state, t1=0.5, steps=200):
    result = Simulation(state, field, "rk4", t1=t1, steps=steps).run()
    assert result.ok
    return result.state


@pytest.mark.parametrize("rate, expected", [(0.0, (2.1036383, 0.7240904)), (1.0, (1.3767245, 0.7923166))])
def test_wfr_kl_toward_gamma_matches_math(rate, expected):
    # α = 0 is the plain Wasserstein KL flow of §3; α = 1 the WFR row of §15.6.
    kwargs = {} if rate == 0.0 else {"geometry": "wfr", "rate": rate}
    field = measureflow.field("kl", target=GAMMA, **kwargs)
    out = _run(field, Gaussians(torch.zeros(2, dtype=F64), C0))
    want = torch.diag(torch.tensor(expected, dtype=F64))
    assert torch.allclose(out.cov[0], want, atol=1e-7, rtol=0)
    assert torch.allclose(out.mean[0], torch.zeros(2, dtype=F64), atol=1e-14)


def test_pure_fisher_rao_closed_form_and_closure():
    field = measureflow.field("kl", target=Gaussian(MB, SB), geometry="fisher_rao", rate=1.0)
    start = Gaussians(M0, C0)
    exact = field.solution(0.5, start)
    # the printed reference (7 decimals)
    assert torch.allclose(exact.mean[0], FR_MEAN, atol=1e-7, rtol=0)
    assert torch.allclose(exact.cov[0], FR_COV, atol=1e-7, rtol=0)
    # the closure integrated by RK4 reproduces the closed form to 1e-10 (RK4 global error ~1e-11)
    out = _run(field, start, steps=400)
    assert torch.allclose(out.mean, exact.mean, atol=1e-10, rtol=0)
    assert torch.allclose(out.cov, exact.cov, atol=1e-10, rtol=0)


def test_wfr_mean_equation_and_energy_identity():
    """ṁ = (I + αΣ)P(m_β − m) and dF/dt = −|b|² − tr(AΣAᵀ) − α Var(δF), Var = ½tr((MΣ)²) + gᵀΣg."""
    alpha = 0.7
    target = Gaussian(MB, SB)
    wfr = measureflow.field("kl", target=target, geometry="wfr", rate=alpha)
    plain = measureflow.field("kl", target=target)
    S = torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=F64)
    state = Gaussians(M0, S)
    P = torch.linalg.inv(SB)
    b, _ = wfr.affine(0.0, state)
    want = (torch.eye(2, dtype=F64) + alpha * S) @ P @ (MB - M0)
    assert torch.allclose(b[0], want, atol=1e-13)
    # energy identity by central differences along the closure (h = 1e-4: error O(h²) ~ 1e-8 relative)
    h = 1e-4
    fwd = _run(wfr, state, t1=h, steps=4)
    bwd = Simulation(state, wfr, "rk4", t0=0.0, t1=-h, steps=4).run().state
    dF = (wfr.energy(fwd) - wfr.energy(bwd)) / (2 * h)
    bw, Aw = plain.affine(0.0, state)
    dissipation = (bw * bw).sum() + torch.einsum("rij,rjk,rik->r", Aw, S[None], Aw)
    M = P - torch.linalg.inv(S)
    g = P @ (M0 - MB)
    var = 0.5 * torch.trace(M @ S @ M @ S) + g @ S @ g
    assert torch.allclose(dF, -(dissipation + alpha * var), rtol=1e-7, atol=0)


def test_geometry_errors():
    with pytest.raises(CapabilityError, match=r"has no first variation.*fields with one: .*kl.*mmd"):
        measureflow.field("w2", target=GAMMA, geometry="wfr")
    with pytest.raises(ParameterError, match="geometry must be one of"):
        measureflow.field("kl", target=GAMMA, geometry="hellinger")
    with pytest.raises(ParameterError, match="rate"):
        measureflow.field("kl", target=GAMMA, geometry="wfr", rate=-1.0)
    with pytest.raises(ParameterError, match="rate= is the Fisher–Rao rate"):
        measureflow.field("kl", target=GAMMA, geometry="wasserstein", rate=1.0)
    with pytest.raises(ParameterError, match="positive measures"):
        measureflow.field("kl", target=GAMMA, geometry="wfr", balanced=False)
    # a closure that is not the gradient of a quadratic first variation is refused on Gaussians
    smoothed = measureflow.field("kl", target=GAMMA, mode="smoothed", epsilon=0.1)
    with pytest.raises(CapabilityError, match="no first variation"):
        measureflow.field("kl", target=GAMMA, mode="smoothed", epsilon=0.1, geometry="wfr")
    assert smoothed is not None
    assert measureflow.field("kl", target=GAMMA, geometry="wasserstein").name == "kl"
