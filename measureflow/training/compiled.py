"""A compiled training step: a loss and its gradient with respect to a model's weights as one graph
(``train_velocity(..., compile=True)``).

For the small networks of flow matching a training step is dominated by fixed costs, not by the
matrix products: dozens of small operators in the forward pass, twice as many in the backward
pass, and the autograd engine walking its graph in between. :class:`CompiledGradient` writes the
loss as a function of the weights (``torch.func.functional_call``), takes
``torch.func.grad_and_value`` of it and compiles the result with ``torch.compile``: forward and
backward become one generated program with the elementwise work fused around the matrix products,
and no autograd graph is built at run time. The gradients are put in each weight's ``.grad``, so
the optimiser step that follows is the caller's own (Adam's fused kernel by default: compiling
``opt.step`` on top of it measured no faster on CPU, and compiling the multi-tensor Adam fails in
this torch).

The loss and gradients equal the eager ones up to floating-point rounding (inductor fuses and
reorders elementwise sums; the matrix products are the same library calls). A model the compiler
cannot handle (a compile or a compiled call that raises) warns once and the step runs eagerly from
then on (:attr:`CompiledGradient.failure`).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from ..compile_passes import inductor_options
from ..reductions.compile_cache import use_lasting_directory

__all__ = ["CompiledGradient"]

#: The torch.compile backend ("aot_eager" traces the same graph without generating code: faster to
#: compile, for checks of the tracing itself).
backend = "inductor"

#: Whether the graph takes :class:`~measureflow.compile_passes.BiasIntoPointwise` (on CPU tensors).
bias_into_pointwise = True


class CompiledGradient:
    """``loss(model, *batch)`` and its gradient with respect to ``model``'s trainable weights, compiled.

    ``loss`` must be a function of the model only through calls ``model(...)`` (it is given a
    stand-in that evaluates the model with the weights as inputs of the graph). Calling the object
    on a batch puts the gradient in every trainable weight's ``.grad`` (as ``zero_grad`` then
    ``backward()`` would) and returns the loss, a detached 0-dim tensor.
    """

    def __init__(self, model: nn.Module, loss: Callable):
        self.model = model
        self.loss = loss
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = tuple(n for n, _ in named)
        self.params = tuple(p for _, p in named)
        #: why the step went back to eager autograd (the first compiled call that failed), or None
        self.failure: str | None = None
        names = self.names

        def value(params, *batch):
            weights = dict(zip(names, params))
            return loss(lambda *args: torch.func.functional_call(model, weights, args), *batch)

        grad_and_value = torch.func.grad_and_value(value)

        def gradient(params, *batch):
            # torch.func differentiates regardless; no_grad keeps an outer graph from being recorded.
            with torch.no_grad():
                return grad_and_value(params, *batch)

        use_lasting_directory()  # the compiled code outlives the process (as the fused reductions')
        options = {"options": inductor_options()} if bias_into_pointwise and backend == "inductor" else {}
        self._compiled = torch.compile(gradient, backend=backend, **options)

    def __call__(self, *batch) -> torch.Tensor:
        if self.failure is None:
            try:
                grads, value = self._compiled(self.params, *batch)
            except Exception as exc:  # noqa: BLE001 - any compiler failure means "go eager"
                self.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                warnings.warn(
                    f"measureflow: compiling the training step failed ({self.failure}); training goes on "
                    "with eager steps",
                    RuntimeWarning,
                    stacklevel=2,
                )
            else:
                for p, g in zip(self.params, grads):
                    p.grad = g
                return value
        for p in self.params:
            p.grad = None
        value = self.loss(self.model, *batch)
        value.backward()
        return value.detach()
