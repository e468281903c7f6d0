"""The four parameterisations of an affine path and the exact conversions between them (MATH.md §15.2).

For Zₜ = aₜX₀ + bₜX₁ with X₀ the data and X₁ ~ N(0, σ²I) the noise (noising convention, MATH.md
§0), a model may predict any of

* ``"velocity"`` — vₜ(z) = E[a'X₀ + b'X₁ | Zₜ = z] (flow matching),
* ``"score"`` — sₜ(z) = ∇log ρₜ(z),
* ``"x0"`` — x̂₀(z) = E[X₀ | Zₜ = z] (the denoiser, data prediction),
* ``"noise"`` — ε̂(z) = E[X₁ | Zₜ = z]/σ (noise prediction),

and at each t they are affine images of one another (Tweedie: sₜ = −(z − a x̂₀)/(b²σ²) = −ε̂/(bσ)):

    z = a x̂₀ + bσ ε̂,      v = a' x̂₀ + b'σ ε̂,      s = −ε̂/(bσ),

so from a prediction of one kind the pair (x̂₀, ε̂) follows —

* x0:       ε̂ = (z − a x̂₀)/(bσ)                                  (needs b ≠ 0),
* noise:    x̂₀ = (z − bσ ε̂)/a                                    (needs a ≠ 0),
* score:    ε̂ = −bσ s,  x̂₀ = (z + b²σ² s)/a                      (needs a ≠ 0),
* velocity: x̂₀ = (b'z − bv)/(ab' − a'b),  ε̂ = (av − a'z)/(σ(ab' − a'b))  (needs ab' ≠ a'b),

and with it every other kind. (Velocity from score: v = (a'/a)z + (a'b²/a − b'b)σ² s, MATH.md eq. 1.4.)
At a time where the needed coefficient vanishes the conversion is singular (inf/nan), as the
parameterisation itself is there.

Denoising score matching: E|s_θ(Zₜ, t) + X₁/(bσ²)|² has minimiser ∇log ρₜ; :func:`training_target`
gives each kind's regression target and weight.
"""

from __future__ import annotations

import torch

from .errors import ParameterError

__all__ = ["PREDICTIONS", "check_prediction", "convert", "endpoints", "from_endpoints", "training_target"]

#: The parameterisations a model may predict.
PREDICTIONS = ("velocity", "score", "x0", "noise")


def check_prediction(prediction, where: str = "prediction") -> str:
    """``prediction`` if it is one of :data:`PREDICTIONS`, else a one-line error listing them."""
    if prediction not in PREDICTIONS:
        raise ParameterError(
            f"{where}: unknown prediction type {prediction!r}; valid ones are {', '.join(map(repr, PREDICTIONS))}"
        )
    return prediction


def _coefficients(schedule, t, like: torch.Tensor):
    """(a, a', b, b') at t, shaped to broadcast against ``like`` (…, d) and in its dtype/device."""
    out = []
    for c in schedule.coefficients(t):
        c = torch.as_tensor(c).to(dtype=like.dtype, device=like.device)
        if c.ndim > 0:
            c = c.unsqueeze(-1)
        out.append(c)
    return out


def endpoints(value: torch.Tensor, z: torch.Tensor, t, *, prediction: str, schedule, sigma: float = 1.0):
    """(x̂₀, ε̂) from a prediction of kind ``prediction`` at points z and time t (module docstring).

    ``t`` is a number or a tensor of one time per point (shape z.shape[:-1]); ``schedule`` anything
    with ``coefficients(t) -> (a, a', b, b')``; σ the noise scale of X₁ ~ N(0, σ²I).
    """
    check_prediction(prediction, "parameterisation")
    a, da, b, db = _coefficients(schedule, t, z)
    s = float(sigma)
    if prediction == "x0":
        return value, (z - a * value) / (b * s)
    if prediction == "noise":
        return (z - (b * s) * value) / a, value
    if prediction == "score":
        return (z + (b * b * s * s) * value) / a, -(b * s) * value
    det = a * db - da * b
    return (db * z - b * value) / det, (a * value - da * z) / (s * det)


def from_endpoints(x0: torch.Tensor, eps: torch.Tensor, z: torch.Tensor, t, *, prediction: str, schedule,
                   sigma: float = 1.0) -> torch.Tensor:
    """The prediction of kind ``prediction`` from (x̂₀, ε̂) at (z, t)."""
    check_prediction(prediction, "parameterisation")
    a, da, b, db = _coefficients(schedule, t, z)
    s = float(sigma)
    if prediction == "x0":
        return x0
    if prediction == "noise":
        return eps
    if prediction == "score":
        return -eps / (b * s)
    return da * x0 + (db * s) * eps


def convert(value: torch.Tensor, z: torch.Tensor, t, *, source: str, target: str, schedule,
            sigma: float = 1.0) -> torch.Tensor:
    """A prediction of kind ``source`` at (z, t) converted to kind ``target`` (exact; module docstring).

    >>> import torch
    >>> from measureflow.schedules import get
    >>> z, score = torch.tensor([[1.0]]), torch.tensor([[-0.5]])
    >>> convert(score, z, 0.5, source="score", target="noise", schedule=get("linear"))
    tensor([[0.2500]])
    """
    check_prediction(target, "parameterisation")
    if source == target:
        check_prediction(source, "parameterisation")
        return value
    x0, eps = endpoints(value, z, t, prediction=source, schedule=schedule, sigma=sigma)
    return from_endpoints(x0, eps, z, t, prediction=target, schedule=schedule, sigma=sigma)


def training_target(prediction: str, x0: torch.Tensor, x1: torch.Tensor, coefficients, sigma: float = 1.0):
    """(target, weight) of the regression of a ``prediction`` model on pairs (X₀, X₁), X₁ ~ N(0, σ²I):

    * velocity: a'X₀ + b'X₁, weight 1 (flow matching);
    * x0: X₀; noise: X₁/σ (weight 1);
    * score: −X₁/(bσ²) with weight (bσ)², i.e. denoising score matching in the form
      |bσ s_θ + X₁/σ|², whose minimiser is still ∇log ρₜ at every t and whose variance stays bounded
      as b → 0. ``weight`` is None for weight 1.
    """
    check_prediction(prediction, "training")
    a, da, b, db = coefficients
    s = float(sigma)
    if prediction == "velocity":
        return torch.addcmul(da * x0, db, x1), None
    if prediction == "x0":
        return x0, None
    if prediction == "noise":
        return x1 / s, None
    return -x1 / (b * s * s), (b * s) ** 2
