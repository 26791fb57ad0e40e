"""HF -> Megatron torch_dist, streaming: `hf_to_mcore(hf_dir, out_dir, layout=ParallelLayout(tp=2), dtype="bf16")`.

The Megatron-LM directory layout with Transformer-Engine-style keys. The reverse direction is to_hf.py; loading a
checkpoint into a built model is load.py.

`hf_to_mcore` validates the whole source first (index, shard headers, names, shapes) so bad input fails before
anything is written; MTP copies are compared with their sources while those are streamed (failing the conversion,
which leaves no output). It runs in one process or under torchrun at the requested layout: each rank builds its
part of the model on `meta` and writes only its own shards (torch_dist/lazy_save.py); rank 0 adds the metadata
and publishes the directory. The writer converts and writes at once, chunk views without copies, in bounded
memory (torch_dist/writer.py); FP8 sources are dequantised to bf16 as they are read (formats/fp8.py). Output is
written under a temporary name and renamed at the end (torch_dist/directory.py).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from glm45_train import __version__
from glm45_train.config.layout import ParallelLayout
from glm45_train.convert.sources import HFTensorSource
from glm45_train.convert.torch_dist.chunks import ChunkSource
from glm45_train.convert.torch_dist.directory import (
    ASSETS_DIR,
    RELEASE,
    check_output_dir,
    copy_assets,
    fresh_staging_dir,
    publish,
    staging_dir,
    write_metadata,
    write_tracker,
)
from glm45_train.convert.torch_dist.layout import (
    TensorIndex,
    build_meta_model,
    current_layout,
    te_style_sharded_state_dict,
)
from glm45_train.convert.torch_dist.lazy_save import LazyTorchDistSaveStrategy
from glm45_train.errors import UserError
from glm45_train.formats.buffers import BufferPool
from glm45_train.formats.fp8 import DequantisingReader
from glm45_train.formats.progress import ConversionSummary, NullProgress, Progress
from glm45_train.formats.safetensors_format import WEIGHT_DTYPES

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
CHECKPOINT_VERSION = 3.0  # Megatron-LM's current `checkpoint_version`


def hf_to_mcore(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    layout: ParallelLayout | None = None,
    dtype: str = "bf16",
    overwrite: bool = False,
    progress: Progress | None = None,
    thread_count: int = 2,
) -> ConversionSummary:
    """Convert an HF glm4_moe checkpoint into a Megatron-LM torch_dist checkpoint (every rank calls this)."""
    hf_dir, out_dir, layout = Path(hf_dir), Path(out_dir), layout or ParallelLayout()
    summary = ConversionSummary("hf->mcore", out_dir)
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    check_output_dir(out_dir, overwrite, source=hf_dir)
    pool = BufferPool()
    source, hf_dtypes = validated_hf_source(hf_dir, pool)
    _join_world(layout)
    model = build_meta_model(source.hf, DTYPES[dtype])
    chunks = ChunkSource(TensorIndex(model), source.get, progress, pool=pool)
    staging = _shared_staging_dir(out_dir)
    try:
        _save_release(model, chunks, staging / RELEASE, thread_count)
        if dist.get_rank() == 0:
            _write_mcore_extras(staging, hf_dir, dtype, layout, hf_dtypes, dequantized_from(source))
            publish(staging, out_dir)
        dist.barrier()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        (progress or NullProgress()).close()
    summary.tensors, summary.bytes = chunks.tensors_done, chunks.bytes_done
    summary.notes.extend(source_notes(hf_dtypes, _gathered(source.non_finite)))
    return _reduce_over_ranks(summary.finish())


def source_notes(hf_dtypes: dict[str, str], non_finite: dict[str, int]) -> list[str]:
    """What the user should know about the source: FP16 tensors (GLM-4.5 was released in BF16; fp16's range is
    narrower and its values were rounded differently) and tensors holding NaN or Inf (converted as they are)."""
    notes = []
    fp16 = sorted(name for name, dtype in hf_dtypes.items() if dtype == "F16")
    if fp16:
        notes.append(f"warning: {len(fp16)} source tensor(s) are F16 (e.g. {fp16[0]}): not the released BF16 weights")
    if non_finite:
        listed = ", ".join(f"{name} ({count})" for name, count in sorted(non_finite.items())[:5])
        more = f" and {len(non_finite) - 5} more" if len(non_finite) > 5 else ""
        notes.append(f"warning: NaN/Inf values in {len(non_finite)} tensor(s): {listed}{more}; converted as they are")
    return notes


def _gathered(counts: dict[str, int]) -> dict[str, int]:
    """Every rank's part of a per-tensor count (each rank reads the tensors it writes)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return counts
    parts: list[dict[str, int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, counts)
    return {name: count for part in parts for name, count in (part or {}).items()}


def validated_hf_source(hf_dir: Path, pool: BufferPool | None = None) -> tuple[HFTensorSource, dict[str, str]]:
    """The HF checkpoint as a tensor source, after checking everything that can be checked without its data
    (MTP copies are compared with their sources as those are read: a mismatch fails the conversion then).

    Returns the source and each tensor's safetensors dtype name.
    """
    # index, shards present, config (model_type), tensor names
    source = HFTensorSource(hf_dir, pool=pool, verify_copies=True)
    specs = source.reader.tensor_specs()  # every shard header: truncated files, tensors missing from a shard
    for name, (shape, dtype) in specs.items():
        if dtype not in WEIGHT_DTYPES:  # FP8 weights report BF16 (dequantised as read)
            raise UserError(
                f"{hf_dir}: tensor {name} is {dtype}; GLM-4.5 weights are floating point "
                f"({', '.join(WEIGHT_DTYPES)}, or FP8 with scales): not a checkpoint this converter can read back"
            )
        source.mapping.check_shape(name, torch.empty(shape, device="meta"))
    return source, {name: dtype for name, (_, dtype) in specs.items()}


def _join_world(layout: ParallelLayout) -> None:
    from glm45_train.runtime import distributed

    if layout.pp > 1:
        # megatron-core 0.16.1 all-reduces the MTP stage's embedding copy on CUDA while building the model.
        # The checkpoint does not depend on the layout it was written at: write at pp 1, load at any pp.
        raise UserError("writing at pp > 1 is not supported; torch_dist checkpoints reshard on load: use --pp 1")
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    try:
        layout.data_parallel_size(world)
    except ValueError as err:
        needed = layout.tp * layout.pp * layout.cp
        raise UserError(
            f"layout tp={layout.tp} pp={layout.pp} ep={layout.ep} cannot run on {world} process(es) ({err}); "
            f"launch with e.g. `torchrun --nproc-per-node {max(needed, layout.ep)} -m glm45_train.cli.main export ...`"
        ) from None
    from megatron.core import parallel_state

    if not (parallel_state.model_parallel_is_initialized() and current_layout() == layout):
        distributed.initialize(layout)  # (re)building Megatron's groups creates new gloo groups: only if needed


def _shared_staging_dir(out_dir: Path) -> Path:
    """Rank 0 creates the (fresh) staging directory; every rank gets the same path."""
    if dist.get_rank() == 0:
        fresh_staging_dir(out_dir)
    dist.barrier()
    return staging_dir(out_dir)


def _save_release(model: torch.nn.Module, chunks: ChunkSource, release_dir: Path, thread_count: int) -> None:
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    if dist.get_rank() == 0:
        release_dir.mkdir()
    dist.barrier()
    state = {
        "model": te_style_sharded_state_dict(model, for_save=True),
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": 0,
    }
    strategy = LazyTorchDistSaveStrategy(chunks, thread_count=thread_count)
    try:
        dist_checkpointing.save(
            state, str(release_dir), sharded_strategy=strategy, content_metadata={"singleton_local_shards": False}
        )
    except CheckpointException as err:
        user_errors = [exc for exc, _ in err.failures.values() if isinstance(exc, UserError)]
        if user_errors:
            raise user_errors[0] from None
        raise


def dequantized_from(source: HFTensorSource) -> str | None:
    """The FP8 scheme the source was dequantised from, if any."""
    return source.reader.scheme.name if isinstance(source.reader, DequantisingReader) else None


def _write_mcore_extras(
    staging: Path,
    hf_dir: Path,
    dtype: str,
    layout: ParallelLayout,
    hf_dtypes: dict[str, str],
    fp8_scheme: str | None,
) -> None:
    import megatron.core

    assets = copy_assets(hf_dir, staging / ASSETS_DIR)
    default_dtype = Counter(hf_dtypes.values()).most_common(1)[0][0]
    metadata: dict[str, Any] = {
        "glm45_train_version": __version__,
        "megatron_core_version": megatron.core.__version__,
        "source": {
            "path": str(hf_dir.resolve()),
            "config": json.loads((hf_dir / "config.json").read_text()),
            "files": assets,
        },
        "conversion": {
            "dtype": dtype,
            "layout": vars(layout),
            "keys": "transformer_engine",
            **({"dequantized_from": f"fp8 {fp8_scheme}"} if fp8_scheme else {}),
        },
        "hf_dtypes": {
            "default": default_dtype,
            "exceptions": {name: d for name, d in sorted(hf_dtypes.items()) if d != default_dtype},
        },
    }
    write_metadata(staging, metadata)
    write_tracker(staging)


def _reduce_over_ranks(summary: ConversionSummary) -> ConversionSummary:
    if dist.is_initialized() and dist.get_world_size() > 1:
        totals = torch.tensor([summary.tensors, summary.bytes], dtype=torch.int64)
        dist.all_reduce(totals)
        peak = torch.tensor([summary.peak_rss_bytes], dtype=torch.int64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        summary.tensors, summary.bytes = (int(v) for v in totals)
        summary.peak_rss_bytes = int(peak)
    return summary
