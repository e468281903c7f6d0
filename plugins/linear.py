"""Affine fields with known Gaussian solutions: the engine's reference dynamics.

``linear``
    v(x) = b + A x with constant A ∈ R^{d×d}, b ∈ R^d. Gaussian closure (MATH.md eq. 0.1) with
    respect to the state mean m: v(x) = (b + A m) + A (x − m), hence
        m(t) = e^{(t−t0)A} m0 + ∫_{t0}^{t} e^{(t−s)A} b ds,   Σ(t) = e^{(t−t0)A} Σ0 e^{(t−t0)Aᵀ}.
    When A is symmetric the field is −∇U with U(x) = −½ xᵀAx − bᵀx and its energy is E_μ[U].

``ornstein_uhlenbeck``
    dX = −θ (X − c) dt + σ dW. The law's velocity (probability flow) is
    v(x) = −θ (x − c) − ½σ² ∇log ρ(x); on N(m, Σ) this is affine with
        b = −θ (m − c),  A = −θ I + ½σ² Σ⁻¹,
    so that Σ(t) = s² I + e^{−2θt}(Σ0 − s² I), m(t) = c + e^{−θt}(m0 − c), s² = σ²/(2θ).
    It is the Wasserstein gradient flow of F(μ) = ½σ² KL(μ | N(c, s² I)) (MATH.md §3 with a
    scaled potential); ``energy`` gives F in closed form on Gaussian states.
"""

from __future__ import annotations

import math

import torch

import measureflow
from measureflow.cache import DeviceCache
from measureflow.errors import CapabilityError, ParameterError, ShapeError
from measureflow.validators import check_finite_tensor, check_nonnegative, check_positive
from measureflow.fields import Field
from measureflow.state import Gaussians


def _matrix(value, name, d=None) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float64) if not isinstance(value, torch.Tensor) else value
    if tensor.ndim == 0 and d is not None:
        tensor = tensor * torch.eye(d, dtype=tensor.dtype)
    if tensor.ndim != 2 or tensor.shape[0] != tensor.shape[1]:
        raise ShapeError(f"{name} must be a square (d, d) matrix; received shape {tuple(tensor.shape)}")
    return tensor


def _vector(value, name, d) -> torch.Tensor:
    if value is None:
        return torch.zeros(d, dtype=torch.float64)
    tensor = torch.as_tensor(value, dtype=torch.float64) if not isinstance(value, torch.Tensor) else value
    if tensor.ndim == 0:
        tensor = tensor * torch.ones(d, dtype=tensor.dtype)
    if tuple(tensor.shape) != (d,):
        raise ShapeError(f"{name} must have shape ({d},) to match A; received {tuple(tensor.shape)}")
    return tensor


class LinearField(Field):
    """v(x) = b + A x (see the module docstring for the Gaussian solution)."""

    name = "linear"

    def __init__(self, A, b=None):
        self.A = check_finite_tensor(_matrix(A, "A"), "A", "linear")
        self.b = check_finite_tensor(_vector(b, "b", self.A.shape[0]), "b", "linear")
        self.dim = self.A.shape[0]
        caps = {"velocity", "affine"}
        if torch.allclose(self.A, self.A.T):
            caps.add("energy")
        self._capabilities = frozenset(caps)
        # A and b on each device and dtype, copied once (a copy per evaluation is a host sync on CUDA)
        self._copies = DeviceCache(self._copy_to)

    def _copy_to(self, like: torch.Tensor):
        return self.A.to(like), self.b.to(like)

    def _on(self, like: torch.Tensor):
        return self._copies(like)

    def _check_dim(self, d):
        if d != self.A.shape[0]:
            raise ShapeError(f"field 'linear' has dimension {self.A.shape[0]} (A is {tuple(self.A.shape)}); the state has d = {d}")

    def velocity(self, t, x, state):
        self._check_dim(x.shape[-1])
        A, b = self._on(x)
        return x @ A.T + b

    def trainable(self) -> dict:
        """The tensors gradients through a run may ask for: A and b."""
        return {"A": self.A, "b": self.b}

    def divergence(self, t, x, state):
        """∇·v = tr A at every point, shape (R, N) (the log-density channel's rate is −tr A, MATH.md §15.1)."""
        A, _ = self._on(x)
        return torch.trace(A).expand(x.shape[:-1])

    def affine(self, t, state):
        self._check_dim(state.dim)
        A, b = self._on(state.mean)
        R = state.mean.shape[0]
        return state.mean @ A.T + b, A.expand(R, -1, -1)

    def energy(self, state):
        if "energy" not in self._capabilities:
            raise CapabilityError("field 'linear' has an energy only when A is symmetric (then v = −∇U)")
        A, b = self._on(state.mean if isinstance(state, Gaussians) else state.x)
        if isinstance(state, Gaussians):
            m, S = state.mean, state.cov
            quad = torch.einsum("ij,rji->r", A, S) + torch.einsum("ri,ij,rj->r", m, A, m)
            return -0.5 * quad - m @ b
        w = state.weights_or_uniform()
        U = -0.5 * torch.einsum("rni,ij,rnj->rn", state.x, A, state.x) - state.x @ b
        return (w * U).sum(dim=1)

    def solution(self, t, initial: Gaussians, t0: float = 0.0) -> Gaussians:
        """The exact Gaussian state at time t from ``initial`` at t0 (matrix exponential)."""
        A, b = self._on(initial.mean)
        d = A.shape[0]
        h = float(t - t0)
        # The augmented exponential gives ∫ e^{sA} ds b without inverting A.
        aug = torch.zeros(d + 1, d + 1, dtype=A.dtype, device=A.device)
        aug[:d, :d] = A * h
        aug[:d, d] = b * h
        E = torch.linalg.matrix_exp(aug)
        Phi, shift = E[:d, :d], E[:d, d]
        mean = initial.mean @ Phi.T + shift
        cov = Phi @ initial.cov @ Phi.T
        return Gaussians(mean, 0.5 * (cov + cov.transpose(-1, -2)))

    def describe(self):
        return {"name": self.name, "A": self.A.tolist(), "b": self.b.tolist()}


class OrnsteinUhlenbeck(Field):
    """dX = −θ(X − c)dt + σ dW, with its probability-flow Gaussian closure (module docstring)."""

    name = "ornstein_uhlenbeck"
    time_range = (0.0, math.inf)

    def __init__(self, theta: float = 1.0, sigma: float = 1.0, center=0.0, dim: int | None = None):
        self.theta = check_positive(theta, "theta", "ornstein_uhlenbeck")
        self.sigma = check_nonnegative(sigma, "sigma", "ornstein_uhlenbeck")
        if isinstance(center, (bool, str, bytes)):
            raise ParameterError(f"ornstein_uhlenbeck: center must be a number or a vector (d,); received {center!r}")
        self.center = check_finite_tensor(torch.as_tensor(center, dtype=torch.float64), "center", "ornstein_uhlenbeck")
        if self.center.ndim > 1:
            raise ShapeError(f"ornstein_uhlenbeck: center must be a scalar or a vector (d,); received shape "
                             f"{tuple(self.center.shape)}")
        if self.center.ndim == 1:
            if dim is not None and int(dim) != self.center.shape[0]:
                raise ShapeError(f"ornstein_uhlenbeck: center has {self.center.shape[0]} coordinates but dim = {dim}")
            dim = self.center.shape[0]
        # The dimension the field is defined in (None: any); checked against the state when a run is assembled.
        self.dim = dim
        self._centers = DeviceCache(self.center.to)  # c on each device and dtype, copied once

    def _center(self, like):
        c = self._centers(like)
        return c if c.ndim else c.expand(like.shape[-1])

    def velocity(self, t, x, state):
        return -self.theta * (x - self._center(x))

    def diffusion(self, t):
        return self.sigma

    def affine(self, t, state):
        m, S = state.mean, state.cov
        d = state.dim
        eye = torch.eye(d, dtype=S.dtype, device=S.device)
        b = -self.theta * (m - self._center(m))
        A = -self.theta * eye + 0.5 * self.sigma**2 * torch.linalg.inv(S)
        return b, A

    def energy(self, state):
        if not isinstance(state, Gaussians):
            raise CapabilityError(
                "field 'ornstein_uhlenbeck' has a closed-form energy only on Gaussians states "
                "(a particle estimate needs a density estimator)"
            )
        m, S = state.mean, state.cov
        d = state.dim
        s2 = self.sigma**2 / (2 * self.theta)
        diff = m - self._center(m)
        kl = 0.5 * (
            torch.diagonal(S, dim1=-2, dim2=-1).sum(-1) / s2
            + (diff * diff).sum(-1) / s2
            - d
            + d * math.log(s2)
            - torch.logdet(S)
        )
        return 0.5 * self.sigma**2 * kl

    def solution(self, t, initial: Gaussians, t0: float = 0.0) -> Gaussians:
        """The exact law at time t from ``initial`` at t0."""
        h = float(t - t0)
        m0, S0 = initial.mean, initial.cov
        d = initial.dim
        s2 = self.sigma**2 / (2 * self.theta)
        eye = torch.eye(d, dtype=S0.dtype, device=S0.device)
        c = self._center(m0)
        mean = c + math.exp(-self.theta * h) * (m0 - c)
        cov = s2 * eye + math.exp(-2 * self.theta * h) * (S0 - s2 * eye)
        return Gaussians(mean, cov)

    def describe(self):
        return {"name": self.name, "theta": self.theta, "sigma": self.sigma, "center": self.center.tolist()}


@measureflow.hookimpl
def measureflow_register_fields(registry):
    registry.add_field("linear", LinearField)
    registry.add_field("ornstein_uhlenbeck", OrnsteinUhlenbeck)
