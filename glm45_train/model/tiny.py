"""`make-tiny`: a tiny but complete GLM-4.5 checkpoint in exactly the released on-disk format.

Two presets mirror the released models at tiny size: `air` (no QK-norm, 1 dense layer, routed scaling 1.0)
and `glm45` (QK-norm, 3 dense layers, routed scaling 2.5). Both have heads x head_dim != hidden (as the
release: 96 x 128 != 4096/5120), partial RoPE 0.5, QKV bias, a shared expert, a nonzero fp32 expert bias,
and one MTP layer stored at index `num_hidden_layers` with every tensor the release has there.

Weights are drawn per tensor from a generator seeded by (seed, tensor name), so a checkpoint is a pure
function of (preset, seed) and independent of write order.

`write_synthetic(out_dir, config)` writes a checkpoint of any size for any config (the conversion benchmark's
real-shape GLM-4.5-Air layers, the interrupt test's mid-size model) with cheap deterministic contents: windows
of one random pool at per-tensor offsets, written a block of rows at a time (memory: one block).

`fp8="per-channel"|"block"` writes the same weights quantised as the FP8 releases are (formats/fp8.py): the
projection matrices in float8_e4m3fn with their `weight_scale` / `weight_scale_inv` tensors and the matching
`quantization_config`; norms, biases, the router, embeddings and output heads stay bf16 (fp32 expert bias).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from glm45_train.formats.fp8 import SCHEMES, quantization_config, quantize
from glm45_train.formats.hf_io import HFCheckpointWriter, StreamingHFWriter
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


def tiny_config(
    preset: str, vocab_size: int, stop_ids: list[int], overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The preset's config.json; `overrides` replace fields (e.g. a layer count a pipeline layout divides)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    config = {**_COMMON, **PRESETS[preset], **(overrides or {}), "vocab_size": vocab_size}
    config.update(eos_token_id=stop_ids, pad_token_id=stop_ids[0])
    return dict(sorted(config.items()))


def _unquantized_linears(hf: Glm45Config) -> list[str]:
    """Linear modules the FP8 releases keep in bf16 (`ignore` of compressed-tensors): routers, output head."""
    moe_layers = range(hf.first_k_dense_replace, hf.num_hidden_layers + hf.num_nextn_predict_layers)
    return ["lm_head", *(f"model.layers.{layer}.mlp.gate" for layer in moe_layers)]


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


def is_quantized_in_fp8_releases(name: str, shape: tuple[int, ...]) -> bool:
    """Projection matrices (attention, dense MLP, experts, shared expert, MTP eh_proj); not the router."""
    return name.endswith("_proj.weight") and len(shape) == 2


def make_tiny(
    out_dir: str | Path,
    preset: str = "air",
    seed: int = 0,
    overwrite: bool = False,
    fp8: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Write the tiny checkpoint (config, >= 2 shards + index, generation config, tokenizer) to `out_dir`.

    `overrides` change config fields of the preset (layers, heads, experts... as `--rehearse` scales a recipe's
    model); the vocabulary always comes from the tiny tokenizer.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty (pass --overwrite to replace it)")
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    write_tokenizer(staging)
    vocab_size = math.ceil(vocab_size_for(staging) / 64) * 64  # padded like the release (151552 > 151365)
    stop_ids = stop_token_ids(staging)
    config = tiny_config(preset, vocab_size, stop_ids, overrides)
    hf = Glm45Config.from_dict(config)
    scheme = SCHEMES[fp8] if fp8 else None
    if scheme is not None:
        config["quantization_config"] = quantization_config(scheme, _unquantized_linears(hf))
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"_from_model_config": True, "eos_token_id": stop_ids, "pad_token_id": stop_ids[0]}
    (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    shapes = list(hf_tensor_shapes(hf))
    total = sum(math.prod(s) * 2 for _, s in shapes)
    writer = HFCheckpointWriter(staging, max_shard_bytes=total // 3 + 1)  # the release is sharded: so are we
    for name, shape in shapes:
        copy_of = MTP_COPIES.get(name.split(".", 3)[-1]) if name.startswith("model.layers.") else None
        tensor = tiny_tensor(copy_of or name, shape, seed)  # MTP copies equal their sources
        if scheme is not None and is_quantized_in_fp8_releases(name, shape):
            tensor, scale = quantize(tensor, scheme)
            writer.add(name[: -len("weight")] + scheme.scale_suffix, scale)
        writer.add(name, tensor)
    writer.finish()

    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir


_POOL_ELEMENTS = 32 * 2**20  # one 64 MiB bf16 pool of random values, windows of which fill synthetic tensors
_POOL_OFFSETS = 65536
_BLOCK_ELEMENTS = 16 * 2**20


@functools.cache
def _random_pool() -> torch.Tensor:
    return torch.randn(_POOL_ELEMENTS + _POOL_OFFSETS, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)


def synthetic_rows(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, block of rows) of synthetic tensor `name`; MTP copies equal their sources."""
    if name.startswith("model.layers.") and name.split(".", 3)[-1] in MTP_COPIES:
        name = MTP_COPIES[name.split(".", 3)[-1]]
    pool = _random_pool()
    row_elems, rows = math.prod(shape[1:]), (shape[0] if shape else 1)
    start = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") % _POOL_OFFSETS
    step = max(1, _BLOCK_ELEMENTS // max(1, row_elems))
    for row in range(0, rows, step):
        n = min(step, rows - row)
        if row_elems * n > _POOL_ELEMENTS:
            raise ValueError(f"{name}: a row of {row_elems} elements exceeds the synthetic pool")
        first = (start + row * 7) % _POOL_OFFSETS
        block = pool[first : first + n * row_elems].view(n, *shape[1:]) if shape else pool[first]
        yield row, block.to(dtype)


def synthetic_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The whole synthetic tensor (for checking a converted checkpoint against its source)."""
    if not shape:
        return next(synthetic_rows(name, shape, dtype))[1]
    return torch.cat([block for _, block in synthetic_rows(name, shape, dtype)])


def write_synthetic(out_dir: str | Path, config: dict[str, Any], max_shard_bytes: int = 5 * 2**30) -> int:
    """A glm4_moe checkpoint for `config` (bf16, fp32 expert bias) with synthetic contents; returns its bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shapes = list(hf_tensor_shapes(Glm45Config.from_dict(config)))
    dtypes = {n: torch.float32 if n.endswith(EXPERT_BIAS_KEY) else torch.bfloat16 for n, _ in shapes}
    writer = StreamingHFWriter(out_dir, [(n, s, dtypes[n]) for n, s in shapes], max_shard_bytes)
    try:
        for name, shape in shapes:
            for row, block in synthetic_rows(name, shape, dtypes[name]):
                writer.write(name, block, row)
        writer.finish()
    finally:
        writer.close()
    return writer.total_bytes
