"""The parts of one RL step between the engine and the trainer: who samples what, scoring, batching, metrics.

Notable:
- Seeds: response j of the step's prompt i is sampled with seed(run seed, step, i) + j, whichever rank or
  engine samples it.
- Scoring is split over every rank (rank r scores samples r, r + world, ...) and gathered; the failure check
  (`rl.max_reward_failure_fraction`) runs on the whole step, identically on every rank, so all ranks stop
  together with the same message.
- The logged engine/trainer log-prob gap (`logprob_gap_max`) is the check users of other frameworks lack: a
  weight-sync or tokenisation mismatch shows up there at the first step, not as a slowly diverging run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from glm45_train.rl.batches import MicroBatch, Sample, micro_batches
from glm45_train.rl.grpo import group_advantages, mean_of
from glm45_train.rl.rewards import RewardFailureError, RewardInput, RewardScores
from glm45_train.rl.rollout import Request


def sample_seed(seed: int, step: int, prompt: int) -> int:
    return int(np.random.SeedSequence([seed, step, prompt]).generate_state(1, np.uint64)[0] >> 1)


def rollout(
    run: Any, step: int, prompts: list[Any], offset: int = 0, probe: Request | None = None
) -> tuple[list[Sample], list[Sample]]:
    """Every response of these prompts, on every rank, ordered by (prompt, member); and with a `probe` request each
    engine's answer to it (rl/probe.py), in engine order, sampled in the same `generate` call. `offset` numbers
    the prompts for their seeds (a later round of dynamic sampling continues the step's numbering)."""
    owners, rank = run.engine_owners, dist.get_rank()
    group, seed = run.recipe.rl.rollout.group_size, run.recipe.train.seed
    mine = list(range(owners.index(rank), len(prompts), len(owners))) if rank in owners else []
    requests = [Request(prompts[i].ids, group, sample_seed(seed, step, offset + i)) for i in mine]
    local: tuple[list[Sample], list[Sample]] = ([], [])
    if rank in owners:
        extra = [probe] if probe else []
        if run.episodes is None:
            completions = run.engine.generate([*requests, *extra], run.params)
            answers = completions[len(requests) :]
        else:  # multi-turn: tool calls run between the turns (rl/agent/episodes.py)
            records = [prompts[i].record for i in mine]
            completions, answers = run.episodes.run(requests, records, run.params, extra)
        if probe:
            ((answer,),) = answers
            local[1].append(Sample(owners.index(rank), 0, probe.prompt_ids, answer.response_ids, answer.logprobs, True))
        trained_mask = not run.recipe.rl.environment.train_observations  # False only in the negative control
        local[0].extend(
            Sample(
                i,
                j,
                prompts[i].ids,
                c.response_ids,
                c.logprobs,
                c.finished,
                routing=c.routing,
                mask=c.mask if trained_mask else None,
                trajectory=c.trajectory,
            )
            for i, group_completions in zip(mine, completions[: len(requests)], strict=True)
            for j, c in enumerate(group_completions)
        )
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    samples = sorted((s for part in gathered for s in part[0]), key=lambda s: (s.prompt, s.member))
    probes = sorted((s for part in gathered for s in part[1]), key=lambda s: s.prompt)
    return samples, probes


def score(run: Any, prompts: list[Any], samples: list[Sample]) -> tuple[list[Sample], dict[str, float]]:
    """Rewards and advantages of every sample, and the reward metrics."""
    rank, world = dist.get_rank(), dist.get_world_size()
    thinking = run.recipe.rl.rollout.thinking
    share = samples[rank::world]
    inputs = [
        RewardInput(
            prompts[s.prompt].record,
            _response_text(run, s),
            list(s.response_ids),
            thinking,
            s.finished,
            s.trajectory,
        )
        for s in share
    ]
    try:
        scores = run.rewards.score(inputs) if inputs else None
    except RewardFailureError as err:  # judged on the whole step below
        scores = err.scores
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, scores)
    combined = _combine([g for g in gathered], len(samples), world)
    run.rewards.check_failures(combined, len(samples))
    group = run.recipe.rl.rollout.group_size
    rewards = np.asarray(combined.total).reshape(-1, group)
    failed = np.asarray(combined.failed).reshape(-1, group)
    advantages = group_advantages(rewards, failed, run.recipe.rl.grpo.std_normalize)
    scored = [
        Sample(**{**s.__dict__, "reward": float(rewards.flat[k]), "advantage": float(advantages.flat[k])})
        for k, s in enumerate(samples)
    ]
    return scored, _reward_metrics(combined, rewards, failed)


def _response_text(run: Any, sample: Sample) -> str:
    """What answer rewards judge: the response, or an agent trajectory's last assistant turn."""
    if sample.trajectory is not None:
        return str(sample.trajectory.messages[-1]["content"])
    return str(run.tokenizer.decode(list(sample.response_ids), skip_special_tokens=False))


def _combine(parts: list[RewardScores | None], count: int, world: int) -> RewardScores:
    """Undo the rank-strided split: sample k was scored by rank k % world as its (k // world)-th input."""
    present = [p for p in parts if p is not None]
    keys = list(present[0].per_function) if present else []
    per_function = {key: [math.nan] * count for key in keys}
    total, failed = [0.0] * count, [False] * count
    failures = []
    for rank, part in enumerate(parts):
        if part is None:
            continue
        for local, k in enumerate(range(rank, count, world)):
            for key in keys:
                per_function[key][k] = part.per_function[key][local]
            total[k], failed[k] = part.total[local], part.failed[local]
        failures.extend(part.failures)
    return RewardScores(per_function, total, failed, failures)


def _reward_metrics(scores: RewardScores, rewards: np.ndarray, failed: np.ndarray) -> dict[str, float]:
    metrics: dict[str, float] = {
        "reward": float(rewards[~failed].mean()) if (~failed).any() else math.nan,
        "reward_std": float(rewards[~failed].std()) if (~failed).any() else math.nan,
        "reward_failures": int(failed.sum()),
        "groups_without_signal": sum(_no_signal(r, f) for r, f in zip(rewards, failed, strict=True)),
    }
    for key, (mean, std) in scores.mean_std().items():
        metrics[f"reward/{key}"] = mean
        metrics[f"reward/{key}_std"] = std
    return metrics


def _no_signal(rewards: np.ndarray, failed: np.ndarray) -> bool:
    """A group whose scored rewards are all equal: zero advantage everywhere, nothing learnt from it."""
    scored = rewards[~failed]
    return len(scored) < 2 or bool(np.ptp(scored) == 0)


def global_batches(run: Any, samples: list[Sample]) -> list[list[MicroBatch]]:
    """The step's samples in global batches of train.global_batch_size, this rank's micro-batches of each."""
    from glm45_train.train.loop import collation_for

    trainer, size = run.trainer, run.recipe.train.global_batch_size
    collation = collation_for(run.recipe)
    return [
        micro_batches(samples[start : start + size], trainer.dp_rank, trainer.dp_size, collation, run.pad_id)
        for start in range(0, len(samples), size)
    ]


def sample_metrics(samples: list[Sample], batches: list[list[MicroBatch]]) -> dict[str, float]:
    lengths = np.array([len(s.response_ids) for s in samples])
    gap_mean, gap_max = logprob_gap(m for batch in batches for m in batch)
    return {
        "response_length": float(lengths.mean()),
        "response_length_max": int(lengths.max()),
        "finished_fraction": float(np.mean([s.finished for s in samples])),
        "logprob_gap_mean": gap_mean,
        "logprob_gap_max": gap_max,
    }


def logprob_gap(micro_batches: Iterable[MicroBatch]) -> tuple[float, float]:
    """Mean and max |engine - trainer| log-prob over every trained token of every rank (a collective; the
    trainer's log-probs exist on the last pipeline stage only)."""
    gap = torch.zeros(3)  # sum |engine - trainer|, tokens, max
    for micro in micro_batches:
        if micro.old_logp is None:
            continue
        mask = micro.batch.loss_mask > 0
        diff = (micro.engine_logp - micro.old_logp).abs()[mask]
        if diff.numel():
            gap += torch.tensor([float(diff.sum()), float(diff.numel()), 0.0])
            gap[2] = max(float(gap[2]), float(diff.max()))
    sums, peak = gap[:2].clone(), gap[2:].clone()
    dist.all_reduce(sums)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return (float(sums[0] / sums[1]) if sums[1] else math.nan), float(peak[0])


def update_metrics(updates: list[dict[str, float]]) -> dict[str, float]:
    sums = {key: sum(u[key] for u in updates) for key in ("loss", "pg", "kl", "clipped", "entropy", "ratio", "tokens")}
    return {
        "loss": mean_of(sums, "loss"),
        "pg_loss": mean_of(sums, "pg"),
        "kl": mean_of(sums, "kl"),
        "clip_fraction": mean_of(sums, "clipped"),
        "entropy": mean_of(sums, "entropy"),
        "ratio": mean_of(sums, "ratio"),
        "grad_norm": float(np.mean([u["grad_norm"] for u in updates])),
        "lr": updates[-1]["lr"],
        "trained_tokens": sums["tokens"],
    }


def time_metrics(
    sync_s: float, seconds: dict[str, float], train_s: float, step_s: float, samples: list[Sample]
) -> dict[str, float]:
    """The step's split: weight sync, rollout, engine verification (the probe), rewards, training."""
    generated = sum(len(s.response_ids) for s in samples)
    rows = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    rollout_s = seconds["rollout"]
    return {
        "sync_seconds": sync_s,
        "verify_seconds": seconds["verify"],
        "rollout_seconds": rollout_s,
        "reward_seconds": seconds["reward"],
        "train_seconds": train_s,
        "step_seconds": step_s,
        "rollout_tokens_per_s": generated / rollout_s if rollout_s > 0 else math.nan,
        "train_tokens_per_s": rows / train_s if train_s > 0 else math.nan,  # each sample trains once a step
        "overhead_fraction": 1.0 - (rollout_s + train_s) / step_s if step_s > 0 else math.nan,
    }
