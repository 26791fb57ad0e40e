"""Numbers on the command line outside their range are refused by argparse (exit 2, naming the flag) before any
work; an absurd `data prepare --workers` is capped, and said."""

from __future__ import annotations

import pytest

from glm45_train.cli.main import main as cli
from tests.test_prepare import SAMPLE_DATA

PREPARE = ["data", "prepare", "x.jsonl", "--tokenizer", "t", "--output-dir", "o"]


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["chat", "MODEL", "--temperature", "-1"], "--temperature: must be a finite number >= 0, got -1"),
        (["chat", "MODEL", "--temperature", "nan"], "--temperature: must be a finite number >= 0, got nan"),
        (["chat", "MODEL", "--max-new-tokens", "0"], "--max-new-tokens: must be a positive integer, got 0"),
        ([*PREPARE, "--max-length", "0"], "--max-length: must be a positive integer, got 0"),
        ([*PREPARE, "--max-length", "8", "--workers", "-3"], "--workers: must be a positive integer, got -3"),
        (["export", "--to-mcore", "--model", "m", "--output-dir", "o", "--tp", "two"], "--tp: not an integer: 'two'"),
    ],
)  # fmt: skip
def test_out_of_range_numbers_are_refused_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def test_absurd_worker_counts_are_capped_and_said(tiny_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["data", "prepare", str(SAMPLE_DATA), "--tokenizer", str(tiny_tokenizer_dir), "--output-dir", str(out)]
    assert cli([*argv, "--max-length", "1024", "--no-progress", "--workers", "10000"]) == 0
    assert "--workers 10000: capped at" in capsys.readouterr().err
    assert (out / "report.json").is_file()
