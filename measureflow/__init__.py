"""measureflow: simulate how probability measures move.

A core engine advances weighted particles (:class:`Particles`) or Gaussian parameters
(:class:`Gaussians`) through velocity-field plugins with pluggable integrators and writes
trajectories to H5MD files. See README.md for a quickstart and ../MATH.md conventions (§0).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    CapabilityError,
    MeasureflowError,
    ParameterError,
    PluginError,
    ShapeError,
    StateError,
    TimeRangeError,
    TrajectoryFileError,
    UnknownPluginError,
)
from .fields import Field, from_potential  # noqa: E402
from .plugins import get_registry, hookimpl, reload_registry  # noqa: E402
# Bound eagerly: the submodule shares the decorator's name, and a lazy lookup would hand out the
# module once anything had imported `measureflow.scenario`.
from .scenario import scenario  # noqa: E402
from .state import GaussianMixtures, Gaussians, Particles  # noqa: E402
from .triggers import On, Periodic  # noqa: E402

# Heavier pieces load on first use so that `import measureflow` stays fast.
_LAZY = {
    "Simulation": ("measureflow.simulation", "Simulation"),
    "Result": ("measureflow.simulation", "Result"),
    "open": ("measureflow.io.reader", "open_trajectory"),
    "measures": ("measureflow.measures", None),
    "reductions": ("measureflow.reductions", None),
    "observables": ("measureflow.observables", None),
    "plot": ("measureflow.plot", None),
    "diagnostics": ("measureflow.diagnostics", None),
    "schedules": ("measureflow.schedules", None),
    "geometry": ("measureflow.geometry", None),
    "couplings": ("measureflow.couplings", None),
    "mixtures": ("measureflow.mixtures", None),
    "training": ("measureflow.training", None),
    "run": ("measureflow.run", None),
    "integrators": ("measureflow.integrators", None),
    "io": ("measureflow.io", None),
    "sweep": ("measureflow.sweep", None),
    "triggers": ("measureflow.triggers", None),
    "status": ("measureflow.status", None),
    "Status": ("measureflow.status", "Status"),
    "Event": ("measureflow.events", "Event"),
    "events": ("measureflow.events", None),
    "density": ("measureflow.density", None),
    "likelihood": ("measureflow.data_likelihood", "likelihood"),
    # Earlier names of the training package, kept so that measureflow.learning.train_velocity and
    # measureflow.generators.train_generator still work.
    "learning": ("measureflow.training", None),
    "generators": ("measureflow.training", None),
}


def __getattr__(name):
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'measureflow' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def field(name: str, /, **params):
    """Build a registered field by name: ``measureflow.field("linear", A=..., b=...)``.

    A gradient flow with a first variation may move mass: ``geometry="fisher_rao"`` or ``"wfr"``
    with ``rate=α`` (and ``balanced=False`` for a mass that changes) — see
    :mod:`measureflow.geometry` and MATH.md §15.6; ``geometry="wasserstein"`` is the default.

    >>> import torch, measureflow
    >>> contraction = measureflow.field("linear", A=-torch.eye(2), b=torch.zeros(2))
    >>> cloud = measureflow.Particles(torch.ones(1, 3, 2))
    >>> contraction.velocity(0.0, cloud.x, cloud)[0, 0]
    tensor([-1., -1.])
    """
    return get_registry().field(name, **params)


def integrator(name: str, /, **params):
    """Build a registered integrator by name: ``measureflow.integrator("rk4")``."""
    return get_registry().integrator(name, **params)


__all__ = [
    "__version__",
    "Particles",
    "Gaussians",
    "GaussianMixtures",
    "Field",
    "from_potential",
    "Periodic",
    "On",
    "hookimpl",
    "get_registry",
    "reload_registry",
    "field",
    "integrator",
    "Simulation",
    "Result",
    "open",
    "scenario",
    "measures",
    "reductions",
    "observables",
    "plot",
    "diagnostics",
    "schedules",
    "geometry",
    "mixtures",
    "couplings",
    "training",
    "run",
    "integrators",
    "io",
    "sweep",
    "triggers",
    "status",
    "Status",
    "Event",
    "events",
    "density",
    "likelihood",
    "MeasureflowError",
    "ShapeError",
    "StateError",
    "CapabilityError",
    "TimeRangeError",
    "PluginError",
    "UnknownPluginError",
    "TrajectoryFileError",
    "ParameterError",
]
