"""The policy losses, chosen by `rl.loss`: a registered kind computes each token's surrogate term; the rest (KL,
importance weights, masks, the logged sums) is shared here.

    loss = sum_t keep_t (w_t pg_t + kl_coeff kl_t) / (kept response tokens of the global batch)

- pg_t comes from the kind (`LOSSES[name]`): grpo (rl/losses/grpo.py, the token ratio) or gspo
  (rl/losses/gspo.py, the sequence ratio). A new loss is one file with a `PolicyTerm` function and one entry in
  LOSSES; config/rl.py's LOSSES lists the names recipes may choose.
- w_t and keep_t are the rollout correction's (rl/correction.py): TIS weights, MIS and veto masks; 1 without one.
  The weights scale the policy term only (the KL to the reference is not an off-policy estimate).
- kl_t is the k3 estimator to the frozen reference, exp(ref - logp) - (ref - logp) - 1 (>= 0).
- Aggregation is the token mean over the global batch, Megatron's `calculate_per_token_loss`: the loss function
  returns its sum and the kept-token count, Megatron divides the gradients by the global count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from glm45_train.rl.losses.grpo import token_ratio_term
from glm45_train.rl.losses.gspo import sequence_ratio_term
from glm45_train.rl.losses.terms import LossSpec, SurrogateTerm, TokenTerms

__all__ = ["LOSSES", "LossSpec", "TokenTerms", "loss_spec", "policy_loss"]


PolicyTerm = Callable[[LossSpec, TokenTerms], SurrogateTerm]
LOSSES: dict[str, PolicyTerm] = {"grpo": token_ratio_term, "gspo": sequence_ratio_term}


def loss_spec(rl: Any) -> LossSpec:
    """The recipe's loss: its kind and that kind's clip range (rl.grpo for grpo, rl.gspo for gspo)."""
    clip = rl.gspo if rl.loss == "gspo" else rl.grpo
    grpo = rl.grpo
    return LossSpec(rl.loss, clip.clip_low, clip.clip_high, grpo.kl_coeff, grpo.policy_loss, rl.rollout.temperature)


def policy_loss(spec: LossSpec, terms: TokenTerms) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(sum of the per-token losses, kept-token count, sums of the logged terms) of one micro-batch."""
    mask = terms.mask if terms.keep is None else terms.mask * terms.keep
    surrogate = LOSSES[spec.kind](spec, terms)
    pg = surrogate.pg
    per_token = (pg if terms.weights is None else pg * terms.weights) if spec.policy_loss else torch.zeros_like(pg)
    kl = torch.zeros_like(pg)
    if terms.ref_logp is not None:
        log_ratio = terms.ref_logp - terms.logp
        kl = torch.exp(log_ratio) - log_ratio - 1.0
        per_token = per_token + spec.kl_coeff * kl
    sums = {
        "pg": (pg.detach() * mask).sum(),
        "kl": (kl.detach() * mask).sum(),
        "clipped": (surrogate.clipped.float() * mask).sum(),
        "ratio": (surrogate.ratio.detach() * mask).sum(),
    }
    return (per_token * mask).sum(), mask.sum(), sums
