"""Graph passes measureflow adds to its own ``torch.compile`` graphs (compiled solver steps and
training steps), and the inductor options that carry them.

One pass, :class:`BiasIntoPointwise`: on the CPU a linear layer ``x Wᵀ + b`` reaches inductor as
``addmm(b, x, Wᵀ)``, which ATen runs as a copy of the broadcast bias into the output followed by a
GEMM that accumulates into it (β = 1). For the small networks of flow matching (a 256 × 64 output)
that copy is a strided broadcast costing 5–15 µs a layer, about a fifth of the GEMM itself, and the
activation that follows reads the same output again. When every use of the ``addmm`` is elementwise
(the SiLU after a hidden layer, the Runge–Kutta sums after the last one) the pass writes it as
``mm(x, Wᵀ) + b``: the GEMM with β = 0 and the bias added inside the elementwise loop inductor
generates anyway, so the copy disappears. Inductor does this itself on GPUs only.

The result is the same sum rounded once more in a different place: GEMM then one addition, instead
of a GEMM whose accumulator starts at b — equal up to one unit in the last place per output, the
rounding a compiled step already allows.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["BiasIntoPointwise", "inductor_options"]


def _elementwise_uses(node) -> bool:
    from torch._inductor.utils import is_pointwise_use

    return bool(node.users) and all(is_pointwise_use(use) for use in node.users)


class BiasIntoPointwise:
    """The inductor post-grad pass ``addmm(b, x, W) → mm(x, W) + b`` on CPU tensors whose uses are
    all elementwise (see the module docstring). ``uuid`` names the pass in torch's on-disk cache
    keys, so graphs compiled with and without it are never confused."""

    version = 1

    def __call__(self, graph) -> None:
        aten = torch.ops.aten
        for node in [n for n in graph.nodes if n.op == "call_function" and n.target is aten.addmm.default]:
            bias, left, right = node.args[:3]
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                continue
            value = node.meta.get("val")
            if not isinstance(bias, torch.fx.Node) or value is None or value.device.type != "cpu":
                continue
            if bias.meta.get("val") is None or not _elementwise_uses(node):
                continue
            with graph.inserting_before(node):
                product = graph.call_function(aten.mm.default, (left, right))
                product.meta["val"] = aten.mm.default(left.meta["val"], right.meta["val"])
                total = graph.call_function(aten.add.Tensor, (product, bias))
                total.meta["val"] = aten.add.Tensor(product.meta["val"], bias.meta["val"])
            node.replace_all_uses_with(total)
            graph.erase_node(node)

    def uuid(self) -> str:
        return f"measureflow.BiasIntoPointwise.{self.version}"


@functools.cache
def inductor_options() -> dict:
    """The ``options=`` measureflow's compiled steps pass to ``torch.compile(backend="inductor")``.

    One dict (and one pass object) per process: dynamo keeps a compiled frame for the backend it was
    compiled with and compares backends by their options, so a fresh pass object per call would
    make every new compiled step or training run a recompile, and the ninth a silent fallback to
    eager at torch's recompile limit. Empty (inductor's defaults) in a torch without custom passes
    that its compile cache can key."""
    try:
        from torch._inductor import config
        from torch._inductor.custom_graph_pass import CustomGraphPass
    except ImportError:
        return {}
    if not hasattr(config, "post_grad_custom_post_pass"):
        return {}
    # Registered as a virtual subclass: torch accepts a custom pass only as a CustomGraphPass, and
    # the import stays out of the module's import time (torch._inductor is heavy).
    CustomGraphPass.register(BiasIntoPointwise)
    return {"post_grad_custom_post_pass": BiasIntoPointwise()}
