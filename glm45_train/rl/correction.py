"""Rollout correction (`rl.correction`): the engine sampled from pi_engine, the loss assumes pi_old (the trainer's
log-probs before the step's first update); TIS reweights, MIS masks, per token or per sequence.

    rho_t = pi_old(y_t) / pi_engine(y_t) = exp(old_logp_t - engine_logp_t)        one ratio per response token
    token      log rho = log rho_t                         (each token on its own)
    sequence   log rho = sum_t log rho_t                   (the sequence's likelihood ratio)
    geometric  log rho = mean_t log rho_t                  (its per-token geometric mean: length-independent)

    tis   weight  w = min(rho, tis_cap)                    (slime --use-tis, verl rollout_is; C = 2)
    mis   keep    rho in [mis_low, mis_high], else no loss (verl rollout_rs, NeMo-RL icepop; masked tokens leave
                                                            the token count too)
    veto  a sequence holding a token with engine_logp < veto_logprob is not trained (a near-impossible sample is a
          sampler or kernel fault, not a lesson), in any mode

Notable:
- Computed once per step on the trainer's side (rl/loop.py), after the forward-only pass that sets old_logp, from
  the engine log-probs every engine returns; weights and masks are constants of the step (no gradient) and
  apply to every update of it. The policy term is multiplied by w (rl/losses); the KL term is not.
- Logged every step (all ranks reduced): |old - engine| mean/max (`logprob_gap_*`, rl/steps.py), the k3 estimate
  of KL(pi_engine || pi_old) = E[rho - 1 - log rho] (`mismatch_k3`), the fraction of trained tokens whose weight
  was truncated (`correction_truncated_fraction`) or that were masked (`correction_masked_fraction`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from glm45_train.rl.batches import MicroBatch

STATS = ("tokens", "k3", "truncated", "masked")


@dataclass(frozen=True)
class CorrectionSpec:
    mode: str = "none"  # none | tis | mis
    level: str = "token"  # token | sequence | geometric
    tis_cap: float = 2.0
    mis_low: float = 0.5
    mis_high: float = 2.0
    veto_logprob: float | None = None

    @classmethod
    def of(cls, section: Any) -> CorrectionSpec:
        return cls(
            section.mode, section.level, section.tis_cap, section.mis_low, section.mis_high, section.veto_logprob
        )


def correct(spec: CorrectionSpec, micro: MicroBatch) -> torch.Tensor:
    """Set `micro.weights` / `micro.keep` from its engine and trainer log-probs; returns the STATS sums.
    A no-op (zero sums) where old_logp is absent (every pipeline stage but the last)."""
    if micro.old_logp is None:
        return torch.zeros(len(STATS), dtype=torch.float64)
    mask = micro.batch.loss_mask.to(torch.float64)
    log_rho_t = (micro.old_logp.double() - micro.engine_logp.double()) * mask
    log_rho = _at_level(log_rho_t, mask, spec.level)
    rho = torch.exp(log_rho)
    keep = torch.ones_like(mask)
    truncated = torch.zeros_like(mask)
    if spec.mode == "tis":
        micro.weights = rho.clamp(max=spec.tis_cap).float() * mask.float()
        truncated = (rho > spec.tis_cap).double() * mask
    elif spec.mode == "mis":
        keep = ((rho >= spec.mis_low) & (rho <= spec.mis_high)).double()
    if spec.veto_logprob is not None:
        vetoed = ((micro.engine_logp.double() < spec.veto_logprob).double() * mask).amax(dim=1, keepdim=True)
        keep = keep * (1.0 - vetoed)
    if spec.mode == "mis" or spec.veto_logprob is not None:
        micro.keep = keep.float()
    rho_t = torch.exp(log_rho_t)
    k3 = ((rho_t - 1.0 - log_rho_t) * mask).sum()
    masked = ((1.0 - keep) * mask).sum()
    return torch.stack([mask.sum(), k3, truncated.sum(), masked])


def _at_level(log_rho_t: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """log rho per position: the token's own, or its row's sum / mean broadcast over the row. Rows are samples."""
    if level == "token":
        return log_rho_t
    total = log_rho_t.sum(dim=1, keepdim=True)
    if level == "sequence":
        return total.expand_as(log_rho_t)
    return (total / mask.sum(dim=1, keepdim=True).clamp(min=1.0)).expand_as(log_rho_t)


def correct_step(spec: CorrectionSpec, micro_batches: list[MicroBatch]) -> dict[str, float]:
    """`correct` every micro-batch of the step; the metrics over all ranks (a collective)."""
    sums = torch.zeros(len(STATS), dtype=torch.float64)
    for micro in micro_batches:
        sums += correct(spec, micro)
    dist.all_reduce(sums)
    tokens = float(sums[0])
    names = ("mismatch_k3", "correction_truncated_fraction", "correction_masked_fraction")
    return {name: float(value) / tokens if tokens else math.nan for name, value in zip(names, sums[1:], strict=True)}
