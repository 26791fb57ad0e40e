"""Completions → scored rows of `samples.jsonl`: the response split into reasoning and answer, its tool calls
parsed and checked against the prompt's tools, its score, its token counts.

Notable:
- The response is decoded with special tokens kept (what the RL rewards see). The answer is `final_answer`'s
  (after the last `</think>`, stop token removed); the reasoning is the text inside `<think>…</think>`, or
  everything after an opened `<think>` that never closed (the model ran out of tokens while thinking).
- Token counts are of the ids the engine returned: `tokens` (the whole response, stop token included),
  `reasoning_tokens` (strictly between the `<think>` and `</think>` ids). With thinking off the prompt already
  ends with an empty think block, so a response that opens another and writes in it `thinks`.
- A tool call is valid when its block parses and it names one of the prompt's tools with declared, well-typed
  arguments (data/tool_calls.py, as the `glm_format` reward and the agent rollouts judge calls).
- `correct`: the score reaches `pass_score` (1.0: the built-in scorers give 1.0 or 0.0); NaN (the scorer failed)
  is neither correct nor wrong, and counted apart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from glm45_train.data.tool_calls import call_problems_against_schema, parse_tool_calls, tool_schemas
from glm45_train.evaluate.sets import EvalSet
from glm45_train.rl.prompts import PromptRecord
from glm45_train.rl.rewards.base import RewardInput, final_answer, without_stop
from glm45_train.rl.rollout import Completion

PASS_SCORE = 1.0


@dataclass(frozen=True)
class ThinkIds:
    open: int
    close: int

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> ThinkIds:
        ids = (tokenizer.token_to_id("<think>"), tokenizer.token_to_id("</think>"))
        if None in ids:
            raise ValueError("the tokenizer has no <think> / </think> tokens (not a GLM-4.5 tokenizer)")
        return cls(*ids)  # type: ignore[arg-type]


def score_group(
    eval_set: EvalSet,
    indices: Sequence[int],
    completions: Sequence[Sequence[Completion]],
    tokenizer: Tokenizer,
    *,
    thinking: bool,
) -> list[dict[str, Any]]:
    """One row per response of the prompts `indices` of `eval_set` (the scorer run on all of them at once)."""
    think = ThinkIds.of(tokenizer)
    records = [eval_set.prompts.records[i] for i in indices]
    flat = [(i, record, j, c) for i, record, group in zip(indices, records, completions, strict=True)
            for j, c in enumerate(group)]  # fmt: skip
    texts = [tokenizer.decode(list(c.response_ids), skip_special_tokens=False) for *_, c in flat]
    inputs = [
        RewardInput(record, text, list(c.response_ids), thinking, c.finished)
        for (_, record, _, c), text in zip(flat, texts, strict=True)
    ]
    scores = eval_set.scorer.score(inputs)
    errors = {failure.index: failure.error for failure in scores.failures}
    values = next(iter(scores.per_function.values()))
    return [
        row(record, index, sample, completion, text, inputs[k], values[k], errors.get(k), think)
        for k, ((index, record, sample, completion), text) in enumerate(zip(flat, texts, strict=True))
    ]


def row(
    record: PromptRecord, index: int, sample: int, completion: Completion, text: str, scored: RewardInput,
    score: float, error: str | None, think: ThinkIds,
) -> dict[str, Any]:  # fmt: skip
    ids = list(completion.response_ids)
    reasoning = reasoning_text(text)
    calls, problems = tool_call_report(final_answer(scored), record)
    return {
        "index": index,
        "sample": sample,
        "source": record.origin.source,
        record.origin.unit: record.origin.line,
        "prompt": record.messages,
        "reference": record.answer,
        "response": text,
        "reasoning": reasoning,
        "answer": final_answer(scored),
        "tool_calls": calls,
        "tool_call_problems": problems,
        "score": None if math.isnan(score) else score,
        "correct": None if math.isnan(score) else score >= PASS_SCORE,
        "scorer_error": error,
        "finished": completion.finished,
        "tokens": len(ids),
        "reasoning_tokens": reasoning_tokens(ids, think),
        "thinks": bool(reasoning and reasoning.strip()),
    }


def reasoning_text(text: str) -> str | None:
    """The text inside the response's think block; None when it opens none."""
    body = without_stop(text)
    if "<think>" not in body:
        return body.rsplit("</think>", 1)[0] if "</think>" in body else None
    inside = body.split("<think>", 1)[1]
    return inside.split("</think>", 1)[0]


def reasoning_tokens(ids: list[int], think: ThinkIds) -> int:
    if think.open not in ids:
        return ids.index(think.close) if think.close in ids else 0
    start = ids.index(think.open) + 1
    end = ids.index(think.close, start) if think.close in ids[start:] else len(ids)
    return end - start


def tool_call_report(answer: str, record: PromptRecord) -> tuple[list[dict[str, Any]], list[str]]:
    """The answer's tool calls ({name, arguments}) and what is wrong with them (empty: all valid)."""
    calls, problems = parse_tool_calls(answer)
    schemas = tool_schemas(record.tools)
    for call in calls:
        problems += call_problems_against_schema(call, schemas)
    return [{"name": call.name, "arguments": dict(call.arguments)} for call in calls], problems
