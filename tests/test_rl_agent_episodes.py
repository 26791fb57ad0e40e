"""The multi-turn rollout loop (rl/agent/episodes.py) against a scripted policy: appended ids equal the template's
rendering of the final conversation, only the policy's tokens are trained, and nothing a policy or a tool does
crashes an episode (malformed calls, unknown tools, bad arguments, tools that raise, hang or flood)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Literal

import pytest

from glm45_train.data.chat import EMPTY_THINK, RenderOptions, render_text, tokenize_rendered, without_reasoning
from glm45_train.data.conversation import Origin
from glm45_train.data.sources import parse_record
from glm45_train.rl.agent.environment import EnvironmentConfig, StepResult, ToolResult
from glm45_train.rl.agent.episodes import EpisodeRunner, Limits
from glm45_train.rl.agent.python_tools import PythonTools
from glm45_train.rl.prompts import prompt_from_record, render_prompts
from glm45_train.rl.rollout import Completion, Request, SamplingParams
from tests.conftest import REPO_ROOT

STOPS = ("<|endoftext|>", "<|user|>", "<|observation|>")


class ScriptedPolicy:
    """A RolloutEngine that answers turn t of a trajectory with the t-th scripted text of its prompt (log-prob
    -1 per token): the loop under test sees exactly what an engine returns."""

    def __init__(self, tokenizer, scripts: dict[tuple[int, ...], list[str]]) -> None:
        self.tokenizer, self.scripts = tokenizer, scripts
        self.assistant = tokenizer.token_to_id("<|assistant|>")
        self.stops = {tokenizer.token_to_id(token) for token in STOPS}

    def generate(self, requests, params):
        out = []
        for request in requests:
            prompt = max((p for p in self.scripts if request.prompt_ids[: len(p)] == p), key=len)
            turn = request.prompt_ids[len(prompt) :].count(self.assistant)
            ids = self.tokenizer.encode(self.scripts[prompt][turn], add_special_tokens=False).ids
            ids = ids[: params.max_new_tokens]
            finished = bool(ids) and ids[-1] in self.stops
            out.append([Completion(tuple(ids), (-1.0,) * len(ids), finished)] * request.samples)
        return out


class Replay:
    """An environment that answers each call with the recorded tool results, in order."""

    def __init__(self, results: list[str]) -> None:
        self.results = results

    def tools(self):
        return []

    def start(self, prompt):
        results = iter(self.results)

        class Episode:
            def act(self, calls):
                return StepResult([ToolResult(next(results)) for _ in calls])

            def close(self):
                pass

        return Episode()

    def close(self):
        pass


def _agent_conversations():
    """Every record of data/ whose last user turn is followed by tool use: (record, origin)."""
    for name in ("sample_distill.jsonl", "agent_sample.jsonl"):
        for line_no, line in enumerate((REPO_ROOT / "data" / name).read_text().splitlines(), 1):
            record = json.loads(line)
            roles = [m["role"] for m in record["messages"]]
            last_user = max(i for i, role in enumerate(roles) if role == "user")
            if "tool" in roles[last_user:]:
                yield record, Origin(f"{name}", line_no)


CASES = list(_agent_conversations())


def _split(record, origin, thinking: bool, tokenizer):
    """(prompt ids, the policy's turn texts, the tool results, the whole conversation's rendering)."""
    conversation = parse_record(record, origin)
    if not thinking:  # as `data prepare --mode non-thinking` trains it
        conversation = without_reasoning(conversation)[0]
    rendered = render_text(conversation, RenderOptions(thinking=thinking))
    last_user = max(i for i, m in enumerate(conversation.messages) if m.role == "user")
    prompt_record, _ = prompt_from_record({**record, "messages": record["messages"][: last_user + 1]}, origin)
    prompt_ids = render_prompts([prompt_record], tokenizer, thinking=thinking)[0]
    whole = tokenize_rendered([rendered], tokenizer)[0]
    # the policy's turns: the trained stretches after the prompt (thinking off: the empty think block is the
    # generation prompt's, so a turn starts after it)
    turns, text = [], ""
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=False)
    offset = 0
    for piece, trained in rendered.segments:
        offset += len(piece)
        if offset <= len(prompt_text) or not trained:
            if text:
                turns.append(text)
                text = ""
            continue
        text += piece[len(EMPTY_THINK) :] if not thinking and not text and piece.startswith(EMPTY_THINK) else piece
    if text:
        turns.append(text)
    results = [m.content for m in conversation.messages[last_user:] if m.role == "tool"]
    return prompt_record, prompt_ids, turns, results, whole


@pytest.mark.parametrize("thinking", [False, True], ids=["thinking-off", "thinking-on"])
def test_appended_ids_equal_the_templates_rendering_of_the_final_conversation(chat_tokenizer, thinking):
    assert len(CASES) >= 8
    for record, origin in CASES:
        prompt_record, prompt_ids, turns, results, whole = _split(record, origin, thinking, chat_tokenizer)
        policy = ScriptedPolicy(chat_tokenizer, {tuple(prompt_ids): turns})
        runner = EpisodeRunner(policy, Replay(results), chat_tokenizer, Limits(8, 0, 4096, 10_000, thinking))
        params = SamplingParams(1.0, 1.0, 512, ())
        ((trajectory,),), _ = runner.run([Request(tuple(prompt_ids), 1, 0)], [prompt_record], params)
        ids = list(prompt_ids) + list(trajectory.response_ids)
        assert ids == whole.input_ids, (origin, chat_tokenizer.decode(ids, skip_special_tokens=False))
        assert trajectory.finished and trajectory.trajectory.tool_errors == 0
        # trained: the policy's tokens; the whole rendering also trains them, and (thinking off) each turn's empty
        # think block, which in a rollout is the generation prompt's: the only legitimate difference in the mask
        mask = [False] * len(prompt_ids) + list(trajectory.mask)
        empty = chat_tokenizer.encode(EMPTY_THINK, add_special_tokens=False).ids
        for position, (ours, template) in enumerate(zip(mask, whole.loss_mask, strict=True)):
            if ours != bool(template):
                assert not thinking and not ours and ids[position] in empty, (origin, position)
        policy_tokens = [t for t, m in zip(trajectory.response_ids, trajectory.mask, strict=True) if m]
        assert sum(len(chat_tokenizer.encode(t, add_special_tokens=False).ids) for t in turns) == len(policy_tokens)


def test_the_policys_own_text_is_kept_as_sampled_where_the_template_would_rewrite_it(chat_tokenizer):
    """A legitimate difference: the template re-serialises a call from its parsed arguments; the rollout keeps the
    ids the engine sampled (here an argument with spaces around it, and two newlines before the call)."""
    record = {"tools": [_tool("lookup", key="string")], "messages": [{"role": "user", "content": "Beijing"}]}
    prompt_record, _ = prompt_from_record(record, Origin("<test>", 1))
    prompt_ids = render_prompts([prompt_record], chat_tokenizer, thinking=False)[0]
    sampled = (
        "\n\n<tool_call>lookup\n<arg_key>key</arg_key>\n<arg_value>Beijing</arg_value>\n</tool_call><|observation|>"
    )
    policy = ScriptedPolicy(chat_tokenizer, {tuple(prompt_ids): [sampled, "\nsunny<|endoftext|>"]})
    runner = EpisodeRunner(policy, Replay(["sunny"]), chat_tokenizer, Limits(4, 0, 4096, 1000, False))
    ((trajectory,),), _ = runner.run([Request(tuple(prompt_ids), 1, 0)], [prompt_record], SamplingParams(1, 1, 64, ()))
    final = {**record, "messages": [*record["messages"],
             {"role": "assistant", "content": "", "tool_calls": [_call_record("lookup", key="Beijing")]},
             {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "sunny"}]}  # fmt: skip
    template = tokenize_rendered(
        [render_text(parse_record(final, Origin("<t>", 1)), RenderOptions(False))], chat_tokenizer
    )[0]
    ours = chat_tokenizer.decode(list(prompt_ids) + list(trajectory.response_ids), skip_special_tokens=False)
    assert ours != template.text and ours.replace("\n\n<tool_call>", "\n<tool_call>") == template.text
    assert trajectory.trajectory.tool_calls == 1 and trajectory.finished


def _call_record(name: str, **arguments: str) -> dict:
    return {"function": {"name": name, "arguments": arguments}}


def _tool(name: str, **params: str) -> dict:
    properties = {key: {"type": kind} for key, kind in params.items()}
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": properties,
            "required": list(params)}}}  # fmt: skip


# --- bad behaviour becomes an observation, counted -------------------------------------------------------------


def hang(seconds: int) -> str:
    import time

    time.sleep(seconds)
    return "late"


def shout(times: int) -> None:
    print("x" * 1000 * times)


def fail(why: str) -> str:
    raise RuntimeError(why)


def echo(text: str, count: int) -> str:
    return text * count


@pytest.fixture(scope="module")
def python_tools():
    names = ("hang", "shout", "fail", "echo")
    config = EnvironmentConfig([f"tests.test_rl_agent_episodes:{name}" for name in names], 1.0, 300)
    tools = PythonTools(config)
    yield tools
    tools.close()


def _call(name: str, **arguments) -> str:
    body = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{v}</arg_value>\n" for k, v in arguments.items())
    return f"\n<tool_call>{name}\n{body}</tool_call>"


BAD_TURNS = {
    "malformed": ("\n<tool_call>echo\n<arg_key>text</arg_key>\n</tool_call>", "expected <arg_key>"),
    "unbalanced": ("\n<tool_call>echo\n", "unbalanced tool calls"),
    "no call": ("\nI will call a tool", "without a <tool_call>"),
    "unknown tool": (_call("rm_rf", path="/"), "rm_rf: unknown function"),
    "missing argument": (_call("echo", text="a"), "missing required argument 'count'"),
    "wrong type": (_call("echo", text="a", count="many"), "'many' is not JSON"),
    "undeclared argument": (_call("echo", text="a", count=1, loud="yes"), "undeclared argument 'loud'"),
    "raises": (_call("fail", why="boom"), "RuntimeError: boom"),
    "hangs": (_call("hang", seconds=30), "did not answer within 1 s"),
    "floods": (_call("shout", times=5000), "[truncated: "),
}


@pytest.mark.parametrize("case", list(BAD_TURNS))
def test_bad_calls_and_bad_tools_become_counted_error_observations(python_tools, chat_tokenizer, case):
    turn, expected = BAD_TURNS[case]
    record = {"messages": [{"role": "user", "content": "go"}]}
    prompt_record, _ = prompt_from_record(record, Origin("<test>", 1))
    prompt_record = replace(prompt_record, tools=python_tools.tools())
    prompt_ids = render_prompts([prompt_record], chat_tokenizer, thinking=False)[0]
    policy = ScriptedPolicy(chat_tokenizer, {tuple(prompt_ids): [turn + "<|observation|>", "\ndone<|endoftext|>"]})
    runner = EpisodeRunner(policy, python_tools, chat_tokenizer, Limits(4, 0, 8192, 300, False))
    ((trajectory,),), _ = runner.run([Request(tuple(prompt_ids), 1, 0)], [prompt_record], SamplingParams(1, 1, 512, ()))
    observation = trajectory.trajectory.messages[1]
    assert observation["role"] == "tool" and expected in observation["content"], observation
    assert len(observation["content"]) < 400  # cut to max_observation_chars (and the note saying so)
    counts = trajectory.trajectory
    assert counts.tool_errors == (case != "floods") and counts.tool_truncations == (case == "floods")
    assert counts.tool_timeouts == (case == "hangs") and trajectory.finished
    assert trajectory.trajectory.messages[-1]["content"].endswith("done<|endoftext|>")


def test_the_worker_is_started_again_after_a_hang_and_good_calls_still_run(python_tools, chat_tokenizer):
    record, _ = prompt_from_record({"messages": [{"role": "user", "content": "go"}]}, Origin("<test>", 1))
    record = replace(record, tools=python_tools.tools())
    prompt_ids = render_prompts([record], chat_tokenizer, thinking=False)[0]
    turns = [_call("hang", seconds=30) + "<|observation|>", _call("echo", text="ab", count=3) + "<|observation|>",
             "\nababab<|endoftext|>"]  # fmt: skip
    policy = ScriptedPolicy(chat_tokenizer, {tuple(prompt_ids): turns})
    runner = EpisodeRunner(policy, python_tools, chat_tokenizer, Limits(4, 0, 8192, 300, False))
    ((trajectory,),), _ = runner.run([Request(tuple(prompt_ids), 1, 0)], [record], SamplingParams(1, 1, 512, ()))
    tool_turns = [m["content"] for m in trajectory.trajectory.messages if m["role"] == "tool"]
    assert "did not answer" in tool_turns[0] and tool_turns[1] == "ababab"
    assert trajectory.trajectory.tool_calls == 2 and trajectory.trajectory.tool_errors == 1


def test_max_turns_and_the_token_budget_cut_an_episode(chat_tokenizer):
    record, _ = prompt_from_record({"messages": [{"role": "user", "content": "go"}]}, Origin("<test>", 1))
    record = replace(record, tools=[_tool("echo", text="string")])
    prompt_ids = tuple(render_prompts([record], chat_tokenizer, thinking=False)[0])
    loop = [_call("echo", text="a") + "<|observation|>"] * 9
    params = SamplingParams(1, 1, 64, ())
    policy = ScriptedPolicy(chat_tokenizer, {prompt_ids: loop})
    for limits, cut in ((Limits(3, 0, 8192, 100, False), "max_turns"), (Limits(9, 60, 8192, 100, False), "budget")):
        runner = EpisodeRunner(policy, Replay(["a"] * 9), chat_tokenizer, limits)
        ((trajectory,),), _ = runner.run([Request(prompt_ids, 1, 0)], [record], params)
        assert trajectory.trajectory.cut == cut and not trajectory.finished
        assert len(trajectory.response_ids) <= (limits.max_tokens or 10**9)
        turns = sum(m["role"] == "assistant" for m in trajectory.trajectory.messages)
        assert turns == 3 if cut == "max_turns" else turns < 9


def test_an_environment_that_raises_is_an_observation(chat_tokenizer):
    class Broken(Replay):
        def start(self, prompt):
            class Episode:
                def act(self, calls):
                    raise ZeroDivisionError("bug in the environment")

                def close(self):
                    pass

            return Episode()

    record, _ = prompt_from_record({"messages": [{"role": "user", "content": "go"}]}, Origin("<test>", 1))
    record = replace(record, tools=[_tool("echo", text="string")])
    prompt_ids = tuple(render_prompts([record], chat_tokenizer, thinking=False)[0])
    policy = ScriptedPolicy(
        chat_tokenizer, {prompt_ids: [_call("echo", text="a") + "<|observation|>", "\nok<|endoftext|>"]}
    )
    runner = EpisodeRunner(policy, Broken([]), chat_tokenizer, Limits(4, 0, 8192, 300, False))
    ((trajectory,),), _ = runner.run([Request(prompt_ids, 1, 0)], [record], SamplingParams(1, 1, 64, ()))
    assert "the environment failed: ZeroDivisionError" in trajectory.trajectory.messages[1]["content"]
    assert trajectory.finished and trajectory.trajectory.tool_errors == 1


# --- the code interpreter's sandbox ----------------------------------------------------------------------------

PROGRAMS = {
    "writes outside": ("open('/tmp/glm45-sandbox-escape', 'w').write('x')", "outside the working directory", False),
    "fork bomb": ("import os\nwhile True:\n    os.fork()", "os.fork is not allowed", False),
    "shell": ("import subprocess\nsubprocess.run(['ls'])", "subprocess.Popen is not allowed", False),
    "network": ("import socket\nsocket.create_connection(('10.0.0.1', 80), timeout=1)", "socket", False),
    "allocates": ("x = bytearray(4 << 30)", "MemoryError", False),
    "spins": ("while True:\n    pass", "", True),  # the CPU limit or the wall clock, whichever comes first
    "sleeps": ("import time\ntime.sleep(60)", "wall-clock limit", True),
    "floods": ("while True:\n    print('x' * 10000)", "MB limit", False),
}


@pytest.fixture(scope="module")
def interpreter():
    from glm45_train.rl.agent.code_interpreter import CodeInterpreter

    return CodeInterpreter(EnvironmentConfig([], 3.0, 300, {"memory_mb": 256, "cpu_s": 2, "file_mb": 1}))


def _program(code: str):
    from glm45_train.data.tool_calls import ParsedCall

    return ParsedCall("python", [("code", code)])


@pytest.mark.parametrize("case", list(PROGRAMS))
def test_the_sandbox_stops_and_reports_what_a_program_must_not_do(interpreter, case):
    code, expected, timed_out = PROGRAMS[case]
    episode = interpreter.start(None)
    try:
        (result,) = episode.act([_program(code)]).results
    finally:
        episode.close()
    assert result.error and expected in result.text, result.text
    assert result.timed_out == timed_out or case == "spins"
    assert len(result.text) < 600
    assert not __import__("os").path.exists("/tmp/glm45-sandbox-escape")


def test_files_persist_within_an_episode_and_the_directory_goes_with_it(interpreter):
    episode = interpreter.start(None)
    directory = episode.directory
    first = episode.act([_program("open('notes.txt', 'w').write('kept')\nprint('written')")]).results[0]
    second = episode.act([_program("print(open('notes.txt').read())")]).results[0]
    episode.close()
    assert (first.text, second.text) == ("written\n", "kept\n") and not first.error
    assert not directory.exists()


def test_tool_schemas_come_from_type_hints_and_unusable_hints_are_named():
    from glm45_train.errors import UserError
    from glm45_train.rl.agent.tool_schema import schema_of

    def search(query: str, limit: int = 5, mode: Literal["fast", "deep"] = "fast", tags: list[str] | None = None):
        """Search the index.

        Longer text the schema leaves out."""

    function = schema_of(search, "search", "rl.environment.tools[0]")["function"]
    assert function["description"] == "Search the index."
    assert function["parameters"]["properties"] == {
        "query": {"type": "string"}, "limit": {"type": "integer"}, "mode": {"enum": ["fast", "deep"]},
        "tags": {"type": "array"},
    }  # fmt: skip
    assert function["parameters"]["required"] == ["query"]

    def bad(when: complex) -> str:
        return ""

    with pytest.raises(UserError, match=r"rl.environment.tools\[0\]: tool 'bad': parameter 'when': type"):
        schema_of(bad, "bad", "rl.environment.tools[0]")
