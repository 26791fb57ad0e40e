"""A resume agrees with what its checkpoint was trained with: a prepared dataset replaced under the run, or a
changed schedule (`train.steps` raised), stops it naming each key with both values; `checkpoint.allow_changes`
lets it go on, and then the recipe's schedule really applies from the saved step. Unfinished `.partial` folders of
an interrupted run are removed by the next one. One-process LoRA runs inside the test process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glm45_train.cli.main import main
from tests.conftest import REPO_ROOT

SAMPLE = REPO_ROOT / "data/sample_distill.jsonl"


def prepare(tokenizer_dir: Path, out: Path, *extra: str) -> None:
    argv = ["data", "prepare", str(SAMPLE), "--tokenizer", str(tokenizer_dir), "--output-dir", str(out)]
    assert main([*argv, "--max-length", "1024", "--no-progress", *extra]) == 0


def lora(tiny_air: Path, run_dir: Path, prepared: Path, steps: int, *extra: str) -> int:
    return main([
        "sft", str(REPO_ROOT / "recipes/tiny_lora.yaml"), f"model.source={tiny_air}", f"checkpoint.dir={run_dir}",
        f"data.prepared={prepared}", "data.inputs=[]", "parallel.ep=1", "train.global_batch_size=2",
        f"train.steps={steps}", "checkpoint.interval=2", "eval.interval=0", "logging.tensorboard=false",
        "logging.plot=false", *extra,
    ])  # fmt: skip


def lrs(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["lr"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def four_steps(megatron_world, tiny_air, tmp_path_factory):
    """The uninterrupted reference: 4 steps on the sample data."""
    root = tmp_path_factory.mktemp("guards")
    prepare(tiny_air, root / "data")
    assert lora(tiny_air, root / "run", root / "data", 4) == 0
    return root / "data", lrs(root / "run")


def test_replaced_data_and_raised_steps_stop_the_resume_naming_both(four_steps, tiny_air, tmp_path, capsys):
    reference_data, reference_lrs = four_steps
    data, run_dir = tmp_path / "data", tmp_path / "run"
    prepare(tiny_air, data)
    assert lora(tiny_air, run_dir, data, 2) == 0
    prepare(tiny_air, data, "--max-length", "512", "--overwrite")  # other rows under the same path
    capsys.readouterr()
    assert lora(tiny_air, run_dir, data, 4) == 2
    err = capsys.readouterr().err
    assert "iter_0000002 was trained with other inputs than this recipe's" in err
    assert "[data] fingerprint: '" in err and "[schedule] steps (resolved): 2 in the checkpoint, 4 now" in err
    assert "checkpoint.allow_changes=[data,schedule]" in err
    assert sorted(lrs(run_dir)) == [1, 2]  # nothing trained on the mix

    assert lora(tiny_air, run_dir, data, 4, "checkpoint.allow_changes=[data,schedule]") == 0
    assert "resuming with a change checkpoint.allow_changes allows: [data] fingerprint" in capsys.readouterr().err
    resumed = lrs(run_dir)
    assert [resumed[s] for s in (1, 2)] != [reference_lrs[s] for s in (1, 2)]  # a 2-step schedule at first
    assert [resumed[s] for s in (3, 4)] == [reference_lrs[s] for s in (3, 4)]  # then the recipe's 4-step one
    assert reference_data != data


def test_the_same_data_prepared_again_resumes_without_a_word(four_steps, tiny_air, tmp_path, capsys):
    """Control: re-preparing the same inputs gives the same fingerprint, and an unchanged recipe resumes."""
    data, run_dir = tmp_path / "data", tmp_path / "run"
    prepare(tiny_air, data)
    assert lora(tiny_air, run_dir, data, 2) == 0
    prepare(tiny_air, data, "--overwrite")
    (run_dir / "iter_0000009.partial").mkdir()  # left by a run that died while saving
    capsys.readouterr()
    assert lora(tiny_air, run_dir, data, 2) == 0
    err = capsys.readouterr().err
    assert "resuming with a change" not in err and "other inputs" not in err
    assert "iter_0000009.partial: an unfinished checkpoint of an interrupted run" in err
    assert not (run_dir / "iter_0000009.partial").exists()
    assert (
        json.loads((data / "metadata.json").read_text())["fingerprint"]
        == json.loads((four_steps[0] / "metadata.json").read_text())["fingerprint"]
    )


def test_unknown_change_group_is_refused_naming_the_key(tiny_air, tmp_path, capsys):
    assert lora(tiny_air, tmp_path / "run", tmp_path / "data", 2, "checkpoint.allow_changes=[everything]") == 2
    assert "key 'checkpoint.allow_changes': 'everything' is not one of data, schedule" in capsys.readouterr().err
