"""RL prompt sets: the inputs `data prepare` reads → `PromptRecord`s, and prompts → token ids for rollouts.

Notable:
- Reading and parsing are data/'s (`iter_records` + `parse_record`): the same formats (JSONL, JSON, Parquet,
  saved datasets, ModelScope IDs), the same checks and the same `DataError` reasons with file and line.
- A prompt ends with a user or tool turn. A record whose last turn is an assistant's is accepted with that turn
  removed, so SFT data can be reused as prompts; when the record has no answer field, the removed turn's
  answer (reasoning split off, stripped) becomes the reference answer — the math reward then finds its
  `\\boxed{}` or last number. The report counts these records (`final_turns_removed`). Anything else that does
  not end with a prompt turn is dropped as `last_turn_not_prompt`.
- A record may give `prompt` instead of `messages`: a string (one user turn) or a message list.
- `answer` is a string (numbers are accepted and written as `str(n)`); every other top-level field except
  `messages` and `tools` lands in `extra` (null values count as absent, as in data/).
- `messages` holds the canonical messages (content a string, `reasoning_content`, `tool_calls` with dict
  arguments): exactly what the official template takes, and what `render_prompt` parses back.
- `render_prompt` is the data renderer with the generation prompt: ids up to `<|assistant|>`, plus the empty
  `\\n<think></think>` with thinking off — equal to the official template's `add_generation_prompt=True`.
  Earlier turns render as the template renders them in either mode (no reasoning is removed).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from tokenizers import Tokenizer

from glm45_train.data.chat import RenderOptions, render_text, split_reasoning, tokenize_rendered
from glm45_train.data.conversation import Conversation, DataError, Origin, Reason, to_template_messages
from glm45_train.data.sources import check_inputs, iter_records, parse_record
from glm45_train.errors import UserError

PROMPT_ROLES = ("user", "tool")
RESERVED_FIELDS = ("messages", "tools")
IN_MEMORY = Origin("<memory>", 0)  # a record built in code


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: the conversation up to the turn the policy answers, and what its rewards need."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    answer: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    origin: Origin = IN_MEMORY


@dataclass
class PromptReport:
    """Counts and every dropped record (`problems` entries as in data prepare's report.json)."""

    records_read: int = 0
    prompts_kept: int = 0
    final_turns_removed: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)

    def note(self, error: DataError) -> None:
        origin = error.origin or Origin("<unknown>", 0)
        entry = {"source": origin.source, origin.unit: origin.line, "reason": error.reason.value}
        self.problems.append({**entry, "action": "dropped", "detail": error.detail})

    def dropped_by_reason(self) -> dict[str, int]:
        return dict(Counter(problem["reason"] for problem in self.problems))

    def to_json(self) -> dict[str, Any]:
        return {
            "records": {"read": self.records_read, "kept": self.prompts_kept, "dropped": len(self.problems)},
            "final_turns_removed": self.final_turns_removed,
            "dropped_by_reason": self.dropped_by_reason(),
            "problems": self.problems,
        }


@dataclass
class PromptSet:
    records: list[PromptRecord]
    report: PromptReport

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[PromptRecord]:
        return iter(self.records)


def load_prompts(
    inputs: Sequence[str | Path],
    *,
    on_error: Literal["skip", "fail"] = "skip",
    answer_field: str = "answer",
) -> PromptSet:
    """Every usable prompt of `inputs`; bad records are reported (skip) or raised at the first one (fail)."""
    if on_error not in ("skip", "fail"):
        raise UserError(f"on_error {on_error!r}: expected skip or fail")
    check_inputs(inputs)
    report = PromptReport()
    records: list[PromptRecord] = []
    for spec in inputs:
        for item in iter_records(spec):
            report.records_read += 1
            try:
                if isinstance(item, DataError):
                    raise item
                prompt, removed = prompt_from_record(item[1], item[0], answer_field=answer_field)
            except DataError as error:
                if on_error == "fail":
                    raise
                report.note(error)
                continue
            records.append(prompt)
            report.final_turns_removed += removed
    report.prompts_kept = len(records)
    if not records:
        dropped = ", ".join(f"{reason}: {n}" for reason, n in report.dropped_by_reason().items())
        raise UserError(f"no usable prompts in {', '.join(map(str, inputs))} (dropped {dropped or 'none'})")
    return PromptSet(records, report)


def prompt_from_record(record: Any, origin: Origin, *, answer_field: str = "answer") -> tuple[PromptRecord, bool]:
    """One raw record → (prompt, whether a final assistant turn was removed); `DataError` at `origin` if unusable."""
    record = prompt_as_messages(record)
    conversation = parse_record(record, origin)
    messages = conversation.messages
    answer = _answer_of(record.get(answer_field), answer_field, origin)
    removed = messages[-1].role == "assistant"
    if removed:
        final_answer = split_reasoning(messages[-1])[1].strip()
        answer = answer if answer is not None else (final_answer or None)
        conversation = replace(conversation, messages=messages[:-1])
    check_prompt(conversation, final_turn_removed=removed)
    excluded = (*RESERVED_FIELDS, answer_field)
    extra = {key: value for key, value in record.items() if key not in excluded and value is not None}
    prompt = PromptRecord(
        messages=to_template_messages(conversation),
        tools=list(conversation.tools) or None,
        answer=answer,
        extra=extra,
        origin=origin,
    )
    return prompt, removed


def prompt_as_messages(record: Any) -> Any:
    """A record without `messages` whose `prompt` is a string (one user turn) or a message list (verl's and
    NeMo-RL's datasets) as the `messages` record it stands for; any other record unchanged."""
    if not isinstance(record, dict) or "messages" in record or "prompt" not in record:
        return record
    prompt = record["prompt"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return {**{key: value for key, value in record.items() if key != "prompt"}, "messages": messages}


def check_prompt(conversation: Conversation, *, final_turn_removed: bool = False) -> None:
    """Raise `DataError` unless the conversation ends with a turn the assistant answers (user or tool)."""
    messages = conversation.messages
    if not messages or messages[-1].role not in PROMPT_ROLES:
        last = f"a {messages[-1].role} message" if messages else "nothing"
        after = " before its final assistant turn" if final_turn_removed else ""
        detail = f"ends with {last}{after}; a prompt ends with a user or tool message"
        raise DataError(Reason.LAST_TURN_NOT_PROMPT, detail, conversation.origin)


def render_prompt(record: PromptRecord, tokenizer: Tokenizer, *, thinking: bool) -> list[int]:
    """Ids of the prompt with the generation prompt, as the official template renders them."""
    return render_prompts([record], tokenizer, thinking=thinking)[0]


def render_prompts(records: Sequence[PromptRecord], tokenizer: Tokenizer, *, thinking: bool) -> list[list[int]]:
    """`render_prompt` for many records in one batched tokenizer call (`tokenizer`: a `tokenizers.Tokenizer`;
    a transformers fast tokenizer's is its `.backend_tokenizer`)."""
    options = RenderOptions(thinking=thinking, add_generation_prompt=True)
    rendered = []
    for record in records:
        conversation = parse_record({"messages": record.messages, "tools": record.tools}, record.origin)
        check_prompt(conversation)
        rendered.append(render_text(conversation, options))
    return [sample.input_ids for sample in tokenize_rendered(rendered, tokenizer)]


def _answer_of(value: Any, answer_field: str, origin: Origin) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    kind = type(value).__name__
    raise DataError(Reason.WRONG_TYPE, f"'{answer_field}' is {kind}, expected a string or a number", origin)
