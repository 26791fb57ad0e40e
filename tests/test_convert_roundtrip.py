"""HF -> Megatron torch_dist -> HF is bit-exact, the checkpoint is Megatron-LM's layout with TE-style keys, and it
records where it came from. (Parallel write/load layouts: test_mcore_layouts.py; bad input: test_convert_bad_input.py.)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from glm45_train.cli.main import main as cli
from glm45_train.convert.load import load_mcore
from glm45_train.convert.sources import HFTensorSource, load_weights
from glm45_train.convert.to_hf import mcore_to_hf
from glm45_train.convert.to_mcore import hf_to_mcore
from glm45_train.convert.torch_dist.reader import McoreTensorSource
from glm45_train.formats.hf_io import HFCheckpointReader
from glm45_train.model.build import build_model
from glm45_train.model.hf_config import Glm45Config, to_transformer_config

EXPERT_BIAS = "model.layers.{}.mlp.gate.e_score_correction_bias"


def tensor_digests(hf_dir: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """name -> (dtype, shape, sha256 of the raw bytes) for every tensor of an HF checkpoint."""
    digests = {}
    for name, tensor in HFCheckpointReader(hf_dir):
        raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        digests[name] = (str(tensor.dtype), tuple(tensor.shape), hashlib.sha256(raw).hexdigest())
    return digests


def checkpoint_keys(mcore_dir: Path) -> dict[str, object]:
    """torch_dist key -> storage metadata (tensors: size and dtype)."""
    return FileSystemReader(str(mcore_dir / "release")).read_metadata().state_dict_metadata


@pytest.mark.parametrize("preset", ["air", "glm45"])
def test_hf_mcore_hf_is_bit_exact(tiny_dirs, mcore_dirs, tmp_path, preset):
    summary = mcore_to_hf(mcore_dirs[preset], tmp_path / "hf")
    source, back = tensor_digests(tiny_dirs[preset]), tensor_digests(tmp_path / "hf")
    assert back == source  # same names, dtypes, shapes and bytes
    hf = Glm45Config.from_file(tiny_dirs[preset])
    mtp = f"model.layers.{hf.num_hidden_layers}."
    for name in ("enorm.weight", "eh_proj.weight", "embed_tokens.weight", "shared_head.head.weight"):
        assert mtp + name in back
    assert back[EXPERT_BIAS.format(hf.num_hidden_layers)][0] == "torch.float32"
    assert summary.tensors == len(source) and summary.bytes > 0 and summary.peak_rss_bytes > 0


def test_fp32_checkpoint_round_trips_to_the_source_dtypes(tiny_air, megatron_world, tmp_path):
    hf_to_mcore(tiny_air, tmp_path / "mcore", dtype="fp32")
    dtypes = {
        getattr(md, "properties", None) and md.properties.dtype for md in checkpoint_keys(tmp_path / "mcore").values()
    }
    assert dtypes - {None} == {torch.float32}
    mcore_to_hf(tmp_path / "mcore", tmp_path / "hf")
    assert tensor_digests(tmp_path / "hf") == tensor_digests(tiny_air)


def test_checkpoint_is_megatron_lm_layout_with_te_style_keys(mcore_dirs):
    root = mcore_dirs["glm45"]
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    assert json.loads((root / "release" / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    common = torch.load(root / "release" / "common.pt", weights_only=False)
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 0
    keys = checkpoint_keys(root)
    assert not [k for k in keys if "input_layernorm" in k]
    dense, moe, mtp = "decoder.layers.0.", "decoder.layers.4.", "mtp.layers.0."
    assert dense + "self_attention.linear_qkv.layer_norm_weight" in keys
    assert dense + "mlp.linear_fc1.layer_norm_weight" in keys  # TE fuses the dense pre-MLP norm into fc1
    assert moe + "pre_mlp_layernorm.weight" in keys and moe + "mlp.linear_fc1.layer_norm_weight" not in keys
    assert mtp + "transformer_layer.pre_mlp_layernorm.weight" in keys
    assert keys[moe + "mlp.experts.experts.linear_fc1.weight"].size == torch.Size([8, 64, 64])
    assert keys[moe + "mlp.router.expert_bias"].properties.dtype == torch.float32
    assert keys[moe + "mlp.router.weight"].properties.dtype == torch.bfloat16
    assert moe + "pre_mlp_layernorm._extra_state/shard_0_1" in keys  # what a TE norm asks for on load


def test_metadata_records_the_source_config_and_tokenizer(tiny_glm45, mcore_dirs):
    root = mcore_dirs["glm45"]
    metadata = json.loads((root / "glm45_train.json").read_text())
    assert metadata["source"]["config"] == json.loads((tiny_glm45 / "config.json").read_text())
    files = metadata["source"]["files"]
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ):
        assert (root / "hf_assets" / name).read_bytes() == (tiny_glm45 / name).read_bytes()
        assert files[name] == hashlib.sha256((tiny_glm45 / name).read_bytes()).hexdigest()
    assert metadata["conversion"]["dtype"] == "bf16" and metadata["conversion"]["layout"]["ep"] == 1
    assert metadata["hf_dtypes"]["default"] == "BF16"
    assert set(metadata["hf_dtypes"]["exceptions"].values()) == {"F32"}  # the expert biases


def test_hf_export_has_size_limited_shards_and_the_source_files(tiny_air, mcore_dirs, tmp_path):
    mcore_to_hf(mcore_dirs["air"], tmp_path / "hf", max_shard_bytes=300_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 4 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert all((tmp_path / "hf" / s).stat().st_size < 300_000 + 200_000 for s in shards)  # + one tensor, header
    for name in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / "hf" / name).read_bytes() == (tiny_air / name).read_bytes()
    assert not list(tmp_path.glob(".*partial*"))


def test_mcore_source_and_load_mcore_give_the_hf_weights(tiny_glm45, mcore_dirs, megatron_world):
    hf_source, mcore_source = HFTensorSource(tiny_glm45), McoreTensorSource(mcore_dirs["glm45"])
    for name in mcore_source.names():
        assert torch.equal(mcore_source.get(name), hf_source.get(name)), name
    hf = hf_source.hf
    expected = build_model(hf, to_transformer_config(hf, perform_initialization=False))
    load_weights(expected, hf_source)
    model = build_model(hf, to_transformer_config(hf, perform_initialization=False))
    assert load_mcore(model, mcore_dirs["glm45"]) > 0
    want = expected.state_dict()
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, want[name]), name  # expert_bias buffers included


def test_cli_export_both_ways_with_precision_check(tiny_air, tmp_path, capsys):
    mcore, hf = tmp_path / "mcore", tmp_path / "hf"
    assert cli(["export", "--to-mcore", "--model", str(tiny_air), "--output-dir", str(mcore), "--no-progress"]) == 0
    code = cli(["export", "--to-hf", "--model", str(mcore), "--output-dir", str(hf), "--test-precision"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "hf->mcore:" in out and "mcore->hf:" in out and "GB/s" in out and "peak RSS" in out
    assert "PASS" in out
    assert tensor_digests(hf) == tensor_digests(tiny_air)
