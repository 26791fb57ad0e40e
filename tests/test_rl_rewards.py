"""RL rewards: every built-in with positive and negative cases, user `module:function` rewards, and failures
(raising, NaN, wrong type) counted with the prompt's line, never trained on."""

from __future__ import annotations

import math
import os
import pickle
import textwrap
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from chat_cases import CASES  # tests/ is on sys.path under pytest

from glm45_train.data.chat import RenderOptions, render_text, without_reasoning
from glm45_train.data.conversation import Origin, to_template_messages
from glm45_train.data.sources import parse_record
from glm45_train.errors import UserError
from glm45_train.rl.prompts import PromptRecord
from glm45_train.rl.rewards import RewardFailureError, RewardInput, RewardSet, RewardSpec, final_answer
from glm45_train.rl.rewards.glm_format import format_problems, glm_format
from glm45_train.rl.rewards.length import overlong_penalty
from glm45_train.rl.rewards.match import contains, exact, regex, token_fraction
from glm45_train.rl.rewards.math_answer import math_match

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"type": "string", "enum": ["C", "F"]},
                "hourly": {"type": "boolean"},
                "ratio": {"type": "number"},
                "filters": {"type": "object"},
                "fields": {"type": "array"},
            },
            "required": ["city"],
        },
    },
}
OPEN_TOOL = {"name": "run", "parameters": {"type": "object", "additionalProperties": True}}


def sample(response: str, *, line: int = 1, thinking: bool = False, finished: bool = True, **prompt) -> RewardInput:
    record = PromptRecord(
        messages=[{"role": "user", "content": "q"}],
        tools=prompt.get("tools"),
        answer=prompt.get("answer"),
        extra=prompt.get("extra", {}),
        origin=Origin("prompts.jsonl", line),
    )
    ids = prompt.get("ids", list(range(len(response))))
    return RewardInput(record, response, ids, thinking, finished)


def call(name: str, **arguments: str) -> str:
    pairs = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{v}</arg_value>\n" for k, v in arguments.items())
    return f"\n<tool_call>{name}\n{pairs}</tool_call>"


# --- final answer -------------------------------------------------------------------------------------------


def test_final_answer_is_after_think_without_stop():
    assert final_answer(sample("<think>2</think>\n 3 <|endoftext|>")) == "3"
    assert final_answer(sample("\nplain<|observation|>")) == "plain"
    assert final_answer(sample("<think>still thinking")) == ""  # an unclosed think block leaves no answer


# --- math -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "response"),
    [
        ("0.5", "The answer is \\boxed{1/2}"),
        ("\\frac{1}{2}", "so it is 0.5"),
        ("1/2", "\\boxed{\\frac12}"),
        ("42", "<think>6 × 7</think>\nShe has 42 apples."),
        ("3", "\\boxed{3}, not 5"),  # boxed wins over the last number
        ("7", "\\boxed{7}<|endoftext|>"),
        ("1000", "1,000"),
        ("2\\pi", "\\boxed{2\\pi}"),  # a bare reference is read as LaTeX: 2π, not 2
        ("x = 3", "so x = 3"),
    ],
)
def test_math_equivalent_answers_score_one(answer, response):
    assert math_match(sample(response, answer=answer)) == 1.0


@pytest.mark.parametrize(
    ("answer", "response"),
    [
        ("72", "first 3, then 73"),  # the last number is judged
        ("2", "<think>it is 2</think>\nI do not know"),  # a number in the reasoning earns nothing
        ("2", "<think>it is 2"),  # never finished thinking
        ("0.5", "\\boxed{0.6}"),
        ("2\\pi", "\\boxed{2}"),
        ("5", ""),
    ],
)
def test_math_wrong_or_missing_answers_score_zero(answer, response):
    assert math_match(sample(response, answer=answer)) == 0.0


def test_math_without_a_usable_reference_raises():
    with pytest.raises(ValueError, match="no reference answer"):
        math_match(sample("\\boxed{1}"))
    with pytest.raises(ValueError, match="does not parse as math"):
        math_match(sample("\\boxed{1}", answer="no idea"))


def test_math_runs_in_a_thread_pool():
    """math-verify's alarm-based timeout only works in the main thread; in a pool it is switched off."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        values = list(pool.map(math_match, [sample("\\boxed{1/2}", answer="0.5"), sample("7", answer="8")]))
    assert values == [1.0, 0.0]


# --- exact / regex / contains / token_fraction -------------------------------------------------------------


def test_exact():
    assert exact(sample("  Paris \n", answer="Paris")) == 1.0
    assert exact(sample("paris", answer="Paris")) == 0.0
    assert exact(sample("paris", answer="Paris"), ignore_case=True) == 1.0
    assert exact(sample("Paris, France", answer="Paris")) == 0.0
    assert exact(sample("<think>Paris</think>Rome", answer="Paris")) == 0.0
    assert exact(sample("Rome", answer="Paris"), answer="Rome") == 1.0  # args override the prompt


def test_regex():
    assert regex(sample("the code is 123"), pattern=r"\b\d{3}\b") == 1.0
    assert regex(sample("the code is 12"), pattern=r"\b\d{3}\b") == 0.0
    assert regex(sample("YES", extra={"pattern": "^yes$"})) == 0.0
    assert regex(sample("YES", extra={"pattern": "^yes$"}), ignore_case=True) == 1.0
    assert regex(sample("ok", extra={"re": "o"}), field="re") == 1.0
    with pytest.raises(ValueError, match="no pattern"):
        regex(sample("ok"))


def test_contains():
    assert contains(sample("I like apples."), word="apple") == 1.0
    assert contains(sample("I like pears."), word="apple") == 0.0
    assert contains(sample("<think>apple</think>pear"), word="apple") == 0.0
    assert contains(sample("An Apple", extra={"word": "apple"})) == 0.0
    assert contains(sample("An Apple", extra={"word": "apple"}), ignore_case=True) == 1.0
    with pytest.raises(ValueError, match="no word"):
        contains(sample("x"))


def test_token_fraction_is_smooth():
    assert token_fraction(sample("", ids=[5, 1, 5, 2]), token_id=5) == 0.5
    assert token_fraction(sample("", ids=[5, 1, 5, 2]), token_id=9) == 0.0
    assert token_fraction(sample("", ids=[]), token_id=5) == 0.0
    assert token_fraction(sample("", ids=[7] * 3 + [1]), token_id=7) == 0.75


# --- glm_format ------------------------------------------------------------------------------------------------


def test_glm_format_think_block():
    assert glm_format(sample("\nParis.")) == 1.0
    assert glm_format(sample("\n<think>hmm</think>\nParis.", thinking=True)) == 1.0
    assert glm_format(sample("\n<think></think>\nParis.", thinking=True)) == 1.0
    assert format_problems(sample("\n<think>hmm</think>\nParis.")) == [
        "thinking is off (the prompt holds the empty <think></think>) but the response has think tags"
    ]
    assert format_problems(sample("\nParis.", thinking=True)) == [
        "thinking is on but the response does not open with <think>"
    ]
    assert format_problems(sample("\n<think>hmm", thinking=True)) == ["the <think> block is never closed"]
    assert glm_format(sample("<think>a</think><think>b</think>x", thinking=True)) == 0.0


def test_glm_format_finished_and_markers():
    assert format_problems(sample("\nParis.", finished=False)) == [
        "the response hit the length limit before a stop token"
    ]
    assert glm_format(sample("\nParis.", finished=False), require_finished=False) == 1.0
    assert glm_format(sample("\nParis.<|endoftext|>")) == 1.0  # the stop at the end is fine
    assert format_problems(sample("\nParis.<|assistant|>\nmore")) == ["<|assistant|> inside the response"]
    assert format_problems(sample("\nParis.<|user|>\nmore")) == ["<|user|> inside the response"]


def test_glm_format_well_formed_tool_calls_score_one():
    good = call("get_weather", city="Oslo", days="3", unit="C", hourly="true", ratio="0.5")
    good += call("get_weather", city="北京", filters='{"rain": true}', fields='["wind", "sun"]')
    assert format_problems(sample("\nChecking." + good + "<|observation|>", tools=[WEATHER])) == []
    assert glm_format(sample(good, tools=[WEATHER]), require_tool_call=True) == 1.0
    assert glm_format(sample(call("run", anything="1"), tools=[OPEN_TOOL])) == 1.0  # additionalProperties


@pytest.mark.parametrize(
    ("response", "problem"),
    [
        (call("get_weather", city="Oslo", days="three"), "argument 'days' value 'three' is not JSON"),
        (call("get_weather", city="Oslo", days="3.5"), "argument 'days' value '3.5' is not of the declared type"),
        (call("get_weather", city="Oslo", days="true"), "argument 'days' value 'true' is not of the declared type"),
        (call("get_weather", city="Oslo", hourly="1"), "argument 'hourly' value '1' is not of the declared type"),
        (call("get_weather", city="Oslo", fields='{"a": 1}'), "argument 'fields' value"),
        (call("get_weather", city="Oslo", unit="K"), "argument 'unit' value 'K' is not one of ['C', 'F']"),
        (call("get_time", city="Oslo"), "get_time: unknown function"),
        (call("get_weather", days="3"), "get_weather: missing required argument 'city'"),
        (call("get_weather", city="Oslo", country="NO"), "get_weather: undeclared argument 'country'"),
        (call("get_weather", city="Oslo") + "\n<tool_call>get_weather\n", "unbalanced tool calls"),
        ("\n<tool_call>get_weather\ncity=Oslo</tool_call>", "tool call 0: get_weather: expected <arg_key>"),
        ("\n<tool_call>\n<arg_key>city</arg_key><arg_value>Oslo</arg_value></tool_call>", "bad function name ''"),
        (
            "\n<tool_call>get_weather\n<arg_key>city</arg_key><arg_value>A</arg_value>"
            "<arg_key>city</arg_key><arg_value>B</arg_value></tool_call>",
            "argument 'city' given twice",
        ),
    ],
)
def test_glm_format_bad_tool_calls_score_zero(response, problem):
    problems = format_problems(sample(response, tools=[WEATHER]))
    assert any(problem in p for p in problems), problems
    assert glm_format(sample(response, tools=[WEATHER])) == 0.0


def test_glm_format_tool_call_without_tools_and_required_call():
    assert format_problems(sample(call("get_weather", city="Oslo"))) == [
        "get_weather: unknown function (the prompt declares no tools)"
    ]
    assert format_problems(sample("\nNo call.", tools=[WEATHER]), require_tool_call=True) == ["no tool call"]
    assert glm_format(sample("\nNo call.", tools=[WEATHER])) == 1.0  # a call is optional by default


# Cases ending with an assistant turn; the one whose content holds literal think tags is not well formed.
TEMPLATE_CASES = sorted(
    name
    for name, case in CASES.items()
    if case["messages"][-1]["role"] == "assistant" and name != "empty_reasoning_field_keeps_inline_text"
)


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("name", TEMPLATE_CASES)
def test_glm_format_accepts_every_final_turn_the_template_writes(name, thinking):
    """The renderer's own final assistant turns (response = full rendering minus the prompt) are well formed."""
    conversation = parse_record(CASES[name], Origin(name, 1))
    if not thinking:
        conversation = without_reasoning(conversation)[0]  # non-thinking data, as `data prepare` trains it
    prompt = replace(conversation, messages=conversation.messages[:-1])
    full = render_text(conversation, RenderOptions(thinking=thinking)).text
    prompt_text = render_text(prompt, RenderOptions(thinking=thinking, add_generation_prompt=True)).text
    assert full.startswith(prompt_text)
    response = full[len(prompt_text) :]
    record = PromptRecord(to_template_messages(prompt), list(prompt.tools) or None)
    assert format_problems(RewardInput(record, response, [0], thinking, True)) == []
    if "<tool_call>" in response:  # negative control: the same calls against no schema fail
        assert glm_format(RewardInput(PromptRecord(record.messages), response, [0], thinking, True)) == 0.0


# --- length ------------------------------------------------------------------------------------------------------


def test_length_is_dapo_overlong_shaping():
    def at(n: int) -> float:
        return overlong_penalty(sample("", ids=[0] * n), max_len=10, buffer=4)

    assert [at(n) for n in (0, 6, 7, 8, 10, 11, 50)] == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]


# --- specs, argument checks -----------------------------------------------------------------------------------


def test_reward_spec_from_dict_is_strict():
    spec = RewardSpec.from_dict({"name": "length", "weight": 0.5, "args": {"max_len": 10, "buffer": 2}})
    assert spec == RewardSpec("length", 0.5, {"max_len": 10, "buffer": 2})
    assert RewardSpec.from_dict({"name": "math"}) == RewardSpec("math", 1.0, {})
    with pytest.raises(UserError, match=r"rl.rewards\[2\].wieght: unknown key \(did you mean 'weight'\?\)"):
        RewardSpec.from_dict({"name": "math", "wieght": 2}, "rl.rewards[2]")
    with pytest.raises(UserError, match=r"reward.name: required"):
        RewardSpec.from_dict({"weight": 1})
    with pytest.raises(UserError, match=r"reward.weight: expected a finite number, got True"):
        RewardSpec.from_dict({"name": "math", "weight": True})
    with pytest.raises(UserError, match=r"reward.weight: expected a finite number, got nan"):
        RewardSpec.from_dict({"name": "math", "weight": float("nan")})
    with pytest.raises(UserError, match=r"reward.args: expected a mapping"):
        RewardSpec.from_dict({"name": "math", "args": [1]})
    with pytest.raises(UserError, match=r"reward: expected a mapping"):
        RewardSpec.from_dict("math")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (RewardSpec("maths"), r"rl.rewards\[0\].name: unknown reward 'maths' \(did you mean 'math'\?\)"),
        (RewardSpec("contains", args={"wrod": "x"}), r"rl.rewards\[0\].args: reward 'contains': .*'wrod'"),
        (RewardSpec("length", args={"max_len": 10}), r"rl.rewards\[0\].args: reward 'length': .*'buffer'"),
        (RewardSpec("length", args={"max_len": "10", "buffer": 2}), r"args.max_len: reward 'length' takes int"),
        (RewardSpec("length", args={"max_len": 10, "buffer": 0}), r"need 0 < buffer <= max_len"),
        (RewardSpec("exact", args={"ignore_case": 1}), r"args.ignore_case: reward 'exact' takes bool, got 1"),
        (RewardSpec("token_fraction", args={"token_id": True}), r"args.token_id: reward 'token_fraction' takes int"),
        (RewardSpec("regex", args={"pattern": "("}), r"rl.rewards\[0\].args: reward 'regex': missing \)"),
    ],
)
def test_bad_reward_specs_fail_before_any_run(spec, message):
    with pytest.raises(UserError, match=message):
        RewardSet([spec])


def test_reward_set_requires_rewards_and_a_valid_fraction():
    with pytest.raises(UserError, match="no rewards"):
        RewardSet([])
    with pytest.raises(UserError, match=r"max_failure_fraction 1\.5"):
        RewardSet([RewardSpec("math")], max_failure_fraction=1.5)


# --- user rewards -------------------------------------------------------------------------------------------


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write a module into tmp_path, put it on sys.path, and return its (unique) name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        name = f"rl_user_rewards_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        return name

    return write


def test_user_reward_is_imported_and_called(user_module):
    name = user_module(
        """
        def starts_with(sample, *, prefix):
            return float(sample.response.startswith(prefix))

        class Scorers:
            @staticmethod
            def length(sample):
                return len(sample.response)
        """
    )
    rewards = RewardSet(
        [RewardSpec(f"{name}:starts_with", args={"prefix": "ab"}), RewardSpec(f"{name}:Scorers.length")]
    )
    scores = rewards.score([sample("abc"), sample("xbc")])
    assert scores.per_function == {f"{name}:starts_with": [1.0, 0.0], f"{name}:Scorers.length": [3.0, 3.0]}
    assert scores.total == [4.0, 3.0]
    with pytest.raises(UserError, match=r"rl.rewards\[0\].args: reward .*: missing a required argument: 'prefix'"):
        RewardSet([RewardSpec(f"{name}:starts_with", args={"prefx": "ab"})])
    with pytest.raises(UserError, match=r"rl.rewards\[1\].args: reward .*unexpected keyword argument 'prefx'"):
        RewardSet([RewardSpec("math"), RewardSpec(f"{name}:starts_with", args={"prefix": "a", "prefx": "b"})])


def test_user_reward_load_errors_name_the_recipe_key(user_module):
    name = user_module("CONSTANT = 3\n")
    broken = user_module("import no_such_dependency_xyz\n")
    cases = [
        (
            "no_such_module_xyz:f",
            r"rl.rewards\[0\].name: reward 'no_such_module_xyz:f': no module 'no_such_module_xyz'",
        ),
        (f"{name}:missing", rf"rl.rewards\[0\].name: .*'{name}' has no attribute 'missing'"),
        (f"{name}:CONSTANT", r"rl.rewards\[0\].name: .*'CONSTANT' is a int, not a function"),
        (f"{broken}:f", rf"importing '{broken}' failed: No module named 'no_such_dependency_xyz'"),
        (f"{name}:", r"neither a built-in nor 'package.module:function'"),
    ]
    for spec, message in cases:
        with pytest.raises(UserError, match=message):
            RewardSet([RewardSpec(spec)])


# --- failures ----------------------------------------------------------------------------------------------------


BAD_REWARDS = """
    import math

    def flaky(sample):
        line = sample.prompt.origin.line
        if line == 2:
            raise ZeroDivisionError("boom")
        if line == 3:
            return math.nan
        if line == 4:
            return "1"
        if line == 5:
            return None
        if line == 6:
            return math.inf
        if line == 7:
            return True
        return 0.5
"""


def test_failed_rewards_are_counted_with_the_prompt_line_and_never_trained_on(user_module):
    name = user_module(BAD_REWARDS)
    rewards = RewardSet(
        [RewardSpec("contains", 2.0, {"word": "yes"}), RewardSpec(f"{name}:flaky", 1.0)], max_failure_fraction=1.0
    )
    inputs = [sample("yes", line=line) for line in range(1, 8)]
    scores = rewards.score(inputs)
    flaky = scores.per_function[f"{name}:flaky"]
    assert flaky[0] == 0.5 and flaky[6] == 1.0  # a bool counts as 0/1
    assert all(math.isnan(v) for v in flaky[1:6])
    assert scores.per_function["contains"] == [1.0] * 7
    assert scores.failed == [False, True, True, True, True, True, False]
    assert scores.total == [2.5, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0]  # negative control: the others are summed
    errors = {failure.origin.line: str(failure) for failure in scores.failures}
    assert errors == {
        2: f"prompts.jsonl:2: reward '{name}:flaky' raised ZeroDivisionError: boom",
        3: f"prompts.jsonl:3: reward '{name}:flaky' returned nan, expected a finite number",
        4: f"prompts.jsonl:4: reward '{name}:flaky' returned '1' (str), expected a number",
        5: f"prompts.jsonl:5: reward '{name}:flaky' returned None (NoneType), expected a number",
        6: f"prompts.jsonl:6: reward '{name}:flaky' returned inf, expected a finite number",
    }
    assert [failure.index for failure in scores.failures] == [1, 2, 3, 4, 5]
    assert scores.failure_counts() == {"contains": 0, f"{name}:flaky": 5}
    stats = scores.mean_std()
    assert stats["contains"] == (1.0, 0.0)
    assert stats[f"{name}:flaky"] == (0.75, 0.25)  # over the two valid values only


def test_builtin_failure_names_the_prompt_line():
    scores = RewardSet([RewardSpec("math")], max_failure_fraction=1.0).score([sample("1", line=9)])
    assert scores.failed == [True] and scores.total == [0.0]
    assert str(scores.failures[0]) == (
        "prompts.jsonl:9: reward 'math' raised ValueError: the prompt has no reference answer "
        "(an 'answer' field, or a final assistant turn)"
    )
    assert scores.mean_std() == {"math": (pytest.approx(math.nan, nan_ok=True), pytest.approx(math.nan, nan_ok=True))}


def test_too_many_failures_stop_the_run(user_module):
    name = user_module(
        "def broken(sample):\n    if sample.prompt.origin.line > 1:\n        raise KeyError('tests')\n    return 1.0\n"
    )
    rewards = RewardSet([RewardSpec(f"{name}:broken")], max_failure_fraction=0.5)
    with pytest.raises(
        RewardFailureError, match=rf"reward '{name}:broken' failed on 3 of 4 samples .*e.g. prompts.jsonl:2: .*KeyError"
    ) as caught:
        rewards.score([sample("x", line=line) for line in range(1, 5)])
    assert caught.value.scores.failed == [False, True, True, True]
    # Negative control: at the fraction (2 of 4), not over it, the batch is scored.
    scores = rewards.score([sample("x", line=line) for line in (1, 1, 2, 3)])
    assert scores.failed == [False, False, True, True]


def test_repeated_names_get_distinct_keys_and_the_set_pickles():
    rewards = RewardSet([RewardSpec("contains", args={"word": "a"}), RewardSpec("contains", args={"word": "b"})])
    inputs = [sample("a"), sample("b")]
    scores = rewards.score(inputs)
    assert scores.per_function == {"contains": [1.0, 0.0], "contains#2": [0.0, 1.0]}
    assert pickle.loads(pickle.dumps(rewards)).score(inputs) == scores  # ready for a process pool


def test_the_console_script_finds_a_reward_module_in_the_working_directory(tmp_path):
    """`glm45-train rl` (the console script, whose sys.path holds its bin directory, not the working directory)
    once failed to import a `rewards.py` that `torchrun -m` found; checked before any process starts."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("glm45-train")
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny_grpo.yaml"
    (tmp_path / "my_rewards.py").write_text("def says_hi(response, **_):\n    return float('hi' in response)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(name):
        argv = [str(script), "rl", str(recipe), f"rl.rewards=[{{name: '{name}'}}]", "--print-config"]
        return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    assert shutil.which(str(script)), script
    found = run("my_rewards:says_hi")
    assert found.returncode == 0, found.stderr[-2000:]
    missing = run("no_such_rewards:says_hi")  # negative control: the check is real
    assert missing.returncode == 2 and "no module 'no_such_rewards' on sys.path" in missing.stderr, missing.stderr
