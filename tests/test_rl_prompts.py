"""RL prompt sets: data/'s inputs and checks, bad lines reported by line, and prompt ids equal to the official
template's rendering with the generation prompt (thinking on and off)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chat_cases import CASES  # tests/ is on sys.path under pytest
from test_chat_render import template_messages

from glm45_train.data.conversation import DataError, Origin, Reason
from glm45_train.errors import UserError
from glm45_train.rl.prompts import PromptRecord, load_prompts, prompt_from_record, render_prompt, render_prompts

DATA = Path(__file__).parent / "data"
BAD = DATA / "rl_prompts_bad.jsonl"
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "rl_prompts_sample.jsonl"
EXPECTED_DROPPED = [
    (2, Reason.MALFORMED_JSON),
    (4, Reason.LAST_TURN_NOT_PROMPT),
    (5, Reason.WRONG_TYPE),
    (6, Reason.WRONG_TYPE),
    (9, Reason.LAST_TURN_NOT_PROMPT),
    (11, Reason.UNKNOWN_ROLE),
]


def test_bad_records_are_reported_by_line_and_reason():
    prompts = load_prompts([BAD])
    dropped = [(problem["line"], Reason(problem["reason"])) for problem in prompts.report.problems]
    assert dropped == EXPECTED_DROPPED
    assert all(problem["source"] == str(BAD) for problem in prompts.report.problems)
    assert [record.origin.line for record in prompts] == [1, 3, 8, 10, 12]
    report = prompts.report.to_json()
    assert report["records"] == {"read": 11, "kept": 5, "dropped": 6}  # the blank line 7 is no record
    assert report["dropped_by_reason"] == {
        "malformed_json": 1,
        "last_turn_not_prompt": 2,
        "wrong_type": 2,
        "unknown_role": 1,
    }
    assert report["final_turns_removed"] == 2
    details = {problem["line"]: problem["detail"] for problem in prompts.report.problems}
    assert "'answer' is list" in details[5]
    assert "ends with a assistant message before its final assistant turn" in details[9]
    assert "ends with a system message" in details[4]


def test_on_error_fail_names_the_first_bad_line():
    with pytest.raises(DataError, match=rf"^{BAD}:2: malformed_json"):
        load_prompts([BAD], on_error="fail")
    with pytest.raises(UserError, match="on_error 'drop'"):
        load_prompts([BAD], on_error="drop")  # type: ignore[arg-type]


def test_prompt_fields_answer_extra_tools():
    by_line = {record.origin.line: record for record in load_prompts([BAD])}
    assert by_line[1].messages == [{"role": "user", "content": "What is 7 × 6?"}]
    assert (by_line[1].answer, by_line[1].tools, by_line[1].extra) == ("42", None, {})
    # Final assistant turn removed; with no answer field its answer (reasoning split off, stripped) is the answer.
    assert by_line[3].messages == [{"role": "user", "content": "Half of 1?"}]
    assert by_line[3].answer == "The answer is \\boxed{\\frac{1}{2}}."
    # Other fields land in extra (null ones count as absent); the tool schema is kept.
    assert by_line[8].extra == {"word": "Oslo", "tests": ["assert 1"]}
    assert by_line[8].tools is not None and by_line[8].tools[0]["function"]["name"] == "get_weather"
    assert by_line[8].messages[0] == {"role": "system", "content": "Use tools."}
    # A prompt may end with a tool result; a numeric answer becomes its string.
    assert by_line[10].messages[-1]["role"] == "tool"
    assert by_line[10].messages[1]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": {"city": "Rome"},
    }
    assert by_line[10].answer == "25"
    # The answer field wins over the removed final turn.
    assert (by_line[12].answer, len(by_line[12].messages)) == ("7", 1)


def test_answer_field_option(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "1+1?"}], "solution": 2, "answer": "x"}) + "\n"
    )
    (record,) = load_prompts([path], answer_field="solution")
    assert record.answer == "2"
    assert record.extra == {"answer": "x"}  # not the chosen field: an ordinary extra field


def test_no_usable_prompt_is_an_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"messages": [{"role": "system", "content": "only"}]}\nnot json\n')
    with pytest.raises(UserError, match=r"no usable prompts.*last_turn_not_prompt: 1, malformed_json: 1"):
        load_prompts([path])


def test_other_input_formats_give_the_same_prompts(tmp_path):
    """The readers are data/'s: a JSON array and a Parquet table of the same records give the same prompts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    as_json = tmp_path / "p.json"
    as_json.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    # Tables keep tools as JSON strings (data/README.md: Arrow would merge differing structs with nulls).
    table = [{**r, "tools": json.dumps(r["tools"], ensure_ascii=False)} if "tools" in r else r for r in records]
    columns = sorted({key for row in table for key in row})  # from_pylist takes its columns from the first row
    table = [{key: row.get(key) for key in columns} for row in table]
    as_parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(table), as_parquet)
    expected = [(r.messages, r.tools, r.answer, r.extra) for r in load_prompts([SAMPLE]).records]
    assert len(expected) == 24
    for path in (as_json, as_parquet):
        records_of_path = load_prompts([path]).records
        assert [(r.messages, r.tools, r.answer, r.extra) for r in records_of_path] == expected, path.suffix
        assert records_of_path[0].origin == Origin(str(path), 1, "row")


def _template_ids(hf_tokenizer, messages, tools, thinking: bool) -> list[int]:
    ids = hf_tokenizer.apply_chat_template(
        template_messages({"messages": messages}),
        tools=tools,
        add_generation_prompt=True,
        enable_thinking=thinking,
        return_dict=False,
    )
    return list(ids)


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("name", sorted(CASES))
def test_render_prompt_equals_the_template_with_generation_prompt(hf_tokenizer, chat_tokenizer, name, thinking):
    raw = CASES[name]
    prompt, removed = prompt_from_record(raw, Origin(name, 1))
    raw_messages = raw["messages"][:-1] if removed else raw["messages"]  # the raw form, not our canonical one
    expected = _template_ids(hf_tokenizer, raw_messages, raw.get("tools"), thinking)
    assert render_prompt(prompt, chat_tokenizer, thinking=thinking) == expected


@pytest.mark.parametrize("thinking", [True, False])
def test_render_prompts_of_the_sample_set(hf_tokenizer, chat_tokenizer, thinking):
    prompts = load_prompts([SAMPLE]).records
    expected = [_template_ids(hf_tokenizer, p.messages, p.tools, thinking) for p in prompts]
    assert render_prompts(prompts, chat_tokenizer, thinking=thinking) == expected


def test_negative_control_generation_prompt_ends_differ_by_thinking(hf_tokenizer, chat_tokenizer):
    """The comparison can fail: the two modes give different ids, ending as the template says."""
    prompt = load_prompts([SAMPLE]).records[0]
    on = render_prompt(prompt, chat_tokenizer, thinking=True)
    off = render_prompt(prompt, chat_tokenizer, thinking=False)
    assert on != off
    assert hf_tokenizer.decode(on).endswith("Put the final answer in \\boxed{}.<|assistant|>")
    assert hf_tokenizer.decode(off).endswith("\\boxed{}./nothink<|assistant|>\n<think></think>")
    assert on != _template_ids(hf_tokenizer, prompt.messages, None, False)


def test_render_refuses_a_record_that_is_not_a_prompt(chat_tokenizer):
    record = PromptRecord(
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        origin=Origin("made.jsonl", 7),
    )
    with pytest.raises(DataError, match=r"made\.jsonl:7: last_turn_not_prompt"):
        render_prompt(record, chat_tokenizer, thinking=True)
