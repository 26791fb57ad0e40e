"""Hugging Face checkpoint files: sharded safetensors reading and writing, one tensor (or a few rows) at a time.

Reading (`HFCheckpointReader`) parses each shard's header once and reads a tensor's rows into a caller's buffer
(`read_into`, through direct_io.py: O_DIRECT where possible), casting only when the caller asks for another
dtype. No file is memory-mapped and none is kept open between reads.

Writing comes in two forms, both producing `model-0000i-of-0000N.safetensors` shards plus
`model.safetensors.index.json`, written under temporary names and renamed only in `finish()` (index last), so an
interrupted write never leaves something that looks like a complete checkpoint:
- `StreamingHFWriter(dir, planned tensors)`: shard headers computed up front; tensors (or row ranges of them)
  arrive in any order from any thread and go straight to their offsets. Memory: nothing buffered.
- `HFCheckpointWriter(dir)`: `add()` tensors of unknown count; a shard is buffered until full (small models).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch

from glm45_train.errors import UserError
from glm45_train.formats import direct_io
from glm45_train.formats import safetensors_format as st

INDEX_NAME = "model.safetensors.index.json"
Planned = tuple[str, tuple[int, ...], torch.dtype]  # name, shape, dtype


class CheckpointError(UserError, RuntimeError):
    """A checkpoint directory that is incomplete, inconsistent or unreadable."""


class TensorReader(Protocol):
    """What reads an HF checkpoint: `HFCheckpointReader`, or fp8.DequantisingReader over one."""

    directory: Path
    weight_map: dict[str, str]

    def names(self) -> list[str]: ...

    def tensor_specs(self) -> dict[str, tuple[tuple[int, ...], str]]: ...

    def shape_and_dtype(self, name: str) -> tuple[tuple[int, ...], str]: ...

    def torch_dtype(self, name: str) -> torch.dtype: ...

    def read_into(self, name: str, out: torch.Tensor, row: int = 0) -> None: ...

    def get(self, name: str) -> torch.Tensor: ...


class HFCheckpointReader:
    """Tensor names, shapes and data of a (sharded) safetensors checkpoint directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._headers: dict[str, dict[str, st.Entry]] = {}
        self._lock = threading.Lock()
        self.weight_map = self._read_weight_map()

    def _read_weight_map(self) -> dict[str, str]:
        index = self.directory / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
            missing = sorted({f for f in weight_map.values() if not (self.directory / f).exists()})
            if missing:
                raise CheckpointError(f"{index}: lists shard(s) that do not exist: {', '.join(missing)}")
            return dict(weight_map)
        single = self.directory / "model.safetensors"
        if not single.exists():
            raise CheckpointError(f"{self.directory}: no {INDEX_NAME} and no model.safetensors")
        return dict.fromkeys(self._header(single.name), single.name)

    def _header(self, filename: str) -> dict[str, st.Entry]:
        with self._lock:
            header = self._headers.get(filename)
        if header is None:
            path = self.directory / filename
            try:
                header = st.read_header(path)
            except (st.FormatError, OSError) as err:
                raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None
            with self._lock:
                self._headers[filename] = header
        return header

    def entry(self, name: str) -> st.Entry:
        """Where tensor `name` lies in its shard (raises naming the tensor or the shard)."""
        filename = self.weight_map.get(name)
        if filename is None:
            raise CheckpointError(f"{self.directory}: no tensor named {name}")
        found = self._header(filename).get(name)
        if found is None:
            raise CheckpointError(f"{self.directory / filename}: lacks tensor {name} listed in {INDEX_NAME}")
        return found

    def names(self) -> list[str]:
        return list(self.weight_map)

    def tensor_specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Shape and dtype name of every tensor, reading each shard's header once (which also validates it:
        a truncated file, or a tensor the index lists but its shard lacks, is an error naming both)."""
        entries = {name: self.entry(name) for name in self.weight_map}
        return {name: (entry.shape, entry.dtype) for name, entry in entries.items()}

    def shape_and_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        entry = self.entry(name)
        return entry.shape, entry.dtype

    def torch_dtype(self, name: str) -> torch.dtype:
        return self.entry(name).torch_dtype

    def read_into(self, name: str, out: torch.Tensor, row: int = 0) -> None:
        """Rows [row, row + len(out)) of tensor `name` into the contiguous tensor `out` (cast to its dtype).

        For a 0-d or 1-d tensor a "row" is one element. Only those bytes are read.
        """
        entry = self.entry(name)
        rows = out.shape[0] if out.dim() else 1
        if tuple(out.shape[1:]) != entry.shape[1:] or row + rows > (entry.shape[0] if entry.shape else 1):
            raise CheckpointError(
                f"{name}: cannot read rows {row}..{row + rows} of shape {list(entry.shape)} into {list(out.shape)}"
            )
        target = out if out.dtype == entry.torch_dtype else torch.empty(out.shape, dtype=entry.torch_dtype)
        path = self.directory / self.weight_map[name]
        try:
            direct_io.read_into(path, entry.start + row * entry.row_bytes, target)
        except (OSError, EOFError) as err:
            raise CheckpointError(f"{path}: cannot read tensor {name} ({err})") from None
        if target is not out:
            out.copy_(target)

    def get(self, name: str) -> torch.Tensor:
        entry = self.entry(name)
        out = torch.empty(entry.shape, dtype=entry.torch_dtype)
        self.read_into(name, out)
        return out

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.weight_map:
            yield name, self.get(name)


def plan_shards(planned: Sequence[Planned], max_shard_bytes: int) -> list[list[Planned]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor gets a shard alone)."""
    shards: list[list[Planned]] = [[]]
    size = 0
    for item in planned:
        nbytes = math.prod(item[1]) * item[2].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    return [shard for shard in shards if shard]


def _partial_name(i: int) -> str:
    return f".shard-{i:05d}.safetensors.partial"


def _publish_shards(directory: Path, shard_names: list[list[str]], total_bytes: int) -> list[str]:
    """Give the written `.partial` shards their final names, then write the index (last)."""
    count, weight_map, filenames = len(shard_names), {}, []
    for i, names in enumerate(shard_names, start=1):
        filename = f"model-{i:05d}-of-{count:05d}.safetensors"
        path = directory / _partial_name(i)
        os.chmod(path, 0o644)
        os.replace(path, directory / filename)
        weight_map.update(dict.fromkeys(names, filename))
        filenames.append(filename)
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return filenames


class StreamingHFWriter:
    """Shards whose headers are fixed up front, written one tensor (or row range) at a time.

    Positioned mode (default): `write(name, rows, row)` puts rows at their planned offset, in any order, from any
    thread (buffered `pwrite`). Sequential mode: `append(name, rows)` takes the planned tensors' bytes in plan
    order from one thread and streams each shard front to back through direct_io.Appender (O_DIRECT): plan the
    tensors in the order you produce them.
    """

    def __init__(
        self,
        directory: str | Path,
        planned: Sequence[Planned],
        max_shard_bytes: int = 5 * 2**30,
        sequential: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.sequential = sequential
        self._shards = plan_shards(planned, max_shard_bytes)
        self._headers: list[bytes] = []
        self._where: dict[str, tuple[int, st.Entry]] = {}  # name -> (shard index, entry)
        self._remaining: dict[str, int] = {}
        self._lock = threading.Lock()
        self.total_bytes = 0
        for i, shard in enumerate(self._shards):
            header, entries = st.encode_header(shard)
            self._headers.append(header)
            for name, entry in entries.items():
                self._where[name] = (i, entry)
                self._remaining[name] = entry.end - entry.start
                self.total_bytes += entry.end - entry.start
        self._order = [name for shard in self._shards for name, _, _ in shard]
        self._cursor = 0  # sequential mode: the planned tensor being appended
        self._appender: direct_io.Appender | None = None
        self._fds = [] if sequential else [self._open_positioned(i) for i in range(len(self._shards))]

    def _open_positioned(self, i: int) -> int:
        fd = os.open(self.directory / _partial_name(i + 1), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(fd, self._headers[i], 0)
        return fd

    def dtype(self, name: str) -> torch.dtype:
        return self._where[name][1].torch_dtype

    def nbytes(self, name: str) -> int:
        entry = self._where[name][1]
        return entry.end - entry.start

    def _take(self, name: str, tensor: torch.Tensor) -> st.Entry:
        """Check `tensor` fits the planned tensor `name` and account for its bytes."""
        if name not in self._where:
            raise CheckpointError(f"tensor {name} is not among the planned tensors")
        entry = self._where[name][1]
        if tensor.dtype != entry.torch_dtype or tuple(tensor.shape[1:]) != entry.shape[1:]:
            planned = f"{entry.dtype}{list(entry.shape)}"
            raise CheckpointError(f"{name}: writing {tensor.dtype}{list(tensor.shape)}, planned {planned}")
        nbytes = (tensor.shape[0] if tensor.dim() else 1) * entry.row_bytes
        with self._lock:
            if self._remaining[name] < nbytes:
                raise CheckpointError(f"tensor {name} written twice")
            self._remaining[name] -= nbytes
        return entry

    def write(self, name: str, tensor: torch.Tensor, row: int = 0) -> None:
        """Positioned mode: `tensor` as rows [row, row + len(tensor)) of the planned tensor `name`."""
        if self.sequential:
            raise CheckpointError("write() on a sequential StreamingHFWriter: use append()")
        entry = self._take(name, tensor)
        st.pwrite_from(self._fds[self._where[name][0]], entry.start + row * entry.row_bytes, tensor.contiguous())

    def append(self, name: str, tensor: torch.Tensor) -> None:
        """Sequential mode: the next rows of the planned tensor `name`, which must be the one due."""
        while self._cursor < len(self._order) and not self._remaining[self._order[self._cursor]]:
            self._cursor += 1
        if not self.sequential or self._cursor >= len(self._order) or self._order[self._cursor] != name:
            due = self._order[self._cursor] if self._cursor < len(self._order) else "nothing"
            raise CheckpointError(f"appending {name} out of the planned order ({due} is due)")
        self._take(name, tensor)
        shard = self._where[name][0]
        if self._appender is None or self._appender.path.name != _partial_name(shard + 1):
            self._next_shard(shard)
        assert self._appender is not None
        self._appender.write(tensor.contiguous())

    def _next_shard(self, shard: int) -> None:
        if self._appender is not None:
            self._appender.close()
        self._appender = direct_io.Appender(self.directory / _partial_name(shard + 1))
        self._appender.write(self._headers[shard])

    def finish(self) -> list[str]:
        """Check every planned byte was written, sync, name the shards and write the index."""
        unwritten = [name for name in self._order if self._remaining[name]]
        if unwritten:
            raise CheckpointError(f"{len(unwritten)} planned tensor(s) never written, e.g. {unwritten[:3]}")
        for fd in self._fds:
            os.fsync(fd)
        self.close()
        return _publish_shards(self.directory, [[n for n, _, _ in shard] for shard in self._shards], self.total_bytes)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if self._appender is not None:
            self._appender.close()
            self._appender = None


class HFCheckpointWriter:
    """Writes tensors into size-limited safetensors shards; `finish()` names them and writes the index."""

    def __init__(self, directory: str | Path, max_shard_bytes: int = 5 * 1024**3) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._written: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or name in self._written:
            raise CheckpointError(f"tensor {name} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if not self._pending:
            return
        header, entries = st.encode_header([(n, tuple(t.shape), t.dtype) for n, t in self._pending.items()])
        path = self.directory / _partial_name(len(self._shards) + 1)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.pwrite(fd, header, 0)
            for name, tensor in self._pending.items():
                st.pwrite_from(fd, entries[name].start, tensor)
        finally:
            os.close(fd)
        self._shards.append(list(self._pending))
        self._written.update(self._pending)
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Final shard names plus the index. Returns the shard file names."""
        self._flush()
        return _publish_shards(self.directory, self._shards, self.total_bytes)
