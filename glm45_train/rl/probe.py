"""After every weight sync: does the engine serve the policy the trainer holds? One probe, checked every step.

Notable:
- The probe: a fixed prompt (the prompt set's first prompts laid end to end, PROBE_PROMPT_TOKENS long: longer than
  a KV-cache block, so an engine's prefix cache holds it from one step to the next) and a response each engine
  samples with a fixed seed and the rollout's sampling parameters. It rides with the rollout (`probe_request`
  is the last request of every engine's `generate` call: no engine round trip of its own); the trainer then
  computes the log-probs of those response tokens (rl/train_step.py's forward-only pass, any layout) before any
  sample is scored or trained, and the gap is logged every step (`probe_gap_max`, `probe_gap_mean`).
- Why sampled, not scored: a stale prefix cache shows only where a prompt is served from the cache, and engines
  compute prompt log-probs (echo) afresh; a response sampled after the prompt reads the cached KV. A weight the
  sync missed or mis-mapped, experts left unpacked, or a cache not reset after the update all show in the gap.
- On an fp32 engine with fp32 training weights the two agree at float32 rounding (~3e-6 on the tiny model), so
  a gap above FP32_TOLERANCE stops the run with EngineMismatchError naming the step and the gap, before the
  step's samples are trained on. A bf16 engine differs by design (~0.01 per token on average): the gap is
  logged, for the correction it calls for.
- Every engine is probed (each may be stale on its own); the probe samples are gathered with the rollout's, so
  every rank runs the same forward pass, cycled to a multiple of the data-parallel size.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from glm45_train.errors import UserError
from glm45_train.rl.batches import Sample, micro_batches
from glm45_train.rl.rollout import Request

PROBE_PROMPT_TOKENS = 160
PROBE_SEED = 20250728
FP32_TOLERANCE = 1e-4


class EngineMismatchError(UserError):
    """The engine's log-probs are not the trainer's after a weight sync."""


def probe_prompt(prompt_ids: list[tuple[int, ...]], max_length: int, max_new_tokens: int) -> tuple[int, ...]:
    """The prompts laid end to end, cut to PROBE_PROMPT_TOKENS (leaving room for the response)."""
    length = min(PROBE_PROMPT_TOKENS, max_length - max_new_tokens)
    ids: list[int] = []
    for prompt in prompt_ids:
        ids.extend(prompt)
        if len(ids) >= length:
            break
    return tuple(ids[:length])


def probe_request(probe_ids: tuple[int, ...]) -> Request:
    """The request every engine answers after each sync, beside its share of the rollout."""
    return Request(probe_ids, 1, PROBE_SEED)


def verify_engine(run: Any, step: int, probes: list[Sample]) -> dict[str, float]:
    """Score every engine's probe response (`probes`, one per engine, the same list on every rank) with the
    trainer and compare; the gap metrics, or EngineMismatchError (every rank)."""
    from glm45_train.rl.steps import logprob_gap
    from glm45_train.rl.train_step import logprob_pass
    from glm45_train.train.loop import collation_for

    started = time.perf_counter()
    samples, trainer = list(probes), run.trainer
    while len(samples) % trainer.dp_size:
        samples.append(samples[len(samples) % len(probes)])
    batch = micro_batches(samples, trainer.dp_rank, trainer.dp_size, collation_for(run.recipe), run.pad_id)
    logprob_pass(trainer, batch, temperature=run.params.temperature)
    gap_mean, gap_max = logprob_gap(batch)
    exact = run.engine_dtype == torch.float32 and run.recipe.model.dtype == "fp32"
    if exact and not gap_max <= FP32_TOLERANCE:
        raise EngineMismatchError(
            f"after the weight sync of step {step + 1} the engine's log-probs differ from the trainer's by up to "
            f"{gap_max:.3g} on the probe (an fp32 engine agrees within {FP32_TOLERANCE:g}): the engine is not "
            "serving the policy's weights (a tensor not loaded or mis-mapped, or KV from the old weights)"
        )
    return {"probe_gap_mean": gap_mean, "probe_gap_max": gap_max, "probe_seconds": time.perf_counter() - started}
