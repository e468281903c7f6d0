"""JSON conversion, two ways (DESIGN.md "Trajectory files": parameters are stored as JSON).

* :func:`to_jsonable` — strict: numbers, strings, lists and dicts (and the few types that convert
  without loss: numpy scalars and arrays, small tensors, tuples, sets, paths, dtypes, devices, attrs
  instances) or a ParameterError naming where the offending value sits. For what a run records and
  must read back: trajectory parameters, sweep parameters.
* :func:`to_jsonable_lenient` — for descriptions (integrator options, training configs): anything JSON
  cannot hold becomes its ``str()``, so describing an object never fails.
"""

from __future__ import annotations

import json
from pathlib import PurePath
from typing import Any

import attrs
import numpy as np
import torch

from .errors import ParameterError

__all__ = ["to_jsonable", "to_jsonable_lenient"]


def to_jsonable(value: Any, where: str = "parameters") -> Any:
    """A copy of ``value`` made of dict/list/str/int/float/bool/None only (what JSON round-trips).

    numpy scalars and arrays, small tensors, tuples, paths, dtypes and devices are converted;
    anything else is refused with the key path where it was found, so a run never starts with
    parameters that cannot be written. Non-finite floats are kept (Python's json reads them back).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, np.generic):
        return to_jsonable(value.item(), where)
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist(), where)
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist(), where)
    if isinstance(value, (torch.dtype, torch.device, PurePath)):
        return str(value)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise ParameterError(
                    f"{where}: key {key!r} of type {type(key).__name__} cannot be stored as JSON; use str keys"
                )
            out[str(key)] = to_jsonable(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        return [to_jsonable(item, f"{where}[{i}]") for i, item in enumerate(sorted(value, key=repr))]
    if attrs.has(type(value)):
        return to_jsonable(attrs.asdict(value, recurse=False), where)
    raise ParameterError(
        f"{where}: a {type(value).__name__} ({value!r:.80}) cannot be stored in the trajectory's JSON "
        "parameters; convert it to numbers, strings, lists or dicts"
    )


def to_jsonable_lenient(value: Any) -> Any:
    """A JSON round trip of ``value`` in which anything JSON cannot hold becomes ``str(value)``.

    Tuples come back as lists and non-string keys as strings, as ``json.loads(json.dumps(...))`` gives them.
    """
    return json.loads(json.dumps(value, default=str))
