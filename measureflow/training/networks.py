"""The networks of the trainings: one multilayer-perceptron builder behind :class:`VelocityMLP`
(a time-conditioned field v_θ(x, t), MATH.md §1) and :class:`GeneratorMLP` (a generator G : R^k → R^d,
MATH.md §9, last paragraph).

Both are ``Linear → SiLU`` stacks: ``depth`` hidden layers of width ``hidden`` and a linear output
layer, built by :func:`build_mlp` and initialised by :func:`reset_linear_layers` (PyTorch's default
``nn.Linear`` law, drawn from an explicit ``torch.Generator`` when one is given).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ParameterError, ShapeError

__all__ = ["VelocityMLP", "GeneratorMLP", "build_mlp", "reset_linear_layers", "check_widths"]


def check_widths(owner: str, values) -> None:
    """Refuse ``(name, value, lowest)`` triples whose value is not an integer ≥ lowest."""
    for name, value, low in values:
        if isinstance(value, bool) or int(value) != value or int(value) < low:
            raise ParameterError(f"{owner}: {name} must be an integer >= {low}; received {value!r}")


def build_mlp(width_in: int, hidden: int, depth: int, width_out: int, *, device=None, dtype=None) -> nn.Sequential:
    """``Linear(width_in, hidden), SiLU, [Linear(hidden, hidden), SiLU] × (depth − 1), Linear(hidden, width_out)``.

    The layers are created in this order, so their default initial weights consume the global torch
    random state exactly as a hand-written stack of the same layers would.
    """
    factory = {"device": device, "dtype": dtype}
    layers: list[nn.Module] = [nn.Linear(int(width_in), int(hidden), **factory), nn.SiLU()]
    for _ in range(int(depth) - 1):
        layers += [nn.Linear(int(hidden), int(hidden), **factory), nn.SiLU()]
    layers.append(nn.Linear(int(hidden), int(width_out), **factory))
    return nn.Sequential(*layers)


@torch.no_grad()
def reset_linear_layers(net: nn.Module, generator: torch.Generator | None = None) -> None:
    """Re-draw the weights of every ``nn.Linear`` child of ``net`` (in order) with PyTorch's default
    law W, b ~ U(±1/√fan_in), from ``generator`` when given: a reproducible initialisation that does
    not touch the global random state."""
    for layer in net:
        if isinstance(layer, nn.Linear):
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)


class VelocityMLP(nn.Module):
    """A time-conditioned multilayer perceptron v_θ(x, t) : R^d × R → R^d.

    The input is (x, e(t)) with the time embedding e(t) = (t, sin(kπt), cos(kπt))_{k=1..F}
    (F = ``time_frequencies``; periods 2/k on the unit interval, so the network can represent fields
    whose time dependence is sharp near an endpoint without a very deep stack); then ``depth``
    hidden layers of width ``hidden`` with SiLU activations and a linear output layer
    (:func:`build_mlp`).

    ``forward(x, t)`` accepts x of shape (..., d) with any leading dimensions (a batch (B, d) in
    training, a particle state (R, N, d) when used as a field) and t a Python number, a 0-dim
    tensor, or a tensor of shape x.shape[:-1] (or x.shape[:-1] + (1,)); it returns (..., d).

    ``config`` holds the constructor arguments; :func:`~measureflow.training.save_model` stores it next
    to the weights so that :func:`~measureflow.training.load_model` can rebuild the network.
    ``generator`` draws the initial weights (see :meth:`reset_parameters`); without it they come
    from the global torch random state.
    """

    def __init__(self, dim: int, hidden: int = 64, depth: int = 3, time_frequencies: int = 4,
                 *, device=None, dtype=None, generator: torch.Generator | None = None):
        super().__init__()
        check_widths("VelocityMLP", (("dim", dim, 1), ("hidden", hidden, 1), ("depth", depth, 1),
                                     ("time_frequencies", time_frequencies, 0)))
        self.config = {"dim": int(dim), "hidden": int(hidden), "depth": int(depth),
                       "time_frequencies": int(time_frequencies)}
        freqs = math.pi * torch.arange(1, int(time_frequencies) + 1, device=device, dtype=dtype)
        # Not a learned quantity: kept out of the state dict so the file holds weights only.
        self.register_buffer("frequencies", freqs, persistent=False)
        width_in = int(dim) + 1 + 2 * int(time_frequencies)
        self.net = build_mlp(width_in, hidden, depth, dim, device=device, dtype=dtype)
        if generator is not None:
            self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-draw the weights with PyTorch's default ``nn.Linear`` law (:func:`reset_linear_layers`)."""
        reset_linear_layers(self.net, generator)

    @property
    def dim(self) -> int:
        return self.config["dim"]

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        """e(t) for t of shape (..., 1): returns (..., 1 + 2F)."""
        angles = t * self.frequencies
        return torch.cat([t, torch.sin(angles), torch.cos(angles)], dim=-1)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ShapeError(
                f"VelocityMLP: x must have shape (..., d) with d = {self.dim}; received {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        if isinstance(t, torch.Tensor):
            t = t.to(dtype=x.dtype)
            if t.ndim == x.ndim and t.shape[-1] == 1:
                t = t.expand(*lead, 1)
            else:
                t = t.expand(lead).unsqueeze(-1)
        else:
            # A fill from a Python number: no host→device copy.
            t = torch.full((*lead, 1), float(t), dtype=x.dtype, device=x.device)
        return self.net(torch.cat([x, self.embed_time(t)], dim=-1))

    def extra_repr(self) -> str:
        c = self.config
        return f"dim={c['dim']}, hidden={c['hidden']}, depth={c['depth']}, time_frequencies={c['time_frequencies']}"


class GeneratorMLP(nn.Module):
    """A multilayer perceptron G : R^k → R^d (``latent_dim`` k, ``dim`` d): ``depth`` hidden layers of
    width ``hidden`` with SiLU activations and a linear output layer (:func:`build_mlp`).

    ``forward(z)`` takes z of shape (..., k) and returns (..., d). ``config`` holds the constructor
    arguments. ``generator`` draws the initial weights (the law of :meth:`VelocityMLP.reset_parameters`);
    without it they come from the global torch random state. The same class serves as the residual
    field U_η : R^d → R^d (k = d).
    """

    def __init__(self, latent_dim: int, dim: int, hidden: int = 64, depth: int = 3, *, device=None, dtype=None,
                 generator: torch.Generator | None = None):
        super().__init__()
        check_widths("GeneratorMLP", (("latent_dim", latent_dim, 1), ("dim", dim, 1), ("hidden", hidden, 1),
                                      ("depth", depth, 1)))
        self.config = {"latent_dim": int(latent_dim), "dim": int(dim), "hidden": int(hidden), "depth": int(depth)}
        self.net = build_mlp(latent_dim, hidden, depth, dim, device=device, dtype=dtype)
        if generator is not None:
            self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-draw the weights with PyTorch's default ``nn.Linear`` law (:func:`reset_linear_layers`)."""
        reset_linear_layers(self.net, generator)

    @property
    def latent_dim(self) -> int:
        return self.config["latent_dim"]

    @property
    def dim(self) -> int:
        return self.config["dim"]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[-1] != self.latent_dim:
            raise ShapeError(
                f"GeneratorMLP: z must have shape (..., k) with k = {self.latent_dim}; received {tuple(z.shape)}"
            )
        return self.net(z)

    def extra_repr(self) -> str:
        c = self.config
        return f"latent_dim={c['latent_dim']}, dim={c['dim']}, hidden={c['hidden']}, depth={c['depth']}"
