"""Opening a torch_dist checkpoint never runs code from it: poisoned `.metadata`, `common.pt` and `.distcp` records
are refused by every command that reads one, naming the file and the refused global, and the payload's marker file
never appears. Controls: each payload does create the marker when unpickled without the allow-list; real
checkpoints (converted, LoRA and full training runs) load; a harmless unknown class is refused with how to allow it.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint.metadata as dcp_metadata

from glm45_train.cli.main import main
from glm45_train.formats import safe_pickle
from glm45_train.formats.dcp_reader import SafeFileSystemReader
from tests.conftest import REPO_ROOT

REFUSED = "refused to unpickle pathlib.Path.touch"
TRAIN = [
    f"data.inputs=[{REPO_ROOT / 'data/sample_distill.jsonl'}]", "parallel.ep=1", "train.global_batch_size=2",
    "train.steps=2", "checkpoint.interval=2", "eval.interval=0", "logging.tensorboard=false", "logging.plot=false",
]  # fmt: skip


class Payload:
    """What a crafted checkpoint would carry: unpickling it creates `marker` (any code would run the same way)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _metadata(checkpoint: Path):
    return safe_pickle.load_dcp_metadata(checkpoint / ".metadata")


def _write_metadata(checkpoint: Path, metadata) -> None:
    with open(checkpoint / ".metadata", "wb") as file:
        pickle.dump(metadata, file, protocol=4)


def poison_metadata(checkpoint: Path, marker: Path) -> Path:
    metadata = _metadata(checkpoint)
    metadata.planner_data = Payload(marker)
    _write_metadata(checkpoint, metadata)
    return checkpoint / ".metadata"


def poison_common(checkpoint: Path, marker: Path) -> Path:
    path = checkpoint / "common.pt"
    common = torch.load(path, weights_only=True)
    torch.save({**common, "payload": Payload(marker)}, path, pickle_protocol=4)
    return path


def poison_record(checkpoint: Path, marker: Path, key_part: str) -> Path:
    """Point the first record whose key contains `key_part` at a payload appended to its .distcp file."""
    metadata = _metadata(checkpoint)
    index = next(index for index in metadata.storage_data if key_part in index.fqn)
    info = metadata.storage_data[index]
    path = checkpoint / info.relative_path
    record = io.BytesIO()
    torch.save(Payload(marker), record, pickle_protocol=4)
    offset = path.stat().st_size
    with open(path, "ab") as file:
        file.write(record.getvalue())
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(record.getvalue()))
    _write_metadata(checkpoint, metadata)
    return path


def poison(checkpoint: Path, kind: str, marker: Path, record_key: str) -> Path:
    if kind == "metadata":
        return poison_metadata(checkpoint, marker)
    if kind == "common":
        return poison_common(checkpoint, marker)
    return poison_record(checkpoint, marker, record_key)


def unrestricted_load(path: Path, kind: str, checkpoint: Path, record_key: str) -> None:
    """What PyTorch/Megatron would do with the file without the allow-list (the negative control)."""
    if kind == "metadata":
        with open(path, "rb") as file:
            pickle.load(file)  # FileSystemReader.read_metadata
    elif kind == "common":
        torch.load(path, weights_only=False)  # as TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD makes Megatron's load_common
    else:
        metadata = _metadata(checkpoint)
        info = next(info for index, info in metadata.storage_data.items() if record_key in index.fqn)
        raw = path.read_bytes()[info.offset : info.offset + info.length]
        torch.load(io.BytesIO(raw), weights_only=False)  # DefaultLoadPlanner.load_bytes


def assert_refused(code: int, err: str, culprit: Path, marker: Path) -> None:
    assert code == 2, err[-3000:]
    assert f"{culprit}" in err and REFUSED in err, err[-3000:]
    assert "Traceback" not in err
    assert not marker.exists()


@pytest.fixture(scope="module")
def converted(mcore_dirs) -> Path:
    return mcore_dirs["air"]


@pytest.fixture(scope="module")
def lora_run(tiny_air, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("safe-lora") / "run"
    recipe = str(REPO_ROOT / "recipes/tiny_lora.yaml")
    assert main(["sft", recipe, f"model.source={tiny_air}", f"checkpoint.dir={run_dir}", *TRAIN]) == 0
    return run_dir


def _copy(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "copy"))


CONVERTED_RECORD = "embedding.word_embeddings.weight"


@pytest.mark.parametrize("kind", ["metadata", "common", "record"])
def test_payloads_run_code_without_the_allow_list(converted, tmp_path, kind):
    """Negative control: each poisoned file does create the marker when opened the way PyTorch/Megatron would."""
    checkpoint = _copy(converted, tmp_path) / "release"
    marker = tmp_path / "pwned"
    path = poison(checkpoint, kind, marker, CONVERTED_RECORD)
    unrestricted_load(path, kind, checkpoint, CONVERTED_RECORD)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["metadata", "record"])
def test_export_and_check_refuse_a_poisoned_conversion(converted, tiny_air, tmp_path, capsys, kind):
    root = _copy(converted, tmp_path)
    marker = tmp_path / "pwned"
    culprit = poison(root / "release", kind, marker, CONVERTED_RECORD)
    code = main(["export", "--to-hf", "--model", str(root), "--output-dir", str(tmp_path / "hf"), "--no-progress"])
    assert_refused(code, capsys.readouterr().err, culprit, marker)
    assert_refused(main(["check", str(tiny_air), str(root)]), capsys.readouterr().err, culprit, marker)
    assert main(["push", str(root), "--repo-id", "someone/model"]) == 2  # not an export: refused, nothing unpickled
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["metadata", "common", "record"])
def test_sft_refuses_a_poisoned_model_source(converted, tmp_path, capsys, kind):
    root = _copy(converted, tmp_path)
    marker = tmp_path / "pwned"
    culprit = poison(root / "release", kind, marker, CONVERTED_RECORD)
    recipe = str(REPO_ROOT / "recipes/tiny_sft.yaml")
    code = main(["sft", recipe, f"model.source={root}", f"checkpoint.dir={tmp_path / 'run'}", *TRAIN])
    assert_refused(code, capsys.readouterr().err, culprit, marker)


@pytest.mark.parametrize("kind", ["metadata", "common", "record"])
def test_resume_and_lora_export_refuse_a_poisoned_run(lora_run, tiny_air, tmp_path, capsys, kind):
    run_dir = _copy(lora_run, tmp_path)
    marker = tmp_path / "pwned"
    # resume reads every record (the RNG state is an object record); the adapter export reads the adapters
    culprit = poison(run_dir / "iter_0000002", kind, marker, "rng_state")
    recipe = str(REPO_ROOT / "recipes/tiny_lora.yaml")
    code = main(["sft", recipe, f"model.source={tiny_air}", f"checkpoint.dir={run_dir}", *TRAIN])
    assert_refused(code, capsys.readouterr().err, culprit, marker)

    run_dir = Path(shutil.copytree(lora_run, tmp_path / "adapters"))
    culprit = poison(run_dir / "iter_0000002", kind, marker, "lora_A")
    code = main(["export", "--to-hf", "--model", str(run_dir), "--output-dir", str(tmp_path / "hf"), "--no-progress"])
    assert_refused(code, capsys.readouterr().err, culprit, marker)


def test_real_checkpoints_pass_the_allow_list(converted, lora_run, tmp_path):
    """Every pickle of a converted checkpoint and a LoRA run loads (full runs: test_sft, test_pipeline)."""
    for checkpoint in (converted / "release", lora_run / "iter_0000002"):
        metadata = _metadata(checkpoint)
        assert metadata.state_dict_metadata
        assert safe_pickle.torch_load((checkpoint / "common.pt").read_bytes(), source="common.pt")
        for index, info in metadata.storage_data.items():
            raw = (checkpoint / info.relative_path).read_bytes()[info.offset : info.offset + info.length]
            safe_pickle.torch_load(raw, source=index.fqn)


@dataclasses.dataclass
class FutureStorageMetadata:
    """A metadata class a newer PyTorch might add: plain data, but not on our list."""

    size: int = 0


def test_unknown_harmless_class_says_what_to_allow(converted, tmp_path, capsys, monkeypatch):
    name = "torch.distributed.checkpoint.metadata.FutureStorageMetadata"
    monkeypatch.setattr(FutureStorageMetadata, "__module__", dcp_metadata.__name__)
    monkeypatch.setattr(dcp_metadata, "FutureStorageMetadata", FutureStorageMetadata, raising=False)
    root = _copy(converted, tmp_path)
    metadata = _metadata(root / "release")
    metadata.state_dict_metadata["future.key"] = FutureStorageMetadata(3)
    _write_metadata(root / "release", metadata)

    code = main(["export", "--to-hf", "--model", str(root), "--output-dir", str(tmp_path / "hf"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{root / 'release' / '.metadata'}: refused to unpickle {name}" in err
    assert f"safe_pickle.allow('{name}')" in err and "DCP_METADATA_GLOBALS" in err

    monkeypatch.setattr(safe_pickle, "_allowed_by_caller", set())
    safe_pickle.allow(name)  # what the message says to do
    assert _metadata(root / "release").state_dict_metadata["future.key"] == FutureStorageMetadata(3)


def test_reader_refuses_planners_that_would_unpickle_bytes(converted):
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.planner import LoadPlan

    reader = SafeFileSystemReader(converted / "release")
    with pytest.raises(TypeError, match="SafeObjectLoading"):
        reader.read_data(LoadPlan([]), DefaultLoadPlanner())


def test_options_may_follow_overrides(capsys):
    recipe = str(REPO_ROOT / "recipes/tiny_sft.yaml")
    assert main(["sft", recipe, "--print-config", "train.lr=3e-4", "parallel.ep=1"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.0003" in out and "ep: 1" in out
    code = main(["plan", str(REPO_ROOT / "recipes/air_lora.yaml"), "--gpu", "h20", "parallel.tp=2", "--config", "air"])
    assert code in (0, 1) and "tp 2 x" in capsys.readouterr().out.lower()
    with pytest.raises(SystemExit):  # control: an unknown option is still refused
        main(["sft", recipe, "train.lr=3e-4", "--no-such-option"])
