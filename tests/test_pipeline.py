"""Pipeline parallel training on CPU (gloo, Megatron's 1F1B schedule): PP 2 gives PP 1's losses step by step, and a
LoRA run at PP 2 x EP 2 checkpoints adapters of both stages that export as a merged HF checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from glm45_train.cli.main import main
from tests.conftest import REPO_ROOT

STEPS = 3
RUN = [f"train.steps={STEPS}", f"checkpoint.interval={STEPS}", f"eval.interval={STEPS}", "logging.plot=false"]


@pytest.fixture(scope="module")
def tiny_air_4_layers(tmp_path_factory) -> Path:
    """The tiny Air with 4 layers (1 dense + 3 MoE): two pipeline stages of 2 (the preset's 3 do not split)."""
    from glm45_train.model.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny4") / "air", preset="air", overrides={"num_hidden_layers": 4})


def torchrun_sft(procs: int, recipe: str, hf_dir: Path, run_dir: Path, *overrides: str) -> list[dict]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
        "-m", "glm45_train.cli.main", "sft", str(REPO_ROOT / "recipes" / recipe),
        f"model.source={hf_dir}", f"checkpoint.dir={run_dir}",
        f"data.inputs=[{REPO_ROOT / 'data/sample_distill.jsonl'}]", "logging.tensorboard=false", *RUN, *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_pp2_full_sft_gives_the_pp1_losses(tiny_air_4_layers, tmp_path):
    """Full SFT with the MTP loss (the MTP block on the last stage) and aux loss, 4 micro-batches per step."""
    pp1 = torchrun_sft(1, "tiny_sft.yaml", tiny_air_4_layers, tmp_path / "pp1", "parallel.ep=1")
    pp2 = torchrun_sft(2, "tiny_sft.yaml", tiny_air_4_layers, tmp_path / "pp2", "parallel.ep=1", "parallel.pp=2")
    assert [m["step"] for m in pp2] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm"):
        for one, two in zip(pp1, pp2, strict=True):
            assert two[key] == pytest.approx(one[key], rel=1e-4), key
    assert pp2[-1]["eval_loss"] == pytest.approx(pp1[-1]["eval_loss"], rel=1e-4)  # the forward-only schedule
    assert pp2[-1]["loss"] < pp2[0]["loss"]
    assert (tmp_path / "pp2" / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS)


@pytest.mark.slow
def test_lora_pp2_ep2_checkpoint_exports_merged(megatron_world, tiny_air_4_layers, tmp_path):
    from glm45_train.lora.adapter_io import read_lora_run

    run_dir = tmp_path / "run"
    metrics = torchrun_sft(4, "tiny_lora.yaml", tiny_air_4_layers, run_dir, "parallel.pp=2")  # ep 2 as written
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    state = read_lora_run(run_dir).state
    for layer in range(4):  # both stages' adapters, under global layer numbers, trained
        assert state[f"decoder.layers.{layer}.self_attention.linear_qkv_lora.lora_B"].any(), layer
    out = tmp_path / "merged"
    assert main(["export", "--to-hf", "--model", str(run_dir), "--output-dir", str(out), "--merge-lora"]) == 0
    assert (out / "model.safetensors.index.json").exists() and (out / "config.json").exists()
