"""A packed row (block-diagonal causal mask, positions restarting) gives every token the same loss as running
its samples one by one on the tiny Megatron model — and without the mask, tokens leak across samples."""

from __future__ import annotations

import numpy as np
import torch

from glm45_train.convert.sources import HFTensorSource, load_weights
from glm45_train.data.prepared import collate, shift_for_training
from glm45_train.model.build import build_model
from glm45_train.model.forward import without_mtp


def _per_token_loss(model, batch) -> torch.Tensor:
    with torch.no_grad(), without_mtp(model):
        return model(batch.tokens, batch.position_ids, batch.attention_mask, labels=batch.labels)


def test_packed_row_equals_samples_one_by_one(megatron_world, tiny_glm45):
    source = HFTensorSource(tiny_glm45)
    model = build_model(source.hf).eval()
    load_weights(model, source)
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, source.hf.vocab_size, n) for n in (5, 11, 7)]
    trained = [np.ones(len(s), dtype=bool) for s in samples]
    pad = 0

    packed = collate([shift_for_training(samples, trained, pad)], 24, pad, with_attention_mask=True)
    packed_loss = _per_token_loss(model, packed)[0]
    start = 0
    for ids, mask in zip(samples, trained, strict=True):
        alone = collate([shift_for_training([ids], [mask], pad)], len(ids), pad, with_attention_mask=True)
        alone_loss = _per_token_loss(model, alone)[0]
        span = slice(start, start + len(ids) - 1)  # the last position predicts nothing
        torch.testing.assert_close(packed_loss[span], alone_loss[: len(ids) - 1], rtol=0, atol=1e-5)
        start += len(ids)

    leaky = collate([shift_for_training(samples, trained, pad)], 24, pad, with_attention_mask=False)
    leaky_loss = _per_token_loss(model, leaky)[0]  # plain causal attention across the samples
    second = slice(5, 5 + 10)
    assert (leaky_loss[second] - packed_loss[second]).abs().max() > 1e-3
