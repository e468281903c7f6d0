"""Checkpoint files: written atomically, read back without unpickling arbitrary objects.

:func:`save_checkpoint` writes through :func:`measureflow.io.atomic.atomic_replace` (a temporary
``<path>.tmp-<pid>`` in the same directory, fsynced, renamed over ``path``, directory fsynced), so at
every instant ``path`` is either the previous checkpoint or the new one, never a torn file. :func:`load_checkpoint` uses ``torch.load(weights_only=True)``: tensors (including
``torch.Generator`` states, which are uint8 tensors), numbers, strings, bytes, lists, tuples, sets
and dicts load; arbitrary pickled objects are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MeasureflowError, ParameterError, TrajectoryFileError
from .atomic import atomic_replace, fsync_directory  # noqa: F401 - fsync_directory: imported from here by sweep

__all__ = ["save_checkpoint", "load_checkpoint"]

_LEAVES = (torch.Tensor, bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.Size, torch.device)


def _plain(value: Any, where: str) -> Any:
    """Check (and lightly normalise) a payload so that weights_only loading will accept it."""
    if isinstance(value, _LEAVES):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        raise TypeError(f"checkpoint {where}: numpy arrays are not stored; pass torch.from_numpy(array)")
    if isinstance(value, dict):
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return type(value)(items) if not isinstance(value, frozenset) else frozenset(items)
    raise TypeError(
        f"checkpoint {where}: a {type(value).__name__} cannot be stored; use tensors, numbers, strings, "
        "bytes, lists, tuples and dicts (call .state_dict() on objects)"
    )


def save_checkpoint(path, payload: dict) -> Path:
    """Write ``payload`` to ``path`` atomically (:func:`measureflow.io.atomic.atomic_replace`)."""
    path = Path(path)
    if not isinstance(payload, dict):
        raise TypeError(f"checkpoint payload must be a dict, received {type(payload).__name__}")
    payload = _plain(payload, "payload")
    with atomic_replace(path) as tmp:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors land on ``map_location``)."""
    path = Path(path)
    if not path.is_file():
        raise TrajectoryFileError(
            f"checkpoint {path}: no such file; start the run without --resume, or point to the "
            "checkpoint written next to the trajectory"
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to decode means an unusable file
        raise TrajectoryFileError(
            f"checkpoint {path}: cannot be read as a measureflow checkpoint "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "the file is corrupt or was not written by save_checkpoint. Delete it to restart the run "
            "from the beginning"
        ) from exc
    if not isinstance(payload, dict):
        raise TrajectoryFileError(
            f"checkpoint {path}: expected a dict payload, found {type(payload).__name__}; "
            "the file was not written by save_checkpoint"
        )
    return payload


def load_run_checkpoint(path, *, owner: str, expected_format: str, fingerprint: str, limit: int,
                        differs: str) -> dict:
    """Read a run's checkpoint (:class:`measureflow.run.RunLoop`) and check that it belongs to this run.

    ``owner`` names the run (for messages), ``limit`` its last step, ``differs`` what a different
    fingerprint means. Refuses another kind of run's file, another run's file, and a checkpoint
    beyond ``limit``.
    """
    payload = load_checkpoint(path)
    if payload.get("format") != expected_format:
        raise TrajectoryFileError(
            f"checkpoint {path} is not a {owner} checkpoint (format {payload.get('format')!r}); point "
            "checkpoint= at the file this run wrote, or delete it"
        )
    if payload.get("fingerprint") != fingerprint:
        raise MeasureflowError(
            f"checkpoint {path} belongs to a different run ({differs}); delete it or point "
            "checkpoint= elsewhere"
        )
    done = int(payload["step"])
    if done > limit:
        raise ParameterError(
            f"{owner}: checkpoint {path} is at step {done}, beyond the run's {limit} steps; ask for at least {done}"
        )
    return payload
