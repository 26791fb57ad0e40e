"""`python_tools`: the policy calls plain Python functions named in the recipe.

    rl:
      environment:
        name: python_tools
        tools: [my_tools:search, {function: my_tools:sql, schema: {...}}]   # schema: from type hints unless given

Notable:
- Each call's arguments are checked against the tool's schema before the function runs (the checks of
  data/tool_calls.py), then converted to Python values (`integer` → int, `object` → dict, strings raw).
- Functions run in one child process per rank (tool_worker.py), one call at a time, with
  `rl.environment.tool_timeout_s` per call; every failure is an observation (`error: …`), counted.
- The tools are resolved when the run starts: a missing module or attribute, or a hint without a JSON type, fails
  before any process trains.
- A tool's name is the function's name unless the entry gives `name`.
"""

from __future__ import annotations

from typing import Any

from glm45_train.data.tool_calls import ParsedCall, call_problems_against_schema, typed_arguments
from glm45_train.errors import UserError
from glm45_train.rl.agent.environment import EnvironmentConfig, StepResult, ToolResult
from glm45_train.rl.agent.tool_schema import schema_of
from glm45_train.rl.agent.tool_worker import ToolWorker
from glm45_train.rl.user_code import load_user_callable


class PythonTools:
    def __init__(self, config: EnvironmentConfig) -> None:
        self.config = config
        self.schemas: dict[str, dict[str, Any]] = {}
        specs: dict[str, str] = {}
        for index, entry in enumerate(config.tools):
            where = f"rl.environment.tools[{index}]"
            spec, name, schema = _entry(entry, where)
            function = load_user_callable(spec, where, what="tool")
            name = name or spec.rpartition(":")[2].rpartition(".")[2]
            if name in specs:
                raise UserError(f"{where}: a second tool named {name!r}")
            given = {"type": "function", "function": {"name": name, **schema}} if schema else None
            self.schemas[name], specs[name] = given or schema_of(function, name, where), spec
        self.worker = ToolWorker(specs, config.max_observation_chars)

    def tools(self) -> list[dict[str, Any]]:
        return list(self.schemas.values())

    def start(self, prompt: Any) -> _Episode:
        return _Episode(self)

    def run(self, call: ParsedCall) -> ToolResult:
        if call.name not in self.schemas:  # the prompt declared a tool this environment does not run
            return ToolResult(f"error: unknown tool {call.name!r} (this environment runs {sorted(self.schemas)})", True)
        parameters = self.schemas[call.name]["function"].get("parameters", {})
        return self.worker.call(call.name, typed_arguments(call, parameters), self.config.tool_timeout_s)

    def close(self) -> None:
        self.worker.close()


class _Episode:
    def __init__(self, tools: PythonTools) -> None:
        self.tools = tools

    def act(self, calls: list[ParsedCall]) -> StepResult:
        results = []
        schemas = {name: tool["function"].get("parameters", {}) for name, tool in self.tools.schemas.items()}
        for call in calls:
            problems = call_problems_against_schema(call, schemas)
            results.append(ToolResult("error: " + "; ".join(problems), True) if problems else self.tools.run(call))
        return StepResult(results)

    def close(self) -> None:
        pass


def _entry(entry: Any, where: str) -> tuple[str, str | None, dict[str, Any] | None]:
    """(module:function, name or None, schema body or None) of one `tools` entry."""
    if isinstance(entry, str):
        return entry, None, None
    if isinstance(entry, dict) and isinstance(entry.get("function"), str):
        unknown = sorted(set(entry) - {"function", "name", "schema"})
        if unknown:
            raise UserError(f"{where}: unknown keys {unknown} (a tool entry has function, name, schema)")
        schema = entry.get("schema")
        if schema is not None and not (isinstance(schema, dict) and isinstance(schema.get("parameters"), dict)):
            raise UserError(f"{where}.schema: expected {{description, parameters: {{type: object, properties}}}}")
        return entry["function"], entry.get("name"), schema
    raise UserError(f"{where}: expected 'module:function' or {{function: 'module:function', schema: ...}}")
