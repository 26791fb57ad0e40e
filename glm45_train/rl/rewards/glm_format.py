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

from glm45_train.data.tool_calls import call_problems_against_schema, parse_tool_calls, tool_schemas
from glm45_train.model.tokenizer import STOP_TOKENS
from glm45_train.rl.rewards.base import RewardInput, without_stop

PROMPT_MARKERS = ("[gMASK]", "<sop>", "<|system|>", "<|assistant|>")


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
