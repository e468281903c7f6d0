"""Butcher tableaus of explicit Runge–Kutta methods.

A tableau (c, a, b) defines the s-stage method

    kᵢ = f(t + cᵢh, y + h Σ_{j<i} aᵢⱼ kⱼ),   y' = y + h Σᵢ bᵢ kᵢ,

and an embedded pair adds weights b̂ of a lower-order solution; ``b_error = b − b̂`` gives the local
error estimate h Σᵢ (bᵢ − b̂ᵢ) kᵢ. Coefficients are checked at construction (strictly lower
triangular a, row sums Σⱼ aᵢⱼ = cᵢ, Σᵢ bᵢ = 1, Σᵢ (b − b̂)ᵢ = 0), so a typo cannot silently
lower a method's order.
"""

from __future__ import annotations

from fractions import Fraction as F

import attrs

__all__ = ["ButcherTableau", "EULER", "HEUN", "MIDPOINT", "RK4", "DOPRI5"]

_TOL = 1e-14


def _floats(values) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _rows(values) -> tuple[tuple[float, ...], ...]:
    return tuple(_floats(row) for row in values)


@attrs.frozen
class ButcherTableau:
    """An explicit Runge–Kutta method: nodes ``c``, strictly lower-triangular ``a`` given as its rows
    below the diagonal (row i has i entries), weights ``b``, and optionally the error weights
    ``b_error = b − b̂`` of an embedded method of order ``order − 1``.

    ``fsal`` (first same as last) marks methods whose last stage is f(t + h, y'): it can be reused as
    the next step's first stage.

    ``dense`` (optional) is a continuous extension: row i holds the coefficients of the polynomial
    bᵢ(θ) = Σⱼ dense[i][j] θ^(j+1), so that y(t + θh) = y + h Σᵢ bᵢ(θ) kᵢ for θ ∈ [0, 1]; it must
    give bᵢ(1) = bᵢ.
    """

    name: str
    order: int
    c: tuple[float, ...] = attrs.field(converter=_floats)
    a: tuple[tuple[float, ...], ...] = attrs.field(converter=_rows)
    b: tuple[float, ...] = attrs.field(converter=_floats)
    b_error: tuple[float, ...] | None = attrs.field(
        default=None, converter=attrs.converters.optional(_floats)
    )
    fsal: bool = False
    dense: tuple[tuple[float, ...], ...] | None = attrs.field(
        default=None, converter=attrs.converters.optional(_rows)
    )

    def __attrs_post_init__(self):
        s = len(self.c)
        if s == 0 or len(self.b) != s or len(self.a) != s:
            raise ValueError(
                f"tableau {self.name!r}: c, b and the rows of a must all have s entries; "
                f"received len(c) = {s}, len(b) = {len(self.b)}, rows of a = {len(self.a)}"
            )
        for i, row in enumerate(self.a):
            if len(row) != i:
                raise ValueError(
                    f"tableau {self.name!r}: row {i} of a must have {i} entries (explicit method: "
                    f"strictly below the diagonal); received {len(row)}"
                )
            if abs(sum(row) - self.c[i]) > _TOL * max(1.0, abs(self.c[i])) * 10:
                raise ValueError(
                    f"tableau {self.name!r}: row {i} of a sums to {sum(row)!r}, but c[{i}] = {self.c[i]!r}"
                )
        if abs(sum(self.b) - 1.0) > 10 * _TOL:
            raise ValueError(f"tableau {self.name!r}: the weights b sum to {sum(self.b)!r}, not 1")
        if self.b_error is not None:
            if len(self.b_error) != s:
                raise ValueError(f"tableau {self.name!r}: b_error must have {s} entries; received {len(self.b_error)}")
            if abs(sum(self.b_error)) > 10 * _TOL:
                raise ValueError(
                    f"tableau {self.name!r}: b_error = b − b̂ must sum to 0; sums to {sum(self.b_error)!r}"
                )
        if self.fsal and (self.c[-1] != 1.0 or tuple(self.a[-1]) != tuple(self.b[:-1]) or self.b[-1] != 0.0):
            raise ValueError(f"tableau {self.name!r}: fsal needs c[-1] = 1, a[-1] = b[:-1] and b[-1] = 0")

        if self.dense is not None:
            if len(self.dense) != s:
                raise ValueError(f"tableau {self.name!r}: dense must have one row per stage ({s}); received {len(self.dense)}")
            for i, row in enumerate(self.dense):
                if abs(sum(row) - self.b[i]) > 100 * _TOL:
                    raise ValueError(
                        f"tableau {self.name!r}: dense row {i} sums to {sum(row)!r}, but at θ = 1 the "
                        f"interpolant must give b[{i}] = {self.b[i]!r}"
                    )

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def embedded(self) -> bool:
        return self.b_error is not None


EULER = ButcherTableau("euler", 1, c=[0], a=[[]], b=[1])

#: Heun's method (explicit trapezoid rule).
HEUN = ButcherTableau("heun", 2, c=[0, 1], a=[[], [1]], b=[0.5, 0.5])

#: Explicit midpoint rule.
MIDPOINT = ButcherTableau("midpoint", 2, c=[0, 0.5], a=[[], [0.5]], b=[0, 1])

#: The classical fourth-order Runge–Kutta method.
RK4 = ButcherTableau(
    "rk4",
    4,
    c=[0, 0.5, 0.5, 1],
    a=[[], [0.5], [0, 0.5], [0, 0, 1]],
    b=[F(1, 6), F(1, 3), F(1, 3), F(1, 6)],
)

# Dormand & Prince (1980), the 5(4) pair with the fifth-order solution propagated.
_DP_B = [F(35, 384), 0, F(500, 1113), F(125, 192), F(-2187, 6784), F(11, 84), 0]
_DP_B_HAT = [F(5179, 57600), 0, F(7571, 16695), F(393, 640), F(-92097, 339200), F(187, 2100), F(1, 40)]

#: Dormand–Prince 5(4): seven stages (six new per step thanks to FSAL), embedded fourth-order error estimate.
DOPRI5 = ButcherTableau(
    "dopri5",
    5,
    c=[0, F(1, 5), F(3, 10), F(4, 5), F(8, 9), 1, 1],
    a=[
        [],
        [F(1, 5)],
        [F(3, 40), F(9, 40)],
        [F(44, 45), F(-56, 15), F(32, 9)],
        [F(19372, 6561), F(-25360, 2187), F(64448, 6561), F(-212, 729)],
        [F(9017, 3168), F(-355, 33), F(46732, 5247), F(49, 176), F(-5103, 18656)],
        _DP_B[:-1],
    ],
    b=_DP_B,
    # Exact rational differences, rounded once (b − b̂ computed in floats would lose digits).
    b_error=[x - y for x, y in zip(_DP_B, _DP_B_HAT)],
    fsal=True,
    # Shampine's fourth-order continuous extension of the 5(4) pair ("Some practical Runge–Kutta
    # formulas", Math. Comp. 46, 1986): y(t + θh) = y + h Σᵢ bᵢ(θ) kᵢ, bᵢ(θ) = Σⱼ dense[i][j] θ^(j+1).
    dense=[
        [1, F(-8048581381, 2820520608), F(8663915743, 2820520608), F(-12715105075, 11282082432)],
        [0, 0, 0, 0],
        [0, F(131558114200, 32700410799), F(-68118460800, 10900136933), F(87487479700, 32700410799)],
        [0, F(-1754552775, 470086768), F(14199869525, 1410260304), F(-10690763975, 1880347072)],
        [0, F(127303824393, 49829197408), F(-318862633887, 49829197408), F(701980252875, 199316789632)],
        [0, F(-282668133, 205662961), F(2019193451, 616988883), F(-1453857185, 822651844)],
        [0, F(40617522, 29380423), F(-110615467, 29380423), F(69997945, 29380423)],
    ],
)
