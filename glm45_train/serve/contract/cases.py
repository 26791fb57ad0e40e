"""What the serving contract checks, built from chat data (data/sample_distill.jsonl by default) by our renderer.

Notable:
- Three kinds of case, one per check: whole conversations as token ids (log-probs, items a and d: 8 of
  different kinds, each a server request and a transformers forward); the prompt
  before each conversation's final answer, thinking on and off, with the ids our renderer gives it (the chat
  endpoint's prompt, item b); and every assistant turn that reasons or calls tools, as the tokens the model
  is trained to produce for it (the parsers, item c).
- A turn is rendered as the last turn of its conversation (the messages after it cut off): that is where the
  template keeps its reasoning, as at inference. Its output is what follows the generation prompt, up to and
  without the stop token that ends it (vLLM stops on that token and keeps it out of the text it parses).
  Thinking off: the reasoning removed and the empty `<think></think>` part of the prompt, as the template puts it.
- Messages go to the server in OpenAI's shape: tool-call arguments as JSON strings, reasoning in `reasoning`
  (vLLM hands it to the template as `reasoning_content`), tool results answering call ids in order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

import glm45_train
from glm45_train.data.chat import RenderOptions, render_conversation, split_reasoning, without_reasoning
from glm45_train.data.conversation import Conversation, DataError, Message, ToolCall
from glm45_train.data.sources import iter_conversations
from glm45_train.errors import UserError
from glm45_train.model.tokenizer import STOP_TOKENS

DEFAULT_DATA = Path(glm45_train.__file__).resolve().parents[1] / "data" / "sample_distill.jsonl"
LOGPROB_CONVERSATIONS = 8  # items (a) and (d): each sequence costs a server request and a transformers forward
PromptRenderer = Callable[[Conversation, Tokenizer, bool], list[int]]


@dataclass(frozen=True)
class LogprobCase:
    origin: str
    ids: list[int]


@dataclass(frozen=True)
class PromptCase:
    origin: str
    thinking: bool
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    expected_ids: list[int]


@dataclass(frozen=True)
class TurnCase:
    origin: str
    thinking: bool
    messages: list[dict[str, Any]]  # the prompt's messages (the request the parser is made for)
    tools: list[dict[str, Any]]
    prompt_ids: list[int]
    output_ids: list[int]  # what the model produces for the turn, without the stop token
    reasoning: str
    content: str
    tool_calls: tuple[ToolCall, ...]


def load_conversations(path: str | Path | None = None) -> list[Conversation]:
    """Every conversation of a chat data file; a bad record is an error naming its line."""
    path = Path(path) if path is not None else DEFAULT_DATA
    if not path.is_file():
        raise UserError(f"{path}: no such chat data file (give one with --check-data)")
    conversations = []
    for item in iter_conversations([path]):
        if isinstance(item, DataError):
            raise UserError(f"chat data for the serving contract: {item}")
        conversations.append(item)
    if not any(m.role == "assistant" for c in conversations for m in c.messages):
        raise UserError(f"{path}: no conversation with an assistant turn")
    return conversations


def where(conversation: Conversation) -> str:
    """`file.jsonl:line` of a conversation, for reports."""
    return f"{Path(conversation.origin.source).name}:{conversation.origin.line}"


def openai_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Our messages as an OpenAI chat request carries them."""
    out: list[dict[str, Any]] = []
    pending_ids: list[str] = []
    calls = 0
    for message in messages:
        item: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.reasoning is not None:
            item["reasoning"] = message.reasoning
        if message.tool_calls:
            item["tool_calls"] = []
            for call in message.tool_calls:
                calls += 1
                pending_ids.append(f"call_{calls}")
                arguments = json.dumps(call.arguments, ensure_ascii=False)
                function = {"name": call.name, "arguments": arguments}
                item["tool_calls"].append({"id": pending_ids[-1], "type": "function", "function": function})
        if message.role == "tool":
            item["tool_call_id"] = pending_ids.pop(0) if pending_ids else f"call_{calls}"
        out.append(item)
    return out


def render_prompt(conversation: Conversation, tokenizer: Tokenizer, thinking: bool) -> list[int]:
    """Our renderer's generation prompt for `conversation` (what the chat endpoint must build)."""
    options = RenderOptions(thinking=thinking, add_generation_prompt=True)
    return render_conversation(conversation, tokenizer, options).input_ids


def logprob_cases(
    conversations: Sequence[Conversation], tokenizer: Tokenizer, limit: int = LOGPROB_CONVERSATIONS
) -> list[LogprobCase]:
    """A few conversations of different kinds, each rendered whole (reasoning kept), as training sees it."""
    return [LogprobCase(where(c), render_conversation(c, tokenizer).input_ids) for c in varied(conversations, limit)]


def varied(conversations: Sequence[Conversation], limit: int) -> list[Conversation]:
    """Up to `limit` conversations: the first of each kind (which of system prompt, tools, several assistant
    turns, reasoning, parallel tool calls it has), kinds with more of them first; then in file order."""

    def kind(conversation: Conversation) -> tuple[bool, ...]:
        messages = conversation.messages
        return (
            any(m.role == "system" for m in messages),
            bool(conversation.tools),
            sum(m.role == "assistant" for m in messages) > 1,
            any(split_reasoning(m)[0].strip() for m in messages if m.role == "assistant"),
            any(len(m.tool_calls) > 1 for m in messages),
        )

    firsts = {kind(c): c for c in reversed(conversations)}  # the first conversation of each kind
    richest = sorted(firsts, key=lambda k: (-sum(k), conversations.index(firsts[k])))[:limit]
    chosen = [firsts[k] for k in richest]
    chosen += [c for c in conversations if all(c is not other for other in chosen)][: limit - len(chosen)]
    return sorted(chosen, key=conversations.index)


def prompt_cases(
    conversations: Sequence[Conversation], tokenizer: Tokenizer, render: PromptRenderer = render_prompt
) -> list[PromptCase]:
    """The prompt before each conversation's last assistant turn, thinking on and off."""
    cases = []
    for conversation in conversations:
        last = max((i for i, m in enumerate(conversation.messages) if m.role == "assistant"), default=0)
        if last == 0:
            continue
        prompt = replace(conversation, messages=conversation.messages[:last])
        messages = openai_messages(prompt.messages)
        for thinking in (True, False):
            expected = render(prompt, tokenizer, thinking)
            cases.append(PromptCase(where(conversation), thinking, messages, list(conversation.tools), expected))
    return cases


def turn_cases(conversations: Sequence[Conversation], tokenizer: Tokenizer) -> list[TurnCase]:
    """Every assistant turn with reasoning or tool calls (thinking on), and each with tool calls again
    thinking off."""
    cases = []
    for conversation in conversations:
        for index, message in enumerate(conversation.messages):
            reasoning = split_reasoning(message)[0].strip() if message.role == "assistant" else ""
            if not (reasoning or message.tool_calls):
                continue
            upto = replace(conversation, messages=conversation.messages[: index + 1])
            cases.append(_turn_case(upto, tokenizer, thinking=True))
            if message.tool_calls:
                cases.append(_turn_case(without_reasoning(upto)[0], tokenizer, thinking=False))
    return cases


def _turn_case(conversation: Conversation, tokenizer: Tokenizer, thinking: bool) -> TurnCase:
    *history, turn = conversation.messages
    origin = f"{where(conversation)}, message {len(history)}"
    prompt = render_prompt(replace(conversation, messages=tuple(history)), tokenizer, thinking)
    whole = render_conversation(conversation, tokenizer, RenderOptions(thinking=thinking))
    output, trained = whole.input_ids[len(prompt) :], whole.loss_mask[len(prompt) :]
    stops = {tokenizer.token_to_id(token) for token in STOP_TOKENS}
    if whole.input_ids[: len(prompt)] != prompt or not all(trained) or not output or output[-1] not in stops:
        raise RuntimeError(f"{origin}: the rendered turn does not follow its generation prompt (renderer bug)")
    reasoning, content = split_reasoning(turn)
    return TurnCase(
        origin=origin,
        thinking=thinking,
        messages=openai_messages(history),
        tools=list(conversation.tools),
        prompt_ids=prompt,
        output_ids=output[:-1],
        reasoning=reasoning.strip() if thinking else "",
        content=content.strip(),
        tool_calls=turn.tool_calls,
    )
