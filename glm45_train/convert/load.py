"""Loading a torch_dist checkpoint (converted, or a full-SFT run) into a built GPTModel of any layout and spec.

Megatron's `dist_checkpointing.load` reshards on read: the checkpoint's TP/EP layout need not match the model's.
Keys on disk are Transformer-Engine style whatever the model's spec (torch_dist/layout.py). Read through
torch_dist/safe_load.py: nothing in the checkpoint is unpickled outside the allow-list.
"""

from __future__ import annotations

from pathlib import Path

import torch

from glm45_train.convert.torch_dist import safe_load
from glm45_train.convert.torch_dist.directory import McoreCheckpointDir
from glm45_train.convert.torch_dist.layout import te_style_sharded_state_dict


def load_mcore(model: torch.nn.Module, mcore_dir: str | Path, *, strict: bool = True) -> int:
    """Load a checkpoint into a built GPTModel of any parallel layout and spec (TE-style keys on disk).

    Every rank of the model's layout calls this. The router expert biases (buffers) are loaded too.
    Returns the number of tensors loaded on this rank.
    """
    directory = McoreCheckpointDir(mcore_dir)
    sharded = te_style_sharded_state_dict(model, for_save=False)
    loaded = safe_load.load({"model": sharded}, directory.checkpoint)["model"]
    model.load_state_dict(loaded, strict=strict)
    return sum(isinstance(value, torch.Tensor) for value in loaded.values())
