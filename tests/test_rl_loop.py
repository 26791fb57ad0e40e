"""`glm45-train rl` on the tiny model over 2 processes (EP 2, LoRA): the mean reward rises, and does not with the
policy loss off (negative control); a SIGKILLed run resumes to the same rewards and losses bit for bit; the run
exports with `export --to-hf` as an SFT run does; bad recipes fail before any process starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from glm45_train.cli.main import main
from glm45_train.hub.export_check import ExportKind, check_export
from tests.conftest import REPO_ROOT

RECIPE = str(REPO_ROOT / "recipes/tiny_grpo.yaml")
KEYS = (
    "reward", "reward_std", "reward/contains", "response_length", "clip_fraction", "kl", "entropy", "loss",
    "grad_norm", "logprob_gap_max", "rollout_tokens_per_s", "train_tokens_per_s", "sync_s", "rollout_seconds",
    "train_seconds", "reward_seconds", "overhead_fraction",
)  # fmt: skip


def rl_command(hf_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "glm45_train.cli.main", "rl", RECIPE, f"model.source={hf_dir}", f"checkpoint.dir={run_dir}",
        "logging.plot=true", *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def run_rl(hf_dir: Path, run_dir: Path, *extra: str) -> list[dict]:
    result = subprocess.run(
        rl_command(hf_dir, run_dir, *extra), cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    assert result.stdout.count("rl finished at step") == 1
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def learning(tiny_air, tmp_path_factory) -> tuple[Path, list[dict]]:
    run_dir = tmp_path_factory.mktemp("rl") / "run"
    return run_dir, run_rl(tiny_air, run_dir)


def _rise(metrics: list[dict]) -> tuple[float, float]:
    rewards = np.array([m["reward"] for m in metrics])
    return float(rewards[:8].mean()), float(rewards[-8:].mean())


def test_mean_reward_rises(learning):
    run_dir, metrics = learning
    assert [m["step"] for m in metrics] == list(range(1, 33))
    first, last = _rise(metrics)
    assert first < 0.25 and last > 0.6, (first, last)
    assert all(key in metrics[-1] for key in KEYS), sorted(set(KEYS) - set(metrics[-1]))
    assert max(m["logprob_gap_max"] for m in metrics) < 1e-4  # engine and trainer see the same policy every step
    assert (run_dir / "rl.png").stat().st_size > 10_000
    assert json.loads((run_dir / "prompts_report.json").read_text())["records"]["kept"] == 24


def test_without_the_policy_loss_the_reward_does_not_rise(tiny_air, tmp_path):
    """Negative control: the same run trained on the KL to the reference only (adapters disabled) stays put."""
    metrics = run_rl(tiny_air, tmp_path / "run", "rl.grpo.policy_loss=false", "rl.grpo.kl_coeff=0.1")
    first, last = _rise(metrics)
    assert last < first + 0.15 and last < 0.3, (first, last)


def test_sigkill_then_resume_reproduces_rewards_and_losses(tiny_air, tmp_path, learning):
    _, expected = learning
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        rl_command(tiny_air, run_dir), cwd=REPO_ROOT, env=_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    pointer = run_dir / "latest_checkpointed_iteration.txt"
    deadline = time.monotonic() + 300
    while not (pointer.exists() and pointer.read_text().strip() == "16"):
        assert process.poll() is None and time.monotonic() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    resumed = run_rl(tiny_air, run_dir)
    assert [m["step"] for m in resumed] == list(range(1, 33))
    for key in ("reward", "loss", "grad_norm", "response_length", "entropy"):
        assert [m[key] for m in resumed] == [m[key] for m in expected], key  # bit-exact, not approximately


def test_rl_run_exports_like_an_sft_run(learning, tiny_air, tmp_path):
    run_dir, _ = learning
    out = tmp_path / "hf"
    assert main(["export", "--to-hf", "--model", str(run_dir), "--output-dir", str(out), "--no-progress"]) == 0
    assert check_export(out) == ExportKind.HF_CHECKPOINT  # config, tokenizer, every shard complete
    trained = load_file(next(out.glob("*.safetensors")))
    base = {}
    for shard in tiny_air.glob("*.safetensors"):
        base.update(load_file(shard))
    changed = [name for name, tensor in trained.items() if not torch.equal(tensor, base[name].to(tensor.dtype))]
    assert changed  # the run's weights, not the base's


def test_bad_reward_fails_before_any_process_starts(tiny_air, tmp_path, capsys):
    code = main(["rl", RECIPE, f"model.source={tiny_air}", f"checkpoint.dir={tmp_path}",
                 "rl.rewards=[{name: containz}]"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "rl.rewards[0].name: unknown reward 'containz' (did you mean 'contains'?)" in err
    code = main(["rl", RECIPE, f"model.source={tiny_air}", f"checkpoint.dir={tmp_path}", "train.global_batch_size=5"])
    assert code == 2 and "train.global_batch_size" in capsys.readouterr().err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_rehearse_runs_the_rl_layout_with_pipeline_stages():
    """`rl --rehearse` at PP 2 x EP 2 (4 processes): rollouts, the last stage's log-probs, updates, a checkpoint."""
    from glm45_train.launch.rehearse import rehearse

    result = rehearse(RECIPE, ["parallel.pp=2"], echo=lambda *_: None)
    assert result.passed, result.report()
    assert len(result.losses) == 2 and result.checkpoint and result.checkpoint.startswith("iter_0000002")
