"""The policy side of a GRPO step on Megatron-Core's schedules: log-prob passes and updates, at any layout.

Notable:
- The same machinery as `sft` (train/loop.py): `get_forward_backward_func()` over this rank's micro-batches,
  `calculate_per_token_loss` (token-mean over the global batch), Megatron's DDP, optimizer and scheduler
  (`optimizer_step`). Only the forward step and the loss differ: the model returns logits (no labels), and the
  loss function takes log-probs with the vocab-parallel cross entropy (rl/grpo.py) and hands them to the
  recipe's policy loss (rl/losses), with the rollout correction's weights and mask (rl/correction.py).
- `logprob_pass` is forward-only; it fills each micro-batch's `old_logp` (the policy now) or, with
  `reference=True`, `ref_logp`: for LoRA the same model with its adapters disabled (no second copy of the
  weights), for full training the frozen reference model given. Log-probs exist on the last pipeline stage
  only, which is the only stage whose loss needs them.
- On GPUs rows are laid end to end (THD) exactly as for `sft` (train/loop.py `as_thd`); the per-token tensors
  are flattened alike.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any

import torch

from glm45_train.rl.batches import MicroBatch
from glm45_train.rl.grpo import STATS, token_logprobs, vocab_parallel_entropy
from glm45_train.rl.losses import LossSpec, TokenTerms, policy_loss
from glm45_train.train.loop import as_thd, optimizer_step, run_schedule, sum_records
from glm45_train.train.setup import Trainer

_on_gpu = torch.cuda.is_available


def _inputs(micro: MicroBatch) -> tuple[Any, Any, dict[str, torch.Tensor | None]]:
    rows, length = micro.advantages.shape
    extras = {
        "advantages": micro.advantages,
        "old_logp": micro.old_logp,
        "ref_logp": micro.ref_logp,
        "weights": micro.weights,
        "keep": micro.keep,
        "segments": torch.arange(rows).view(-1, 1).expand(rows, length),
    }
    if not _on_gpu():
        return micro.batch, None, extras
    batch, packed = as_thd(micro.batch)
    flat = {k: (v.reshape(1, -1).cuda(non_blocking=True) if v is not None else None) for k, v in extras.items()}
    return batch, packed, flat


def _forward(micro: MicroBatch, model: Any, replay: Any) -> tuple[torch.Tensor, Any]:
    batch, packed, extras = _inputs(micro)
    if replay is not None:  # the engine's experts for this micro-batch's tokens (rl/routing_replay.py)
        replay.apply(micro.routing, _real_tokens(micro), flat=packed is not None)
    logits = model(batch.tokens, batch.position_ids, batch.attention_mask, packed_seq_params=packed)
    return logits, (batch, extras)


def _real_tokens(micro: MicroBatch) -> torch.Tensor:
    """[b, s] True on the input positions a sample fills (prompt + response - 1), False on padding."""
    valid = torch.zeros(micro.advantages.shape, dtype=torch.bool)
    for row, sample in enumerate(micro.samples):
        valid[row, : len(sample.prompt_ids) + len(sample.response_ids) - 1] = True
    return valid


def _logp_step(temperature: float, replay: Any, data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
    micro: MicroBatch = next(data_iterator)
    logits, (batch, _extras) = _forward(micro, model, replay)

    def loss_func(output: torch.Tensor):
        logp = token_logprobs(output, batch.labels, temperature)
        count = batch.loss_mask.sum().to(torch.int)
        return logp.new_zeros(()), count, {"logp": logp.detach().reshape(micro.batch.labels.shape).cpu()}

    return logits, loss_func


def _policy_step(loss: LossSpec, replay: Any, data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
    micro: MicroBatch = next(data_iterator)
    logits, (batch, extras) = _forward(micro, model, replay)

    def loss_func(output: torch.Tensor):
        old = extras["old_logp"]
        assert old is not None, "logprob_pass must fill old_logp before an update"
        terms = TokenTerms(
            token_logprobs(output, batch.labels, loss.temperature),
            old,
            extras["advantages"],
            batch.loss_mask,
            extras["segments"],
            extras["ref_logp"],
            extras["weights"],
            extras["keep"],
        )
        total, count, sums = policy_loss(loss, terms)
        mask = batch.loss_mask if terms.keep is None else batch.loss_mask * terms.keep
        entropy = (vocab_parallel_entropy(output, loss.temperature) * mask).sum()
        stats = {"loss": total.detach(), **sums, "entropy": entropy, "tokens": count}
        return total, count.to(torch.int), {"grpo": torch.stack([stats[k].float().cpu() for k in STATS])}

    return logits, loss_func


def _schedule(owner: Any, step_func: Any, micro: list[MicroBatch], forward_only: bool, replay: Any) -> list[dict]:
    shape = tuple(micro[0].batch.tokens.shape)
    if replay is not None:
        replay.begin(backward=not forward_only)
    try:
        return run_schedule(owner.model, step_func, micro, shape, forward_only)  # type: ignore[arg-type]
    finally:
        if replay is not None:  # forwards after this one (the probe's) route for themselves
            replay.end()


@torch.no_grad()
def logprob_pass(
    trainer: Trainer, micro: list[MicroBatch], temperature: float, reference: Any = None, replay: Any = None
) -> None:
    """Fill `old_logp` (policy) or, with `reference` (a model, or "adapters"), `ref_logp` of every micro-batch.
    With `replay` (rl/routing_replay.py) the routers take the engine's experts; the policy pass also measures
    how often they would have chosen them anyway. A separate reference model routes for itself."""
    from glm45_train.lora import adapters_disabled

    owner = trainer
    disable: Any = contextlib.nullcontext()
    if reference == "adapters":
        disable = adapters_disabled(trainer.module)
    elif reference is not None:
        owner, replay = reference, None
    trainer.model.eval()
    if replay is not None:
        replay.measure(reference is None)
    try:
        with disable:
            step = functools.partial(_logp_step, temperature, replay)
            records = _schedule(owner, step, micro, forward_only=True, replay=replay)
    finally:
        trainer.model.train()
        if replay is not None:
            replay.measure(False)
    logps: list[torch.Tensor | None] = [r["logp"] for r in records] if records else [None] * len(micro)
    for batch, logp in zip(micro, logps, strict=True):  # None: not the last pipeline stage
        if reference is None:
            batch.old_logp = logp
        else:
            batch.ref_logp = logp


def update(trainer: Trainer, micro: list[MicroBatch], loss: LossSpec, replay: Any = None) -> dict[str, float]:
    """One optimizer update on one global batch; the stats summed over every rank, then lr and grad norm."""
    started = time.perf_counter()
    trainer.model.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    step = functools.partial(_policy_step, loss, replay)
    records = _schedule(trainer, step, micro, forward_only=False, replay=replay)
    totals = sum_records(records, "grpo", len(STATS))
    lr, grad_norm = optimizer_step(trainer)
    sums = dict(zip(STATS, totals.tolist(), strict=True))
    return {**sums, "lr": lr, "grad_norm": grad_norm, "seconds": time.perf_counter() - started}
