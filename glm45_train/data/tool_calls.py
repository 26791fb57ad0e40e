"""GLM-4.5 tool calls as text: written as the template writes them, read back, checked against the tool schemas.

The one home for the `<tool_call>` format: the renderer writes calls with `tool_call_text` (data/chat.py), the
`glm_format` reward and the agent rollouts (rl/agent) read them back with `parse_tool_calls` and judge them with
`call_problems_against_schema`; `typed_arguments` turns a checked call into the dict a Python tool is called with.

Notable:
- Written form: `\\n<tool_call>NAME\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>\\n…</tool_call>`; a string
  value is written raw, anything else as JSON (the template's `tojson(ensure_ascii=False)`). Reading does not judge
  the whitespace between the parts.
- NAME is the first line of the block, up to the first `<arg_key>`; a key appears once; required parameters are
  present; a value parses against its declared type (`string` takes the raw text; `integer`, `number`, `boolean`,
  `object`, `array`, `null` must be JSON of that type); `enum` is enforced. Nested schemas are not descended into.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from glm45_train.data.conversation import ToolCall

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


def tool_call_text(call: ToolCall) -> str:
    """One call as the template renders it inside an assistant turn."""
    arguments = "".join(
        f"<arg_key>{key}</arg_key>\n<arg_value>{value if isinstance(value, str) else to_json(value)}</arg_value>\n"
        for key, value in call.arguments.items()
    )
    return f"\n<tool_call>{call.name}\n{arguments}</tool_call>"


def to_json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)  # the template's tojson(ensure_ascii=False)


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
    properties = _properties(schema)
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


def typed_arguments(call: ParsedCall, schema: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments as Python values: JSON-decoded unless the declared type takes a string (a call that
    `call_problems_against_schema` passed; an undeclared key of an open schema is decoded when it is JSON)."""
    properties = _properties(schema)
    out: dict[str, Any] = {}
    for key, raw in call.arguments:
        declared = properties.get(key, {}).get("type") if isinstance(properties.get(key), dict) else None
        types = [declared] if isinstance(declared, str) else list(declared or [])
        if "string" in types or (key in properties and not types):
            out[key] = raw
            continue
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _properties(schema: dict[str, Any]) -> dict[str, Any]:
    properties = schema.get("properties")
    return properties if isinstance(properties, dict) else {}


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
