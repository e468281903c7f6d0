"""Registration of the built-in integrators (loaded through :data:`measureflow.plugins.BUILTIN_PLUGINS`).

Every name maps to a factory taking keyword arguments:

=================  ======================================  ====================================
name               method                                   keyword arguments
=================  ======================================  ====================================
``euler``          explicit Euler, order 1                  max_halvings, controller
``heun``           Heun (explicit trapezoid), order 2       max_halvings, controller
``midpoint``       explicit midpoint, order 2               max_halvings, controller
``rk4``            classical Runge–Kutta, order 4           max_halvings, controller
``dopri5``         Dormand–Prince 5(4), adaptive            rtol, atol, dt_min, dt_max, safety,
                                                            first_step, max_steps, controller
``euler_maruyama`` Euler–Maruyama, weak order 1, noise      max_halvings, controller
``stochastic_heun`` stochastic Heun, strong order 1          max_halvings, controller
``sra``            SRA1 (additive noise), strong order 1.5  max_halvings, controller
``milstein``       Milstein (diagonal noise), strong 1      max_halvings, controller
=================  ======================================  ====================================
"""

from __future__ import annotations

from functools import partial

from ..plugins import hookimpl
from .runge_kutta import DormandPrince5, ExplicitRungeKutta
from .sde import SRA1, Milstein, StochasticHeun
from .stochastic import EulerMaruyama
from .tableau import EULER, HEUN, MIDPOINT, RK4

__all__ = ["measureflow_register_integrators"]


@hookimpl
def measureflow_register_integrators(registry):
    for tableau in (EULER, HEUN, MIDPOINT, RK4):
        registry.add_integrator(tableau.name, partial(ExplicitRungeKutta, tableau))
    registry.add_integrator("dopri5", DormandPrince5)
    registry.add_integrator("euler_maruyama", EulerMaruyama)
    registry.add_integrator("stochastic_heun", StochasticHeun)
    registry.add_integrator("sra", SRA1)
    registry.add_integrator("milstein", Milstein)
