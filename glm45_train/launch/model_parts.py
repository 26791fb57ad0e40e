"""Parameter counts of GLM-4.5 by part, from a Megatron build on the `meta` device (no memory, no weights).

A probe model with the real widths but one layer of each kind (dense, MoE) plus the MTP block is built on
`meta`; every parameter is filed under its block (embedding, head, dense layer, MoE layer, MTP) and its
sharding class:

    tp          split over tensor parallel (linears, qkv bias, vocab-parallel embedding and output layer)
    replicated  whole on every TP rank (norms, router)
    expert      routed experts: split over expert parallel x expert tensor parallel

Per-layer counts are exact for the full model (every layer of a kind is identical), so `plan` never needs
the 100B-parameter model in memory. The dtype of every tensor is kept as built (local-spec norms stay fp32
in a bf16 model), so byte counts equal what a real run allocates. LoRA adapter counts follow the
tensor-parallel LoRA layout (lora-packing-training-on-cpu.md): column-parallel base -> A [r, in] replicated,
B [out/tp, r]; row-parallel base -> A [r, in/tp], B [out, r] replicated; routed experts one pair per expert.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glm45_train.errors import UserError
from glm45_train.model.hf_config import Glm45Config
from glm45_train.model.releases import RELEASED_CONFIGS

BLOCKS = ("embedding", "dense_layer", "moe_layer", "mtp", "head")

# The released configs, for planning recipes offline: `plan --config air`.
KNOWN_MODELS = RELEASED_CONFIGS


def resolve_model_config(source: str, override: str | None = None) -> Glm45Config:
    """The model's config: `override` (a known name `air`/`glm45`, a config.json or a directory) or else
    the recipe's model.source (HF directory, or an mcore checkpoint from `export --to-mcore`)."""
    if override in KNOWN_MODELS:
        return Glm45Config.from_dict(KNOWN_MODELS[override], source=f"known model {override!r}")
    path = Path(override or source)
    for candidate in (path, path / "config.json", path / "hf_assets" / "config.json"):
        if candidate.is_file():
            return Glm45Config.from_file(candidate)
    if path.is_dir():
        with contextlib.suppress(UserError):
            from glm45_train.convert.torch_dist.directory import McoreCheckpointDir

            return Glm45Config.from_dict(McoreCheckpointDir(path).hf_config, source=str(path))
    what = "--config" if override else "model.source"
    raise UserError(
        f"{what}: cannot read a model config from {str(path)!r}; pass --config air|glm45|PATH/config.json "
        "to plan without the model on this machine"
    )


@dataclass(frozen=True)
class Linear:
    """A base linear a LoRA target can wrap: recipe target name, [out, in] of the full (TP=1) weight."""

    block: str
    target: str
    out_features: int
    in_features: int


@dataclass(frozen=True)
class ModelParts:
    """Per-block parameter numel by (sharding, bytes per element), and the LoRA-targetable linears."""

    hf: Glm45Config
    numel: dict[str, Counter[tuple[str, int]]]
    linears: tuple[Linear, ...]

    def layer_counts(self) -> dict[str, int]:
        dense = self.hf.first_k_dense_replace
        return {"dense_layer": dense, "moe_layer": self.hf.num_hidden_layers - dense}


def count_parts(hf: Glm45Config, element_size: int) -> ModelParts:
    """Counts for `hf` built with parameters of `element_size` bytes (2 = bf16, 4 = fp32)."""
    return _count_parts(hf, element_size)


@functools.lru_cache(maxsize=16)
def _count_parts(hf: Glm45Config, element_size: int) -> ModelParts:
    import torch

    from glm45_train.model.build import build_model
    from glm45_train.model.hf_config import to_transformer_config

    dense = min(hf.first_k_dense_replace, 1)
    moe = 1 if hf.num_hidden_layers > hf.first_k_dense_replace else 0
    probe = Glm45Config.from_dict(
        {"model_type": "glm4_moe", **_fields(hf), "num_hidden_layers": dense + moe, "first_k_dense_replace": dense}
    )
    dtype = {2: torch.bfloat16, 4: torch.float32}[element_size]
    with _single_process_world():
        config = to_transformer_config(probe, params_dtype=dtype, on_gpu=False, perform_initialization=False)
        model = build_model(probe, config, device="meta", use_te=False)
    numel: dict[str, Counter[tuple[str, int]]] = {block: Counter() for block in BLOCKS}
    linears = []
    for name, param in model.named_parameters():
        block = _block(name, dense)
        numel[block][(_sharding(name), param.element_size())] += param.numel()
        target = _lora_target(name)
        if target and param.dim() == 2:
            linears.append(Linear(block, target, int(param.shape[0]), int(param.shape[1])))
    return ModelParts(hf=hf, numel=numel, linears=tuple(linears))


def _fields(hf: Glm45Config) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(hf, f.name) for f in dataclasses.fields(hf)}


def _block(name: str, dense_layers: int) -> str:
    if name.startswith("embedding."):
        return "embedding"
    if name.startswith("mtp."):
        return "mtp"
    if name.startswith(("output_layer.", "decoder.final_layernorm.")):
        return "head"
    index = int(name.split(".")[2])  # decoder.layers.<i>.
    return "dense_layer" if index < dense_layers else "moe_layer"


def _sharding(name: str) -> str:
    if ".mlp.experts." in name:
        return "expert"
    leaf_module = name.rsplit(".", 2)[-2]
    if ".router." in name or "norm" in leaf_module:
        return "replicated"
    return "tp"


def _lora_target(name: str) -> str | None:
    """The recipe LoRA target a weight belongs to (see config/recipe.py LORA_TARGETS), or None."""
    if not name.endswith(".weight"):
        return None
    if ".mlp.router." in name:
        return "router"
    module = name.rsplit(".", 2)[-2]
    if module not in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"):
        return None
    return f"experts.{module}" if ".mlp.experts." in name else module


@contextlib.contextmanager
def _single_process_world() -> Iterator[None]:
    """Megatron's parallel state at size 1 for the probe build; torn down again only if created here."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from glm45_train.runtime import distributed

    if parallel_state.model_parallel_is_initialized():
        sizes = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_expert_model_parallel_world_size(),
        )
        if sizes != (1, 1, 1):
            raise RuntimeError(f"parameter counting needs TP=PP=EP=1 parallel state, found {sizes}")
        yield
        return
    created = not dist.is_initialized()
    distributed.initialize()
    try:
        yield
    finally:
        if created:
            distributed.shutdown()
        else:
            parallel_state.destroy_model_parallel()
