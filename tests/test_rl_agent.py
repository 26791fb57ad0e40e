"""Agentic GRPO end to end on 2 processes (EP 2): the tiny model, given the tool format by a short SFT on
data/agent_sample.jsonl, runs multi-turn episodes through the `lookup` tool with the hf and the vllm engine; every
turn's engine log-probs equal the trainer's (the appended ids are what the engine saw), only the policy's tokens are
trained (negative control: `train_observations` trains the tool's tokens too, which the engine never sampled), and
bad recipes fail before any process starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from glm45_train.cli.main import main
from glm45_train.rl.agent import examples
from tests.conftest import REPO_ROOT
from tests.test_rl_loop import _env
from tests.test_vllm_engine import needs_vllm

RECIPE = str(REPO_ROOT / "recipes/tiny_agent_grpo.yaml")
AGENT_KEYS = ("agent/turns", "agent/tool_calls", "agent/tool_errors", "agent/tool_timeouts", "agent/tool_truncations",
              "agent/cut_by_budget", "agent/cut_by_max_turns", "reward/contains", "reward/tool_calls")  # fmt: skip


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "glm45_train.cli.main", *args]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def agent_sft(tiny_air, tmp_path_factory) -> Path:
    """tiny_sft on the tool-use conversations (80 steps), exported: a model that calls `lookup` well formed."""
    root = tmp_path_factory.mktemp("agent-sft")
    _torchrun("sft", str(REPO_ROOT / "recipes/tiny_sft.yaml"), f"model.source={tiny_air}",
              f"checkpoint.dir={root / 'run'}", "data.inputs=[data/agent_sample.jsonl]", "data.pack=false",
              "train.steps=80", "train.lr=3e-3", "train.mtp_loss_weight=0", "eval.split=0",
              "checkpoint.interval=80")  # fmt: skip
    assert main(["export", "--to-hf", "--model", str(root / "run"), "--output-dir", str(root / "hf"),
                 "--no-progress"]) == 0  # fmt: skip
    return root / "hf"


def run_agent(model: Path, run_dir: Path, *extra: str) -> list[dict]:
    _torchrun("rl", RECIPE, f"model.source={model}", f"checkpoint.dir={run_dir}", "train.steps=6",
              "checkpoint.interval=6", *extra)  # fmt: skip
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def hf_run(agent_sft, tmp_path_factory) -> list[dict]:
    return run_agent(agent_sft, tmp_path_factory.mktemp("agent-rl") / "run")


def test_episodes_call_the_tool_and_every_turn_matches_the_trainer(hf_run):
    assert [m["step"] for m in hf_run] == list(range(1, 7))
    assert all(key in hf_run[0] for key in AGENT_KEYS), sorted(set(AGENT_KEYS) - set(hf_run[0]))
    assert sum(m["agent/tool_calls"] for m in hf_run) / len(hf_run) > 0.3  # the SFT model calls `lookup`
    assert max(m["agent/turns"] for m in hf_run) > 1.3  # observations appended, second turns sampled
    # engine and trainer agree on every trained token of every turn: the appended ids are the ones the engine saw
    assert max(m["logprob_gap_max"] for m in hf_run) < 1e-4


def test_training_the_observations_is_seen_at_once(agent_sft, hf_run, tmp_path):
    """Negative control for the mask: with train_observations the tool's tokens (log-prob 0 from the engine, which
    never sampled them) are trained: more trained tokens, and a gap no engine mismatch explains."""
    control = run_agent(agent_sft, tmp_path / "run", "rl.environment.train_observations=true", "train.steps=2",
                        "checkpoint.interval=2")  # fmt: skip
    assert control[0]["trained_tokens"] > hf_run[0]["trained_tokens"]
    assert control[0]["logprob_gap_max"] > 0.1


@needs_vllm
def test_the_vllm_engine_drives_the_same_episodes(agent_sft, hf_run, tmp_path):
    metrics = run_agent(agent_sft, tmp_path / "run", "rl.rollout.engine=vllm", "train.steps=3", "checkpoint.interval=3")
    assert max(m["agent/turns"] for m in metrics) > 1.3 and sum(m["agent/tool_calls"] for m in metrics) > 0
    assert max(m["logprob_gap_max"] for m in metrics) < 1e-4 and max(m["probe_gap_max"] for m in metrics) < 1e-4


def test_committed_samples_are_what_the_generator_writes(tmp_path):
    examples.write_samples(tmp_path)
    for name in ("agent_sample.jsonl", "agent_prompts_sample.jsonl"):
        assert (tmp_path / name).read_text() == (REPO_ROOT / "data" / name).read_text(), name


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "rl.environment.tools=[nosuch_module:lookup]",
            "rl.environment.tools[0]: tool 'nosuch_module:lookup': no module",
        ),
        ("rl.environment.tools=[glm45_train.rl.agent.examples:nope]", "has no attribute 'nope'"),
        ("rl.environment.name=nosuch:Env", "rl.environment.name: environment 'nosuch:Env': no module"),
        ("rl.environment.max_turns=0", "key 'rl.environment.max_turns': must be at least 1"),
        ("rl.environment.max_tokens=8", "key 'rl.environment.max_tokens': is below rl.rollout.max_new_tokens"),
        ("rl.environment.tools=[]", "key 'rl.environment.tools': python_tools needs its tools"),
    ],
)
def test_bad_environments_fail_before_any_process_starts(override, expected, tiny_air, tmp_path, capsys):
    code = main(["rl", RECIPE, f"model.source={tiny_air}", f"checkpoint.dir={tmp_path}", override])
    assert code == 2 and expected in capsys.readouterr().err
    assert not (tmp_path / "metrics.jsonl").exists()
