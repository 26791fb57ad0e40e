"""`RewardSet`: score a batch with every reward, weigh them, and account for every failure.

Notable:
- A reward value must be a finite real number. `bool` is accepted as 0.0 / 1.0 (a predicate is a fine reward);
  NaN, ±inf, None, strings, tensors and anything else are failures, as is raising. A failure is never trained on:
  its value is NaN in `per_function`, the sample's `total` is 0.0 and `failed` marks it, so the trainer gives it
  zero advantage. Each failure names the function and the prompt's file:line.
- `max_failure_fraction`: when one function fails on more than this fraction of a batch, `score` raises
  `RewardFailureError` (a `UserError`) naming the function and an example prompt, so a broken user reward stops
  the run instead of training on nothing. The scores are attached to the error.
- Keys of `per_function`: the spec's name; a name used again gets `#2`, `#3`… in order.
- Rewards run one after another in this process; they are pure functions, so a pool can be added here later.
"""

from __future__ import annotations

import math
import numbers
import reprlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from glm45_train.data.conversation import Origin
from glm45_train.errors import UserError
from glm45_train.rl.rewards.base import RewardFn, RewardInput
from glm45_train.rl.rewards.registry import resolve_reward
from glm45_train.rl.rewards.spec import RewardSpec


@dataclass(frozen=True)
class RewardFailure:
    function: str  # the per_function key
    index: int  # the sample's position in the batch
    origin: Origin  # the prompt's file and line
    error: str  # the exception, or the bad value's repr

    def __str__(self) -> str:
        return f"{self.origin}: reward {self.function!r} {self.error}"


@dataclass
class RewardScores:
    per_function: dict[str, list[float]]  # raw values; NaN where the function failed
    total: list[float]  # weighted sum; 0.0 for a failed sample
    failed: list[bool]
    failures: list[RewardFailure]

    def mean_std(self) -> dict[str, tuple[float, float]]:
        """Mean and (population) standard deviation per function over the samples it did not fail on."""
        return {key: _mean_std([v for v in values if not math.isnan(v)]) for key, values in self.per_function.items()}

    def failure_counts(self) -> dict[str, int]:
        return {key: sum(math.isnan(v) for v in values) for key, values in self.per_function.items()}


class RewardFailureError(UserError):
    """Too many failures of one reward in a batch; `scores` holds the batch's scores all the same."""

    def __init__(self, message: str, scores: RewardScores) -> None:
        super().__init__(message)
        self.scores = scores


class RewardSet:
    """The recipe's rewards, resolved and checked up front (`where` is their key path in the recipe)."""

    def __init__(
        self, specs: Sequence[RewardSpec], *, max_failure_fraction: float = 0.5, where: str = "rl.rewards"
    ) -> None:
        if not specs:
            raise UserError(f"{where}: no rewards given")
        if not 0.0 <= max_failure_fraction <= 1.0:
            raise UserError(f"max_failure_fraction {max_failure_fraction}: must be between 0 and 1")
        self.specs = list(specs)
        self.max_failure_fraction = max_failure_fraction
        self.keys = _unique_keys([spec.name for spec in self.specs])
        self.functions: list[RewardFn] = [
            resolve_reward(spec.name, spec.args, f"{where}[{index}]") for index, spec in enumerate(self.specs)
        ]

    def score(self, inputs: Sequence[RewardInput]) -> RewardScores:
        """Every reward on every sample; raises `RewardFailureError` past `max_failure_fraction`."""
        failed = [False] * len(inputs)
        failures: list[RewardFailure] = []
        per_function: dict[str, list[float]] = {}
        for key, spec, function in zip(self.keys, self.specs, self.functions, strict=True):
            values = per_function[key] = []
            for index, sample in enumerate(inputs):
                value, problem = call_reward(function, sample, spec.args)
                if problem is not None:
                    failed[index] = True
                    failures.append(RewardFailure(key, index, sample.prompt.origin, problem))
                values.append(value)
        total = [
            0.0 if failed[i] else sum(s.weight * per_function[k][i] for k, s in zip(self.keys, self.specs, strict=True))
            for i in range(len(inputs))
        ]
        scores = RewardScores(per_function, total, failed, failures)
        self.check_failures(scores, len(inputs))
        return scores

    def check_failures(self, scores: RewardScores, batch: int) -> None:
        """Raise `RewardFailureError` when one function failed on more than max_failure_fraction of `batch`."""
        for key, count in scores.failure_counts().items():
            if batch and count / batch > self.max_failure_fraction:
                example = next(f for f in scores.failures if f.function == key)
                raise RewardFailureError(
                    f"reward {key!r} failed on {count} of {batch} samples "
                    f"(more than max_failure_fraction {self.max_failure_fraction:g}); e.g. {example}",
                    scores,
                )


def call_reward(function: RewardFn, sample: RewardInput, args: dict[str, Any]) -> tuple[float, str | None]:
    """(value, None), or (NaN, what went wrong) when the function raised or returned no finite number."""
    try:
        value = function(sample, **args)
    except Exception as exc:  # a reward's bug must be counted and reported, not crash the run
        return math.nan, f"raised {type(exc).__name__}: {exc}"
    if isinstance(value, bool):
        return float(value), None
    if not isinstance(value, numbers.Real):
        return math.nan, f"returned {reprlib.repr(value)} ({type(value).__name__}), expected a number"
    number = float(value)
    if not math.isfinite(number):
        return math.nan, f"returned {number!r}, expected a finite number"
    return number, None


def _unique_keys(names: list[str]) -> list[str]:
    keys: list[str] = []
    for name in names:
        seen = sum(1 for earlier in names[: len(keys)] if earlier == name)
        keys.append(name if seen == 0 else f"{name}#{seen + 1}")
    return keys


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
