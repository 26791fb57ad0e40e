"""Item (c): vLLM's glm45 reasoning and tool parsers read back what our renderer trains the model to write.

Notable:
- In process, no server: the parser is composed as the server composes it for `--reasoning-parser glm45
  --tool-call-parser glm45 --enable-auto-tool-choice` (`vllm.parser.ParserManager.get_parser`, which looks both
  names up in ReasoningParserManager / ToolParserManager; in vLLM 0.32 both map to the Glm47Moe parser engine),
  made per request with the request's tools and `chat_template_kwargs` (the thinking switch picks the parser's
  start state) over our tokenizer loaded by transformers' AutoTokenizer.
- Each turn is parsed twice: whole (`parse`, as a non-streaming answer) and streamed token by token
  (`parse_delta`, as a streaming answer; a token that ends inside a UTF-8 character waits for the next, as
  vLLM's detokenizer holds it back). Both must give back the turn's reasoning, its answer text and its tool
  calls: names, and arguments equal as JSON values with their types (the integer 2 is not "2" or 2.0).
- Reasoning and answers are compared stripped: the template strips them when it renders, so surrounding
  whitespace is not something training could teach.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glm45_train.serve.contract.cases import TurnCase
from glm45_train.serve.contract.result import FAIL, PASS, CheckResult, first_failures

PARSER_NAME = "glm45"  # both --reasoning-parser and --tool-call-parser, as GLM-4.5's release serves


@dataclass
class ParsedTurn:
    reasoning: str = ""
    content: str = ""
    calls: list[tuple[str, Any]] = field(default_factory=list)  # (name, arguments decoded from JSON)


def parser_class(tokenizer: Any) -> Any:
    from vllm.parser import ParserManager

    return ParserManager.get_parser(
        tool_parser_name=PARSER_NAME, reasoning_parser_name=PARSER_NAME, enable_auto_tools=True, tokenizer=tokenizer
    )


def _request(case: TurnCase) -> Any:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    body = {"model": "glm45", "messages": case.messages, "chat_template_kwargs": {"enable_thinking": case.thinking}}
    return ChatCompletionRequest.model_validate({**body, "tools": case.tools} if case.tools else body)


def _arguments(text: str | None) -> Any:
    try:
        return json.loads(text or "{}")
    except json.JSONDecodeError:
        return text  # kept as text: it will differ from the expected object, and the report shows it


def parse_whole(parser_cls: Any, tokenizer: Any, case: TurnCase) -> ParsedTurn:
    request = _request(case)
    parser = parser_cls(tokenizer, request.tools, chat_template_kwargs=request.chat_template_kwargs)
    parser.set_prompt_token_ids(case.prompt_ids)
    text = tokenizer.decode(case.output_ids, skip_special_tokens=False)
    reasoning, content, calls = parser.parse(text, request, enable_auto_tools=True,
                                             model_output_token_ids=case.output_ids)  # fmt: skip
    return ParsedTurn(reasoning or "", content or "", [(c.name, _arguments(c.arguments)) for c in calls or []])


def stream_chunks(tokenizer: Any, ids: Sequence[int]) -> list[tuple[str, list[int]]]:
    """(text delta, token ids) per step: one token, or a few where a character spans tokens."""
    chunks, pending, emitted = [], [], ""
    for index, token in enumerate(ids):
        pending.append(token)
        text = tokenizer.decode(list(ids[: index + 1]), skip_special_tokens=False)
        if text.endswith("\ufffd") and index + 1 < len(ids):
            continue
        chunks.append((text[len(emitted) :], pending))
        pending, emitted = [], text
    return chunks


def parse_streamed(parser_cls: Any, tokenizer: Any, case: TurnCase) -> ParsedTurn:
    request = _request(case)
    parser = parser_cls(tokenizer, request.tools, chat_template_kwargs=request.chat_template_kwargs)
    parsed, names, arguments = ParsedTurn(), dict[int, str](), dict[int, str]()
    chunks = stream_chunks(tokenizer, case.output_ids)
    for step, (delta_text, delta_ids) in enumerate(chunks):
        delta = parser.parse_delta(delta_text, delta_ids, request, prompt_token_ids=case.prompt_ids,
                                   finished=step == len(chunks) - 1)  # fmt: skip
        if delta is None:
            continue
        parsed.reasoning += delta.reasoning or ""
        parsed.content += delta.content or ""
        for call in delta.tool_calls or []:
            if call.function is not None:
                names[call.index] = names.get(call.index, "") + (call.function.name or "")
                arguments[call.index] = arguments.get(call.index, "") + (call.function.arguments or "")
    parsed.calls = [(names[i], _arguments(arguments.get(i))) for i in sorted(names)]
    return parsed


def typed(value: Any) -> Any:
    """A JSON value with its types spelled out, so that 2, 2.0, "2" and True all differ."""
    if isinstance(value, dict):
        return {key: typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [typed(item) for item in value]
    return (type(value).__name__, value)


def mismatches(case: TurnCase, parsed: ParsedTurn) -> list[str]:
    expected_calls = [(call.name, typed(call.arguments)) for call in case.tool_calls]
    got_calls = [(name, typed(arguments)) for name, arguments in parsed.calls]
    out = []
    if parsed.reasoning.strip() != case.reasoning:
        out.append(f"reasoning {parsed.reasoning.strip()!r}, expected {case.reasoning!r}")
    if parsed.content.strip() != case.content:
        out.append(f"content {parsed.content.strip()!r}, expected {case.content!r}")
    if got_calls != expected_calls:
        want = [(call.name, call.arguments) for call in case.tool_calls]
        out.append(f"tool calls {parsed.calls!r}, expected {want!r}")
    return out


def check_parsers(tokenizer_dir: str | Path, cases: Sequence[TurnCase]) -> CheckResult:
    from transformers import AutoTokenizer

    title = f"vLLM {PARSER_NAME} parsers read back trained turns"
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    parser_cls = parser_class(tokenizer)
    failures = []
    for case in cases:
        for how, parse in (("whole", parse_whole), ("streamed", parse_streamed)):
            problems = mismatches(case, parse(parser_cls, tokenizer, case))
            mode = "on" if case.thinking else "off"
            failures += [f"{case.origin} (thinking {mode}, {how}): {problem}" for problem in problems]
    calls = sum(len(case.tool_calls) for case in cases)
    reasoning = sum(bool(case.reasoning) for case in cases)
    numbers = f"{len(cases)} turns ({reasoning} with reasoning, {calls} tool calls), whole and streamed"
    if not cases:
        return CheckResult("c", title, FAIL, numbers, "no assistant turn with reasoning or tool calls in the data")
    if failures:
        detail = first_failures(failures, 4)
        return CheckResult("c", title, FAIL, f"{numbers}; {len(failures)} mismatches", detail)
    return CheckResult("c", title, PASS, f"{numbers}; all read back")
