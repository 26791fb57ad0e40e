"""Full (TP=1) <-> tensor-parallel-local LoRA tensors: slicing, gathering, and name-seeded initialisation.

Notable:
- A `Shard` says how one local tensor relates to its full tensor: split on `dim` over a TP group, or replicated.
- `gated=True` is the fused SwiGLU fc1 layout: the full tensor is `[gate; up]` on dim 0, and TP rank k holds
  `[gate_k; up_k]` (each half split separately), exactly like Megatron's base fc1 weight. Slicing and gathering
  undo that interleave, so full tensors always have the TP=1 layout.
- `name_seeded_uniform` draws a full tensor from a generator seeded by (seed, tensor name): every layout slices
  the same full tensor, so initialisation does not depend on TP, EP or PP.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    """How a local tensor is cut from its full tensor: split on `dim` over `group` (size > 1), or replicated."""

    dim: int | None = None
    rank: int = 0
    size: int = 1
    group: Any = None
    gated: bool = False

    @property
    def split(self) -> bool:
        return self.dim is not None and self.size > 1

    def full_shape(self, local_shape: torch.Size) -> tuple[int, ...]:
        shape = list(local_shape)
        if self.split:
            shape[self.dim] *= self.size  # type: ignore[index]
        return tuple(shape)


def to_local(full: torch.Tensor, shard: Shard) -> torch.Tensor:
    """This rank's piece of `full` (a view or a copy; callers copy it into the parameter)."""
    if not shard.split:
        return full
    assert shard.dim is not None
    if shard.gated:
        halves = full.chunk(2, dim=shard.dim)
        return torch.cat([half.chunk(shard.size, dim=shard.dim)[shard.rank] for half in halves], dim=shard.dim)
    return full.chunk(shard.size, dim=shard.dim)[shard.rank]


def to_full(local: torch.Tensor, shard: Shard) -> torch.Tensor:
    """The full tensor, gathered over the shard's TP group (a collective when split: every TP rank must call)."""
    if not shard.split:
        return local
    assert shard.dim is not None
    pieces = [torch.empty_like(local) for _ in range(shard.size)]
    dist.all_gather(pieces, local.contiguous(), group=shard.group)
    if shard.gated:
        gates, ups = zip(*(piece.chunk(2, dim=shard.dim) for piece in pieces), strict=True)
        return torch.cat([*gates, *ups], dim=shard.dim)
    return torch.cat(pieces, dim=shard.dim)


def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def name_seeded_uniform(name: str, shape: tuple[int, ...], bound: float, seed: int) -> torch.Tensor:
    """U(-bound, bound) in fp32 on the CPU from a generator seeded by (seed, name)."""
    generator = torch.Generator(device="cpu").manual_seed(_name_seed(seed, name))
    return (torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1) * bound
