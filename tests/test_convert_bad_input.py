"""Bad input to `export`: a clear error naming the culprit, exit status 2, and no output that looks complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from glm45_train.cli.main import main as cli
from glm45_train.convert.sources import HFTensorSource
from glm45_train.convert.to_mcore import hf_to_mcore
from glm45_train.formats.hf_io import CheckpointError


@pytest.fixture
def broken_copy(tiny_air, tmp_path) -> Path:
    """A private copy of the tiny Air checkpoint to damage."""
    return Path(shutil.copytree(tiny_air, tmp_path / "source"))


def export_to_mcore(source: Path, out: Path, *extra: str) -> int:
    return cli(["export", "--to-mcore", "--model", str(source), "--output-dir", str(out), "--no-progress", *extra])


def assert_failed_cleanly(code: int, out: Path, capsys, *culprits: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("glm45-train export: error:") and err.count("\n") == 1, err  # one line, no traceback
    for culprit in culprits:
        assert culprit in err, err
    assert not out.exists() or not any(out.iterdir())  # nothing that looks like a checkpoint
    assert not list(out.parent.glob(f".{out.name}.*"))  # no staging left behind


def shard_of(source: Path, tensor: str) -> str:
    return json.loads((source / "model.safetensors.index.json").read_text())["weight_map"][tensor]


def test_shard_listed_in_the_index_but_missing(broken_copy, tmp_path, capsys):
    shard = shard_of(broken_copy, "lm_head.weight")
    (broken_copy / shard).unlink()
    out = tmp_path / "out"
    assert_failed_cleanly(export_to_mcore(broken_copy, out), out, capsys, shard, "do not exist")


def test_truncated_safetensors_file(broken_copy, tmp_path, capsys):
    shard = broken_copy / shard_of(broken_copy, "model.layers.1.mlp.experts.0.up_proj.weight")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out = tmp_path / "out"
    assert_failed_cleanly(export_to_mcore(broken_copy, out), out, capsys, shard.name)


def test_wrong_model_type(broken_copy, tmp_path, capsys):
    config = json.loads((broken_copy / "config.json").read_text())
    (broken_copy / "config.json").write_text(json.dumps({**config, "model_type": "deepseek_v3"}))
    out = tmp_path / "out"
    assert_failed_cleanly(export_to_mcore(broken_copy, out), out, capsys, "config.json", "deepseek_v3", "glm4_moe")


def test_tensor_shape_disagrees_with_the_config(broken_copy, tmp_path, capsys):
    config = json.loads((broken_copy / "config.json").read_text())
    (broken_copy / "config.json").write_text(json.dumps({**config, "moe_intermediate_size": 16}))
    out = tmp_path / "out"
    code = export_to_mcore(broken_copy, out)
    assert_failed_cleanly(code, out, capsys, "model.layers.1.mlp.experts.", "32", "config.json implies")


def test_non_empty_output_dir_without_overwrite(tiny_air, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err_code = export_to_mcore(tiny_air, out)
    err = capsys.readouterr().err
    assert err_code == 2 and str(out) in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_overwrite_replaces_the_output_dir(tiny_air, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert export_to_mcore(tiny_air, out, "--overwrite") == 0
    assert not (out / "stale.txt").exists() and (out / "release" / "metadata.json").exists()


def test_failure_while_writing_leaves_no_checkpoint(tiny_air, tmp_path, monkeypatch, megatron_world):
    real_get = HFTensorSource.get

    def failing_get(self, name):
        if name.startswith("mtp."):
            raise CheckpointError(f"disk error reading {name}")
        return real_get(self, name)

    monkeypatch.setattr(HFTensorSource, "get", failing_get)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="disk error reading mtp"):
        hf_to_mcore(tiny_air, out)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_layout_needing_more_processes_says_how_to_launch(tiny_air, tmp_path, capsys):
    out = tmp_path / "out"
    assert_failed_cleanly(export_to_mcore(tiny_air, out, "--tp", "2"), out, capsys, "tp=2", "torchrun")


def test_layout_flags_are_refused_for_hf_export(mcore_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli(["export", "--to-hf", "--model", str(mcore_dirs["air"]), "--output-dir", str(out), "--ep", "2"])
    assert_failed_cleanly(code, out, capsys, "--ep")


def test_hf_export_of_a_directory_that_is_no_checkpoint(tiny_air, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli(["export", "--to-hf", "--model", str(tiny_air), "--output-dir", str(out)])
    assert_failed_cleanly(code, out, capsys, str(tiny_air), "not a Megatron torch_dist checkpoint")


def test_unknown_model_is_neither_a_directory_nor_a_model_id(tmp_path, capsys):
    out = tmp_path / "out"
    assert_failed_cleanly(export_to_mcore(tmp_path / "nowhere", out), out, capsys, "nowhere", "ModelScope")


def test_output_dir_that_would_replace_the_source(broken_copy, capsys):
    code = export_to_mcore(broken_copy, broken_copy, "--overwrite")
    err = capsys.readouterr().err
    assert code == 2 and "would replace the source" in err
    assert (broken_copy / "config.json").exists()


def _rewrite_tensor(source: Path, tensor: str, change) -> None:
    """Replace one tensor of its shard by `change(tensor)` (the shard's other tensors and metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shard = source / shard_of(source, tensor)
    with safe_open(shard, "pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (no __iter__)
        metadata = handle.metadata()
    tensors[tensor] = change(tensors[tensor])
    save_file(tensors, shard, metadata=metadata)


def test_a_non_float_weight_is_refused_at_the_door_naming_it(broken_copy, tmp_path, capsys):
    """An int32 weight once converted (exit 0) and broke --to-hf later with KeyError 'I32'."""
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    _rewrite_tensor(broken_copy, name, lambda t: t.to(torch.int32))
    out = tmp_path / "out"
    assert_failed_cleanly(export_to_mcore(broken_copy, out), out, capsys, name, "I32")


def test_fp16_and_non_finite_sources_convert_with_a_warning_naming_them(broken_copy, tmp_path, capsys):
    """Converted as they are (the user may mean it) but said: FP16 tensors, and NaN/Inf counts per tensor."""
    _rewrite_tensor(broken_copy, "model.norm.weight", lambda t: t.to(torch.float16))
    poisoned = "model.layers.0.self_attn.o_proj.weight"

    def poison(tensor):
        tensor = tensor.clone()
        tensor.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        return tensor

    _rewrite_tensor(broken_copy, poisoned, poison)
    assert export_to_mcore(broken_copy, tmp_path / "out", "--dtype", "fp32") == 0
    printed = capsys.readouterr().out
    assert "1 source tensor(s) are F16 (e.g. model.norm.weight)" in printed, printed
    assert "NaN/Inf values in 1 tensor(s): decoder.layers.0.self_attention.linear_proj.weight (3)" in printed, printed


def test_non_finite_count_needs_no_full_size_temporary():
    from glm45_train.convert.sources import non_finite_count

    big = torch.full((1000, 1000), 3e38, dtype=torch.float32)  # a sum would overflow: the check does not
    assert non_finite_count(big) == 0 and non_finite_count(big[:0]) == 0
    big[7, 7], big[999, 999] = float("nan"), float("inf")
    assert non_finite_count(big, block_elements=4096) == 2
    assert non_finite_count(torch.arange(5)) == 0  # integers hold no NaN


@pytest.mark.parametrize(
    ("damage", "culprits"),
    [
        ({"latest_checkpointed_iteration.txt": "garbage\n"}, ["latest_checkpointed_iteration.txt", "'garbage'"]),
        ({"latest_checkpointed_iteration.txt": "7\n"}, ["points at iter_0000007", "missing or incomplete"]),
        ({"glm45_train.json": "{not json"}, ["glm45_train.json: damaged, not JSON"]),
    ],
)
def test_a_damaged_checkpoint_directory_is_named_not_a_traceback(mcore_dirs, tmp_path, capsys, damage, culprits):
    """A garbage or dangling tracker and a corrupt glm45_train.json once gave ValueError/JSONDecodeError
    tracebacks; the dangling one said there was no tracker file at all."""
    damaged = Path(shutil.copytree(mcore_dirs["air"], tmp_path / "damaged"))
    for name, text in damage.items():
        (damaged / name).write_text(text)
    out = tmp_path / "out"
    code = cli(["export", "--to-hf", "--model", str(damaged), "--output-dir", str(out), "--no-progress"])
    assert_failed_cleanly(code, out, capsys, *culprits)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"num_hidden_layers": 2}, "config.json num_hidden_layers is 2, the shards hold 3 layers"),
        ({"num_nextn_predict_layers": 0}, "num_nextn_predict_layers is 0 (1 when config.json leaves it out"),
        ({"n_routed_experts": 16}, "config.json n_routed_experts is 16, the shards hold 8"),
    ],
)
def test_a_wrong_count_in_the_config_is_named_before_the_tensors(broken_copy, tmp_path, capsys, change, named):
    """Once reported only as 44 'tensors no rule covers'."""
    config = json.loads((broken_copy / "config.json").read_text())
    (broken_copy / "config.json").write_text(json.dumps({**config, **change}))
    out = tmp_path / "out"
    assert_failed_cleanly(export_to_mcore(broken_copy, out), out, capsys, f"config: {named}")


def flip_a_byte_inside_a_tensor(checkpoint: Path) -> Path:
    """One bit of the largest tensor record's data flipped (its middle: past the zip headers, before the
    descriptors and directory); the `.distcp` file it is in."""
    from glm45_train.formats.safe_pickle import load_dcp_metadata

    metadata_file = next(checkpoint.rglob(".metadata"))
    info = max(load_dcp_metadata(metadata_file).storage_data.values(), key=lambda info: info.length)
    damaged = metadata_file.parent / info.relative_path
    with damaged.open("r+b") as stream:
        stream.seek(info.offset + info.length // 2)
        byte = stream.read(1)[0]
        stream.seek(-1, 1)
        stream.write(bytes([byte ^ 0x10]))
    return damaged


def test_a_flipped_byte_in_a_distcp_record_is_named_by_every_reader(mcore_dirs, tmp_path, capsys):
    """Once exit 0 with wrong tensors: our records carried no CRC32 and torch.load checks none. Now the CRC is
    written (by zlib, as the bytes pass) and checked by our fast reader (export, check) and by the one training
    resumes through (torch.load's path). Control: the undamaged copy exports."""
    from glm45_train.formats.safe_pickle import CorruptRecord, load_dcp_metadata, torch_load

    intact = Path(shutil.copytree(mcore_dirs["air"], tmp_path / "intact"))
    ok = tmp_path / "ok"
    assert cli(["export", "--to-hf", "--model", str(intact), "--output-dir", str(ok), "--no-progress"]) == 0
    damaged_dir = Path(shutil.copytree(mcore_dirs["air"], tmp_path / "damaged"))
    damaged = flip_a_byte_inside_a_tensor(damaged_dir)
    capsys.readouterr()
    out = tmp_path / "out"
    code = cli(["export", "--to-hf", "--model", str(damaged_dir), "--output-dir", str(out), "--no-progress"])
    assert_failed_cleanly(code, out, capsys, str(damaged), "does not match its CRC32 (damaged file)")

    metadata = load_dcp_metadata(damaged.parent / ".metadata")
    info = max(metadata.storage_data.values(), key=lambda info: info.length)
    record = damaged.read_bytes()[info.offset : info.offset + info.length]
    with pytest.raises(CorruptRecord, match="do not match the record's CRC32"):
        torch_load(record, source=str(damaged))
    intact_record = (intact / damaged.relative_to(damaged_dir)).read_bytes()[info.offset : info.offset + info.length]
    assert torch_load(intact_record, source="intact").numel() > 0
