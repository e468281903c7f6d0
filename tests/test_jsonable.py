import json
import math
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch

import measureflow.io
from measureflow.errors import ParameterError
from measureflow.jsonable import to_jsonable, to_jsonable_lenient


@attrs.frozen
class Options:
    rate: float
    shape: tuple


def test_strict_conversion_keeps_what_json_round_trips():
    value = {
        "n": np.int64(3),
        "x": np.float32(0.5),
        "grid": np.arange(3),
        "t": torch.tensor([[1.0, 2.0]]),
        "pair": (1, "a"),
        "set": {2, 1},
        "path": Path("/tmp/run.h5"),
        "dtype": torch.float64,
        "inf": math.inf,
        7: None,
        "options": Options(0.1, (2, 2)),
    }
    out = to_jsonable(value)
    assert out == {
        "n": 3, "x": 0.5, "grid": [0, 1, 2], "t": [[1.0, 2.0]], "pair": [1, "a"], "set": [1, 2],
        "path": "/tmp/run.h5", "dtype": "torch.float64", "inf": math.inf, "7": None,
        "options": {"rate": 0.1, "shape": [2, 2]},
    }
    assert json.loads(json.dumps(out)) == out
    assert measureflow.io.to_jsonable is to_jsonable  # still importable from its old home


def test_strict_conversion_names_where_the_bad_value_is():
    with pytest.raises(ParameterError, match=r"^scenario parameters\['field'\]\['kernel'\]: a object"):
        to_jsonable({"field": {"kernel": object()}}, "scenario parameters")
    with pytest.raises(ParameterError, match=r"key \(1, 2\) of type tuple"):
        to_jsonable({(1, 2): 0})


def test_lenient_conversion_falls_back_to_str():
    out = to_jsonable_lenient({"lr": 1e-3, "shape": (2, 3), 5: torch.float32, "device": torch.device("cpu")})
    assert out == {"lr": 1e-3, "shape": [2, 3], "5": "torch.float32", "device": "cpu"}
