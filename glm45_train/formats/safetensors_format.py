"""The safetensors file format, read and written with positioned I/O instead of mmap.

    [8-byte little-endian header length N][N bytes of JSON header, space-padded][raw tensor bytes]
    header: {name: {"dtype": "BF16", "shape": [...], "data_offsets": [start, end]}, "__metadata__": {...}}

Why not the `safetensors` package: its reader memory-maps the file (mapped pages count toward RSS, and a tensor is
copied out of the map into fresh memory), its writer serialises a whole dict at once. Here a file's header is
parsed into byte ranges (read into callers' buffers by hf_io.py), or computed up front from the planned tensor
list so tensors can then be written one at a time (in any order at their offsets, or appended in plan order).
Files written here are byte-for-byte what `safetensors` would accept (offsets contiguous, header 8-byte aligned).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
WEIGHT_DTYPES = {name: DTYPES[name] for name in ("BF16", "F16", "F32", "F64")}  # model weights, read and written
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


class FormatError(ValueError):
    """A file that is not a valid (or is a truncated) safetensors file."""


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies in its file (absolute byte offsets)."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def row_bytes(self) -> int:
        """Bytes of one slice along dim 0 (the whole tensor for a 0-d tensor)."""
        return math.prod(self.shape[1:]) * self.torch_dtype.itemsize


def read_header(path: Path) -> dict[str, Entry]:
    """Every tensor's entry, after checking the header and that the file holds all the bytes it announces."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise FormatError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER, size - 8):
            raise FormatError(f"header length {length} exceeds the file ({size} bytes)")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise FormatError(f"header is not JSON ({err})") from None
    data_start = 8 + length
    entries = {}
    for name, info in header.items():
        if name != "__metadata__":
            entries[name] = _entry(name, info, data_start)
    end = max((e.end for e in entries.values()), default=data_start)
    if end > size:
        raise FormatError(f"truncated: the header announces {end} bytes, the file has {size}")
    return entries


def _entry(name: str, info: dict, data_start: int) -> Entry:
    try:
        dtype, shape, (start, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"bad header entry for {name}: {info}") from None
    if dtype not in DTYPES:
        raise FormatError(f"{name}: unsupported dtype {dtype}")
    if end - start != math.prod(shape) * DTYPES[dtype].itemsize or start < 0:
        raise FormatError(f"{name}: data_offsets {start}..{end} do not hold {dtype}{list(shape)}")
    return Entry(dtype, shape, data_start + start, data_start + end)


def encode_header(tensors: Iterable[tuple[str, tuple[int, ...], torch.dtype]]) -> tuple[bytes, dict[str, Entry]]:
    """The header bytes of a file holding `tensors` in that order, and each tensor's entry in it."""
    relative, offset = {}, 0
    for name, shape, dtype in tensors:
        nbytes = math.prod(shape) * dtype.itemsize
        relative[name] = Entry(DTYPE_NAMES[dtype], tuple(shape), offset, offset + nbytes)
        offset += nbytes
    layout = {
        name: {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.start, e.end]}
        for name, e in relative.items()
    }
    text = json.dumps({"__metadata__": {"format": "pt"}, **layout}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # tensor data 8-byte aligned, as safetensors writes it
    start = 8 + len(text)
    entries = {name: Entry(e.dtype, e.shape, start + e.start, start + e.end) for name, e in relative.items()}
    return struct.pack("<Q", len(text)) + text, entries


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable, without a copy."""
    if not tensor.is_contiguous():
        raise ValueError("byte_view needs a contiguous tensor")
    return tensor.reshape(-1).view(torch.uint8).numpy().data.cast("B")


def pwrite_from(fd: int, offset: int, tensor: torch.Tensor) -> None:
    """Write the bytes of the contiguous tensor at `offset` of the open file `fd`."""
    view, done = byte_view(tensor), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
