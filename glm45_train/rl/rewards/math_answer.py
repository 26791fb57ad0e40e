"""`math`: the final answer equals the prompt's reference answer mathematically (HF's `math-verify`).

Notable:
- `math_verify.parse` extracts the answer (a `\\boxed{}` first, else the last LaTeX or plain expression or number)
  and `verify` compares symbolically and numerically, so `\\boxed{1/2}`, `0.5` and `\\frac{1}{2}` agree. We add no
  normaliser of our own.
- Only the final answer is parsed (after `</think>`): a number inside the reasoning earns nothing.
- A bare reference answer (`2\\pi`, `0.5`, `x = 3`) is parsed as LaTeX inside `$…$`; a solution text (boxed,
  delimited, or prose) as it is. One that math-verify cannot parse is a failure of the prompt (reported with its
  line), not a 0.
- math-verify's timeouts use SIGALRM, which works only in the main thread; elsewhere (a thread pool) they are
  off. Run this reward in processes if responses may be adversarial.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Any

from glm45_train.rl.rewards.base import RewardInput, final_answer, reference_answer

PROSE = re.compile(r"(?<![\\\w])[A-Za-z]{2,}\s+[A-Za-z]{2,}\b")  # two words in a row, not LaTeX commands


def math_match(sample: RewardInput, *, timeout_s: int = 5) -> float:
    """1.0 if the final answer verifies against the reference answer, else 0.0."""
    reference = reference_answer(sample)
    timeout = timeout_s if threading.current_thread() is threading.main_thread() else None
    gold = _parse_reference(reference, timeout)
    answer = final_answer(sample)
    if not answer:
        return 0.0
    from math_verify import parse, verify

    predicted = parse(answer, parsing_timeout=timeout)  # None: no alarm
    return 1.0 if predicted and verify(gold, predicted, timeout_seconds=timeout) else 0.0


@lru_cache(maxsize=4096)
def _parse_reference(reference: str, timeout: int | None) -> list[Any]:
    from math_verify import parse

    gold = parse(reference_text(reference), parsing_timeout=timeout)
    if not any(not isinstance(item, str) for item in gold):
        raise ValueError(f"reference answer {reference!r} does not parse as math (math-verify found no expression)")
    return list(gold)


def reference_text(reference: str) -> str:
    """What math-verify parses for a reference: a bare answer inside `$…$` (unwrapped, `2\\pi` would read as 2),
    text that is delimited, boxed or prose (a solution) as it is."""
    if "$" in reference or "\\boxed" in reference or PROSE.search(reference):
        return reference
    return f"${reference.strip()}$"
