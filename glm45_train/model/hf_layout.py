"""The tensor list of a released glm4_moe checkpoint, derived from config.json alone.

Used by `make-tiny` to write the released layout and by tests to check the mapping table independently of it.
"""

from __future__ import annotations

from collections.abc import Iterator

from glm45_train.model.hf_config import Glm45Config

EXPERT_BIAS_KEY = "mlp.gate.e_score_correction_bias"
# The MTP layer stores copies of the shared embedding and output head (relative name -> source tensor).
MTP_COPIES = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}


def hf_tensor_shapes(hf: Glm45Config) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor of a released glm4_moe checkpoint with its shape, MTP layer included, in file order."""
    h, v = hf.hidden_size, hf.vocab_size
    q_out, kv_out = hf.num_attention_heads * hf.head_dim, hf.num_key_value_heads * hf.head_dim
    yield "model.embed_tokens.weight", (v, h)
    for layer in range(hf.num_hidden_layers + hf.num_nextn_predict_layers):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
        for proj, out in (("q", q_out), ("k", kv_out), ("v", kv_out)):
            yield p + f"self_attn.{proj}_proj.weight", (out, h)
            if hf.attention_bias:
                yield p + f"self_attn.{proj}_proj.bias", (out,)
        yield p + "self_attn.o_proj.weight", (h, q_out)
        if hf.use_qk_norm:
            yield p + "self_attn.q_norm.weight", (hf.head_dim,)
            yield p + "self_attn.k_norm.weight", (hf.head_dim,)
        if layer < hf.first_k_dense_replace:
            yield from _mlp_shapes(p + "mlp.", h, hf.intermediate_size)
        else:
            yield p + "mlp.gate.weight", (hf.n_routed_experts, h)
            yield p + EXPERT_BIAS_KEY, (hf.n_routed_experts,)
            for e in range(hf.n_routed_experts):
                yield from _mlp_shapes(p + f"mlp.experts.{e}.", h, hf.moe_intermediate_size)
            if hf.n_shared_experts:
                yield from _mlp_shapes(p + "mlp.shared_experts.", h, hf.moe_intermediate_size * hf.n_shared_experts)
        if layer >= hf.num_hidden_layers:  # the MTP layer's own tensors
            yield p + "enorm.weight", (h,)
            yield p + "hnorm.weight", (h,)
            yield p + "eh_proj.weight", (h, 2 * h)
            yield p + "shared_head.norm.weight", (h,)
            yield p + "embed_tokens.weight", (v, h)
            yield p + "shared_head.head.weight", (v, h)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def _mlp_shapes(prefix: str, h: int, ffn: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield prefix + "gate_proj.weight", (ffn, h)
    yield prefix + "up_proj.weight", (ffn, h)
    yield prefix + "down_proj.weight", (h, ffn)
