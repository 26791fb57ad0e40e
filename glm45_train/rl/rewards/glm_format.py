"""`glm_format`: the response follows the GLM-4.5 format the official template and its parsers expect.

Checked (`format_problems` lists what fails; the reward is 1.0 when nothing does, else 0.0 — no partial credit,
so a half-right tool call cannot be farmed):
- think block. Thinking off: the generation prompt already ends with the empty `\\n<think></think>`, so the
  response must contain no `<think>` / `</think>` at all. Thinking on: the response opens with `<think>` and
  closes it once (an empty block is well formed: the model chose not to think).
- no prompt-side markers (`[gMASK]`, `<sop>`, `<|system|>`, `<|assistant|>`) and no stop token before the end.
- every `<tool_call>` block, as the template writes it:
  `<tool_call>NAME\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>\\n…</tool_call>` (whitespace between parts
  is not judged). NAME is a function of the prompt's tool schema, keys are declared parameters (unless the schema
  sets `additionalProperties`), appear once, required parameters are present, and each value parses against its
  declared type: `string` takes the raw text (the template writes strings unquoted); `integer`, `number`,
  `boolean`, `object`, `array`, `null` must be JSON of that type; `enum` is enforced. Nested schemas are not
  descended into.
- args: `require_finished` (default true: a response cut at the length limit never ended its turn),
  `require_tool_call` (default false: at least one call).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from glm45_train.model.tokenizer import STOP_TOKENS
from glm45_train.rl.rewards.base import RewardInput, without_stop

PROMPT_MARKERS = ("[gMASK]", "<sop>", "<|system|>", "<|assistant|>")
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
CALL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
ARG_PAIR = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)
JSON_TYPES: dict[str, tuple[type, ...]] = {
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (type(None),),
}


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: list[tuple[str, str]]  # (key, raw value text) in order


def glm_format(sample: RewardInput, *, require_finished: bool = True, require_tool_call: bool = False) -> float:
    """1.0 if `format_problems` finds nothing, else 0.0."""
    problems = format_problems(sample, require_finished=require_finished, require_tool_call=require_tool_call)
    return 0.0 if problems else 1.0


def format_problems(
    sample: RewardInput, *, require_finished: bool = True, require_tool_call: bool = False
) -> list[str]:
    """Every way the response breaks the format, in words (empty when it is well formed)."""
    if require_finished and not sample.finished:
        return ["the response hit the length limit before a stop token"]
    text = without_stop(sample.response)
    problems = [f"{marker} inside the response" for marker in (*PROMPT_MARKERS, *STOP_TOKENS) if marker in text]
    answer, think_problem = _after_think(text, sample.thinking)
    if think_problem:
        return [*problems, think_problem]
    calls, call_problems = parse_tool_calls(answer)
    problems += call_problems
    if require_tool_call and not calls and not call_problems:
        problems.append("no tool call")
    schemas = tool_schemas(sample.prompt.tools)
    for call in calls:
        problems += call_problems_against_schema(call, schemas)
    return problems


def _after_think(text: str, thinking: bool) -> tuple[str, str | None]:
    """(the text after the think block, the problem with the think block or None)."""
    opens, closes = text.count("<think>"), text.count("</think>")
    if not thinking:
        if opens or closes:
            return text, "thinking is off (the prompt holds the empty <think></think>) but the response has think tags"
        return text, None
    if not text.lstrip().startswith("<think>"):
        return text, "thinking is on but the response does not open with <think>"
    if closes == 0:
        return text, "the <think> block is never closed"
    if opens != 1 or closes != 1:
        return text, f"{opens} <think> and {closes} </think> tags; expected one block"
    return text.split("</think>", 1)[1], None


def parse_tool_calls(text: str) -> tuple[list[ParsedCall], list[str]]:
    """The `<tool_call>` blocks of `text` and the problems of the malformed ones."""
    calls: list[ParsedCall] = []
    problems: list[str] = []
    blocks = CALL_BLOCK.findall(text)
    opens, closes = text.count(CALL_OPEN), text.count(CALL_CLOSE)
    if opens != len(blocks) or closes != len(blocks):
        problems.append(f"unbalanced tool calls: {opens} <tool_call>, {closes} </tool_call>")
    for index, body in enumerate(blocks):
        call, problem = _parse_call_body(body)
        if problem:
            problems.append(f"tool call {index}: {problem}")
        elif call is not None:
            calls.append(call)
    return calls, problems


def _parse_call_body(body: str) -> tuple[ParsedCall | None, str | None]:
    stripped = body.lstrip()
    ends = [i for i in (stripped.find("\n"), stripped.find("<arg_key>")) if i >= 0]
    end = min(ends, default=len(stripped))
    name, rest = stripped[:end].strip(), stripped[end:]  # the name is the first line, up to the first key
    if not name or any(ch in name for ch in "<> "):
        return None, f"bad function name {name!r}"
    arguments, position = [], 0
    while rest[position:].strip():
        match = ARG_PAIR.match(rest, position)
        if match is None:
            return None, f"{name}: expected <arg_key>…</arg_key><arg_value>…</arg_value>, got {rest[position:][:40]!r}"
        arguments.append((match[1], match[2]))
        position = match.end()
    return ParsedCall(name, arguments), None


def tool_schemas(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Function name → its `parameters` schema, for OpenAI-style (`{"function": {...}}`) or bare tool entries."""
    schemas: dict[str, dict[str, Any]] = {}
    for tool in tools or ():
        function = tool.get("function", tool)
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            parameters = function.get("parameters")
            schemas[function["name"]] = parameters if isinstance(parameters, dict) else {}
    return schemas


def call_problems_against_schema(call: ParsedCall, schemas: dict[str, dict[str, Any]]) -> list[str]:
    """What is wrong with `call` given the prompt's tools (empty when it fits)."""
    if call.name not in schemas:
        return [f"{call.name}: unknown function (the prompt declares {sorted(schemas) or 'no tools'})"]
    schema = schemas[call.name]
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        properties = {}
    problems: list[str] = []
    keys = [key for key, _ in call.arguments]
    problems += [f"{call.name}: argument {key!r} given twice" for key in sorted(set(keys)) if keys.count(key) > 1]
    required = [key for key in schema.get("required", ()) if key not in keys]
    problems += [f"{call.name}: missing required argument {key!r}" for key in required]
    for key, raw in call.arguments:
        if key not in properties:
            if not schema.get("additionalProperties"):
                problems.append(f"{call.name}: undeclared argument {key!r} (declared: {sorted(properties)})")
            continue
        problem = value_problem(raw, properties[key])
        if problem:
            problems.append(f"{call.name}: argument {key!r} {problem}")
    return problems


def value_problem(raw: str, schema: Any) -> str | None:
    """Why the raw `<arg_value>` text does not fit the property's schema, or None when it does."""
    if not isinstance(schema, dict):
        return None
    declared = schema.get("type")
    types = [declared] if isinstance(declared, str) else list(declared or [])
    value: Any = raw
    if types and "string" not in types:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            return f"value {raw!r} is not JSON (declared type {'/'.join(types)})"
        if not any(_is_type(value, name) for name in types):
            return f"value {raw!r} is not of the declared type {'/'.join(types)}"
    if "enum" in schema and value not in schema["enum"]:
        return f"value {raw!r} is not one of {schema['enum']}"
    return None


def _is_type(value: Any, name: str) -> bool:
    if name not in JSON_TYPES:
        return True  # a type we do not know is not judged
    if isinstance(value, bool) and name != "boolean":
        return False  # JSON true is not an integer
    return isinstance(value, JSON_TYPES[name])
