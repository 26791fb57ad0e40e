"""Reward names → functions: the built-ins, or a user's `module:function`; arguments checked before any run.

Built-ins (args after the sample; see each module's docstring):
  math          math_answer.math_match        timeout_s
  exact         match.exact                   answer, ignore_case
  regex         match.regex                   pattern, field, ignore_case
  contains      match.contains                word, field, ignore_case
  token_fraction match.token_fraction         token_id
  glm_format    glm_format.glm_format         require_finished, require_tool_call
  length        length.overlong_penalty       max_len, buffer
  tool_calls    tool_use.tool_calls           min_calls, allow_tool_errors (agent trajectories)

Argument names are checked against the function's signature for every reward (a user function taking `**kwargs`
accepts any); for built-ins the types too (from the annotations; bool is not an int here), plus value checks
(a regex must compile, length's buffer must fit).
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from glm45_train.errors import UserError
from glm45_train.rl.rewards.base import RewardFn
from glm45_train.rl.rewards.glm_format import glm_format
from glm45_train.rl.rewards.length import check_length_args, overlong_penalty
from glm45_train.rl.rewards.match import compile_pattern, contains, exact, regex, token_fraction
from glm45_train.rl.rewards.math_answer import math_match
from glm45_train.rl.rewards.tool_use import tool_calls


@dataclass(frozen=True)
class Builtin:
    function: RewardFn
    check: Callable[[dict[str, Any]], None] | None = None  # value checks on the full argument set


def _check_regex_args(args: dict[str, Any]) -> None:
    if args.get("pattern") is not None:
        compile_pattern(args["pattern"], bool(args.get("ignore_case", False)))


BUILTINS: dict[str, Builtin] = {
    "math": Builtin(math_match),
    "exact": Builtin(exact),
    "regex": Builtin(regex, _check_regex_args),
    "contains": Builtin(contains),
    "token_fraction": Builtin(token_fraction),
    "glm_format": Builtin(glm_format),
    "length": Builtin(overlong_penalty, check_length_args),
    "tool_calls": Builtin(tool_calls),
}


def resolve_reward(name: str, args: dict[str, Any], where: str) -> RewardFn:
    """The function `name` stands for, with `args` checked against it; `where` is the recipe key for errors."""
    from glm45_train.rl.user_code import load_user_callable

    if name in BUILTINS:
        builtin = BUILTINS[name]
        bound = _bind(builtin.function, name, args, where)
        _check_types(builtin.function, name, bound, where)
        if builtin.check is not None:
            try:
                builtin.check(bound)
            except Exception as exc:  # re.error, ValueError: bad values in the recipe
                raise UserError(f"{where}.args: reward {name!r}: {exc}") from exc
        return builtin.function
    if ":" not in name:
        close = difflib.get_close_matches(name, BUILTINS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        known = ", ".join(BUILTINS)
        raise UserError(f"{where}.name: unknown reward {name!r}{hint}; built-ins: {known}, or 'module:function'")
    function = load_user_callable(name, f"{where}.name")
    _bind(function, name, args, where)
    return function


def _bind(function: RewardFn, name: str, args: dict[str, Any], where: str) -> dict[str, Any]:
    """All keyword arguments the call will get (defaults included); UserError for unknown or missing ones."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return dict(args)  # not introspectable (a C callable): checked at the first call
    try:
        bound = signature.bind(None, **args)
    except TypeError as exc:
        accepted = list(signature.parameters)[1:]
        raise UserError(f"{where}.args: reward {name!r}: {exc} (it takes: {', '.join(accepted) or 'nothing'})") from exc
    bound.apply_defaults()
    return {key: value for key, value in list(bound.arguments.items())[1:]}


def _check_types(function: RewardFn, name: str, bound: dict[str, Any], where: str) -> None:
    hints = typing.get_type_hints(function)
    for key, value in bound.items():
        expected = hints.get(key)
        if expected is None:
            continue
        allowed = typing.get_args(expected) if isinstance(expected, types.UnionType) else (expected,)
        if isinstance(value, bool) and bool not in allowed:
            ok = False
        else:
            ok = isinstance(value, allowed) or (float in allowed and isinstance(value, int))
        if not ok:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise UserError(f"{where}.args.{key}: reward {name!r} takes {names}, got {value!r}")
