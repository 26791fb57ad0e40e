"""What a policy loss kind is given and returns (rl/losses/__init__.py chooses the kind)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossSpec:
    kind: str  # a LOSSES key
    clip_low: float  # the ratio is clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float
    kl_coeff: float
    policy_loss: bool  # false: the KL term only (a negative control)
    temperature: float


@dataclass
class TokenTerms:
    """Per-token tensors of one micro-batch, all [b, s] (or [1, t] laid end to end on GPUs)."""

    logp: torch.Tensor  # the policy now (with gradient)
    old_logp: torch.Tensor  # the trainer's before the step's first update
    advantages: torch.Tensor
    mask: torch.Tensor  # 1 on trained response tokens
    segments: torch.Tensor  # int64: the row (sample) each position belongs to, for sequence-level terms
    ref_logp: torch.Tensor | None = None
    weights: torch.Tensor | None = None  # rollout correction: importance weights (None: 1)
    keep: torch.Tensor | None = None  # rollout correction: 0 on tokens masked out (None: all kept)


@dataclass(frozen=True)
class SurrogateTerm:
    pg: torch.Tensor  # per-token policy term, [b, s]
    ratio: torch.Tensor  # the ratio it clipped (logged), [b, s]
    clipped: torch.Tensor  # bool, where the clipped branch won, [b, s]


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's pessimistic term max(-A r, -A clip(r, 1 - low, 1 + high)) and where the clipped branch won."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped
