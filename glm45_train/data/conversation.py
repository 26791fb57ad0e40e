"""The typed conversation every input format is parsed into, and the typed error for unusable records.

Notable:
- `Conversation` is canonical: content is always a string (text parts joined), reasoning is `None` when the
  record had none (the renderer then looks for inline `<think>…</think>`, as the template does), tool-call
  arguments are dicts.
- `Origin` remembers where a record came from (file and 1-based line, or row number for tables) so every
  problem can be reported with its place.
- `DataError.reason` is one of `Reason`: the report counts problems per reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from glm45_train.errors import UserError

ROLES = ("system", "user", "assistant", "tool")


class Reason(StrEnum):
    """Why a record was dropped or changed; the values appear in report.json."""

    MALFORMED_JSON = "malformed_json"
    WRONG_TYPE = "wrong_type"
    UNKNOWN_ROLE = "unknown_role"
    TOOL_RESPONSE_WITHOUT_CALL = "tool_response_without_call"
    NO_ASSISTANT_TURN = "no_assistant_turn"
    EMPTY_ASSISTANT = "empty_assistant"
    LAST_TURN_NOT_ASSISTANT = "last_turn_not_assistant"
    LAST_TURN_NOT_PROMPT = "last_turn_not_prompt"  # RL prompt sets: must end with a user or tool turn
    NO_STOP_AFTER_ASSISTANT = "no_stop_after_assistant"
    OVERLONG = "overlong"
    TRUNCATED = "truncated"
    REASONING_REMOVED = "reasoning_removed"
    REASONING_IN_CONTENT = "reasoning_in_content"  # think markers left in the answer: trained in every mode


@dataclass(frozen=True)
class Origin:
    """Where a record came from: 1-based line of a JSONL file, or 1-based row of a table or JSON array."""

    source: str
    line: int
    unit: str = "line"  # "line" or "row"

    def __str__(self) -> str:
        return f"{self.source}:{self.line}" if self.unit == "line" else f"{self.source} row {self.line}"


class DataError(UserError):
    """A record that cannot be used, with the reason, a human explanation and where it came from."""

    def __init__(self, reason: Reason, detail: str, origin: Origin | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.origin = origin
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.origin}: " if self.origin else ""
        return f"{where}{self.reason.value}: {self.detail}"

    def at(self, origin: Origin) -> DataError:
        """The same error, placed at `origin`."""
        return DataError(self.reason, self.detail, origin)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Message:
    role: str
    content: str = ""
    reasoning: str | None = None  # assistant only; None = not given (inline <think> may still hold some)
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    tools: tuple[dict[str, Any], ...] = ()
    origin: Origin = Origin("<memory>", 0)


def to_template_messages(conversation: Conversation) -> list[dict[str, Any]]:
    """The conversation as the message dicts the official Jinja template expects (for apply_chat_template)."""
    out: list[dict[str, Any]] = []
    for message in conversation.messages:
        item: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.reasoning is not None:
            item["reasoning_content"] = message.reasoning
        if message.tool_calls:
            item["tool_calls"] = [
                {"type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                for call in message.tool_calls
            ]
        out.append(item)
    return out
