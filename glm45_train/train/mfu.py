"""Model FLOPs utilisation on GPUs: achieved matmul FLOP/s over the GPUs' dense bf16 peak.

FLOPs per trained-on token = 6 x (matmul weights a token passes through: attention, dense MLP or shared expert plus
its top-k routed experts and router, output head; the MTP layer and its head when it is trained) + the attention
scores/values (12 x layers x sequence x query width, halved for causal masking). Peaks come from the planner's table.
"""

from __future__ import annotations

from glm45_train.model.hf_config import Glm45Config


def matmul_weights_per_token(hf: Glm45Config, with_mtp: bool) -> int:
    h, q, kv = hf.hidden_size, hf.num_attention_heads * hf.head_dim, hf.num_key_value_heads * hf.head_dim
    attention = h * (q + 2 * kv) + q * h
    dense = 3 * h * hf.intermediate_size
    expert = 3 * h * hf.moe_intermediate_size
    moe = hf.num_experts_per_tok * expert + hf.n_shared_experts * expert + h * hf.n_routed_experts
    k, n = hf.first_k_dense_replace, hf.num_hidden_layers
    total = k * (attention + dense) + (n - k) * (attention + moe) + hf.vocab_size * h
    if with_mtp and hf.num_nextn_predict_layers:
        total += hf.num_nextn_predict_layers * (attention + moe + 2 * h * h + hf.vocab_size * h)
    return total


def flops_per_token(hf: Glm45Config, sequence: int, with_mtp: bool) -> float:
    attention_core = 12 * hf.num_hidden_layers * sequence * hf.num_attention_heads * hf.head_dim / 2
    return 6 * matmul_weights_per_token(hf, with_mtp) + attention_core


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of one GPU, by the name CUDA reports (None when unknown: no MFU is reported)."""
    from glm45_train.launch.gpus import GPUS

    name = device_name.upper()
    for key in sorted(GPUS, key=len, reverse=True):  # "h200" before "h20"
        if key.upper() in name:
            return GPUS[key].peak_tflops * 1e12
    return None
