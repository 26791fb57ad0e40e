"""Write a Megatron torch_dist checkpoint whose tensor data is produced only when the writer asks for it.

`megatron.core.dist_checkpointing.save` stays the entry point (factories, sharding validation, `common.pt`,
`metadata.json`); it is given `LazyTorchDistSaveStrategy` (backend torch_dist, version 1, so any Megatron loads
the result). That strategy converts the sharded state dict to a PyTorch-DCP state dict with megatron's own two
steps and calls `torch.distributed.checkpoint.save` with `LazySavePlanner`, whose `resolve_data` materialises each
write item on demand: the item's meta view names a model tensor (`TensorIndex`), `ChunkSource` converts that whole
tensor once (TP=1 layout, e.g. from HF), slices the item's chunk by the checkpoint's global offsets and drops the
full tensor after its last chunk. Memory: the tensors in flight, never the model. The storage writer is
`StreamingFileSystemWriter` (dcp_writer.py): it converts and writes at the same time, chunk views without copies.

Not megatron's default (async) torch_dist strategy: it resolves and preloads every item up front.
`_replace_state_dict_keys_with_sharded_keys` is private in megatron-core: pinned to 0.16.1 in pyproject.toml.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType

from glm45_train.convert.mapping import MappingError
from glm45_train.convert.pipeline import BufferPool
from glm45_train.convert.sharded_layout import TensorIndex
from glm45_train.convert.summary import NullProgress, Progress

FullTensor = Callable[[str], torch.Tensor]  # model tensor name (global experts, TP=1) -> full tensor


def chunk_region(full: torch.Tensor, offsets, sizes, global_size, name: str) -> torch.Tensor:
    """The region of `full` (a view, any strides) that the chunk at `offsets`/`sizes` of a checkpoint tensor of
    `global_size` covers, `full` being its trailing dims.

    Leading axes Megatron prepends (the expert index of `experts.experts.*`) have chunk size 1 and are not part
    of `full`; every other axis is sliced, which covers TP/ETP shards and the SwiGLU gate/up halves alike.
    """
    extra = len(sizes) - full.dim()
    if extra < 0 or tuple(global_size[extra:]) != tuple(full.shape) or any(s != 1 for s in sizes[:extra]):
        raise MappingError(
            f"{name}: converted shape {tuple(full.shape)} does not fit checkpoint tensor {tuple(global_size)}"
        )
    return full[tuple(slice(o, o + s) for o, s in zip(offsets[extra:], sizes[extra:], strict=True))]


def chunk_of(full: torch.Tensor, offsets, sizes, global_size, name: str) -> torch.Tensor:
    """The chunk itself, shaped as the checkpoint stores it (a copy when the region is not contiguous)."""
    return chunk_region(full, offsets, sizes, global_size, name).reshape(tuple(sizes))


class ChunkSource:
    """Chunks of full tensors for the writer; each full tensor is converted once and kept until its last chunk.

    Two ways to be asked: `chunk(view, item)` returns an independent chunk (DCP's `resolve_data` path), and the
    streaming writer (dcp_writer.py) uses `acquire` / `region` / `done` to write chunks that are views of the
    full tensor without copying. With a `BufferPool`, full tensors come from it and go back after their last chunk.
    """

    def __init__(
        self,
        index: TensorIndex,
        full_tensor: FullTensor,
        progress: Progress | None = None,
        pool: BufferPool | None = None,
    ) -> None:
        self.index, self.full_tensor = index, full_tensor
        self.progress = progress or NullProgress()
        self.pool = pool
        self._remaining: Counter[str] = Counter()
        self._cache: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.tensors_done = 0
        self.bytes_done = 0
        self.error: Exception | None = None

    def expect(self, views: Iterable[torch.Tensor]) -> None:
        """Announce the views that will be requested (one count per write item)."""
        self._remaining.update(self.index.name_of(view) for view in views)

    def chunk(self, view: torch.Tensor, item: WriteItem) -> torch.Tensor:
        """The chunk a write item asks for. Errors are raised in the main thread; DCP's extra writer threads
        would die silently, so there the error is recorded (`check_complete` raises it) and the remaining items
        get placeholders: the checkpoint is discarded anyway."""
        data = item.tensor_data
        assert data is not None
        if self.error is None:
            try:
                return self._chunk(view, item)
            except Exception as err:
                self.error = err
                if threading.current_thread() is threading.main_thread():
                    raise
        return torch.zeros(tuple(data.chunk.sizes), dtype=data.properties.dtype)

    def check_complete(self) -> None:
        """Raise the first error of any writer thread, or complain about chunks never written."""
        if self.error is not None:
            raise self.error
        unwritten = sorted(name for name, count in self._remaining.items() if count > 0)
        if unwritten:
            raise RuntimeError(f"the checkpoint writer skipped chunks of {len(unwritten)} tensor(s): {unwritten[:3]}")

    def _chunk(self, view: torch.Tensor, item: WriteItem) -> torch.Tensor:
        name = self.index.name_of(view)
        full = self.acquire(name)
        region = None
        try:
            region = self.region(full, view, item, name)
            return region.clone()  # DCP writes it after we return: it must not share pooled memory
        finally:
            self.done(name, full, item, region)

    def acquire(self, name: str) -> torch.Tensor:
        """The full tensor `name` (converted on first request; other threads keep writing meanwhile)."""
        with self._lock:
            if name not in self._cache:
                self._cache[name] = self.full_tensor(name)
            return self._cache[name]

    def region(self, full: torch.Tensor, view: torch.Tensor, item: WriteItem, name: str) -> torch.Tensor:
        """The item's chunk of `full`: a view when it is contiguous and of the item's dtype, else a copy."""
        data = item.tensor_data
        assert data is not None
        region = chunk_region(full, data.chunk.offsets, data.chunk.sizes, data.size, name)
        if region.numel() != view.numel():
            raise MappingError(f"{name}: chunk {tuple(data.chunk.sizes)} does not match its shard {tuple(view.shape)}")
        if region.is_contiguous() and region.dtype == data.properties.dtype:
            return region.view(tuple(data.chunk.sizes))
        copy = self._new(tuple(data.chunk.sizes), data.properties.dtype)
        copy.copy_(region.reshape(copy.shape))
        return copy

    def done(self, name: str, full: torch.Tensor, item: WriteItem, chunk: torch.Tensor | None = None) -> bool:
        """The item's chunk is written: account for it, free a copied chunk, drop `full` after its last chunk
        (returns whether it was the last)."""
        nbytes = _item_bytes(item)
        if chunk is not None and self.pool is not None and not _same_memory(chunk, full):
            self.pool.release(chunk)
        with self._lock:
            self.bytes_done += nbytes
            self._remaining[name] -= 1
            last = self._remaining[name] <= 0
            if last:
                self._cache.pop(name, None)
                self.tensors_done += 1
        self.progress.advance(nbytes)
        if last and self.pool is not None:
            self.pool.release(full)
        return last

    def _new(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self.pool.tensor(shape, dtype) if self.pool is not None else torch.empty(shape, dtype=dtype)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class LazySavePlanner(MCoreSavePlanner):
    """MCoreSavePlanner (objects written on every rank) whose tensor items come from a `ChunkSource`."""

    def __init__(self, chunks: ChunkSource) -> None:
        super().__init__(flatten_state_dict=False)
        self.chunks = chunks

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        plan = super().finish_plan(new_plan)
        tensor_items = [item for item in plan.items if item.type != WriteItemType.BYTE_IO]
        self.chunks.expect(self.lookup_object(item.index) for item in tensor_items)
        self.chunks.progress.start(sum(_item_bytes(item) for item in tensor_items))
        return plan

    def resolve_data(self, write_item: WriteItem) -> Any:
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        return self.chunks.chunk(self.lookup_object(write_item.index), write_item)


def _item_bytes(item: WriteItem) -> int:
    data = item.tensor_data
    assert data is not None
    return math.prod(data.chunk.sizes) * data.properties.dtype.itemsize


class LazyTorchDistSaveStrategy(SaveShardedStrategy):
    """A synchronous torch_dist (version 1) save strategy with lazily resolved tensor data."""

    def __init__(self, chunks: ChunkSource, thread_count: int = 2) -> None:
        super().__init__("torch_dist", 1)
        self.chunks, self.thread_count = chunks, thread_count

    def save(self, sharded_state_dict: dict[str, Any], checkpoint_dir: str | Path) -> None:
        by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
        pyt_state_dict = mcore_to_pyt_state_dict(by_key, is_loading=False)
        from glm45_train.convert.dcp_writer import StreamingFileSystemWriter  # it builds on ChunkSource

        writer = StreamingFileSystemWriter(checkpoint_dir, self.chunks, thread_count=self.thread_count)
        dcp.save(pyt_state_dict, storage_writer=writer, planner=LazySavePlanner(self.chunks))
        self.chunks.check_complete()

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True
