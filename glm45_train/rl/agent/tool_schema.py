"""A Python function's tool schema (OpenAI style) from its signature, type hints and docstring.

`str` → string, `int` → integer, `float` → number, `bool` → boolean, `list[...]`/`tuple[...]` → array,
`dict[...]` → object, `Literal[...]` → enum of its values, `X | None` → X and not required; a parameter with a
default is not required. A hint outside these is refused by name (give the tool's `schema` in the recipe
instead), as are `*args` / `**kwargs`.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

from glm45_train.errors import UserError

SIMPLE = {
    str: "string", int: "integer", float: "number", bool: "boolean", list: "array", tuple: "array", dict: "object",
}  # fmt: skip


def schema_of(function: Callable[..., Any], name: str, where: str) -> dict[str, Any]:
    """{"type": "function", "function": {name, description, parameters}} for `function`."""
    try:
        hints = typing.get_type_hints(function)
    except Exception as exc:
        raise UserError(f"{where}: tool {name!r}: its type hints cannot be read ({exc!r}); give a schema") from exc
    properties: dict[str, Any] = {}
    required: list[str] = []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise UserError(f"{where}: tool {name!r} takes *{parameter.name}: a tool's parameters are named")
        if parameter.name not in hints:
            raise UserError(f"{where}: tool {name!r}: parameter {parameter.name!r} has no type hint; add one")
        optional, prop = _property(hints[parameter.name], f"{where}: tool {name!r}: parameter {parameter.name!r}")
        properties[parameter.name] = prop
        if parameter.default is inspect.Parameter.empty and not optional:
            required.append(parameter.name)
    doc = inspect.getdoc(function) or ""
    parameters = {"type": "object", "properties": properties, "required": required}
    description = doc.split("\n\n")[0]
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


def _property(hint: Any, where: str) -> tuple[bool, dict[str, Any]]:
    """(whether None is allowed, the JSON schema of `hint`)."""
    origin, members = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [member for member in members if member is not type(None)]
        if len(rest) == 1 and len(members) == 2:
            return True, _property(rest[0], where)[1]
        raise UserError(f"{where}: the union {hint} has no JSON type; give the tool a schema")
    if origin is typing.Literal:
        return False, {"enum": list(members)}
    base = origin or hint
    if base in SIMPLE:
        return False, {"type": SIMPLE[base]}
    known = "str, int, float, bool, list, dict, Literal"
    raise UserError(f"{where}: type {hint} has no JSON type ({known}); give the tool a schema")
