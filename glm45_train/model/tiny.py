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
from pathlib import Path
from typing import Any

import torch

from glm45_train.convert.hf_io import HFCheckpointWriter
from glm45_train.model.hf_config import Glm45Config
from glm45_train.model.hf_layout import EXPERT_BIAS_KEY, MTP_COPIES, hf_tensor_shapes
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


def tiny_config(preset: str, vocab_size: int, stop_ids: list[int]) -> dict[str, Any]:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    config = {**_COMMON, **PRESETS[preset], "vocab_size": vocab_size}
    config.update(eos_token_id=stop_ids, pad_token_id=stop_ids[0])
    return dict(sorted(config.items()))


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
        copy_of = MTP_COPIES.get(name.split(".", 3)[-1]) if name.startswith("model.layers.") else None
        writer.add(name, tiny_tensor(copy_of or name, shape, seed))  # MTP copies equal their sources
    writer.finish()

    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir
