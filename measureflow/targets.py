"""Targets of the gradient-flow fields: a measure, a state or samples, normalised once.

A field that pulls a state toward β (MATH.md §3–§9) accepts β as a measureflow.measures
Gaussian / GaussianMixture / Empirical, a Particles state or a tensor of samples (optionally
weighted); :func:`as_target` turns any of them into a :class:`Target` whose tensors are converted to
the state's dtype and device once, never inside the step loop. The small argument checks the fields
share live here too (metadata only: none reads data back from the device).
"""

from __future__ import annotations

import attrs
import torch

from .errors import CapabilityError, ParameterError, ShapeError, StateError
from .measures import Empirical, Gaussian, GaussianMixture
from .state import Gaussians, Particles, as_tensor
from .validators import check_int, check_positive

__all__ = ["Target", "as_target", "check_replicas", "check_state", "check_points", "gaussian_target", "positive"]


def positive(value, name: str, where: str) -> float:
    """A finite positive Python float, or a ParameterError naming ``name`` (:func:`measureflow.validators.check_positive`)."""
    return check_positive(value, name, where)


def check_points(x: torch.Tensor, dim: int | None, where: str) -> None:
    """Query points must be a floating (R, N', d) tensor with the field's d (metadata only, no sync)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ShapeError(f"{where}: x must be a floating-point tensor of shape (R, N', d); received {type(x).__name__}")
    if x.ndim != 3 or (dim is not None and x.shape[-1] != dim):
        want = "(R, N', d)" if dim is None else f"(R, N', {dim})"
        raise ShapeError(f"{where}: x must have shape {want}; received {tuple(x.shape)}")


def _dim_mismatch(dim: int, d: int, where: str) -> ShapeError:
    return ShapeError(f"{where}: the target has dimension d = {dim} but the state has d = {d}")


def gaussian_target(target) -> Gaussian | None:
    """The target as a Gaussian (a one-component mixture with a density counts), None when it is not one."""
    if isinstance(target, Gaussian):
        return target
    if isinstance(target, GaussianMixture) and target.components == 1 and target.has_density:
        return Gaussian(target.means[0], target.covs[0])
    return None


@attrs.frozen(eq=False)
class Target:
    """β as the fields use it: atoms and/or an analytic law, moments, per-(dtype, device) copies.

    ``points`` (R_β, M, d) with ``weights`` (R_β, M) or None (uniform); ``law`` a Gaussian or
    GaussianMixture (None for samples). R_β is 1 (shared) or the state's R. ``owner`` names the
    field in messages.
    """

    points: torch.Tensor | None
    weights: torch.Tensor | None
    law: Gaussian | GaussianMixture | None
    dim: int
    replicas: int
    owner: str = "target"
    _copies: dict = attrs.field(factory=dict, init=False, repr=False)

    @property
    def has_samples(self) -> bool:
        return self.points is not None

    @property
    def gaussian_law(self) -> Gaussian | None:
        """The analytic law as a Gaussian (a one-component mixture with a density counts), else None."""
        if "gaussian_law" not in self._copies:
            self._copies["gaussian_law"] = None if self.law is None else gaussian_target(self.law)
        return self._copies["gaussian_law"]

    @property
    def is_gaussian(self) -> bool:
        return self.gaussian_law is not None

    def check_dim(self, d: int) -> None:
        """The state's dimension ``d`` is the target's."""
        if d != self.dim:
            raise _dim_mismatch(self.dim, d, self.owner)

    def samples(self, like: torch.Tensor, replicas: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(y (R_β, M, d), q (R_β, M)) in ``like``'s dtype and device, uniform q filled in; R_β is 1 or
        ``replicas``. A CapabilityError when β is analytic and no sample of it was drawn."""
        if not self.has_samples:
            law = type(self.law).__name__
            why = (", whose closed-form map is the OT map only from a Gaussian μ" if self.is_gaussian
                   else "") + "."
            raise CapabilityError(
                f"{self.owner}: particles need target samples, but the target is an analytic {law}{why} Pass "
                "samples: Empirical(target.sample(M, generator))"
                + (", or run a Gaussians state." if self.is_gaussian else ".")
            )
        self.check_dim(like.shape[-1])
        check_replicas(self, replicas, self.owner)
        key = ("samples", like.dtype, like.device)
        hit = self._copies.get(key)
        if hit is None:
            y, q = self.tensors(like)
            q = torch.full(y.shape[:2], 1.0 / y.shape[1], dtype=y.dtype, device=y.device) if q is None else q
            hit = self._copies[key] = (y, q)
        return hit

    def gaussian(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m_β (d,), Σ_β (d, d)) of a Gaussian target in ``like``'s dtype and device; a CapabilityError
        for samples or a mixture, toward which a Gaussian state does not stay Gaussian."""
        if not self.is_gaussian:
            given = ("given by samples" if self.law is None
                     else f"a {type(self.law).__name__} with {self.law.components} components")
            raise CapabilityError(
                f"{self.owner}: a Gaussians state needs a Gaussian target (measureflow.measures.Gaussian); the "
                f"target is {given}, toward which a Gaussian does not stay Gaussian. Run Particles instead."
            )
        self.check_dim(like.shape[-1])
        key = ("gaussian", like.dtype, like.device)
        hit = self._copies.get(key)
        if hit is None:
            law = self.gaussian_law.to(dtype=like.dtype, device=like.device)
            hit = self._copies[key] = (law.mean(), law.covariance())
        return hit

    def tensors(self, like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(points, weights) in ``like``'s dtype and device, converted once."""
        key = ("points", like.dtype, like.device)
        hit = self._copies.get(key)
        if hit is None:
            move = (lambda t: None if t is None else t.to(dtype=like.dtype, device=like.device))
            hit = self._copies[key] = (move(self.points), move(self.weights))
        return hit

    def components(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The analytic law as mixture parts: means (K, d), covariances (K, d, d), weights (K,)."""
        key = ("law", like.dtype, like.device)
        hit = self._copies.get(key)
        if hit is None:
            law = self.law.to(dtype=like.dtype, device=like.device)
            if isinstance(law, Gaussian):
                hit = (law.mean()[None], law.cov[None], torch.ones(1, dtype=like.dtype, device=like.device))
            else:
                hit = (law.means, law.covs, law.weights)
            self._copies[key] = hit
        return hit

    def moments(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (R_β, d) and covariance (R_β, d, d) in ``like``'s dtype and device."""
        key = ("moments", like.dtype, like.device)
        hit = self._copies.get(key)
        if hit is None:
            if self.law is not None:
                law = self.law.to(dtype=like.dtype, device=like.device)
                hit = (law.mean()[None], law.covariance()[None])
            else:
                y, q = self.tensors(like)
                q = torch.full(y.shape[:2], 1.0 / y.shape[1], dtype=y.dtype, device=y.device) if q is None else q
                m = torch.einsum("rm,rmd->rd", q, y)
                c = y - m[:, None]
                hit = (m, torch.einsum("rm,rma,rmb->rab", q, c, c))
            self._copies[key] = hit
        return hit

    def describe(self) -> dict:
        if self.law is not None:
            kind = type(self.law).__name__
            return {"kind": kind, "dim": self.dim, "samples": None if self.points is None else self.points.shape[1]}
        return {"kind": "samples", "dim": self.dim, "size": self.points.shape[1], "replicas": self.replicas,
                "weighted": self.weights is not None}


def _sample_weights(weights, y: torch.Tensor, where: str) -> torch.Tensor:
    """Weights (M,) or (R_β, M) for the points y (R_β, M, d), checked by Particles (shape, sign, sum)."""
    q = as_tensor(weights, dtype=y.dtype, device=y.device, name=f"{where}: weights")
    if q.ndim == 1:
        q = q[None]
    # Particles names what is wrong with a weight vector; a shared row is checked against every set of points.
    try:
        return Particles(y, q.expand(y.shape[0], -1) if q.ndim == 2 and q.shape[0] == 1 else q).weights
    except (ShapeError, StateError) as exc:
        raise type(exc)(
            f"{where}: the target weights must be (M,) or (R, M), non-negative, summing to 1 per set of samples "
            f"({exc})"
        ) from None


def as_target(target, where: str, *, weights=None, samples: int | None = None, seed: int = 0,
              mixtures: bool = True, arrays: bool = False) -> Target:
    """Normalise a target (measure, Particles or tensor of samples) for a field.

    ``weights`` (M,) or (R, M) weigh samples given as a tensor (measures and states carry their own);
    ``samples`` > 0 also draws that many points of an analytic law once, from
    ``torch.Generator().manual_seed(seed)``; ``mixtures=False`` refuses a mixture of several components
    (for fields whose analytic path needs a single Gaussian); ``arrays=True`` also reads array-likes
    (numpy, nested lists) as samples. ``where`` names the field in every message.
    """
    seed = check_int(seed, "seed", where, minimum=0)
    if samples is not None:
        samples = check_int(samples, "samples", where, advice="Pass the number of points to draw from an analytic target (≥ 1), or None.")
    if isinstance(target, (Gaussian, GaussianMixture)):
        if weights is not None:
            raise ParameterError(
                f"{where}: weights are for target samples; a {type(target).__name__} target takes none"
            )
        if not mixtures and gaussian_target(target) is None:
            raise ParameterError(
                f"{where}: a Gaussian-mixture target with {target.components} components has no closed form in "
                "this field, which needs a single Gaussian; pass samples of it instead, e.g. "
                "Empirical(mixture.sample(M, generator))"
            )
        points = None
        if samples is not None:
            generator = torch.Generator(device=target.device).manual_seed(int(seed))
            points = target.sample(samples, generator)[None]
        return Target(points, None, target, target.dim, 1, where)
    if samples is not None:
        raise ParameterError(f"{where}: samples= draws from an analytic target; the target given is already samples")
    if isinstance(target, (Empirical, Particles)) and weights is not None:
        raise ParameterError(
            f"{where}: a{'n' if isinstance(target, Empirical) else ''} {type(target).__name__} target carries its "
            "own weights; do not pass weights"
        )
    if isinstance(target, Empirical):
        w = None if target.weights is None else target.weights[None]
        return Target(target.points[None], w, None, target.dim, 1, where)
    if isinstance(target, Particles):
        return Target(target.x, target.weights, None, target.dim, target.replicas, where)
    if arrays and not isinstance(target, (torch.Tensor, Gaussians, str, bytes)) and target is not None:
        try:
            target = as_tensor(target, name=f"{where}: target")
        except StateError as exc:
            raise ParameterError(f"{where}: cannot read the target as points ({exc})") from None
    if isinstance(target, torch.Tensor):
        if not target.is_floating_point() or target.ndim not in (2, 3) or 0 in target.shape:
            raise ShapeError(
                f"{where}: target samples must be a floating tensor of shape (M, d) or (R, M, d); received shape "
                f"{tuple(target.shape)} and dtype {target.dtype}"
            )
        if not bool(torch.isfinite(target).all()):
            raise ParameterError(f"{where}: target samples must be finite")
        y = target if target.ndim == 3 else target[None]
        q = None if weights is None else _sample_weights(weights, y, where)
        return Target(y, q, None, y.shape[-1], y.shape[0], where)
    raise ParameterError(
        f"{where}: target must be a measureflow.measures Gaussian, GaussianMixture or Empirical, a Particles state or "
        f"{'an array' if arrays else 'a tensor'} of samples (M, d) / (R, M, d); received {type(target).__name__}"
    )


def check_replicas(target: Target, R: int, where: str) -> None:
    """The target has one replica (shared) or the state's R."""
    if target.replicas not in (1, R):
        raise ShapeError(
            f"{where}: the target has {target.replicas} replicas (sets of samples) but the state has R = {R}; give "
            "one target shared by every replica, samples (M, d), or exactly one per replica, samples (R, M, d)"
        )


def check_state(state, dim: int, where: str, kind=None) -> None:
    """The state is a Particles/Gaussians of the field's dimension (metadata only, no sync)."""
    kinds = (Particles, Gaussians) if kind is None else (kind,)
    if not isinstance(state, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise CapabilityError(f"{where}: expected a measureflow {names} state; received {type(state).__name__}")
    if state.dim != dim:
        raise _dim_mismatch(dim, state.dim, where)
