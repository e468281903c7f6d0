"""Mean-field training of a two-layer network: neurons are the particles (MATH.md §11, [S] §6.2).

A neuron is a point p = (u, v) ∈ R^d × R^{d'}, so the particle dimension is D = d + d'. A weighted measure
α = Σᵢ wᵢ δ_{pᵢ} over neurons defines the network

    g(z) = ∫ v σ(⟨u, z⟩) dα(u, v) = Σᵢ wᵢ vᵢ σ(⟨uᵢ, z⟩),

with σ the identity (``activation="linear"``) or the ReLU max(0, ·) (``activation="relu"``). The output is an
**average** over neurons (mean-field scaling, Σᵢ wᵢ = 1), never a sum: duplicating every neuron and halving
the weights gives the same network and the same dynamics. Given data (z_k, y_k), k = 1 … K, the field descends
the empirical risk (the ``energy``)

    f(α) = (1/K) Σ_k |g(z_k) − y_k|²,

whose first variation at α is δf(u, v) = (2/K) Σ_k ⟨r_k, v⟩ σ(⟨u, z_k⟩), r_k = g(z_k) − y_k. Neurons move by
v = −∇δf (MATH.md §0):

    u̇ = −(2/K) Σ_k ⟨r_k, v⟩ σ'(⟨u, z_k⟩) z_k,      v̇ = −(2/K) Σ_k σ(⟨u, z_k⟩) r_k,

with σ' = 1{⟨u, z⟩ > 0} for the ReLU (0 at the kink). Along the flow df/dt = −Σᵢ wᵢ|v(pᵢ)|² (eq. 0.2), and
∂f/∂pᵢ = wᵢ ∇δf(pᵢ): the flow is gradient descent on the neurons with a step scaled by 1/wᵢ. (MATH.md §11 writes
N for the number of data points; here it is K, N being the number of neurons.)

**Linear network.** g(z) = M_VU z with M_VU = ∫ v uᵀ dα (uncentred). With S_zz = (1/K)Σ z_k z_kᵀ,
S_yz = (1/K)Σ y_k z_kᵀ (S_zy = S_yzᵀ) and M the second-moment matrix ∫ p pᵀ dα (blocks M_UU, M_UV, M_VU, M_VV),
the velocity is linear in p:

    ṗ = B p,   B = −2 [[0, S_zz M_UV − S_zy], [M_VU S_zz − S_yz, 0]]   (symmetric, tr B = 0),

and f = tr(M_VU S_zz M_UV) − 2 tr(S_yz M_UV) + (1/K) Σ_k |y_k|². The data enter only through S_zz, S_yz and
(1/K)Σ|y_k|², computed once; for the ReLU the sums over the K data points are plain matrix products
(K × N per replica) — they are not kernel sums between particles, so the streamed reductions are not involved.

**Gaussian closure** (linear only, [S] eq. (23) with the sign of MATH.md §14.3). Because ṗ = B p is linear in p
and B depends on α only through M, a Gaussian N(m, Σ) stays Gaussian with second moment M = Σ + m mᵀ. In the
convention v(x) = b + A(x − m) of :mod:`measureflow.fields`: b = B m, A = B, hence ṁ = B m,
Σ̇ = BΣ + ΣBᵀ and Ṁ = BM + MBᵀ. MATH.md §11 writes the centred case m = 0 (Σ = M); a non-zero mean is
handled exactly through M. The closure is exact for the *empirical* second moment of particles too: a particle
state whose weighted mean and covariance are (m, Σ) follows the Gaussian closure started at N(m, Σ), up to the
integrator's error.

Invariants (:meth:`MeanFieldNetwork.determinant`, :meth:`MeanFieldNetwork.trace_difference`): det M (tr B = 0)
and tr M_UU − tr M_VV. The second holds for every neuron separately, |u|² − |v|² = const, for the ReLU as well
(σ is positively 1-homogeneous). Limit (:meth:`MeanFieldNetwork.least_squares`): M_VU(∞) = S_yz S_zz⁻¹ when S_zz
is invertible (the least-squares fit; MATH.md §14.3 corrects the printed Σ_UV,∞), where f reaches
:meth:`MeanFieldNetwork.minimal_risk`. Avoid M = 0 (a stationary saddle) and a tiny initial scale (long
plateaus). No closed-form solution exists (a matrix Riccati equation): integrate the closure.

The field is autonomous: defined for every t (training runs forward from t = 0).
"""

from __future__ import annotations

import attrs
import torch

import measureflow
from measureflow.errors import CapabilityError, ParameterError, ShapeError, StateError
from measureflow.fields import Field
from measureflow.state import Gaussians, Particles, as_tensor
from measureflow.targets import check_points

__all__ = ["MeanFieldNetwork", "RegressionData", "ACTIVATIONS"]

ACTIVATIONS = ("linear", "relu")
WHERE = "mean_field_network"


# -- the data -------------------------------------------------------------------------------------------------


def _columns(value, name: str) -> torch.Tensor:
    """A (K, n) float64 tensor; a vector (K,) is one column. Refuses other shapes and non-finite entries."""
    if value is None:
        raise ParameterError(f"{WHERE}: {name} is required (a (K, n) tensor of K data points)")
    t = as_tensor(value, name=f"{WHERE} {name}")
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        hint = " (data are shared by every replica: pass them once, not per replica)" if t.ndim == 3 else ""
        raise ShapeError(
            f"{WHERE}: {name} must have shape (K, n) with K ≥ 1 data points; received {tuple(t.shape)}{hint}"
        )
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ParameterError(f"{WHERE}: {name} has non-finite entries; remove or impute them")
    return t


def _same_rows(instance, attribute, value):
    if value.shape[0] != instance.inputs.shape[0]:
        raise ShapeError(
            f"{WHERE}: inputs and outputs must have one row per data point; received inputs "
            f"{tuple(instance.inputs.shape)} and outputs {tuple(value.shape)} ({instance.inputs.shape[0]} vs "
            f"{value.shape[0]} rows)"
        )
    if value.device != instance.inputs.device:
        raise StateError(
            f"{WHERE}: inputs are on {instance.inputs.device} but outputs on {value.device}; use one device"
        )


@attrs.frozen(eq=False)
class RegressionData:
    """Data (z_k, y_k), k = 1 … K: ``inputs`` (K, d), ``outputs`` (K, d') (a vector is one column), in float64.

    The moments the linear network needs are computed once: S_zz = (1/K)Σ z_k z_kᵀ (d, d),
    S_yz = (1/K)Σ y_k z_kᵀ (d', d) and (1/K)Σ|y_k|².
    """

    inputs: torch.Tensor = attrs.field(converter=lambda v: _columns(v, "inputs"))
    outputs: torch.Tensor = attrs.field(converter=lambda v: _columns(v, "outputs"), validator=_same_rows)
    _copies: dict = attrs.field(factory=dict, init=False, repr=False)

    @property
    def size(self) -> int:
        return self.inputs.shape[0]

    @property
    def input_dim(self) -> int:
        return self.inputs.shape[1]

    @property
    def output_dim(self) -> int:
        return self.outputs.shape[1]

    def moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(S_zz, S_yz, (1/K)Σ|y_k|²) in float64."""
        z, y, K = self.inputs, self.outputs, self.size
        return z.T @ z / K, y.T @ z / K, (y * y).sum() / K

    def on(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """z, y, S_zz, S_yz, mean |y|² in ``like``'s dtype and device (converted once per pair)."""
        key = (like.dtype, like.device)
        out = self._copies.get(key)
        if out is None:
            S_zz, S_yz, y2 = self.moments()
            raw = {"z": self.inputs, "y": self.outputs, "S_zz": S_zz, "S_yz": S_yz, "y2": y2}
            out = self._copies[key] = {k: v.to(dtype=like.dtype, device=like.device) for k, v in raw.items()}
        return out


# -- the field ------------------------------------------------------------------------------------------------


class MeanFieldNetwork(Field):
    """Wasserstein gradient flow of the empirical risk of a mean-field two-layer network (module docstring).

    Parameters
    ----------
    inputs:
        z_k, shape (K, d) (or (K,) for d = 1); include a column of ones for a bias.
    outputs:
        y_k, shape (K, d') (or (K,) for d' = 1).
    activation:
        ``"linear"`` (σ(s) = s: Gaussian closure, invariants, least-squares limit) or ``"relu"``
        (σ(s) = max(0, s); particles only).

    States have dimension D = d + d': the first d coordinates are u, the last d' are v.
    """

    name = "mean_field_network"

    def __init__(self, inputs=None, outputs=None, activation: str = "linear"):
        if activation not in ACTIVATIONS:
            raise ParameterError(
                f"{WHERE}: unknown activation {activation!r}; choose one of {', '.join(map(repr, ACTIVATIONS))}"
            )
        self.activation = activation
        self.data = RegressionData(inputs, outputs)
        self.input_dim = self.data.input_dim
        self.output_dim = self.data.output_dim
        self.dim = self.input_dim + self.output_dim
        caps = {"velocity", "energy"}
        if activation == "linear":
            caps.add("affine")
        self._capabilities = frozenset(caps)

    # -- checks ------------------------------------------------------------------------------------------------
    def _dim_error(self, got: int, what: str) -> ShapeError:
        return ShapeError(
            f"{WHERE}: neurons p = (u, v) live in R^(d + d') = R^{self.dim} (inputs d = {self.input_dim}, outputs "
            f"d' = {self.output_dim}); {what} has dimension {got}. Give states of shape (R, N, {self.dim})"
        )

    def _check_state(self, state, where: str, kinds=(Particles, Gaussians)) -> None:
        if not isinstance(state, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise CapabilityError(
                f"{WHERE}.{where}: expected a measureflow {names} state; received {type(state).__name__}"
            )
        if state.dim != self.dim:
            raise self._dim_error(state.dim, "the state")

    def _linear_only(self, what: str) -> None:
        if self.activation != "linear":
            raise CapabilityError(
                f"{WHERE}: {what} exists for activation='linear' only (MATH.md §11); this field uses "
                f"activation={self.activation!r}. Run the ReLU network on Particles"
            )

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[..., : self.input_dim], x[..., self.input_dim :]

    # -- moments (linear network) ------------------------------------------------------------------------------
    def second_moment(self, state) -> torch.Tensor:
        """M = ∫ p pᵀ dα, shape (R, D, D): Σᵢ wᵢ pᵢpᵢᵀ for particles, Σ + m mᵀ for a Gaussian."""
        self._check_state(state, "second_moment")
        if isinstance(state, Gaussians):
            return state.cov + state.mean[:, :, None] * state.mean[:, None, :]
        w = state.weights_or_uniform()
        return torch.einsum("rn,rni,rnj->rij", w, state.x, state.x)

    def network_matrix(self, state) -> torch.Tensor:
        """M_VU = ∫ v uᵀ dα, shape (R, d', d): the linear network is g(z) = M_VU z."""
        self._linear_only("the network matrix M_VU")
        return self.second_moment(state)[:, self.input_dim :, : self.input_dim]

    def velocity_matrix(self, state) -> torch.Tensor:
        """B = −2[[0, S_zz M_UV − S_zy], [M_VU S_zz − S_yz, 0]], shape (R, D, D), so that ṗ = B p."""
        self._linear_only("the velocity matrix B")
        M = self.second_moment(state)
        data = self.data.on(M)
        d = self.input_dim
        off = -2.0 * (M[:, d:, :d] @ data["S_zz"] - data["S_yz"])  # (R, d', d), the lower-left block
        B = torch.zeros_like(M)
        B[:, d:, :d] = off
        B[:, :d, d:] = off.transpose(-1, -2)
        return B

    # -- the network and its risk ------------------------------------------------------------------------------
    def predict(self, state, z) -> torch.Tensor:
        """g(z) = Σᵢ wᵢ vᵢ σ(⟨uᵢ, z⟩) at inputs z (Q, d) (or (Q,) for d = 1); shape (R, Q, d')."""
        z = as_tensor(z, name=f"{WHERE}.predict z")
        if z.ndim == 1 and self.input_dim == 1:
            z = z[:, None]
        if z.ndim != 2 or z.shape[1] != self.input_dim:
            raise ShapeError(f"{WHERE}.predict: z must have shape (Q, {self.input_dim}); received {tuple(z.shape)}")
        like = state.mean if isinstance(state, Gaussians) else state.x
        return self._network(state, z.to(dtype=like.dtype, device=like.device))

    def _network(self, state, z: torch.Tensor) -> torch.Tensor:
        if self.activation == "linear":
            return z @ self.network_matrix(state).transpose(-1, -2)
        self._check_state(state, "predict", kinds=(Particles,))
        u, v = self._split(state.x)
        hidden = torch.relu(u @ z.T)  # (R, N, Q)
        return (hidden * state.weights_or_uniform()[..., None]).transpose(-1, -2) @ v

    def residuals(self, state) -> torch.Tensor:
        """r_k = g(z_k) − y_k at the data, shape (R, K, d')."""
        data = self.data.on(state.mean if isinstance(state, Gaussians) else state.x)
        return self._network(state, data["z"]) - data["y"]

    def energy(self, state) -> torch.Tensor:
        """The empirical risk f(α) = (1/K) Σ_k |g(z_k) − y_k|², shape (R,).

        Linear network: through the moments, f = tr(M_VU S_zz M_UV) − 2 tr(S_yz M_UV) + (1/K)Σ|y_k|² (any
        state); ReLU: through the residuals (particles).
        """
        if self.activation == "relu":
            self._check_state(state, "energy", kinds=(Particles,))
            r = self.residuals(state)
            return (r * r).sum(dim=(-1, -2)) / self.data.size
        M_vu = self.network_matrix(state)
        data = self.data.on(M_vu)
        quad = torch.einsum("rij,jk,rik->r", M_vu, data["S_zz"], M_vu)
        return quad - 2.0 * (M_vu * data["S_yz"]).sum(dim=(-1, -2)) + data["y2"]

    def first_variation(self, state, x: torch.Tensor) -> torch.Tensor:
        """δf(α)(p) = (2/K) Σ_k ⟨r_k, v⟩ σ(⟨u, z_k⟩) at query neurons x (R, N', D); shape (R, N')."""
        check_points(x, self.dim, f"{WHERE}.first_variation")
        self._check_state(state, "first_variation", kinds=(Particles,))
        data = self.data.on(x)
        u, v = self._split(x)
        pre = u @ data["z"].T  # (R, N', K)
        hidden = pre if self.activation == "linear" else torch.relu(pre)
        r = self.residuals(state)  # (R, K, d')
        return 2.0 / self.data.size * ((v @ r.transpose(-1, -2)) * hidden).sum(-1)

    # -- the protocol ------------------------------------------------------------------------------------------
    def velocity(self, t, x, state):
        """−∇δf at the neurons x (R, N', D); ṗ = B p for the linear network, the data sums for the ReLU."""
        check_points(x, None, WHERE)
        if x.shape[-1] != self.dim:
            raise self._dim_error(x.shape[-1], "x")
        if self.activation == "linear":
            return x @ self.velocity_matrix(state).transpose(-1, -2)
        # The sums run over the K data points, not over pairs of neurons: plain matrix products, no kernel sum.
        data = self.data.on(x)
        z = data["z"]
        u, v = self._split(x)
        pre = u @ z.T  # (R, N', K)
        r = self.residuals(state)  # (R, K, d')
        scale = -2.0 / self.data.size
        gate = (pre > 0).to(x.dtype)
        du = ((v @ r.transpose(-1, -2)) * gate) @ z
        dv = torch.relu(pre) @ r
        return scale * torch.cat([du, dv], dim=-1)

    def affine(self, t, state):
        """(b, A) = (B m, B): ṁ = B m, Σ̇ = BΣ + ΣBᵀ (MATH.md §11, eq. 0.1)."""
        self._linear_only("the Gaussian closure")
        self._check_state(state, "affine", kinds=(Gaussians,))
        B = self.velocity_matrix(state)
        return (B @ state.mean[..., None])[..., 0], B

    # -- invariants and limit (linear network) -----------------------------------------------------------------
    def determinant(self, state) -> torch.Tensor:
        """det M, shape (R,): conserved by the linear network's flow (tr B = 0)."""
        self._linear_only("the invariant det M")
        return torch.linalg.det(self.second_moment(state))

    def trace_difference(self, state) -> torch.Tensor:
        """tr M_UU − tr M_VV = ∫ (|u|² − |v|²) dα, shape (R,): conserved (neuron by neuron) for both activations."""
        M = self.second_moment(state)
        diag = torch.diagonal(M, dim1=-2, dim2=-1)
        return diag[:, : self.input_dim].sum(-1) - diag[:, self.input_dim :].sum(-1)

    def least_squares(self) -> torch.Tensor:
        """S_yz S_zz⁻¹, shape (d', d) (float64): the limit of M_VU (MATH.md §11, §14.3)."""
        self._linear_only("the least-squares limit")
        S_zz, S_yz, _ = self.data.moments()
        evals = torch.linalg.eigvalsh(S_zz)
        if not bool(evals[0] > 1e-12 * evals[-1].clamp_min(1e-300)):
            raise StateError(
                f"{WHERE}: S_zz = (1/K)Σ z_k z_kᵀ is singular (smallest eigenvalue {float(evals[0]):.3g}), so the "
                "least-squares limit is not unique; give at least d linearly independent inputs"
            )
        return torch.linalg.solve(S_zz, S_yz.T).T

    def minimal_risk(self) -> torch.Tensor:
        """min f = (1/K)Σ|y_k|² − tr(S_yz S_zz⁻¹ S_zy), reached at M_VU = S_yz S_zz⁻¹ (float64 scalar)."""
        _, S_yz, y2 = self.data.moments()
        return y2 - (self.least_squares() * S_yz).sum()

    def describe(self):
        return {
            "name": self.name,
            "activation": self.activation,
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "data_points": self.data.size,
        }


@measureflow.hookimpl
def measureflow_register_fields(registry):
    registry.add_field("mean_field_network", MeanFieldNetwork)
