"""Adapter state: full-tensor state dicts, Megatron dist_checkpointing state, and weight deltas for export.

Names: a LoRA tensor is called `<base module>_lora.lora_A` / `.lora_B`, where `<base module>` is the module's path
in a TP=1, EP=1, PP=1 model with the local spec (global layer index, `local_experts.<global index>`); these are
exactly the keys `model.state_dict()` has at that layout. `lora_A` is `[r, in]`, `lora_B` is `[out, r]` in the
TP=1 layout of the base weight (fused qkv rows as Megatron orders them; fc1 rows `[gate; up]`), so the delta of
base weight `<base module>.weight` is `(alpha/r) · lora_B @ lora_A`.

- `lora_state_dict` gathers full tensors (a collective over each TP group and, for experts, the EP group: call it on
  every rank); at PP > 1 each stage returns its own layers.
- `lora_sharded_state_dict` is the LoRA part of Megatron's own `model.sharded_state_dict()`: lora_B split on dim 0
  for column-parallel bases (SwiGLU halves like the base fc1), lora_A on dim 1 for row-parallel ones, routed-expert
  tensors with the expert axis of SequentialMLP/TEGroupedMLP. Adapter-only torch_dist checkpoints written with it
  load at any other TP/EP/PP layout.
- `lora_deltas` is a pure function of a full state dict (no model, no process group), for merged export.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist

from glm45_train.lora.apply import LoraError, iter_adapters
from glm45_train.lora.sharding import to_full, to_local

LORA_SUFFIXES = ("_lora.lora_A", "_lora.lora_B")


def is_lora_name(name: str) -> bool:
    """True for LoRA tensors in state dicts and sharded state dicts (`..._lora.lora_A`, `..._lora.lora_B.3`)."""
    return "_lora.lora_A" in name or "_lora.lora_B" in name


def base_weight_name(lora_name: str) -> str:
    """`...self_attention.linear_qkv_lora.lora_A` -> `...self_attention.linear_qkv.weight`."""
    for suffix in LORA_SUFFIXES:
        if lora_name.endswith(suffix):
            return lora_name[: -len(suffix)] + ".weight"
    raise ValueError(f"{lora_name!r} is not a LoRA tensor name")


@torch.no_grad()
def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor, full (TP=1 layout), on the CPU, under its TP=1/EP=1 name. Collective: call on all ranks."""
    state = {}
    for adapter in iter_adapters(model):
        for name, param, shard in adapter.entries():
            state[name] = to_full(param.detach(), shard).to("cpu", copy=True)  # a copy, never the live tensor
    return _with_all_experts(state)


def _with_all_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from megatron.core import parallel_state

    if parallel_state.get_expert_model_parallel_world_size() == 1:
        return state
    experts = {name: tensor for name, tensor in state.items() if ".local_experts." in name}
    gathered: list[dict[str, torch.Tensor] | None] = [None] * parallel_state.get_expert_model_parallel_world_size()
    dist.all_gather_object(gathered, experts, group=parallel_state.get_expert_model_parallel_group())
    for part in gathered:
        state.update(part or {})
    return state


@torch.no_grad()
def load_lora_state_dict(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True
) -> list[str]:
    """Copy full tensors (as `lora_state_dict` returns them) into this rank's shards. Returns the unused names.

    Every adapter of the model must be present (else LoraError). With `strict`, names that no adapter of the
    model uses are an error too, unless some parallelism (EP, PP) legitimately places them on other ranks.
    """
    used: set[str] = set()
    missing: list[str] = []
    for adapter in iter_adapters(model):
        for name, param, shard in adapter.entries():
            if name not in state:
                missing.append(name)
                continue
            full, expected = state[name], shard.full_shape(param.shape)
            if tuple(full.shape) != expected:
                raise LoraError(f"{name}: tensor of shape {tuple(full.shape)}, expected {expected}")
            param.copy_(to_local(full.to(device=param.device, dtype=param.dtype), shard))
            used.add(name)
    if missing:
        raise LoraError(f"LoRA state lacks {len(missing)} tensor(s) of this model, e.g. {', '.join(missing[:3])}")
    unused = sorted(name for name in state if name not in used)
    if strict and unused and _holds_everything():
        raise LoraError(f"LoRA state has {len(unused)} tensor(s) this model has no adapter for, e.g. {unused[:3]}")
    return unused


def _holds_everything() -> bool:
    from megatron.core import parallel_state

    return (
        parallel_state.get_expert_model_parallel_world_size() == 1
        and parallel_state.get_pipeline_model_parallel_world_size() == 1
    )


def lora_sharded_state_dict(model: Any, metadata: dict | None = None) -> dict:
    """The LoRA entries of `model.sharded_state_dict()`, for `dist_checkpointing.save/load` of adapter-only state.

    After `safe_load.load(lora_sharded_state_dict(model), dir)` (convert/torch_dist/safe_load.py), apply the result with
    `model.load_state_dict(loaded, strict=False)` (its keys are the model's own state-dict keys).
    """
    bare = model
    while not hasattr(bare, "decoder") and hasattr(bare, "module"):  # DDP / Float16Module wrappers
        bare = bare.module
    sharded = bare.sharded_state_dict(prefix="", metadata=metadata)
    return {key: value for key, value in sharded.items() if is_lora_name(key)}


def lora_deltas(state: Mapping[str, torch.Tensor], scaling: float) -> Iterator[tuple[str, torch.Tensor]]:
    """(base weight name, fp32 delta `scaling · B @ A`) for every adapter in a full LoRA state dict.

    `scaling` is alpha / rank. Pure: the deltas have the TP=1 layout of the Megatron weight they add to.
    """
    for name in sorted(state):
        if not name.endswith("_lora.lora_A"):
            continue
        stem = name[: -len("lora_A")]
        if f"{stem}lora_B" not in state:
            raise LoraError(f"{name}: no matching {stem}lora_B")
        yield base_weight_name(name), (state[f"{stem}lora_B"].float() @ state[name].float()) * scaling
