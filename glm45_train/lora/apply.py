"""Attach LoRA adapters to a built Megatron GPTModel (`apply_lora`), fold them back (`merge_lora`).

Notable:
- Targets are found by module path (recipe names: linear_qkv, linear_proj, linear_fc1/linear_fc2 = dense MLP and
  shared experts, experts.linear_fc1/experts.linear_fc2 = every routed expert, router); MTP layers included.
- Each adapter is registered next to its base (`linear_qkv` -> `linear_qkv_lora`) and acts through a forward hook;
  the router's gate is reached by an instance-level `gating` attribute (TopKRouter.forward calls `self.gating`),
  the one place where no hook can reach. Nothing of Megatron's classes is changed.
- Every adapter knows its *full name*: its base's path in a TP=1, EP=1, PP=1 model (global layer and expert
  index, local-spec form for TE grouped experts), the names used by `lora_state_dict` and for initialisation.
- A is initialised U(±1/sqrt(in)) from a generator seeded by (seed, full name) on the full tensor, then sliced;
  B starts at zero, so a fresh adapter leaves the model's function unchanged.
- With activation recompute and a frozen embedding, a checkpointed block whose input does not require grad gets
  no gradient at all (Megatron's CheckpointFunction is reentrant): the embedding output is then marked as
  requiring grad, so every adapter inside a recomputed block is reached.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from glm45_train.config.recipe import LORA_TARGETS, LoraSection
from glm45_train.errors import UserError
from glm45_train.lora.layers import Adapter, GroupedLoraLinear, LoraLinear, LoraRouter, Placement
from glm45_train.lora.sharding import name_seeded_uniform, to_local

_TARGET_PATTERNS: tuple[tuple[str, str, str], ...] = (
    (r"self_attention\.linear_qkv", "linear_qkv", "column"),
    (r"self_attention\.linear_proj", "linear_proj", "row"),
    (r"mlp\.(shared_experts\.)?linear_fc1", "linear_fc1", "column"),
    (r"mlp\.(shared_experts\.)?linear_fc2", "linear_fc2", "row"),
    (r"mlp\.experts\.(local_experts\.\d+\.)?linear_fc1", "experts.linear_fc1", "column"),
    (r"mlp\.experts\.(local_experts\.\d+\.)?linear_fc2", "experts.linear_fc2", "row"),
    (r"mlp\.router", "router", "router"),
)
_COMPILED = tuple((re.compile(rf"(^|\.){pattern}$"), target, style) for pattern, target, style in _TARGET_PATTERNS)


class LoraError(UserError, ValueError):
    """LoRA asked for something this model or layout cannot do, or adapter tensors that do not fit."""


@dataclass
class LoraReport:
    """What `apply_lora` did on this rank (parameter counts are this rank's local shards)."""

    rank: int
    alpha: float
    wrapped: dict[str, int] = field(default_factory=dict)  # recipe target -> adapted modules
    trainable_params: int = 0
    total_params: int = 0

    def summary(self) -> str:
        modules = ", ".join(f"{target} x{count}" for target, count in self.wrapped.items())
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        return (
            f"LoRA r={self.rank} alpha={self.alpha:g}: {modules}; "
            f"{self.trainable_params:,} trainable of {self.total_params:,} parameters ({share:.3f}%)"
        )


def iter_adapters(model: torch.nn.Module) -> list[Adapter]:
    """Every adapter in `model` (bare or wrapped), in module order (identical on all ranks of a TP group)."""
    return [module for module in model.modules() if isinstance(module, Adapter)]


def apply_lora(model: Any, lora: LoraSection, *, seed: int = 0) -> LoraReport:
    """Freeze every base parameter and add adapters on `lora.targets`. Call on the bare GPTModel, before DDP."""
    _check_section(lora)
    if iter_adapters(model):
        raise LoraError("apply_lora: the model already has LoRA adapters")
    found = list(_find_targets(model, set(lora.targets)))
    if not found:
        raise LoraError(f"lora.targets: no module of this model matches {', '.join(lora.targets)}")
    placements = [None if style == "router" else _placement(base, style, target) for _, base, target, style in found]
    for param in model.parameters():  # only now, when every target is known to be supported
        param.requires_grad_(False)
    report = LoraReport(rank=lora.rank, alpha=lora.alpha)
    for (path, base, target, _), placement in zip(found, placements, strict=True):
        adapter = _attach(model, path, base, placement, lora)
        _initialize(adapter, seed)
        report.wrapped[target] = report.wrapped.get(target, 0) + 1
    if getattr(model, "config", None) is not None and model.config.recompute_granularity is not None:
        _keep_grad_through_recompute(model)
    report.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report.total_params = sum(p.numel() for p in model.parameters())
    return report


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The base model alone inside the block (every adapter's term off; nothing copied): RL's reference model."""
    adapters = iter_adapters(model)
    for adapter in adapters:
        adapter.disabled = True
    try:
        yield
    finally:
        for adapter in adapters:
            adapter.disabled = False


@torch.no_grad()
def merge_lora(model: torch.nn.Module) -> int:
    """Fold every adapter into its base weight (in fp32, then cast) and remove the adapters. Returns the count.

    Works at any layout (each rank merges its local shards). Base weights stay frozen.
    """
    merged = 0
    for adapter in iter_adapters(model):
        for weight, delta in adapter.delta_weights():
            weight.copy_((weight.float() + delta).to(weight.dtype))
            merged += 1
        _detach(adapter)
    return merged


def _check_section(lora: LoraSection) -> None:
    if not lora.enabled:
        raise LoraError("lora.enabled is false: nothing to apply")
    if lora.rank < 1:
        raise LoraError(f"lora.rank must be >= 1, got {lora.rank}")
    unknown = [t for t in lora.targets if t not in LORA_TARGETS]
    if unknown:
        raise LoraError(f"lora.targets: {', '.join(unknown)} not among {', '.join(LORA_TARGETS)}")
    if not 0.0 <= lora.dropout < 1.0:
        raise LoraError(f"lora.dropout must be in [0, 1), got {lora.dropout}")


def _find_targets(model: Any, targets: set[str]) -> Iterator[tuple[str, torch.nn.Module, str, str]]:
    for path, module in model.named_modules():
        for pattern, target, style in _COMPILED:
            if target in targets and pattern.search(path):
                yield path, module, target, style


def _attach(model: Any, path: str, base: Any, placement: Placement | None, lora: LoraSection) -> Adapter:
    """Register the adapter next to `base` and hook it in; `placement` None means the router."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    full_name, name = full_module_name(model, path), f"{attr}_lora"
    if hasattr(parent, name):
        raise LoraError(f"{parent_path}: cannot add adapter {name!r}, the name is taken")
    adapter: Adapter
    if placement is None:
        adapter = LoraRouter(base, full_name, lora.rank, lora.alpha, lora.dropout)
        base.gating = adapter.gating  # an instance attribute shadows TopKRouter.gating for this router only
        adapter.handle = "gating"
    else:
        if hasattr(base, "weight0"):  # TE grouped linear: one weight{i} per local expert
            adapter = _grouped_adapter(parent, base, full_name, placement, lora)
        else:
            adapter = LoraLinear(base, placement, full_name, lora.rank, lora.alpha, lora.dropout)
        if placement.norm_output:
            base.return_layernorm_output, base.return_layernorm_output_gathered = True, False
        adapter.handle = base.register_forward_hook(adapter.hook, with_kwargs=True)
    parent.add_module(name, adapter)
    adapter.__dict__["parent"], adapter.attr = parent, name
    return adapter


def _detach(adapter: Adapter) -> None:
    base = adapter.base
    if adapter.handle == "gating":
        del base.gating
    else:
        adapter.handle.remove()
    if isinstance(adapter, LoraLinear | GroupedLoraLinear) and adapter.placement.norm_output:
        base.return_layernorm_output = False
    delattr(adapter.parent, adapter.attr)


def _placement(base: Any, style: str, target: str) -> Placement:
    """Read the base's TP group, sequence parallelism and communication mode off the built module."""
    from megatron.core.utils import get_pg_rank, get_pg_size

    expert = target.startswith("experts.")
    group = getattr(base, "_tp_group", None) or getattr(base, "tp_group", None)
    size = get_pg_size(group)
    if expert and size > 1:
        raise LoraError(
            f"LoRA on routed experts ({target}) needs expert tensor parallel 1 (parallel.etp), got {size}: "
            "the expert dispatcher reduces expert outputs, so a split expert adapter would be reduced twice"
        )
    if style == "row" and not getattr(base, "input_is_parallel", True):
        raise LoraError(f"{target}: row-parallel linear with input_is_parallel=False is not supported")
    no_comm = bool(getattr(base, "explicit_expert_comm", False)) or getattr(base, "parallel_mode", "") is None
    sequence_parallel = bool(getattr(base, "sequence_parallel", False))
    comm = "none" if size == 1 or no_comm else ("sp" if sequence_parallel else "tp")
    return Placement(
        style=style,
        tp_group=group,
        tp_size=size,
        tp_rank=get_pg_rank(group),
        comm=comm,
        sequence_parallel=bool(base.config.sequence_parallel),
        gated=target.endswith("linear_fc1") and bool(base.config.gated_linear_unit),
        expert=expert,
        gather_output=bool(getattr(base, "gather_output", False)),
        norm_output=hasattr(base, "return_layernorm_output"),
    )


def _grouped_adapter(
    experts: Any, base: Any, full_name: str, placement: Placement, lora: LoraSection
) -> GroupedLoraLinear:
    from megatron.core.utils import get_pg_rank

    local = experts.num_local_experts
    offset = get_pg_rank(experts.ep_group) * local
    prefix, _, linear = full_name.rpartition(".")
    names = [f"{prefix}.local_experts.{offset + i}.{linear}" for i in range(local)]
    total = experts.ep_group.size() * local
    return GroupedLoraLinear(base, placement, names, offset, total, lora.rank, lora.alpha, lora.dropout)


def full_module_name(model: Any, path: str) -> str:
    """A module's path in the TP=1, EP=1, PP=1 model: global layer index (decoder and MTP), global expert index."""
    from megatron.core.utils import get_pg_rank

    original = path.split(".")
    parts = list(original)
    for i in range(1, len(parts) - 1):
        if original[i] == "layers" and original[i - 1] in ("decoder", "mtp"):
            layer = model.get_submodule(".".join(original[: i + 2]))
            parts[i + 1] = str(layer.layer_number - 1)
        if original[i] == "local_experts":
            experts = model.get_submodule(".".join(original[:i]))
            parts[i + 1] = str(int(original[i + 1]) + get_pg_rank(experts.ep_group) * experts.num_local_experts)
    return ".".join(parts)


@torch.no_grad()
def _initialize(adapter: Adapter, seed: int) -> None:
    for name, param, shard in adapter.entries():
        if param.device.type == "meta":
            continue
        if name.endswith("lora_B"):
            param.zero_()
            continue
        full_shape = shard.full_shape(param.shape)
        full = name_seeded_uniform(name, full_shape, 1.0 / math.sqrt(full_shape[1]), seed)
        param.copy_(to_local(full, shard))


def _keep_grad_through_recompute(model: Any) -> None:
    embedding = getattr(model, "embedding", None)
    if embedding is None:  # not the first pipeline stage: its input arrives with requires_grad set
        return

    def require_grad(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output if output.requires_grad else output.detach().requires_grad_(True)

    embedding.register_forward_hook(require_grad)
