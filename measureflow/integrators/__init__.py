"""Integrators (DESIGN.md "integrator"): solvers that take one step as a function, step-size
controllers, dense output, and the run-side :class:`Stepper` that crosses output intervals.

* Solvers: the tableau-driven explicit Runge–Kutta family (``euler``, ``heun``, ``midpoint``,
  ``rk4``), the adaptive Dormand–Prince 5(4) pair (``dopri5``) and Euler–Maruyama
  (``euler_maruyama``) for fields with noise; all registered through the plugin registry
  (:mod:`measureflow.integrators.builtin`): ``measureflow.integrator("rk4")``,
  ``measureflow.integrator("dopri5", controller=PIController(rtol=1e-8, atol=1e-10))``.
* Controllers: :class:`ConstantController` (one step per interval, SPD-safe halving for Gaussians)
  and :class:`PIController` (error control).
* :class:`BrownianTree`: a fixed, refinable Brownian path, passed as a run's noise so that runs at
  several step sizes see the same path (strong errors).
* :class:`CompiledStep`: a solver's steps compiled as one graph each (``Stepper(..., compile=True)``,
  ``Simulation(..., compile=True)``).
* :class:`Dynamics` binds a field to a run (channels, noise, counters); :class:`Channel` adds an
  auxiliary quantity integrated with the particles.

Write your own solver by subclassing :class:`Solver` and implementing ``step``; register it with
``registry.add_integrator(name, factory)`` from a ``measureflow_register_integrators`` hook.
"""

from __future__ import annotations

from ..errors import StepFailure
from .base import STAT_KEYS, Solver, StepResult
from .controllers import ConstantController, Controller, PIController, error_norm
from .dense import DenseOutput, HermiteDense, LinearDense, RungeKuttaDense
from .brownian import BrownianIncrement, BrownianTree, brownian_increment
from .dynamics import Channel, Dynamics, as_dynamics
from .noise import NoiseStream, noise_seed, standard_normal
from .runge_kutta import DormandPrince5, ExplicitRungeKutta, rk_stages
from .combine import combine
from .compiled import CompiledStep, compilable, compile_available
from .stepper import Carry, Stepper
from .sde import SRA1, Milstein, StochasticHeun
from .stochastic import EulerMaruyama
from .tableau import DOPRI5, EULER, HEUN, MIDPOINT, RK4, ButcherTableau

__all__ = [
    "Solver",
    "StepResult",
    "StepFailure",
    "STAT_KEYS",
    "Controller",
    "ConstantController",
    "PIController",
    "error_norm",
    "DenseOutput",
    "HermiteDense",
    "LinearDense",
    "RungeKuttaDense",
    "Dynamics",
    "Channel",
    "as_dynamics",
    "NoiseStream",
    "noise_seed",
    "standard_normal",
    "Stepper",
    "CompiledStep",
    "compilable",
    "compile_available",
    "Carry",
    "ButcherTableau",
    "ExplicitRungeKutta",
    "DormandPrince5",
    "EulerMaruyama",
    "StochasticHeun",
    "SRA1",
    "Milstein",
    "BrownianTree",
    "BrownianIncrement",
    "brownian_increment",
    "rk_stages",
    "combine",
    "EULER",
    "HEUN",
    "MIDPOINT",
    "RK4",
    "DOPRI5",
]
