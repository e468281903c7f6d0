"""The log-density channel: instantaneous change of variables along a flow (MATH.md §15.1).

Particles moving by ẋ = vₜ(x) carry the log-density of the law they sample along their own path,

    d/dt log ρₜ(xₜ) = −∇·vₜ(xₜ),

so a run with ``Simulation(..., log_density="exact")`` (or ``"hutchinson"``) integrates, for every
particle, log ρₜ(xₜ) = log ρ₀(x₀) − ∫ ∇·v dt together with the positions, with the same solver steps.
The value starts from the state's own ``log_density`` channel when it holds one
(``Particles(x, channels={"log_density": law.log_density(x)})``) and from 0 otherwise (the channel
is then the change log ρₜ(xₜ) − log ρ₀(x₀)). It is read as ``result.state.log_density`` (R, N) and
written per frame to ``/particles/trajectory/log_density`` of an H5MD file.

The divergence is the trace of the Jacobian of the velocity with respect to the **query point**
(a mean-field field's measure argument is held fixed, as in the continuity equation):

* a field that declares ``divergence(t, x, state) -> (R, N)`` (closed form) is trusted; it may
  return None where it has no closed form (e.g. ``flow_matching`` between mixtures);
* ``"exact"`` — d vector–Jacobian products by autograd, tr ∇v = Σₖ ∂vₖ/∂xₖ;
* ``"hutchinson"`` — ∇·v ≈ (1/k) Σⱼ εⱼᵀ(∇v)εⱼ with k = ``probes`` probes per particle, Rademacher
  (default) or Gaussian, drawn once per output step from the run's noise stream (unbiased; a probe
  is held fixed over a step so that the solver's stages and error estimate see one smooth
  right-hand side, and the noise stream is checkpointed, so ``--resume`` is bit-identical).
"""

from __future__ import annotations

import torch

from .errors import CapabilityError, MeasureflowError
from .fields import capabilities
from .integrators import Channel, standard_normal

__all__ = ["LogDensity", "divergence", "velocity_and_divergence", "LOG_DENSITY_MODES", "PROBE_KINDS",
           "check_log_density"]

LOG_DENSITY_MODES = ("exact", "hutchinson")
PROBE_KINDS = ("rademacher", "gaussian")


def _name(field) -> str:
    return getattr(field, "name", type(field).__name__)


def _declared(field):
    method = getattr(field, "divergence", None)
    return method if callable(method) else None


def check_log_density(field, state, mode, probes: int, probe: str) -> None:
    """Refuse a log-density request that cannot run, with a one-line error naming the fix."""
    from .state import state_kind

    if mode not in LOG_DENSITY_MODES:
        raise MeasureflowError(f"log_density must be one of {list(LOG_DENSITY_MODES)} or None; received {mode!r}")
    if state_kind(state) == "gaussians":
        raise CapabilityError(
            "log_density on a Gaussians state: the density is the closed form log N(x; m_t, Σ_t) — evaluate "
            "measureflow.measures.Gaussian(result.state.mean[r], result.state.cov[r]).log_density(x) instead"
        )
    if "diffusion" in capabilities(field):
        raise CapabilityError(
            f"field {_name(field)!r} has a noise term, and d log ρ/dt = −∇·v holds for a deterministic flow only; "
            "use its probability-flow field for log_density"
        )
    if isinstance(probes, bool) or int(probes) != probes or int(probes) < 1:
        raise MeasureflowError(f"probes must be a positive integer; received {probes!r}")
    if probe not in PROBE_KINDS:
        raise MeasureflowError(f"probe must be one of {list(PROBE_KINDS)}; received {probe!r}")


def _query(field, t, x, state):
    """v at query points x + z (z = 0, a leaf) so that ∂/∂z is the Jacobian in the query point only,
    while the graph from x (backprop through a run) is kept; z is x itself when x carries no graph."""
    if x.requires_grad:
        z = torch.zeros_like(x, requires_grad=True)
        query = x + z
    else:
        # No graph to keep: x itself is the leaf, sparing an addition and its backward in each of the d passes.
        z = query = x.detach().requires_grad_(True)
    try:
        v = field.velocity(t, query, state)
        if not v.requires_grad:
            raise RuntimeError("no autograd path")
    except (RuntimeError, MeasureflowError) as exc:
        if isinstance(exc, CapabilityError):
            raise
        raise CapabilityError(
            f"field {_name(field)!r} has no autograd path for its divergence ({str(exc).splitlines()[0][:120]}); "
            "give it a divergence(t, x, state) method, or use a field built from differentiable torch operations"
        ) from None
    return z, v


def velocity_and_divergence(field, t, x, state, *, probes=None, create_graph: bool = False):
    """(v, ∇·v) at x (R, N, d) → (R, N, d), (R, N). ``probes`` (k, R, N, d) selects the Hutchinson
    estimate; None the exact trace (or the field's declared ``divergence``)."""
    declared = _declared(field)
    if declared is not None:
        div = declared(t, x, state)
        if div is not None:
            return field.velocity(t, x, state), div
    with torch.enable_grad():
        z, v = _query(field, t, x, state)
        d = x.shape[-1]
        if probes is None:
            div = None
            for k in range(d):
                # The last pass frees the graph's buffers unless the run differentiates through it.
                keep = create_graph or k + 1 < d
                (g,) = torch.autograd.grad(v[..., k].sum(), z, retain_graph=keep, create_graph=create_graph)
                div = g[..., k] if div is None else div + g[..., k]
        else:
            total = None
            count = probes.shape[0]
            for j in range(count):
                eps = probes[j]
                (g,) = torch.autograd.grad((v * eps).sum(), z, retain_graph=create_graph or j + 1 < count,
                                           create_graph=create_graph)
                part = (g * eps).sum(-1)
                total = part if total is None else total + part
            div = total / count
    if not create_graph:
        v, div = v.detach(), div.detach()
    return v, div


def divergence(field, t, x, state, *, probes=None) -> torch.Tensor:
    """∇·vₜ(x), shape (R, N) (see :func:`velocity_and_divergence`)."""
    return velocity_and_divergence(field, t, x, state, probes=probes)[1]


class LogDensity(Channel):
    """The channel ``log_density``: d/dt log ρₜ(xₜ) = −∇·vₜ(xₜ) (module docstring, MATH.md §15.1).

    Parameters
    ----------
    mode:
        ``"exact"`` (trace by autograd, or the field's declared divergence) or ``"hutchinson"``.
    probes:
        Hutchinson probes per particle (k).
    probe:
        ``"rademacher"`` (±1, default) or ``"gaussian"``.
    noise:
        the run's noise stream, which the probes are drawn from (:meth:`draw`).
    create_graph:
        keep the autograd graph through the divergence (``gradient="backprop"``).
    """

    name = "log_density"

    def __init__(self, mode: str = "exact", probes: int = 1, probe: str = "rademacher", noise=None,
                 create_graph: bool = False):
        self.mode = mode
        self.probes = int(probes)
        self.probe = probe
        self.noise = noise
        self.create_graph = bool(create_graph)
        self._current = None

    def initial(self, state) -> torch.Tensor:
        return torch.zeros(state.x.shape[:2], dtype=state.dtype, device=state.device)

    def draw(self, like: torch.Tensor) -> None:
        """New probes (k, R, N, d) from the run's noise stream, held for the next output step."""
        if self.mode != "hutchinson":
            return
        R, N, d = like.shape
        # The stream draws along the replica axis first (packed runs own blocks of replicas).
        xi = standard_normal((R, self.probes, N, d), like, self.noise).transpose(0, 1)
        self._current = torch.sign(xi) if self.probe == "rademacher" else xi

    def rate(self, field, t, state, velocity):
        return -self.velocity_and_rate(field, t, state.x, state)[1]

    def velocity_and_rate(self, field, t, x, state):
        probes = None
        if self.mode == "hutchinson":
            if self._current is None or self._current.shape[1:] != x.shape:
                self.draw(x)
            probes = self._current
        v, div = velocity_and_divergence(field, t, x, state, probes=probes, create_graph=self.create_graph)
        return v, -div

    def describe(self) -> dict:
        out = {**super().describe(), "mode": self.mode}
        if self.mode == "hutchinson":
            out.update(probes=self.probes, probe=self.probe)
        return out
