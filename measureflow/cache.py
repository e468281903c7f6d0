"""Per-device copies of what a field derives from its fixed parameters.

A field's parameters (a target's mean and precision, a table of matrices, a direction set, a sample of the
target) are fixed when the field is built, but the states it meets may live on any device and in any
floating dtype. Converting them at every evaluation costs a copy (on an accelerator, a host-to-device
transfer) inside the step loop; :class:`DeviceCache` builds them once per (device, dtype), on first use,
and hands back the same objects afterwards.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

import torch

__all__ = ["DeviceCache"]

T = TypeVar("T")
_MISSING = object()  # a built value may be None


class DeviceCache(Generic[T]):
    """What ``build`` derives from fixed parameters, built once per (device, dtype) on first use.

    ``cache(like)`` returns ``build(like)`` for the first tensor ``like`` seen on its (device, dtype) and the
    same object for every later tensor on that device and dtype. ``build`` receives that first tensor as a
    template: it must depend on its device and dtype only (and may check its last dimension), never on its
    values or its other sizes, since every later tensor of the same device and dtype gets the same answer.
    What it returns is up to the field: a tensor, a tuple or dict of them, a measure.

        pull = DeviceCache(lambda like: precision.to(like))   # fields pass a bound method
        drift = (mean - x) @ pull(x)

    Pickling keeps ``build`` and drops what was built (no device tensors travel with a pickled field; the
    copy rebuilds on first use); :meth:`clear` drops it too.
    """

    __slots__ = ("_build", "_built")

    def __init__(self, build: Callable[[torch.Tensor], T]):
        if not callable(build):
            raise TypeError(f"DeviceCache: build must be a callable of a template tensor; received {build!r}")
        self._build = build
        self._built: dict[tuple[torch.device, torch.dtype], T] = {}

    def __call__(self, like: torch.Tensor) -> T:
        if not isinstance(like, torch.Tensor):
            raise TypeError(
                f"DeviceCache: pass a tensor whose device and dtype select the copy; received {type(like).__name__}"
            )
        key = (like.device, like.dtype)
        hit = self._built.get(key, _MISSING)
        if hit is _MISSING:
            hit = self._built[key] = self._build(like)
        return hit

    def clear(self) -> None:
        """Drop every built value (each is rebuilt on its next use)."""
        self._built.clear()

    def __len__(self) -> int:
        """How many (device, dtype) copies are built."""
        return len(self._built)

    def __getstate__(self):
        return {"build": self._build}

    def __setstate__(self, state) -> None:
        self._build = state["build"]
        self._built = {}

    def __repr__(self) -> str:
        places = ", ".join(f"{device}/{dtype}" for device, dtype in self._built) or "nothing yet"
        return f"DeviceCache({getattr(self._build, '__qualname__', self._build)!r}: {places})"
