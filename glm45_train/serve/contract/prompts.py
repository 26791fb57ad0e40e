"""Item (b): the prompt the chat endpoint builds equals, token for token, the one our renderer trains with.

Notable:
- `POST /v1/chat/completions` with the conversation's messages and tools, `chat_template_kwargs:
  {"enable_thinking": ...}`, `max_tokens: 1` and `return_token_ids: true`: the answer's `prompt_token_ids` are
  what vLLM rendered with the export's own chat template and tokenized. They must equal our renderer's
  generation prompt exactly (thinking on: ends `<|assistant|>`; off: `/nothink` on user turns and the empty
  `<think></think>` after `<|assistant|>`). A model trained on one rendering and served with another sees
  prompts it was never trained on, silently.
- A failure names the conversation, the thinking mode and the first differing position, with the tokens
  around it on both sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer

from glm45_train.serve.contract.cases import PromptCase
from glm45_train.serve.contract.result import FAIL, PASS, CheckResult, first_failures
from glm45_train.serve.server import ServerError, VLLMServer

CONTEXT_TOKENS = 3  # shown on each side of a difference


def served_prompt_ids(server: VLLMServer, model: str, case: PromptCase) -> list[int]:
    body: dict[str, Any] = {
        "model": model,
        "messages": case.messages,
        "max_tokens": 1,
        "return_token_ids": True,
        "chat_template_kwargs": {"enable_thinking": case.thinking},
    }
    if case.tools:
        body["tools"] = case.tools
    answer = server.post("/v1/chat/completions", body)
    if not isinstance(answer.get("prompt_token_ids"), list):
        raise ServerError(f"{server.url}: no prompt_token_ids in the chat answer (vLLM too old for return_token_ids?)")
    return [int(i) for i in answer["prompt_token_ids"]]


def first_difference(left: Sequence[int], right: Sequence[int]) -> int | None:
    """The first position where the two id lists differ (the shorter one's end counts), or None."""
    for position, (a, b) in enumerate(zip(left, right, strict=False)):
        if a != b:
            return position
    return None if len(left) == len(right) else min(len(left), len(right))


def describe_difference(served: list[int], ours: list[int], position: int, tokenizer: Tokenizer | None) -> str:
    def around(ids: list[int]) -> str:
        window = ids[max(0, position - CONTEXT_TOKENS) : position + CONTEXT_TOKENS + 1]
        shown = [repr(tokenizer.id_to_token(i)) if tokenizer is not None else str(i) for i in window]
        return " ".join(shown) or "(end)"

    return (
        f"first difference at token {position} (served {len(served)} tokens, renderer {len(ours)}):\n"
        f"  served:   ... {around(served)}\n  renderer: ... {around(ours)}"
    )


def check_chat_prompts(
    server: VLLMServer, model: str, cases: Sequence[PromptCase], tokenizer: Tokenizer | None = None
) -> CheckResult:
    title = "chat endpoint prompt ids = our renderer"
    failures, tokens = [], 0
    for case in cases:
        served = served_prompt_ids(server, model, case)
        tokens += len(served)
        position = first_difference(served, case.expected_ids)
        if position is not None:
            mode = "on" if case.thinking else "off"
            difference = describe_difference(served, case.expected_ids, position, tokenizer)
            failures.append(f"{case.origin} (thinking {mode}): {difference}")
    conversations = len({case.origin for case in cases})
    numbers = f"{len(cases)} prompts ({conversations} conversations, thinking on/off), {tokens} tokens"
    if not cases:
        return CheckResult("b", title, FAIL, numbers, "no conversation with a prompt before an assistant turn")
    if failures:
        detail = first_failures(failures, 3)
        return CheckResult("b", title, FAIL, f"{numbers}; {len(failures)} differ", detail)
    return CheckResult("b", title, PASS, f"{numbers}; all identical")
