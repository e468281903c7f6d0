"""The JKO scheme (minimising movements) on Gaussian states (MATH.md §12).

``jko`` (:class:`JKO`) advances a Gaussian state by implicit Euler steps in the Wasserstein metric:
one call to ``advance(field, state, t0, t1)`` takes one step of size τ = t1 − t0 > 0,

    μ^{k+1} = argmin over Gaussians N(m, Σ) of  W₂²(N(m, Σ), μ^k)/(2τ) + F(N(m, Σ)),

with W₂² the Bures formula (MATH.md §5, §12; :func:`measureflow.observables.bures_w2`)

    W₂² = |m − m_k|² + tr(Σ + Σ_k − 2(Σ_k^{1/2} Σ Σ_k^{1/2})^{1/2})

and F = ``field.energy`` evaluated on the Gaussian (closed form, differentiated by autograd). The
minimiser of the Gaussian-constrained problem is the true JKO step when F does not increase under
the moment-matched Gaussian projection (Gelbrich, MATH.md §12), e.g. KL to a Gaussian target or
W₂²(·, β) to a Gaussian β. The scheme is first order in τ and unconditionally stable: whatever τ,
F(μ^{k+1}) + W₂²(μ^{k+1}, μ^k)/(2τ) ≤ F(μ^k).

Inner problem. Σ = LLᵀ with L lower triangular and diag(L) = exp(θ), so every candidate covariance
is positive definite and the unknowns (m, θ, strict lower part of L) are unconstrained. The
objective is multiplied by τ (½W₂² + τF: same minimiser, curvature O(1) for every τ, so one
tolerance fits all steps); replicas are independent, so the R objectives are summed and minimised
together by ``torch.optim.LBFGS`` with the strong-Wolfe line search, in float64 whatever the
state's dtype, warm-started at μ^k (the previous step's minimiser). It stops when every
entry of the gradient with respect to (m, θ, L) is at most ``tol``. Close to the minimiser the
objective changes by less than its rounding error and the line search stalls (at a gradient of
order √(ε|F|) ≈ 1e-8); up to ``polish_iter`` further quasi-Newton steps without line search, in
coordinates rescaled by that gradient, then bring it below ``tol``, and the point with the smallest
gradient seen is the step's answer. The optimiser reads scalars back to the host, so a step
synchronises a few times per inner iteration.

A step is refused with :class:`~measureflow.integrators.StepFailure` (never a non-SPD covariance)
when the objective or its gradient is not finite at μ^k, the minimiser has non-finite entries, its
covariance fails a Cholesky factorisation in the state's dtype, the JKO objective ended above its
value at μ^k (so every accepted step satisfies the descent inequality above, to rounding), or the
gradient is still above ``tol`` after ``max_iter`` + ``polish_iter`` iterations.

Particles. For energies evaluable on particles (mmd, interaction, porous_medium with m = 2, a potential
energy), one step is (MATH.md §12)

    X^{k+1} = argmin_X Σᵢ wᵢ|xᵢ − xᵢ^k|²/(2τ) + F(Σᵢ wᵢδ_{xᵢ}),

minimised by the same L-BFGS (strong Wolfe, then the rescaled polish) over the positions, in float64.
The streaming reductions record no autograd history, so the gradient comes from the field itself:
∂F/∂xᵢ = wᵢ∇δF(xᵢ) = −wᵢ v(xᵢ) for a Wasserstein gradient flow, so the field's ``velocity`` must be the
descent velocity of its ``energy`` (a field whose energy is only an estimator of its functional, such as
kl's kernel-density estimate, makes the line search fail and the step is refused). The objective is
scaled by τ/w̄ (w̄ the mean weight), whose gradient (wᵢ/w̄)(xᵢ − xᵢ^k − τv(xᵢ)) has O(1) entries: its
zeros are the implicit Euler step xᵢ = xᵢ^k + τv(xᵢ); ``tol`` bounds them. First order in τ.

Forward integration only (t1 > t0): the implicit step has no backward counterpart.

A run's integration counters (``Result.integrator_stats``, ``Stepper.stats``) hold ``nfev`` = objective
evaluations (each one energy and one Bures evaluation with its gradient), ``steps``/``accepted``/
``rejected`` = JKO steps, plus ``inner_iterations``, the total number of L-BFGS iterations.
"""

from __future__ import annotations

import math

import torch

import measureflow
from measureflow.errors import CapabilityError, ShapeError, StepFailure, TimeRangeError
from measureflow.fields import capabilities
from measureflow.integrators import ConstantController, LinearDense, Solver, StepResult, as_dynamics
from measureflow.linalg import symmetrize
from measureflow.observables import bures_w2
from measureflow.state import state_kind
from measureflow.validators import check_int, check_positive

__all__ = ["JKO"]

_WORK_DTYPE = torch.float64


def _field_name(field) -> str:
    return getattr(field, "name", type(field).__name__)


class _NonFiniteStart(Exception):
    """The JKO objective or its gradient is not finite at μ^k: there is nothing to minimise."""


class _Cholesky:
    """Σ = LLᵀ with diag(L) = exp(θ): the unconstrained coordinates (m, θ, strict lower part of L)
    of a batch of Gaussians, packed as one (R, d + d + d(d−1)/2) tensor."""

    def __init__(self, d: int, device):
        self.d = d
        self.rows, self.cols = torch.tril_indices(d, d, offset=-1, device=device)

    def pack(self, m: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        L = torch.linalg.cholesky(S)
        theta = torch.log(torch.diagonal(L, dim1=-2, dim2=-1))
        return torch.cat([m, theta, L[:, self.rows, self.cols]], dim=-1)

    def unpack(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.d
        m, theta, strict = z[:, :d], z[:, d : 2 * d], z[:, 2 * d :]
        R = z.shape[0]
        lower = torch.zeros(R, d, d, dtype=z.dtype, device=z.device)
        lower = lower.index_put((torch.arange(R, device=z.device)[:, None], self.rows, self.cols), strict)
        L = lower + torch.diag_embed(torch.exp(theta))
        return m, symmetrize(L @ L.transpose(-1, -2))


class JKO(Solver):
    """Gaussian-constrained JKO steps (see the module docstring; MATH.md §12).

    Parameters
    ----------
    tol:
        the inner minimisation stops when every gradient entry of ½W₂² + τF with respect to
        (m, log diag L, strict lower L) is at most ``tol`` (default 1e-10; the minimiser's error is
        about tol divided by the curvature, which is O(1) in these coordinates).
    max_iter:
        L-BFGS iterations allowed per step before the step fails (default 500).
    history_size:
        L-BFGS memory (default 20; the problem has d(d+3)/2 unknowns per replica).
    polish_iter:
        quasi-Newton steps without line search allowed after the line-search phase stalls above
        ``tol`` (default 20; see the comment in :meth:`advance`).
    """

    name = "jko"
    order = 1
    adaptive = False
    stochastic = False
    #: what it uses of the field on a Gaussians state (no affine closure needed)
    needs = frozenset({"energy"})

    def __init__(self, *, tol: float = 1e-10, max_iter: int = 500, history_size: int = 20, polish_iter: int = 20):
        # One implicit step per output interval; a minimiser is SPD by construction or refused.
        self.controller = ConstantController(max_halvings=0)
        self.tol = check_positive(tol, "tol", "jko")
        self.max_iter = check_int(max_iter, "max_iter", "jko")
        self.history_size = check_int(history_size, "history_size", "jko")
        self.polish_iter = check_int(polish_iter, "polish_iter", "jko")

    @property
    def options(self) -> dict:
        return {
            "tol": self.tol,
            "max_iter": self.max_iter,
            "history_size": self.history_size,
            "polish_iter": self.polish_iter,
        }

    # -- protocol -----------------------------------------------------------------------------------
    def check(self, field, state) -> None:
        """Refuse particles and fields without an energy (no device access)."""
        kind = state_kind(state)
        name = _field_name(field)
        if kind == "mixtures":
            raise CapabilityError(
                "integrator 'jko' runs on Gaussians and Particles states; integrate a GaussianMixtures state with "
                "'rk4' or 'dopri5'"
            )
        if kind == "particles" and "diffusion" in capabilities(field):
            raise CapabilityError(
                f"integrator 'jko' takes deterministic implicit steps; field {name!r} has a noise term (use "
                "'euler_maruyama')"
            )
        if "energy" not in capabilities(field) or not callable(getattr(field, "energy", None)):
            raise CapabilityError(
                f"integrator 'jko' minimises W₂²/(2τ) + F with F = field.energy, but field {name!r} "
                f"({type(field).__name__}) provides no energy(); use a field that descends a known functional, "
                "or an explicit integrator ('rk4', 'dopri5') with its affine() closure"
            )

    def step(self, dynamics, t0: float, t1: float, y, solver_state=None, *, dt: float | None = None) -> StepResult:
        """One JKO step of τ = t1 − t0 > 0 from the state ``y`` (nothing is drawn)."""
        dyn = as_dynamics(dynamics, y)
        field, state = dyn.field, y
        tau = t1 - t0 if dt is None else dt
        if not tau > 0:
            raise TimeRangeError(
                f"jko integrates forward in time only (one implicit step of τ = t1 − t0 > 0); received "
                f"t0 = {t0:.9g}, t1 = {t1:.9g}. Run backwards with an explicit integrator ('rk4', 'dopri5')"
            )
        if state_kind(state) == "particles":
            return self._particle_step(dyn, t0, t1, state, tau)
        m_k = state.mean.detach().to(_WORK_DTYPE)
        S_k = state.cov.detach().to(_WORK_DTYPE)
        R = m_k.shape[0]
        coords = _Cholesky(state.dim, m_k.device)

        def objective(zz):
            m, S = coords.unpack(zz)
            energy = field.energy(state.with_parameters(m, S))
            if not isinstance(energy, torch.Tensor) or tuple(energy.shape) != (R,):
                got = tuple(energy.shape) if isinstance(energy, torch.Tensor) else type(energy).__name__
                raise ShapeError(
                    f"jko: field {_field_name(field)!r}: energy() must return one value per replica, shape ({R},); "
                    f"returned {got}"
                )
            if not energy.requires_grad:
                raise CapabilityError(
                    f"jko: the energy of field {_field_name(field)!r} does not depend on (m, Σ) through autograd "
                    "(is it computed under no_grad or from detached values?); the JKO step needs its gradient"
                )
            return (0.5 * bures_w2(m, S, m_k, S_k) + tau * energy).sum()

        evaluations = 0
        start_value = None
        best = {"gmax": None, "z": None, "value": None}
        # The unknowns are z = origin + step·u; the line-search phase uses origin 0, step 1.
        frame = {"origin": None, "step": 1.0}

        def closure():
            nonlocal evaluations, start_value
            optimiser.zero_grad()
            zz = u if frame["origin"] is None else frame["origin"] + frame["step"] * u
            value = objective(zz)
            (value / frame["step"] ** 2).backward()
            evaluations += 1
            gmax = u.grad.abs().max() * frame["step"]
            if start_value is None:
                start_value = value.detach()
                if not bool(torch.isfinite(start_value) & torch.isfinite(gmax)):
                    raise _NonFiniteStart
            # Kept on the device: the smallest-gradient point seen is the step's answer.
            if best["gmax"] is None:
                best.update(gmax=gmax, z=zz.detach().clone(), value=value.detach())
            else:
                better = gmax < best["gmax"]
                best["gmax"] = torch.where(better, gmax, best["gmax"])
                best["z"] = torch.where(better, zz.detach(), best["z"])
                best["value"] = torch.where(better, value.detach(), best["value"])
            return value.detach() / frame["step"] ** 2

        def lbfgs(max_iter, line_search):
            return torch.optim.LBFGS(
                [u],
                lr=1.0,
                max_iter=max_iter,
                max_eval=None if line_search else 2 * max_iter,
                tolerance_grad=self.tol / frame["step"],
                tolerance_change=0.0,
                history_size=self.history_size,
                line_search_fn="strong_wolfe" if line_search else None,
            )

        u = coords.pack(m_k, S_k).requires_grad_(True)
        with torch.enable_grad():
            optimiser = lbfgs(self.max_iter, True)
            try:
                optimiser.step(closure)
            except _NonFiniteStart:
                dyn.count("nfev", evaluations)
                dyn.count("steps")
                dyn.count("rejected")
                raise StepFailure(
                    "non-finite JKO objective",
                    t0,
                    f"jko: at the current state μ^k, ½W₂² + τF = {float(start_value)} or its gradient is not finite "
                    f"(field {_field_name(field)!r}: energy() or its autograd gradient); check the field's parameters",
                ) from None
            iterations = int(optimiser.state[u].get("n_iter", 0))
            remaining = float(best["gmax"])
            if math.isfinite(remaining) and remaining > self.tol:
                # Near the minimiser ½W₂² + τF changes by less than its own rounding error, so the
                # line search's decrease test stalls at a gradient g of order √(ε|F|) although the
                # gradient itself is accurate. Finish with full quasi-Newton steps judged by the
                # gradient alone, in coordinates u = (z − z_best)/g where steps and gradient changes
                # are O(1): at the original scale L-BFGS would drop every curvature pair (its fixed
                # threshold yᵀs > 1e-10) and make no progress.
                frame.update(origin=best["z"].clone(), step=remaining)
                u = torch.zeros_like(u).requires_grad_(True)
                optimiser = lbfgs(self.polish_iter, False)
                optimiser.step(closure)
                iterations += int(optimiser.state[u].get("n_iter", 0))
        dyn.count("nfev", evaluations)
        dyn.count("inner_iterations", iterations)
        z_new, final, gmax = best["z"], best["value"], best["gmax"]

        m_new, S_new = coords.unpack(z_new)
        m_out = m_new.to(state.dtype)
        S_out = symmetrize(S_new.to(state.dtype))
        failure = self._failure(m_out, S_out, final, start_value, gmax)
        if failure is not None:
            # The controller never sees a refused step: count it here.
            dyn.count("steps")
            dyn.count("rejected")
            reason, detail = failure
            raise StepFailure(reason, t0, f"jko, τ = {tau:.6g}, {iterations} L-BFGS iterations: {detail}")
        out = state.with_parameters(m_out, S_out)
        y0, y1 = (state.mean, state.cov), (m_out, S_out)
        return StepResult(out, None, LinearDense(dyn, t0, t1, y0, y1, state), None)

    def _particle_step(self, dyn, t0, t1, state, tau) -> StepResult:
        """One particle JKO step (module docstring): L-BFGS over the positions with the field's velocity as
        the gradient of its energy."""
        field = dyn.field
        base = state.to(dtype=_WORK_DTYPE)
        x_k = base.x.detach()
        w = base.weights_or_uniform()
        scale = (w / w.mean(-1, keepdim=True))[..., None]  # wᵢ/w̄, (R, N, 1)
        factor = tau / w.mean(-1)  # τ/w̄ per replica
        R = x_k.shape[0]

        def evaluate(x):
            s = base.with_positions(x)
            energy = field.energy(s)
            if not isinstance(energy, torch.Tensor) or tuple(energy.shape) != (R,):
                got = tuple(energy.shape) if isinstance(energy, torch.Tensor) else type(energy).__name__
                raise ShapeError(f"jko: field {_field_name(field)!r}: energy() must return shape ({R},); returned {got}")
            value = (0.5 * (scale * (x - x_k) ** 2).sum((1, 2)) + factor * energy).sum()
            grad = scale * ((x - x_k) - tau * field.velocity(t1, x, s))
            return value, grad

        x_new, final, gmax, start, iterations, evaluations = self._minimise(evaluate, x_k, t0)
        dyn.count("nfev", evaluations)
        dyn.count("inner_iterations", iterations)
        finite = torch.isfinite(x_new).all() & torch.isfinite(final)
        slack = 64 * torch.finfo(_WORK_DTYPE).eps * start.abs().clamp_min(1.0)
        flags = torch.stack([finite, final <= start + slack, gmax <= self.tol]).tolist()
        detail = None
        if not flags[0]:
            detail = ("non-finite positions", "the inner minimisation diverged; use a smaller time step")
        elif not flags[1]:
            detail = ("JKO objective increased", "is the field's velocity the descent velocity of its energy? "
                      "use a smaller time step")
        elif not flags[2]:
            detail = ("inner minimisation did not converge",
                      f"max gradient entry {float(gmax):.3g} > tol = {self.tol:.3g}; raise max_iter (now "
                      f"{self.max_iter}), loosen tol, or check that velocity = −∇δ(energy)")
        if detail is not None:
            dyn.count("steps")
            dyn.count("rejected")
            raise StepFailure(detail[0], t0, f"jko, τ = {tau:.6g}, {iterations} L-BFGS iterations: {detail[1]}")
        out = state.with_positions(x_new.to(state.dtype))
        return StepResult(out, None, LinearDense(dyn, t0, t1, (state.x,), (out.x,), state), None)

    def _minimise(self, evaluate, z0, t0):
        """L-BFGS with a strong-Wolfe line search, then the rescaled polish (see :meth:`step`), of
        ``evaluate(z) -> (value, gradient)``; returns (z_best, value, max |gradient|, start value,
        iterations, evaluations)."""
        best = {"gmax": None, "z": None, "value": None}
        frame = {"origin": None, "step": 1.0}
        counts = {"evaluations": 0, "start": None}

        def closure():
            optimiser.zero_grad()
            with torch.no_grad():
                zz = u.detach() if frame["origin"] is None else frame["origin"] + frame["step"] * u.detach()
                value, grad = evaluate(zz)
            u.grad = grad * frame["step"] / frame["step"] ** 2
            counts["evaluations"] += 1
            gmax = grad.abs().max()
            if counts["start"] is None:
                counts["start"] = value.detach()
                if not bool(torch.isfinite(value) & torch.isfinite(gmax)):
                    raise StepFailure("non-finite JKO objective", t0,
                                      "jko: at the current particles the energy or the velocity is not finite")
            if best["gmax"] is None:
                best.update(gmax=gmax, z=zz.clone(), value=value)
            else:
                better = gmax < best["gmax"]
                best["gmax"] = torch.where(better, gmax, best["gmax"])
                best["z"] = torch.where(better, zz, best["z"])
                best["value"] = torch.where(better, value, best["value"])
            return value / frame["step"] ** 2

        def lbfgs(max_iter, line_search):
            return torch.optim.LBFGS([u], lr=1.0, max_iter=max_iter, max_eval=None if line_search else 2 * max_iter,
                                     tolerance_grad=self.tol / frame["step"], tolerance_change=0.0,
                                     history_size=self.history_size,
                                     line_search_fn="strong_wolfe" if line_search else None)

        u = z0.clone().requires_grad_(True)
        optimiser = lbfgs(self.max_iter, True)
        optimiser.step(closure)
        iterations = int(optimiser.state[u].get("n_iter", 0))
        remaining = float(best["gmax"])
        if math.isfinite(remaining) and remaining > self.tol:
            frame.update(origin=best["z"].clone(), step=remaining)
            u = torch.zeros_like(z0).requires_grad_(True)
            optimiser = lbfgs(self.polish_iter, False)
            optimiser.step(closure)
            iterations += int(optimiser.state[u].get("n_iter", 0))
        return best["z"], best["value"], best["gmax"], counts["start"], iterations, counts["evaluations"]

    def _failure(self, m, S, final, start, gmax):
        """(reason, detail) when the minimiser must not be returned, else None (one host read)."""
        _, info = torch.linalg.cholesky_ex(S)
        finite = torch.isfinite(m).all() & torch.isfinite(S).all() & torch.isfinite(final)
        spd = (info == 0).all()
        # The start μ^k has W₂² = 0, so the objective there is τF(μ^k); a minimiser can only be lower.
        slack = 64 * torch.finfo(_WORK_DTYPE).eps * start.abs().clamp_min(1.0)
        descended = final <= start + slack
        flags = torch.stack([finite, spd, descended, gmax <= self.tol]).tolist()
        if not flags[0]:
            return "non-finite Gaussian parameters", "the inner minimisation diverged; use a smaller time step"
        if not flags[1]:
            return "covariance left the SPD cone", "the minimiser's covariance is not positive definite in the state's dtype"
        if not flags[2]:
            return (
                "JKO objective increased",
                f"½W₂² + τF went from {float(start):.12g} at μ^k to {float(final):.12g}; use a smaller time step",
            )
        if not flags[3]:
            return (
                "inner minimisation did not converge",
                f"max gradient entry {float(gmax):.3g} > tol = {self.tol:.3g}; raise max_iter (now {self.max_iter}), "
                "loosen tol, or use a smaller time step",
            )
        return None


@measureflow.hookimpl
def measureflow_register_integrators(registry):
    registry.add_integrator("jko", JKO)
