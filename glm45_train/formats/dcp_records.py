"""Tensor records inside PyTorch-DCP `.distcp` files (what torch_dist checkpoints are made of), read and written fast.

DCP's filesystem format stores every tensor chunk as one `torch.save` record (a small zip archive) at an offset of a
`.distcp` file; `.metadata` maps (key, chunk offsets) -> (file, offset, length). DCP's own reader copies each record
into a BytesIO, `torch.load`s it into fresh memory and copies it into the destination (three passes, two first
touches). `read_record_into` instead reads the record's zip directory, checks from its pickle that the stored
tensor is plain (one storage, offset 0, contiguous, the expected dtype and size) and `preadv`s the raw bytes
straight into the destination (direct_io.py); anything else goes through `safe_pickle.torch_load` (torch.load with
weights_only: correct for every tensor record, just slower; refuses any other).

`write_record` is `torch.save` with its CRC32s computed by zlib instead of miniz (~4 GB/s against ~0.6 GB/s here,
and off the GIL): torch.save runs with its own CRC off and `_CrcStream` fills in each member's CRC as the bytes
pass (in the data descriptor after the member and in the central directory), so the records are standard zip
entries with valid CRCs. `torch.load` never checks them (PyTorch builds miniz without reader CRC checks), so
`read_record_into` does: a flipped byte inside a tensor's data is an error naming the file and offset. Records
with no CRC (0: written by earlier versions) are read unchecked.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, cast

import torch

from glm45_train.formats import direct_io, safe_pickle
from glm45_train.formats.safetensors_format import byte_view

_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # zip local file header (30 bytes)
_CENTRAL_HEADER = struct.Struct("<4s6H3I5H2I")  # zip central directory file header (46 bytes)
_LOCAL, _DESCRIPTOR, _CENTRAL = b"PK\x03\x04", b"PK\x07\x08", b"PK\x01\x02"
_STORAGE_DTYPES = {
    "BFloat16Storage": torch.bfloat16,
    "HalfStorage": torch.float16,
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class FileSlice(io.RawIOBase):
    """A read-only, seekable window [offset, offset + length) of an open file (positioned reads)."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd, self.offset, self.length, self.pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence]
        return self.pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self.length - self.pos))
        data = os.pread(self.fd, n, self.offset + self.pos)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


class _TensorSpec:
    def __init__(self, storage: tuple, offset: int, size: tuple, stride: tuple, *_: Any) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)
        self.crc = 0  # the data member's CRC32 from the zip directory (0: none written)


class _RecordUnpickler(pickle.Unpickler):
    """Understands only a plain tensor's pickle: `_rebuild_tensor_v2(storage, offset, size, stride, ...)`."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _TensorSpec
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise pickle.UnpicklingError(f"not a plain tensor record ({module}.{name})")

    def persistent_load(self, pid: Any) -> Any:
        return tuple(pid)  # ("storage", storage type name, key, location, numel)


def _member_data_offset(fd: int, record_offset: int, info: zipfile.ZipInfo) -> int:
    """Absolute file offset of a stored zip member's data (from its local header)."""
    header = os.pread(fd, _LOCAL_HEADER.size, record_offset + info.header_offset)
    fields = _LOCAL_HEADER.unpack(header)
    name_len, extra_len = fields[-2], fields[-1]
    return record_offset + info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def _plain_tensor_spec(fd: int, offset: int, length: int) -> tuple[_TensorSpec, int] | None:
    """The pickled tensor description and the absolute offset of its data, if the record is a plain tensor."""
    try:
        with zipfile.ZipFile(FileSlice(fd, offset, length)) as archive:
            infos = {info.filename.split("/", 1)[-1]: info for info in archive.infolist()}
    except zipfile.BadZipFile:
        return None  # torch.load reports what is wrong with it
    pkl, data = infos.get("data.pkl"), infos.get("data/0")
    if pkl is None or data is None or pkl.compress_type or data.compress_type:
        return None
    if any(name.startswith("data/") and name != "data/0" for name in infos):
        return None
    raw = os.pread(fd, pkl.file_size, _member_data_offset(fd, offset, pkl))
    try:
        spec = _RecordUnpickler(io.BytesIO(raw)).load()
    except (pickle.UnpicklingError, TypeError, ValueError, EOFError):
        return None
    if not isinstance(spec, _TensorSpec):
        return None
    spec.crc = data.CRC
    return spec, _member_data_offset(fd, offset, data)


def _is_plain(spec: _TensorSpec, out: torch.Tensor) -> bool:
    kind, storage_type, _key, _location, numel = spec.storage
    contiguous = torch.empty(spec.size, device="meta").stride()
    return (
        kind == "storage"
        and _STORAGE_DTYPES[storage_type] == out.dtype
        and spec.offset == 0
        and numel == out.numel()
        and spec.size == tuple(out.shape)
        and (spec.stride == contiguous or out.numel() <= 1)
    )


def read_record_into(path: Path, offset: int, length: int, out: torch.Tensor) -> None:
    """Read the tensor record at [offset, offset + length) of a `.distcp` file into `out` (same shape), checking
    the data's CRC32 where the record carries one."""
    fd = os.open(path, os.O_RDONLY)
    try:
        found = _plain_tensor_spec(fd, offset, length) if out.is_contiguous() else None
        if found is not None and _is_plain(found[0], out):
            direct_io.read_into(path, found[1], out)  # the bulk of the bytes, bypassing the page cache
            crc = found[0].crc
            if crc and zlib.crc32(byte_view(out)) != crc:
                raise safe_pickle.CorruptRecord(
                    f"{path}: the tensor record at offset {offset:,} does not match its CRC32 (damaged file)"
                )
            return
        stream = cast(IO[bytes], FileSlice(fd, offset, length))
        tensor = safe_pickle.torch_load(stream, source=f"{path} (record at offset {offset})")
    finally:
        os.close(fd)
    if tuple(tensor.shape) != tuple(out.shape):
        raise ValueError(f"record holds shape {tuple(tensor.shape)}, expected {tuple(out.shape)}")
    out.copy_(tensor)


@contextlib.contextmanager
def crc32_off() -> Iterator[None]:
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


def exact_storage(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory as a tensor whose storage is exactly its bytes (torch.save writes whole storages)."""
    if tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    flat = torch.frombuffer(byte_view(tensor), dtype=torch.uint8)
    return flat.view(tensor.dtype).view(tensor.shape)


def write_record(stream: Any, tensor: torch.Tensor) -> tuple[int, int]:
    """Append one record (call inside `crc32_off()`); returns its (offset, length) in the file."""
    offset = stream.tell()
    torch.save(exact_storage(tensor.contiguous()), cast(IO[bytes], _CrcStream(stream)))
    return offset, stream.tell() - offset


class _CrcStream:
    """What torch.save writes into: passes every write on, computing each zip member's CRC32 as its data goes by
    and writing it where torch (its CRC off) left 0 — the member's data descriptor and the central directory.

    torch.save writes a record as, per member: local header (30 bytes, flag bit 3: sizes and CRC follow the
    data), name and extra field, the data, a 16-byte data descriptor; then the central directory in one write.
    A descriptor is recognised by its signature and its size fields matching the bytes counted since the header,
    so data that merely starts with the signature is hashed as data."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.crcs: dict[bytes, int] = {}  # member name -> CRC32
        self._header = bytearray()  # the current member's name and extra field, as they arrive
        self._name_length = self._header_left = 0
        self._name = b""  # set while the member's data passes
        self._crc = self._count = 0

    def tell(self) -> int:
        return int(self.stream.tell())

    def flush(self) -> None:
        self.stream.flush()

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        out: Any = data
        head = bytes(view[:4])
        if self._header_left:
            take = min(self._header_left, len(view))
            self._header += view[:take]
            self._header_left -= take
            if not self._header_left:
                self._name = bytes(self._header[: self._name_length])
            self._hash(view[take:])
        elif head == _LOCAL and len(view) == _LOCAL_HEADER.size:
            fields = _LOCAL_HEADER.unpack(view)
            self._name_length, self._header_left = fields[-2], fields[-2] + fields[-1]
            self._header, self._name, self._crc, self._count = bytearray(), b"", 0, 0
        elif head == _DESCRIPTOR and self._name and _descriptor_sizes(view) == (self._count, self._count):
            self.crcs[self._name] = self._crc
            out = bytearray(view)
            struct.pack_into("<I", out, 4, self._crc)
            self._name = b""
        elif head == _CENTRAL:
            out = self._central_with_crcs(view)
        else:
            self._hash(view)
        self.stream.write(out)
        return len(view)

    def _hash(self, view: memoryview) -> None:
        if self._name and len(view):
            self._crc, self._count = zlib.crc32(view, self._crc), self._count + len(view)

    def _central_with_crcs(self, view: memoryview) -> bytearray:
        patched, at = bytearray(view), 0
        while patched[at : at + 4] == _CENTRAL:
            fields = _CENTRAL_HEADER.unpack_from(patched, at)
            name_length, extra_length, comment_length = fields[10], fields[11], fields[12]
            name = bytes(patched[at + _CENTRAL_HEADER.size : at + _CENTRAL_HEADER.size + name_length])
            if name in self.crcs:
                struct.pack_into("<I", patched, at + 16, self.crcs[name])
            at += _CENTRAL_HEADER.size + name_length + extra_length + comment_length
        return patched


def _descriptor_sizes(descriptor: memoryview) -> tuple[int, int] | None:
    """(compressed, uncompressed) of a data descriptor: 16 bytes, or 24 with zip64's 8-byte sizes."""
    layout = {16: "<II", 24: "<QQ"}.get(len(descriptor))
    return None if layout is None else struct.unpack_from(layout, descriptor, 8)
