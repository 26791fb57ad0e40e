"""A full or forbidden output disk is one line naming the path, the reason and the room left, exit 2, and no
staging folder behind: both export directions and `data prepare`. Once raw OSError tracebacks.

A full disk is played by the kernel itself: the command runs with RLIMIT_FSIZE set low (and SIGXFSZ ignored), so
its first large write fails mid-file with EFBIG, as a full filesystem fails with ENOSPC. A forbidden one is /sys,
where even root may not create a folder."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

LIMIT = 16 * 1024  # bytes per file: below every checkpoint file and the sample data's token file


def _small_files_only() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def run_cli(*argv: str, full_disk: bool) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "glm45_train.cli.main", *argv], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=300, preexec_fn=_small_files_only if full_disk else None, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def commands(tiny_air: Path, mcore_dirs: dict[str, Path], tiny_tokenizer_dir: Path, out: Path) -> dict[str, list]:
    return {
        "to-mcore": ["export", "--to-mcore", "--model", str(tiny_air), "--output-dir", str(out), "--no-progress"],
        "to-hf": ["export", "--to-hf", "--model", str(mcore_dirs["air"]), "--output-dir", str(out), "--no-progress"],
        "prepare": [
            "data", "prepare", str(REPO_ROOT / "data/sample_distill.jsonl"), "--tokenizer", str(tiny_tokenizer_dir),
            "--output-dir", str(out), "--max-length", "1024", "--no-progress",
        ],
    }  # fmt: skip


def assert_one_line_and_clean(result: subprocess.CompletedProcess, out: Path, *said: str) -> None:
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(err) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for words in said:
        assert words in err[0], err[0]
    assert not out.exists() or not any(out.iterdir())
    assert not list(out.parent.glob(f".{out.name}*")), list(out.parent.iterdir())  # no staging left


@pytest.mark.parametrize("command", ["to-mcore", "to-hf", "prepare"])
def test_a_full_disk_is_named_with_the_room_left(command, tiny_air, mcore_dirs, tiny_tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    argv = commands(tiny_air, mcore_dirs, tiny_tokenizer_dir, out)[command]
    result = run_cli(*argv, full_disk=True)
    assert_one_line_and_clean(result, out, "File too large", "GiB free on its filesystem", str(tmp_path))
    assert run_cli(*argv, full_disk=False).returncode == 0  # control: the same command with room succeeds


@pytest.mark.parametrize("command", ["to-mcore", "prepare"])
def test_a_folder_the_system_forbids_is_named(command, tiny_air, mcore_dirs, tiny_tokenizer_dir):
    out = Path("/sys/glm45-train-test-out")
    result = run_cli(*commands(tiny_air, mcore_dirs, tiny_tokenizer_dir, out)[command], full_disk=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "/sys/glm45-train-test-out" in result.stderr and "Operation not permitted" in result.stderr
