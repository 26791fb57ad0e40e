"""Text rewards on the final answer: `exact`, `regex`, `contains`, and the smooth `token_fraction`.

Notable:
- Targets come from the reward's args or, when not given there, from the prompt: `exact` uses the prompt's
  answer; `regex` the prompt's extra field `pattern`, `contains` its extra field `word` (field names are args).
  A prompt that has no target is a failure reported with its line.
- `token_fraction` is the fraction of response tokens equal to `token_id`: it rises smoothly, so a random policy
  starts low but above zero (GRPO learns nothing from groups whose rewards are all equal). `contains` is its 0/1
  counterpart.
"""

from __future__ import annotations

import re
from functools import lru_cache

from glm45_train.rl.rewards.base import RewardInput, final_answer, reference_answer, target_of


def exact(sample: RewardInput, *, answer: str | None = None, ignore_case: bool = False) -> float:
    """1.0 if the final answer equals the reference answer (surrounding whitespace ignored)."""
    expected = reference_answer(sample, answer).strip()
    got = final_answer(sample)
    if ignore_case:
        expected, got = expected.casefold(), got.casefold()
    return float(got == expected)


def regex(
    sample: RewardInput, *, pattern: str | None = None, field: str = "pattern", ignore_case: bool = False
) -> float:
    """1.0 if `re.search(pattern)` finds a match in the final answer."""
    text = target_of(sample, pattern, "pattern", field)
    if not isinstance(text, str):
        raise TypeError(f"pattern is {type(text).__name__}, expected a string")
    return float(compile_pattern(text, ignore_case).search(final_answer(sample)) is not None)


def contains(sample: RewardInput, *, word: str | None = None, field: str = "word", ignore_case: bool = False) -> float:
    """1.0 if the final answer contains `word` (a plain substring)."""
    target = target_of(sample, word, "word", field)
    if not isinstance(target, str) or not target:
        raise TypeError(f"word is {target!r}, expected a non-empty string")
    got = final_answer(sample)
    if ignore_case:
        target, got = target.casefold(), got.casefold()
    return float(target in got)


def token_fraction(sample: RewardInput, *, token_id: int) -> float:
    """Fraction of the response's tokens that are `token_id` (0.0 for an empty response)."""
    if not sample.response_ids:
        return 0.0
    return sample.response_ids.count(token_id) / len(sample.response_ids)


@lru_cache(maxsize=1024)
def compile_pattern(pattern: str, ignore_case: bool = False) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE if ignore_case else 0)
