"""Packing whole samples into fixed-length rows, and the boundaries that keep attention inside each sample.

Notable:
- `pack_first_fit_decreasing`: longest first, each into the leftmost bin with room, found in O(log n) with a
  max segment tree over the bins' free space; samples are never split.
- Position ids restart at 0 for every sample. The padding at the end of a row is treated as one more
  sequence, so its rows of the mask are never empty (no NaN in softmax) and cu_seqlens add up to the row
  length; its loss is masked.
- Two ways to isolate samples: `block_causal_mask` for Megatron's local (CPU) attention — bool [b, 1, s, s],
  True means masked out, Megatron's convention — and `cu_seqlens` for THD attention on GPU (flash /
  Transformer Engine).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def pack_first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins whose total length is ≤ `capacity` (first-fit decreasing)."""
    too_long = [i for i, n in enumerate(lengths) if n > capacity or n <= 0]
    if too_long:
        i = too_long[0]
        raise ValueError(f"sample {i} has length {lengths[i]}, outside 1..{capacity}; cannot pack it")
    free = _FreeSpaceTree(len(lengths), capacity)
    bins: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = free.take_leftmost(lengths[index])
        if slot == len(bins):
            bins.append([])
        bins[slot].append(index)
    return bins


class _FreeSpaceTree:
    """Max segment tree over `size` bins' free space: leftmost bin with at least n free, in O(log size)."""

    def __init__(self, size: int, capacity: int) -> None:
        self.leaves = 1 << max(size - 1, 0).bit_length()
        self.tree = [capacity] * (2 * self.leaves)

    def take_leftmost(self, amount: int) -> int:
        node = 1
        while node < self.leaves:
            node = 2 * node if self.tree[2 * node] >= amount else 2 * node + 1
        self.tree[node] -= amount
        parent = node // 2
        while parent:
            self.tree[parent] = max(self.tree[2 * parent], self.tree[2 * parent + 1])
            parent //= 2
        return node - self.leaves


def packing_efficiency(lengths: Sequence[int], bins: Sequence[Sequence[int]], capacity: int) -> float:
    """Real tokens / (bins × capacity): the fraction of a padded batch that is data."""
    return float(sum(lengths)) / (len(bins) * capacity) if bins else 0.0


def position_ids(seq_lengths: Sequence[int], row_length: int | None = None) -> np.ndarray:
    """[s] int64 positions restarting at 0 per sample; padding up to `row_length` is one more sequence."""
    pieces = [np.arange(n, dtype=np.int64) for n in _with_padding(seq_lengths, row_length)]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def block_causal_mask(rows: Sequence[Sequence[int]], row_length: int) -> torch.Tensor:
    import torch  # here, not at import: `data prepare`'s worker processes never need it

    """Bool [b, 1, s, s], True = masked: causal within each sample of each row, nothing across samples."""
    mask = torch.ones(len(rows), 1, row_length, row_length, dtype=torch.bool)
    for row, seq_lengths in enumerate(rows):
        start = 0
        for n in _with_padding(seq_lengths, row_length):
            allowed = torch.ones(n, n, dtype=torch.bool).tril()
            mask[row, 0, start : start + n, start : start + n] = ~allowed
            start += n
    return mask


def cu_seqlens(rows: Sequence[Sequence[int]], row_length: int) -> torch.Tensor:
    import torch

    """Int32 [k + 1] sequence starts over the rows laid end to end (THD), each row padded to row_length."""
    lengths = [n for seq_lengths in rows for n in _with_padding(seq_lengths, row_length)]
    return torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)


def _with_padding(seq_lengths: Sequence[int], row_length: int | None) -> list[int]:
    lengths = [int(n) for n in seq_lengths]
    if row_length is None:
        return lengths
    padding = row_length - sum(lengths)
    if padding < 0:
        raise ValueError(f"samples of lengths {lengths} ({sum(lengths)} tokens) do not fit a row of {row_length}")
    return [*lengths, padding] if padding else lengths
