"""What an agent environment is: episodes that take the policy's tool calls and answer with tool results.

An environment is built once per rank from `rl.environment` (a built-in name or a user `module:ClassOrFactory`,
called with an `EnvironmentConfig`). For every trajectory the rollout loop (rl/agent/episodes.py) calls
`start(prompt)`; after each assistant turn that ends on `<|observation|>` it hands the parsed calls to
`episode.act(calls)` and appends the results as the chat template renders them; the rewards then see the whole
trajectory (rl/rewards: `RewardInput.trajectory`).

Notable:
- Calls arrive parsed (data/tool_calls.py, the parser the `glm_format` reward uses) and checked against the
  prompt's tool schemas: a malformed or schema-breaking call never reaches the environment, the loop answers
  it with an error observation itself (counted as a tool error).
- `act` returns one `ToolResult` per call, in call order. A result marked `error` or `timed_out` is counted in the
  step's metrics; its text is still what the model sees (an error message is an observation like any other).
- `tools()` lists the environment's tool schemas (OpenAI style): a prompt without its own `tools` gets these, so
  the system prompt declares what the environment runs.
- Episodes may hold state (a sandbox directory, a session); `close()` is called on every episode, finished or cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from glm45_train.data.tool_calls import ParsedCall
from glm45_train.errors import UserError


@dataclass(frozen=True)
class ToolResult:
    text: str
    error: bool = False  # the tool failed (raised, bad arguments, unknown tool, killed by a limit)
    timed_out: bool = False  # ran past rl.environment.tool_timeout_s (also an error)


@dataclass(frozen=True)
class StepResult:
    results: list[ToolResult]  # one per call, in call order
    done: bool = False  # the episode is over (no further assistant turn is sampled)


class Episode(Protocol):
    def act(self, calls: list[ParsedCall]) -> StepResult: ...

    def close(self) -> None: ...


class Environment(Protocol):
    def tools(self) -> list[dict[str, Any]]:
        """The tool schemas a prompt without its own declares (OpenAI style: {"type": "function", ...})."""
        ...

    def start(self, prompt: Any) -> Episode:
        """A new episode for this prompt record (rl/prompts.PromptRecord: messages, tools, answer, extra)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class EnvironmentConfig:
    """What an environment is built from: rl.environment's keys (args: its own arguments)."""

    tools: list[Any] = field(default_factory=list)
    tool_timeout_s: float = 10.0
    max_observation_chars: int = 4000
    args: dict[str, Any] = field(default_factory=dict)


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


TRUNCATED = "\n[truncated: "  # how a cut observation says so (counted per step: agent/tool_truncations)


def truncated(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, saying how much was cut (what the model sees of a huge output)."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"{TRUNCATED}{len(text) - limit} more characters]"
