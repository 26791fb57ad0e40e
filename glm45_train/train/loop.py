"""`run_sft(recipe)`: the training loop on Megatron-Core's schedules (gradient accumulation, pipeline).

One step = one global batch: this rank's micro-batches go through `get_forward_backward_func()`, the loss is
the mean over every trained token of the global batch (calculate_per_token_loss), then the optimizer and the
LR scheduler step. Checkpoints every `checkpoint.interval` steps, at the end, and when SIGTERM/SIGUSR1 arrives
(then the run exits cleanly, to be resumed — by Slurm's requeue or by hand — from that step).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from glm45_train.config.recipe import Recipe
from glm45_train.data.prepared import Batch, load_prepared
from glm45_train.train import checkpoint
from glm45_train.train.batches import BatchPlan, Collation, DataPosition, eval_batches, micro_batches
from glm45_train.train.metrics import MetricsLog, plot_loss
from glm45_train.train.run_dir import write_run_metadata
from glm45_train.train.run_inputs import sft_inputs
from glm45_train.train.run_lock import release_run_dir
from glm45_train.train.setup import Trainer, build_trainer


@dataclass
class RunResult:
    steps: int
    final_loss: float | None
    stopped_by_signal: bool
    run_dir: Path
    train_seconds: float = 0.0  # wall time of the step loop, checkpoint writes excluded
    tokens: int = 0  # token positions processed by all ranks in those steps


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Sum of per-token losses and the trained-token count; Megatron divides by the global count."""
    loss_sum = (output.float() * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach().clone(), num_tokens.float()])}


def forward_step(data_iterator, model):
    batch: Batch = next(data_iterator)
    if torch.cuda.is_available():
        batch, packed = as_thd(batch)
    else:
        packed = None  # CPU attention isolates packed samples with the block-diagonal mask instead
    output = model(
        batch.tokens,
        batch.position_ids,
        batch.attention_mask,
        labels=batch.labels,
        loss_mask=batch.loss_mask,
        packed_seq_params=packed,
    )
    return output, functools.partial(_loss_func, batch.loss_mask)


def as_thd(batch: Batch) -> tuple[Batch, Any]:
    """GPU path: rows end to end as one [1, b*s] sequence with cu_seqlens, so Transformer Engine's attention keeps
    packed samples apart (THD format), on the current CUDA device."""
    from megatron.core.packed_seq_params import PackedSeqParams

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(1, -1).cuda(non_blocking=True)

    cu = batch.cu_seqlens.to(torch.int32).cuda(non_blocking=True)
    longest = int((batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).max())
    packed = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest
    )
    flat_batch = Batch(
        tokens=flat(batch.tokens),
        labels=flat(batch.labels),
        loss_mask=flat(batch.loss_mask),
        position_ids=flat(batch.position_ids),
        cu_seqlens=cu,
        attention_mask=None,
    )
    return flat_batch, packed


def run_schedule(
    model: Any, step_func: Any, items: list, shape: tuple[int, int], forward_only: bool
) -> list[dict[str, torch.Tensor]]:
    """Megatron's forward/backward schedule over `items` (micro-batches of `shape` rows x length); the records
    the loss function returned (last pipeline stage only)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    rows, length = shape
    if torch.cuda.is_available():  # forward steps lay the rows end to end (THD): what stages exchange is 1 x b*s
        rows, length = 1, rows * length
    return get_forward_backward_func()(
        forward_step_func=step_func,
        data_iterator=iter(items),
        model=[model],
        num_microbatches=len(items),
        seq_length=length,
        micro_batch_size=rows,
        forward_only=forward_only,
    )


def sum_records(records: list[dict[str, torch.Tensor]], key: str, size: int) -> torch.Tensor:
    """`records[i][key]` summed over micro-batches, data-parallel ranks and pipeline stages (CPU tensor)."""
    from megatron.core import parallel_state

    totals = torch.zeros(size)
    for record in records:  # only the last pipeline stage has them
        totals += record[key].float().cpu()
    if torch.cuda.is_available():
        totals = totals.cuda()
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    return totals.cpu()


def _run_batches(trainer: Trainer, batches: list[Batch], forward_only: bool) -> tuple[float, float]:
    """(loss sum, trained tokens) over this data-parallel group for the given micro-batches."""
    shape = tuple(batches[0].tokens.shape)
    records = run_schedule(trainer.model, forward_step, batches, shape, forward_only)  # type: ignore[arg-type]
    totals = sum_records(records, "lm loss", 2)
    return float(totals[0]), float(totals[1])


def train_step(trainer: Trainer, batches: list[Batch]) -> dict[str, float]:
    started = time.perf_counter()
    trainer.model.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    loss_sum, tokens = _run_batches(trainer, batches, forward_only=False)
    lr, grad_norm = optimizer_step(trainer)
    seconds = time.perf_counter() - started
    all_tokens = sum(b.tokens.numel() for b in batches) * trainer.dp_size  # positions processed, padding included
    extra = {"mfu": _mfu(trainer, batches, all_tokens / seconds)} if torch.cuda.is_available() else {}
    return {
        **extra,
        "loss": loss_sum / max(tokens, 1.0),
        "lr": lr,
        "grad_norm": grad_norm,
        "trained_tokens": tokens,
        "tokens": all_tokens,
        "tokens_per_s": all_tokens / seconds,
        "step_seconds": seconds,
    }


def optimizer_step(trainer: Trainer) -> tuple[float, float]:
    """Apply the accumulated gradients and move the LR schedule; returns (lr used, grad norm)."""
    lr = trainer.optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves it after)
    with trainer.cpu_context():
        _updated, grad_norm, _zeros = trainer.optimizer.step()
    trainer.scheduler.step(increment=1)
    return lr, float(grad_norm) if grad_norm is not None else float("nan")


def _mfu(trainer: Trainer, batches: list[Batch], tokens_per_s: float) -> float:
    from glm45_train.train.mfu import flops_per_token, peak_flops

    peak = peak_flops(torch.cuda.get_device_name())
    if peak is None:
        return float("nan")
    per_token = flops_per_token(trainer.hf, batches[0].tokens.shape[1], trainer.config.mtp_num_layers is not None)
    return per_token * tokens_per_s / (peak * dist.get_world_size())


def evaluate(trainer: Trainer, plan: BatchPlan, collation: Collation) -> float | None:
    batches = list(eval_batches(plan, trainer.dp_rank, trainer.dp_size, collation))
    if not batches:
        return None
    trainer.model.eval()
    with torch.no_grad():
        loss_sum, tokens = _run_batches(trainer, batches, forward_only=True)
    trainer.model.train()
    return loss_sum / max(tokens, 1.0)


def collation_for(recipe: Recipe) -> Collation:
    p = recipe.parallel
    return Collation(
        micro_batch_size=recipe.train.micro_batch_size,
        multiple=p.tp * p.cp * 2 if p.sp or p.cp > 1 else 1,
        with_attention_mask=not torch.cuda.is_available(),  # CPU attention needs the block-diagonal mask
    )


def run_sft(recipe: Recipe) -> RunResult:
    dataset = load_prepared(recipe.data.prepared)  # type: ignore[arg-type]  # raw inputs are prepared by the CLI
    train = recipe.train
    plan = BatchPlan(
        dataset, seed=train.seed, eval_fraction=recipe.eval.split, global_batch_size=train.global_batch_size
    )
    trainer = build_trainer(recipe, lambda _dp: train.steps or (train.epochs or 1) * plan.steps_per_epoch)
    collation = collation_for(recipe)
    run_dir = Path(recipe.checkpoint.dir)
    if dist.get_rank() == 0:
        write_run_metadata(recipe, run_dir)
        checkpoint.remove_partials(run_dir)
    dist.barrier()
    step, position = 0, DataPosition()
    inputs = sft_inputs(recipe, dataset.fingerprint, trainer.total_steps)
    resume_from = checkpoint.latest_step(run_dir)
    if resume_from is not None:
        step, position = checkpoint.load(trainer, run_dir, resume_from, inputs)
    is_first = dist.get_rank() == 0
    metrics = MetricsLog(run_dir, trainer.total_steps, step, is_first, recipe.logging.tensorboard)
    signals = checkpoint.StopSignals()
    last: dict[str, float] = {}
    stopped = False
    loop_started, tokens = time.perf_counter(), 0
    try:
        while step < trainer.total_steps:
            rows, position = plan.global_batch(position)
            batches = micro_batches(plan, rows, trainer.dp_rank, trainer.dp_size, collation)
            last = train_step(trainer, batches)
            tokens += int(last["tokens"])
            step += 1
            record: dict[str, Any] = {"step": step, "epoch": position.epoch, **last}
            if recipe.eval.interval and step % recipe.eval.interval == 0:
                eval_loss = evaluate(trainer, plan, collation)
                if eval_loss is not None:
                    record["eval_loss"] = eval_loss
            if step % recipe.logging.interval == 0 or step == trainer.total_steps:
                metrics.log(record)
            metrics.advance()
            stopped = signals.any_rank_received()
            if stopped or step % recipe.checkpoint.interval == 0 or step == trainer.total_steps:
                save_started = time.perf_counter()
                checkpoint.save(trainer, run_dir, step, position, inputs)
                loop_started += time.perf_counter() - save_started
            if stopped:
                break
    finally:
        signals.restore()
        metrics.close()
    train_seconds = time.perf_counter() - loop_started
    if is_first and recipe.logging.plot and metrics.path.exists():
        plot_loss(metrics.path, run_dir / "loss.png")
    release_run_dir(run_dir)  # the run is over: the folder may be resumed (a crash releases it with the process)
    return RunResult(step, last.get("loss"), stopped, run_dir, train_seconds, tokens)
