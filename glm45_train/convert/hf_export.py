"""Megatron -> HF export: a torch_dist checkpoint (with glm45_train.json) to safetensors shards, streaming.

    mcore_to_hf(mcore_dir, out_dir)   HF shards + index + config + generation config + tokenizer (MTP copies too)

The calling thread reads one mcore tensor at a time (mcore_read.py) into a pooled buffer; writer threads put
each of its HF tensors' rows (`Glm45Mapping.row_runs`) straight at their planned offsets of shards whose headers
were fixed up front (hf_io.StreamingHFWriter). Bytes read but not yet written are bounded (pipeline.py), so
memory does not grow with the model. HF dtypes are the source's (recorded at import); a checkpoint imported from
an FP8 release exports as bf16 and its config.json loses `quantization_config`.
Output is written under a temporary name and renamed when complete (mcore_dir.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from glm45_train.convert.hf_io import StreamingHFWriter
from glm45_train.convert.mapping import Glm45Mapping, MappingError
from glm45_train.convert.mcore_dir import McoreCheckpointDir, check_output_dir, fresh_staging_dir, publish
from glm45_train.convert.mcore_read import McoreTensorSource
from glm45_train.convert.pipeline import BufferPool, ByteBudget, Workers
from glm45_train.convert.summary import ConversionSummary, NullProgress, Progress
from glm45_train.errors import UserError
from glm45_train.model.hf_layout import EXPERT_BIAS_KEY, hf_tensor_shapes

SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def mcore_to_hf(
    mcore_dir: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    progress: Progress | None = None,
    thread_count: int = 2,
    max_inflight_bytes: int = 512 * 2**20,
) -> ConversionSummary:
    """Export a Megatron checkpoint (with glm45_train.json) to HF safetensors in the source's dtypes.

    The calling thread reads one mcore tensor at a time into a pooled buffer; `thread_count` threads write its
    HF tensors' rows straight from it to their planned places in the shards (no intermediate tensors).
    """
    out_dir = Path(out_dir)
    progress = progress or NullProgress()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("exporting to HF runs in one process: launch it without torchrun")
    summary = ConversionSummary("mcore->hf", out_dir)
    check_output_dir(out_dir, overwrite, source=Path(mcore_dir))
    pool = BufferPool()
    source = McoreTensorSource(mcore_dir, pool=pool)
    mapping = Glm45Mapping(source.hf, "local")
    hf_dtype = _hf_dtype_lookup(source.directory.metadata)
    planned = [(name, shape, hf_dtype(name)) for name, shape in hf_tensor_shapes(source.hf)]
    staging = fresh_staging_dir(out_dir)
    try:
        writer = StreamingHFWriter(staging, planned, max_shard_bytes)
        progress.start(writer.total_bytes)
        try:
            summary.tensors = _stream_hf_weights(source, mapping, writer, progress, thread_count, max_inflight_bytes)
            writer.finish()
        finally:
            writer.close()
        _write_hf_extras(staging, source.directory)
        publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        progress.close()
    summary.bytes = writer.total_bytes
    return summary.finish()


def _stream_hf_weights(
    source: McoreTensorSource,
    mapping: Glm45Mapping,
    writer: StreamingHFWriter,
    progress: Progress,
    thread_count: int,
    max_inflight_bytes: int,
) -> int:
    """Every HF tensor (MTP copies included), read and written concurrently; returns how many were written."""
    budget = ByteBudget(max_inflight_bytes)
    copies_of: dict[str, list[str]] = {}
    for copy, original in mapping.copies.items():
        copies_of.setdefault(original, []).append(copy)
    written = []

    def write(job: tuple[str, torch.Tensor, int]) -> None:
        name, tensor, nbytes = job
        for hf_name, runs in mapping.row_runs(name):
            data = _as_dtype(tensor, writer.dtype(hf_name), source.pool)
            for target in (hf_name, *copies_of.get(hf_name, [])):
                for hf_row, mcore_row, rows in runs:
                    writer.write(target, data[mcore_row : mcore_row + rows], row=hf_row)
                progress.advance(writer.nbytes(target))
                written.append(target)
            if data is not tensor:
                _release(source.pool, data)
        _release(source.pool, tensor)
        budget.release(nbytes)

    with Workers(thread_count, write, budget) as workers:
        for name in source.names():
            expected = mapping.mcore_shape(name)  # also: an mcore tensor the table does not know is an error
            if source.shape(name) != expected:
                raise MappingError(f"{name}: checkpoint shape {source.shape(name)}, config.json implies {expected}")
            budget.acquire(source.nbytes(name))
            workers.submit((name, source.get(name), source.nbytes(name)))
    mapping.check_hf_names(written)
    return len(written)


def _as_dtype(tensor: torch.Tensor, dtype: torch.dtype, pool: BufferPool | None) -> torch.Tensor:
    if tensor.dtype == dtype:
        return tensor
    cast = pool.tensor(tensor.shape, dtype) if pool is not None else torch.empty(tensor.shape, dtype=dtype)
    return cast.copy_(tensor)


def _release(pool: BufferPool | None, tensor: torch.Tensor) -> None:
    if pool is not None:
        pool.release(tensor)


def _hf_dtype_lookup(metadata: dict[str, Any]):
    """HF name -> dtype the source stored it in (falls back to the config's dtype, fp32 for the expert bias)."""
    recorded = metadata.get("hf_dtypes")
    if recorded:
        default, exceptions = recorded["default"], recorded["exceptions"]
        return lambda name: SAFETENSORS_DTYPES[exceptions.get(name, default)]
    config = metadata["source"]["config"]
    config_dtype = getattr(torch, config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return lambda name: torch.float32 if name.endswith(EXPERT_BIAS_KEY) else config_dtype


def _write_hf_extras(staging: Path, directory: McoreCheckpointDir) -> None:
    """config.json, generation_config.json and tokenizer files carried from the source (or rebuilt)."""
    if directory.assets.is_dir():
        for path in directory.assets.iterdir():
            shutil.copy2(path, staging / path.name)
    config = directory.hf_config
    if directory.metadata.get("conversion", {}).get("dequantized_from"):  # the weights are bf16 now
        config = {key: value for key, value in config.items() if key != "quantization_config"}
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if not (staging / "config.json").exists():
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if not (staging / "generation_config.json").exists():
        generation = {"_from_model_config": True, "eos_token_id": config.get("eos_token_id")}
        if "pad_token_id" in config:
            generation["pad_token_id"] = config["pad_token_id"]
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
