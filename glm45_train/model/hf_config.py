"""HF `config.json` (model_type glm4_moe) -> a validated `Glm45Config` -> Megatron-Core `TransformerConfig`.

Every GLM-4.5 feature maps onto a Megatron-Core setting (../shared/reference/glm45-model.md): first-k dense
layers, sigmoid router with an fp32 expert bias, group top-k, routed scaling factor, shared expert, QK-norm,
QKV bias, partial RoPE, GQA with explicit kv_channels (96 heads x 128 != hidden), MTP layers.

A key the config leaves out takes transformers' own default for glm4_moe, read from its `Glm4MoeConfig` (never
restated here: transformers 5 defaults `partial_rotary_factor` to 0.5 and `num_nextn_predict_layers` to 1), except
the sizes in `REQUIRED`, without which the file does not describe a model; `head_dim` is derived as transformers'
modeling derives it (hidden_size // num_attention_heads).

Two HF settings have no faithful Megatron equivalent and are refused, never approximated:
- `norm_topk_prob: false`: Megatron always renormalises sigmoid top-k weights.
- group-limited routing with n_group > 1 and topk // topk_group != 2: HF scores a group by its top-2 biased
  scores, Megatron by its top-(topk // topk_group); they select different experts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from glm45_train.config.layout import ParallelLayout
from glm45_train.errors import UserError

MODEL_TYPE = "glm4_moe"
REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "n_routed_experts", "num_experts_per_tok",
)  # fmt: skip


class ConfigError(UserError, ValueError):
    """A config.json that is malformed, or asks for something Megatron cannot compute identically."""


@dataclass(frozen=True)
class Glm45Config:
    """The fields of a glm4_moe config.json that define the network, read from v4 or v5 layouts."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    partial_rotary_factor: float
    rope_theta: float
    use_qk_norm: bool
    attention_bias: bool
    rms_norm_eps: float
    tie_word_embeddings: bool
    num_nextn_predict_layers: int
    max_position_embeddings: int
    initializer_range: float

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> Glm45Config:
        if raw.get("model_type") != MODEL_TYPE:
            raise ConfigError(f"{source}: model_type is {raw.get('model_type')!r}, expected {MODEL_TYPE!r}")
        values = dict(raw)
        # transformers v5 nests rope settings in `rope_parameters`; v4 configs keep them at top level.
        rope = raw.get("rope_parameters") or {}
        for key in ("rope_theta", "partial_rotary_factor"):
            if key in rope:
                values[key] = rope[key]
        missing = [name for name in REQUIRED if name not in values]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {', '.join(missing)}")
        values.setdefault("head_dim", _divide(raw, "hidden_size", "num_attention_heads", source))
        fields = dataclasses.fields(cls)
        defaults = transformers_defaults()
        values = {f.name: values[f.name] if f.name in values else defaults[f.name] for f in fields}
        config = cls(**{f.name: _coerce(values[f.name], f.type, f.name, source) for f in fields})
        config.check_supported(source)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> Glm45Config:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
        return cls.from_dict(raw, source=str(path))

    def check_supported(self, source: str = "config.json") -> None:
        if not self.norm_topk_prob:
            raise ConfigError(
                f"{source}: norm_topk_prob=false is not supported: Megatron-Core always renormalises the "
                "sigmoid top-k routing weights, so the model would compute something else"
            )
        if self.n_group > 1 and self.num_experts_per_tok // self.topk_group != 2:
            raise ConfigError(
                f"{source}: group-limited routing with n_group={self.n_group}, topk_group={self.topk_group}, "
                f"num_experts_per_tok={self.num_experts_per_tok} is not supported: HF scores each group by its "
                "top-2 experts, Megatron by its top-(num_experts_per_tok // topk_group) "
                f"= {self.num_experts_per_tok // self.topk_group}; routing would differ"
            )
        if self.n_routed_experts % self.n_group:
            raise ConfigError(f"{source}: n_routed_experts={self.n_routed_experts} not divisible by n_group")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{source}: num_attention_heads not divisible by num_key_value_heads")
        rotary_dim = self.head_dim * self.partial_rotary_factor
        if rotary_dim != int(rotary_dim) or int(rotary_dim) % 2:
            raise ConfigError(f"{source}: head_dim * partial_rotary_factor = {rotary_dim} must be an even integer")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(f"{source}: first_k_dense_replace outside [0, num_hidden_layers]")

    @property
    def moe_layer_pattern(self) -> list[int]:
        """Megatron's `moe_layer_freq` list: 0 = dense MLP layer, 1 = MoE layer."""
        k = self.first_k_dense_replace
        return [0] * k + [1] * (self.num_hidden_layers - k)


@functools.cache
def transformers_defaults() -> dict[str, Any]:
    """What transformers' Glm4MoeConfig sets for every key a config.json leaves out (rope settings flattened)."""
    from transformers.models.glm4_moe.configuration_glm4_moe import Glm4MoeConfig

    defaults = Glm4MoeConfig().to_dict()
    return {**defaults, **(defaults.get("rope_parameters") or {})}


def _divide(raw: dict[str, Any], num: str, den: str, source: str) -> int:
    try:
        return int(raw[num]) // int(raw[den])
    except KeyError as err:
        raise ConfigError(f"{source}: missing required key {err.args[0]}") from None


def _coerce(value: Any, annotation: Any, name: str, source: str) -> Any:
    kind = {"int": int, "float": float, "bool": bool}[str(annotation)]
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: {name} must be true or false, got {value!r}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{source}: {name} must be an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ConfigError(f"{source}: {name} must be a number, got {value!r}")
    return kind(value)


def to_transformer_config(
    hf: Glm45Config,
    *,
    params_dtype: torch.dtype = torch.float32,
    layout: ParallelLayout | None = None,
    on_gpu: bool | None = None,
    **overrides: Any,
):
    """The Megatron-Core TransformerConfig computing the same function as HF's Glm4MoeForCausalLM.

    `on_gpu` (default: CUDA present) selects fused kernels and the alltoall dispatcher; on CPU the allgather
    dispatcher and unfused paths are used. `overrides` set training knobs (recompute, aux loss, MTP weight...).
    """
    from megatron.core.transformer import TransformerConfig

    layout = layout or ParallelLayout()
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    kwargs = _architecture(hf) | _moe(hf, on_gpu) | _precision(params_dtype, on_gpu) | _layout(layout)
    if hf.n_group > 1:
        kwargs.update(moe_router_num_groups=hf.n_group, moe_router_group_topk=hf.topk_group)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _architecture(hf: Glm45Config) -> dict[str, Any]:
    """Dense architecture: sizes, norms, attention, activations, no dropout."""
    return dict(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size,
        num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads,
        kv_channels=hf.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=hf.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=hf.attention_bias,
        qk_layernorm=hf.use_qk_norm,
        rotary_interleaved=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=hf.initializer_range,
    )


def _moe(hf: Glm45Config, on_gpu: bool) -> dict[str, Any]:
    """Routed experts, the sigmoid router with its fp32 expert bias, shared expert, MTP."""
    return dict(
        num_moe_experts=hf.n_routed_experts,
        moe_ffn_hidden_size=hf.moe_intermediate_size,
        moe_router_topk=hf.num_experts_per_tok,
        moe_shared_expert_intermediate_size=hf.moe_intermediate_size * hf.n_shared_experts or None,
        moe_layer_freq=hf.moe_layer_pattern,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=0.0,  # the released bias stays frozen unless a recipe asks to train it
        moe_router_topk_scaling_factor=hf.routed_scaling_factor,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="alltoall" if on_gpu else "allgather",
        moe_grouped_gemm=on_gpu,
        mtp_num_layers=hf.num_nextn_predict_layers or None,
    )


def _precision(params_dtype: torch.dtype, on_gpu: bool) -> dict[str, Any]:
    """Parameter dtype; fused kernels only on GPU."""
    return dict(
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=on_gpu,
        persist_layer_norm=on_gpu,
    )


def _layout(layout: ParallelLayout) -> dict[str, Any]:
    """The parallel layout."""
    return dict(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        context_parallel_size=layout.cp,
        sequence_parallel=layout.sp,
    )
