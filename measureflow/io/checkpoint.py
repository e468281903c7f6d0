"""Checkpoint files: written atomically, read back without unpickling arbitrary objects.

:func:`save_checkpoint` writes through :func:`measureflow.io.atomic.atomic_replace` (a temporary
``<path>.tmp-<pid>`` in the same directory, fsynced, renamed over ``path``, directory fsynced), so at
every instant ``path`` is either the previous checkpoint or the new one, never a torn file. :func:`load_checkpoint` uses ``torch.load(weights_only=True)``: tensors (including
``torch.Generator`` states, which are uint8 tensors), numbers, strings, bytes, lists, tuples, sets
and dicts load; arbitrary pickled objects are refused.

Integrity: the payload carries ``"sha256"``, a digest of its content (every key, number, string and
tensor — dtype, shape and bytes; :func:`payload_digest`), so a file whose content changed — one
flipped float in a tensor record, which torch itself would load without checking its CRC — is
refused. The payload stays a plain dict that ``torch.load`` reads.
A run's checkpoint (:func:`load_run_checkpoint`) must carry the checksum, and its step and time must
lie on the run's time grid.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import MeasureflowError, ParameterError, TrajectoryFileError
from .atomic import atomic_replace, fsync_directory, io_failure  # noqa: F401 - fsync_directory: imported from here by sweep

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
    payload = {**payload, _DIGEST: payload_digest(payload)}
    try:
        with atomic_replace(path) as tmp:
            with open(tmp, "wb") as handle:
                torch.save(payload, handle)
    except (OSError, RuntimeError) as exc:  # disk full: the previous checkpoint is still in place
        raise io_failure(path, "write the checkpoint", exc) from exc
    return path


_DIGEST = "sha256"


def _feed(h, value) -> None:
    """Feed ``value`` to the hash ``h``: a type tag, then its content (tensors: dtype, shape, bytes)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(value.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for key, item in value.items():
            _feed(h, key)
            _feed(h, item)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__[0]}{len(value)}".encode())
        for item in value:
            _feed(h, item)
    elif isinstance(value, (set, frozenset)):
        h.update(f"S{len(value)}".encode())
        for digest in sorted(payload_digest(item) for item in value):
            h.update(digest.encode())
    elif isinstance(value, bytes):
        h.update(b"B%d:" % len(value) + value)
    else:  # numbers, strings, None, dtypes, devices, sizes: their repr is exact
        text = repr(value)
        h.update(f"{type(value).__name__}{len(text)}:{text}".encode())


def payload_digest(value) -> str:
    """SHA-256 of a checkpoint payload's content (see the module docstring)."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def _unreadable(path, exc: BaseException) -> TrajectoryFileError:
    return TrajectoryFileError(
        f"checkpoint {path}: cannot be read as a measureflow checkpoint "
        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
        "the file is corrupt or was not written by save_checkpoint. Delete it to restart the run "
        "from the beginning"
    )


def _read(path: Path, map_location) -> tuple[dict, bool]:
    """The payload (without its digest) and whether a digest verified it (False for a file written
    without one)."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to decode means an unusable file
        raise _unreadable(path, exc) from exc
    if not (isinstance(payload, dict) and _DIGEST in payload):
        return payload, False
    payload = dict(payload)
    stored = payload.pop(_DIGEST)
    if stored != payload_digest(payload):
        raise TrajectoryFileError(
            f"checkpoint {path}: its checksum does not match its content (the file was changed or damaged "
            "on disk); delete it and start the run again (--restart)"
        )
    return payload, True


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors land on ``map_location``)."""
    path = Path(path)
    if not path.is_file():
        raise TrajectoryFileError(
            f"checkpoint {path}: no such file; start the run without --resume, or point to the "
            "checkpoint written next to the trajectory"
        )
    payload, _ = _read(path, map_location)
    if not isinstance(payload, dict):
        raise TrajectoryFileError(
            f"checkpoint {path}: expected a dict payload, found {type(payload).__name__}; "
            "the file was not written by save_checkpoint"
        )
    return payload


def load_run_checkpoint(path, *, owner: str, expected_format: str, fingerprint: str, limit: int,
                        differs: str, time_at: Callable[[int], float] | None = None) -> dict:
    """Read a run's checkpoint (:class:`measureflow.run.RunLoop`) and check that it belongs to this run.

    ``owner`` names the run (for messages), ``limit`` its last step, ``differs`` what a different
    fingerprint means, ``time_at`` its time grid. Refuses a file without a verified checksum, another
    kind of run's file, another run's file, and a step beyond ``limit`` or off the time grid.
    """
    path = Path(path)
    if not path.is_file():
        load_checkpoint(path)  # the "no such file" message
    payload, verified = _read(path, "cpu")
    if not isinstance(payload, dict) or payload.get("format") != expected_format:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise TrajectoryFileError(
            f"checkpoint {path} is not a {owner} checkpoint (format {found!r}); point "
            "checkpoint= at the file this run wrote, or delete it"
        )
    if not verified:
        raise TrajectoryFileError(
            f"checkpoint {path} carries no checksum (it was written by an older measureflow or by another "
            "program); delete it and start the run again (--restart)"
        )
    if payload.get("fingerprint") != fingerprint:
        raise MeasureflowError(
            f"checkpoint {path} belongs to a different run ({differs}); delete it or point "
            "checkpoint= elsewhere"
        )
    step = payload.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise TrajectoryFileError(f"checkpoint {path}: its step {step!r} is not a step number; delete it (--restart)")
    if step > limit:
        raise ParameterError(
            f"{owner}: checkpoint {path} is at step {step}, beyond the run's {limit} steps; ask for at least {step}"
        )
    if time_at is not None:
        saved, expected = payload.get("time"), float(time_at(step))
        if not isinstance(saved, float) or not (saved == expected or (math.isnan(saved) and math.isnan(expected))):
            raise TrajectoryFileError(
                f"checkpoint {path}: step {step} is at t = {saved!r}, but this run's grid has t = {expected!r} "
                "there; the checkpoint is damaged or from another grid: delete it (--restart)"
            )
    return payload
