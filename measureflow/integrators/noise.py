"""The run's noise: seeded streams of standard normals, one per block of replicas.

A run draws every random increment from one :class:`NoiseStream` seeded from the run's seed through
:func:`noise_seed`. A batch that packs several runs along the replica axis (a packed sweep) gives
each run's block of replicas its own stream, seeded as that run alone would be, so each run
receives exactly the increments it would draw alone. The stream's state is part of a run's
checkpoint, so a resumed run draws the same noise as one that never stopped.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["NoiseStream", "noise_seed", "standard_normal"]


def noise_seed(seed: int) -> int:
    """The seed of a run's noise stream, derived from the run's ``seed`` by a hash.

    Scripts commonly draw their initial particles with ``torch.Generator().manual_seed(seed)`` and
    pass the same ``seed`` to the Simulation; seeding the noise with ``seed`` itself would then
    replay the initial draw's normals as the first noise increments, correlating noise and state.
    """
    digest = hashlib.sha256(f"measureflow.noise:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def standard_normal(shape, like: torch.Tensor, generator) -> torch.Tensor:
    """ξ ~ N(0, I) of ``shape`` with like's dtype and device, drawn from ``generator`` (a
    ``torch.Generator``, a :class:`NoiseStream`, or None for torch's global stream).

    A generator on another device than the state (e.g. a CPU generator for a CUDA state) draws on
    its own device and the sample is copied over, asynchronously.
    """
    if isinstance(generator, NoiseStream):
        return generator.standard_normal(shape, like)
    if generator is None or generator.device == like.device:
        return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)
    xi = torch.randn(shape, generator=generator, dtype=like.dtype, device=generator.device)
    return xi.to(like.device, non_blocking=True)


class NoiseStream:
    """Standard normals for a batch of replicas, block i (``replicas[i]`` consecutive replicas)
    drawn from its own generator seeded with ``seeds[i]``.

    ``NoiseStream.for_run(seed, device)`` is a single run's stream (one block covering every
    replica, seeded with :func:`noise_seed` of the run's seed); ``NoiseStream.for_blocks`` the
    stream of packed runs. ``get_state`` / ``set_state`` save and restore every block's generator.
    """

    def __init__(self, seeds, replicas, device):
        seeds, replicas = list(seeds), [None if r is None else int(r) for r in replicas]
        if len(seeds) != len(replicas) or not seeds:
            raise ValueError(
                f"NoiseStream needs one seed per block; received {len(seeds)} seeds, {len(replicas)} blocks"
            )
        if len(seeds) > 1 and any(r is None for r in replicas):
            raise ValueError("NoiseStream: with several blocks every block needs its number of replicas")
        self.device = torch.device(device)
        self.seeds = tuple(int(s) for s in seeds)
        self.replicas = tuple(replicas)
        self.generators = [torch.Generator(device=self.device) for _ in seeds]
        for generator, seed in zip(self.generators, self.seeds):
            generator.manual_seed(seed)

    @classmethod
    def for_run(cls, seed: int, device) -> "NoiseStream":
        """The noise of one run with seed ``seed`` (every replica from one stream)."""
        return cls([noise_seed(seed)], [None], device)

    @classmethod
    def for_blocks(cls, blocks, device) -> "NoiseStream":
        """The noise of runs packed as blocks ``[(seed, replicas), …]``, each as it would run alone."""
        seeds, replicas = zip(*blocks)
        return cls([noise_seed(s) for s in seeds], replicas, device)

    @property
    def blocks(self) -> int:
        return len(self.generators)

    def standard_normal(self, shape, like: torch.Tensor) -> torch.Tensor:
        if len(self.generators) == 1:
            return standard_normal(shape, like, self.generators[0])
        if shape[0] != sum(self.replicas):
            raise ValueError(
                f"NoiseStream holds streams for {sum(self.replicas)} replicas {self.replicas}; "
                f"a draw of shape {tuple(shape)} asks for {shape[0]}"
            )
        rest = tuple(shape[1:])
        return torch.cat([standard_normal((r, *rest), like, g) for g, r in zip(self.generators, self.replicas)])

    def get_state(self) -> torch.Tensor:
        """Every block's generator state, stacked (a uint8 tensor: it goes into checkpoints)."""
        if len(self.generators) == 1:
            return self.generators[0].get_state()
        return torch.stack([g.get_state() for g in self.generators])

    def set_state(self, state: torch.Tensor) -> None:
        if len(self.generators) == 1:
            self.generators[0].set_state(state)
            return
        for generator, row in zip(self.generators, state):
            generator.set_state(row.clone())  # a row of the stack is a view; the generator needs its own storage

    def __repr__(self) -> str:
        return f"NoiseStream(blocks={self.blocks}, device={self.device})"
