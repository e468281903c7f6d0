"""Linear combinations of channel tuples, the one arithmetic every Runge–Kutta formula shares."""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["combine", "Tensors"]

Tensors = tuple[torch.Tensor, ...]


def combine(y: Tensors, h, weights: Sequence[float], ks: Sequence[Tensors]) -> Tensors:
    """y + h Σᵢ wᵢ kᵢ, skipping zero weights (component-wise over the tuple y).

    The weighted sum is accumulated first, in one fresh buffer (so small increments are summed
    before they meet the larger y), then added to y: two allocations per component whatever the
    number of stages.
    """
    terms = [(w, k) for w, k in zip(weights, ks) if w != 0.0]
    if not terms:
        return tuple(y)
    out = []
    for comp, y_c in enumerate(y):
        w0, k0 = terms[0]
        acc = k0[comp] * w0
        for w, k in terms[1:]:
            acc.add_(k[comp], alpha=w)
        # A compiled step passes h as a 0-dim tensor (a Python float would be a graph constant).
        out.append(torch.add(y_c, acc, alpha=h) if not isinstance(h, torch.Tensor) else y_c + acc * h)
    return tuple(out)
