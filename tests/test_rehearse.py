"""`--rehearse`: a published recipe's layout runs on a scaled-down model over CPU processes; an error Megatron raises
only once processes run fails the rehearsal with that error named; too many processes are refused up front."""

from __future__ import annotations

import math
import tempfile

import pytest

from glm45_train.cli.main import main
from glm45_train.config.recipe import load_recipe, validate_layout
from glm45_train.launch import rehearse
from glm45_train.model.hf_config import Glm45Config
from tests.conftest import REPO_ROOT


def recipe_path(name: str) -> str:
    return str(REPO_ROOT / "recipes" / name)


@pytest.mark.parametrize("name", ["air_lora.yaml", "glm45_lora.yaml", "glm45_sft.yaml", "air_sft_h100.yaml"])
def test_scaled_model_keeps_the_family_and_fits_the_layout(name):
    recipe = load_recipe(recipe_path(name), ["parallel.ep=4"])
    base, origin = rehearse.family_config(recipe)
    assert "released" in origin and ("Air" in origin) == ("air" in name)
    config = rehearse.scaled_config(base, recipe)
    scaled = Glm45Config.from_dict({**config, "model_type": "glm4_moe", "vocab_size": 1024})
    world = rehearse.world_size_for(recipe)
    assert world == math.lcm(recipe.parallel.tp * recipe.parallel.pp, 4 * recipe.parallel.pp)
    validate_layout(recipe, world, scaled)  # heads, query groups, experts, layers all divide
    assert scaled.first_k_dense_replace == base.first_k_dense_replace < scaled.num_hidden_layers
    assert scaled.use_qk_norm == base.use_qk_norm and scaled.routed_scaling_factor == base.routed_scaling_factor
    assert scaled.num_nextn_predict_layers == 0  # no published recipe trains MTP
    assert scaled.hidden_size == 64


@pytest.mark.parametrize("command", [["sft"], ["submit", "--config", "glm45"]])
def test_too_many_processes_are_refused_before_anything_starts(command, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(rehearse.subprocess, "Popen", None)  # starting anything would fail loudly
    assert main([command[0], recipe_path("glm45_sft.yaml"), *command[1:], "--rehearse"]) == 2
    err = capsys.readouterr().err
    assert "needs 128 processes" in err and "ep*etp*pp = 32*1*4" in err
    assert "parallel.ep=4 (16 processes)" in err
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_air_lora_rehearses_on_four_processes(capsys):
    assert main(["sft", recipe_path("air_lora.yaml"), "--rehearse"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "processes:  4" in out and "tp 1 pp 1 ep 4" in out
    assert "LoRA r32 on linear_qkv, linear_proj; recompute full" in out
    assert "step 1 " in out and "step 2 " in out and "checkpoint: iter_0000002" in out


@pytest.mark.slow
def test_a_layout_megatron_refuses_at_run_time_fails_the_rehearsal_naming_the_error(capsys, monkeypatch, tmp_path):
    """TP 2 without sequence parallelism passes the schema, but Megatron refuses to train MoE layers so."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the failed rehearsal's kept work dir
    assert main(["submit", recipe_path("air_lora.yaml"), "parallel.tp=2", "--rehearse"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "processes:  4" in out
    assert "ValueError: During training, performance may degrade if MoE and tensor parallelism" in out
    assert "error:      rank " in out and f"work dir kept: {tmp_path}" in out
