"""A PyTorch-DCP storage writer that converts and writes at the same time, in bounded memory.

`StreamingFileSystemWriter` is DCP's `FileSystemWriter` (same planning, same `.distcp` files of `torch.save`
records, same `.metadata`, written last under a temporary name) except for `write_data`:
- the calling thread walks the plan one model tensor at a time: it converts the full tensor into a pooled buffer
  (`ChunkSource.acquire`, e.g. reading HF rows straight into place) and queues that tensor's chunks, which are
  views of it whenever the chunk is contiguous;
- `thread_count` writer threads each append records to their own file (`write_record`: torch.save with zlib's CRC32,
  into direct_io.Appender: O_DIRECT blocks, no page cache);
  a tensor's buffer goes back to the pool after its last chunk is written;
- a byte budget bounds what has been read but not written, so memory does not depend on the model size.
DCP's stock writer instead resolves items one at a time on each thread with `torch.save` + miniz's CRC (CPU-bound
at ~0.3-0.4 GB/s here) and cannot overlap conversion with writing.
"""

from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from glm45_train.convert.torch_dist.chunks import ChunkSource
from glm45_train.formats.buffers import ByteBudget, Workers
from glm45_train.formats.dcp_records import crc32_off, write_record
from glm45_train.formats.direct_io import Appender

SUFFIX = ".distcp"


@dataclass
class _Job:
    name: str
    item: WriteItem
    full: torch.Tensor
    chunk: torch.Tensor
    nbytes: int  # budget held for this chunk's copy (0 for a view); the full tensor's goes with its last chunk


class _Files:
    """One output file per writer thread, opened on the thread's first record (O_DIRECT appends)."""

    def __init__(self, directory: Path, prefix: str, first_index: int) -> None:
        self.directory, self.prefix, self.next_index = directory, prefix, first_index
        self.opened: list[tuple[str, Appender]] = []
        self._local = threading.local()
        self._lock = threading.Lock()

    def current(self) -> tuple[str, Appender]:
        if not hasattr(self._local, "file"):
            with self._lock:
                name = f"{self.prefix}{self.next_index}{SUFFIX}"
                self.next_index += 1
                self._local.file = (name, Appender(self.directory / name))
                self.opened.append(self._local.file)
        return self._local.file

    def close(self, sync: bool) -> None:
        for _, stream in self.opened:
            stream.close(sync=sync)


class StreamingFileSystemWriter(FileSystemWriter):
    """See the module docstring. `max_inflight_bytes` bounds converted-but-unwritten data (one larger tensor
    is let through alone)."""

    def __init__(
        self,
        path: str | Path,
        chunks: ChunkSource,
        thread_count: int = 2,
        max_inflight_bytes: int = 512 * 2**20,
    ) -> None:
        super().__init__(str(path), thread_count=thread_count, sync_files=True, overwrite=False)
        self.chunks, self.max_inflight_bytes = chunks, max_inflight_bytes
        self._results: list[WriteResult] = []

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        self._results = []
        directory, prefix = Path(self.path), plan.storage_data.prefix
        with crc32_off():
            self._write_objects(directory / f"{prefix}0{SUFFIX}", f"{prefix}0{SUFFIX}", plan.items, planner)
            files = _Files(directory, prefix, first_index=1)
            try:
                self._write_tensors(plan.items, planner, files)
            finally:
                files.close(sync=self.sync_files)
        future: Future[list[WriteResult]] = Future()
        future.set_result(list(self._results))
        return future

    def _write_objects(self, path: Path, name: str, items: list[WriteItem], planner: SavePlanner) -> None:
        """Non-tensor items (Megatron's ShardedObjects) in one file of their own, written by this thread."""
        with open(path, "wb") as stream:
            for item in items:
                if item.type == WriteItemType.BYTE_IO:
                    data = planner.resolve_data(item)
                    assert isinstance(data, io.BytesIO)
                    offset = stream.tell()
                    stream.write(data.getbuffer())
                    self._record(item, name, offset, stream.tell() - offset)
            stream.flush()
            os.fsync(stream.fileno())

    def _write_tensors(self, items: list[WriteItem], planner: SavePlanner, files: _Files) -> None:
        groups = self._groups([item for item in items if item.type != WriteItemType.BYTE_IO], planner)
        budget = ByteBudget(self.max_inflight_bytes)

        def write(job: _Job) -> None:
            file_name, stream = files.current()
            offset, length = write_record(stream, job.chunk)
            self._record(job.item, file_name, offset, length)
            last = self.chunks.done(job.name, job.full, job.item, job.chunk)
            budget.release(job.nbytes + (_nbytes(job.full) if last else 0))

        with Workers(self.thread_count, write, budget) as workers:
            for name, members in groups.items():
                # Converted first, then accounted (with its chunk copies) before any of it is queued: memory is
                # at most the budget plus one tensor, and a tensor larger than the budget cannot deadlock.
                full = self.chunks.acquire(name)
                chunks = [self.chunks.region(full, view, item, name) for item, view in members]
                copies = [0 if _same_memory(chunk, full) else _nbytes(chunk) for chunk in chunks]
                budget.acquire(_nbytes(full) + sum(copies))
                for (item, _), chunk, extra in zip(members, chunks, copies, strict=True):
                    workers.submit(_Job(name, item, full, chunk, extra))

    def _groups(self, items: list[WriteItem], planner: SavePlanner) -> dict[str, list[tuple[WriteItem, torch.Tensor]]]:
        """Items by model tensor, tensors in model order (which follows the HF files' layer order)."""
        order = {name: i for i, name in enumerate(self.chunks.index.tensors)}
        groups: dict[str, list[tuple[WriteItem, torch.Tensor]]] = {}
        lookup = cast(DefaultSavePlanner, planner).lookup_object
        for item in items:
            view = lookup(item.index)
            groups.setdefault(self.chunks.index.name_of(view), []).append((item, view))
        return dict(sorted(groups.items(), key=lambda pair: order[pair[0]]))

    def _record(self, item: WriteItem, file_name: str, offset: int, length: int) -> None:
        info = _StorageInfo(relative_path=file_name, offset=offset, length=length)
        self._results.append(WriteResult(index=item.index, size_in_bytes=length, storage_data=info))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
