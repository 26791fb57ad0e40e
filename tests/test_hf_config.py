"""HF config.json -> Glm45Config -> TransformerConfig: every GLM-4.5 feature, both rope layouts, refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from glm45_train.model.hf_config import REQUIRED, ConfigError, Glm45Config, to_transformer_config
from glm45_train.model.releases import RELEASED_CONFIGS
from glm45_train.model.tiny import tiny_config

AIR_RELEASE = RELEASED_CONFIGS["air"]


def test_v5_rope_parameters_read_like_v4_top_level_keys():
    v4 = Glm45Config.from_dict(AIR_RELEASE)
    v5_raw = {k: v for k, v in AIR_RELEASE.items() if k not in ("rope_theta", "partial_rotary_factor")}
    v5_raw["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 1000000.0,
        "partial_rotary_factor": 0.5,
    }
    assert Glm45Config.from_dict(v5_raw) == v4
    assert v4.partial_rotary_factor == 0.5 and v4.rope_theta == 1e6


def test_transformer_config_carries_every_glm45_feature():
    hf = Glm45Config.from_dict({**AIR_RELEASE, "use_qk_norm": True, "routed_scaling_factor": 2.5})
    tc = to_transformer_config(hf, params_dtype=torch.bfloat16, on_gpu=False)
    assert tc.kv_channels == 128 and tc.num_query_groups == 8 and tc.num_attention_heads == 96
    assert tc.add_qkv_bias and not tc.add_bias_linear and tc.qk_layernorm
    assert tc.moe_layer_freq == [0] + [1] * 45
    assert tc.moe_router_score_function == "sigmoid" and tc.moe_router_enable_expert_bias
    assert tc.moe_router_bias_update_rate == 0.0  # released bias frozen by default
    assert tc.moe_router_dtype == "fp32" and tc.moe_router_topk_scaling_factor == 2.5
    assert tc.moe_shared_expert_intermediate_size == 1408 and tc.moe_ffn_hidden_size == 1408
    assert tc.mtp_num_layers == 1 and not tc.rotary_interleaved and tc.bf16
    assert tc.moe_token_dispatcher_type == "allgather"  # alltoall needs CUDA streams


def test_group_routing_maps_when_megatron_and_hf_agree():
    hf = Glm45Config.from_dict({**AIR_RELEASE, "n_group": 8, "topk_group": 4})  # 8 // 4 == 2: identical
    tc = to_transformer_config(hf, on_gpu=False)
    assert (tc.moe_router_num_groups, tc.moe_router_group_topk) == (8, 4)


@pytest.mark.parametrize(
    ("change", "culprit"),
    [
        ({"norm_topk_prob": False}, "norm_topk_prob"),
        ({"n_group": 8, "topk_group": 2}, "group-limited routing"),  # 8 // 2 == 4 != 2
        ({"model_type": "llama"}, "model_type"),
        ({"hidden_size": "4096"}, "hidden_size"),
        ({"use_qk_norm": 1}, "use_qk_norm"),
        ({"partial_rotary_factor": 0.3}, "partial_rotary_factor"),
    ],
)
def test_refusals_name_the_setting(change, culprit):
    with pytest.raises(ConfigError, match=culprit):
        Glm45Config.from_dict({**AIR_RELEASE, **change})


def test_missing_key_is_named():
    raw = {k: v for k, v in AIR_RELEASE.items() if k != "moe_intermediate_size"}
    with pytest.raises(ConfigError, match="moe_intermediate_size"):
        Glm45Config.from_dict(raw)


def test_unreadable_file_names_the_path(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{ not json")
    with pytest.raises(ConfigError, match=str(path)):
        Glm45Config.from_file(tmp_path)


def test_tiny_presets_mirror_the_releases():
    air = Glm45Config.from_dict(tiny_config("air", 1024, [0, 1, 2]))
    glm = Glm45Config.from_dict(tiny_config("glm45", 1024, [0, 1, 2]))
    assert (air.use_qk_norm, air.first_k_dense_replace, air.routed_scaling_factor) == (False, 1, 1.0)
    assert (glm.use_qk_norm, glm.first_k_dense_replace, glm.routed_scaling_factor) == (True, 3, 2.5)
    for hf in (air, glm):
        assert hf.num_attention_heads * hf.head_dim != hf.hidden_size  # kv_channels must be explicit
        assert hf.partial_rotary_factor == 0.5 and hf.num_nextn_predict_layers == 1
    assert json.dumps(tiny_config("air", 1024, [0, 1, 2]))  # serialisable as config.json


@pytest.mark.parametrize("key", [f.name for f in dataclasses.fields(Glm45Config)])
def test_every_left_out_key_is_required_or_read_as_transformers_reads_it(key):
    """Walk every field: a config.json without it is refused naming it (the sizes), or read as transformers reads
    the same file (partial_rotary_factor was once 1.0 here and 0.5 there: another model, exit 0)."""
    from transformers import Glm4MoeConfig

    raw = {k: v for k, v in AIR_RELEASE.items() if k != key}
    if key == "head_dim":
        raw["hidden_size"] = 96 * 128  # the release's 4096 // 96 = 42 would be refused: 42 * 0.5 is odd
    if key in REQUIRED:
        with pytest.raises(ConfigError, match=f"missing required key.*{key}"):
            Glm45Config.from_dict(raw)
        return
    ours = getattr(Glm45Config.from_dict(raw), key)
    theirs = Glm4MoeConfig(**raw)
    expected = getattr(theirs, key, None)
    if key == "head_dim":
        expected = theirs.hidden_size // theirs.num_attention_heads  # modeling_glm4_moe's fallback
    elif key in ("rope_theta", "partial_rotary_factor"):
        expected = theirs.rope_parameters[key]
    assert ours == expected, (key, ours, expected)
