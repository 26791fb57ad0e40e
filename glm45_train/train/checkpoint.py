"""Training checkpoints: Megatron torch_dist, atomic, resumable exactly; save on SIGTERM / SIGUSR1.

Layout (Megatron-LM's): `CKPT_DIR/iter_0000200/` (a dist checkpoint) and `CKPT_DIR/latest_checkpointed_iteration.txt`.
A checkpoint is written as `iter_XXXXXXX.partial`, renamed when every rank has finished, and only then does the
latest pointer move (written to a temporary file and renamed), so a crash at any moment leaves the previous
checkpoint as the latest one. What is saved: the model (or, for LoRA, only the adapters), the optimizer, the
LR scheduler, the data position and every RNG stream of every rank (per-rank ShardedObjects) — enough for a
resumed run to produce the same losses as an uninterrupted one — and what the run was trained with (the data's
fingerprint, the schedule's inputs: train/run_inputs.py), which a resume must agree with. Resume reads through
convert/torch_dist/safe_load.py.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from glm45_train.errors import UserError
from glm45_train.train.batches import DataPosition
from glm45_train.train.run_inputs import RunInputs

LATEST = "latest_checkpointed_iteration.txt"


def iteration_dir(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"iter_{step:07d}"


def latest_step(ckpt_dir: Path) -> int | None:
    pointer = ckpt_dir / LATEST
    if not pointer.exists():
        return None
    text = pointer.read_text(errors="replace").strip()
    if not text.isdigit() or not iteration_dir(ckpt_dir, int(text)).is_dir():
        raise UserError(
            f"{pointer}: points at {text[:40]!r}, which is not a complete checkpoint in {ckpt_dir} "
            "(restore the iteration, or point the file at one that exists)"
        )
    return int(text)


def _rng_object(is_loading: bool) -> Any:
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
    }
    rank, world = dist.get_rank(), dist.get_world_size()
    return ShardedObject("rng_state", None if is_loading else state, (world,), (rank,), replica_id=0)


def _restore_rng(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(trainer: Any, is_loading: bool) -> dict[str, Any]:
    model_state = trainer.model_sharded_state_dict(for_save=not is_loading)
    state: dict[str, Any] = {"model": model_state, "rng_state": _rng_object(is_loading)}
    if trainer.save_optimizer:
        with trainer.cpu_context():
            # Megatron-LM's default layout: each rank writes its own optimizer shard; resharding only over DP.
            state["optimizer"] = trainer.optimizer.sharded_state_dict(
                model_state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"}
            )
    return state


def save(trainer: Any, ckpt_dir: Path, step: int, position: DataPosition, inputs: RunInputs) -> Path:
    """Write the checkpoint for `step` atomically and move the latest pointer; prune beyond keep_last."""
    from megatron.core import dist_checkpointing

    final = iteration_dir(ckpt_dir, step)
    partial = final.with_name(final.name + ".partial")
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    state = _sharded_state(trainer, is_loading=False)
    state.update(
        step=step,
        data_position=asdict(position),
        scheduler=trainer.scheduler.state_dict(),
        kind=trainer.checkpoint_kind,
        run_inputs=inputs.record,
    )
    dist_checkpointing.save(state, str(partial))
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        _write_atomically(ckpt_dir / LATEST, f"{step}\n")
        _prune(ckpt_dir, trainer.keep_last)
    dist.barrier()
    return final


def load(trainer: Any, ckpt_dir: Path, step: int, inputs: RunInputs) -> tuple[int, DataPosition]:
    """Restore model/adapters, optimizer, scheduler, RNG; returns (step, data position). Refuses a checkpoint
    trained with other data or another schedule than `inputs` unless the recipe allows that change."""
    from glm45_train.convert.torch_dist import safe_load

    directory = iteration_dir(ckpt_dir, step)
    if trainer.save_optimizer:
        _give_fresh_optimizer_a_step(trainer.optimizer)
    state = safe_load.load(_sharded_state(trainer, is_loading=True), directory)  # runs no code from the files
    if state["kind"] != trainer.checkpoint_kind:
        raise RuntimeError(f"{directory}: a {state['kind']} checkpoint cannot resume a {trainer.checkpoint_kind} run")
    recorded = state.get("run_inputs")
    for change in inputs.check(recorded, str(directory)):
        if dist.get_rank() == 0:
            print(f"resuming with a change checkpoint.allow_changes allows: {change}", file=sys.stderr, flush=True)
    trainer.scheduler.override_opt_param_scheduler = inputs.schedule_changed(recorded)  # the recipe's from here
    trainer.load_model_state(state["model"])
    if trainer.save_optimizer:
        with trainer.cpu_context(), torch.no_grad():  # fp32 runs copy into the parameters themselves
            trainer.optimizer.load_state_dict(state["optimizer"])
        _restore_adam_steps(trainer.optimizer)
    trainer.scheduler.load_state_dict(state["scheduler"])
    _restore_rng(state["rng_state"])
    return int(state["step"]), DataPosition(**state["data_position"])


def _give_fresh_optimizer_a_step(optimizer: Any) -> None:
    """Megatron 0.16.1 without Apex/TE reads `state["step"]` of every torch Adam state while building the loading
    state dict, but its own state initialiser creates states without one (KeyError/AssertionError on resume).
    Give never-stepped states the step-0 Adam state; loading then overwrites all of it."""
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = chained.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                    state.setdefault("exp_avg", torch.zeros_like(param))
                    state.setdefault("exp_avg_sq", torch.zeros_like(param))


def _restore_adam_steps(optimizer: Any) -> None:
    """Megatron 0.16.1 restores the Adam step count into each param group's "step" but leaves torch Adam's
    per-parameter `state["step"]` (what the bias correction reads) at its initial value; copy it across, or the
    first steps after a resume would take differently sized updates."""
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = chained.optimizer
        for group in inner.param_groups:
            if group.get("step") is None:
                continue
            for param in group["params"]:
                state = inner.state[param]
                if "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def remove_partials(ckpt_dir: Path) -> None:
    """Unfinished `iter_*.partial` folders of a run that died while saving (called by the run that now holds the
    directory's lock, so no live writer owns them); the latest pointer never named them."""
    for partial in sorted(ckpt_dir.glob("iter_*.partial")):
        print(f"removing {partial}: an unfinished checkpoint of an interrupted run", file=sys.stderr, flush=True)
        shutil.rmtree(partial)


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    complete = sorted(p for p in ckpt_dir.glob("iter_*") if p.is_dir() and not p.name.endswith(".partial"))
    for old in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)


def _write_results_in_process() -> None:
    """Megatron's torch_dist writer reports its results through a multiprocessing Manager that it spawns on the
    first save, even for a synchronous save (ours). torchrun forwards SIGTERM to each worker's whole process
    group, Manager included, which dies at once: the save the signal asks for then fails (EOFError, BrokenPipe)
    and leaves `iter_….partial`. A synchronous save puts and gets its results in this process, so an in-process
    queue does the Manager's job with no helper to lose. (The writer's forked children inherit our handler.)"""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


class StopSignals:
    """SIGTERM (from torchrun, `scancel`, the scheduler) and SIGUSR1 (Slurm's pre-emption warning) ask for a
    checkpoint and a clean exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        _write_results_in_process()

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signum

    def any_rank_received(self) -> bool:
        """True on every rank if any rank got a signal (all ranks must checkpoint together)."""
        device = "cuda" if torch.cuda.is_available() else "cpu"  # NCCL reduces only CUDA tensors
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
