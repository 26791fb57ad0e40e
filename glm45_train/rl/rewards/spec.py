"""`RewardSpec`: one entry of a recipe's `rl.rewards` list — which function, its weight, its arguments.

`from_dict` is strict like the recipe schema: unknown keys, a missing name, a weight that is not a finite number
(bool is not one) or args that are not a mapping are `UserError`s naming the key path, with a suggestion for a
misspelt key.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Any

from glm45_train.errors import UserError


@dataclass
class RewardSpec:
    name: str  # a built-in name or "package.module:function"
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, where: str = "reward") -> RewardSpec:
        """Validate one mapping (`where` is its key path, e.g. `rl.rewards[0]`)."""
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a mapping with name/weight/args, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UserError(f"{where}.{key}: unknown key{hint}; expected {', '.join(known)}")
        name = data.get("name")
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"{where}.name: required, a built-in reward name or 'package.module:function'")
        weight = data.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise UserError(f"{where}.weight: expected a finite number, got {weight!r}")
        args = data.get("args") or {}
        if not isinstance(args, dict) or not all(isinstance(key, str) for key in args):
            raise UserError(f"{where}.args: expected a mapping of argument names to values, got {args!r}")
        return cls(name.strip(), float(weight), dict(args))
