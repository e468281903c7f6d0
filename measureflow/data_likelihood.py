"""Log-likelihood and bits per dimension of data under a flow (MATH.md §15.1), exposed as
:func:`measureflow.likelihood`.

A flow that generates from noise (noising convention: data at t = 0, noise N(0, σ²I) at t = 1) gives
data points x the density

    log p(x) = log p_noise(x₁) + ∫_{t_min}^{1} ∇·vₜ(xₜ) dt,     xₜ from ẋ = vₜ(x), x_{t_min} = x,

which the engine computes by running x forward with the log-density channel (whose value at the noise
end is −∫∇·v dt). Bits per dimension are −log₂ p(x)/d. Any field works — an exact one with a
declared or autograd divergence, a ``learned`` network — with the exact trace or Hutchinson's
estimator; the points are processed in batches, with a progress bar.

A flow in another orientation (a source law at t = 0 and data at t = 1, as in ``learned_moons``) is
the same computation with ``t0=1, t1=0`` and the source law as ``noise=``.
"""

from __future__ import annotations

import math

import attrs
import torch

from .errors import MeasureflowError, ShapeError
from .run.operations import progress_enabled
from .state import Particles

__all__ = ["likelihood", "LikelihoodResult"]


@attrs.frozen(eq=False)
class LikelihoodResult:
    """Per-point ``log_prob`` (n,) (natural log) and ``bits_per_dim`` (n,) of the data, the times
    ``t0`` → ``t1`` integrated, and ``nfev`` (field evaluations, all batches)."""

    log_prob: torch.Tensor
    bits_per_dim: torch.Tensor
    t0: float
    t1: float
    nfev: int

    @property
    def mean_log_prob(self) -> float:
        return float(self.log_prob.mean())

    @property
    def mean_bits_per_dim(self) -> float:
        """Bits per dimension of the whole data set, −E[log₂ p(x)]/d."""
        return float(self.bits_per_dim.mean())


def _ends(field, t0, t1):
    lo, hi = getattr(field, "time_range", (-math.inf, math.inf))
    if t0 is None:
        t0 = max(0.0, lo)
    if t1 is None:
        t1 = min(1.0, hi)
    return float(t0), float(t1)


def _noise_log_density(field, noise, sigma):
    if noise is not None:
        if not callable(getattr(noise, "log_density", None)):
            raise MeasureflowError(f"likelihood: noise must be a measure with log_density(x); received {type(noise).__name__}")
        return noise.log_density
    if sigma is None:
        sigma = getattr(field, "sigma", None) or 1.0
    sigma = float(sigma)

    def log_normal(x):
        d = x.shape[-1]
        return -0.5 * (x * x).sum(-1) / sigma**2 - d * math.log(sigma) - 0.5 * d * math.log(2 * math.pi)

    return log_normal


def likelihood(field, x, *, noise=None, sigma: float | None = None, t0: float | None = None, t1: float | None = None,
               integrator="dopri5", steps: int = 1, times=None, log_density: str = "exact", probes: int = 1,
               probe: str = "rademacher", seed: int = 0, batch_size: int = 4096, progress: bool | None = None,
               dtype=None) -> LikelihoodResult:
    """log p(x) and bits per dimension of data ``x`` (n, d) under the flow of ``field`` (module docstring).

    Parameters
    ----------
    field:
        a field object or registered name (a flow: no diffusion term).
    x:
        data points (n, d).
    noise, sigma:
        the law at the noise end: a measure with ``log_density`` (e.g. a
        :class:`~measureflow.measures.GaussianMixture` source), or N(0, σ²I) with σ = ``sigma``, else the
        field's own ``sigma``, else 1.
    t0, t1:
        the data end and the noise end of the integration (default: the field's time range clipped to
        [0, 1]: t0 = its t_min).
    integrator, steps, times:
        the solver (default adaptive ``dopri5``) and the number of output intervals, or an explicit
        time grid from t0 to t1 (e.g. geometric near a singular end; it then sets t0 and t1).
    log_density, probes, probe:
        ``"exact"`` divergence or ``"hutchinson"`` with ``probes`` probes (see :mod:`measureflow.density`).
    seed:
        seeds the Hutchinson probes (batch i uses seed + i).
    batch_size:
        points integrated together (one replica of a local field: the batch is not a measure).
    progress:
        a progress bar over the batches (None: on an interactive terminal).
    """
    from .plugins import get_registry
    from .simulation import Simulation

    if isinstance(field, str):
        field = get_registry().field(field)
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ShapeError(f"likelihood: x must have shape (n, d); received {tuple(x.shape)}")
    if dtype is not None:
        x = x.to(dtype)
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if int(batch_size) < 1:
        raise MeasureflowError(f"likelihood: batch_size must be a positive integer; received {batch_size!r}")
    if times is not None:
        times = [float(t) for t in times]
        t0, t1 = times[0], times[-1]
    t0, t1 = _ends(field, t0, t1)
    log_noise = _noise_log_density(field, noise, sigma)
    n, d = x.shape
    batches = list(torch.split(x, int(batch_size)))
    bar = None
    if progress_enabled(progress) and len(batches) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="likelihood", unit="pt")
    out, nfev = [], 0
    try:
        for i, batch in enumerate(batches):
            grid = dict(times=times) if times is not None else dict(t0=t0, t1=t1, steps=steps)
            sim = Simulation(Particles(batch[None]), field, integrator, **grid,
                             log_density=log_density, probes=probes, probe=probe, seed=seed + i, progress=False,
                             blowup=None)
            result = sim.run()
            if not result.ok:
                raise MeasureflowError(f"likelihood: the flow from t = {t0:g} to {t1:g} did not complete ({result.status})")
            end = result.state
            # The channel holds log ρ_{t1}(x_{t1}) − log ρ_{t0}(x): log p(x) = log p_noise(x_{t1}) − channel.
            out.append((log_noise(end.x[0]).to(end.x.dtype) - end.log_density[0]).detach())
            nfev += int(result.integrator_stats.get("nfev", 0))
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    log_prob = torch.cat(out)
    return LikelihoodResult(log_prob=log_prob, bits_per_dim=-log_prob / (d * math.log(2.0)), t0=t0, t1=t1, nfev=nfev)
