"""One item of the serving contract as a result: PASS, FAIL or SKIP, with the numbers behind it.

Notable:
- Every check returns a `CheckResult` rather than raising: `serve --check` runs all items and prints one table,
  and a failing item says where it failed (`detail`: the conversation, position or field).
- `SKIP` is for an item that cannot run here (no adapter given; a platform vLLM does not support for it), never
  for an item that ran and disagreed; only FAIL makes the contract fail.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


@dataclass(frozen=True)
class CheckResult:
    item: str  # "a", "b", ...
    title: str
    status: str  # PASS | FAIL | SKIP
    numbers: str  # what was measured, e.g. "12 sequences, 3,040 tokens, max |diff| 2.4e-06 (<= 1e-04)"
    detail: str = ""  # on FAIL: where it first went wrong
    measured: dict[str, float] = field(default_factory=dict)  # the key numbers, for programs and tests

    @property
    def passed(self) -> bool:
        return self.status != FAIL


def first_failures(failures: Sequence[str], shown: int) -> str:
    """A FAIL's detail: the first `shown` failures, one per line, and how many more there were."""
    more = f"\n(+{len(failures) - shown} more)" if len(failures) > shown else ""
    return "\n".join(failures[:shown]) + more


def all_hold(results: Sequence[CheckResult]) -> bool:
    return all(result.passed for result in results)


def format_table(results: Sequence[CheckResult]) -> str:
    """A fixed-width table, one line per item (+ its detail indented below), and a verdict line."""
    title_width = max(len(result.title) for result in results)
    lines = [f"item  {'check':<{title_width}}  result  measured"]
    for result in results:
        lines.append(f"({result.item})   {result.title:<{title_width}}  {result.status:<6}  {result.numbers}")
        lines += [f"      {line}" for line in result.detail.splitlines()]
    failed = [f"({result.item})" for result in results if not result.passed]
    lines.append(f"serving contract: {'FAIL ' + ', '.join(failed) if failed else 'PASS'}")
    return "\n".join(lines)
