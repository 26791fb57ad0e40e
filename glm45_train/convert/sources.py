"""Where full (unsharded) Megatron tensors come from, and filling Megatron modules from them.

A tensor source answers `get(mcore_name)` with the full TP=1/EP=1 tensor for a GPTModel state_dict name of
the local (CPU) layer spec. `HFTensorSource` converts from an HF checkpoint through the mapping table, reading
each HF tensor's rows straight into their place in the mcore tensor (`Glm45Mapping.row_runs`), dequantising FP8
checkpoints on the way (fp8.py); given a `BufferPool`, results live in pooled buffers the caller releases.
An mcore checkpoint source (torch_dist/reader.py) reads a torch_dist checkpoint. `load_weights` fills any
submodule of a built model (one layer at a time in the layerwise precision check), honouring the EP rank's
expert offset.
"""

from __future__ import annotations

from typing import Protocol

import torch

from glm45_train.convert.mapping.names import global_expert_name, global_layer_name
from glm45_train.convert.mapping.table import Glm45Mapping, MappingError
from glm45_train.formats.buffers import BufferPool
from glm45_train.formats.fp8 import open_hf_reader
from glm45_train.model.hf_config import Glm45Config

# Buffers that are runtime state, not weights.
RUNTIME_STATE = ("local_tokens_per_expert", "_extra_state")


class TensorSource(Protocol):
    hf: Glm45Config

    def get(self, mcore_name: str) -> torch.Tensor: ...


class HFTensorSource:
    """Full mcore tensors converted on demand from an HF checkpoint directory."""

    def __init__(
        self, hf_dir, spec: str = "local", pool: BufferPool | None = None, verify_copies: bool = False
    ) -> None:
        """`verify_copies`: compare the MTP copies of a tensor with it whenever it is read (conversion does;
        Megatron keeps one shared tensor, so a differing copy would be lost)."""
        self.hf = Glm45Config.from_file(hf_dir)
        self.reader = open_hf_reader(hf_dir)
        self.mapping = Glm45Mapping(self.hf, spec)  # type: ignore[arg-type]
        self.mapping.check_hf_names(self.reader.names())
        self.pool = pool
        self.verify_copies = verify_copies
        self.non_finite: dict[str, int] = {}  # mcore name -> NaN/Inf count, of the tensors read so far

    def get(self, mcore_name: str) -> torch.Tensor:
        """The mcore tensor, in its HF parts' dtype (in a pooled buffer when the source has a pool)."""
        runs = self.mapping.row_runs(mcore_name)
        for hf_name, _ in runs:
            self.mapping.check_shape(hf_name, torch.empty(self.reader.shape_and_dtype(hf_name)[0], device="meta"))
        shape, dtype = self.mapping.mcore_shape(mcore_name), self.reader.torch_dtype(runs[0][0])
        out = self.pool.tensor(shape, dtype) if self.pool is not None else torch.empty(shape, dtype=dtype)
        for hf_name, part_runs in runs:
            for hf_row, mcore_row, rows in part_runs:
                self.reader.read_into(hf_name, out[mcore_row : mcore_row + rows], row=hf_row)
                for copy in self.mapping.copies_of.get(hf_name, []) if self.verify_copies else ():
                    self._check_copy(copy, hf_name, out[mcore_row : mcore_row + rows], hf_row)
        if count := non_finite_count(out):
            self.non_finite[mcore_name] = count
        return out

    def _check_copy(self, copy: str, original: str, rows: torch.Tensor, row: int, block_bytes: int = 64 * 2**20):
        """The copy's rows [row, row + len(rows)) must equal `rows` (the original's, just read) bit for bit."""
        if self.reader.shape_and_dtype(copy) != self.reader.shape_and_dtype(original):
            raise self.mapping.copy_mismatch(copy)
        step = max(1, block_bytes // max(1, rows[0].numel() * rows.element_size()))
        block = torch.empty((min(step, rows.shape[0]), *rows.shape[1:]), dtype=rows.dtype)
        for start in range(0, rows.shape[0], step):
            part = block[: min(step, rows.shape[0] - start)]
            self.reader.read_into(copy, part, row + start)
            if not torch.equal(part, rows[start : start + part.shape[0]]):
                raise self.mapping.copy_mismatch(copy)


def non_finite_count(tensor: torch.Tensor, block_elements: int = 2**24) -> int:
    """How many NaN/Inf values `tensor` holds: its min and max (NaN propagates; ~30 GB/s in the tensor's own
    dtype, where a float64 sum ran at 0.2 GB/s and an `isfinite` mask at 1.3 GB/s on this machine), counted
    block by block only when one of them is not finite (no temporary of the tensor's size)."""
    if not tensor.is_floating_point() or not tensor.numel():
        return 0
    low, high = torch.aminmax(tensor)
    if torch.isfinite(low) and torch.isfinite(high):
        return 0
    flat = tensor.reshape(-1)
    return sum(
        int((~torch.isfinite(flat[start : start + block_elements])).sum())
        for start in range(0, flat.numel(), block_elements)
    )


def _first_layer_of_stage(module: torch.nn.Module) -> int:
    """Global index of a whole GPTModel stage's first decoder layer (0 for a submodule or a single stage)."""
    decoder = getattr(module, "decoder", None)
    if decoder is None or not len(decoder.layers):
        return 0
    return decoder.layers[0].layer_number - 1


@torch.no_grad()
def load_weights(module: torch.nn.Module, source: TensorSource, prefix: str = "") -> int:
    """Copy every weight of `module` (whose state_dict names start at `prefix` in the full model) from `source`.

    Works for the whole GPTModel (prefix "") or one submodule, e.g. `model.decoder.layers[3]` with prefix
    "decoder.layers.3.". Needs TP=1; any EP rank and any pipeline stage (a stage's module list counts its layers
    from 0). Returns the number of tensors copied.
    """
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise ValueError("load_weights needs TP=1; load torch_dist checkpoints for TP > 1")
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    local_experts = source.hf.n_routed_experts // parallel_state.get_expert_model_parallel_world_size()
    first_layer = _first_layer_of_stage(module)
    loaded = 0
    for name, target in module.state_dict(keep_vars=True).items():
        if name.endswith("local_tokens_per_expert"):
            target.zero_()
            continue
        if name.endswith("_extra_state"):
            continue
        full_name = global_layer_name(global_expert_name(prefix + name, ep_rank, local_experts), first_layer)
        tensor = source.get(full_name)
        if tensor.shape != target.shape:
            raise MappingError(f"{full_name}: source shape {tuple(tensor.shape)} != model {tuple(target.shape)}")
        target.copy_(tensor)
        loaded += 1
    return loaded


def open_source(path, pool: BufferPool | None = None) -> TensorSource:
    """An HF checkpoint directory or a Megatron checkpoint directory, as a tensor source."""
    from pathlib import Path

    path = Path(path)
    if (path / "model.safetensors.index.json").exists() or (path / "model.safetensors").exists():
        return HFTensorSource(path, pool=pool)
    from glm45_train.convert.torch_dist.reader import McoreTensorSource

    return McoreTensorSource(path, pool=pool)
