"""Spectral functions of symmetric matrices, batched over leading dimensions (MATH.md §0).

MATH.md §0 fixes every matrix function (Σ^{1/2}, Σ^{-1/2}, C^{1/2}, …) as the spectral function of a
symmetric matrix: for S = U diag(λ) Uᵀ (``torch.linalg.eigh``), f(S) = U diag(f(λ)) Uᵀ. Everything
here keeps the dtype and device of its inputs and acts on the symmetric part ½(S + Sᵀ), so that
round-off asymmetry in a computed covariance is harmless. :func:`as_tensor` is the conversion every
boundary (states, measures, fields) uses for array-likes handed in by a user.
"""

from __future__ import annotations

from typing import Callable

import torch

from .errors import ShapeError, StateError

__all__ = ["as_tensor", "symmetrize", "from_eigh", "matrix_function", "spd_roots", "spd_inverse", "check_psd", "covariance_pair"]

# Eigenvalues within this many ulps of the largest one (in modulus) are rounding noise: a matrix whose
# smallest eigenvalue is below that level is numerically singular.
_ULPS = 16


def as_tensor(value, *, dtype=None, device=None, name="value") -> torch.Tensor:
    """Convert array-likes (numpy, lists, tensors) to a torch tensor, keeping tensors' dtype/device."""
    if isinstance(value, torch.Tensor):
        out = value
        if dtype is not None or device is not None:
            out = out.to(dtype=dtype or out.dtype, device=device or out.device)
        return out
    try:
        out = torch.as_tensor(value, device=device)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise StateError(f"{name}: cannot convert {type(value).__name__} to a tensor ({exc})") from exc
    if dtype is not None:
        out = out.to(dtype)
    elif not out.is_floating_point():
        out = out.to(torch.get_default_dtype())
    return out


def symmetrize(a: torch.Tensor) -> torch.Tensor:
    """½(A + Aᵀ) over the last two dimensions (a no-op, bit for bit, on an already symmetric matrix)."""
    return 0.5 * (a + a.transpose(-1, -2))


def from_eigh(evecs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """U diag(values) Uᵀ for eigenvectors U (..., d, d) and values (..., d)."""
    return (evecs * values[..., None, :]) @ evecs.transpose(-1, -2)


def matrix_function(a: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """f(S) = U diag(f(λ)) Uᵀ of the symmetric part S of ``a`` (MATH.md §0); ``fn`` acts on eigenvalues."""
    evals, evecs = torch.linalg.eigh(symmetrize(a))
    return from_eigh(evecs, fn(evals))


def _noise_level(evals: torch.Tensor) -> torch.Tensor:
    scale = evals.abs().amax(-1).clamp_min(torch.finfo(evals.dtype).tiny)
    return _ULPS * torch.finfo(evals.dtype).eps * scale


def spd_roots(S: torch.Tensor, name: str = "S", where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(S^{1/2}, S^{-1/2}) of a symmetric positive-definite S (..., d, d), from one ``eigh``.

    Refuses (StateError) an S whose smallest eigenvalue is not above the rounding level
    16 ε max|λ| of its dtype: its inverse root would be dominated by round-off.
    """
    evals, evecs = torch.linalg.eigh(symmetrize(S))
    smallest = evals[..., 0]
    if bool((smallest <= _noise_level(evals)).any()):
        prefix = f"{where}: " if where else ""
        raise StateError(
            f"{prefix}{name} must be positive definite; its smallest eigenvalue is {float(smallest.min()):.6g}. "
            "The Gaussian maps of MATH.md §1.5 need a non-degenerate source: add a small multiple of the identity."
        )
    root = evals.sqrt()
    return from_eigh(evecs, root), from_eigh(evecs, 1.0 / root)


def check_psd(S: torch.Tensor, name: str = "S", where: str = "") -> None:
    """Refuse (StateError) a symmetric S with an eigenvalue below −16 ε max|λ|: not a covariance."""
    evals = torch.linalg.eigvalsh(symmetrize(S))
    smallest = evals[..., 0]
    if bool((smallest < -_noise_level(evals)).any()):
        prefix = f"{where}: " if where else ""
        raise StateError(
            f"{prefix}{name} must be positive semidefinite (a covariance); its smallest eigenvalue is "
            f"{float(smallest.min()):.6g}. Check how it was built, e.g. as B Bᵀ + δ I."
        )


def covariance_pair(S0, S1, where: str = "", names: tuple[str, str] = ("S0", "S1")) -> tuple[torch.Tensor, torch.Tensor]:
    """Two covariances (..., d, d) with the same d, as symmetric tensors of one dtype and device.

    Array-likes are converted (floating point); the dtype is the promotion of both. Non-finite
    entries, tensors on different devices and non-square or mismatched shapes are refused.
    """
    # state.py builds on this module (symmetrize), so its converter is imported at call time.
    prefix = f"{where}: " if where else ""
    a = as_tensor(S0, name=names[0])
    b = as_tensor(S1, name=names[1])
    if a.device != b.device:
        raise StateError(f"{prefix}{names[0]} is on {a.device} but {names[1]} is on {b.device}; put both on one device")
    dtype = torch.promote_types(a.dtype, b.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    a, b = a.to(dtype), b.to(dtype)
    for name, m in zip(names, (a, b)):
        if m.ndim < 2 or m.shape[-1] != m.shape[-2] or m.shape[-1] == 0:
            raise ShapeError(f"{prefix}{name} must have shape (..., d, d) (a covariance matrix); received {tuple(m.shape)}")
        if not bool(torch.isfinite(m).all()):
            raise StateError(f"{prefix}{name} has non-finite entries")
    if a.shape[-1] != b.shape[-1]:
        raise ShapeError(
            f"{prefix}{names[0]} and {names[1]} must have the same dimension d; received {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return symmetrize(a), symmetrize(b)


def spd_inverse(S: torch.Tensor) -> torch.Tensor:
    """S⁻¹ of a batch of SPD matrices through Cholesky, without a host read.

    A non-SPD S gives non-finite entries, which the integrators treat as a failed step.
    """
    L, _ = torch.linalg.cholesky_ex(S)
    return symmetrize(torch.cholesky_inverse(L))
