"""PyTorch DCP's `FileSystemReader` with every pickle it opens going through safe_pickle.py.

PyTorch's reader opens `.metadata` with bare `pickle.load`, and its default planner `torch.load`s object records
(`BytesStorageMetadata`: Megatron's ShardedObjects, e.g. the RNG state) with `weights_only=False`: either runs
code from a crafted checkpoint. `SafeFileSystemReader` parses `.metadata` with the allow-list (cached: DCP asks
for it several times), and reads every record itself with `safe_pickle.torch_load`, naming the `.distcp` file and
key when it refuses one: tensors are copied into the planner's tensor as PyTorch's reader does, objects are handed
over already built through `SafeObjectLoading.load_object`, a planner mixin (planners without it are refused, so
no record reaches `torch.load(weights_only=False)` through this reader).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from glm45_train.formats import safe_pickle
from glm45_train.formats.dcp_records import FileSlice


class SafeObjectLoading:
    """Mixin for a `DefaultLoadPlanner` subclass: objects arrive built (safely) instead of as bytes to torch.load."""

    def load_object(self, read_item: ReadItem, value: Any) -> None:
        planner: Any = self
        if planner.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes, minus its torch.load
            set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], value)
        else:
            planner.state_dict[read_item.dest_index.fqn] = value

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise TypeError("object records are read by SafeFileSystemReader and given to load_object, not as bytes")


class SafeFileSystemReader(FileSystemReader):
    """A DCP directory read without unrestricted unpickling; `.metadata` parsed once."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._metadata: dict[int | None, Metadata] = {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        if rank not in self._metadata:
            self._metadata[rank] = safe_pickle.load_dcp_metadata(Path(self._get_metadata_path(rank)))
        metadata = self._metadata[rank]
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # as FileSystemReader.read_metadata
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if not isinstance(planner, SafeObjectLoading):
            raise TypeError(f"SafeFileSystemReader needs a SafeObjectLoading planner, not {type(planner).__name__}")
        per_file: dict[str, list[ReadItem]] = {}
        for read_item in plan.items:
            per_file.setdefault(self.storage_data[read_item.storage_index].relative_path, []).append(read_item)
        for relative_path, requests in per_file.items():
            path = self.fs.concat_path(self.path, relative_path)
            with self.fs.create_stream(path, "rb") as stream:
                for request in requests:
                    self._read_item(stream, f"{path} (record {request.storage_index.fqn})", request, planner)
        future: Future[None] = Future()  # torch's Future (DCP waits on it)
        future.set_result(None)
        return future

    def _read_item(self, stream: Any, source: str, request: ReadItem, planner: Any) -> None:
        info = self.storage_data[request.storage_index]
        if info.transform_descriptors:  # DCP's storage extensions (compression, ...): decoded in memory
            view = self._slice_file(stream, info)
            record: Any = io.BytesIO(
                self.transforms.transform_load_stream(request, info.transform_descriptors, view).read()
            )
        else:  # positioned reads of the record (zipfile cannot read DCP's own file view)
            record = FileSlice(stream.fileno(), info.offset, info.length)
        value = safe_pickle.torch_load(record, source=source)
        if request.type == LoadItemType.BYTE_IO:
            planner.load_object(request, value)
            return
        tensor = narrow_tensor_by_index(value, request.storage_offsets, request.lengths)
        target = planner.resolve_tensor(request).detach()
        if target.size() != tensor.size():
            raise ValueError(f"{source}: holds {tuple(tensor.size())}, expected {tuple(target.size())}")
        target.copy_(tensor)
        planner.commit_tensor(request, target)
