"""GRPO's token-level term (DAPO's clip-higher): ratio_t = exp(logp_t - logp_old_t), clipped per token.

    pg_t = max(-A ratio_t, -A clip(ratio_t, 1 - clip_low, 1 + clip_high))

On the step's first update ratio = 1 exactly (logp_old is the trainer's own forward pass, not the engine's).
"""

from __future__ import annotations

import torch

from glm45_train.rl.losses.terms import LossSpec, SurrogateTerm, TokenTerms, clipped_surrogate


def token_ratio_term(spec: LossSpec, terms: TokenTerms) -> SurrogateTerm:
    ratio = torch.exp(terms.logp - terms.old_logp)
    pg, clipped = clipped_surrogate(ratio, terms.advantages, spec.clip_low, spec.clip_high)
    return SurrogateTerm(pg, ratio, clipped)
