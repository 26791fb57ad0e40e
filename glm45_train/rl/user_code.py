"""User code named in a recipe as `"package.module:attribute"` (rewards, environments, tools), imported with importlib.

The module is imported as Python imports anything, from `sys.path` plus the directory the run starts from (the
`glm45-train` console script's sys.path holds its bin directory instead, `torchrun -m` the working directory:
both find a `rewards.py` beside the recipe the user runs from; appended, so it never shadows an installed
package). Every way this can go wrong — no such module, an error while importing it, no such attribute,
not callable — is a `UserError` naming the recipe key and the spec.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from glm45_train.errors import UserError


def load_user_callable(spec: str, where: str, what: str = "reward") -> Callable[..., Any]:
    """The callable `spec` ("module:function", dotted attribute paths allowed) names; `what` it is for errors."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UserError(f"{where}: {what} {spec!r} is neither a built-in nor 'package.module:function'")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        target: object = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            raise UserError(f"{where}: {what} {spec!r}: no module {exc.name!r} on sys.path") from exc
        raise UserError(f"{where}: {what} {spec!r}: importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:  # anything the user's module raises at import
        raise UserError(f"{where}: {what} {spec!r}: importing {module_name!r} failed: {exc!r}") from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UserError(f"{where}: {what} {spec!r}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        kind = type(target).__name__
        raise UserError(f"{where}: {what} {spec!r}: {attribute!r} is a {kind}, not a function")
    return target
