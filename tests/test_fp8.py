"""FP8 sources: `make-tiny --fp8` writes the releases' two FP8 layouts; conversion dequantises them to bf16 while
streaming, bit-exact against an independent dequantisation and within FP8 rounding of the bf16 weights they were
quantised from; any other quantisation scheme is refused by name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from glm45_train.cli.main import main as cli
from glm45_train.convert.precision.check import check
from glm45_train.convert.to_hf import mcore_to_hf
from glm45_train.convert.to_mcore import hf_to_mcore
from glm45_train.convert.torch_dist.reader import McoreTensorSource
from glm45_train.formats.fp8 import BLOCK, PER_CHANNEL, dequantize, quantize
from glm45_train.formats.hf_io import HFCheckpointReader
from glm45_train.model.tiny import make_tiny

SCALE = {"per-channel": "weight_scale", "block": "weight_scale_inv"}


@pytest.fixture(scope="module")
def fp8_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp8")
    return {kind: make_tiny(root / kind, preset="air", seed=0, fp8=kind) for kind in SCALE}


@pytest.fixture(scope="module")
def converted(fp8_dirs, tmp_path_factory, megatron_world) -> dict[str, tuple[Path, Path]]:
    """Each FP8 tiny checkpoint converted to mcore and back to HF: {kind: (mcore dir, hf dir)}."""
    root = tmp_path_factory.mktemp("fp8-converted")
    out = {}
    for kind, source in fp8_dirs.items():
        mcore = hf_to_mcore(source, root / f"{kind}-mcore").output_dir
        out[kind] = (mcore, mcore_to_hf(mcore, root / f"{kind}-hf").output_dir)
    return out


def raw_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint as stored (read with the safetensors package, not our reader)."""
    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    return tensors


def reference_dequantize(fp8: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
    """Written independently of convert/fp8.py: a Kronecker-expanded block scale, a broadcast channel scale."""
    values = fp8.float()
    if kind == "per-channel":
        return (values * scale.float().reshape(-1, 1)).to(torch.bfloat16)
    expanded = torch.kron(scale.float(), torch.ones(128, 128))[: values.shape[0], : values.shape[1]]
    return (values * expanded).to(torch.bfloat16)


@pytest.mark.parametrize("kind", ["per-channel", "block"])
def test_make_tiny_fp8_writes_the_release_layout(fp8_dirs, tiny_air, kind):
    stored, config = raw_tensors(fp8_dirs[kind]), json.loads((fp8_dirs[kind] / "config.json").read_text())
    method = config["quantization_config"]["quant_method"]
    assert method == {"per-channel": "compressed-tensors", "block": "fp8"}[kind]
    names_bf16 = set(HFCheckpointReader(tiny_air).names())
    fp8 = {name for name, t in stored.items() if t.dtype == torch.float8_e4m3fn}
    assert fp8 and fp8 == {n for n in names_bf16 if n.endswith("_proj.weight")}  # experts, attention, eh_proj...
    assert {n[: -len(SCALE[kind])] + "weight" for n in stored if n.endswith(SCALE[kind])} == fp8
    for name in names_bf16 - fp8:  # norms, biases, router, embeddings, heads
        assert stored[name].dtype == (torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16)
    q = stored["model.layers.1.mlp.experts.3.up_proj.weight"]
    scale = stored["model.layers.1.mlp.experts.3.up_proj." + SCALE[kind]]
    assert scale.dtype == {"per-channel": torch.bfloat16, "block": torch.float32}[kind]
    assert tuple(scale.shape) == {"per-channel": (q.shape[0], 1), "block": (1, 1)}[kind]


@pytest.mark.parametrize("kind", ["per-channel", "block"])
def test_conversion_dequantises_bit_exactly_and_within_fp8_rounding(fp8_dirs, tiny_air, converted, kind):
    stored, bf16 = raw_tensors(fp8_dirs[kind]), raw_tensors(tiny_air)
    exported = raw_tensors(converted[kind][1])
    assert set(exported) == set(bf16)  # scales gone, every tensor (MTP included) present
    for name, original in bf16.items():
        out = exported[name]
        assert out.dtype == original.dtype, name
        if stored[name].dtype != torch.float8_e4m3fn:
            assert torch.equal(out, original), name
            continue
        scale = stored[name[: -len("weight")] + SCALE[kind]]
        assert torch.equal(out, reference_dequantize(stored[name], scale, kind)), name
        bound = 2**-4 * original.float().abs() + 2**-9 * per_element(scale, kind, original.shape)
        assert ((out.float() - original.float()).abs() <= bound).all(), name


def per_element(scale: torch.Tensor, kind: str, shape) -> torch.Tensor:
    if kind == "per-channel":
        return scale.float().reshape(-1, 1).expand(shape)
    return torch.kron(scale.float(), torch.ones(128, 128))[: shape[0], : shape[1]]


def test_dequantised_checkpoint_records_its_origin_and_passes_the_precision_check(fp8_dirs, converted):
    mcore, hf = converted["block"]
    metadata = json.loads((mcore / "glm45_train.json").read_text())
    assert metadata["conversion"]["dequantized_from"] == "fp8 block"
    assert "quantization_config" in metadata["source"]["config"]  # the source, as it was
    assert "quantization_config" not in json.loads((hf / "config.json").read_text())  # the export is bf16
    report = check(fp8_dirs["block"], McoreTensorSource(mcore), dtype="fp32")
    assert report.mode == "layerwise" and report.passed, report.format()


def test_row_ranges_dequantise_like_the_whole_tensor():
    weight = torch.randn(300, 260, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    for scheme, kind in ((PER_CHANNEL, "per-channel"), (BLOCK, "block")):
        fp8, scale = quantize(weight, scheme)
        whole = dequantize(fp8, scale, scheme)
        assert torch.equal(whole, reference_dequantize(fp8, scale, kind))
        for start, stop in ((0, 1), (100, 200), (127, 129), (250, 300)):  # across 128-row block edges
            assert torch.equal(dequantize(fp8[start:stop], scale, scheme, row=start), whole[start:stop])


@pytest.mark.parametrize(
    ("change", "culprit"),
    [
        ({"quant_method": "gptq", "bits": 4}, "gptq"),
        ({"weight_block_size": [64, 64]}, "weight_block_size"),
        ({"activation_scheme": "static"}, "static"),
        ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "pack-quantized"),
    ],
)
def test_other_schemes_are_refused_by_name(fp8_dirs, tmp_path, capsys, change, culprit):
    source = Path(shutil.copytree(fp8_dirs["block"], tmp_path / "source"))
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"].update(change)
    (source / "config.json").write_text(json.dumps(config))
    code = cli(["export", "--to-mcore", "--model", str(source), "--output-dir", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and culprit in err and "quantization_config" in err, err
    assert not (tmp_path / "out").exists()


def test_compressed_tensors_group_strategy_is_refused(fp8_dirs, tmp_path, capsys):
    source = Path(shutil.copytree(fp8_dirs["per-channel"], tmp_path / "source"))
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "group"
    (source / "config.json").write_text(json.dumps(config))
    code = cli(["export", "--to-mcore", "--model", str(source), "--output-dir", str(tmp_path / "out"), "--no-progress"])
    assert code == 2 and "'group'" in capsys.readouterr().err


def test_fp8_weight_without_its_scale_is_named(fp8_dirs, tmp_path, capsys):
    source = Path(shutil.copytree(fp8_dirs["per-channel"], tmp_path / "source"))
    index = json.loads((source / "model.safetensors.index.json").read_text())
    dropped = "model.layers.2.mlp.experts.5.down_proj.weight_scale"
    del index["weight_map"][dropped]
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    code = cli(["export", "--to-mcore", "--model", str(source), "--output-dir", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "model.layers.2.mlp.experts.5.down_proj.weight" in err and "weight_scale" in err, err
