"""Write a Megatron torch_dist checkpoint whose tensor data is produced only when the writer asks for it.

`megatron.core.dist_checkpointing.save` stays the entry point (factories, sharding validation, `common.pt`,
`metadata.json`); it is given `LazyTorchDistSaveStrategy` (backend torch_dist, version 1, so any Megatron loads
the result). That strategy converts the sharded state dict to a PyTorch-DCP state dict with megatron's own two
steps and calls `torch.distributed.checkpoint.save` with `LazySavePlanner`, whose `resolve_data` materialises each
write item on demand: the item's meta view names a model tensor (`TensorIndex`), `ChunkSource` converts that whole
tensor once (TP=1 layout, e.g. from HF), slices the item's chunk by the checkpoint's global offsets and drops the
full tensor after its last chunk (chunks.py). Memory: the tensors in flight, never the model. The storage writer
is `StreamingFileSystemWriter` (writer.py): it converts and writes at the same time, chunk views without copies.

Not megatron's default (async) torch_dist strategy: it resolves and preloads every item up front.
`_replace_state_dict_keys_with_sharded_keys` is private in megatron-core: pinned to 0.16.1 in pyproject.toml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType

from glm45_train.convert.torch_dist.chunks import ChunkSource, item_bytes
from glm45_train.convert.torch_dist.writer import StreamingFileSystemWriter


class LazySavePlanner(MCoreSavePlanner):
    """MCoreSavePlanner (objects written on every rank) whose tensor items come from a `ChunkSource`."""

    def __init__(self, chunks: ChunkSource) -> None:
        super().__init__(flatten_state_dict=False)
        self.chunks = chunks

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        plan = super().finish_plan(new_plan)
        tensor_items = [item for item in plan.items if item.type != WriteItemType.BYTE_IO]
        self.chunks.expect(self.lookup_object(item.index) for item in tensor_items)
        self.chunks.progress.start(sum(item_bytes(item) for item in tensor_items))
        return plan

    def resolve_data(self, write_item: WriteItem) -> Any:
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        return self.chunks.chunk(self.lookup_object(write_item.index), write_item)


class LazyTorchDistSaveStrategy(SaveShardedStrategy):
    """A synchronous torch_dist (version 1) save strategy with lazily resolved tensor data."""

    def __init__(self, chunks: ChunkSource, thread_count: int = 2) -> None:
        super().__init__("torch_dist", 1)
        self.chunks, self.thread_count = chunks, thread_count

    def save(self, sharded_state_dict: dict[str, Any], checkpoint_dir: str | Path) -> None:
        by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
        pyt_state_dict = mcore_to_pyt_state_dict(by_key, is_loading=False)
        writer = StreamingFileSystemWriter(checkpoint_dir, self.chunks, thread_count=self.thread_count)
        dcp.save(pyt_state_dict, storage_writer=writer, planner=LazySavePlanner(self.chunks))
        self.chunks.check_complete()

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True
