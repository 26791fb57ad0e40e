"""Write a Megatron torch_dist checkpoint whose tensor data is produced only when the writer asks for it.

`megatron.core.dist_checkpointing.save` stays the entry point (factories, sharding validation, `common.pt`,
`metadata.json`); it is given `LazyTorchDistSaveStrategy` (backend torch_dist, version 1, so any Megatron loads
the result). That strategy converts the sharded state dict to a PyTorch-DCP state dict with megatron's own two
steps and calls `torch.distributed.checkpoint.save` with `LazySavePlanner`, whose `resolve_data` materialises each
write item on demand: the item's meta view names a model tensor (`TensorIndex`), `ChunkSource` converts that whole
tensor once (TP=1 layout, e.g. from HF), slices the item's chunk by the checkpoint's global offsets and drops the
full tensor after its last chunk. Memory: the tensors in flight, never the model.

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
from glm45_train.convert.sharded_layout import TensorIndex
from glm45_train.convert.summary import NullProgress, Progress

FullTensor = Callable[[str], torch.Tensor]  # model tensor name (global experts, TP=1) -> full tensor


def chunk_of(full: torch.Tensor, offsets, sizes, global_size, name: str) -> torch.Tensor:
    """The chunk at `offsets`/`sizes` of a checkpoint tensor of `global_size` whose trailing dims are `full`.

    Leading axes Megatron prepends (the expert index of `experts.experts.*`) have chunk size 1 and are not part
    of `full`; every other axis is sliced, which covers TP/ETP shards and the SwiGLU gate/up halves alike.
    """
    extra = len(sizes) - full.dim()
    if extra < 0 or tuple(global_size[extra:]) != tuple(full.shape) or any(s != 1 for s in sizes[:extra]):
        raise MappingError(
            f"{name}: converted shape {tuple(full.shape)} does not fit checkpoint tensor {tuple(global_size)}"
        )
    region = full[tuple(slice(o, o + s) for o, s in zip(offsets[extra:], sizes[extra:], strict=True))]
    return region.reshape(tuple(sizes))


class ChunkSource:
    """Chunks of full tensors for the writer; each full tensor is converted once and kept until its last chunk."""

    def __init__(self, index: TensorIndex, full_tensor: FullTensor, progress: Progress | None = None) -> None:
        self.index, self.full_tensor = index, full_tensor
        self.progress = progress or NullProgress()
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
        data = item.tensor_data
        assert data is not None
        full = self._acquire(name)
        try:
            chunk = chunk_of(full, data.chunk.offsets, data.chunk.sizes, data.size, name)
        finally:
            self._release(name)
        if chunk.numel() != view.numel():
            raise MappingError(f"{name}: chunk {tuple(chunk.shape)} does not match its shard {tuple(view.shape)}")
        chunk = chunk.to(data.properties.dtype)
        nbytes = chunk.numel() * chunk.element_size()
        with self._lock:
            self.bytes_done += nbytes
        self.progress.advance(nbytes)
        return chunk

    def _acquire(self, name: str) -> torch.Tensor:
        # Converting under the lock keeps one tensor per name; other threads keep writing meanwhile.
        with self._lock:
            if name not in self._cache:
                self._cache[name] = self.full_tensor(name)
            return self._cache[name]

    def _release(self, name: str) -> None:
        with self._lock:
            self._remaining[name] -= 1
            if self._remaining[name] <= 0:
                self._cache.pop(name, None)
                self.tensors_done += 1


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
        writer = dcp.FileSystemWriter(str(checkpoint_dir), thread_count=self.thread_count)
        dcp.save(pyt_state_dict, storage_writer=writer, planner=LazySavePlanner(self.chunks))
        self.chunks.check_complete()

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True
