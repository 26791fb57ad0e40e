"""Megatron -> HF export: a torch_dist checkpoint (with glm45_train.json) to safetensors shards, streaming.

    mcore_to_hf(mcore_dir, out_dir)   HF shards + index + config + generation config + tokenizer (MTP copies too)

The calling thread reads one mcore tensor at a time (torch_dist/reader.py) into a pooled buffer; writer threads put
each of its HF tensors' rows (`Glm45Mapping.row_runs`) straight at their planned offsets of shards whose headers
were fixed up front (hf_io.StreamingHFWriter). Bytes read but not yet written are bounded (formats/buffers.py), so
memory does not grow with the model. HF dtypes are the source's (recorded at import); a checkpoint imported from
an FP8 release exports as bf16 and its config.json loses `quantization_config`.
Output is written under a temporary name and renamed when complete (torch_dist/directory.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from glm45_train.convert.mapping.table import Glm45Mapping, MappingError
from glm45_train.convert.torch_dist.directory import McoreCheckpointDir, check_output_dir, fresh_staging_dir, publish
from glm45_train.convert.torch_dist.reader import McoreTensorSource
from glm45_train.errors import UserError
from glm45_train.formats.buffers import BufferPool, ByteBudget, Workers, read_ahead
from glm45_train.formats.hf_io import StreamingHFWriter
from glm45_train.formats.progress import ConversionSummary, NullProgress, Progress
from glm45_train.formats.safetensors_format import WEIGHT_DTYPES
from glm45_train.model.hf_layout import EXPERT_BIAS_KEY, hf_tensor_shapes


def mcore_to_hf(
    mcore_dir: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    progress: Progress | None = None,
    max_inflight_bytes: int = 512 * 2**20,
) -> ConversionSummary:
    """Export a Megatron checkpoint (with glm45_train.json) to HF safetensors in the source's dtypes.

    The calling thread reads one mcore tensor at a time into a pooled buffer; a writer thread appends its HF
    tensors' rows straight from it to the shards, which are planned in exactly that order (no intermediate
    tensors, sequential O_DIRECT writes).
    """
    out_dir = Path(out_dir)
    progress = progress or NullProgress()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("exporting to HF runs in one process: launch it without torchrun")
    summary = ConversionSummary("mcore->hf", out_dir)
    check_output_dir(out_dir, overwrite, source=Path(mcore_dir))
    pool = BufferPool()
    run = McoreTensorSource(mcore_dir, pool=pool)
    mapping = Glm45Mapping(run.hf, "local")
    source: McoreTensorSource | MtpFromBase = run
    if MtpFromBase.needed(run):
        source = MtpFromBase(run, mapping)
        summary.notes.append(source.note)
    hf_dtype, shapes = _hf_dtype_lookup(source.directory.metadata), dict(hf_tensor_shapes(source.hf))
    order = _production_order(source, mapping)
    mapping.check_hf_names(order)
    staging = fresh_staging_dir(out_dir)
    try:
        planned = [(name, shapes[name], hf_dtype(name)) for name in order]
        writer = StreamingHFWriter(staging, planned, max_shard_bytes, sequential=True)
        progress.start(writer.total_bytes)
        try:
            summary.tensors = _stream_hf_weights(source, mapping, writer, progress, max_inflight_bytes)
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


class MtpFromBase:
    """A full-SFT run trained without the MTP loss (train.mtp_loss_weight = 0) built no MTP block and saved no MTP
    tensors. Its export takes them from the model the run started from, unchanged, so the exported checkpoint
    keeps the release's MTP layer (for speculative decoding) instead of silently losing it."""

    def __init__(self, run: McoreTensorSource, mapping: Glm45Mapping) -> None:
        base = Path(run.directory.metadata["training"]["base"])
        if not base.exists():
            raise UserError(
                f"{run.directory.root} was trained without its MTP layer; the export takes that layer from the "
                f"base model {base}, which no longer exists"
            )
        from glm45_train.convert.sources import open_source

        self.run, self.base, self.mapping = run, open_source(base, pool=run.pool), mapping
        self.hf, self.pool, self.directory = run.hf, run.pool, run.directory
        self.from_base = [name for name in mapping.rules if name.startswith("mtp.")]
        self.note = f"MTP not trained (train.mtp_loss_weight = 0): its {len(self.from_base)} tensors are {base}'s"

    @staticmethod
    def needed(source: McoreTensorSource) -> bool:
        return source.hf.num_nextn_predict_layers > 0 and not source.has_mtp

    def names(self) -> list[str]:
        return self.run.names() + self.from_base

    def shape(self, name: str) -> tuple[int, ...]:
        return self.run.shape(name) if name not in self.from_base else tuple(self.mapping.mcore_shape(name))

    def nbytes(self, name: str) -> int:
        if name not in self.from_base:
            return self.run.nbytes(name)
        return math.prod(self.shape(name)) * torch.float32.itemsize  # a bound: the base's dtype is not known yet

    def get(self, name: str) -> torch.Tensor:
        return self.run.get(name) if name not in self.from_base else self.base.get(name)


def _production_order(source: McoreTensorSource | MtpFromBase, mapping: Glm45Mapping) -> list[str]:
    """HF names in the order the export produces them: per mcore tensor, its parts each followed by its copies."""
    order = []
    for name in source.names():
        for hf_name, _ in mapping.row_runs(name):  # an mcore tensor the table does not know is an error here
            order += [hf_name, *mapping.copies_of.get(hf_name, [])]
    return order


def _stream_hf_weights(
    source: McoreTensorSource | MtpFromBase,
    mapping: Glm45Mapping,
    writer: StreamingHFWriter,
    progress: Progress,
    max_inflight_bytes: int,
) -> int:
    """Every HF tensor (MTP copies included), read and written concurrently; returns how many were written."""
    budget = ByteBudget(max_inflight_bytes)
    written = []

    def write(job: tuple[str, torch.Tensor, int]) -> None:
        name, tensor, nbytes = job
        as_dtype = {tensor.dtype: tensor}  # the mcore tensor in each HF dtype its parts need (usually its own)
        for hf_name, runs in mapping.row_runs(name):
            dtype = writer.dtype(hf_name)
            if dtype not in as_dtype:
                as_dtype[dtype] = _new(source.pool, tensor.shape, dtype).copy_(tensor)
            for target in (hf_name, *mapping.copies_of.get(hf_name, [])):
                for _, mcore_row, rows in sorted(runs):  # the HF tensor's rows, front to back
                    writer.append(target, as_dtype[dtype][mcore_row : mcore_row + rows])
                progress.advance(writer.nbytes(target))
                written.append(target)
        for data in as_dtype.values():
            _release(source.pool, data)
        budget.release(nbytes)

    names = source.names()
    for name in names:
        expected = mapping.mcore_shape(name)
        if source.shape(name) != expected:
            raise MappingError(f"{name}: checkpoint shape {source.shape(name)}, config.json implies {expected}")
    with Workers(1, write, budget) as workers:  # one writer: the shards are appended in order
        for job in read_ahead(names, source.get, source.nbytes, budget):
            workers.submit(job)
    return len(written)


def _new(pool: BufferPool | None, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    return pool.tensor(shape, dtype) if pool is not None else torch.empty(shape, dtype=dtype)


def _release(pool: BufferPool | None, tensor: torch.Tensor) -> None:
    if pool is not None:
        pool.release(tensor)


def _hf_dtype_lookup(metadata: dict[str, Any]):
    """HF name -> dtype the source stored it in (falls back to the config's dtype, fp32 for the expert bias)."""
    recorded = metadata.get("hf_dtypes")
    if recorded:
        default, exceptions = recorded["default"], recorded["exceptions"]
        return lambda name: WEIGHT_DTYPES[exceptions.get(name, default)]
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
