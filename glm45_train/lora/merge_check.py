"""Does a merged export compute what the trained model computes? transformers on the merged HF checkpoint vs our
Megatron model with the run's adapters attached (base weights + LoRA path), on the same chat tokens."""

from __future__ import annotations

from pathlib import Path

import torch

from glm45_train.convert.precision.check import Diff, PrecisionReport, sample_tokens
from glm45_train.lora.adapter_io import LoraRun


@torch.no_grad()
def check_merged(run: LoraRun, merged_dir: str | Path, dtype: str = "fp32") -> PrecisionReport:
    from transformers import AutoModelForCausalLM

    from glm45_train.config.recipe import mtp_layers
    from glm45_train.convert.sources import load_weights, open_source
    from glm45_train.lora import apply_lora, load_lora_state_dict
    from glm45_train.model.build import build_model
    from glm45_train.model.forward import logits
    from glm45_train.model.hf_config import to_transformer_config
    from glm45_train.runtime import distributed

    distributed.initialize()
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    ids = sample_tokens(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch_dtype).eval()
    reference = merged(ids).logits
    config = to_transformer_config(
        run.hf, params_dtype=torch_dtype, perform_initialization=False, mtp_num_layers=mtp_layers(run.recipe, run.hf)
    )
    model = build_model(run.hf, config)  # as trained: with the MTP block only when it was
    load_weights(model, open_source(run.base))
    apply_lora(model, run.lora, seed=run.recipe.train.seed)
    load_lora_state_dict(model, run.state)
    ours = logits(model.eval(), ids)
    return PrecisionReport(
        dtype=dtype,
        mode="merged LoRA vs Megatron + adapters",
        tokens=ids.numel(),
        logits=Diff.of("logits", ours, reference),
        argmax_agreement=(ours.argmax(-1) == reference.argmax(-1)).float().mean().item(),
    )
