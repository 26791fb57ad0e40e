"""What a training checkpoint must agree with to be resumed: the data it was trained on and the schedule's inputs.

Every checkpoint records `RunInputs.record` (the prepared dataset's fingerprint, or the RL prompts'; the keys that
decide which rows a step reads; the LR/WD schedule's inputs). On resume the recipe's values are compared with it:
a difference stops the run naming each key with both values, unless `checkpoint.allow_changes` lists its group:

- `data`: continue on the new rows from the saved position (a dataset re-prepared with other inputs, say).
- `schedule`: the recipe's schedule takes over from the saved step (Megatron's `override_opt_param_scheduler`),
  e.g. `train.steps` raised to train longer; without it Megatron would silently keep the checkpoint's schedule
  while recipe.yaml said otherwise.

Checkpoints written before this record existed resume unchecked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from glm45_train.config.recipe import CHANGE_GROUPS
from glm45_train.errors import UserError


class ResumeMismatch(UserError):
    """The recipe disagrees with what the checkpoint was trained with."""


@dataclass(frozen=True)
class RunInputs:
    data: dict[str, Any]  # "fingerprint" plus the recipe keys that choose each step's rows
    schedule: dict[str, Any]  # recipe key -> value, the total step count resolved
    allowed: frozenset[str] = field(default_factory=frozenset)

    @property
    def record(self) -> dict[str, Any]:
        return {"data": self.data, "schedule": self.schedule}

    def check(self, recorded: dict[str, Any] | None, where: str) -> list[str]:
        """Raise `ResumeMismatch` for a change not allowed; return one line per allowed change (to print)."""
        if not recorded:
            return []
        refused: list[str] = []
        allowed: list[str] = []
        for group in CHANGE_GROUPS:
            before, now = recorded.get(group, {}), getattr(self, group)
            for key in sorted(set(before) | set(now)):
                if before.get(key) != now.get(key):
                    line = f"{key}: {_shown(before.get(key))} in the checkpoint, {_shown(now.get(key))} now"
                    (allowed if group in self.allowed else refused).append(f"[{group}] {line}")
        if refused:
            groups = sorted({line[1 : line.index("]")] for line in refused})
            raise ResumeMismatch(
                f"{where} was trained with other inputs than this recipe's:\n  "
                + "\n  ".join(refused)
                + f"\nresuming would mix them silently: set checkpoint.allow_changes=[{','.join(groups)}] to "
                "continue with the recipe's values from the saved step, or set another checkpoint.dir"
            )
        return allowed

    def schedule_changed(self, recorded: dict[str, Any] | None) -> bool:
        return bool(recorded) and recorded.get("schedule") != self.schedule  # type: ignore[union-attr]


def _shown(value: Any) -> str:
    return "(not recorded)" if value is None else repr(value)


def schedule_inputs(train: Any, total_steps: int) -> dict[str, Any]:
    """The recipe values the LR/WD scheduler is built from (train/setup.py `_scheduler`)."""
    return {
        "steps (resolved)": total_steps,
        "train.lr": train.lr,
        "train.min_lr": train.min_lr,
        "train.warmup_fraction": train.warmup_fraction,
        "train.weight_decay": train.weight_decay,
    }


def sft_inputs(recipe: Any, fingerprint: str, total_steps: int) -> RunInputs:
    """The prepared dataset's fingerprint and the keys that choose each step's rows (order, batch, eval split)."""
    train = recipe.train
    data = {
        "fingerprint": fingerprint,
        "train.seed": train.seed,
        "train.global_batch_size": train.global_batch_size,
        "eval.split": recipe.eval.split,
    }
    return RunInputs(data, schedule_inputs(train, total_steps), frozenset(recipe.checkpoint.allow_changes))


def fingerprint_of(parts: Iterable[bytes]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(len(part).to_bytes(8, "little") + part)
    return digest.hexdigest()
