"""Rows of a prepared dataset -> micro-batches for one data-parallel rank, with a resumable position.

Order: the eval split is a seeded, fixed subset; training rows are reshuffled each epoch from (seed, epoch).
Each global batch takes `global_batch_size` consecutive rows of that order; data-parallel rank r takes rows
r, r + dp, ... of it, cut into micro-batches. The position saved in checkpoints is (epoch, rows consumed in
that epoch), so a resumed run reads exactly the rows the uninterrupted run would have read.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from glm45_train.data.prepared import Batch, PreparedDataset, TrainingExample, collate


@dataclass
class DataPosition:
    epoch: int = 0
    consumed_rows: int = 0  # rows of this epoch's order already used (all ranks together)


class BatchPlan:
    """The train/eval split and the per-epoch order of a prepared dataset for one run."""

    def __init__(self, dataset: PreparedDataset, *, seed: int, eval_fraction: float, global_batch_size: int) -> None:
        self.dataset, self.seed, self.global_batch_size = dataset, seed, global_batch_size
        order = np.random.default_rng(seed).permutation(len(dataset))
        n_eval = min(len(dataset) - 1, math.ceil(eval_fraction * len(dataset))) if eval_fraction > 0 else 0
        self.eval_rows = np.sort(order[:n_eval])
        self.train_rows = np.sort(order[n_eval:])
        if len(self.train_rows) < global_batch_size:
            raise ValueError(
                f"{dataset.directory}: {len(self.train_rows)} training rows are fewer than one global batch "
                f"({global_batch_size}); lower train.global_batch_size or add data"
            )

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_rows) // self.global_batch_size  # an incomplete last batch is dropped

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.train_rows)

    def global_batch(self, position: DataPosition) -> tuple[np.ndarray, DataPosition]:
        """The rows of the next global batch and the position after it."""
        if position.consumed_rows + self.global_batch_size > len(self.train_rows):
            position = DataPosition(position.epoch + 1, 0)
        start = position.consumed_rows
        rows = self.epoch_order(position.epoch)[start : start + self.global_batch_size]
        return rows, DataPosition(position.epoch, start + self.global_batch_size)


@dataclass(frozen=True)
class Collation:
    """How rows become tensors. Every rank pads a global batch to the same length — the longest row of the whole
    global batch, which all ranks can compute alike — because expert parallelism exchanges tokens between ranks
    and pipeline stages exchange activations of the shape the schedule is told, one per step; tensor/context
    parallelism need lengths divisible by `multiple`. `with_attention_mask` builds the CPU block-diagonal mask."""

    micro_batch_size: int
    multiple: int
    with_attention_mask: bool

    def length_for(self, examples: list[TrainingExample]) -> int:
        length = max(len(e.input_ids) for e in examples)
        return math.ceil(length / self.multiple) * self.multiple


def micro_batches(plan: BatchPlan, rows: np.ndarray, dp_rank: int, dp_size: int, collation: Collation) -> list[Batch]:
    """This rank's share of a global batch, as collated micro-batches of one common length."""
    return _collated(plan.dataset, rows, dp_rank, dp_size, collation)


def _collated(
    dataset: PreparedDataset, rows: np.ndarray, dp_rank: int, dp_size: int, c: Collation, length: int | None = None
) -> list[Batch]:
    examples = [dataset[int(i)] for i in rows]
    length = length or c.length_for(examples)
    mine = examples[dp_rank::dp_size]
    size = c.micro_batch_size
    return [
        collate(mine[start : start + size], length, dataset.pad_token_id, c.with_attention_mask)
        for start in range(0, len(mine), size)
    ]


def eval_batches(plan: BatchPlan, dp_rank: int, dp_size: int, collation: Collation) -> Iterator[Batch]:
    """Every rank the same number of micro-batches (expert parallel ranks must run forwards together), all of one
    length (they go through the schedule together, and pipeline stages are told one shape)."""
    usable = len(plan.eval_rows) // dp_size * dp_size
    step = dp_size * collation.micro_batch_size
    length = collation.length_for([plan.dataset[int(i)] for i in plan.eval_rows[:usable]]) if usable else None
    for start in range(0, usable, step):
        rows = plan.eval_rows[start : start + step]
        yield from _collated(plan.dataset, rows, dp_rank, dp_size, collation, length)
