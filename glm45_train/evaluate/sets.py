"""Evaluation sets: prompts read as RL reads them, each with its scorer (an RL reward: one implementation).

Notable:
- A SET is what `data prepare` and `rl` read: a JSONL/JSON/Parquet file, a saved datasets directory or a
  ModelScope dataset ID, records with `messages` (or a final assistant turn to strip), `answer`, `tools` and any
  fields the scorer reads (`pattern` for regex, `word` for contains). Bad records are dropped and reported by
  file and line (rl/prompts.py, the same reasons as data prepare); a set with no usable record is an error.
- `--scorer` is one reward name for every set or one per set, in order: `math` (math-verify), `exact`, `regex`,
  `contains`, `glm_format` (the format and tool-call validity), `tool_calls`, or a user's `module:function`.
  Its arguments come from the record's fields, as in RL.
- A scorer that fails on a record (a reference math-verify cannot parse, a missing field) scores nothing there:
  the sample counts as a scorer failure, named by file:line, never as a wrong answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from glm45_train.errors import UserError
from glm45_train.evaluate.models import unique_labels
from glm45_train.rl.prompts import PromptSet, load_prompts
from glm45_train.rl.rewards.scoring import RewardSet
from glm45_train.rl.rewards.spec import RewardSpec

DEFAULT_SCORER = "math"


@dataclass
class EvalSet:
    label: str
    source: str
    prompts: PromptSet
    scorer_name: str
    scorer: RewardSet


def load_eval_sets(specs: Sequence[str], scorers: Sequence[str] | None) -> list[EvalSet]:
    """Every set read and its scorer resolved (arguments checked) before any engine starts."""
    names = _scorers_per_set(specs, scorers)
    labelled = unique_labels([(_set_label(spec), spec) for spec in specs])
    sets = []
    for (label, spec), name in zip(labelled, names, strict=True):
        scorer = RewardSet([RewardSpec(name)], max_failure_fraction=1.0, where="--scorer")
        sets.append(EvalSet(label, spec, load_prompts([spec]), name, scorer))
    return sets


def _scorers_per_set(specs: Sequence[str], scorers: Sequence[str] | None) -> list[str]:
    if not scorers:
        return [DEFAULT_SCORER] * len(specs)
    if len(scorers) == 1:
        return list(scorers) * len(specs)
    if len(scorers) != len(specs):
        raise UserError(f"--scorer: {len(scorers)} scorers for {len(specs)} sets; give one for all, or one per set")
    return list(scorers)


def _set_label(spec: str) -> str:
    path = Path(spec.rstrip("/"))
    if path.exists():
        return path.stem if path.is_file() else path.name
    return spec  # a ModelScope ID
