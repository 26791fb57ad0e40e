"""`make-tiny`: a tiny but complete GLM-4.5 checkpoint in exactly the released on-disk format.

Two presets mirror the released models at tiny size: `air` (no QK-norm, 1 dense layer, routed scaling 1.0)
and `glm45` (QK-norm, 3 dense layers, routed scaling 2.5). Both have heads x head_dim != hidden (as the
release: 96 x 128 != 4096/5120), partial RoPE 0.5, QKV bias, a shared expert, a nonzero fp32 expert bias,
and one MTP layer stored at index `num_hidden_layers` with every tensor the release has there.

Weights are drawn per tensor from a generator seeded by (seed, tensor name), so a checkpoint is a pure
function of (preset, seed) and independent of write order.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from glm45_train.convert.hf_io import HFCheckpointWriter
from glm45_train.model.hf_config import Glm45Config
from glm45_train.model.tokenizer import stop_token_ids, vocab_size_for, write_tokenizer

PRESETS: dict[str, dict[str, Any]] = {
    "air": dict(
        hidden_size=64,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        use_qk_norm=False,
        routed_scaling_factor=1.0,
    ),
    "glm45": dict(
        hidden_size=64,
        num_hidden_layers=5,
        first_k_dense_replace=3,
        use_qk_norm=True,
        routed_scaling_factor=2.5,
    ),
}

_COMMON: dict[str, Any] = dict(
    architectures=["Glm4MoeForCausalLM"],
    model_type="glm4_moe",
    attention_bias=True,
    attention_dropout=0.0,
    head_dim=32,
    hidden_act="silu",
    initializer_range=0.02,
    intermediate_size=128,
    max_position_embeddings=4096,
    moe_intermediate_size=32,
    n_group=1,
    n_routed_experts=8,
    n_shared_experts=1,
    norm_topk_prob=True,
    num_attention_heads=4,
    num_experts_per_tok=2,
    num_key_value_heads=2,
    num_nextn_predict_layers=1,
    partial_rotary_factor=0.5,
    rms_norm_eps=1e-5,
    rope_scaling=None,
    rope_theta=1000000.0,
    tie_word_embeddings=False,
    topk_group=1,
    torch_dtype="bfloat16",
    use_cache=True,
)

EXPERT_BIAS_KEY = "mlp.gate.e_score_correction_bias"


def tiny_config(preset: str, vocab_size: int, stop_ids: list[int]) -> dict[str, Any]:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    config = {**_COMMON, **PRESETS[preset], "vocab_size": vocab_size}
    config.update(eos_token_id=stop_ids, pad_token_id=stop_ids[0])
    return dict(sorted(config.items()))


def hf_tensor_shapes(hf: Glm45Config) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor of a released glm4_moe checkpoint with its shape, MTP layer included, in file order."""
    h, v = hf.hidden_size, hf.vocab_size
    q_out, kv_out = hf.num_attention_heads * hf.head_dim, hf.num_key_value_heads * hf.head_dim
    yield "model.embed_tokens.weight", (v, h)
    for layer in range(hf.num_hidden_layers + hf.num_nextn_predict_layers):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
        for proj, out in (("q", q_out), ("k", kv_out), ("v", kv_out)):
            yield p + f"self_attn.{proj}_proj.weight", (out, h)
            if hf.attention_bias:
                yield p + f"self_attn.{proj}_proj.bias", (out,)
        yield p + "self_attn.o_proj.weight", (h, q_out)
        if hf.use_qk_norm:
            yield p + "self_attn.q_norm.weight", (hf.head_dim,)
            yield p + "self_attn.k_norm.weight", (hf.head_dim,)
        if layer < hf.first_k_dense_replace:
            yield from _mlp_shapes(p + "mlp.", h, hf.intermediate_size)
        else:
            yield p + "mlp.gate.weight", (hf.n_routed_experts, h)
            yield p + EXPERT_BIAS_KEY, (hf.n_routed_experts,)
            for e in range(hf.n_routed_experts):
                yield from _mlp_shapes(p + f"mlp.experts.{e}.", h, hf.moe_intermediate_size)
            if hf.n_shared_experts:
                yield from _mlp_shapes(p + "mlp.shared_experts.", h, hf.moe_intermediate_size * hf.n_shared_experts)
        if layer >= hf.num_hidden_layers:  # the MTP layer's own tensors
            yield p + "enorm.weight", (h,)
            yield p + "hnorm.weight", (h,)
            yield p + "eh_proj.weight", (h, 2 * h)
            yield p + "shared_head.norm.weight", (h,)
            yield p + "embed_tokens.weight", (v, h)
            yield p + "shared_head.head.weight", (v, h)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def _mlp_shapes(prefix: str, h: int, ffn: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield prefix + "gate_proj.weight", (ffn, h)
    yield prefix + "up_proj.weight", (ffn, h)
    yield prefix + "down_proj.weight", (h, ffn)


def tiny_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A deterministic tensor for `name`: norms near 1, expert bias fp32 and nonzero, matrices ~ 1/sqrt(fan_in)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if name.endswith(EXPERT_BIAS_KEY):
        return noise * 0.5  # large enough that the bias changes which experts are picked
    if name.endswith("norm.weight"):
        return (1.0 + 0.1 * noise).to(torch.bfloat16)
    if name.endswith(".bias"):
        return (0.1 * noise).to(torch.bfloat16)
    fan_in = shape[-1]
    return (noise / math.sqrt(fan_in)).to(torch.bfloat16)


def make_tiny(out_dir: str | Path, preset: str = "air", seed: int = 0, overwrite: bool = False) -> Path:
    """Write the tiny checkpoint (config, >= 2 shards + index, generation config, tokenizer) to `out_dir`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty (pass --overwrite to replace it)")
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    write_tokenizer(staging)
    vocab_size = math.ceil(vocab_size_for(staging) / 64) * 64  # padded like the release (151552 > 151365)
    stop_ids = stop_token_ids(staging)
    config = tiny_config(preset, vocab_size, stop_ids)
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"_from_model_config": True, "eos_token_id": stop_ids, "pad_token_id": stop_ids[0]}
    (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    hf = Glm45Config.from_dict(config)
    shapes = list(hf_tensor_shapes(hf))
    total = sum(math.prod(s) * 2 for _, s in shapes)
    writer = HFCheckpointWriter(staging, max_shard_bytes=total // 3 + 1)  # the release is sharded: so are we
    for name, shape in shapes:
        writer.add(name, tiny_tensor(name, shape, seed))
    writer.finish()

    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir
