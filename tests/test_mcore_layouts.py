"""Parallel layouts: checkpoints written at TP 2 / EP 2 round-trip bit-exact, and one checkpoint loaded at EP 1, EP 2
and TP 2 (eval) gives the same logits. The multi-process half runs once per module under torchrun (2 ranks, gloo).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from glm45_train.convert.load import load_mcore
from glm45_train.convert.mapping.table import MappingError
from glm45_train.convert.to_hf import mcore_to_hf
from glm45_train.convert.torch_dist.chunks import ChunkSource, chunk_of
from glm45_train.convert.torch_dist.reader import McoreTensorSource
from glm45_train.formats.hf_io import CheckpointError
from glm45_train.model.build import build_model
from glm45_train.model.forward import logits
from glm45_train.model.hf_config import to_transformer_config
from tests.conftest import REPO_ROOT
from tests.dist.mcore_layouts import input_ids
from tests.test_convert_roundtrip import tensor_digests


@pytest.fixture(scope="module")
def layout_runs(tiny_dirs, mcore_dirs, tmp_path_factory) -> Path:
    """Output of tests/dist/mcore_layouts.py (writes at TP 2 and EP 2; loads glm45 at EP 2 and TP 2)."""
    out = tmp_path_factory.mktemp("layouts")
    script = REPO_ROOT / "tests" / "dist" / "mcore_layouts.py"
    args = [str(tiny_dirs["air"]), str(tiny_dirs["glm45"]), str(mcore_dirs["glm45"]), str(out)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("written_at", ["tp2", "ep2"])
@pytest.mark.parametrize("preset", ["air", "glm45"])
def test_checkpoint_written_at_a_parallel_layout_round_trips(layout_runs, tiny_dirs, tmp_path, preset, written_at):
    mcore = layout_runs / f"{preset}-{written_at}"
    assert len(list((mcore / "release").glob("__1_*.distcp"))) >= 1  # rank 1 wrote its own shards
    mcore_to_hf(mcore, tmp_path / "hf")
    assert tensor_digests(tmp_path / "hf") == tensor_digests(tiny_dirs[preset])


@pytest.fixture(scope="module")
def ep1_logits(mcore_dirs, megatron_world) -> torch.Tensor:
    hf = McoreTensorSource(mcore_dirs["glm45"]).hf
    model = build_model(hf, to_transformer_config(hf, perform_initialization=False)).eval()
    load_mcore(model, mcore_dirs["glm45"])
    return logits(model, input_ids(hf.vocab_size))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ep2", "tp2"])
def test_one_checkpoint_gives_the_same_logits_at_ep1_ep2_tp2(layout_runs, ep1_logits, layout):
    # Bitwise equality is not to be had: TP all-reduces partial sums, EP combines expert outputs across ranks,
    # both in a different order than one process. Same weights (below), same argmax, fp32 rounding apart.
    other = torch.load(layout_runs / f"logits-{layout}.pt")
    assert other.shape == ep1_logits.shape
    torch.testing.assert_close(other, ep1_logits, rtol=0, atol=2e-5)
    assert torch.equal(other.argmax(-1), ep1_logits.argmax(-1))


@pytest.mark.slow
def test_ep2_ranks_load_exactly_their_experts(layout_runs, mcore_dirs, megatron_world):
    source = McoreTensorSource(mcore_dirs["glm45"])
    ranks = [torch.load(layout_runs / f"ep2-rank{r}.pt") for r in range(2)]
    experts = [{n for n in rank if ".local_experts." in n} for rank in ranks]
    assert experts[0].isdisjoint(experts[1]) and experts[0] | experts[1] == {
        n for n in source.names() if ".local_experts." in n
    }
    for rank in ranks:
        for name, tensor in rank.items():
            assert torch.equal(tensor, source.get(name).to(tensor.dtype)), name


def test_chunk_of_slices_tp_shards_swiglu_halves_and_expert_slabs():
    full = torch.arange(24.0).reshape(6, 4)
    # TP rank 1 of 2 along dim 1, and the "up" half of a gate/up tensor at TP 2 (chunk 3 of 4 along dim 0)
    assert torch.equal(chunk_of(full, (0, 2), (6, 2), (6, 4), "w"), full[:, 2:])
    assert torch.equal(chunk_of(full, (3, 0), (3, 4), (6, 4), "w"), full[3:])
    # an expert's slab of `experts.experts.*`: the expert axis is prepended, chunk size 1
    assert torch.equal(chunk_of(full, (5, 0, 0), (1, 6, 4), (8, 6, 4), "w"), full[None])
    with pytest.raises(MappingError, match="does not fit"):
        chunk_of(full, (0, 0), (6, 4), (6, 5), "w")


def test_errors_in_writer_threads_are_not_lost():
    class OneTensor:
        def name_of(self, view):
            return "w"

    def unreadable(name):
        raise CheckpointError(f"disk error reading {name}")

    chunks = ChunkSource(OneTensor(), unreadable)  # type: ignore[arg-type]
    chunk = ChunkStorageMetadata(offsets=torch.Size([0]), sizes=torch.Size([4]))
    data = TensorWriteData(chunk=chunk, properties=TensorProperties(dtype=torch.float32), size=torch.Size([4]))
    item = WriteItem(index=MetadataIndex("w", torch.Size([0])), type=WriteItemType.SHARD, tensor_data=data)
    chunks.expect([torch.empty(4)])
    writer = threading.Thread(target=chunks.chunk, args=(torch.empty(4), item))
    writer.start()
    writer.join()
    with pytest.raises(CheckpointError, match="disk error reading w"):
        chunks.check_complete()
