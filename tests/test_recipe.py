"""Recipe schema: strict loading (unknown keys, wrong types, overrides) and layout validation naming the key."""

from __future__ import annotations

import re

import pytest

from glm45_train.config.recipe import RecipeError, check_trainable_layout, load_recipe, validate_layout
from glm45_train.model.hf_config import Glm45Config
from tests.test_hf_config import AIR_RELEASE

MINIMAL = "model: {source: /m}\ndata: {prepared: /d}\ntrain: {steps: 10}\ncheckpoint: {dir: /c}\n"


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(MINIMAL)
    return path


def test_defaults_and_overrides(recipe_file):
    recipe = load_recipe(recipe_file, ["parallel.ep=4", "lora.rank=8", "train.lr=2e-4"])
    assert (recipe.parallel.ep, recipe.lora.rank, recipe.train.lr) == (4, 8, 2e-4)
    assert recipe.lora.targets == ["linear_qkv", "linear_proj"] and recipe.lora.alpha == 64.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lr=abc"], "train.lr"),
        (["train.lrr=1"], "did you mean 'train.lr'"),
        (["trian.lr=1"], "did you mean 'train'"),
        (["lora.targets=[q_proj]"], "lora.targets"),
        (["parallel.tp=0"], "parallel.tp"),
        (["model.dtype=fp16"], "model.dtype"),
        (["train.epochs=2"], "exactly one of train.epochs and train.steps"),
        (["data.mode=mixed:1.5"], "data.mode"),
        (["train.min_lr=1"], "train.min_lr"),
        (["oops"], "key=value"),
        (["train.lr=nan"], "'train.lr': nan is not a finite number"),  # once crashed after the run folder existed
        (["eval.split=1.5"], "'eval.split': 1.5 is outside [0.0, 1.0)"),  # once blamed global_batch_size
        (["rl.grpo.clip_high=inf"], "'rl.grpo.clip_high': inf is not a finite number"),
        (["train.lr=0"], "'train.lr': 0.0 is outside (0.0, ∞)"),
        (["train.micro_batch_size=0"], "'train.micro_batch_size': 0 is outside [1, ∞)"),
        (["checkpoint.interval=0"], "checkpoint.interval"),
    ],
)
def test_bad_values_name_the_key(recipe_file, overrides, message):
    with pytest.raises(
        RecipeError, match=re.escape(message) if "'" in message else message.replace("[", r"\[").replace(".", r"\.")
    ):
        load_recipe(recipe_file, overrides)


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL + "eval: {intervall: 5}\n")
    with pytest.raises(RecipeError, match=r"eval\.intervall.*did you mean 'eval\.interval'"):
        load_recipe(path)


def test_missing_required_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: {prepared: /d}\ntrain: {steps: 1}\ncheckpoint: {dir: /c}\n")
    with pytest.raises(RecipeError, match=r"model\.source"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("world", "overrides", "message"),
    [
        (4, ["parallel.tp=3"], "tp\\*pp\\*cp"),
        (6, ["parallel.ep=3", "train.global_batch_size=12"], "parallel.ep"),
        (16, ["parallel.tp=16"], "query groups"),
        (4, ["parallel.pp=4"], "layers are not divisible"),
        (2, ["parallel.sp=true"], "parallel.sp"),
        (4, ["train.global_batch_size=6"], "train.global_batch_size"),
        (2, ["parallel.etp=2", "lora.targets=[experts.linear_fc1]"], "parallel.etp"),
    ],
)
def test_impossible_layouts_fail_before_any_process_group(recipe_file, world, overrides, message):
    hf = Glm45Config.from_dict(AIR_RELEASE)
    with pytest.raises(RecipeError, match=message):
        validate_layout(load_recipe(recipe_file, overrides), world, hf)


def test_published_air_lora_layout_is_valid(recipe_file):
    hf = Glm45Config.from_dict(AIR_RELEASE)
    assert validate_layout(load_recipe(recipe_file, ["parallel.ep=4"]), 4, hf) == 4
    assert validate_layout(load_recipe(recipe_file, ["parallel.tp=4", "parallel.ep=4", "parallel.sp=true"]), 4, hf) == 1


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        (["parallel.tp=2", "parallel.sp=true"], True),  # ep 1, etp 1: experts whole on TP ranks that see other tokens
        (["parallel.etp=2"], True),  # ep 1: expert shards reduced over data parallel as if they were replicas
        (["parallel.tp=2", "parallel.sp=true", "parallel.etp=2"], False),
        (["parallel.tp=2", "parallel.sp=true", "parallel.ep=2"], False),
    ],
)
def test_layouts_megatron_would_train_wrongly_are_refused(recipe_file, overrides, refused):
    recipe = load_recipe(recipe_file, overrides)
    if refused:
        with pytest.raises(RecipeError, match=r"parallel\.etp"):
            check_trainable_layout(recipe)
    else:
        check_trainable_layout(recipe)
