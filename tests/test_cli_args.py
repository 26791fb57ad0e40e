"""Numbers on the command line outside their range are refused by argparse (exit 2, naming the flag) before any
work; an absurd `data prepare --workers` is capped, and said; Ctrl-C is one line and exit 130."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import glm45_train.cli.plan
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


class InterruptedWriter(dcp.FileSystemWriter):
    """A checkpoint write that Ctrl-C stops halfway, or that fails for another reason."""

    def __init__(self, path, error: BaseException) -> None:
        super().__init__(path)
        self.error = error

    def write_data(self, plan, planner):
        raise self.error


@pytest.mark.parametrize("interrupted", [True, False])
def test_ctrl_c_inside_a_checkpoint_write_is_one_line_and_130(interrupted, tmp_path, monkeypatch, capsys):
    """torch.distributed.checkpoint wraps every rank's failure in one CheckpointException: Ctrl-C inside it is
    reported as an interrupt (exit 130), any other failure keeps its traceback (control)."""
    error = KeyboardInterrupt() if interrupted else ValueError("disk on fire")

    def save_a_checkpoint(args):
        writer = InterruptedWriter(tmp_path / "ckpt", error)
        dcp.save({"weight": torch.ones(4)}, storage_writer=writer, no_dist=True)

    monkeypatch.setattr(glm45_train.cli.plan, "run", save_a_checkpoint)
    if interrupted:
        assert cli(["plan", "recipes/tiny_lora.yaml"]) == 130
        assert capsys.readouterr().err.strip().splitlines()[-1] == "glm45-train plan: interrupted"
    else:
        with pytest.raises(CheckpointException, match="disk on fire"):
            cli(["plan", "recipes/tiny_lora.yaml"])
