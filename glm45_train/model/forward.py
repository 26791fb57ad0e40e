"""Forward helpers around Megatron's GPTModel for evaluation (HF-style [batch, seq] inputs and outputs)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


@contextlib.contextmanager
def without_mtp(model: Any) -> Iterator[None]:
    """Run the main model only: megatron-core 0.16.1 cannot return logits with MTP built and no labels."""
    saved = model.mtp_process, model.config.mtp_num_layers
    model.mtp_process, model.config.mtp_num_layers = False, None
    try:
        yield
    finally:
        model.mtp_process, model.config.mtp_num_layers = saved


@torch.no_grad()
def logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, seq, vocab] logits of the main model for [batch, seq] token ids (positions 0..seq-1)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    with without_mtp(model):
        return model(input_ids, positions, attention_mask)
