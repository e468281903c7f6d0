"""Interpolation schedules (MATH.md §1.3): coefficients against the table, derivatives against
finite differences and autograd, singular times, the generic constructions and their errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

import measureflow
from measureflow.errors import ParameterError, ShapeError, TimeRangeError, UnknownPluginError
from measureflow.schedules import CustomSchedule, ReparametrisedSchedule, Schedule, as_schedule, get

HALF_PI = math.pi / 2

#: MATH.md §1.3, written out independently with the math module: name -> (a, a', b, b').
TABLE = {
    "linear": (lambda t: 1 - t, lambda t: -1.0, lambda t: t, lambda t: 1.0),
    "cosine": (
        lambda t: math.cos(HALF_PI * t),
        lambda t: -HALF_PI * math.sin(HALF_PI * t),
        lambda t: math.sin(HALF_PI * t),
        lambda t: HALF_PI * math.cos(HALF_PI * t),
    ),
    "overshoot": (lambda t: (1 - t) * (1 - 2 * t), lambda t: 4 * t - 3, lambda t: t, lambda t: 1.0),
    "vp": (
        lambda t: math.exp(-t),
        lambda t: -math.exp(-t),
        lambda t: math.sqrt(1 - math.exp(-2 * t)),
        lambda t: math.exp(-2 * t) / math.sqrt(1 - math.exp(-2 * t)),
    ),
    "lipman": (lambda t: 1 - t, lambda t: -1.0, lambda t: 0.01 + 0.99 * t, lambda t: 0.99),
}
PARAMS = {"lipman": {"sigma_min": 0.01}}
TIMES = {"vp": [0.001, 0.05, 0.3, 1.0, 2.5, 7.0]}
DEFAULT_TIMES = [0.0, 0.05, 0.25, 0.5, 0.7, 0.999, 1.0]

SINGULAR = {
    "linear": {"a_zero": (1.0,), "b_zero": (0.0,)},
    "cosine": {"a_zero": (1.0,), "b_zero": (0.0,)},
    "overshoot": {"a_zero": (0.5, 1.0), "b_zero": (0.0,)},
    "vp": {"a_zero": (math.inf,), "b_zero": (0.0,)},
    "lipman": {"a_zero": (1.0,), "b_zero": ()},
}


def central_difference(f, t, h):
    return (f(t + h) - f(t - h)) / (2 * h)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_coefficients_match_the_table(name):
    schedule = get(name, **PARAMS.get(name, {}))
    for t in TIMES.get(name, DEFAULT_TIMES):
        got = [float(c) for c in schedule.coefficients(t)]
        want = [f(t) for f in TABLE[name]]
        # Closed forms in float64 against the same formulas: rounding only (a few ulp of values ≤ ~25).
        assert got == pytest.approx(want, rel=1e-13, abs=1e-14), (name, t)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_derivatives_match_finite_differences(name):
    schedule = get(name, **PARAMS.get(name, {}))
    lo, hi = schedule.time_range
    for t in TIMES.get(name, DEFAULT_TIMES):
        # Step relative to the distance from the singular end (vp: b ≈ √(2τ), |f'''/f'| ∼ 1/τ²):
        # truncation h²|f'''|/6 ≤ 2·10⁻⁹·|f'| and rounding ε|f|/h ≤ 10⁻¹⁰ at every tabulated time.
        h = min(1e-5, 1e-4 * t)
        if not (lo < t - h and t + h < hi):
            continue
        _, da, _, db = (float(c) for c in schedule.coefficients(t))

        def coeff(i):
            return lambda s: float(schedule.coefficients(s)[i])

        assert da == pytest.approx(central_difference(coeff(0), t, h), rel=1e-7, abs=1e-9), (name, t)
        assert db == pytest.approx(central_difference(coeff(2), t, h), rel=1e-7, abs=1e-9), (name, t)


@pytest.mark.parametrize("name", sorted(SINGULAR))
def test_singular_times_and_values_there(name):
    schedule = get(name, **PARAMS.get(name, {}))
    assert schedule.singular == SINGULAR[name]
    for t in schedule.singular["a_zero"]:
        if math.isfinite(t):
            assert float(schedule.coefficients(t)[0]) == 0.0
    for t in schedule.singular["b_zero"]:
        assert float(schedule.coefficients(t)[2]) == 0.0
    lo, hi = schedule.time_range
    assert (lo, hi) == ((0.0, math.inf) if name == "vp" else (0.0, 1.0))


def test_vp_is_accurate_near_the_data_end_and_blows_up_like_one_over_root_two_tau():
    vp = get("vp")
    tau = 1e-12
    a, da, b, db = (float(c) for c in vp.coefficients(tau))
    # b = √(1 − e^{−2τ}) ≈ √(2τ): expm1 keeps full relative accuracy (1 − exp would lose 4 digits).
    assert b == pytest.approx(math.sqrt(2 * tau), rel=1e-11)
    assert db == pytest.approx(1 / math.sqrt(2 * tau), rel=1e-11)
    assert float(vp.coefficients(0.0)[2]) == 0.0


def test_tensor_times_keep_shape_dtype_and_need_no_range_check():
    linear = get("linear")
    t = torch.linspace(0, 1, 7, dtype=torch.float32).reshape(7, 1)
    for c in linear.coefficients(t):
        assert c.shape == (7, 1) and c.dtype == torch.float32
    for c in linear.coefficients(0.25):
        assert c.shape == () and c.dtype == torch.float64
    a, da, b, db = get("cosine").coefficients(torch.tensor([0.3, 0.6], dtype=torch.float64))
    assert torch.allclose(a * a + b * b, torch.ones(2, dtype=torch.float64), atol=1e-15)


def test_number_outside_the_range_is_refused_with_the_range():
    with pytest.raises(TimeRangeError, match=r"\[0, 1\]"):
        get("linear").coefficients(1.5)
    with pytest.raises(TimeRangeError, match=r"\[0, inf\]"):
        get("vp").coefficients(-0.1)


def test_interpolant_gives_the_regression_pair():
    cosine = get("cosine")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    x1 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.rand(5, generator=g, dtype=torch.float64)
    z, dz = cosine.interpolant(t, x0, x1)
    a, da, b, db = cosine.coefficients(t)
    assert torch.allclose(z, a[:, None] * x0 + b[:, None] * x1, rtol=0, atol=1e-15)
    assert torch.allclose(dz, da[:, None] * x0 + db[:, None] * x1, rtol=0, atol=1e-15)


def test_lipman_validates_sigma_min():
    with pytest.raises(ParameterError, match=r"sigma_min must lie in \(0, 1\)"):
        get("lipman", sigma_min=0.0)
    with pytest.raises(ParameterError, match="sigma_min"):
        get("lipman", sigma_min="a lot")


# -- custom ----------------------------------------------------------------------------------------------


def test_custom_autograd_derivatives_match_the_table():
    custom = get(
        "custom",
        a=lambda t: torch.cos(HALF_PI * t),
        b=lambda t: torch.sin(HALF_PI * t),
    )
    cosine = get("cosine")
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for mine, ref in zip(custom.coefficients(t), cosine.coefficients(t)):
        # Same function, two float64 evaluations (sin(π(1−t)/2) vs cos(πt/2)): a few ulp.
        assert torch.allclose(mine, ref, rtol=0, atol=1e-15)
    assert custom.singular == {"a_zero": (1.0,), "b_zero": (0.0,)}


def test_custom_finds_interior_zeros_by_bisection():
    custom = CustomSchedule(a=lambda t: (1 - t) * (1 - 2 * t), b=lambda t: t)
    assert custom.singular["a_zero"] == pytest.approx((0.5, 1.0), abs=1e-15)
    assert custom.singular["b_zero"] == (0.0,)
    # A zero strictly between grid points (1/3 is not a grid point of the 2049-point grid).
    shifted = CustomSchedule(a=lambda t: 1 - 3 * t, b=lambda t: t)
    assert shifted.singular["a_zero"] == pytest.approx((1 / 3,), abs=1e-15)


def test_custom_explicit_singular_times_and_constant_derivative():
    custom = CustomSchedule(a=lambda t: 1 - t * t, b=lambda t: 0.5, singular={"a_zero": [1.0]})
    a, da, b, db = custom.coefficients(torch.tensor([0.25, 0.5], dtype=torch.float64))
    assert da.tolist() == [-0.5, -1.0] and b.tolist() == [0.5, 0.5] and db.tolist() == [0.0, 0.0]
    assert custom.singular == {"a_zero": (1.0,), "b_zero": ()}


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
def test_custom_refuses_bad_callables():
    with pytest.raises(ParameterError, match="torch functions"):
        CustomSchedule(a=lambda t: math.cos(t), b=lambda t: t)
    with pytest.raises(ShapeError, match="elementwise"):
        CustomSchedule(a=lambda t: t.sum(-1, keepdim=True) * torch.ones(2, dtype=t.dtype), b=lambda t: t)
    with pytest.raises(ParameterError, match="not finite"):
        CustomSchedule(a=lambda t: 1 / t, b=lambda t: t)
    with pytest.raises(ParameterError, match="callable"):
        CustomSchedule(a=1.0, b=lambda t: t)
    with pytest.raises(ParameterError, match="lo < hi"):
        CustomSchedule(a=lambda t: 1 - t, b=lambda t: t, time_range=(1, 0))


# -- reparametrised ----------------------------------------------------------------------------------------


def test_reparametrisation_chain_rule():
    sq = ReparametrisedSchedule(base="linear", lam=lambda t: t * t)
    t = torch.tensor([0.1, 0.4, 0.9], dtype=torch.float64)
    a, da, b, db = sq.coefficients(t)
    assert torch.allclose(a, 1 - t * t, rtol=0, atol=1e-16)
    assert torch.allclose(da, -2 * t, rtol=0, atol=1e-16)
    assert torch.allclose(b, t * t, rtol=0, atol=1e-16)
    assert torch.allclose(db, 2 * t, rtol=0, atol=1e-16)
    assert sq.singular == {"a_zero": (1.0,), "b_zero": (0.0,)}
    explicit = ReparametrisedSchedule(base="linear", lam=lambda t: t * t, lam_prime=lambda t: 2 * t)
    assert torch.equal(explicit.coefficients(t)[1], da)


def test_cosine_is_vp_after_tau_equal_minus_log_cos():
    """MATH.md §1.3: cosine = OU after τ = −log cos(πt/2)."""
    lam = lambda t: -torch.log(torch.cos(HALF_PI * t))  # noqa: E731
    reparam = get("reparametrised", base="vp", lam=lam)
    cosine = get("cosine")
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    for mine, ref in zip(reparam.coefficients(t), cosine.coefficients(t)):
        # exp(log(cos)) and √(1 − cos²) round-trips: relative error ~1e-16·|log cos| / cos² ≤ ~1e-12 at t = 0.99.
        assert torch.allclose(mine, ref, rtol=1e-11, atol=1e-13)
    # a → 0 as λ → ∞ is seen at t = 1, b = 0 at t = 0.
    assert reparam.singular == {"a_zero": (1.0,), "b_zero": (0.0,)}


def test_reparametrised_overshoot_moves_interior_zero_and_accepts_a_mapping_base():
    r = get("reparametrised", base={"name": "overshoot"}, lam=lambda t: t * t)
    assert r.singular["a_zero"] == pytest.approx((math.sqrt(0.5), 1.0), abs=1e-15)


def test_reparametrised_refuses_non_monotone_and_out_of_range_maps():
    with pytest.raises(ParameterError, match="monotone"):
        ReparametrisedSchedule(base="linear", lam=lambda t: 4 * t * (1 - t))
    with pytest.raises(ParameterError, match="outside the range"):
        ReparametrisedSchedule(base="linear", lam=lambda t: 2 * t)
    with pytest.raises(ParameterError, match="callable"):
        ReparametrisedSchedule(base="linear")
    with pytest.raises(UnknownPluginError, match="linear"):
        ReparametrisedSchedule(base="straight", lam=lambda t: t)


# -- registry ---------------------------------------------------------------------------------------------


def test_registered_names_and_lookup():
    registry = measureflow.get_registry()
    assert {"linear", "cosine", "overshoot", "vp", "lipman", "reparametrised", "custom"} <= set(registry.names("schedules"))
    assert isinstance(registry.schedule("lipman", sigma_min=0.1), Schedule)
    with pytest.raises(UnknownPluginError, match="registered schedules: .*cosine"):
        registry.schedule("sigmoid")
    assert as_schedule({"name": "lipman", "sigma_min": 0.2}).sigma_min == 0.2
    with pytest.raises(ParameterError, match="'name'"):
        as_schedule({"sigma_min": 0.2})
    with pytest.raises(ParameterError, match="expected a schedule"):
        as_schedule(3)


def test_describe_is_json():
    for s in (get("linear"), get("lipman", sigma_min=0.1), get("reparametrised", base="vp", lam=lambda t: t * t),
              get("custom", a=lambda t: 1 - t, b=lambda t: t)):
        text = json.dumps(s.describe())
        assert s.name in text


def test_a_schedule_parameter_called_name_is_not_the_lookup_name():
    # The lookup name is positional-only, so a schedule's own ``name`` parameter passes through.
    s = get("reparametrised", base="linear", lam=lambda t: t * t, lam_prime=lambda t: 2 * t, name="squared")
    assert s.name == "squared"
    a, da, b, db = s.coefficients(torch.tensor([0.5], dtype=torch.float64))
    assert torch.allclose(torch.stack([a, da, b, db]).flatten(),
                          torch.tensor([0.75, -1.0, 0.25, 1.0], dtype=torch.float64), atol=1e-15)


def test_a_user_schedule_needs_only_its_coefficients():
    """Schedule is abstract: a subclass without _coefficients cannot be built; one with it works."""

    class Incomplete(Schedule):
        name = "incomplete"

    with pytest.raises(TypeError, match="_coefficients"):
        Incomplete()

    class Quadratic(Schedule):  # a = 1 − t², b = t² (MATH.md §1.3 form Zₜ = aₜX₀ + bₜX₁)
        name = "quadratic"

        def _coefficients(self, t):
            return 1 - t * t, -2 * t, t * t, 2 * t

    a, da, b, db = Quadratic().coefficients(0.5)
    assert (float(a), float(da), float(b), float(db)) == (0.75, -1.0, 0.25, 1.0)  # exact in binary
    with pytest.raises(TimeRangeError, match=r"defined for t in \[0, 1\]"):
        Quadratic().coefficients(1.5)
