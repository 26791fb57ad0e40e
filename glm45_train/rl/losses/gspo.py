"""GSPO's sequence-level term (Zheng et al. 2025; slime `--advantage-estimator gspo`, verl `loss_mode=gspo`).

    s_i  = exp( (1 / |y_i|) sum_{t in y_i} (logp_t - logp_old_t) )       the length-normalised sequence ratio
    pg_t = max(-A_i s_i, -A_i clip(s_i, 1 - clip_low, 1 + clip_high))     on every token t of sequence i

Notable:
- One ratio and one clipping decision per sequence (what makes it robust to single tokens whose engine and
  trainer probabilities disagree, e.g. after an MoE routing flip); its clip range is much narrower than GRPO's
  (rl.gspo: 3e-4 / 4e-4 in the paper; slime's GLM-4.5 recipe 1e-4 / 2e-4).
- The gradient flows through the sequence mean, so d pg_t-sum / d logp_t = -A_i s_i per token: with the token
  mean over the global batch this is GSPO-token with A_i,t = A_i (the paper's section 4.3), as slime computes it.
- Sequences are found by `terms.segments` (the sample row of each position), so the same code serves rows [b, s]
  on CPU and rows laid end to end on GPUs.
"""

from __future__ import annotations

import torch

from glm45_train.rl.losses.terms import LossSpec, SurrogateTerm, TokenTerms, clipped_surrogate


def sequence_ratio_term(spec: LossSpec, terms: TokenTerms) -> SurrogateTerm:
    log_ratio = sequence_mean(terms.logp - terms.old_logp, terms.mask, terms.segments)
    ratio = torch.exp(log_ratio)
    pg, clipped = clipped_surrogate(ratio, terms.advantages, spec.clip_low, spec.clip_high)
    return SurrogateTerm(pg, ratio, clipped)


def sequence_mean(values: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Each position gets the mean of `values` over the masked positions of its segment (differentiable)."""
    flat_segments = segments.reshape(-1)
    count = int(flat_segments.max()) + 1 if flat_segments.numel() else 0
    weights = mask.reshape(-1).to(values.dtype)
    sums = values.new_zeros(count).index_add(0, flat_segments, values.reshape(-1) * weights)
    sizes = values.new_zeros(count).index_add(0, flat_segments, weights).clamp(min=1.0)
    return (sums / sizes)[flat_segments].reshape(values.shape)
