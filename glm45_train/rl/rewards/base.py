"""What a reward function sees (`RewardInput`) and the helpers the built-ins share.

Notable:
- A reward function is any callable `(RewardInput, **args) -> float`, a pure function of its input (rewards may
  run in a thread or process pool).
- `response` is the decoded response with special tokens kept as text (`<think>`, `</think>`, `<tool_call>`, and
  the stop token if the engine kept it). `final_answer` is what answer rewards judge: the text after the last
  `</think>`, without a trailing stop token, stripped. A `<think>` that is opened and never closed leaves no answer
  (the model ran out of tokens while thinking); a response without think tags is all answer.
- Agent rollouts: `response` is the last assistant turn (what the user is answered with), `response_ids` the
  whole trajectory, and `trajectory` holds every turn and tool result (rewards such as `tool_calls` judge it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from glm45_train.model.tokenizer import STOP_TOKENS
from glm45_train.rl.prompts import PromptRecord


@dataclass(frozen=True)
class RewardInput:
    prompt: PromptRecord
    response: str
    response_ids: list[int]
    thinking: bool
    finished: bool  # stopped on a stop token, not at the length limit
    trajectory: Any = None  # agent rollouts (rl/agent/episodes.Trajectory): every turn and tool result, the counts


RewardFn = Callable[..., Any]  # (RewardInput, **args) -> float; anything else it returns is a failure


def without_stop(response: str) -> str:
    """The response without the stop token(s) at its end."""
    trimmed = True
    while trimmed:
        trimmed = False
        for stop in STOP_TOKENS:
            if response.endswith(stop):
                response, trimmed = response[: -len(stop)], True
    return response


def final_answer(sample: RewardInput) -> str:
    """The answer part of the response (see the module docstring)."""
    text = without_stop(sample.response)
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1].strip()
    if "<think>" in text:
        return ""
    return text.strip()


def target_of(sample: RewardInput, given: Any, arg: str, field: str) -> Any:
    """`given` (the reward's argument) if set, else the prompt's extra `field`; raises when neither is."""
    if given is not None:
        return given
    value = sample.prompt.extra.get(field)
    if value is None:
        raise ValueError(f"no {arg}: give the reward args.{arg}, or the prompt a {field!r} field")
    return value


def reference_answer(sample: RewardInput, given: str | None = None) -> str:
    """`given`, else the prompt's answer; raises when the prompt has none."""
    answer = given if given is not None else sample.prompt.answer
    if answer is None:
        raise ValueError("the prompt has no reference answer (an 'answer' field, or a final assistant turn)")
    return answer
