"""Precision check: parity with transformers at fp32 rounding level, and negative controls that must fail."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from glm45_train.convert.mapping import transforms
from glm45_train.convert.mapping.table import MappingError
from glm45_train.convert.precision.check import check
from glm45_train.convert.sources import HFTensorSource
from glm45_train.model.tiny import make_tiny


class PlantedSource:
    """An HF tensor source with one deliberate mistake, as a broken converter would produce."""

    def __init__(self, hf_dir, plant, hf=None) -> None:
        self.base = HFTensorSource(hf_dir)
        self.hf = hf or self.base.hf
        self.plant = plant

    def get(self, name: str) -> torch.Tensor:
        return self.plant(name, self.base.get(name), self.base)


def _zero_expert_bias(name, tensor, _):
    return torch.zeros_like(tensor) if name.endswith("router.expert_bias") else tensor


def _plain_qkv(name, tensor, base):
    if not name.endswith("linear_qkv.weight"):
        return tensor
    hf = base.hf
    q, k, v = transforms.qkv_split(tensor, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim)
    return torch.cat([q, k, v])  # [Q; K; V] instead of the per-group interleave


def _swap_gate_up(name, tensor, _):
    if not name.endswith("linear_fc1.weight"):
        return tensor
    gate, up = transforms.gate_up_split(tensor)
    return torch.cat([up, gate])


def _drop_mtp_tensor(name, tensor, _):
    if name == "mtp.layers.0.eh_proj.weight":
        raise MappingError(f"no tensor named {name} in the checkpoint")
    return tensor


@pytest.mark.parametrize("preset", ["air", "glm45"])
@pytest.mark.parametrize("layerwise", [False, True], ids=["full", "layerwise"])
def test_fp32_parity_with_transformers(megatron_world, tiny_dirs, preset, layerwise):
    report = check(tiny_dirs[preset], HFTensorSource(tiny_dirs[preset]), layerwise=layerwise)
    assert report.passed, report.format()
    assert report.logits.max_abs <= 1e-4 and report.argmax_agreement == 1.0
    assert report.mtp is not None and report.mtp.max_abs <= 1e-4
    assert len(report.layers) == HFTensorSource(tiny_dirs[preset]).hf.num_hidden_layers
    assert "PASS" in report.format()


def test_bf16_check_uses_bf16_thresholds(megatron_world, tiny_glm45):
    report = check(tiny_glm45, HFTensorSource(tiny_glm45), dtype="bf16", layerwise=True)
    assert report.passed, report.format()
    assert report.logits.max_abs > 0  # really computed in bf16 on both sides


@pytest.mark.parametrize(
    "plant",
    [_zero_expert_bias, _plain_qkv, _swap_gate_up],
    ids=["bias-zeroed", "qkv-plain", "gate-up-swapped"],
)
def test_planted_errors_fail_the_check(megatron_world, tiny_glm45, plant):
    report = check(tiny_glm45, PlantedSource(tiny_glm45, plant), layerwise=True)
    assert not report.passed
    assert "FAIL" in report.format()


def test_wrong_rotary_fraction_fails(megatron_world, tiny_glm45):
    source = HFTensorSource(tiny_glm45)
    wrong = PlantedSource(tiny_glm45, lambda n, t, b: t, hf=dataclasses.replace(source.hf, partial_rotary_factor=1.0))
    report = check(tiny_glm45, wrong, layerwise=True)
    assert not report.passed
    assert report.layers[0].max_abs > 1e-3  # the very first attention already differs


def test_dropped_mtp_tensor_is_named(megatron_world, tiny_air):
    with pytest.raises(MappingError, match=r"mtp\.layers\.0\.eh_proj\.weight"):
        check(tiny_air, PlantedSource(tiny_air, _drop_mtp_tensor), layerwise=True)


def test_checkpoint_from_a_different_source_fails(megatron_world, tiny_air, tmp_path):
    other = make_tiny(tmp_path / "other", preset="air", seed=1)
    report = check(tiny_air, HFTensorSource(other))
    assert not report.passed
    assert report.argmax_agreement < 0.9
