import math
import re

import attrs
import numpy as np
import pytest
import torch

from measureflow.errors import ParameterError, ShapeError
from measureflow import validators as V


@pytest.mark.parametrize(
    "check, value, expected",
    [
        (V.check_positive, 0.5, 0.5),
        (V.check_positive, "2.5", 2.5),
        (V.check_positive, np.float32(0.25), 0.25),
        (V.check_positive, torch.tensor(3.0), 3.0),
        (V.check_nonnegative, 0, 0.0),
        (V.check_finite, -7, -7.0),
        (V.check_probability, 1, 1.0),
        (V.check_probability, 0.0, 0.0),
    ],
)
def test_accepted_values_come_back_as_floats(check, value, expected):
    out = check(value, "p")
    assert type(out) is float and out == expected


@pytest.mark.parametrize(
    "check, value, requirement",
    [
        (V.check_positive, 0.0, "must be positive and finite"),
        (V.check_positive, -1, "must be positive and finite"),
        (V.check_positive, math.inf, "must be positive and finite"),
        (V.check_positive, math.nan, "must be positive and finite"),
        (V.check_positive, "small", "must be positive and finite"),
        (V.check_positive, True, "must be positive and finite"),
        (V.check_nonnegative, -1e-300, "must be non-negative and finite"),
        (V.check_nonnegative, math.inf, "must be non-negative and finite"),
        (V.check_finite, -math.inf, "must be finite"),
        (V.check_finite, None, "must be finite"),
        (V.check_probability, 1.0000001, r"must lie in \[0, 1\]"),
        (V.check_probability, -0.0001, r"must lie in \[0, 1\]"),
    ],
)
def test_refused_values_are_named_with_what_to_pass(check, value, requirement):
    with pytest.raises(ParameterError, match=rf"^where: p {requirement}; received {re.escape(repr(value))}\. Pass "):
        check(value, "p", "where")


def test_open_probability_refuses_the_ends():
    assert V.check_probability(1e-4, "sigma_min", open_interval=True) == 1e-4
    for end in (0.0, 1.0):
        with pytest.raises(ParameterError, match=r"^sigma_min must lie in \(0, 1\); received"):
            V.check_probability(end, "sigma_min", open_interval=True)


def test_integers_accept_integral_values_only():
    assert V.check_int(3, "n") == 3 and type(V.check_int(np.int64(4), "n")) is int
    assert V.check_int(5.0, "n") == 5 and V.check_int(0, "n", minimum=0) == 0
    cases = [(0, 1, "be a positive integer"), (2.5, 1, "be a positive integer"), (True, 1, "be a positive integer"),
             ("3", 1, "be a positive integer"), (math.inf, 1, "be a positive integer"), (math.nan, 1, "be a positive integer"),
             (-1, 0, "be a non-negative integer"), (2, 3, "be an integer ≥ 3")]
    for value, minimum, requirement in cases:
        with pytest.raises(ParameterError, match=rf"^f: n must {requirement}; received {re.escape(repr(value))}\. Pass a whole number ≥ {minimum}\.$"):
            V.check_int(value, "n", "f", minimum=minimum)


def test_caller_chooses_the_error_type_and_the_advice():
    with pytest.raises(ShapeError, match=r"^replicas must be a positive integer; received 0\. Pass one\.$"):
        V.check_int(0, "replicas", advice="Pass one.", error=ShapeError)


@attrs.frozen
class Settings:
    count: int = attrs.field(default=1, validator=V.integer("settings"))
    scale: float = attrs.field(default=1.0, validator=V.positive())
    share: float = attrs.field(default=0.5, validator=V.probability())
    shift: float = attrs.field(default=0.0, validator=[V.finite(), V.nonnegative()])
    rate: float = attrs.field(default=1.0, converter=V.to_positive("settings"))


def test_attrs_validators_name_the_attribute_and_keep_its_value():
    s = Settings(count=np.int64(2), scale=3, rate="0.5")
    assert s.scale == 3 and type(s.scale) is int  # validators do not convert
    assert s.rate == 0.5 and type(s.rate) is float  # the converter does
    cases = [
        (dict(count=2.0), r"^settings: count must be a positive integer; received 2\.0\."),
        (dict(count=False), r"^settings: count must be a positive integer"),
        (dict(scale="3"), r"^Settings: scale must be positive and finite; received '3'\."),
        (dict(scale=0), r"^Settings: scale must be positive and finite; received 0\."),
        (dict(share=2), r"^Settings: share must lie in \[0, 1\]"),
        (dict(shift=math.nan), r"^Settings: shift must be finite"),
        (dict(shift=-1.0), r"^Settings: shift must be non-negative and finite"),
        (dict(rate=-2), r"^settings: rate must be positive and finite; received -2\."),
    ]
    for kwargs, message in cases:
        with pytest.raises(ParameterError, match=message):
            Settings(**kwargs)
