"""`plan` for RL recipes (rl.rewards set): the shipped GRPO recipes load, pass the RL checks and their layouts, and
fit per plan with the rollout engine's lines printed; a negative control where the colocated engine takes too
much; the reference model's three cases; separate rollout GPUs; SFT plans untouched. Meta/analytic only."""

from __future__ import annotations

import dataclasses
import re

import pytest

from glm45_train.cli.main import main as glm45_train
from glm45_train.config.recipe import RecipeError, load_recipe, validate_layout
from glm45_train.config.rl import check_rl_values
from glm45_train.launch import rl_plan
from glm45_train.launch.model_parts import resolve_model_config
from glm45_train.launch.plan import GIB, plan
from glm45_train.launch.report import format_plan
from tests.conftest import REPO_ROOT

RL_RECIPES = {"air_grpo": ("air", 32), "glm45_grpo": ("glm45", 128), "air_agent_grpo": ("air", 32)}  # (model, H20s)
ENGINE_LINES = ("rollout engine", "engine weights", "KV cache", "generating (colocated)", "training (engine asleep)")
GENERATING = re.compile(r"([\d.]+) GiB while generating")


def rl_plan_of(name: str, *overrides: str):
    model, world = RL_RECIPES[name]
    recipe = load_recipe(REPO_ROOT / f"recipes/{name}.yaml", list(overrides))
    return plan(recipe, resolve_model_config(recipe.model.source, model), "h20", world)


@pytest.mark.parametrize("name", RL_RECIPES)
def test_rl_recipe_checks_validates_and_fits(name):
    model, world = RL_RECIPES[name]
    recipe = load_recipe(REPO_ROOT / f"recipes/{name}.yaml")
    check_rl_values(recipe)
    hf = resolve_model_config(recipe.model.source, model)
    validate_layout(recipe, world, hf)
    assert not recipe.lora.enabled and recipe.train.micro_batch_size == 1  # the table's RL rows: full, batch 1
    result = plan(recipe, hf, "h20", world)
    assert result.rl is not None and result.rl.fits and result.fits, format_plan(result, name, world)
    assert result.rl.colocated and result.rl.reference == "none" and result.rl.kv_rows >= 1
    report = format_plan(result, name, world)
    assert all(line in report for line in ENGINE_LINES)
    assert "rl fit: fits" in report and "reference model: none" in report
    generating = result.rl.phases[0]
    stated = GENERATING.search((REPO_ROOT / f"recipes/{name}.yaml").read_text())
    assert stated and abs(float(stated.group(1)) - generating.total / GIB) < 0.1  # the header says what plan says
    if recipe.rl.environment.name is not None:  # agent recipes: the episode budget is stated
        assert "agent episodes (rl.environment = code_interpreter): up to 6 assistant turns" in report


@pytest.mark.parametrize("name", RL_RECIPES)
def test_a_greedy_colocated_engine_does_not_fit_and_is_named(name):
    """Negative control: the same recipe with the engine holding 90% of each GPU."""
    result = rl_plan_of(name, "rl.rollout.gpu_memory_fraction=0.9")
    assert not result.fits and result.rl is not None and not result.rl.fits
    assert result.worst.total <= result.gpu.memory_gib * GIB  # training alone still fits: the engine is the reason
    failure = result.rl.failure()
    assert failure is not None and failure.startswith("rollout engine: generating (colocated)")
    assert f"rl fit: does NOT fit: {failure}" in format_plan(result, name, None)


def test_plan_cli_exits_one_when_the_engine_does_not_fit(capsys):
    recipe = str(REPO_ROOT / "recipes/air_grpo.yaml")
    nodes = ["--config", "air", "--nodes", "4", "--gpus-per-node", "8"]
    assert glm45_train(["plan", recipe, *nodes]) == 0
    assert "rl fit: fits" in capsys.readouterr().out
    assert glm45_train(["plan", recipe, "rl.rollout.gpu_memory_fraction=0.9", *nodes]) == 1
    assert "rl fit: does NOT fit: rollout engine" in capsys.readouterr().out


def test_reference_model_none_lora_base_or_frozen_copy():
    none = rl_plan_of("air_grpo")
    frozen = rl_plan_of("air_grpo", "rl.grpo.kl_coeff=0.001")
    assert none.rl is not None and frozen.rl is not None and frozen.rl.reference == "frozen-copy"
    for before, after in zip(none.stages, frozen.stages, strict=True):
        # the trained bf16 weights, but for the norms Megatron builds in fp32 (bf16 in the copy)
        assert after.reference_weights == pytest.approx(before.trained_weights, rel=1e-3)
        assert after.reference_weights < before.trained_weights
        assert (after.gradients, after.optimizer) == (before.gradients, before.optimizer)  # no grads, no Adam
    assert frozen.rl.reference_bytes == max(stage.reference_weights for stage in frozen.stages) > 6 * GIB
    assert "RL reference bf16" in format_plan(frozen, "air_grpo", 32)
    lora = rl_plan_of("air_grpo", "lora.enabled=true", "rl.grpo.kl_coeff=0.001")
    assert lora.rl is not None and lora.rl.reference == "lora-base"
    assert all(stage.reference_weights == 0 for stage in lora.stages)
    assert "LoRA adapters disabled" in format_plan(lora, "air_grpo", 32)


def test_separate_rollout_gpus_hold_weights_and_cache_alone():
    result = rl_plan_of(
        "air_grpo", "rl.rollout.colocate=false", "rl.rollout.gpus=16", "rl.rollout.gpu_memory_fraction=0.8"
    )
    rl = result.rl
    assert rl is not None and not rl.colocated and (rl.gpus, rl.engines) == (16, 2)
    assert [phase.name for phase in rl.phases] == ["generating (rollout GPUs)"]
    assert rl.fits and rl.kv_cache == pytest.approx(0.8 * result.gpu.memory_gib * GIB - rl.engine_weights)
    assert "GPUs needed: 32 + 16 rollout GPUs" in format_plan(result, "air_grpo", 32)
    none = rl_plan_of("air_grpo", "rl.rollout.colocate=false", "rl.rollout.gpus=0")
    assert none.rl is not None and not none.fits and "rl.rollout.gpus = 0" in (none.rl.failure() or "")


def test_engine_figures_come_from_the_checkpoint_and_its_kv_heads():
    hf = resolve_model_config("", "air")
    megatron_count = rl_plan_of("air_grpo").total_params  # MTP not built: the same tensors SGLang loads
    assert rl_plan.engine_weight_bytes(hf) / 2 == pytest.approx(megatron_count, rel=1e-6)
    assert rl_plan.kv_bytes_per_token(hf, 1) == 2 * 46 * 8 * 128 * 2  # K and V, 46 layers, 8 KV heads, bf16
    assert rl_plan.kv_bytes_per_token(hf, 16) == 2 * 46 * 1 * 128 * 2  # tp > KV heads: one (replicated) head


def test_rollout_tp_must_tile_the_world_and_split_the_heads():
    with pytest.raises(RecipeError, match=r"rl\.rollout\.tp"):
        rl_plan_of("air_grpo", "rl.rollout.tp=5")  # 96 heads
    recipe = load_recipe(REPO_ROOT / "recipes/air_grpo.yaml", ["rl.rollout.tp=3"])
    with pytest.raises(RecipeError, match="do not tile the 32 training GPUs"):
        rl_plan.validate_rollout(recipe, 32, resolve_model_config("", "air"))


def test_sft_plans_have_no_rl_part():
    recipe = load_recipe(REPO_ROOT / "recipes/air_sft.yaml")
    result = plan(recipe, resolve_model_config("", "air"), "h20", 32)
    assert result.rl is None and all(stage.reference_weights == 0 for stage in result.stages)
    assert "rl:" not in format_plan(result, "air_sft", 32) and "rollout" not in format_plan(result, "air_sft", 32)
    with_rewards = dataclasses.replace(recipe, rl=dataclasses.replace(recipe.rl, rewards=[{"name": "math"}]))
    assert plan(with_rewards, resolve_model_config("", "air"), "h20", 32).rl is not None  # rewards make it RL


def test_routing_replay_counts_its_record():
    """tokens x MoE layers x top-k one-byte ids for the step's samples; none without replay."""
    result = rl_plan_of("air_grpo", "rl.routing_replay=rollout")
    recipe, hf = result.recipe, resolve_model_config(result.recipe.model.source, "air")
    moe_layers = hf.num_hidden_layers - hf.first_k_dense_replace
    samples = recipe.rl.prompts_per_step * recipe.rl.rollout.group_size
    expected = samples * recipe.data.max_length * moe_layers * hf.num_experts_per_tok
    assert result.rl is not None and result.rl.routing_record == expected > 0
    assert f"routing replay record: {expected / GIB:.2f} GiB" in format_plan(result, "air_grpo", 32)
    without = rl_plan_of("air_grpo", "rl.routing_replay=none")
    assert without.rl is not None and without.rl.routing_record == 0
    assert "routing replay record" not in format_plan(without, "air_grpo", 32)
