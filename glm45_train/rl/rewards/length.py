"""`length`: DAPO's overlong reward shaping, a penalty that grows as a response nears the length limit.

With L = len(response_ids) (the stop token counts if the engine kept it):
  0                                   for L <= max_len - buffer
  (max_len - buffer - L) / buffer     for max_len - buffer < L <= max_len  (0 down to -1, linear)
  -1                                  for L > max_len
`max_len` is the limit the policy should stay under (often the rollout's max new tokens), `buffer` the width of
the soft zone (DAPO: 4096 of 20480). Added with a weight to a task reward; for "keep non-thinking answers short"
set max_len to the target length.
"""

from __future__ import annotations

from typing import Any

from glm45_train.rl.rewards.base import RewardInput


def overlong_penalty(sample: RewardInput, *, max_len: int, buffer: int) -> float:
    """DAPO's soft overlong punishment: 0, then linear to -1 at `max_len`, -1 beyond."""
    length = len(sample.response_ids)
    start = max_len - buffer
    if length <= start:
        return 0.0
    if length > max_len:
        return -1.0
    return (start - length) / buffer


def check_length_args(args: dict[str, Any]) -> None:
    if not 0 < args["buffer"] <= args["max_len"]:
        raise ValueError(f"need 0 < buffer <= max_len (got buffer {args['buffer']}, max_len {args['max_len']})")
