"""The integrator protocol and the exception a failed step raises (DESIGN.md "integrator").

An integrator advances a state over one output interval of the simulation grid::

    new_state = integrator.advance(field, state, t0, t1, generator)

* fixed-step methods take exactly one step h = t1 − t0 (Gaussian states may split it into 2, 4, 8, …
  substeps when a step would leave the cone of SPD covariances);
* adaptive methods take as many internal steps as their controller needs and land exactly on t1;
* t1 < t0 integrates backwards (deterministic methods only).

Particles follow ẋ = v_t[μ](x) with the mean-field argument μ the stage's own particles; Gaussians
follow ṁ = b, Σ̇ = AΣ + ΣAᵀ with (b, A) = field.affine(t, N(m, Σ)) (MATH.md §0, eq. 0.1).
"""

from __future__ import annotations

import math

from ..errors import MeasureflowError, TimeRangeError
from ..fields import check_compatible

__all__ = ["StepFailure", "Integrator", "STAT_KEYS"]

#: The counters every integrator keeps in ``stats``.
STAT_KEYS = ("nfev", "steps", "accepted", "rejected")


class StepFailure(MeasureflowError, RuntimeError):
    """A step could not be taken: the state went non-finite, a covariance left the SPD cone after
    the maximum number of step reductions, or an adaptive step fell below ``dt_min``.

    ``reason`` is a short phrase (e.g. ``"covariance left the SPD cone"``); ``time`` is the time at
    which the failing step started. The simulation records both as the run's status.
    """

    def __init__(self, reason: str, time: float, detail: str = ""):
        self.reason = str(reason)
        self.time = float(time)
        self.detail = str(detail)
        message = f"step failure at t = {self.time:.9g}: {self.reason}"
        if self.detail:
            message += f" ({self.detail})"
        super().__init__(message)

    def __reduce__(self):  # keep reason/time when pickled across processes
        return (type(self), (self.reason, self.time, self.detail))


class Integrator:
    """Base class of the built-in integrators (third-party ones only need the same methods).

    Class attributes: ``name`` (registry name), ``order`` (convergence order; weak order for a
    stochastic method), ``adaptive``, ``stochastic``. ``stats`` counts field evaluations ("nfev"),
    internal steps attempted ("steps") and how many were kept ("accepted") or discarded
    ("rejected"); the counters are plain Python ints, so keeping them never touches the device.
    """

    name: str = "integrator"
    order: int = 0
    adaptive: bool = False
    stochastic: bool = False

    def __init__(self):
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)

    # -- protocol ---------------------------------------------------------------------------------
    def advance(self, field, state, t0: float, t1: float, generator=None):
        """Advance ``state`` from t0 to t1 under ``field``; returns the new state."""
        raise NotImplementedError

    def check(self, field, state) -> None:
        """Refuse a field/state combination this integrator cannot run (no device access).

        Called by the simulation at assembly and again at the start of every :meth:`advance`.
        """
        check_compatible(field, state, stochastic_integrator=self.stochastic)

    @property
    def options(self) -> dict:
        """The constructor keyword arguments, JSON-serialisable (written to trajectory parameters)."""
        return {}

    def state_dict(self) -> dict:
        """Everything a resumed run needs to take the same steps (JSON/torch-serialisable)."""
        return {"stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        stats = dict(state.get("stats", {}))
        unknown = set(stats) - set(STAT_KEYS)
        if unknown:
            raise ValueError(
                f"integrator {self.name!r}: unknown stats keys {sorted(unknown)} in the saved state; "
                f"expected a subset of {list(STAT_KEYS)}"
            )
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self.stats.update({k: int(v) for k, v in stats.items()})

    def reset_stats(self) -> None:
        self.stats = dict.fromkeys(STAT_KEYS, 0)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({self.name!r}{', ' if opts else ''}{opts})"


def as_time(value, what: str) -> float:
    """A finite Python float (times stay on the host: stage times never touch the device)."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a real number; received {value!r}") from None
    if not math.isfinite(t):
        raise TimeRangeError(f"{what} must be finite; received {value!r}")
    return t
