"""Weight sync for RL: the live policy's weights as HF-named full tensors, streamed one tensor at a time.

    layout = SyncLayout.build(hf)                        # at TP=PP=EP=1, before the training layout exists
    trainer = build_trainer(recipe, ...)                 # any TP/PP/EP/ETP, sequence parallel, LoRA
    summary = SyncSummary()
    engine.update_weights(hf_weights(layout, trainer.model, dtype=torch.bfloat16, summary=summary))

Notable:
- Nothing here knows how Megatron shards a module. The torch_dist key space is layout-independent: the live
  model's sharded state dict (TE-style keys, as checkpoints are saved) gives each rank's chunks of every key,
  and `SyncLayout` holds which key regions make up each full TP=1 mcore tensor (reader.py's `model_tensor_pieces`,
  asked of a meta model at TP=PP=EP=1 -- hence built before the training layout is initialised). Names then go
  through the converters' table (`Glm45Mapping.to_hf`): the names and values `export --to-hf` writes.
- Gather: per bucket of consecutive tensors (BUCKET_BYTES, one collective each: the tiny model's 91 tensors in
  one), a zeros buffer into which each rank copies its main-replica chunks of every region (replica_id all
  zeros), then an all_reduce(SUM) over the world. Exactly one rank writes each byte and every other rank contributes
  zeros, so the buffer is summed as int32 words: a sum of integers without common set bits is their OR --
  bit-exact whatever the dtype (-0.0 and NaN payloads kept), on gloo and NCCL alike.
- Memory: one bucket (a larger tensor alone) at a time; every rank receives every tensor. That is simple and
  right at every layout; an all-reduce moves twice an all-gather's bytes, and broadcasting only to the ranks that
  feed an engine would move less again: the optimisations for large GPU runs.
- LoRA is merged on the local shards before the gather: W_local + delta_local in fp32, cast back to the weight's
  dtype (as lora/hf_export.py's `export_merged` merges), so every TP/EP split is handled by the adapters' own
  sharding. The model's parameters are never written; merged weights live only while their tensor is built.
- Coverage, never a silent drop: before any data moves, one all_reduce of per-key element counts checks that
  every checkpoint key of the layout is held exactly once (main replicas over all ranks) in one dtype and that
  no rank holds a key the layout lacks; while streaming, every HF name must be expected and new (else an error
  at once), and none may be missing at the end. Without an MTP block (RL: `train.mtp_loss_weight = 0`) the MTP
  layer's HF names are skipped and listed in the summary: the engine keeps the base model's MTP weights
  (transformers' Glm4MoeForCausalLM does not even build them).
- A collective: every rank must consume the iterator completely. Coverage and mapping errors are raised on all
  ranks alike; an exception in one rank's consumer leaves the others waiting in the next all_reduce.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from glm45_train.config.layout import ParallelLayout
from glm45_train.convert.mapping.table import Glm45Mapping
from glm45_train.convert.torch_dist.layout import current_layout, sharded_tensors, te_style_sharded_state_dict
from glm45_train.convert.torch_dist.reader import Piece, box_overlap, model_tensor_pieces
from glm45_train.lora import is_lora_name, iter_adapters
from glm45_train.model.hf_config import Glm45Config
from glm45_train.model.hf_layout import EXPERT_BIAS_KEY

DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)  # column len(DTYPES): any other dtype
BUCKET_BYTES = 256 * 2**20  # tensors gathered per collective (memory: one bucket, plus the tensor being renamed)


class WeightSyncError(RuntimeError):
    """A tensor the sync would drop, duplicate, or not know; the message names it."""


@dataclass(frozen=True)
class SyncLayout:
    """Which checkpoint-key regions make up each full TP=1 mcore tensor (model order), and its full shape."""

    hf: Glm45Config
    pieces: dict[str, tuple[Piece, ...]]
    shapes: dict[str, tuple[int, ...]]
    with_mtp: bool

    @classmethod
    def build(cls, hf: Glm45Config, *, with_mtp: bool = False) -> SyncLayout:
        """Needs Megatron's parallel state at TP=PP=EP=1: call before the training layout is initialised.
        `with_mtp` must say whether the trained model has its MTP block (RL builds none)."""
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized() or current_layout() != ParallelLayout():
            raise WeightSyncError(
                "SyncLayout.build runs at TP=PP=EP=1: call distributed.initialize(ParallelLayout()) before it "
                "and build the trainer (at its own layout) after it"
            )
        pieces, shapes = model_tensor_pieces(hf, with_mtp=with_mtp)
        return cls(hf, {name: tuple(parts) for name, parts in pieces.items()}, shapes, with_mtp)

    def keys(self) -> dict[str, tuple[int, ...]]:
        """Every checkpoint key with its global shape, in model order."""
        return {piece.key: piece.global_shape for parts in self.pieces.values() for piece in parts}


@dataclass
class SyncSummary:
    """Filled while `hf_weights` streams; complete once the iterator is exhausted."""

    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0  # first tensor asked for -> iterator exhausted (the consumer's loading included)
    gather_seconds: float = 0.0  # of which this module: collectives, LoRA merge, assembly, renaming
    skipped: tuple[str, ...] = ()  # HF names not synced: the MTP layer of a model built without it

    def metrics(self) -> dict[str, float]:
        """Flat scalars for metrics.jsonl / TensorBoard."""
        return {
            "sync_tensors": float(self.tensors),
            "sync_gib": self.bytes / 2**30,
            "sync_s": self.seconds,
            "sync_gather_s": self.gather_seconds,
        }


class HFCoverage:
    """Every expected HF name exactly once and nothing else; the MTP layer's names skipped without MTP."""

    def __init__(self, mapping: Glm45Mapping, with_mtp: bool) -> None:
        mtp = {name for rule in mapping.rules.values() if rule.mcore.startswith("mtp.") for name in rule.hf}
        self.skipped = set() if with_mtp else mtp | set(mapping.copies)
        self.expected = mapping.expected_hf_names() - self.skipped
        self.seen: set[str] = set()

    def add(self, hf_name: str) -> None:
        if hf_name in self.seen:
            raise WeightSyncError(f"weight sync: {hf_name} produced twice")
        if hf_name in self.skipped:
            raise WeightSyncError(f"weight sync: {hf_name} produced, but the sync layout has no MTP block")
        if hf_name not in self.expected:
            raise WeightSyncError(f"weight sync: {hf_name} is no tensor of the HF model")
        self.seen.add(hf_name)

    def finish(self) -> None:
        missing = sorted(self.expected - self.seen)
        if missing:
            shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
            raise WeightSyncError(f"weight sync: {len(missing)} HF tensor(s) never produced: {shown}")


def hf_weights(
    layout: SyncLayout, model: Any, *, dtype: torch.dtype | None = None, summary: SyncSummary | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every tensor of the HF model (the MTP layer only if `layout.with_mtp`), LoRA
    merged, on the model's device, in model order. A collective: call on every rank and consume the iterator
    completely on every rank (nothing moves before the first tensor is asked for).

    `model`: this rank's GPTModel, bare or wrapped (DDP). `dtype`: the engine's dtype (the expert bias stays fp32,
    as in HF checkpoints); None keeps the model's own dtype per tensor. `summary` is filled as tensors stream.
    """
    if not isinstance(layout, SyncLayout):
        raise TypeError(f"hf_weights(layout, model, ...): the first argument is a {type(layout).__name__}")
    summary = summary if summary is not None else SyncSummary()
    return _timed(_stream(_bare(model), layout, summary), dtype, summary)


def _timed(
    stream: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype | None, summary: SyncSummary
) -> Iterator[tuple[str, torch.Tensor]]:
    start = time.perf_counter()
    while True:
        began = time.perf_counter()
        item = next(stream, None)
        if item is not None:
            item = (item[0], _as(item[1], dtype, item[0]))
        summary.gather_seconds += time.perf_counter() - began
        if item is None:
            break
        summary.tensors += 1
        summary.bytes += item[1].numel() * item[1].element_size()
        yield item
    summary.seconds = time.perf_counter() - start


def _stream(model: Any, layout: SyncLayout, summary: SyncSummary) -> Iterator[tuple[str, torch.Tensor]]:
    mapping = Glm45Mapping(layout.hf, "local")
    coverage = HFCoverage(mapping, layout.with_mtp)
    summary.skipped = tuple(sorted(coverage.skipped))
    device = next(model.parameters()).device
    chunks = _local_chunks(model)
    dtypes = _check_keys(layout.keys(), chunks, device)
    merge = _LoraMerge(model)
    for bucket in _buckets(layout, dtypes):
        with torch.no_grad():
            tensors = _gather_bucket(bucket, layout, chunks, merge, dtypes, device)
        merge.release()
        for name in bucket:
            for hf_name, part in mapping.to_hf(name, tensors.pop(name)):
                for produced in (hf_name, *(mapping.copies_of.get(hf_name, []) if layout.with_mtp else [])):
                    coverage.add(produced)
                    yield produced, part
    coverage.finish()


def _bare(model: Any) -> Any:
    while not hasattr(model, "decoder") and hasattr(model, "module"):  # DDP / Float16Module wrappers
        model = model.module
    return model


def _as(tensor: torch.Tensor, dtype: torch.dtype | None, hf_name: str) -> torch.Tensor:
    if dtype is None or hf_name.endswith(EXPERT_BIAS_KEY):
        return tensor.contiguous()
    return tensor.to(dtype).contiguous()


# -- this rank's chunks and the coverage of keys ---------------------------------------------------------------


@dataclass(frozen=True)
class _Chunk:
    offset: tuple[int, ...]  # in the key's global shape (prepended axes included)
    view: torch.Tensor  # this rank's data: a view of a local parameter (or buffer)
    prepend_axes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (1,) * self.prepend_axes + tuple(self.view.shape)


def _local_chunks(model: Any) -> dict[str, list[_Chunk]]:
    """This rank's main-replica chunks of every checkpoint key (adapter tensors left out: they are merged)."""
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    chunks: dict[str, list[_Chunk]] = {}
    for sharded in sharded_tensors(te_style_sharded_state_dict(model, for_save=False)):
        if is_lora_name(sharded.key) or not is_main_replica(sharded.replica_id):
            continue
        if sharded.flattened_range is not None:
            raise WeightSyncError(f"weight sync: {sharded.key} is sharded flat (a distributed-optimizer layout)")
        chunk = _Chunk(tuple(sharded.global_offset), sharded.data.detach(), sharded.prepend_axis_num)
        chunks.setdefault(sharded.key, []).append(chunk)
    return chunks


def _check_keys(
    keys: dict[str, tuple[int, ...]], chunks: dict[str, list[_Chunk]], device: torch.device
) -> dict[str, torch.dtype]:
    """Each key's dtype, after checking (collectively) that main replicas hold every key exactly once."""
    index = {key: row for row, key in enumerate(keys)}
    counts = _held_elements(index, chunks)
    if dist.get_world_size() > 1:
        counts = counts.to(device)
        dist.all_reduce(counts)
        counts = counts.cpu()
    if counts[-1].sum() > 0:
        unknown = sorted(set(chunks) - set(index))
        where = f"e.g. {', '.join(unknown[:3])} on rank {dist.get_rank()}" if unknown else "on another rank"
        raise WeightSyncError(
            f"weight sync: the model holds checkpoint keys the sync layout lacks ({where}); "
            "was SyncLayout.build given the right config and with_mtp?"
        )
    return {key: _key_dtype(key, counts[row], math.prod(keys[key])) for key, row in index.items()}


def _held_elements(index: dict[str, int], chunks: dict[str, list[_Chunk]]) -> torch.Tensor:
    """counts[key, dtype]: elements this rank holds; the last row counts keys the layout lacks, the last column
    dtypes the sync does not support."""
    counts = torch.zeros(len(index) + 1, len(DTYPES) + 1, dtype=torch.int64)
    for key, parts in chunks.items():
        for chunk in parts:
            dtype = chunk.view.dtype
            column = DTYPES.index(dtype) if dtype in DTYPES else len(DTYPES)
            counts[index.get(key, len(index)), column] += math.prod(chunk.shape)
    return counts


def _key_dtype(key: str, counts: torch.Tensor, numel: int) -> torch.dtype:
    held = int(counts.sum())
    if held != numel:
        hint = "; does the model match SyncLayout.build's with_mtp?" if held == 0 else ""
        raise WeightSyncError(
            f"weight sync: checkpoint key {key} is held for {held} of its {numel} elements (main replicas, "
            f"all ranks){hint}"
        )
    columns = counts.nonzero().flatten().tolist()
    if len(columns) != 1 or columns[0] == len(DTYPES):
        raise WeightSyncError(f"weight sync: checkpoint key {key} is held in several or unsupported dtypes")
    return DTYPES[columns[0]]


# -- one full tensor ---------------------------------------------------------------------------------------------


def _buckets(layout: SyncLayout, dtypes: dict[str, torch.dtype]) -> Iterator[list[str]]:
    """Consecutive mcore tensors of about BUCKET_BYTES together (a larger tensor alone): one collective each."""
    bucket: list[str] = []
    size = 0
    for name, parts in layout.pieces.items():
        nbytes = math.prod(layout.shapes[name]) * dtypes[parts[0].key].itemsize
        if bucket and size + nbytes > BUCKET_BYTES:
            yield bucket
            bucket, size = [], 0
        bucket.append(name)
        size += nbytes
    if bucket:
        yield bucket


def _gather_bucket(
    names: list[str],
    layout: SyncLayout,
    chunks: dict[str, list[_Chunk]],
    merge: _LoraMerge,
    dtypes: dict[str, torch.dtype],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """The full TP=1 mcore tensors `names`, every region of every one of them gathered in one all_reduce."""
    regions = [(name, piece) for name in names for piece in layout.pieces[name]]
    words_of = [(math.prod(piece.chunk_shape) * dtypes[piece.key].itemsize + 3) // 4 for _, piece in regions]
    words = torch.zeros(sum(words_of), dtype=torch.int32, device=device)  # each region padded to whole words
    buffers, start = [], 0
    for (_, piece), count in zip(regions, words_of, strict=True):
        nbytes = math.prod(piece.chunk_shape) * dtypes[piece.key].itemsize
        buffer = words[start : start + count].view(torch.uint8)[:nbytes].view(dtypes[piece.key])
        buffers.append(buffer.view(piece.chunk_shape))
        _fill_region(piece, chunks.get(piece.key, []), merge, buffers[-1])
        start += count
    if dist.get_world_size() > 1:
        dist.all_reduce(words)  # an OR of the ranks' bytes: see the module docstring
    full = {name: torch.empty(layout.shapes[name], dtype=dtypes[layout.pieces[name][0].key], device=device)
            for name in names}  # fmt: skip
    for (name, piece), buffer in zip(regions, buffers, strict=True):
        full[name].as_strided(piece.size, piece.stride, piece.offset).copy_(buffer.view(piece.size))
    return full


def _fill_region(piece: Piece, chunks: list[_Chunk], merge: _LoraMerge, buffer: torch.Tensor) -> None:
    """This rank's main-replica bytes of the region; zeros elsewhere."""
    for chunk in chunks:
        overlap = box_overlap(piece.global_offset, piece.chunk_shape, chunk.offset, chunk.shape)
        if overlap is not None:
            data = merge.view(chunk.view)[(None,) * chunk.prepend_axes]
            buffer[overlap[0]] = data[overlap[1]]


class _LoraMerge:
    """Views of local weights with their adapter's delta merged (fp32, cast back), computed when first needed.

    Chunks are found by address, not by storage: Megatron's DDP may put many parameters in one buffer.
    """

    def __init__(self, model: Any) -> None:
        spans = []
        for adapter in iter_adapters(model):
            for param in adapter.base.parameters(recurse=False):
                if param.numel():
                    start = param.data_ptr()
                    spans.append((start, start + param.numel() * param.element_size(), param, adapter))
        self._spans = sorted(spans, key=lambda span: span[0])
        self._starts = [span[0] for span in self._spans]
        self._merged: dict[int, torch.Tensor | None] = {}

    def view(self, data: torch.Tensor) -> torch.Tensor:
        """`data` (a view of a local parameter), LoRA merged if that parameter is an adapted weight."""
        i = bisect.bisect_right(self._starts, data.data_ptr()) - 1
        if i < 0 or data.data_ptr() >= self._spans[i][1]:
            return data
        start, _, weight, adapter = self._spans[i]
        merged = self._merged_weight(weight, adapter)
        if merged is None:
            return data
        return merged.as_strided(data.shape, data.stride(), (data.data_ptr() - start) // data.element_size())

    def _merged_weight(self, weight: torch.nn.Parameter, adapter: Any) -> torch.Tensor | None:
        if id(weight) not in self._merged:
            self._merged[id(weight)] = None  # a base parameter the adapter does not change (a bias, a norm)
            for base, delta in adapter.delta_weights():
                if base is weight:
                    if not weight.is_contiguous():
                        raise WeightSyncError(f"weight sync: an adapted weight of {tuple(weight.shape)} is strided")
                    self._merged[id(weight)] = (weight.detach().float() + delta).to(weight.dtype)
                    break
        return self._merged[id(weight)]

    def release(self) -> None:
        self._merged.clear()
