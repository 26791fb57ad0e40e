"""Process groups and Megatron parallel state: gloo on CPU, nccl on GPU, one process or many (torchrun).

`initialize(layout)` works in three situations with the same call:
- under torchrun (RANK/WORLD_SIZE/MASTER_ADDR set): joins the job's process group;
- a plain single process (tests, conversion, `check`): creates a world of one over a private file store;
- already initialised: only (re)builds Megatron's model-parallel groups for the requested layout.
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist

from glm45_train.config.layout import ParallelLayout
from glm45_train.runtime import cpu


def initialize(layout: ParallelLayout | None = None, seed: int = 1234) -> None:
    """Join (or create) the process group, then set up Megatron's TP/PP/EP/CP groups and RNG streams."""
    from megatron.core import parallel_state, tensor_parallel

    layout = layout or ParallelLayout()
    on_cpu = cpu.apply()
    if not dist.is_initialized():
        _init_process_group(backend="gloo" if on_cpu else "nccl")
    if not on_cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    layout.data_parallel_size(dist.get_world_size())  # refuses impossible layouts with a clear message
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _init_process_group(backend: str) -> None:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        return
    store_path = tempfile.mktemp(prefix="glm45-train-store-")
    dist.init_process_group(
        backend=backend,
        init_method=f"file://{store_path}",
        rank=0,
        world_size=1,
        timeout=timedelta(minutes=30),
    )


def shutdown() -> None:
    """Tear down Megatron's groups and the process group (safe to call when nothing was set up)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
