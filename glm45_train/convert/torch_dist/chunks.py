"""Chunks of full model tensors for the torch_dist writers: converted once, sliced by checkpoint offsets.

A checkpoint stores each model tensor as chunks (TP/ETP shards, SwiGLU gate/up halves, one expert each).
`ChunkSource` converts a whole tensor once (TP=1 layout, e.g. from HF) the first time one of its chunks is asked
for, hands out the chunks (as views where the writer can take them, lazy_save.py / writer.py) and drops the full
tensor after its last chunk: memory holds the tensors in flight, never the model.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable, Iterable

import torch
from torch.distributed.checkpoint.planner import WriteItem

from glm45_train.convert.mapping.table import MappingError
from glm45_train.convert.torch_dist.layout import TensorIndex
from glm45_train.formats.buffers import BufferPool
from glm45_train.formats.progress import NullProgress, Progress

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
    streaming writer (writer.py) uses `acquire` / `region` / `done` to write chunks that are views of the
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
        nbytes = item_bytes(item)
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


def item_bytes(item: WriteItem) -> int:
    data = item.tensor_data
    assert data is not None
    return math.prod(data.chunk.sizes) * data.properties.dtype.itemsize
