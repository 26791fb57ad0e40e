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


TRUNCATED = "\n[truncated: "  # how a cut observation says so (counted per step: agent/tool_truncations)


def truncated(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, saying how much was cut (what the model sees of a huge output)."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"{TRUNCATED}{len(text) - limit} more characters]"
