"""Integrators: the tableau-driven explicit Runge–Kutta family (euler, heun, midpoint, rk4), the
adaptive Dormand–Prince 5(4) pair with a PI controller (dopri5) and Euler–Maruyama for fields with
noise. All are registered through the plugin registry (:mod:`measureflow.integrators.builtin`);
build one with ``measureflow.integrator("rk4")``.
"""

from __future__ import annotations

from .adaptive import DormandPrince5
from .base import STAT_KEYS, Integrator, StepFailure
from .controller import PIController
from .runge_kutta import ExplicitRungeKutta
from .stochastic import EulerMaruyama
from .tableau import DOPRI5, EULER, HEUN, MIDPOINT, RK4, ButcherTableau

__all__ = [
    "Integrator",
    "StepFailure",
    "STAT_KEYS",
    "ButcherTableau",
    "ExplicitRungeKutta",
    "DormandPrince5",
    "PIController",
    "EulerMaruyama",
    "EULER",
    "HEUN",
    "MIDPOINT",
    "RK4",
    "DOPRI5",
]
