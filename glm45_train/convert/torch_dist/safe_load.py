"""`dist_checkpointing.load` through the safe DCP reader: loading a checkpoint never runs code from it.

Megatron-Core 0.16.1's torch_dist load reads `.metadata` with PyTorch's `FileSystemReader` (bare `pickle.load`),
`torch.load`s `common.pt` without `weights_only` (so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turns it off) and gets its
ShardedObjects (the RNG state, optimizer parameter groups) from DCP's planner with `weights_only=False`. `load`
here passes Megatron its own strategies, subclassed, so the bytes checked are the bytes used:

- `SafeTorchDistLoadStrategy`: Megatron's `TorchDistLoadShardedStrategy.load` with `formats/dcp_reader.py`'s
  `SafeFileSystemReader` (every `.metadata` and record through formats/safe_pickle.py) and `SafeMCoreLoadPlanner`
  (Megatron's planner; objects arrive built by the reader), metadata-only reads through the same reader;
- `SafeCommonLoadStrategy`: `common.pt` through `safe_pickle.torch_load`; ShardedObjects as separate `.pt` files
  (another backend's layout, never written by torch_dist) are refused.

- after loading, Transformer Engine's `_extra_state` values (uint8 tensors TE `pickle.loads` itself in
  `set_extra_state`) must be pickles of plain values: TE writes `None` for every module not trained in FP8, and
  glm45-train trains none in FP8 (it writes the TE norms' extra state empty).

DCP reports a rank's failure as a `CheckpointException` (a BaseException with every rank's traceback); `load`
re-raises the first `UserError` in it, so a refusal reaches the CLI as its one-line message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy
from torch.distributed import checkpoint
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from glm45_train.errors import UserError
from glm45_train.formats import safe_pickle
from glm45_train.formats.dcp_reader import SafeFileSystemReader, SafeObjectLoading
from glm45_train.formats.hf_io import CheckpointError


class SafeMCoreLoadPlanner(SafeObjectLoading, mcore_torch.MCoreLoadPlanner):
    """Megatron's load planner, taking objects already built by SafeFileSystemReader."""


class SafeTorchDistLoadStrategy(mcore_torch.TorchDistLoadShardedStrategy):
    """Megatron's torch_dist load, reading through SafeFileSystemReader (the body of 0.16.1's `load`)."""

    def load(self, sharded_state_dict: Any, checkpoint_dir: Any) -> Any:
        flexible = [
            sh_ten
            for sh_ten in nested_values(sharded_state_dict)
            if isinstance(sh_ten, ShardedTensor) and not sh_ten.allow_shape_mismatch
        ]
        mismatch_allowed = {
            sh_ten.key: sh_ten
            for sh_ten in nested_values(sharded_state_dict)
            if isinstance(sh_ten, ShardedTensor) and sh_ten.allow_shape_mismatch
        }
        original = sharded_state_dict
        sharded_state_dict, flat_mapping, rename_mapping = mcore_torch._replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict
        )
        pyt_state_dict = mcore_torch.mcore_to_pyt_state_dict(sharded_state_dict, True)
        reader = SafeFileSystemReader(checkpoint_dir)
        reader.read_metadata()  # parsed (and cached) here: DCP would turn a refusal into an AssertionError's text
        planner = SafeMCoreLoadPlanner(
            shapes_validation_sharded_tensors=flexible, allow_shape_mismatch_sharded_tensors=mismatch_allowed
        )
        checkpoint.load_state_dict(pyt_state_dict, reader, planner=planner)
        self.cached_global_metadata = reader.read_metadata()
        state = {key: mcore_torch._unwrap_pyt_sharded_tensor(value) for key, value in pyt_state_dict.items()}
        state = mcore_torch._replace_sharded_keys_with_state_dict_keys(state, flat_mapping, rename_mapping)
        mcore_torch._restore_dict_types(state, original)
        return state

    def load_tensors_metadata(self, checkpoint_dir: Any, metadata: Any = None) -> Any:
        if metadata is None:
            metadata = SafeFileSystemReader(checkpoint_dir).read_metadata()
        return super().load_tensors_metadata(checkpoint_dir, metadata)

    def load_sharded_metadata(self, checkpoint_dir: Any) -> Any:
        metadata = SafeFileSystemReader(checkpoint_dir).read_metadata()
        sharded: dict[str, Any] = {}
        for key, stored in metadata.state_dict_metadata.items():
            if isinstance(stored, BytesStorageMetadata):
                sh_obj = ShardedObject.empty_from_unique_key(key)
                sharded[sh_obj.unique_key] = sh_obj
        sharded.update(self.load_tensors_metadata(checkpoint_dir, metadata))
        return sharded


class SafeCommonLoadStrategy(TorchCommonLoadStrategy):
    """`common.pt` with `safe_pickle.torch_load`."""

    def load_common(self, checkpoint_dir: Any) -> Any:
        path = Path(checkpoint_dir) / COMMON_STATE_FNAME
        try:
            with open(path, "rb") as file:
                return safe_pickle.torch_load(file, source=str(path))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing (every torch_dist checkpoint has one)") from None

    def load_sharded_objects(self, sharded_objects_state_dict: Any, checkpoint_dir: Any) -> Any:
        raise CheckpointError(f"{checkpoint_dir}: sharded objects as separate .pt files are not read (not torch_dist)")


def load(sharded_state_dict: Any, checkpoint_dir: str | Path, **kwargs: Any) -> Any:
    """`megatron.core.dist_checkpointing.load` with the safe strategies; refusals raised as their UserError."""
    from megatron.core import dist_checkpointing

    try:
        loaded = dist_checkpointing.load(
            sharded_state_dict,
            str(checkpoint_dir),
            sharded_strategy=SafeTorchDistLoadStrategy(),
            common_strategy=SafeCommonLoadStrategy(),
            **kwargs,
        )
    except CheckpointException as err:
        for failure, _trace in err.failures.values():
            if isinstance(failure, UserError):
                raise failure from None
        raise
    check_extra_states(loaded[0] if isinstance(loaded, tuple) else loaded, Path(checkpoint_dir))
    return loaded


def check_extra_states(state: Any, checkpoint_dir: Path, path: str = "", extra: bool = False) -> None:
    """Refuse TE `_extra_state` values that TE's `set_extra_state` would unpickle into anything but plain values."""
    extra = extra or path.endswith("_extra_state")
    if isinstance(state, (dict, list, tuple)):
        items = state.items() if isinstance(state, dict) else enumerate(state)
        for key, value in items:
            check_extra_states(value, checkpoint_dir, f"{path}.{key}" if path else str(key), extra)
    elif extra and isinstance(state, torch.Tensor) and state.numel():
        raw = state.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        safe_pickle.check_plain_pickle(raw, source=f"{checkpoint_dir}: {path} (Transformer Engine extra state)")
