"""Reading a torch_dist checkpoint one model tensor (or a small batch of them) at a time.

`McoreTensorSource` is a `TensorSource` (see tensor_source.py) over a Megatron checkpoint: `get(name)` returns the
full TP=1 tensor of a local-spec GPTModel state_dict name (experts by global index), e.g. for the precision check
or for exporting to HF. Where each tensor lies in the checkpoint is asked of Megatron itself: the TP=1 model is
built on `meta`, its TE-style sharded state dict says which checkpoint key, offsets and view make up each tensor
(the SwiGLU fc1 is two chunks of one key; an expert is one slab of `experts.experts.*`). Each batch is one
`torch.distributed.checkpoint.load` of exactly those regions, so only their bytes are read.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
    CachedMetadataFileSystemReader,
)
from megatron.core.dist_checkpointing.strategies.checkpointable import (
    CheckpointableShardedTensor,
    LocalShardsContainer,
)
from torch.distributed import checkpoint as dcp

from glm45_train.config.layout import ParallelLayout
from glm45_train.convert.hf_io import CheckpointError
from glm45_train.convert.mcore_dir import METADATA_NAME, McoreCheckpointDir
from glm45_train.convert.sharded_layout import (
    TensorIndex,
    build_meta_model,
    current_layout,
    sharded_tensors,
    te_style_sharded_state_dict,
)
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
    """Full TP=1 tensors read from a Megatron checkpoint, by local-spec state_dict name."""

    def __init__(self, mcore_dir: str | Path) -> None:
        self.directory = McoreCheckpointDir(mcore_dir)
        self.hf = Glm45Config.from_dict(self.directory.hf_config, source=str(self.directory.root / METADATA_NAME))
        self._reader = CachedMetadataFileSystemReader(str(self.directory.checkpoint))
        self._pieces: dict[str, list[Piece]] | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}

    def names(self) -> list[str]:
        """Every model tensor name, in model order."""
        return list(self._layout())

    def shape(self, name: str) -> tuple[int, ...]:
        self._layout()
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        """The dtype the checkpoint stores `name` in."""
        metadata = self._reader.read_metadata().state_dict_metadata
        key = self._layout()[name][0].key
        if key not in metadata:
            raise CheckpointError(f"{self.directory.checkpoint}: lacks tensor {key} (holding {name})")
        return metadata[key].properties.dtype

    def get(self, name: str) -> torch.Tensor:
        return self.get_many([name])[name]

    def get_many(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Several tensors with one checkpoint read."""
        layout = self._layout()
        tensors, loads = {}, []
        for name in names:
            if name not in layout:
                raise CheckpointError(f"{self.directory.checkpoint}: no model tensor named {name}")
            tensors[name] = torch.empty(self._shapes[name], dtype=self.dtype(name))
            for piece in layout[name]:
                target = tensors[name].as_strided(piece.size, piece.stride, piece.offset)
                # Read straight into the tensor where the region is contiguous (always, at TP=1).
                buffer = target.view(piece.chunk_shape) if target.is_contiguous() else torch.empty(piece.chunk_shape)
                loads.append((target, piece, buffer.to(target.dtype)))
        self._load_regions([(piece, buffer) for _, piece, buffer in loads])
        for target, _, buffer in loads:
            if buffer.data_ptr() != target.data_ptr():
                target.copy_(buffer.view(target.shape))
        return tensors

    def iter_batches(self, max_bytes: int = 256 * 2**20) -> Iterator[dict[str, torch.Tensor]]:
        """All tensors in model order, read in batches of about `max_bytes`."""
        batch: list[str] = []
        size = 0
        for name in self.names():
            nbytes = torch.Size(self._shapes[name]).numel() * self.dtype(name).itemsize
            if batch and size + nbytes > max_bytes:
                yield self.get_many(batch)
                batch, size = [], 0
            batch.append(name)
            size += nbytes
        if batch:
            yield self.get_many(batch)

    def _load_regions(self, regions: list[tuple[Piece, torch.Tensor]]) -> None:
        by_key: dict[str, list[CheckpointableShardedTensor]] = defaultdict(list)
        for piece, buffer in regions:
            sharded = ShardedTensor(
                key=piece.key,
                data=buffer,
                dtype=buffer.dtype,
                local_shape=tuple(buffer.shape),
                global_shape=piece.global_shape,
                global_offset=piece.global_offset,
                axis_fragmentations=None,
            )
            by_key[piece.key].append(CheckpointableShardedTensor.from_sh_ten(sharded))
        state = {key: parts[0] if len(parts) == 1 else LocalShardsContainer(parts) for key, parts in by_key.items()}
        planner = dcp.DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message=".*load in a single process.*")
                dcp.load(state, storage_reader=self._reader, planner=planner, no_dist=True)
        except BaseException as err:  # DCP wraps failures in CheckpointException (a BaseException)
            if isinstance(err, KeyboardInterrupt):
                raise
            raise CheckpointError(f"{self.directory.checkpoint}: cannot read {', '.join(by_key)} ({err})") from None

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
        model = build_meta_model(self.hf, torch.bfloat16)
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
        self._shapes = {name: tuple(tensor.shape) for name, tensor in index.tensors.items()}
        return {name: parts for name, parts in pieces.items() if parts}
