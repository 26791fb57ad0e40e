"""The vLLM rollout engine on CPU (vLLM's CPU build, real servers): every tensor group of a sync reaches the engine
at EP 2 and at TP 2 + SP, the engine then equals transformers on the same weights, and the planted errors (a
stream without the routed experts, experts not repacked, the prefix cache not reset) are caught; plus the
recipe checks and the response parsing that need no engine.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glm45_train.config.errors import RecipeError
from glm45_train.config.recipe import load_recipe
from glm45_train.config.rl import check_rl_values, engine_count
from glm45_train.rl.engines.vllm import completion_of, engine_args
from glm45_train.runtime.vllm_cpu import engine_environment, installed_version
from tests.conftest import REPO_ROOT

RECIPE = REPO_ROOT / "recipes/tiny_grpo.yaml"
TOLERANCE = 1e-4
needs_vllm = pytest.mark.skipif(
    platform.machine() != "x86_64", reason="vllm-cpu is built for x86-64 only (make test installs it there)"
)


def start_server(assets: Path, work: Path):
    """A server as the run starts one (weightless model directory, our worker extension, fp32, dev mode)."""
    from glm45_train.rl.engines.model_files import prepare_model_dir
    from glm45_train.rl.engines.vllm import as_cli_flags
    from glm45_train.serve.server import VLLMServer

    recipe = load_recipe(RECIPE, [f"model.source={assets}", f"checkpoint.dir={work}"])
    args = engine_args(torch.float32, 0, recipe.data.max_length, recipe.rl.rollout)
    model_dir = prepare_model_dir(assets, work / "model")
    flags = as_cli_flags({"load_format": "dummy", **args})
    return VLLMServer(model_dir, extra_args=flags, dev_mode=True, log_path=work / "server.log", engine_index=1)


def run_sync_worker(tag: str, source: Path, assets: Path, tmp_path: Path) -> dict:
    server = start_server(assets, tmp_path).launch()  # starts while torchrun builds the trainers
    try:
        out = tmp_path / f"{tag}.json"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            str(REPO_ROOT / "tests/dist/vllm_sync.py"), tag, str(source), server.url, str(out),
        ]  # fmt: skip
        env = {**engine_environment(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
        return json.loads(out.read_text())
    finally:
        server.stop()


def assert_sync_results(results: dict, groups: set[str]) -> None:
    assert set(results["groups"]) == groups
    assert results["initial"]["engine_vs_hf"] < TOLERANCE and not results["initial"]["caught"]
    for label, row in results["groups"].items():
        assert row["engine_vs_hf"] < TOLERANCE, (label, row)  # the engine equals transformers on the same weights
        assert row["probe_gap_max"] < TOLERANCE and not row["caught"], (label, row)  # and the trainer
        assert row["sensitivity"] > 1e-3, (label, row)  # the group's change was visible: the check can fail
    planted = results["planted"]
    assert "missing" in planted["experts_dropped"] and ".mlp.experts." in planted["experts_dropped"]
    for label in ("no_repack", "no_reset"):
        assert planted[label]["caught"] and planted[label]["engine_vs_hf"] > 1e-2, (label, planted[label])
        assert not planted[f"{label}_fixed"]["caught"], planted[f"{label}_fixed"]
        assert planted[f"{label}_fixed"]["engine_vs_hf"] < TOLERANCE


ALL_GROUPS = {
    "embeddings", "lm_head", "final_norm", "layer_norms", "attention_weights", "attention_biases", "dense_mlp",
    "routed_experts", "shared_expert", "router_gate", "e_score_correction_bias",
}  # fmt: skip


@needs_vllm
@pytest.mark.slow
def test_ep2_sync_every_tensor_group_reaches_the_engine(tiny_air, tmp_path):
    results = run_sync_worker("ep2", tiny_air, tiny_air, tmp_path)
    assert_sync_results(results, ALL_GROUPS)
    print(json.dumps(results["groups"], indent=1))


@needs_vllm
@pytest.mark.slow
def test_tp2_sp_sync_every_tensor_group_reaches_the_engine_with_qk_norm(tiny_glm45, mcore_dirs, tmp_path):
    """The glm45 preset (QK-norm, 3 dense layers, routed scaling 2.5) from its converted checkpoint at TP 2 + SP."""
    results = run_sync_worker("tp2", mcore_dirs["glm45"], tiny_glm45, tmp_path)
    assert_sync_results(results, ALL_GROUPS | {"qk_norm"})


# -- no engine needed --------------------------------------------------------------------------------------------


def recipe_with(*overrides: str):
    return load_recipe(RECIPE, ["model.source=/nowhere", *overrides])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["rl.rollout.engine=vllm", "rl.rollout.top_p=0.9"], "rl.rollout.top_p"),
        (["rl.rollout.engine=vllm", "rl.rollout.placement=remote"], "rl.rollout.placement"),
        (["rl.rollout.engine=hf", "rl.rollout.placement=server"], "rl.rollout.placement"),
        (["rl.rollout.engine=vllm", "rl.rollout.urls=[http://h:1]"], "rl.rollout.urls"),
        (["rl.rollout.engine=vllm", "rl.rollout.dtype=fp8"], "rl.rollout.dtype"),
        (["rl.rollout.engine=vllm", "rl.rollout.placement=server", "rl.rollout.urls=[a,b]", "rl.rollout.engines=3"],
         "rl.rollout.engines"),
    ],
)  # fmt: skip
def test_engine_keys_are_checked_naming_the_key(overrides, key):
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        check_rl_values(recipe_with(*overrides))


def test_engine_count_and_owners():
    rollout = recipe_with("rl.rollout.engine=vllm").rl.rollout
    assert engine_count(rollout, 2) == 2  # one per rl.rollout.tp (1) ranks
    rollout.engines = 1
    assert engine_count(rollout, 2) == 1
    rollout.engines = 3
    with pytest.raises(RecipeError, match="do not divide"):
        engine_count(rollout, 4)


def test_completion_parsing_keeps_the_stop_token_and_refuses_aborts():
    done = completion_of([5, 1536], [-1.0, -0.5], "stop")
    assert done.response_ids == (5, 1536) and done.finished
    assert not completion_of([5, 6], [-1.0, -2.0], "length").finished
    with pytest.raises(RuntimeError, match="abort"):
        completion_of([5], [-1.0], "abort")
    with pytest.raises(RuntimeError, match="2 tokens but 1 log-probs"):
        completion_of([5, 6], [-1.0], "stop")


def test_engine_processes_start_without_torchrun_variables_on_their_own_core():
    env = engine_environment({"RANK": "1", "MASTER_PORT": "29500", "PATH": "/bin"}, index=1)
    assert "RANK" not in env and "MASTER_PORT" not in env and env["PATH"] == "/bin"
    if not torch.cuda.is_available():
        import os

        cores = sorted(os.sched_getaffinity(0))
        assert env["VLLM_CPU_OMP_THREADS_BIND"] == str(cores[1 % len(cores)])


@needs_vllm
def test_the_cpu_build_is_found_with_its_platform_suffix():
    version = installed_version()
    assert version is not None and version.endswith("+cpu")


@needs_vllm
def test_server_flags_mean_what_the_in_process_arguments_mean():
    """Both placements start vLLM alike: the server's flags, read back by vLLM's own parser, give the in-process
    engine's arguments; a False switch is said (`--no-enable-chunked-prefill`), not left to vLLM's default (chunked
    prefill on, which crashed a server placement run once a step's batch outgrew one step's token budget)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from glm45_train.rl.engines.vllm import as_cli_flags

    recipe = load_recipe(RECIPE, ["model.source=unused"])
    args = engine_args(torch.float32, 0, recipe.data.max_length, recipe.rl.rollout)
    parsed = EngineArgs.add_cli_args(FlexibleArgumentParser()).parse_args(["--model", "m", *as_cli_flags(args)])
    for key, value in args.items():
        assert getattr(parsed, key) == value, key
    if not torch.cuda.is_available():
        assert args["enable_chunked_prefill"] is False and "--no-enable-chunked-prefill" in as_cli_flags(args)
