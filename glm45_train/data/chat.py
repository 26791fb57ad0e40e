"""The GLM-4.5 chat format: conversation → text, input_ids, loss mask; token-exact with the official template.

Notable:
- The renderer mirrors `assets/chat_template.jinja` piece by piece (tests compare it with transformers'
  `apply_chat_template` on the shipped template). Only this module knows the format.
- The text is built as segments, each trained or not. Every segment boundary sits next to a GLM added token
  (`<|assistant|>`, `</think>`, `<|user|>`, …), and the tokenizer splits on added tokens before anything
  else, so tokenizing segment by segment gives exactly the ids of the whole text (checked in tests) without
  offset mapping.
- Trained (`loss_mask` 1): what the model must produce after `<|assistant|>` — the think block, the answer,
  the tool calls — **and the token that ends the turn**: the next `<|user|>` / `<|observation|>`, or a stop
  appended after the final turn (`<|endoftext|>`; `<|observation|>` when that turn ends with tool calls, as
  at inference). GLM-4.5 has no end-of-turn token; without this the model never learns to stop.
- The empty `\\n<think></think>` is trained unless `train_empty_think=False`. In earlier turns whose
  reasoning the template drops, the empty block is never trained: there the model would have thought.
- Modes: `keep` renders reasoning as given (thinking on); `non-thinking` removes reasoning and renders with
  thinking off (`/nothink` on user turns, empty think blocks); `mixed:P` picks non-thinking for a seeded
  fraction P of samples, by a hash of the sample's origin so the choice does not depend on order or on other
  samples being dropped.
- An answer that still holds `<think>`/`</think>` after the template's split (a `reasoning_content` field and an
  inline block as well, a stray marker, a second inline block) is refused by `check_trainable`
  (`reasoning_in_content`): the template keeps such text as the answer (every mode would train reasoning there)
  or drops what lies between two blocks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from glm45_train.data.conversation import Conversation, DataError, Message, Origin, Reason
from glm45_train.data.tool_calls import to_json, tool_call_text
from glm45_train.errors import UserError

BEGIN = "[gMASK]<sop>"
ROLE_MARKERS = {
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "tool": "<|observation|>",
}
END_OF_TEXT = "<|endoftext|>"
NOTHINK = "/nothink"
EMPTY_THINK = "\n<think></think>"
# Segment boundaries sit next to these: they must be added tokens (segment-wise ids == whole-text ids).
BOUNDARY_TOKENS = ("[gMASK]", "<sop>", *ROLE_MARKERS.values(), END_OF_TEXT, "<think>", "</think>")
TOOLS_HEADER = (
    "<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
TOOLS_FOOTER = (
    "</tools>\n\nFor each function call, output the function name and arguments within the following XML "
    "format:\n"
    "<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>\n"
    "<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>"
)


@dataclass(frozen=True)
class RenderOptions:
    thinking: bool = True  # the template's enable_thinking
    add_generation_prompt: bool = False
    train_empty_think: bool = True


@dataclass(frozen=True)
class RenderedText:
    segments: tuple[tuple[str, bool], ...]  # (text, trained); neighbours differ in `trained`

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.segments)


@dataclass(frozen=True)
class RenderedSample:
    text: str
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is a training target (not shifted)


@dataclass(frozen=True)
class Mode:
    """keep | non-thinking | mixed:P — `non_thinking_fraction` is 0, 1 or P."""

    non_thinking_fraction: float

    def __str__(self) -> str:
        if self.non_thinking_fraction == 0.0:
            return "keep"
        if self.non_thinking_fraction == 1.0:
            return "non-thinking"
        return f"mixed:{self.non_thinking_fraction:g}"

    def picks_non_thinking(self, origin: Origin, seed: int) -> bool:
        """Whether the sample at `origin` is rendered non-thinking (deterministic in seed and origin)."""
        if self.non_thinking_fraction in (0.0, 1.0):
            return self.non_thinking_fraction == 1.0
        digest = hashlib.sha256(f"{seed}:{origin.source}:{origin.line}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.non_thinking_fraction


KEEP = Mode(0.0)
NON_THINKING = Mode(1.0)


def parse_mode(text: str) -> Mode:
    """'keep', 'non-thinking' or 'mixed:P' (0 ≤ P ≤ 1)."""
    if text in ("keep", "non-thinking"):
        return KEEP if text == "keep" else NON_THINKING
    name, _, fraction = text.partition(":")
    try:
        value = float(fraction)
    except ValueError:
        value = -1.0
    if name != "mixed" or not 0.0 <= value <= 1.0:
        raise UserError(f"mode {text!r}: expected keep, non-thinking or mixed:P with 0 <= P <= 1")
    return Mode(value)


def load_chat_tokenizer(tokenizer_dir: str | Path) -> Tokenizer:
    """The fast tokenizer of `tokenizer_dir`, checked to hold the GLM-4.5 markers as added tokens."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json in the tokenizer directory")
    tokenizer = Tokenizer.from_file(str(path))
    added = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    missing = [token for token in BOUNDARY_TOKENS if token not in added]
    if missing:
        raise UserError(f"{path}: not a GLM-4.5 tokenizer, these are not added tokens: {', '.join(missing)}")
    return tokenizer


def render_conversation(
    conversation: Conversation, tokenizer: Tokenizer, options: RenderOptions = RenderOptions()
) -> RenderedSample:
    """Text, ids and loss mask of one conversation."""
    return tokenize_rendered([render_text(conversation, options)], tokenizer)[0]


def tokenize_rendered(rendered: Sequence[RenderedText], tokenizer: Tokenizer) -> list[RenderedSample]:
    """Tokenize many rendered conversations in one batch call, as lists (for JSON and tests)."""
    arrays = tokenize_to_arrays(rendered, tokenizer)
    return [
        RenderedSample(item.text, ids.tolist(), mask.tolist())
        for item, (ids, mask) in zip(rendered, arrays, strict=True)
    ]


def tokenize_to_arrays(rendered: Sequence[RenderedText], tokenizer: Tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids int32 [n], loss_mask uint8 [n]) per conversation; one batched call, the tokenizer's threads."""
    if not rendered:
        return []
    pieces = [text for item in rendered for text, _ in item.segments]
    encodings = tokenizer.encode_batch_fast(pieces, add_special_tokens=False)
    piece_lengths = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))
    ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=int(piece_lengths.sum()))
    trained = np.fromiter((t for item in rendered for _, t in item.segments), dtype=np.uint8, count=len(pieces))
    mask = np.repeat(trained, piece_lengths)
    last_piece_of_item = np.cumsum([len(item.segments) for item in rendered]) - 1
    bounds = np.cumsum(piece_lengths)[last_piece_of_item[:-1]]  # token offsets where the next item starts
    return list(zip(np.split(ids, bounds), np.split(mask, bounds), strict=True))


def render_text(conversation: Conversation, options: RenderOptions = RenderOptions()) -> RenderedText:
    """The conversation as the template renders it, split into trained and untrained segments."""
    out = _Segments()
    out.add(BEGIN)
    if conversation.tools:
        out.add(TOOLS_HEADER + "".join(to_json(tool) + "\n" for tool in conversation.tools) + TOOLS_FOOTER)
    messages = conversation.messages
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    for index, message in enumerate(messages):
        previous = messages[index - 1] if index else None
        ends_turn = previous is not None and previous.role == "assistant"
        if message.role == "assistant":
            _render_assistant(out, message, after_last_user=index > last_user, options=options)
        elif message.role == "tool":
            if previous is None or previous.role != "tool":
                out.add(ROLE_MARKERS["tool"], trained=ends_turn)
            out.add(tool_response_text(message.content))
        else:
            out.add(ROLE_MARKERS[message.role], trained=ends_turn and message.role == "user")
            out.add("\n" + message.content + _nothink_suffix(message, options.thinking))
    if options.add_generation_prompt:
        out.add(generation_prompt(options.thinking))
    elif messages and messages[-1].role == "assistant":
        out.add(ROLE_MARKERS["tool"] if messages[-1].tool_calls else END_OF_TEXT, trained=True)
    return RenderedText(tuple(out.items))


def tool_response_text(content: str) -> str:
    """One tool result inside an `<|observation|>` turn (consecutive tool messages share one marker)."""
    return f"\n<tool_response>\n{content}\n</tool_response>"


def observation_continuation(results: Sequence[str], *, thinking: bool) -> str:
    """What follows an assistant turn that ended on `<|observation|>`, up to the next turn's first generated
    token: the tool results as the template renders them, then the generation prompt (an agent rollout appends
    this to the ids the engine sampled; tests compare it with a whole-conversation rendering)."""
    return "".join(tool_response_text(result) for result in results) + generation_prompt(thinking)


def generation_prompt(thinking: bool) -> str:
    """The template's `add_generation_prompt`: `<|assistant|>`, and the empty think block with thinking off."""
    return ROLE_MARKERS["assistant"] + ("" if thinking else EMPTY_THINK)


def _render_assistant(out: _Segments, message: Message, *, after_last_user: bool, options: RenderOptions) -> None:
    out.add(ROLE_MARKERS["assistant"])
    reasoning, content = split_reasoning(message)
    shown = reasoning.strip() if after_last_user else ""
    if shown:
        out.add(f"\n<think>{shown}</think>", trained=True)
    else:
        dropped_by_template = bool(reasoning.strip())
        out.add(EMPTY_THINK, trained=options.train_empty_think and not dropped_by_template)
    if content.strip():
        out.add("\n" + content.strip(), trained=True)
    for call in message.tool_calls:
        out.add(tool_call_text(call), trained=True)


def _nothink_suffix(message: Message, thinking: bool) -> str:
    if message.role != "user" or thinking or message.content.endswith(NOTHINK):
        return ""
    return NOTHINK


def split_reasoning(message: Message) -> tuple[str, str]:
    """(reasoning, content): the reasoning field, else inline `<think>…</think>` split like the template."""
    content = message.content
    if message.reasoning is not None:
        return message.reasoning, content
    if "</think>" not in content:
        return "", content
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, content.split("</think>")[-1].lstrip("\n")


def without_reasoning(conversation: Conversation) -> tuple[Conversation, bool]:
    """The conversation with all assistant reasoning removed, and whether there was any to remove."""
    removed = False
    messages = []
    for message in conversation.messages:
        if message.role == "assistant":
            reasoning, content = split_reasoning(message)
            removed = removed or bool(reasoning.strip())
            message = replace(message, content=content, reasoning="")
        messages.append(message)
    return replace(conversation, messages=tuple(messages)), removed


def check_trainable(conversation: Conversation) -> None:
    """Raise `DataError` unless every assistant turn has output and a stop the model can learn."""
    messages = conversation.messages
    origin = conversation.origin
    if not any(m.role == "assistant" for m in messages):
        raise DataError(Reason.NO_ASSISTANT_TURN, "no assistant message", origin)
    if messages[-1].role != "assistant":
        raise DataError(Reason.LAST_TURN_NOT_ASSISTANT, f"ends with a {messages[-1].role} message", origin)
    for index, message in enumerate(messages):
        if message.role != "assistant":
            continue
        visible = split_reasoning(message)[1]
        if not visible.strip() and not message.tool_calls:
            raise DataError(Reason.EMPTY_ASSISTANT, f"message {index} (assistant) has no content or tool call", origin)
        if "<think>" in visible or "</think>" in visible or message.content.count("</think>") > 1:
            raise DataError(Reason.REASONING_IN_CONTENT, _reasoning_in_content(index, message), origin)
        following = messages[index + 1].role if index + 1 < len(messages) else "user"
        if following not in ("user", "tool"):
            detail = f"message {index} (assistant) is followed by a {following} message; GLM-4.5 stops only on"
            raise DataError(
                Reason.NO_STOP_AFTER_ASSISTANT, f"{detail} <|user|>, <|observation|> or <|endoftext|>", origin
            )


def _reasoning_in_content(index: int, message: Message) -> str:
    """Why an answer that still holds think markers is refused: the template renders them as answer text, so the
    model would be trained to reason in its answer (in non-thinking mode too)."""
    if message.reasoning is not None:
        given = "reasoning_content is given and content holds another <think> block"
    else:
        given = "content holds more think markers than the template's one leading <think>…</think> block"
    return f"message {index} (assistant): {given}; the template would train it as answer text or drop it silently"


class _Segments:
    def __init__(self) -> None:
        self.items: list[tuple[str, bool]] = []

    def add(self, text: str, trained: bool = False) -> None:
        if not text:
            return
        if self.items and self.items[-1][1] == trained:
            self.items[-1] = (self.items[-1][0] + text, trained)
        else:
            self.items.append((text, trained))
