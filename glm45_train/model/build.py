"""Build GLM-4.5 as a Megatron-Core `GPTModel`: Transformer Engine layers on GPUs, Megatron's local layers on CPU.

The decoder follows `moe_layer_freq` (first_k_dense_replace dense layers, then MoE layers); the MTP block reuses
the last (MoE) decoder layer's spec, as in the release. `device="meta"` builds the full-size models without
memory (used for parameter counts and conversion planning).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from glm45_train.model.hf_config import Glm45Config, to_transformer_config
from glm45_train.runtime import cpu


def transformer_engine_usable() -> bool:
    """TE layer specs need both the package and CUDA; anything less falls back to the local spec."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def layer_specs(config: Any, use_te: bool) -> tuple[Any, Any]:
    """(decoder block spec, MTP block spec or None) for a GLM-4.5 TransformerConfig."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec

    block_spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm")
    mtp_spec = None
    if config.mtp_num_layers:
        mtp_spec = get_gpt_mtp_block_spec(config, block_spec.layer_specs[-1], use_transformer_engine=use_te)
    return block_spec, mtp_spec


def build_model(
    hf: Glm45Config,
    config: Any | None = None,
    *,
    device: str | torch.device | None = None,
    use_te: bool | None = None,
    pre_process: bool = True,
    post_process: bool = True,
):
    """A GPTModel for `hf` (parallel state must be initialised, see runtime/distributed.py).

    `config` defaults to `to_transformer_config(hf)`. With `device="meta"` nothing is allocated and no
    initialisation runs; otherwise weights are initialised from Megatron's seeded RNG streams.
    """
    from megatron.core.models.gpt import GPTModel

    cpu.apply()
    meta = device is not None and torch.device(device).type == "meta"
    if config is None:
        config = to_transformer_config(hf, perform_initialization=not meta)
    elif meta:
        config.perform_initialization = False
    use_te = transformer_engine_usable() if use_te is None else use_te
    block_spec, mtp_spec = layer_specs(config, use_te)
    placement = torch.device("meta") if meta else contextlib.nullcontext()
    with placement:
        model = GPTModel(
            config=config,
            transformer_layer_spec=block_spec,
            vocab_size=hf.vocab_size,
            max_sequence_length=hf.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=hf.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_percent=hf.partial_rotary_factor,
            rotary_base=hf.rope_theta,
            mtp_block_spec=mtp_spec,
        )
    return model


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts by part: `mtp`, `experts` (routed), and `total` (including both)."""
    counts = {"total": 0, "mtp": 0, "experts": 0}
    for name, param in model.named_parameters():
        n = param.numel()
        counts["total"] += n
        if name.startswith("mtp."):
            counts["mtp"] += n
        elif ".mlp.experts." in name:
            counts["experts"] += n
    return counts
