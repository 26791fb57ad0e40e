"""The HF-named weight stream as safetensors bucket files: how weights reach a vLLM engine.

Notable:
- vLLM's RPC cannot carry raw tensors (they do not pickle; a server's `/collective_rpc` takes strings only), so
  the stream from rl/weight_sync.py is written in buckets of about BUCKET_BYTES, one safetensors file each, in a
  directory of the engine's own, and the engine's worker reads them back lazily (serve/vllm_worker.py). The
  trainer holds one bucket at a time; the worker one tensor at a time.
- Every name and shape is checked as it streams (model_files.WeightCheck): nothing unknown, nothing twice, and
  nothing missing at the end, before the engine is asked to load anything. The MTP layer's tensors are not
  written (the engines' main model does not build the layer).
- A transport for one machine (the engine reads the trainer's files). Engines on other nodes are fed over a
  process group instead (the multi-node engine work); the names, checks and verification stay these.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from glm45_train.rl.engines.model_files import WeightCheck

BUCKET_BYTES = 512 * 2**20


def write_buckets(
    tensors: Iterable[tuple[str, torch.Tensor]], check: WeightCheck, directory: Path, bucket_bytes: int = BUCKET_BYTES
) -> list[Path]:
    """Write the stream into `directory` (emptied first) as bucket files; their paths in stream order."""
    from safetensors.torch import save_file

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    files: list[Path] = []
    bucket: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal bucket, size
        path = directory / f"bucket-{len(files):05d}.safetensors"
        save_file(bucket, str(path))
        files.append(path)
        bucket, size = {}, 0

    for name, tensor in tensors:
        if check.is_mtp(name):
            continue
        check.take(name, tuple(tensor.shape))
        bucket[name] = tensor.detach().to("cpu").contiguous()
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes:
            flush()
    check.finish()
    if bucket:
        flush()
    return files
