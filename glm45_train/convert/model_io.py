"""Fill a built Megatron GPTModel (TP=1, any EP rank) directly from an HF checkpoint, tensor by tensor.

For the precision check and tests, where one process holds the whole (non-expert) model. Production
conversion writes torch_dist checkpoints instead (convert/mcore_io.py), which load at any layout.
"""

from __future__ import annotations

import re

import torch

from glm45_train.convert.hf_io import HFCheckpointReader
from glm45_train.convert.mapping import Glm45Mapping, MappingError

# Buffers that are runtime state, not weights.
_RUNTIME_STATE = ("local_tokens_per_expert", "_extra_state")
_LOCAL_EXPERT = re.compile(r"(local_experts\.|linear_fc[12]\.weight)(\d+)")


def global_expert_name(name: str, ep_rank: int, local_experts: int) -> str:
    """Local expert index -> global one (global = local + ep_rank * experts per rank)."""
    if ".mlp.experts." not in name:
        return name
    return _LOCAL_EXPERT.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + ep_rank * local_experts}", name, count=1)


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, mapping: Glm45Mapping, reader: HFCheckpointReader) -> int:
    """Copy every weight of `model` from `reader`; returns the number of tensors loaded."""
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise ValueError("load_hf_weights needs TP=1; load torch_dist checkpoints for TP > 1")
    mapping.check_hf_names(reader.names())
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    local_experts = mapping.hf.n_routed_experts // parallel_state.get_expert_model_parallel_world_size()
    loaded = 0
    for name, target in model.state_dict(keep_vars=True).items():
        if name.endswith(_RUNTIME_STATE):
            continue
        source = mapping.to_mcore(global_expert_name(name, ep_rank, local_experts), reader.get)
        if source.shape != target.shape:
            raise MappingError(f"{name}: converted shape {tuple(source.shape)} != model {tuple(target.shape)}")
        target.copy_(source)
        loaded += 1
    return loaded
