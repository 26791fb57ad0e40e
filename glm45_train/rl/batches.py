"""Scored rollouts -> micro-batches for the trainer: the engine's tokens as they are, loss on response tokens.

Notable:
- A sample's row is prompt ids + response ids, shifted for next-token training by data/'s own
  `shift_for_training` and padded by its `collate` (the CPU block-diagonal mask included), so a row is
  exactly what `sft` would train on for that text; the trained positions are the response tokens (the stop
  token that ended a response included), none for a sample marked untrained (overlong filtering); in an agent
  trajectory only the policy's own tokens (`mask`), never the tool results between its turns.
- With routing replay the engine's expert choices ride along per input position ([b, s, MoE layers, top-k]).
- Per-token tensors beside the batch, aligned with the labels: the sample's advantage on its response tokens,
  the engine's log-probs, and (filled by the trainer's forward-only passes) logp_old and the reference's.
- One global batch = `train.global_batch_size` consecutive samples of the step; data-parallel rank r takes
  samples r, r + dp, ...; every rank pads to the longest row of the global batch (expert and pipeline
  parallelism exchange activations of one shape), rounded as `Collation` says (TP x 2 under SP).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from glm45_train.data.prepared import Batch, collate, shift_for_training
from glm45_train.train.batches import Collation


@dataclass(frozen=True)
class Sample:
    """One response of a group, with its reward and advantage."""

    prompt: int  # the prompt's position in the step
    member: int  # its place in the group (0 .. G-1)
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    engine_logprobs: tuple[float, ...]
    finished: bool
    reward: float = 0.0
    advantage: float = 0.0
    trained: bool = True  # False: no loss on its tokens (rl.overlong.mode filter on a truncated response)
    routing: np.ndarray | None = field(default=None, compare=False)  # the engine's experts (rl/rollout.py)
    mask: tuple[bool, ...] | None = None  # agent rollouts: the policy's own response tokens (rl/agent/episodes.py)
    trajectory: Any = field(default=None, compare=False)  # agent rollouts: the episode the rewards saw


@dataclass
class MicroBatch:
    batch: Batch
    advantages: torch.Tensor  # [b, s] float32, the sample's advantage on its response tokens
    engine_logp: torch.Tensor  # [b, s] float32
    old_logp: torch.Tensor | None = None  # [b, s], set by the trainer before the first update
    ref_logp: torch.Tensor | None = None  # [b, s], set when a reference is used
    weights: torch.Tensor | None = None  # [b, s], rollout correction's importance weights (rl/correction.py)
    keep: torch.Tensor | None = None  # [b, s], rollout correction's mask (0: no loss on the token)
    routing: torch.Tensor | None = None  # [b, s, moe layers, top-k] the engine's experts (rl/routing_replay.py)
    samples: list[Sample] = field(default_factory=list)


def micro_batches(
    samples: list[Sample], dp_rank: int, dp_size: int, collation: Collation, pad_id: int
) -> list[MicroBatch]:
    """This rank's share of one global batch of samples, as micro-batches of one common length."""
    examples = [
        shift_for_training(
            [np.asarray(s.prompt_ids + s.response_ids, dtype=np.int64)],
            [np.asarray([0] * len(s.prompt_ids) + _trained_tokens(s), dtype=bool)],
            pad_id,
        )
        for s in samples
    ]
    length = collation.length_for(examples)
    mine = list(range(dp_rank, len(samples), dp_size))
    size = collation.micro_batch_size
    out = []
    for start in range(0, len(mine), size):
        rows = mine[start : start + size]
        batch = collate([examples[i] for i in rows], length, pad_id, collation.with_attention_mask)
        out.append(_with_per_token([samples[i] for i in rows], batch))
    return out


def _trained_tokens(sample: Sample) -> list[int]:
    """Which response tokens carry loss: the policy's own (not observations), none for an untrained sample."""
    if not sample.trained:
        return [0] * len(sample.response_ids)
    return [1] * len(sample.response_ids) if sample.mask is None else [int(m) for m in sample.mask]


def _with_per_token(samples: list[Sample], batch: Batch) -> MicroBatch:
    advantages = torch.zeros(batch.labels.shape, dtype=torch.float32)
    engine_logp = torch.zeros(batch.labels.shape, dtype=torch.float32)
    for row, sample in enumerate(samples):
        first = len(sample.prompt_ids) - 1  # the label position of the first response token
        last = first + len(sample.response_ids)
        advantages[row, first:last] = sample.advantage
        engine_logp[row, first:last] = torch.tensor(sample.engine_logprobs, dtype=torch.float32)
    micro = MicroBatch(batch, advantages, engine_logp, samples=samples)
    if samples and samples[0].routing is not None:
        micro.routing = _routing(samples, batch.tokens.shape[1])
    return micro


def _routing(samples: list[Sample], length: int) -> torch.Tensor:
    """[b, s, MoE layers, top-k] int64: row r, position p = the experts the engine chose for input token p of
    sample r (its prompt, then its response but the last token); padding gets experts 0 .. k-1 (unused)."""
    first = samples[0].routing
    assert first is not None
    layers, top_k = first.shape[1:]
    out = torch.arange(top_k, dtype=torch.int64).expand(len(samples), length, layers, top_k).clone()
    for row, sample in enumerate(samples):
        routing = sample.routing
        expected = len(sample.prompt_ids) + len(sample.response_ids) - 1
        if routing is None or routing.shape != (expected, layers, top_k):
            got = None if routing is None else routing.shape
            raise RuntimeError(f"routing replay: sample {sample.prompt}/{sample.member} has routing {got}, "
                               f"expected {(expected, layers, top_k)} (prompt + response - 1 tokens)")  # fmt: skip
        out[row, :expected] = torch.from_numpy(routing.astype(np.int64))
    return out
