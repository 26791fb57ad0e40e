"""The released config.json fields of GLM-4.5-Air and GLM-4.5 (the network-defining ones), in one place.

Used to plan recipes offline (`plan --config air`), to build the full-size models on `meta` in tests, and by the
conversion benchmark for real tensor shapes.
"""

from __future__ import annotations

from typing import Any

_AIR: dict[str, Any] = dict(
    model_type="glm4_moe",
    vocab_size=151552,
    hidden_size=4096,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_hidden_layers=46,
    num_attention_heads=96,
    num_key_value_heads=8,
    head_dim=128,
    n_routed_experts=128,
    n_shared_experts=1,
    num_experts_per_tok=8,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=1.0,
    norm_topk_prob=True,
    partial_rotary_factor=0.5,
    rope_theta=1000000.0,
    use_qk_norm=False,
    attention_bias=True,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    num_nextn_predict_layers=1,
    max_position_embeddings=131072,
)
RELEASED_CONFIGS: dict[str, dict[str, Any]] = {
    "air": _AIR,
    "glm45": {
        **_AIR,
        "hidden_size": 5120,
        "intermediate_size": 12288,
        "moe_intermediate_size": 1536,
        "num_hidden_layers": 92,
        "n_routed_experts": 160,
        "first_k_dense_replace": 3,
        "routed_scaling_factor": 2.5,
        "use_qk_norm": True,
    },
}
