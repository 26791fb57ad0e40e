"""`rl.environment` → the environment: a built-in (`python_tools`, `code_interpreter`) or a user `module:Factory`."""

from __future__ import annotations

from typing import Any

from glm45_train.errors import UserError
from glm45_train.rl.agent.environment import Environment, EnvironmentConfig

BUILTINS = ("python_tools", "code_interpreter")


def environment_for(section: Any) -> Environment | None:
    """`rl.environment`'s environment, or None for single-turn rollouts."""
    return None if section.name is None else build_environment(section)


def build_environment(section: Any) -> Environment:
    """The environment `rl.environment` names; a UserError naming the key when it cannot be built."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(OmegaConf.create({"t": section.tools, "a": section.args}))
    assert isinstance(plain, dict)
    config = EnvironmentConfig(list(plain["t"]), section.tool_timeout_s, section.max_observation_chars, plain["a"])
    name = section.name
    if name == "python_tools":
        from glm45_train.rl.agent.python_tools import PythonTools

        return PythonTools(config)
    if name == "code_interpreter":
        from glm45_train.rl.agent.code_interpreter import CodeInterpreter

        return CodeInterpreter(config)
    from glm45_train.rl.user_code import load_user_callable

    factory = load_user_callable(name, "rl.environment.name", what="environment")
    try:
        environment = factory(config)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"rl.environment.name: building {name!r} failed: {exc!r}") from exc
    missing = [method for method in ("tools", "start", "close") if not callable(getattr(environment, method, None))]
    if missing:
        raise UserError(f"rl.environment.name: {name!r} built an object without {', '.join(missing)} (see {__name__})")
    return environment
