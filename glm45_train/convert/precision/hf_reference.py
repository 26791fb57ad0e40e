"""The HF side of the precision check: transformers' own GLM-4.5 modules, filled from checkpoint files.

Used for the layerwise check (one `Glm4MoeDecoderLayer` in memory at a time) and for the MTP layer, which
transformers does not run: `mtp_logits` evaluates the released formula with transformers' building blocks,
    h' = shared_head.norm(layer_N(eh_proj(cat[enorm(embed(ids shifted left)), hnorm(h)])))
    logits = shared_head.head(h')
where h is the main model's final (normed) hidden state and layer_N is a full MoE decoder layer.
Shapes: [batch, seq, hidden] throughout (HF order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm45_train.formats.hf_io import TensorReader


def hf_model_config(hf_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(hf_dir)


def _param(reader: TensorReader, name: str, dtype: torch.dtype) -> torch.Tensor:
    tensor = reader.get(name)
    return tensor if name.endswith("e_score_correction_bias") else tensor.to(dtype)


@torch.no_grad()
def decoder_layer(config, reader: TensorReader, index: int, dtype: torch.dtype):
    """transformers' Glm4MoeDecoderLayer `index` with weights from the checkpoint (experts fused as HF does)."""
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeDecoderLayer

    config._attn_implementation = "eager"
    config._experts_implementation = "eager"  # standalone layer: no model-level dispatch sets it
    with torch.device("meta"):
        layer = Glm4MoeDecoderLayer(config, layer_idx=index)
    layer.to_empty(device="cpu")
    prefix = f"model.layers.{index}."
    state = {}
    for name in layer.state_dict():
        if name == "mlp.experts.gate_up_proj":
            state[name] = torch.stack(
                [
                    torch.cat(
                        [_param(reader, f"{prefix}mlp.experts.{e}.{p}_proj.weight", dtype) for p in ("gate", "up")]
                    )
                    for e in range(config.n_routed_experts)
                ]
            )
        elif name == "mlp.experts.down_proj":
            state[name] = torch.stack(
                [
                    _param(reader, f"{prefix}mlp.experts.{e}.down_proj.weight", dtype)
                    for e in range(config.n_routed_experts)
                ]
            )
        else:
            state[name] = _param(reader, prefix + name, dtype)
    layer.load_state_dict(state, strict=True, assign=True)
    return layer.eval()


def causal_mask(seq: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive [1, 1, seq, seq] mask for transformers' eager attention."""
    mask = torch.full((seq, seq), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return mask[None, None]


def rotary(config, seq: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeRotaryEmbedding

    rope = Glm4MoeRotaryEmbedding(config)
    positions = torch.arange(seq)[None]
    return rope(torch.zeros(1, seq, 1, dtype=dtype), positions)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def run_layer(layer, hidden: torch.Tensor, config) -> torch.Tensor:
    seq = hidden.shape[1]
    return layer(
        hidden,
        attention_mask=causal_mask(seq, hidden.dtype),
        position_ids=torch.arange(seq)[None],
        position_embeddings=rotary(config, seq, hidden.dtype),
    )


@torch.no_grad()
def mtp_logits(
    config,
    reader: TensorReader,
    input_ids: torch.Tensor,
    final_hidden: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The MTP layer's logits by the released formula (next tokens rolled left, as Megatron does)."""
    index = config.num_hidden_layers
    p = f"model.layers.{index}."
    eps = config.rms_norm_eps
    shifted = torch.roll(input_ids, shifts=-1, dims=-1)
    embedded = F.embedding(shifted, _param(reader, p + "embed_tokens.weight", dtype))
    joined = torch.cat(
        [
            rms_norm(embedded, _param(reader, p + "enorm.weight", dtype), eps),
            rms_norm(final_hidden.to(dtype), _param(reader, p + "hnorm.weight", dtype), eps),
        ],
        dim=-1,
    )
    hidden = F.linear(joined, _param(reader, p + "eh_proj.weight", dtype))
    hidden = run_layer(decoder_layer(config, reader, index, dtype), hidden, config)
    hidden = rms_norm(hidden, _param(reader, p + "shared_head.norm.weight", dtype), eps)
    return F.linear(hidden, _param(reader, p + "shared_head.head.weight", dtype))
