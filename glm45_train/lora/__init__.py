"""LoRA for Megatron-Core layers: tensor-parallel-aware adapters, adapter-only state, merging and deltas for export.

    report = apply_lora(model, recipe.lora)            # freeze base weights, add adapters (before DDP)
    lora_sharded_state_dict(model)                     # adapter-only torch_dist checkpoints, any layout
    lora_state_dict(model) / load_lora_state_dict(...) # full (TP=1, global expert) tensors by name
    lora_deltas(state, alpha / rank)                   # (mcore base weight name, fp32 delta) for export
    merge_lora(model)                                  # fold into the base weights, remove adapters
    with adapters_disabled(model): ...                 # the base alone (RL's reference model)

layers.py has the adapters and why their tensors carry which Megatron attributes; apply.py finds targets and
attaches adapters; state.py has naming, gathering and checkpoint state; sharding.py full <-> local tensors.
"""

from glm45_train.lora.apply import (
    LoraError,
    LoraReport,
    adapters_disabled,
    apply_lora,
    full_module_name,
    iter_adapters,
    merge_lora,
)
from glm45_train.lora.layers import Adapter, GroupedLoraLinear, LoraLinear, LoraRouter
from glm45_train.lora.state import (
    base_weight_name,
    is_lora_name,
    load_lora_state_dict,
    lora_deltas,
    lora_sharded_state_dict,
    lora_state_dict,
)

__all__ = [
    "Adapter",
    "GroupedLoraLinear",
    "LoraError",
    "LoraLinear",
    "LoraReport",
    "LoraRouter",
    "adapters_disabled",
    "apply_lora",
    "base_weight_name",
    "full_module_name",
    "is_lora_name",
    "iter_adapters",
    "load_lora_state_dict",
    "lora_deltas",
    "lora_sharded_state_dict",
    "lora_state_dict",
    "merge_lora",
]
