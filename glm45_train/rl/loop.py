"""`run_rl(recipe)`: GRPO on the SFT machinery — rollouts, rewards, advantages, updates, checkpoints, metrics.

One RL step: sync the policy's weights into the engine -> sample `group_size` responses for each of the step's
`prompts_per_step` prompts, and the probe response -> verify the engine on the probe (rl/probe.py) -> score the
responses -> group advantages -> logp_old (and the reference's) in forward-only passes -> `updates_per_step`
optimizer updates, one per global batch of samples -> metrics -> checkpoint. The recipe chooses the policy loss
(rl/losses), the rollout correction (rl/correction.py) and whether the engine's routing is replayed
(rl/routing_replay.py).

Notable:
- Shared, not copied: the trainer (model build, base weights, LoRA, DDP, optimizer, scheduler) is
  `train/setup.build_trainer`; checkpoints are `train/checkpoint` (atomic torch_dist, SIGTERM/SIGUSR1 save and
  exit, exact resume), metrics `train/metrics`, the run directory `train/run_dir` (so `export --to-hf` exports
  an RL run as it exports an SFT run), prompts are rendered by data/'s renderer, weights reach the engine
  through the converters' mapping (rl/weight_sync.py).
- Sampling is seeded per (run seed, step, prompt, member) and the prompt order per (seed, epoch): the
  checkpoint's data position and RNG streams are all a resumed run needs to sample, score and train exactly as
  the uninterrupted run did.
- Engines: every rank owns an `hf` engine and samples its share of the prompts; SGLang engines belong to every
  `rl.rollout.tp`-th rank. The samples are gathered so every rank holds the whole step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from glm45_train.config.recipe import Recipe
from glm45_train.config.rl import updates_per_step
from glm45_train.rl import steps
from glm45_train.rl.correction import CorrectionSpec, correct_step
from glm45_train.rl.losses import loss_spec
from glm45_train.rl.sampling import sample_step
from glm45_train.rl.setup import RLRun, build_rl_run
from glm45_train.rl.train_step import logprob_pass, update
from glm45_train.train import checkpoint
from glm45_train.train.batches import DataPosition
from glm45_train.train.metrics import MetricsLog, plot_metrics
from glm45_train.train.run_lock import release_run_dir


@dataclass
class RLResult:
    steps: int
    final_reward: float | None
    stopped_by_signal: bool
    run_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)


def run_rl(recipe: Recipe) -> RLResult:
    run = build_rl_run(recipe)
    run_dir = Path(recipe.checkpoint.dir)
    step, position = 0, DataPosition()
    resume_from = checkpoint.latest_step(run_dir)
    if resume_from is not None:
        step, position = checkpoint.load(run.trainer, run_dir, resume_from, run.inputs)
    is_first = dist.get_rank() == 0
    total = recipe.train.steps or 0
    metrics = MetricsLog(run_dir, total, step, is_first, recipe.logging.tensorboard, desc="rl", show="reward")
    signals = checkpoint.StopSignals()
    history: list[dict[str, Any]] = []
    stopped = False
    try:
        while step < total:
            record, position = rl_step(run, step, position)
            step += 1
            record = {"step": step, "epoch": position.epoch, **record}
            history.append(record)
            if step % recipe.logging.interval == 0 or step == total:
                metrics.log(record)
            metrics.advance()
            stopped = signals.any_rank_received()
            if stopped or step % recipe.checkpoint.interval == 0 or step == total:
                checkpoint.save(run.trainer, run_dir, step, position, run.inputs)
            if stopped:
                break
    finally:
        signals.restore()
        metrics.close()
        run.shutdown()
    if is_first and recipe.logging.plot and metrics.path.exists():
        plot_metrics(metrics.path, run_dir / "rl.png", ("reward", "response_length", "kl", "entropy"))
    release_run_dir(run_dir)  # the run is over: the folder may be resumed (a crash releases it with the process)
    final = history[-1]["reward"] if history else None
    return RLResult(step, final, stopped, run_dir, history)


def rl_step(run: RLRun, step: int, position: DataPosition) -> tuple[dict[str, Any], DataPosition]:
    """One GRPO step from `position` in the prompt order; returns its metrics and the position after it."""
    recipe, trainer = run.recipe, run.trainer
    started = time.perf_counter()
    run.engine.wake()
    sync = run.sync_weights()
    synced = time.perf_counter()
    sampled = sample_step(run, step, position)  # rollout rounds, probe check, rewards (rl/sampling.py)
    samples, position = sampled.samples, sampled.position
    run.engine.sleep()
    scored = time.perf_counter()
    batches = steps.global_batches(run, samples)
    temperature = recipe.rl.rollout.temperature
    replay = run.replay  # the engine's routing replayed in every trainer pass (rl/routing_replay.py), or None
    for micro in batches:  # logp_old for every update of the step before the first one
        logprob_pass(trainer, micro, temperature, replay=replay)
        if run.reference is not None:
            logprob_pass(trainer, micro, temperature, reference=run.reference, replay=replay)
    routing = {"routing_agreement": replay.agreement()} if replay is not None else {}
    correction = correct_step(CorrectionSpec.of(recipe.rl.correction), [m for batch in batches for m in batch])
    loss = loss_spec(recipe.rl)
    updates = [update(trainer, micro, loss, replay) for micro in batches]
    trained = time.perf_counter()
    assert len(updates) == updates_per_step(recipe)
    record = {
        **sampled.metrics,
        **steps.sample_metrics(samples, batches),
        **correction,
        **routing,
        **steps.update_metrics(updates),
        **steps.time_metrics(synced - started, sampled.seconds, trained - scored, trained - started, samples),
        **sync.metrics(),
    }
    return record, position
