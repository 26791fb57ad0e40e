"""A conversion killed with SIGKILL midway leaves nothing that opens as a checkpoint, and running it again
restarts cleanly and produces the bit-exact result, in both directions.

The conversion runs as the CLI in a subprocess over a ~300 MB model. Every few milliseconds the test freezes it
(SIGSTOP), tries to open every directory it has created as a checkpoint, and lets it go on (SIGCONT); once the
data files are partly written it is killed (SIGKILL). A directory that opens must be complete: it is then read
in full and compared with the source.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from glm45_train.convert.mapping.table import Glm45Mapping
from glm45_train.convert.sources import HFTensorSource
from glm45_train.convert.to_hf import mcore_to_hf
from glm45_train.convert.to_mcore import hf_to_mcore
from glm45_train.convert.torch_dist.directory import McoreCheckpointDir
from glm45_train.convert.torch_dist.reader import McoreTensorSource
from glm45_train.formats.hf_io import HFCheckpointReader
from glm45_train.model.hf_config import Glm45Config
from glm45_train.model.tiny import synthetic_tensor, tiny_config, write_synthetic
from tests.conftest import REPO_ROOT

# The tiny Air layout at a size that takes a while to write: 3 MoE layers (MTP included) x 64 experts x 512^2.
MEDIUM = {
    **tiny_config("air", 2048, [0, 1, 2]),
    "hidden_size": 512,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "intermediate_size": 1024,
    "moe_intermediate_size": 512,
    "n_routed_experts": 64,
}


@pytest.fixture(scope="module")
def medium_hf(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("medium") / "hf"
    write_synthetic(out, MEDIUM, max_shard_bytes=100 * 2**20)
    return out


def opens_as_mcore(path: Path) -> bool:
    """What a loader needs: our metadata, Megatron's, DCP's, and every record it points to present."""
    try:
        directory = McoreCheckpointDir(path)
        metadata = FileSystemReader(str(directory.checkpoint)).read_metadata()
    except Exception:
        return False
    sizes: dict[str, int] = {}
    for info in metadata.storage_data.values():
        file = directory.checkpoint / info.relative_path
        if info.relative_path not in sizes:
            sizes[info.relative_path] = file.stat().st_size if file.exists() else -1
        if sizes[info.relative_path] < info.offset + info.length:
            return False
    return True


def opens_as_hf(path: Path) -> bool:
    """What a loader needs: config.json, the index, every shard with every tensor it lists."""
    try:
        reader = HFCheckpointReader(path)
        specs = reader.tensor_specs()
        Glm45Mapping(Glm45Config.from_file(path), "local").check_hf_names(specs)
    except Exception:
        return False
    return True


def mcore_equals_source(path: Path, source: Path) -> bool:
    expected, found = HFTensorSource(source), McoreTensorSource(path)
    return all(torch.equal(found.get(name), expected.get(name)) for name in found.names())


def hf_equals_source(path: Path) -> bool:
    reader = HFCheckpointReader(path)
    return all(
        torch.equal(tensor, synthetic_tensor(name, tuple(tensor.shape), tensor.dtype)) for name, tensor in reader
    )


def run_and_kill(args: list[str], root: Path, opens: Callable[[Path], bool], midway: Callable[[Path], bool]):
    """Run the CLI, freeze it at short intervals to try opening every directory under `root`, kill it once
    `midway(root)`. Returns (return code, [(seconds, directory) that opened])."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "glm45_train.cli.main", "export", *args, "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    opened, start = [], time.monotonic()
    while proc.poll() is None:
        os.kill(proc.pid, signal.SIGSTOP)
        opened += [(time.monotonic() - start, d) for d in directories(root) if opens(d)]
        if midway(root):
            os.kill(proc.pid, signal.SIGKILL)
            break
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.005)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, opened, err.decode()


def directories(root: Path) -> list[Path]:
    return [root, *(p for p in root.rglob("*") if p.is_dir())] if root.exists() else []


def allocated_bytes(root: Path, pattern: str) -> int:
    """Bytes actually on disk (the HF writer pre-sizes its sparse shard files)."""
    return sum(p.stat().st_blocks * 512 for p in root.rglob(pattern))


def test_hf_to_mcore_killed_midway_restarts_cleanly(medium_hf, tmp_path, megatron_world):
    out = tmp_path / "out"
    code, opened, err = run_and_kill(
        ["--to-mcore", "--model", str(medium_hf), "--output-dir", str(out)],
        tmp_path,
        opens_as_mcore,
        midway=lambda root: allocated_bytes(root, "*.distcp") > 50 * 2**20,
    )
    assert code == -signal.SIGKILL, f"the conversion was not killed midway (exit {code}): {err[-2000:]}"
    assert opened == [] and not out.exists()
    assert list(tmp_path.glob(".out.partial/release/*.distcp"))  # it had written part of the data
    hf_to_mcore(medium_hf, out)  # the same conversion again
    assert opens_as_mcore(out) and not list(tmp_path.glob(".out.*"))
    assert mcore_equals_source(out, medium_hf)


def test_mcore_to_hf_killed_midway_restarts_cleanly(medium_hf, tmp_path, megatron_world):
    mcore, out = hf_to_mcore(medium_hf, tmp_path / "mcore").output_dir, tmp_path / "back"
    code, opened, err = run_and_kill(
        ["--to-hf", "--model", str(mcore), "--output-dir", str(out)],
        tmp_path,
        lambda d: d != mcore and opens_as_hf(d),
        midway=lambda root: allocated_bytes(root, "*.safetensors.partial") > 50 * 2**20,
    )
    assert code == -signal.SIGKILL, f"the export was not killed midway (exit {code}): {err[-2000:]}"
    assert opened == [] and not out.exists()
    mcore_to_hf(mcore, out)
    assert opens_as_hf(out) and not list(tmp_path.glob(".back.*"))
    assert hf_equals_source(out)


def test_the_judges_accept_complete_checkpoints_only(medium_hf, tmp_path, megatron_world):
    """Negative control: the checks above would see a partial checkpoint if one existed."""
    mcore = hf_to_mcore(medium_hf, tmp_path / "mcore").output_dir
    assert opens_as_mcore(mcore) and opens_as_hf(medium_hf)
    assert mcore_equals_source(mcore, medium_hf) and hf_equals_source(medium_hf)
    record = max((mcore / "release").glob("*.distcp"), key=lambda p: p.stat().st_size)
    os.truncate(record, record.stat().st_size // 2)
    assert not opens_as_mcore(mcore)
    shard = next(medium_hf.glob("model-*.safetensors"))
    broken = tmp_path / "broken-hf"
    broken.mkdir()
    for path in medium_hf.iterdir():
        (broken / path.name).symlink_to(path)
    (broken / shard.name).unlink()
    (broken / shard.name).write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert not opens_as_hf(broken)
