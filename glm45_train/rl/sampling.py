"""One step's trained samples: rollout rounds, the engine check, scoring, DAPO's dynamic sampling, overlong filtering.

Notable:
- Round 0 samples the step's `rl.prompts_per_step` prompts; each engine's probe rides with it (rl/probe.py) and is
  verified before anything is scored. Later rounds carry no probe: the weights have not changed since.
- Dynamic sampling (`rl.dynamic_sampling.enabled`, DAPO): a group whose scored rewards are all equal has zero
  advantage everywhere and teaches nothing; it is dropped and another round of `prompts_per_step` prompts is
  sampled, at most `max_rounds` extra rounds a step. The first `prompts_per_step` groups with a signal, in sampling
  order, are trained; when the rounds run out, dropped groups fill the batch in sampling order (zero advantage:
  they add nothing to the policy gradient, and the batch keeps the recipe's size, so the updates per step and the
  shapes stay fixed). Logged: groups dropped, extra rounds, groups filled.
- Deterministic under resume: round r's prompt i is sampled with seed(run seed, step, r * prompts_per_step + i),
  and the prompt position advances by every round's prompts; the position after the step is what the checkpoint
  stores, so a resumed run samples exactly the rounds the uninterrupted run sampled.
- Overlong filtering (`rl.overlong.mode: filter`): a response cut at `max_new_tokens` keeps its reward in its
  group's mean and std (it was sampled from the policy) but carries no loss. The penalty mode is a reward
  (rl/setup.py `reward_set` adds `length`), scored like the others.
- Reward metrics describe round 0, the step's fresh prompts (comparable with and without dynamic sampling);
  `reward_trained` is the mean reward of the samples trained on.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from glm45_train.rl import steps
from glm45_train.rl.agent.episodes import agent_metrics
from glm45_train.rl.batches import Sample
from glm45_train.rl.probe import probe_request, verify_engine
from glm45_train.train.batches import DataPosition


@dataclass
class StepSamples:
    samples: list[Sample]  # prompts_per_step groups, renumbered 0 .. prompts_per_step - 1
    position: DataPosition  # the prompt position after every round
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # rollout, verify, reward


def sample_step(run: Any, step: int, position: DataPosition) -> StepSamples:
    """Sample and score the step's groups from `position` (a collective: every rank, the same result)."""
    rl = run.recipe.rl
    per_step, group = rl.prompts_per_step, rl.rollout.group_size
    rounds = 1 + (rl.dynamic_sampling.max_rounds if rl.dynamic_sampling.enabled else 0)
    seconds = {"rollout": 0.0, "verify": 0.0, "reward": 0.0}
    kept: list[list[Sample]] = []
    dropped: list[list[Sample]] = []
    metrics: dict[str, float] = {}
    used = 0
    for round_index in range(rounds):
        prompts, position = run.prompts.next_prompts(position)
        started = time.perf_counter()
        probe = probe_request(run.probe_ids) if round_index == 0 else None
        samples, probes = steps.rollout(run, step, prompts, offset=round_index * per_step, probe=probe)
        seconds["rollout"] += time.perf_counter() - started
        if round_index == 0:
            started = time.perf_counter()
            metrics.update(verify_engine(run, step, probes))  # before anything is scored or trained
            seconds["verify"] += time.perf_counter() - started
        started = time.perf_counter()
        scored, reward_metrics = steps.score(run, prompts, samples)
        seconds["reward"] += time.perf_counter() - started
        metrics.update(reward_metrics if round_index == 0 else {})
        if round_index == 0 and samples and samples[0].trajectory is not None:  # agent rollouts (rl/agent)
            metrics.update(agent_metrics([s.trajectory for s in samples]))
        used = round_index
        for members in _groups(scored, group):
            (kept if _has_signal(members) or not rl.dynamic_sampling.enabled else dropped).append(members)
        if len(kept) >= per_step:
            break
    filled = max(0, per_step - len(kept))
    chosen = [*kept[:per_step], *dropped[:filled]]
    trained = _renumbered(chosen, filter_truncated=rl.overlong.mode == "filter")
    metrics["reward_trained"] = float(np.mean([s.reward for s in trained]))
    if rl.dynamic_sampling.enabled:
        metrics.update(
            dynamic_kept_groups=min(len(kept), per_step), dynamic_dropped_groups=len(dropped), dynamic_rounds=used,
            dynamic_filled_groups=filled,
        )  # fmt: skip
    if rl.overlong.mode == "filter":
        metrics["overlong_filtered"] = sum(not s.trained for s in trained)
    return StepSamples(trained, position, metrics, seconds)


def _groups(samples: list[Sample], group: int) -> list[list[Sample]]:
    return [samples[start : start + group] for start in range(0, len(samples), group)]


def _has_signal(members: list[Sample]) -> bool:
    """Some advantage is not zero: the group's scored rewards differ (failed samples have advantage 0)."""
    return any(s.advantage != 0.0 for s in members)


def _renumbered(groups: list[list[Sample]], *, filter_truncated: bool) -> list[Sample]:
    return [
        dataclasses.replace(s, prompt=index, trained=s.finished or not filter_truncated)
        for index, members in enumerate(groups)
        for s in members
    ]
