"""`glm45-train sft` on the tiny model over 2 processes (EP 2): the loss falls, a SIGKILLed run resumes exactly,
and bad recipes fail before any process group starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from glm45_train.cli.main import main
from tests.conftest import REPO_ROOT

STEPS = ["train.steps=8", "checkpoint.interval=4", "eval.interval=4"]


def sft_command(recipe: str, hf_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "glm45_train.cli.main", "sft", str(REPO_ROOT / "recipes" / recipe),
        f"model.source={hf_dir}", f"checkpoint.dir={run_dir}",
        f"data.inputs=[{REPO_ROOT / 'data/sample_distill.jsonl'}]", *STEPS, *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def run_sft(recipe: str, hf_dir: Path, run_dir: Path) -> list[dict]:
    result = subprocess.run(
        sft_command(recipe, hf_dir, run_dir), cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    assert result.stdout.count("sft finished at step") == 1  # one summary for the two ranks
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tiny_air, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    return run_dir, run_sft("tiny_sft.yaml", tiny_air, run_dir)


@pytest.mark.slow
def test_full_sft_loss_falls_and_run_dir_is_complete(uninterrupted):
    run_dir, metrics = uninterrupted
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5
    assert all(m["grad_norm"] > 0 and m["tokens_per_s"] > 0 for m in metrics)
    assert "eval_loss" in metrics[3] and "eval_loss" in metrics[7]
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "8"
    assert sorted(p.name for p in run_dir.glob("iter_*")) == ["iter_0000004", "iter_0000008"]
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert any((run_dir / "tensorboard").iterdir())


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_loss_sequence(tiny_air, tmp_path, uninterrupted):
    _, expected = uninterrupted
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        sft_command("tiny_sft.yaml", tiny_air, run_dir), cwd=REPO_ROOT, env=_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    pointer = run_dir / "latest_checkpointed_iteration.txt"
    deadline = time.monotonic() + 300
    while not (pointer.exists() and pointer.read_text().strip() == "4"):
        assert process.poll() is None and time.monotonic() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    resumed = run_sft("tiny_sft.yaml", tiny_air, run_dir)
    assert [m["step"] for m in resumed] == list(range(1, 9))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in expected]  # bit-exact, not approximately
    assert [m["grad_norm"] for m in resumed] == [m["grad_norm"] for m in expected]


def test_print_config_resolves_overrides(capsys):
    assert main(["sft", str(REPO_ROOT / "recipes/tiny_sft.yaml"), "train.lr=3e-4", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.0003" in out and "ep: 2" in out


def test_impossible_layout_fails_before_any_work(tiny_air, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["sft", str(REPO_ROOT / "recipes/tiny_sft.yaml"), f"model.source={tiny_air}", f"checkpoint.dir={run_dir}"]
    assert main([*args, "parallel.ep=3"]) == 2
    assert "parallel.ep" in capsys.readouterr().err
    assert not run_dir.exists()  # no data prepared, no process group joined, nothing written


def run_lora_in_process(tiny_air: Path, run_dir: Path, stop_after_step: int | None = None) -> list[dict]:
    """A one-process LoRA run inside the test process; optionally SIGUSR1 arrives once a step is logged."""
    args = [
        "sft", str(REPO_ROOT / "recipes/tiny_lora.yaml"), f"model.source={tiny_air}", f"checkpoint.dir={run_dir}",
        f"data.inputs=[{REPO_ROOT / 'data/sample_distill.jsonl'}]", "parallel.ep=1", "train.global_batch_size=2",
        *STEPS, "logging.tensorboard=false",
    ]  # fmt: skip
    watcher = None
    if stop_after_step is not None:
        watcher = threading.Thread(target=_signal_after, args=(run_dir / "metrics.jsonl", stop_after_step), daemon=True)
        watcher.start()
    assert main(args) == 0
    if watcher is not None:
        watcher.join(timeout=5)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _signal_after(metrics: Path, step: int) -> None:
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= step):
        if time.monotonic() > deadline:
            return
        time.sleep(0.01)
    signal.raise_signal(signal.SIGUSR1)  # as Slurm's --signal=USR1@... would deliver it


@pytest.fixture(scope="module")
def lora_uninterrupted(megatron_world, tiny_air, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    return run_dir, run_lora_in_process(tiny_air, run_dir)


def test_lora_trains_adapters_only(lora_uninterrupted):
    run_dir, metrics = lora_uninterrupted
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.2
    assert json.loads((run_dir / "glm45_train.json").read_text())["training"]["kind"] == "lora"
    saved = (run_dir / "iter_0000008" / ".metadata").read_bytes()
    assert b"linear_qkv_lora.lora_A" in saved and b"linear_proj_lora.lora_B" in saved
    assert b"linear_fc1.weight" not in saved  # no base weight in an adapter-only checkpoint


def test_lora_stops_on_sigusr1_and_resumes_where_it_stopped(tiny_air, tmp_path, lora_uninterrupted):
    _, expected = lora_uninterrupted
    run_dir = tmp_path / "run"
    stopped = run_lora_in_process(tiny_air, run_dir, stop_after_step=2)
    stopped_at = int((run_dir / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= stopped_at < 8 and len(stopped) == stopped_at  # checkpointed where it stopped, then exited
    resumed = run_lora_in_process(tiny_air, run_dir)
    assert [m["loss"] for m in resumed] == [m["loss"] for m in expected]


def test_full_sft_without_mtp_loss_builds_no_mtp_and_exports_the_base_mtp(megatron_world, tiny_air, tmp_path, capsys):
    """train.mtp_loss_weight = 0 (the published recipes): no MTP block is built or saved; the HF export takes the
    MTP layer from the base unchanged, so the exported model keeps it."""
    from glm45_train.formats.hf_io import HFCheckpointReader

    run_dir, out = tmp_path / "run", tmp_path / "hf"
    args = [
        "sft", str(REPO_ROOT / "recipes/tiny_sft.yaml"), f"model.source={tiny_air}", f"checkpoint.dir={run_dir}",
        f"data.inputs=[{REPO_ROOT / 'data/sample_distill.jsonl'}]", "parallel.ep=1", "train.global_batch_size=2",
        "train.steps=2", "checkpoint.interval=2", "eval.interval=0", "train.mtp_loss_weight=0",
        "logging.tensorboard=false", "logging.plot=false",
    ]  # fmt: skip
    assert main(args) == 0
    assert b"mtp." not in (run_dir / "iter_0000002" / ".metadata").read_bytes()
    assert main(["export", "--to-hf", "--model", str(run_dir), "--output-dir", str(out)]) == 0
    assert "MTP not trained" in capsys.readouterr().out
    base, exported = HFCheckpointReader(tiny_air), HFCheckpointReader(out)
    assert sorted(exported.names()) == sorted(base.names())
    mtp = f"model.layers.{json.loads((tiny_air / 'config.json').read_text())['num_hidden_layers']}."
    own = [n for n in base.names() if n.startswith(mtp) and not n.endswith(("embed_tokens.weight", "head.weight"))]
    assert len(own) > 10 and all(torch.equal(exported.get(n), base.get(n)) for n in own), "MTP not the base's"
    trained = "model.layers.0.self_attn.o_proj.weight"
    assert not torch.equal(exported.get(trained), base.get(trained))  # negative control: the rest was trained


def test_resume_from_a_dangling_or_garbage_pointer_names_the_file(tmp_path):
    """Once a RuntimeError traceback; now the user error every command prints as one line."""
    from glm45_train.errors import UserError
    from glm45_train.train.checkpoint import LATEST, latest_step

    (tmp_path / LATEST).write_text("12\n")
    with pytest.raises(UserError, match=r"latest_checkpointed_iteration.txt: points at '12', which is not a complete"):
        latest_step(tmp_path)
    (tmp_path / "iter_0000012").mkdir()
    assert latest_step(tmp_path) == 12
    (tmp_path / LATEST).write_bytes(b"\xff\xfe garbage")
    with pytest.raises(UserError, match="which is not a complete checkpoint"):
        latest_step(tmp_path)


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_where_it_stopped_and_resumes_exactly(tiny_air, tmp_path, uninterrupted):
    """What `scancel` and most schedulers do: SIGTERM to the launcher, which forwards it to every worker's whole
    process group. Once Megatron's writer helper died of it and the checkpoint stayed `.partial` for ever."""
    _, expected = uninterrupted
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        sft_command("tiny_sft.yaml", tiny_air, run_dir), cwd=REPO_ROOT, env=_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    pointer, deadline = run_dir / "latest_checkpointed_iteration.txt", time.monotonic() + 300
    while not (pointer.exists() and pointer.read_text().strip() == "4"):  # after a save: its helpers are up
        assert process.poll() is None and time.monotonic() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    stopped_at = int(pointer.read_text())
    assert 5 <= stopped_at < 8, stderr[-3000:]
    assert not list(run_dir.glob("*.partial")) and "EOFError" not in stderr and "BrokenPipe" not in stderr
    resumed = run_sft("tiny_sft.yaml", tiny_air, run_dir)
    assert [m["loss"] for m in resumed] == [m["loss"] for m in expected]
