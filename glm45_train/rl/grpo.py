"""GRPO's arithmetic around the loss: group-normalised advantages, token log-probs and entropy at any TP size.

    A_i      = (r_i - mean(r_group)) / (std(r_group) + eps)      (std_normalize false: r_i - mean, Dr.GRPO)

The policy loss itself (GRPO's token ratio or GSPO's sequence ratio, the k3 KL, the rollout correction's
weights) is rl/losses.

Notable:
- Aggregation: token-mean over the whole global batch (DAPO's choice; what `calculate_per_token_loss` gives in
  Megatron: each micro-batch returns its sum and token count, Megatron divides the gradients by the global
  count). A long response weighs by its tokens, not as one sample.
- std is the unbiased group standard deviation (as verl and TRL). A sample whose reward failed gets advantage 0
  and is left out of its group's mean and std; a group with fewer than two scored samples gets 0 everywhere.
- log-probs are taken from the Megatron model's logits / temperature with Megatron's vocab-parallel cross
  entropy, so they are exact at any tensor-parallel size; entropy (logged, not trained) is the full
  distribution's, reduced over the vocabulary shards.
- logp_old comes from the trainer (a forward pass before the step's first update), not from the engine: on the
  first update ratio = 1 exactly; the engine's own log-probs are compared with it and the gap logged.
"""

from __future__ import annotations

import math

import numpy as np
import torch

EPS = 1e-6
# Sums each micro-batch reports (then reduced over data parallel and pipeline stages), in this order.
STATS = ("loss", "pg", "kl", "clipped", "entropy", "ratio", "tokens")


def group_advantages(rewards: np.ndarray, failed: np.ndarray, std_normalize: bool) -> np.ndarray:
    """[prompts, group] advantages from [prompts, group] rewards; failed samples get 0."""
    advantages = np.zeros_like(rewards, dtype=np.float64)
    for row in range(rewards.shape[0]):
        scored = ~failed[row]
        if scored.sum() < 2:
            continue
        values = rewards[row, scored].astype(np.float64)
        centred = values - values.mean()
        if std_normalize:
            centred = centred / (values.std(ddof=1) + EPS)
        advantages[row, scored] = centred
    return advantages


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(labels) under softmax(logits / T): logits [b, s, vocab / tp] (this rank's shard), labels [b, s]."""
    from megatron.core import tensor_parallel

    scaled = (logits.float() / temperature).transpose(0, 1).contiguous()
    return -tensor_parallel.vocab_parallel_cross_entropy(scaled, labels.transpose(0, 1).contiguous()).transpose(0, 1)


@torch.no_grad()
def vocab_parallel_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy of softmax(logits / T) per position, the vocabulary split over the tensor-parallel ranks."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    scaled = logits.float() / temperature
    peak = scaled.max(dim=-1, keepdim=True).values
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    shifted = scaled - peak
    weights = shifted.exp()
    sums = torch.stack([weights.sum(-1), (weights * shifted).sum(-1)])
    dist.all_reduce(sums, group=group)
    return sums[0].log() - sums[1] / sums[0]


def mean_of(sums: dict[str, float], key: str) -> float:
    tokens = sums.get("tokens", 0.0)
    return sums[key] / tokens if tokens else math.nan
