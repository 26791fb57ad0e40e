"""Activation memory and FLOPs of one GLM-4.5 layer per GPU, for `plan`.

Activation model: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"),
who count the bytes each layer keeps for backward: s·b·h·(34 + 5·a·s/h) for a GPT layer without recompute
(bf16, dropout, 4h GeLU MLP). Re-derived term by term for GLM-4.5 as trained here:

- no dropout (GLM-4.5 trains without): the 1-byte masks drop out;
- flash / fused attention (Transformer Engine on GPUs): the a·s² softmax terms vanish; Q, K, V and the
  output are kept (GQA: K and V have num_key_value_heads heads) plus the fp32 log-sum-exp;
- SwiGLU MLP of width f: fc1 output 2f and its activation f are kept (instead of 4h + 4h for GeLU);
- MoE: the router's fp32 logits/probabilities, and for each of the top-k routed copies of a token the
  permuted input (h), fc1 output (2f_e), activation (f_e) and fc2 output (h, kept for the probability
  weighting); the shared expert like a dense MLP. Tokens are assumed evenly spread over experts;
- tensor parallel splits everything inside attention and MLP by tp; norms and residual inputs are split by
  tp only under sequence parallelism; routed copies per GPU are tokens-per-GPU x top-k.

For a standard multi-head attention block these rules give back Korthikanti's attention term (11·s·b·h plus
the 2·s·b·h norm input) less its dropout mask and s² terms (a check in tests/test_plan.py). All sizes in
bytes; `tokens` is the micro-batch's tokens per context-parallel rank.

FLOPs per token: 2 x active matmul parameters forward (experts: top-k of n), attention core 2·s·q per layer
forward (causal: half of QK^T + AV over the whole packed row, an upper bound when samples are shorter);
backward: input gradients (1 x forward) for every matmul, weight gradients (1 x forward) only for trained
weights, 2 x forward for the attention core; one more forward for recomputed layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from glm45_train.model.hf_config import Glm45Config

BF16 = 2  # activations are bf16 on GPUs
FP32 = 4


@dataclass(frozen=True)
class LayerShape:
    """What activation sizes depend on: model widths, micro-batch and the parallel layout."""

    hf: Glm45Config
    tokens: int  # micro_batch_size x sequence length / cp: tokens one GPU's layer sees
    tp: int
    sp: bool
    etp: int

    @property
    def norm_split(self) -> int:
        """Norms and residuals are split over TP only with sequence parallelism."""
        return self.tp if self.sp else 1

    @property
    def q_width(self) -> int:
        return self.hf.num_attention_heads * self.hf.head_dim

    @property
    def kv_width(self) -> int:
        return self.hf.num_key_value_heads * self.hf.head_dim


def attention_bytes(shape: LayerShape) -> float:
    """Input norm input + QKV input (2h, split by SP), Q/K/V and attention output (split by TP), fp32 LSE."""
    h, t = shape.hf.hidden_size, shape.tp
    per_token = (
        2 * BF16 * h / shape.norm_split
        + BF16 * (shape.q_width + 2 * shape.kv_width) / t
        + BF16 * shape.q_width / t
        + FP32 * shape.hf.num_attention_heads / t
    )
    return shape.tokens * per_token


def dense_mlp_bytes(shape: LayerShape, ffn: int | None = None) -> float:
    """Pre-MLP norm input + fc1 input (2h, split by SP), fc1 output 2f and SwiGLU output f (split by TP)."""
    h, f = shape.hf.hidden_size, ffn or shape.hf.intermediate_size
    return shape.tokens * (2 * BF16 * h / shape.norm_split + 3 * BF16 * f / shape.tp)


def moe_bytes(shape: LayerShape) -> float:
    """Router, routed experts (top-k copies per token) and the shared expert of one MoE layer."""
    hf, h = shape.hf, shape.hf.hidden_size
    local_tokens = shape.tokens / shape.norm_split  # MoE with TP > 1 runs under SP: tokens are split by TP
    router = local_tokens * (2 * BF16 * h + 3 * FP32 * hf.n_routed_experts)
    copies = local_tokens * hf.num_experts_per_tok
    routed = copies * (2 * BF16 * h + 3 * BF16 * hf.moe_intermediate_size / shape.etp)
    shared_ffn = hf.moe_intermediate_size * hf.n_shared_experts
    shared = shape.tokens * 3 * BF16 * shared_ffn / shape.tp if shared_ffn else 0.0
    return router + routed + shared


def layer_bytes(shape: LayerShape, moe: bool) -> float:
    """Everything one layer keeps for backward without recompute."""
    return attention_bytes(shape) + (moe_bytes(shape) if moe else dense_mlp_bytes(shape))


def layer_input_bytes(shape: LayerShape) -> float:
    """What full recompute keeps per checkpointed chunk: its input hidden states."""
    return shape.tokens * BF16 * shape.hf.hidden_size / shape.norm_split


def logits_bytes(shape: LayerShape) -> float:
    """Loss on the last stage: bf16 logits + their fp32 copy that becomes the saved softmax (6 bytes each)."""
    return shape.tokens * (BF16 + FP32) * shape.hf.vocab_size / shape.tp


@dataclass(frozen=True)
class LayerFlops:
    """Forward FLOPs per token of one layer, split by what backward must do with them."""

    frozen: float  # matmuls whose weights are not trained: backward computes input gradients only
    trained: float  # matmuls whose weights are trained: input and weight gradients
    attention_core: float  # QK^T and AV: input gradients only, no weights


def training_flops_per_token(layer: LayerFlops, recompute: str) -> float:
    """Forward + backward (+ recompute) FLOPs per token of one layer."""
    forward = layer.frozen + layer.trained + layer.attention_core
    backward = layer.frozen + 2 * layer.trained + 2 * layer.attention_core
    extra = {"full": forward, "selective": layer.attention_core, "none": 0.0}[recompute]
    return forward + backward + extra


def attention_core_flops(hf: Glm45Config, sequence: int) -> float:
    """Causal attention forward FLOPs per token per layer: QK^T and AV over on average half the sequence."""
    return 2.0 * sequence * hf.num_attention_heads * hf.head_dim
