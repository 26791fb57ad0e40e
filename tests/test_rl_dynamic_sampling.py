"""DAPO's dynamic sampling and overlong handling (rl/sampling.py): the batch keeps the recipe's size, dropped groups
are counted, a run SIGKILLed and resumed samples exactly the uninterrupted run's rounds; overlong filtering takes
truncated responses out of the loss, the penalty is the `length` reward; the recipe checks name their keys.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from glm45_train.config.errors import RecipeError
from glm45_train.config.recipe import load_recipe
from glm45_train.config.rl import check_rl_values
from glm45_train.rl.batches import Sample, micro_batches
from glm45_train.rl.setup import reward_set
from glm45_train.train.batches import Collation
from tests.conftest import REPO_ROOT
from tests.test_rl_loop import _env, rl_command, run_rl

RECIPE = REPO_ROOT / "recipes/tiny_grpo.yaml"
DYNAMIC = (
    "rl.dynamic_sampling.enabled=true", "rl.dynamic_sampling.max_rounds=2", "rl.overlong.mode=penalty",
    "rl.overlong.buffer=8", "rl.overlong.weight=0.1", "train.steps=8", "checkpoint.interval=4",
)  # fmt: skip


def _recipe(*overrides: str):
    return load_recipe(RECIPE, ["model.source=unused", *overrides])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("rl.dynamic_sampling.max_rounds=-1", "rl.dynamic_sampling.max_rounds"),
        ("rl.overlong.mode=cut", "rl.overlong.mode"),
        ("rl.overlong.mode=penalty", "rl.overlong.buffer"),  # buffer 0: no soft zone
    ],
)
def test_bad_values_are_refused_naming_the_key(override, key):
    with pytest.raises(RecipeError, match=f"key '{key}'"):
        check_rl_values(_recipe(override))


def test_the_penalty_is_the_length_reward_at_the_rollout_limit():
    rewards = reward_set(_recipe("rl.overlong.mode=penalty", "rl.overlong.buffer=8", "rl.overlong.weight=0.5"))
    spec = rewards.specs[-1]
    assert (spec.name, spec.weight, spec.args) == ("length", 0.5, {"max_len": 24, "buffer": 8})
    assert [s.name for s in reward_set(_recipe()).specs] == ["contains"]  # mode none adds nothing


def test_a_filtered_sample_carries_no_loss():
    kept = Sample(0, 0, (1, 2, 3), (4, 5), (-1.0, -1.0), True)
    cut = Sample(0, 1, (1, 2, 3), (6, 7, 8), (-1.0, -1.0, -1.0), False, trained=False)
    (micro,) = micro_batches([kept, cut], 0, 1, Collation(2, 1, True), pad_id=0)
    assert micro.batch.loss_mask[0].tolist() == [0, 0, 1, 1, 0, 0]
    assert micro.batch.loss_mask[1].sum() == 0  # its tokens are still in the row (and in the forward pass)


@pytest.mark.slow
def test_dynamic_sampling_keeps_the_batch_size_and_resumes_exactly(tiny_air, tmp_path):
    expected = run_rl(tiny_air, tmp_path / "whole", *DYNAMIC)
    assert [m["step"] for m in expected] == list(range(1, 9))
    for m in expected:
        assert m["dynamic_kept_groups"] + m["dynamic_filled_groups"] == 4  # rl.prompts_per_step, every step
        assert m["dynamic_rounds"] <= 2 and "reward/length" in m
    assert sum(m["dynamic_dropped_groups"] for m in expected) > 0  # the random model leaves groups without signal
    assert sum(m["dynamic_rounds"] for m in expected) > 0
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(
        rl_command(tiny_air, run_dir, *DYNAMIC), cwd=REPO_ROOT, env=_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    pointer = run_dir / "latest_checkpointed_iteration.txt"
    deadline = time.monotonic() + 300
    while not (pointer.exists() and pointer.read_text().strip() == "4"):
        assert process.poll() is None and time.monotonic() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    resumed = run_rl(tiny_air, run_dir, *DYNAMIC)
    for key in ("reward", "reward_trained", "dynamic_dropped_groups", "dynamic_rounds", "loss", "grad_norm"):
        assert [m[key] for m in resumed] == [m[key] for m in expected], key  # bit-exact
