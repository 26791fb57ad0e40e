"""Conversion and loading at parallel layouts (run under torchrun, 2 processes, gloo), for test_mcore_layouts.py.

    python -m torch.distributed.run --nproc-per-node 2 tests/dist/mcore_layouts.py AIR GLM45 MCORE OUT

1. writes each tiny HF checkpoint (AIR, GLM45) at TP 2 and at EP 2: OUT/{preset}-tp2, OUT/{preset}-ep2;
2. loads the single-process checkpoint MCORE at EP 2 and at TP 2 (eval mode) and saves the logits of
   `input_ids()` (TP: gathered over the vocabulary-parallel output) to OUT/logits-{layout}.pt, and at EP 2 every
   loaded tensor of each rank under its global name to OUT/ep2-rank{r}.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

LAYOUTS = {"tp2": {"tp": 2}, "ep2": {"ep": 2}}


def input_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(7))


def write_all(hf_dirs: dict[str, str], out: Path) -> None:
    from glm45_train.config.layout import ParallelLayout
    from glm45_train.convert.to_mcore import hf_to_mcore

    for preset, hf_dir in hf_dirs.items():
        for name, sizes in LAYOUTS.items():
            hf_to_mcore(hf_dir, out / f"{preset}-{name}", layout=ParallelLayout(**sizes))


def load_and_run(mcore_dir: str, out: Path, name: str) -> None:
    from megatron.core import parallel_state

    from glm45_train.config.layout import ParallelLayout
    from glm45_train.convert.torch_dist.reader import McoreTensorSource
    from glm45_train.convert.load import load_mcore
    from glm45_train.convert.torch_dist.layout import TensorIndex
    from glm45_train.model.build import build_model
    from glm45_train.model.forward import logits
    from glm45_train.model.hf_config import to_transformer_config
    from glm45_train.runtime import distributed

    layout = ParallelLayout(**LAYOUTS[name])
    distributed.initialize(layout)
    hf = McoreTensorSource(mcore_dir).hf
    model = build_model(hf, to_transformer_config(hf, layout=layout, perform_initialization=False)).eval()
    load_mcore(model, mcore_dir)
    result = logits(model, input_ids(hf.vocab_size))
    if layout.tp > 1:  # the output layer is vocabulary-parallel
        parts = [torch.empty_like(result) for _ in range(layout.tp)]
        dist.all_gather(parts, result.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        result = torch.cat(parts, dim=-1)
    if dist.get_rank() == 0:
        torch.save(result, out / f"logits-{name}.pt")
    if layout.ep > 1:
        tensors = {n: t.detach().clone() for n, t in TensorIndex(model).tensors.items()}
        torch.save(tensors, out / f"ep2-rank{dist.get_rank()}.pt")


def main(air: str, glm45: str, mcore_dir: str, out_dir: str) -> None:
    from glm45_train.runtime import distributed

    out = Path(out_dir)
    write_all({"air": air, "glm45": glm45}, out)
    for name in LAYOUTS:
        load_and_run(mcore_dir, out, name)
    distributed.shutdown()


if __name__ == "__main__":  # dist_checkpointing may spawn helpers that re-import __main__
    main(*sys.argv[1:])
