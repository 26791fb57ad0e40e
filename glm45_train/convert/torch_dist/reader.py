"""Reading a torch_dist checkpoint one model tensor (or a small batch of them) at a time.

`McoreTensorSource` is a `TensorSource` (see convert/sources.py) over a Megatron checkpoint: `get(name)` returns the
full TP=1 tensor of a local-spec GPTModel state_dict name (experts by global index), e.g. for the precision check
or for exporting to HF. Where each tensor lies in the checkpoint is asked of Megatron itself: the TP=1 model is
built on `meta`, its TE-style sharded state dict says which checkpoint key, offsets and view make up each tensor
(the SwiGLU fc1 is two chunks of one key; an expert is one slab of `experts.experts.*`). The stored chunks of
those regions are found in the checkpoint's `.metadata` and read record by record (formats/dcp_records.py): straight
into the destination when a stored chunk is exactly the region (any checkpoint written at TP=1), else through a
buffer from which the overlap is copied (checkpoints written at other layouts). Only those bytes are read.
Nothing is unpickled outside formats/safe_pickle.py's allow-list (`.metadata` through dcp_reader.py).
`model_tensor_pieces` is that region table on its own (the RL weight sync gathers the same regions from a live model).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata

from glm45_train.config.layout import ParallelLayout
from glm45_train.convert.torch_dist.directory import METADATA_NAME, McoreCheckpointDir
from glm45_train.convert.torch_dist.layout import (
    TensorIndex,
    build_meta_model,
    current_layout,
    sharded_tensors,
    te_style_sharded_state_dict,
)
from glm45_train.errors import UserError
from glm45_train.formats.buffers import BufferPool
from glm45_train.formats.dcp_reader import SafeFileSystemReader
from glm45_train.formats.dcp_records import read_record_into
from glm45_train.formats.hf_io import CheckpointError
from glm45_train.model.hf_config import Glm45Config


@dataclass(frozen=True)
class Piece:
    """One checkpoint region making up (part of) a model tensor, and where it lies inside that tensor."""

    key: str
    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    prepend_axes: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # in elements, from the start of the model tensor

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        return (1,) * self.prepend_axes + self.size


class McoreTensorSource:
    """Full TP=1 tensors read from a Megatron checkpoint, by local-spec state_dict name.

    With a `BufferPool`, `get`/`get_many` return pooled tensors the caller may `pool.release`.
    """

    def __init__(self, mcore_dir: str | Path, pool: BufferPool | None = None) -> None:
        self.directory = McoreCheckpointDir(mcore_dir)
        self.hf = Glm45Config.from_dict(self.directory.hf_config, source=str(self.directory.root / METADATA_NAME))
        self._reader = SafeFileSystemReader(self.directory.checkpoint)  # .metadata through the allow-list
        self._pieces: dict[str, list[Piece]] | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.pool = pool
        # a run trained without the MTP loss built and saved no MTP block (train/run_dir.py records it)
        self.has_mtp = self.directory.metadata.get("training", {}).get("mtp_trained", True)

    def names(self) -> list[str]:
        """Every model tensor name, in model order."""
        return list(self._layout())

    def shape(self, name: str) -> tuple[int, ...]:
        self._layout()
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        """The dtype the checkpoint stores `name` in."""
        return self._stored(self._layout()[name][0].key).properties.dtype

    def nbytes(self, name: str) -> int:
        return math.prod(self.shape(name)) * self.dtype(name).itemsize

    def get(self, name: str) -> torch.Tensor:
        return self.get_many([name])[name]

    def get_many(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Several tensors (in pooled buffers when the source has a pool)."""
        tensors = {}
        for name in names:
            if name not in self._layout():
                raise CheckpointError(f"{self.directory.checkpoint}: no model tensor named {name}")
            tensors[name] = self._new(self._shapes[name], self.dtype(name))
            self.read_into(name, tensors[name])
        return tensors

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Fill `out` (contiguous, the tensor's shape and stored dtype) with tensor `name`."""
        for piece in self._layout()[name]:
            self._read_piece(piece, out.as_strided(piece.size, piece.stride, piece.offset))

    def iter_batches(self, max_bytes: int = 256 * 2**20) -> Iterator[dict[str, torch.Tensor]]:
        """All tensors in model order, read in batches of about `max_bytes`."""
        batch: list[str] = []
        size = 0
        for name in self.names():
            if batch and size + self.nbytes(name) > max_bytes:
                yield self.get_many(batch)
                batch, size = [], 0
            batch.append(name)
            size += self.nbytes(name)
        if batch:
            yield self.get_many(batch)

    def _stored(self, key: str) -> TensorStorageMetadata:
        found = self._reader.read_metadata().state_dict_metadata.get(key)
        if not isinstance(found, TensorStorageMetadata):
            raise CheckpointError(f"{self.directory.checkpoint}: lacks tensor {key}")
        return found

    def _read_piece(self, piece: Piece, target: torch.Tensor) -> None:
        """One region of a checkpoint key into `target`, from every stored chunk overlapping it."""
        stored = self._stored(piece.key)
        box = ChunkStorageMetadata(torch.Size(piece.global_offset), torch.Size(piece.chunk_shape))
        target = target.view(piece.chunk_shape) if target.is_contiguous() else target[(None,) * piece.prepend_axes]
        covered = 0
        for chunk in stored.chunks:
            overlap = box_overlap(box.offsets, box.sizes, chunk.offsets, chunk.sizes)
            if overlap is None:
                continue
            if chunk == box and target.is_contiguous() and target.dtype == stored.properties.dtype:
                self._read_chunk(piece.key, chunk, target)
            else:
                buffer = self._new(tuple(chunk.sizes), stored.properties.dtype)
                self._read_chunk(piece.key, chunk, buffer)
                target[overlap[0]].copy_(buffer[overlap[1]])
                if self.pool is not None:
                    self.pool.release(buffer)
            covered += math.prod(s.stop - s.start for s in overlap[0])
        if covered != math.prod(piece.chunk_shape):
            raise CheckpointError(f"{self.directory.checkpoint}: stored chunks of {piece.key} do not cover it")

    def _read_chunk(self, key: str, chunk: ChunkStorageMetadata, out: torch.Tensor) -> None:
        metadata = self._reader.read_metadata()
        info = metadata.storage_data[MetadataIndex(key, chunk.offsets)]
        path = self.directory.checkpoint / info.relative_path
        try:
            read_record_into(path, info.offset, info.length, out)
        except OSError as err:
            raise CheckpointError(f"{path}: cannot open ({err.strerror}), needed for {key}") from None
        except UserError:
            raise  # names the file and what it refused
        except Exception as err:
            raise CheckpointError(f"{path}: cannot read {key} ({err})") from None

    def _new(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self.pool.tensor(shape, dtype) if self.pool is not None else torch.empty(shape, dtype=dtype)

    def _layout(self) -> dict[str, list[Piece]]:
        if self._pieces is None:
            self._pieces = self._build_layout()
        return self._pieces

    def _build_layout(self) -> dict[str, list[Piece]]:
        from megatron.core import parallel_state

        from glm45_train.runtime import distributed

        if not parallel_state.model_parallel_is_initialized():
            distributed.initialize()
        if current_layout() != ParallelLayout():
            raise ValueError(f"McoreTensorSource reads at TP=PP=EP=1, not {current_layout()}; use load_mcore")
        pieces, self._shapes = model_tensor_pieces(self.hf, with_mtp=self.has_mtp)
        return pieces


def model_tensor_pieces(
    hf: Glm45Config, *, with_mtp: bool = True
) -> tuple[dict[str, list[Piece]], dict[str, tuple[int, ...]]]:
    """(checkpoint regions of each full TP=1 model tensor, in model order; the full shape of each tensor).

    Asked of a TP=1 model built on `meta`, so Megatron's parallel state must be at TP=PP=EP=1 (the RL weight
    sync computes this before the training layout is set up). Tensors without checkpoint regions are left out.
    """
    if current_layout() != ParallelLayout():
        raise ValueError(f"the checkpoint regions of model tensors are computed at TP=PP=EP=1, not {current_layout()}")
    model = build_meta_model(hf, torch.bfloat16, with_mtp=with_mtp)
    index = TensorIndex(model)
    pieces: dict[str, list[Piece]] = {name: [] for name in index.tensors}
    for sharded in sharded_tensors(te_style_sharded_state_dict(model, for_save=False)):
        name = index.name_of(sharded.data)
        view = sharded.data
        pieces[name].append(
            Piece(
                key=sharded.key,
                global_shape=tuple(sharded.global_shape),
                global_offset=tuple(sharded.global_offset),
                prepend_axes=sharded.prepend_axis_num,
                size=tuple(view.shape),
                stride=tuple(view.stride()),
                offset=index.offset_in_tensor(view),
            )
        )
    shapes = {name: tuple(tensor.shape) for name, tensor in index.tensors.items()}
    return {name: parts for name, parts in pieces.items() if parts}, shapes


def box_overlap(
    a_offset: Sequence[int], a_shape: Sequence[int], b_offset: Sequence[int], b_shape: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """(slices into box a, slices into box b) of their intersection, or None (boxes as offsets + shapes)."""
    in_a, in_b = [], []
    for a0, an, b0, bn in zip(a_offset, a_shape, b_offset, b_shape, strict=True):
        lo, hi = max(a0, b0), min(a0 + an, b0 + bn)
        if lo >= hi:
            return None
        in_a.append(slice(lo - a0, hi - a0))
        in_b.append(slice(lo - b0, hi - b0))
    return tuple(in_a), tuple(in_b)
