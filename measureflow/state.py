"""Simulation states: weighted particles and Gaussian parameters.

Conventions follow MATH.md §0: a particle state is the measure μ = Σᵢ wᵢ δ_{xᵢ} (weights
change during a run only under the Fisher–Rao / WFR geometries of MATH.md §15.6), a Gaussian state is μ = N(m, Σ). A particle state may also carry auxiliary
**channels** — one value (or vector) per particle integrated along with the positions, such as a
log-density or an action (:class:`measureflow.integrators.Channel`): ``state.channels[name]``, also
readable as ``state.<name>``. Both carry R independent replicas in a
leading batch dimension so that many simulations advance as one tensor operation.

Validation happens at construction (the boundary where a user hands data in). Integrators build
new states through :meth:`Particles.with_positions` / :meth:`Gaussians.with_parameters`, which skip
validation so that a step never forces a device→host synchronisation.
"""

from __future__ import annotations

import copy

import attrs
import torch

from .errors import ShapeError, StateError
from .linalg import as_tensor, symmetrize

__all__ = ["Particles", "Gaussians", "GaussianMixtures", "State", "as_tensor"]


def _positions(value) -> torch.Tensor:
    x = as_tensor(value, name="Particles.x")
    if x.ndim == 2:
        # A single replica given as (N, d) is common enough to accept.
        x = x.unsqueeze(0)
    if x.ndim != 3:
        raise ShapeError(
            f"Particles.x must have shape (R, N, d) (replicas, particles, dimensions); "
            f"received shape {tuple(x.shape)}. Pass x[None] for a single replica."
        )
    if not x.is_floating_point():
        raise StateError(f"Particles.x must be a floating-point tensor, received dtype {x.dtype}")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ShapeError(f"Particles.x needs at least one particle and one dimension; received {tuple(x.shape)}")
    _check_finite(x, "Particles.x", "positions")
    return x


def _check_finite(values: torch.Tensor, name: str, what: str, bad: torch.Tensor | None = None) -> None:
    """Refuse NaN/inf in ``values`` (or wherever ``bad`` is true), naming the first offending entry.

    One device→host read at construction, the boundary where data comes in; a step never builds a
    checked state (see the module docstring)."""
    if bad is None:
        bad = ~torch.isfinite(values)
    if not bool(bad.any()):
        return
    index = tuple(int(i) for i in bad.nonzero()[0])
    shown = float(values[index]) if values.ndim == len(index) else values[index]
    raise StateError(
        f"{name} must be finite; entry {list(index)} of the {what} is {shown}. Remove or replace non-finite "
        "values before building the state"
    )


def _shallow_copy(state):
    """``copy.copy`` of a slotted attrs state, written out: a compiled solver step
    (:class:`~measureflow.integrators.CompiledStep`) builds its stage states inside the traced
    graph, and torch.compile cannot trace copy's ``__reduce_ex__`` path through a class with slots
    and a ``__getattr__``."""
    new = object.__new__(type(state))
    for attribute in type(state).__attrs_attrs__:
        object.__setattr__(new, attribute.name, getattr(state, attribute.name))
    return new


@attrs.frozen(eq=False)
class Particles:
    """Weighted particles μ = Σᵢ wᵢ δ_{xᵢ}, batched over R replicas (MATH.md §0).

    Parameters
    ----------
    x:
        Positions, shape (R, N, d); an (N, d) array is read as one replica.
    weights:
        Optional weights, shape (R, N) (or (N,) shared by every replica), positive and summing to
        one in each replica. ``None`` means uniform weights 1/N, stored implicitly.
    """

    x: torch.Tensor = attrs.field(converter=_positions)
    weights: torch.Tensor | None = attrs.field(default=None)
    channels: dict = attrs.field(factory=dict, kw_only=True, converter=dict)

    def __attrs_post_init__(self):
        R, N, _ = self.x.shape
        for name, value in self.channels.items():
            if not isinstance(name, str) or not name.isidentifier() or name in ("x", "weights", "channels"):
                raise StateError(f"Particles: channel name {name!r} must be an identifier other than x, weights, channels")
            if not isinstance(value, torch.Tensor) or tuple(value.shape[:2]) != (R, N):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ShapeError(f"Particles: channel {name!r} must have shape (R, N, ...) = ({R}, {N}, ...); received {got}")
            if value.device != self.x.device:
                raise StateError(f"Particles: channel {name!r} is on {value.device} but x is on {self.x.device}")
            if value.is_floating_point():
                _check_finite(value, f"Particles channel {name!r}", "channel")
        if self.weights is None:
            return
        # Checked before any conversion: a silent copy across devices would hide the mistake.
        if isinstance(self.weights, torch.Tensor) and self.weights.device != self.x.device:
            raise StateError(
                f"Particles.weights is on {self.weights.device} but x is on {self.x.device}; "
                "move both to the same device"
            )
        w = as_tensor(self.weights, dtype=self.x.dtype, device=self.x.device, name="Particles.weights")
        R, N, _ = self.x.shape
        if w.ndim == 1:
            w = w.unsqueeze(0).expand(R, N) if w.shape[0] == N else w
        if tuple(w.shape) != (R, N):
            raise ShapeError(
                f"Particles.weights must have shape (R, N) = {(R, N)} to match x of shape "
                f"{tuple(self.x.shape)}; received {tuple(w.shape)}"
            )
        # NaN passes both `w < 0` and the sum test below (comparisons with NaN are false): test it first.
        _check_finite(w, "Particles.weights", "weights")
        if bool((w < 0).any()):
            raise StateError("Particles.weights must be non-negative")
        sums = w.sum(dim=1)
        tol = 1e-5 if w.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-10
        bad = (sums - 1).abs() > tol * max(1.0, N ** 0.5)
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0])
            raise StateError(
                f"Particles.weights must sum to one in every replica; replica {r} sums to "
                f"{float(sums[r]):.8g}. Normalise them with w / w.sum(dim=1, keepdim=True)."
            )
        object.__setattr__(self, "weights", w.contiguous())

    @classmethod
    def unchecked(cls, x: torch.Tensor, weights: torch.Tensor | None = None) -> "Particles":
        """Particles from a (R, N, d) tensor made inside a run (a batch of a training loop), without
        validation: no device→host read, and a NaN is left for the run's health record to report."""
        new = object.__new__(cls)
        object.__setattr__(new, "x", x)
        object.__setattr__(new, "weights", weights)
        object.__setattr__(new, "channels", {})
        return new

    # -- shape --------------------------------------------------------------------------------
    @property
    def replicas(self) -> int:
        return self.x.shape[0]

    @property
    def size(self) -> int:
        """Number of particles N in each replica."""
        return self.x.shape[1]

    @property
    def dim(self) -> int:
        return self.x.shape[2]

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    def weights_or_uniform(self) -> torch.Tensor:
        """Weights as an explicit (R, N) tensor (uniform 1/N when none were given)."""
        if self.weights is not None:
            return self.weights
        R, N, _ = self.x.shape
        return torch.full((R, N), 1.0 / N, dtype=self.x.dtype, device=self.x.device)

    # -- derived states -------------------------------------------------------------------------
    def with_positions(self, x: torch.Tensor) -> "Particles":
        """Same weights, new positions; no validation (used inside the step loop)."""
        new = _shallow_copy(self)
        object.__setattr__(new, "x", x)
        return new

    def with_weights(self, weights: torch.Tensor) -> "Particles":
        """Same positions, new weights (R, N); no validation (used inside the step loop when weights
        move, MATH.md §15.6; an unbalanced flow's weights need not sum to one)."""
        new = _shallow_copy(self)
        object.__setattr__(new, "weights", weights)
        return new

    def with_channels(self, channels: dict) -> "Particles":
        """Same positions and weights, these channels added or replaced; no validation (used inside
        the step loop)."""
        new = _shallow_copy(self)
        object.__setattr__(new, "channels", {**self.channels, **channels})
        return new

    def __getattr__(self, name):
        # Only reached when normal lookup fails: a channel read as an attribute (state.log_density).
        if not name.startswith("_"):
            try:
                channels = object.__getattribute__(self, "channels")
            except AttributeError:
                channels = {}
            if name in channels:
                return channels[name]
        raise AttributeError(f"'Particles' object has no attribute {name!r}")

    def to(self, device=None, dtype=None) -> "Particles":
        x = self.x.to(device=device, dtype=dtype)
        w = None if self.weights is None else self.weights.to(device=device, dtype=dtype)
        new = _shallow_copy(self)
        object.__setattr__(new, "x", x)
        object.__setattr__(new, "weights", w)
        object.__setattr__(new, "channels", {k: v.to(device=device, dtype=dtype) for k, v in self.channels.items()})
        return new

    def mean(self) -> torch.Tensor:
        """Weighted mean, shape (R, d)."""
        return torch.einsum("rn,rnd->rd", self.weights_or_uniform(), self.x)

    def covariance(self) -> torch.Tensor:
        """Weighted (population) covariance Σᵢ wᵢ (xᵢ − m)(xᵢ − m)ᵀ, shape (R, d, d)."""
        w = self.weights_or_uniform()
        centred = self.x - self.mean()[:, None, :]
        return torch.einsum("rn,rni,rnj->rij", w, centred, centred)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that define the state (for checkpoints and writers)."""
        out = {"x": self.x}
        if self.weights is not None:
            out["weights"] = self.weights
        for name, value in self.channels.items():
            out[f"channels/{name}"] = value
        return out

    def __repr__(self) -> str:
        R, N, d = self.x.shape
        weighted = "weighted" if self.weights is not None else "uniform"
        extra = f", channels={list(self.channels)}" if self.channels else ""
        return f"Particles(R={R}, N={N}, d={d}, {weighted}{extra}, dtype={self.dtype}, device={self.device})"


@attrs.frozen(eq=False)
class Gaussians:
    """Gaussian state μ = N(m, Σ), batched over R replicas (MATH.md §0, eq. 0.1).

    ``mean`` has shape (R, d) (or (d,)), ``cov`` shape (R, d, d) (or (d, d)); the covariance must be
    symmetric positive definite. An affine velocity v(x) = b + A(x − m) moves the state by
    ṁ = b, Σ̇ = AΣ + ΣAᵀ.
    """

    mean: torch.Tensor = attrs.field()
    cov: torch.Tensor = attrs.field()

    def __attrs_post_init__(self):
        m = as_tensor(self.mean, name="Gaussians.mean")
        c = as_tensor(self.cov, name="Gaussians.cov")
        if m.ndim == 1:
            m = m.unsqueeze(0)
        if c.ndim == 2:
            c = c.unsqueeze(0)
        if m.ndim != 2:
            raise ShapeError(f"Gaussians.mean must have shape (R, d); received {tuple(m.shape)}")
        if c.ndim != 3 or c.shape[-1] != c.shape[-2]:
            raise ShapeError(f"Gaussians.cov must have shape (R, d, d); received {tuple(c.shape)}")
        if c.shape[0] != m.shape[0] and m.shape[0] == 1:
            m = m.expand(c.shape[0], -1)
        if c.shape[0] != m.shape[0] and c.shape[0] == 1:
            c = c.expand(m.shape[0], -1, -1)
        if tuple(c.shape) != (m.shape[0], m.shape[1], m.shape[1]):
            raise ShapeError(
                f"Gaussians.cov must have shape (R, d, d) = {(m.shape[0], m.shape[1], m.shape[1])} "
                f"to match mean of shape {tuple(m.shape)}; received {tuple(c.shape)}"
            )
        if m.device != c.device:
            raise StateError(f"Gaussians.mean is on {m.device} but cov is on {c.device}; use one device")
        if m.dtype != c.dtype:
            raise StateError(f"Gaussians.mean has dtype {m.dtype} but cov has {c.dtype}; use one dtype")
        _check_finite(m, "Gaussians.mean", "mean")
        _check_finite(c, "Gaussians.cov", "covariance")
        asym = (c - c.transpose(-1, -2)).abs().amax(dim=(-1, -2))
        scale = c.abs().amax(dim=(-1, -2)).clamp_min(1e-30)
        tol = 1e-5 if c.dtype != torch.float64 else 1e-10
        if bool((asym > tol * scale).any()):
            r = int((asym > tol * scale).nonzero()[0, 0])
            raise StateError(
                f"Gaussians.cov must be symmetric; replica {r} has max |Σ − Σᵀ| = {float(asym[r]):.3g}. "
                "Symmetrise it with (S + S.T) / 2."
            )
        c = symmetrize(c)
        _, info = torch.linalg.cholesky_ex(c)
        if bool((info != 0).any()):
            r = int((info != 0).nonzero()[0, 0])
            eig = torch.linalg.eigvalsh(c[r])
            raise StateError(
                f"Gaussians.cov must be positive definite; replica {r} has smallest eigenvalue "
                f"{float(eig[0]):.6g}. Add a small multiple of the identity or fix the matrix."
            )
        object.__setattr__(self, "mean", m.contiguous())
        object.__setattr__(self, "cov", c.contiguous())

    @property
    def replicas(self) -> int:
        return self.mean.shape[0]

    @property
    def dim(self) -> int:
        return self.mean.shape[1]

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mean.dtype

    def with_parameters(self, mean: torch.Tensor, cov: torch.Tensor) -> "Gaussians":
        """New mean and covariance; no validation (used inside the step loop)."""
        new = _shallow_copy(self)
        object.__setattr__(new, "mean", mean)
        object.__setattr__(new, "cov", cov)
        return new

    def to(self, device=None, dtype=None) -> "Gaussians":
        return self.with_parameters(self.mean.to(device=device, dtype=dtype), self.cov.to(device=device, dtype=dtype))

    def covariance(self) -> torch.Tensor:
        return self.cov

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "cov": self.cov}

    def sample(self, n: int, generator: torch.Generator | None = None) -> Particles:
        """Draw n particles per replica: x = m + L z with Σ = L Lᵀ (reproducible from ``generator``)."""
        R, d = self.mean.shape
        z = torch.randn((R, n, d), generator=generator, dtype=self.dtype, device=self.device)
        chol = torch.linalg.cholesky(self.cov)
        return Particles(self.mean[:, None, :] + z @ chol.transpose(-1, -2))

    def __repr__(self) -> str:
        R, d = self.mean.shape
        return f"Gaussians(R={R}, d={d}, dtype={self.dtype}, device={self.device})"


def _batched(value, name: str, ndim: int) -> torch.Tensor:
    t = as_tensor(value, name=name)
    if t.ndim == ndim - 1:
        t = t.unsqueeze(0)  # one replica
    return t


@attrs.frozen(eq=False)
class GaussianMixtures:
    """Gaussian-mixture state ρ = Σₖ πₖ N(mₖ, Σₖ), batched over R replicas (MATH.md §15.7).

    Parameters
    ----------
    weights:
        πₖ, shape (R, K) (or (K,)): positive, summing to one in every replica.
    means:
        mₖ, shape (R, K, d) (or (K, d)).
    covs:
        Σₖ, shape (R, K, d, d) (or (K, d, d)): symmetric positive definite.

    A KL field moves it by variational inference as a Wasserstein gradient flow
    (:mod:`measureflow.mixtures`): fixed weights in the Wasserstein geometry, moving ones under
    ``geometry="wfr"`` or ``"fisher_rao"``.
    """

    weights: torch.Tensor = attrs.field()
    means: torch.Tensor = attrs.field()
    covs: torch.Tensor = attrs.field()

    def __attrs_post_init__(self):
        where = "GaussianMixtures"
        m = _batched(self.means, f"{where}.means", 3)
        c = _batched(self.covs, f"{where}.covs", 4)
        w = _batched(self.weights, f"{where}.weights", 2)
        if m.ndim != 3:
            raise ShapeError(f"{where}.means must have shape (R, K, d); received {tuple(m.shape)}")
        R, K, d = m.shape
        if tuple(c.shape) != (R, K, d, d):
            raise ShapeError(f"{where}.covs must have shape (R, K, d, d) = {(R, K, d, d)} to match means; received {tuple(c.shape)}")
        if tuple(w.shape) != (R, K):
            raise ShapeError(f"{where}.weights must have shape (R, K) = {(R, K)} to match means; received {tuple(w.shape)}")
        if not (m.device == c.device == w.device):
            raise StateError(f"{where}: weights, means and covs must be on one device")
        if not (m.dtype == c.dtype) or not m.is_floating_point():
            raise StateError(f"{where}: means and covs must share one floating dtype; received {m.dtype} and {c.dtype}")
        w = w.to(m.dtype)
        tol = 1e-5 if m.dtype != torch.float64 else 1e-10
        if bool((w <= 0).any()) or not bool(torch.isfinite(w).all()):
            raise StateError(f"{where}.weights must be positive and finite; received {w.tolist()}")
        sums = w.sum(-1)
        if bool(((sums - 1).abs() > tol * max(1.0, K ** 0.5)).any()):
            r = int(((sums - 1).abs() > tol * max(1.0, K ** 0.5)).nonzero()[0, 0])
            raise StateError(
                f"{where}.weights must sum to one in every replica; replica {r} sums to {float(sums[r]):.8g}. "
                "Normalise them with w / w.sum(-1, keepdim=True)."
            )
        asym = (c - c.transpose(-1, -2)).abs().amax(dim=(-1, -2))
        scale = c.abs().amax(dim=(-1, -2)).clamp_min(1e-30)
        if bool((asym > tol * scale).any()):
            r, k = (asym > tol * scale).nonzero()[0].tolist()
            raise StateError(f"{where}.covs must be symmetric; component {k} of replica {r} is not")
        c = symmetrize(c)
        _, info = torch.linalg.cholesky_ex(c)
        if bool((info != 0).any()):
            r, k = (info != 0).nonzero()[0].tolist()
            eig = torch.linalg.eigvalsh(c[r, k])
            raise StateError(
                f"{where}.covs must be positive definite; component {k} of replica {r} has smallest eigenvalue "
                f"{float(eig[0]):.6g}"
            )
        object.__setattr__(self, "weights", w.contiguous())
        object.__setattr__(self, "means", m.contiguous())
        object.__setattr__(self, "covs", c.contiguous())

    @property
    def replicas(self) -> int:
        return self.means.shape[0]

    @property
    def components(self) -> int:
        """K, the number of components."""
        return self.means.shape[1]

    size = components

    @property
    def dim(self) -> int:
        return self.means.shape[2]

    @property
    def device(self) -> torch.device:
        return self.means.device

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    def with_parameters(self, weights, means, covs) -> "GaussianMixtures":
        """New weights, means and covariances; no validation (used inside the step loop)."""
        new = _shallow_copy(self)
        object.__setattr__(new, "weights", weights)
        object.__setattr__(new, "means", means)
        object.__setattr__(new, "covs", covs)
        return new

    def to(self, device=None, dtype=None) -> "GaussianMixtures":
        return self.with_parameters(*(t.to(device=device, dtype=dtype) for t in (self.weights, self.means, self.covs)))

    def mean(self) -> torch.Tensor:
        """Σₖ πₖ mₖ, shape (R, d)."""
        return torch.einsum("rk,rkd->rd", self.weights, self.means)

    def covariance(self) -> torch.Tensor:
        """Σₖ πₖ (Σₖ + mₖmₖᵀ) − m̄m̄ᵀ, shape (R, d, d)."""
        m = self.mean()
        second = torch.einsum("rk,rkij->rij", self.weights, self.covs + self.means[..., :, None] * self.means[..., None, :])
        return second - m[:, :, None] * m[:, None, :]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weights": self.weights, "means": self.means, "covs": self.covs}

    def sample(self, n: int, generator: torch.Generator | None = None) -> Particles:
        """n particles per replica: a component drawn by πₖ, then mₖ + Lₖz (reproducible from ``generator``)."""
        R, K, d = self.means.shape
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (R, n)
        z = torch.randn((R, n, d), generator=generator, dtype=self.dtype, device=self.device)
        chol = torch.linalg.cholesky(self.covs)
        L = torch.gather(chol, 1, idx[:, :, None, None].expand(R, n, d, d))
        mu = torch.gather(self.means, 1, idx[:, :, None].expand(R, n, d))
        return Particles(mu + (L @ z[..., None])[..., 0])

    def __repr__(self) -> str:
        R, K, d = self.means.shape
        return f"GaussianMixtures(R={R}, K={K}, d={d}, dtype={self.dtype}, device={self.device})"


State = Particles | Gaussians | GaussianMixtures


def state_from_tensors(kind: str, tensors: dict[str, torch.Tensor]) -> State:
    """Rebuild a state from :meth:`tensors` output (used by checkpoints)."""
    if kind == "particles":
        channels = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("channels/")}
        state = Particles(tensors["x"], channels=channels)
        # Saved weights are the run's own: an unbalanced flow's need not sum to one (MATH.md §15.6).
        return state if "weights" not in tensors else state.with_weights(tensors["weights"])
    if kind == "gaussians":
        return Gaussians(tensors["mean"], tensors["cov"])
    if kind == "mixtures":
        return GaussianMixtures(tensors["weights"], tensors["means"], tensors["covs"])
    raise StateError(f"unknown state kind {kind!r}; expected 'particles', 'gaussians' or 'mixtures'")


def state_kind(state) -> str:
    if isinstance(state, Particles):
        return "particles"
    if isinstance(state, Gaussians):
        return "gaussians"
    if isinstance(state, GaussianMixtures):
        return "mixtures"
    raise StateError(
        "expected a measureflow.Particles or measureflow.Gaussians state (or measureflow.GaussianMixtures), "
        f"received {type(state).__name__}"
    )
