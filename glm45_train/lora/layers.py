"""Tensor-parallel-aware LoRA adapters for Megatron-Core linears (local and Transformer Engine) and the MoE router.

An adapter never replaces the Megatron module it adapts (the *base*): it is registered next to it (`linear_qkv`
gets a sibling `linear_qkv_lora`) and adds its term through a forward hook, so every base parameter keeps its
name, its class and its place in `model.modules()`; see apply.py. Output: `(base_out + (alpha/r)·B(A(drop(x))), bias)`.

Sharding (Shard in sharding.py) and communication on the low-rank path, per base style:

| base | A `[r, in]` | B `[out, r]` | after A (no SP) | after A (sequence parallel) |
|---|---|---|---|---|
| column (linear_qkv, linear_fc1) | replicated | split dim 0 | copy to TP region | all-gather from SP region |
| row (linear_proj, linear_fc2) | split dim 1 | replicated | reduce from TP region | reduce-scatter to SP region |

Communicating the r-wide activation (not the hidden-wide input) keeps A's gradient complete on every TP rank.
Replicated tensors carry `sequence_parallel=config.sequence_parallel`: under SP each TP rank sees other tokens, so
Megatron's finalize_model_grads must all-reduce them across TP. Routed-expert adapters (expert tensor parallel 1;
the dispatcher does all communication) carry `allreduce=False`, so DDP reduces them over the expert-data-parallel
group, and `tensor_model_parallel=True` over their size-1 expert TP group, like Megatron's own expert weights.
TE's fused LayerNorm+linear is asked for its normalised input (`return_layernorm_output`, not gathered: TE adds
that output's gradient after its own TP reduction, exactly like a plain input), which the adapter reads.

Legend: `x` the base's input, `h` the r-wide activation, `y` the adapter's output.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from glm45_train.lora.sharding import Shard


@dataclass(frozen=True)
class Placement:
    """How a base linear is split and how it communicates, read off the built module (see apply.py)."""

    style: str  # "column" | "row"
    tp_group: Any
    tp_size: int
    tp_rank: int
    comm: str  # "tp" (all-reduce style) | "sp" (sequence parallel) | "none" (no TP communication)
    sequence_parallel: bool  # config.sequence_parallel: replicated tensors get their grads all-reduced over TP
    gated: bool = False  # fused SwiGLU fc1: B's rows are [gate; up], each half split over TP
    expert: bool = False  # a routed expert (expert data parallel, expert TP group of size 1)
    gather_output: bool = False  # a column-parallel base that all-gathers its output
    norm_output: bool = False  # TE LayerNorm+linear: the adapter reads the normalised input from the output


def _mark(param: torch.nn.Parameter, shard: Shard, *, expert: bool, sequence_parallel: bool) -> None:
    """Megatron's parameter attributes, read by DDP, finalize_model_grads, the optimizer and grad clipping."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    if expert:  # like Megatron's expert weights: "TP-split" over the size-1 expert TP group, never duplicates
        set_tensor_model_parallel_attributes(param, True, 0 if shard.dim is None else shard.dim, 1)
    else:
        set_tensor_model_parallel_attributes(param, shard.dim is not None, -1 if shard.dim is None else shard.dim, 1)
    param.allreduce = not expert  # type: ignore[attr-defined]
    param.sequence_parallel = sequence_parallel and shard.dim is None and not expert  # type: ignore[attr-defined]


class Adapter(torch.nn.Module):
    """Shared parts: scaling, dropout, the hook handle, and the (full name, local tensor, shard) table."""

    base: Any  # the adapted Megatron module (kept out of `_modules`: its state-dict keys must not move)
    parent: Any  # the module this adapter is registered in, next to `base`
    attr: str  # this adapter's attribute name in `parent`

    def __init__(self, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.rank = rank
        self.scaling = alpha / rank
        self.dropout_p = dropout
        self.handle: Any = None  # the forward hook (or gating override) to undo on merge
        self.disabled = False  # True: the base alone (RL's reference model; apply.adapters_disabled)

    def entries(self) -> Iterator[tuple[str, torch.nn.Parameter, Shard]]:
        """(full TP=1 name, local parameter, how it is cut) for every LoRA tensor of this adapter."""
        raise NotImplementedError

    def delta_weights(self) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor]]:
        """(local base weight, local fp32 delta (alpha/r)·B@A of the same shape) for merging."""
        raise NotImplementedError

    def _dropout(self, x: torch.Tensor, same_on_tp_ranks: bool) -> torch.Tensor:
        if not self.training or self.dropout_p == 0.0:
            return x
        if same_on_tp_ranks:  # the default generator is identical across TP ranks
            return F.dropout(x, self.dropout_p)
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        with get_cuda_rng_tracker().fork():  # a different mask on each TP rank
            return F.dropout(x, self.dropout_p)


def _empty(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=like.device))


class LoraLinear(Adapter):
    """LoRA for one column- or row-parallel linear: `ColumnParallelLinear`, `RowParallelLinear`, `TE*Linear`."""

    def __init__(
        self, base: Any, placement: Placement, full_name: str, rank: int, alpha: float, dropout: float
    ) -> None:
        super().__init__(rank, alpha, dropout)
        self.placement = placement
        self.full_name = full_name  # the base module's name in a TP=1, EP=1, PP=1 model
        out_local, in_local = base.weight.shape
        dtype = base.weight.dtype
        self.lora_A = _empty((rank, in_local), base.weight, dtype)
        self.lora_B = _empty((out_local, rank), base.weight, dtype)
        for _, param, shard in self.entries():
            _mark(param, shard, expert=placement.expert, sequence_parallel=placement.sequence_parallel)
        self.__dict__["base"] = base

    def shards(self) -> dict[str, Shard]:
        """Column: A replicated, B split on dim 0. Row: A split on dim 1, B replicated. (Experts: TP size 1.)"""
        p = self.placement
        if p.style == "column":
            return {"lora_A": Shard(None), "lora_B": Shard(0, p.tp_rank, p.tp_size, p.tp_group, gated=p.gated)}
        return {"lora_A": Shard(1, p.tp_rank, p.tp_size, p.tp_group), "lora_B": Shard(None)}

    def entries(self) -> Iterator[tuple[str, torch.nn.Parameter, Shard]]:
        shards = self.shards()
        yield f"{self.full_name}_lora.lora_A", self.lora_A, shards["lora_A"]
        yield f"{self.full_name}_lora.lora_B", self.lora_B, shards["lora_B"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.placement
        x = self._dropout(x, same_on_tp_ranks=p.style == "column" and p.comm != "sp")
        h = self._communicate(F.linear(x, self.lora_A))
        y = F.linear(h, self.lora_B) * self.scaling
        if p.gather_output and p.tp_size > 1:
            from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

            y = gather_from_tensor_model_parallel_region(y, group=p.tp_group)
        return y

    def _communicate(self, h: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import mappings

        p = self.placement
        if p.comm == "none":
            return h
        if p.style == "column" and p.comm == "tp":
            return mappings.copy_to_tensor_model_parallel_region(h, group=p.tp_group)
        if p.style == "column":
            return mappings.gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True, group=p.tp_group)
        if p.comm == "tp":
            return mappings.reduce_from_tensor_model_parallel_region(h, group=p.tp_group)
        return mappings.reduce_scatter_to_sequence_parallel_region(h, group=p.tp_group)

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Forward hook on the base: add the LoRA term to its output, keep the (output, bias) contract."""
        if self.placement.norm_output:  # TE LayerNormLinear: ((out, ln_out), bias) or (out, bias, ln_out)
            (out, x), bias = output if len(output) == 2 else ((output[0], output[2]), output[1])
        else:
            x = args[0] if args else next(iter(kwargs.values()))
            out, bias = output
        return (out if self.disabled else out + self(x).to(out.dtype)), bias

    def delta_weights(self) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor]]:
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        yield self.base.weight, delta

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """lora_B split on dim 0 (column; SwiGLU halves like the base fc1), lora_A on dim 1 (row); others replicated."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        shards = self.shards()
        axes = {name: shard.dim for name, shard in shards.items() if shard.dim is not None}
        group = self.placement.tp_group
        tensors = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        sharded = make_sharded_tensors_for_checkpoint(
            tensors, prefix, axes, sharded_offsets, tp_group=group, dp_cp_group=metadata["dp_cp_group"]
        )
        if shards["lora_B"].gated:
            singleton = metadata.get("singleton_local_shards", False)
            key = f"{prefix}lora_B"
            sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets, singleton)
        return sharded


class GroupedLoraLinear(Adapter):
    """Per-expert LoRA for TE's grouped expert linears (`TEGroupedMLP`, GPU): one A/B pair per local expert."""

    def __init__(
        self,
        base: Any,
        placement: Placement,
        full_names: list[str],
        expert_offset: int,
        num_experts: int,
        rank: int,
        alpha: float,
        dropout: float,
    ) -> None:
        super().__init__(rank, alpha, dropout)
        self.placement = placement
        self.full_names = full_names  # one per local expert: ...mlp.experts.local_experts.{global}.linear_fc1
        self.expert_offset, self.num_experts = expert_offset, num_experts
        weights = [getattr(base, f"weight{i}") for i in range(len(full_names))]
        dtype = weights[0].dtype
        self.lora_A = torch.nn.ParameterList(_empty((rank, w.shape[1]), w, dtype) for w in weights)
        self.lora_B = torch.nn.ParameterList(_empty((w.shape[0], rank), w, dtype) for w in weights)
        for _, param, shard in self.entries():
            _mark(param, shard, expert=True, sequence_parallel=False)
        self.__dict__["base"] = base

    def entries(self) -> Iterator[tuple[str, torch.nn.Parameter, Shard]]:
        for name, a, b in zip(self.full_names, self.lora_A, self.lora_B, strict=True):
            yield f"{name}_lora.lora_A", a, Shard(None)
            yield f"{name}_lora.lora_B", b, Shard(None)

    def forward(self, x: torch.Tensor, m_splits: Any) -> torch.Tensor:
        splits = m_splits.tolist() if torch.is_tensor(m_splits) else list(m_splits)
        x = self._dropout(x, same_on_tp_ranks=True)
        chunks = zip(x.split(splits), self.lora_A, self.lora_B, strict=True)
        return torch.cat([F.linear(F.linear(chunk, a), b) for chunk, a, b in chunks]) * self.scaling

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        out, bias = output
        return (out if self.disabled else out + self(args[0], args[1]).to(out.dtype)), bias

    def delta_weights(self) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor]]:
        for i, (a, b) in enumerate(zip(self.lora_A, self.lora_B, strict=True)):
            yield getattr(self.base, f"weight{i}"), (b.float() @ a.float()) * self.scaling

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """One checkpoint tensor per name with a leading expert axis, interchangeable with SequentialMLP's."""
        from megatron.core.dist_checkpointing import ShardedTensor
        from megatron.core.parallel_state import get_expert_data_parallel_rank
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

        sharded: dict = {}
        replica_id = (0, 0, get_expert_data_parallel_rank())
        for i in range(len(self.full_names)):
            expert_axis = (len(sharded_offsets), self.expert_offset + i, self.num_experts)
            offsets = (*sharded_offsets, expert_axis)
            for name in ("lora_A", "lora_B"):
                tensor = getattr(self, name)[i]
                sh = ShardedTensor.from_rank_offsets(
                    f"{prefix}{name}", tensor, *offsets, replica_id=replica_id, prepend_axis_num=len(offsets)
                )
                if name == "lora_B" and self.placement.gated:
                    sh = apply_swiglu_sharded_factory(sh, offsets)
                sharded[f"{prefix}{name}.{i}"] = sh
        return sharded


class LoraRouter(Adapter):
    """LoRA on the MoE router's gate: logits = x·Wᵀ + (alpha/r)·(x·Aᵀ)·Bᵀ, computed in the router's dtype."""

    def __init__(self, router: Any, full_name: str, rank: int, alpha: float, dropout: float) -> None:
        super().__init__(rank, alpha, dropout)
        self.full_name = full_name
        experts, hidden = router.weight.shape
        dtype = router.weight.dtype
        self.lora_A = _empty((rank, hidden), router.weight, dtype)
        self.lora_B = _empty((experts, rank), router.weight, dtype)
        sequence_parallel = bool(router.config.sequence_parallel)
        for _, param, shard in self.entries():
            _mark(param, shard, expert=False, sequence_parallel=sequence_parallel)
        self.__dict__["base"] = router

    def entries(self) -> Iterator[tuple[str, torch.nn.Parameter, Shard]]:
        yield f"{self.full_name}_lora.lora_A", self.lora_A, Shard(None)
        yield f"{self.full_name}_lora.lora_B", self.lora_B, Shard(None)

    def gating(self, x: torch.Tensor) -> torch.Tensor:
        """Replaces the router instance's `gating` (TopKRouter.forward calls `self.gating(input)`)."""
        router = self.base
        logits = type(router).gating(router, x)
        if self.disabled:
            return logits
        x = self._dropout(x, same_on_tp_ranks=not router.config.sequence_parallel)
        h = F.linear(x.to(logits.dtype), self.lora_A.to(logits.dtype))
        return logits + F.linear(h, self.lora_B.to(logits.dtype)) * self.scaling

    def delta_weights(self) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor]]:
        yield self.base.weight, (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        tensors = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        return make_sharded_tensors_for_checkpoint(
            tensors, prefix, {}, sharded_offsets, tp_group=self.base.tp_group, dp_cp_group=metadata["dp_cp_group"]
        )
