"""Checks of scalar parameters: positive, non-negative, finite, probabilities, integers ≥ k.

Every message names the parameter (and where it was given), the value received and what to pass
instead, e.g. ``sinkhorn coupling: epsilon must be positive and finite; received 0.0. Pass a
finite number greater than zero.`` (DESIGN.md "Errors").

Three forms of the same checks:

* plain functions, ``check_positive(value, name, where)`` and friends, which convert the value
  (``float(value)``, or ``int(value)`` for an integral value such as ``3`` or ``3.0``) and return it;
* attrs validators, ``positive(where)`` and friends, which leave the attribute as given and so
  demand a number of the right type (``integer`` wants an :class:`int`, ``3.0`` is refused);
* the attrs converter :func:`to_positive`, which stores the checked ``float``.

A bool is refused everywhere: ``True`` as a bandwidth or an iteration count is a slip, not a 1.
The error is :class:`~measureflow.errors.ParameterError` unless the caller names another
(``error=ShapeError`` for a sample size, say).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

import attrs

from .errors import ParameterError

__all__ = [
    "check_positive",
    "check_nonnegative",
    "check_finite",
    "check_probability",
    "check_int",
    "check_finite_tensor",
    "positive",
    "nonnegative",
    "finite",
    "probability",
    "integer",
    "to_positive",
]


# -- what each check accepts: (requirement in the message, default advice, test on a float) ---------------

_FLOAT_RULES: dict[str, tuple[str, str, Callable[[float], bool]]] = {
    "positive": ("be positive and finite", "Pass a finite number greater than zero.",
                 lambda v: v > 0 and math.isfinite(v)),
    "nonnegative": ("be non-negative and finite", "Pass a finite number ≥ 0.",
                    lambda v: v >= 0 and math.isfinite(v)),
    "finite": ("be finite", "Pass a real number (not nan or inf).", math.isfinite),
    "probability": ("lie in [0, 1]", "Pass a number between 0 and 1.", lambda v: 0.0 <= v <= 1.0),
    "open probability": ("lie in (0, 1)", "Pass a number strictly between 0 and 1.", lambda v: 0.0 < v < 1.0),
}


def _message(name: str, where: str | None, requirement: str, value, advice: str) -> str:
    prefix = f"{where}: " if where else ""
    return f"{prefix}{name} must {requirement}; received {value!r}. {advice}"


def _check_float(rule: str, value, name: str, where: str | None, advice: str | None, error: type,
                 *, numbers_only: bool = False) -> float:
    """``float(value)`` if ``rule`` accepts it; ``numbers_only`` refuses what is not already a real number."""
    requirement, default_advice, accept = _FLOAT_RULES[rule]
    out = math.nan  # refused below: not a number at all
    if not isinstance(value, bool) and (isinstance(value, numbers.Real) or not numbers_only):
        try:
            out = float(value)
        except (TypeError, ValueError):
            pass
    if not accept(out):
        raise error(_message(name, where, requirement, value, advice or default_advice))
    return out


def _integer_requirement(minimum: int) -> tuple[str, str]:
    if minimum == 1:
        return "be a positive integer", "Pass a whole number ≥ 1."
    if minimum == 0:
        return "be a non-negative integer", "Pass a whole number ≥ 0."
    return f"be an integer ≥ {minimum}", f"Pass a whole number ≥ {minimum}."


# -- plain checks (convert and return) ------------------------------------------------------------------

def check_positive(value, name: str, where: str | None = None, *, advice: str | None = None,
                   error: type = ParameterError) -> float:
    """``float(value)`` if it is finite and > 0; otherwise ``error`` naming ``name`` (and ``where``)."""
    return _check_float("positive", value, name, where, advice, error)


def check_nonnegative(value, name: str, where: str | None = None, *, advice: str | None = None,
                      error: type = ParameterError) -> float:
    """``float(value)`` if it is finite and ≥ 0; otherwise ``error``."""
    return _check_float("nonnegative", value, name, where, advice, error)


def check_finite(value, name: str, where: str | None = None, *, advice: str | None = None,
                 error: type = ParameterError) -> float:
    """``float(value)`` if it is a finite real number; otherwise ``error``."""
    return _check_float("finite", value, name, where, advice, error)


def check_probability(value, name: str, where: str | None = None, *, open_interval: bool = False,
                      advice: str | None = None, error: type = ParameterError) -> float:
    """``float(value)`` if it lies in [0, 1] (in (0, 1) with ``open_interval``); otherwise ``error``."""
    return _check_float("open probability" if open_interval else "probability", value, name, where, advice, error)


def check_int(value, name: str, where: str | None = None, *, minimum: int = 1, advice: str | None = None,
              error: type = ParameterError) -> int:
    """``int(value)`` if ``value`` is integral (``3``, ``np.int64(3)``, ``3.0``) and ≥ ``minimum``."""
    out = None
    if not isinstance(value, bool):
        try:
            whole = int(value)
        except (TypeError, ValueError, OverflowError):
            whole = None
        if whole is not None and whole == value and whole >= minimum:
            out = whole
    if out is None:
        requirement, default_advice = _integer_requirement(minimum)
        raise error(_message(name, where, requirement, value, advice or default_advice))
    return out


def check_finite_tensor(value, name: str, where: str | None = None, *, error: type = ParameterError):
    """``value`` unchanged if it is not a floating tensor or holds only finite numbers; otherwise
    ``error`` naming it. One device→host read: for inputs at construction, never inside a step."""
    import torch  # the scalar checks above need no torch

    if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
        prefix = f"{where}: " if where else ""
        raise error(f"{prefix}{name} must be finite; it holds NaN or inf. Remove or replace those values")
    return value


# -- attrs validators (check the attribute as given) ----------------------------------------------------

def _owner(where: str | None, instance) -> str:
    return where if where is not None else type(instance).__name__


def _float_validator(rule: str, where: str | None, advice: str | None):
    def validate(instance, attribute, value):
        # A string would pass float() but stay a string in the attribute: numbers only.
        _check_float(rule, value, attribute.name, _owner(where, instance), advice, ParameterError, numbers_only=True)

    return validate


def positive(where: str | None = None, *, advice: str | None = None):
    """attrs validator: a real number, finite and > 0 (``where`` defaults to the class name)."""
    return _float_validator("positive", where, advice)


def nonnegative(where: str | None = None, *, advice: str | None = None):
    """attrs validator: a real number, finite and ≥ 0."""
    return _float_validator("nonnegative", where, advice)


def finite(where: str | None = None, *, advice: str | None = None):
    """attrs validator: a finite real number."""
    return _float_validator("finite", where, advice)


def probability(where: str | None = None, *, open_interval: bool = False, advice: str | None = None):
    """attrs validator: a real number in [0, 1] (in (0, 1) with ``open_interval``)."""
    return _float_validator("open probability" if open_interval else "probability", where, advice)


def integer(where: str | None = None, *, minimum: int = 1, advice: str | None = None):
    """attrs validator: an :class:`int` (or numpy integer), not a bool, ≥ ``minimum``."""

    def validate(instance, attribute, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            requirement, default_advice = _integer_requirement(minimum)
            raise ParameterError(_message(attribute.name, _owner(where, instance), requirement, value,
                                          advice or default_advice))

    return validate


# -- attrs converter (check and store the float) --------------------------------------------------------

def to_positive(where: str | None = None, *, advice: str | None = None) -> attrs.Converter:
    """attrs converter: stores :func:`check_positive` of the value, named after the attribute."""
    return attrs.Converter(lambda value, field: check_positive(value, field.name, where, advice=advice),
                           takes_field=True)
