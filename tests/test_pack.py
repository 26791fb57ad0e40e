"""Packing: first-fit decreasing, position ids, and the boundaries that keep attention inside each sample."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from glm45_train.data.pack import (
    block_causal_mask,
    cu_seqlens,
    pack_first_fit_decreasing,
    packing_efficiency,
    position_ids,
)
from glm45_train.data.prepared import collate, shift_for_training


def naive_first_fit_decreasing(lengths, capacity):
    """The textbook algorithm, O(n · bins): the specification the segment tree must reproduce."""
    bins, free = [], []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((b for b, room in enumerate(free) if room >= lengths[index]), None)
        if slot is None:
            bins.append([])
            free.append(capacity)
            slot = len(bins) - 1
        bins[slot].append(index)
        free[slot] -= lengths[index]
    return bins


@pytest.mark.parametrize("seed", range(5))
def test_first_fit_decreasing_matches_the_textbook_algorithm(seed):
    rng = random.Random(seed)
    capacity = rng.choice([16, 100, 8192])
    lengths = [
        rng.randint(1, capacity) if rng.random() < 0.2 else rng.randint(1, capacity // 4 + 1) for _ in range(300)
    ]
    bins = pack_first_fit_decreasing(lengths, capacity)
    assert bins == naive_first_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)


def test_packing_is_dense_for_many_small_samples():
    rng = random.Random(0)
    lengths = [rng.randint(50, 1500) for _ in range(2000)]
    bins = pack_first_fit_decreasing(lengths, 8192)
    assert packing_efficiency(lengths, bins, 8192) > 0.98


def test_samples_longer_than_a_row_are_refused():
    with pytest.raises(ValueError, match=r"sample 1 has length 9, outside 1\.\.8"):
        pack_first_fit_decreasing([3, 9], 8)
    assert pack_first_fit_decreasing([], 8) == []


def test_position_ids_restart_per_sample_and_padding_is_one_more_sequence():
    assert position_ids([3, 2]).tolist() == [0, 1, 2, 0, 1]
    assert position_ids([3, 2], 8).tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    with pytest.raises(ValueError, match="do not fit a row of 4"):
        position_ids([3, 2], 4)


def test_block_causal_mask_is_megatron_convention_true_masked():
    mask = block_causal_mask([[2, 1], [3]], 4)
    assert mask.shape == (2, 1, 4, 4) and mask.dtype == torch.bool
    allowed_row0 = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    allowed_row1 = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]]
    assert (~mask[0, 0]).int().tolist() == allowed_row0
    assert (~mask[1, 0]).int().tolist() == allowed_row1


def test_cu_seqlens_cover_the_rows_end_to_end():
    assert cu_seqlens([[2, 1], [3]], 4).tolist() == [0, 2, 3, 4, 7, 8]
    assert cu_seqlens([[4]], 4).dtype == torch.int32


def test_shifted_labels_never_cross_a_sample():
    ids = [np.array([10, 11, 12]), np.array([20, 21])]
    trained = [np.array([0, 1, 1], dtype=bool), np.array([0, 1], dtype=bool)]
    example = shift_for_training(ids, trained, pad_id=0)
    assert example.input_ids.tolist() == [10, 11, 12, 20, 21]
    assert example.labels.tolist() == [11, 12, 0, 21, 0]
    assert example.loss_mask.tolist() == [1, 1, 0, 1, 0]
    assert example.position_ids.tolist() == [0, 1, 2, 0, 1]


class TinyCausalLM(torch.nn.Module):
    """Embedding + learned positions + one masked attention layer + head: enough to show leaks."""

    def __init__(self, vocab: int = 50, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, width)
        self.positions = torch.nn.Embedding(64, width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens, positions, masked):  # masked: [b, 1, s, s] True = masked
        x = self.embed(tokens) + self.positions(positions)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~masked[:, 0])
        return self.head(x + attended)


def _per_token_loss(model, batch) -> torch.Tensor:
    logits = model(batch.tokens, batch.position_ids, batch.attention_mask)
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.labels, reduction="none")
    return loss * batch.loss_mask


def test_packed_row_gives_the_same_per_token_loss_as_samples_one_by_one():
    rng = np.random.default_rng(0)
    lengths = [5, 9, 3, 7]
    ids = [rng.integers(1, 50, n) for n in lengths]
    trained = [rng.random(n) < 0.6 for n in lengths]
    model = TinyCausalLM().eval()
    with torch.no_grad():
        packed = collate([shift_for_training(ids, trained, 0)], 32, 0, with_attention_mask=True)
        packed_loss = _per_token_loss(model, packed)[0]
        alone_losses = []
        for sample_ids, sample_trained in zip(ids, trained, strict=True):
            alone = collate([shift_for_training([sample_ids], [sample_trained], 0)], len(sample_ids), 0, True)
            alone_losses.append(_per_token_loss(model, alone)[0])
        expected = torch.cat([*alone_losses, torch.zeros(32 - sum(lengths))])
    torch.testing.assert_close(packed_loss, expected, rtol=1e-5, atol=1e-6)
    # Negative control: a plain causal mask over the packed row lets later samples see earlier ones.
    with torch.no_grad():
        leaky = collate([shift_for_training(ids, trained, 0)], 32, 0, with_attention_mask=True)
        causal = torch.ones(32, 32, dtype=torch.bool).triu(1)[None, None]
        leaky_loss = _per_token_loss(model, dataclasses.replace(leaky, attention_mask=causal))[0]
    assert not torch.allclose(leaky_loss, expected, rtol=1e-5, atol=1e-6)
