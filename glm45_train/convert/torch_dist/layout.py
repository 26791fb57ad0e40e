"""The Megatron side of conversion: GLM-4.5 built on `meta`, its sharded state dict with Transformer-Engine-style
checkpoint keys, and which model tensor each shard is a view of.

Nothing here holds weights. A meta model keeps storage identity through Megatron's chunk/view/detach calls, so the
storage of a shard's (meta) data names the model tensor it belongs to (`TensorIndex`), and its offset and strides
say where inside that tensor it lies. That is enough to write (lazy_save.py) or read (reader.py) any
layout without knowing how Megatron shards each module.

TE-style keys (what GPU users with Transformer Engine load). megatron-core 0.16.1's local layer spec already
renames two norms to the TE fused names in the sharded state dict: `input_layernorm.weight` ->
`self_attention.linear_qkv.layer_norm_weight` and `pre_mlp_layernorm.weight` -> `mlp.linear_fc1.layer_norm_weight`
-- on every layer. The TE spec fuses the second one into fc1 only on dense layers; MoE layers keep a separate
`pre_mlp_layernorm.weight`. `te_style_keys` renames the MoE ones back (a no-op on a TE model).
TE norm modules (TENorm: q/k norms, MoE pre-MLP norm, final norms, MTP enorm/hnorm) also request an `_extra_state`
object that Megatron's local norms lack; a missing object fails Megatron-LM's default load, so the writer adds them
empty (None, which TE's `set_extra_state` ignores). Unused objects in a checkpoint are harmless.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from glm45_train.config.layout import ParallelLayout
from glm45_train.convert.mapping.names import global_expert_name
from glm45_train.model.hf_config import Glm45Config, to_transformer_config

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel

_DECODER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_FUSED_NORM = "mlp.linear_fc1.layer_norm_weight"
_MOE_NORM = "pre_mlp_layernorm.weight"
_ROUTER = "mlp.router.weight"
# Norm weights that are standalone TENorm modules (with `_extra_state`) in the TE spec.
_TE_NORMS = (
    "q_layernorm.weight",
    "k_layernorm.weight",
    _MOE_NORM,
    "final_layernorm.weight",
    "enorm.weight",
    "hnorm.weight",
)


def current_layout() -> ParallelLayout:
    from megatron.core import parallel_state as ps

    return ParallelLayout(
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        ep=ps.get_expert_model_parallel_world_size(),
        etp=ps.get_expert_tensor_parallel_world_size(),
    )


def build_meta_model(hf: Glm45Config, dtype: torch.dtype, with_mtp: bool = True) -> GPTModel:
    """This rank's part of GLM-4.5 at the current parallel layout, on `meta`, floating parameters in `dtype`
    (`with_mtp=False`: without the MTP block, as a run trained without the MTP loss saves it).

    Megatron's local norms ignore `params_dtype` (they stay fp32); checkpoint dtypes must not depend on the
    spec, so every floating parameter is cast. The router's expert bias is a real fp32 CPU buffer and stays so.
    """
    from megatron.core import parallel_state as ps

    from glm45_train.model.build import build_model

    # The local spec everywhere (GPU hosts included): its state_dict names are the mapping's, and TE-style
    # checkpoint keys come from `te_style_keys`, not from building TE layers.
    layout = current_layout()
    overrides: dict[str, Any] = {"pipeline_dtype": dtype} if layout.pp > 1 else {}
    if not with_mtp:
        overrides["mtp_num_layers"] = None
    config = to_transformer_config(
        hf, params_dtype=dtype, layout=layout, on_gpu=False, perform_initialization=False, **overrides
    )
    model = build_model(
        hf,
        config,
        device="meta",
        use_te=False,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )
    _cast_parameters(model, dtype)
    return model


def _cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_floating_point() or param.dtype == dtype:
                continue
            cast = torch.nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)
            cast.__dict__.update(param.__dict__)  # Megatron's tensor-parallel attributes
            module._parameters[name] = cast


def te_style_sharded_state_dict(model: GPTModel, *, for_save: bool) -> dict[str, Any]:
    """`model.sharded_state_dict()` with TE-style checkpoint keys (plus TE norms' empty extra state when saving).

    The metadata names the data-parallel group explicitly: megatron-core 0.16.1's GPTModel reads
    `metadata["dp_cp_group"]` itself when the MTP layer sits on a later pipeline stage than the embedding, and
    fails on the default `None`.
    """
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    sharded = model.sharded_state_dict(metadata=ensure_metadata_has_dp_cp_group(None))
    te_style_keys(sharded)
    if for_save:
        sharded.update(te_norm_extra_states(sharded))
    return sharded


def te_style_keys(sharded: dict[str, Any]) -> None:
    """Rename MoE layers' pre-MLP norm back to `pre_mlp_layernorm.weight` (see the module docstring), in place."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    moe_prefixes = {key[: -len(_ROUTER)] for key in sharded if key.endswith(_ROUTER)}
    for path, value in sharded.items():
        in_moe_layer = path.endswith(_MOE_NORM) and path[: -len(_MOE_NORM)] in moe_prefixes
        if isinstance(value, ShardedTensor) and in_moe_layer and value.key.endswith(_LOCAL_FUSED_NORM):
            value.key = value.key[: -len(_LOCAL_FUSED_NORM)] + _MOE_NORM


def te_norm_extra_states(sharded: dict[str, Any]) -> dict[str, Any]:
    """Empty `_extra_state` objects for the norms that are TENorm modules in the TE spec."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    extra = {}
    for path, value in sharded.items():
        if isinstance(value, ShardedTensor) and value.key.endswith(_TE_NORMS):
            key = value.key[: -len("weight")] + "_extra_state"
            extra[path[: -len("weight")] + "_extra_state"] = ShardedObject(key, None, (1,), (0,), value.replica_id)
    return extra


def storage_key(tensor: torch.Tensor) -> int:
    """Identity of a tensor's storage (views, chunks and detached copies share it; meta tensors included)."""
    return int(tensor.untyped_storage()._cdata)


class TensorIndex:
    """Which model tensor a view belongs to, by its full-model name: state_dict name with experts renamed to their
    global index and, on later pipeline stages, decoder layers to their global number."""

    def __init__(self, model: GPTModel) -> None:
        from megatron.core import parallel_state as ps

        ep_rank, ep_size = ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()
        local_experts = (model.config.num_moe_experts or 0) // ep_size
        global_layer = _global_layer_names(model)
        self.tensors: dict[str, torch.Tensor] = {}
        self._by_storage: dict[int, str] = {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            if isinstance(tensor, torch.Tensor):
                full_name = global_expert_name(global_layer(name), ep_rank, local_experts)
                self.tensors[full_name] = tensor
                self._by_storage[storage_key(tensor)] = full_name

    def name_of(self, view: torch.Tensor) -> str:
        try:
            return self._by_storage[storage_key(view)]
        except KeyError:
            raise KeyError(f"a sharded tensor of shape {tuple(view.shape)} views no model tensor") from None

    def offset_in_tensor(self, view: torch.Tensor) -> int:
        return int(view.storage_offset() - self.tensors[self.name_of(view)].storage_offset())


def _global_layer_names(model: torch.nn.Module):
    """Renames `decoder.layers.<local>.` to the layer's global number (`layer_number` is 1-based and global)."""
    layers = getattr(getattr(model, "decoder", None), "layers", None) or []
    numbers = {str(i): str(layer.layer_number - 1) for i, layer in enumerate(layers)}
    if all(local == number for local, number in numbers.items()):
        return lambda name: name
    return lambda name: _DECODER_LAYER.sub(lambda m: f"decoder.layers.{numbers[m.group(1)]}.", name, count=1)


def sharded_tensors(sharded: dict[str, Any]) -> Iterator[Any]:
    """Every ShardedTensor of a sharded state dict, factories applied (in place)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded)
    return (value for value in nested_values(sharded) if isinstance(value, ShardedTensor))
