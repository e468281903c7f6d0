"""Samples with exact empirical moments (MATH-CHECKS.md), so that sampling error enters a test only through
moments of order three and higher, and the reference Gaussians several field tests share."""

from __future__ import annotations

import math

import torch

from measureflow.linalg import matrix_function

F64 = torch.float64


def _rotation(angle):
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s], [s, c]], dtype=F64)


# A non-commuting, non-centred pair (start N(MEAN_0d, SIGMA_0d), target N(MEAN_Bd, SIGMA_Bd)) in d = 2 and d = 3.
SIGMA_B2 = _rotation(0.6) @ torch.diag(torch.tensor([2.0, 0.5], dtype=F64)) @ _rotation(0.6).T
MEAN_B2 = torch.tensor([0.5, -1.0], dtype=F64)
SIGMA_02 = torch.tensor([[3.0, 0.4], [0.4, 0.5]], dtype=F64)
MEAN_02 = torch.tensor([-1.0, 0.5], dtype=F64)
_Q3 = torch.linalg.qr(torch.tensor([[1.0, 0.3, -0.2], [0.4, 1.0, 0.5], [-0.3, 0.2, 1.0]], dtype=F64))[0]
SIGMA_B3 = _Q3 @ torch.diag(torch.tensor([2.0, 0.8, 0.3], dtype=F64)) @ _Q3.T
MEAN_B3 = torch.tensor([0.5, -1.0, 0.3], dtype=F64)
SIGMA_03 = torch.tensor([[3.0, 0.4, 0.0], [0.4, 0.5, 0.0], [0.0, 0.0, 1.2]], dtype=F64)
MEAN_03 = torch.tensor([-1.0, 0.5, 2.0], dtype=F64)


def relerr(a, b) -> float:
    """‖a − b‖ / ‖b‖ (Frobenius) for tensors or array-likes."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).norm() / b.norm())


def whitened(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int | torch.Generator, *,
             root: str = "cholesky") -> torch.Tensor:
    """(n, d) float64 points whose empirical mean and population (1/n) covariance are exactly (mean, cov).

    ``seed`` is an int or a torch.Generator (drawn from, so consecutive calls differ). The centred normal
    draws z are whitened by the inverse Cholesky factor of their covariance (``root="cholesky"``) or by
    its inverse symmetric square root (``root="symmetric"``) — the same moments, different points — and
    then coloured by the Cholesky factor of ``cov``.
    """
    if root not in ("cholesky", "symmetric"):
        raise ValueError(f"root must be 'cholesky' or 'symmetric'; received {root!r}")
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    z = torch.randn(n, cov.shape[0], generator=generator, dtype=F64)
    z = z - z.mean(0)
    emp = z.T @ z / n
    if root == "cholesky":
        z = z @ torch.linalg.inv(torch.linalg.cholesky(emp)).T
    else:
        z = z @ matrix_function(emp, torch.rsqrt)
    return mean + z @ torch.linalg.cholesky(cov).T


def standard_gaussian(d: int = 2):
    """γ = N(0, I_d) in float64, the target of the MATH.md §13 table."""
    from measureflow.measures import Gaussian

    return Gaussian(torch.zeros(d, dtype=F64), torch.eye(d, dtype=F64))


def spectral(C, fn):
    """fn applied to the eigenvalues of a symmetric numpy matrix (an independent check of torch's matrix functions)."""
    import numpy as np

    lam, U = np.linalg.eigh(C)
    return U @ np.diag(fn(lam)) @ U.T
