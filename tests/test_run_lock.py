"""One run per run directory: a second `sft` into a folder a live run holds stops (exit 2, naming the holder)
before writing anything; the lock of a SIGKILLed run is free at once (the kernel releases it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from glm45_train.train.run_lock import RunDirInUse, claim_run_dir, release_run_dir
from tests.test_sft import _env, sft_command

HOLD = "import sys, time; from glm45_train.train.run_lock import claim_run_dir; claim_run_dir(sys.argv[1]); print('held', flush=True); time.sleep(600)"  # noqa: E501


def _holder(run_dir) -> subprocess.Popen:
    """A process holding `run_dir` the way a run's first rank does."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], env=_env(), stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


def test_a_second_run_into_a_held_directory_stops_before_writing(tiny_air, tmp_path):
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        before = sorted(p.name for p in run_dir.iterdir())
        result = subprocess.run(
            sft_command("tiny_lora.yaml", tiny_air, run_dir), env=_env(), capture_output=True, text=True, timeout=300
        )
        assert result.returncode != 0
        assert f"{run_dir}: in use by another run (pid {holder.pid} on " in result.stderr, result.stderr[-3000:]
        assert sorted(p.name for p in run_dir.iterdir()) == before == [".lock"]  # no data, recipe, metrics
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_run_is_free_at_once(tmp_path):
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    with pytest.raises(RunDirInUse, match=rf"pid {holder.pid} on .* since "):
        claim_run_dir(run_dir)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    deadline = time.monotonic() + 10
    while True:  # the kernel drops the lock with the process: no stale-lock file to clean
        try:
            claim_run_dir(run_dir)
            break
        except RunDirInUse:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert f"pid {os.getpid()} on " in (run_dir / ".lock").read_text()
    claim_run_dir(run_dir)  # the same process again: it already holds it
    release_run_dir(run_dir)
