"""Inputs → conversations: all formats agree; every bad record is a typed error with its line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glm45_train.data.chat import check_trainable
from glm45_train.data.conversation import DataError, Message, Origin, Reason, ToolCall
from glm45_train.data.sources import iter_conversations, iter_records, parse_record, source_kind
from glm45_train.errors import UserError

DATA = Path(__file__).parent / "data"
BAD_RECORDS = DATA / "bad_records.jsonl"
SAMPLE_DATA = Path(__file__).resolve().parents[1] / "data" / "sample_distill.jsonl"
EXPECTED_PROBLEMS = [
    (2, Reason.MALFORMED_JSON),
    (3, Reason.UNKNOWN_ROLE),
    (4, Reason.NO_ASSISTANT_TURN),
    (5, Reason.EMPTY_ASSISTANT),
    (6, Reason.WRONG_TYPE),
    (7, Reason.WRONG_TYPE),
    (8, Reason.WRONG_TYPE),
    (9, Reason.TOOL_RESPONSE_WITHOUT_CALL),
    (10, Reason.LAST_TURN_NOT_ASSISTANT),
    (12, Reason.NO_STOP_AFTER_ASSISTANT),
    (14, Reason.MALFORMED_JSON),
    (15, Reason.WRONG_TYPE),
    (16, Reason.WRONG_TYPE),
]


def _problems(inputs) -> tuple[list[tuple[int, Reason]], list[int]]:
    problems, good = [], []
    for item in iter_conversations(inputs):
        try:
            if isinstance(item, DataError):
                raise item
            check_trainable(item)
            good.append(item.origin.line)
        except DataError as error:
            assert error.origin is not None
            problems.append((error.origin.line, error.reason))
    return problems, good


def _without_origin(conversations):
    return [(c.messages, c.tools) for c in conversations]


def test_every_bad_record_is_reported_with_its_line_and_reason():
    problems, good = _problems([BAD_RECORDS])
    assert problems == EXPECTED_PROBLEMS
    assert good == [1, 13]  # blank line 11 is not a record


def test_error_messages_name_file_line_and_culprit():
    errors = [item for item in iter_conversations([BAD_RECORDS]) if isinstance(item, DataError)]
    messages = [str(e) for e in errors]
    assert messages[0].startswith(f"{BAD_RECORDS}:2: malformed_json:")
    assert f"{BAD_RECORDS}:3: unknown_role: message 1 has role 'bot'" in messages[1]
    assert isinstance(errors[0], UserError)


def test_invalid_utf8_is_malformed(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"messages": []}\n{"messages": "\xff\xfe"}\n')
    problems, _ = _problems([path])
    assert problems == [(1, Reason.WRONG_TYPE), (2, Reason.MALFORMED_JSON)]


def test_ms_swift_agent_roles_become_assistant_tool_calls():
    record = json.loads(BAD_RECORDS.read_text(encoding="utf-8").splitlines()[12])
    conversation = parse_record(record, Origin("x", 13))
    assert conversation.tools == ({"name": "get_weather", "parameters": {}},)
    assert [m.role for m in conversation.messages] == ["user", "assistant", "tool", "assistant"]
    assert conversation.messages[1] == Message("assistant", "", None, (ToolCall("get_weather", {"city": "Oslo"}),))


def test_parallel_swift_tool_calls_join_one_assistant_turn():
    call = {"role": "tool_call", "content": {"name": "f", "arguments": '{"a": 1}'}}
    record = {
        "messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": "Calling."},
            call,
            call,
            {"role": "tool_response", "content": "1"},
            {"role": "tool_response", "content": "2"},
            {"role": "assistant", "content": "Done."},
        ]
    }
    messages = parse_record(record, Origin("x", 1)).messages
    assert [m.role for m in messages] == ["user", "assistant", "tool", "tool", "assistant"]
    assert messages[1].content == "Calling." and messages[1].tool_calls == (ToolCall("f", {"a": 1}),) * 2


def test_canonical_form_of_content_reasoning_and_arguments():
    record = {
        "messages": [
            {
                "role": "user",
                "content": ["a", {"type": "text", "text": "b"}, {"type": "image_url", "url": "u"}],
            },
            {
                "role": "assistant",
                "content": None,
                "reasoning_content": None,
                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"x": [1]}'}}],
                "loss": True,
            },
            {"role": "tool", "content": [{"type": "text", "text": "out"}]},
            {"role": "assistant", "content": "end", "reasoning_content": "why"},
        ]
    }
    user, call, tool, answer = parse_record(record, Origin("x", 1)).messages
    assert user == Message("user", "ab")
    assert call == Message("assistant", "", None, (ToolCall("f", {"x": [1]}),))
    assert tool == Message("tool", "out")
    assert answer == Message("assistant", "end", "why")


def test_sample_data_has_what_the_readme_promises():
    problems, good = _problems([SAMPLE_DATA])
    assert problems == [] and len(good) >= 36
    conversations = list(iter_conversations([SAMPLE_DATA]))
    texts = " ".join(m.content for c in conversations for m in c.messages)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in texts) and "the" in texts
    assert sum(any(m.reasoning for m in c.messages) for c in conversations) >= 6
    assert sum(any("</think>" in m.content for m in c.messages) for c in conversations) >= 4
    assert sum(bool(c.tools) and any(m.role == "tool" for m in c.messages) for c in conversations) >= 4
    assert sum(sum(m.role == "user" for m in c.messages) > 1 for c in conversations) >= 4
    assert sum(c.messages[0].role == "system" for c in conversations) >= 3


def _table_records(path: Path) -> list[dict]:
    """Records as tables store them: tools and tool-call arguments as JSON strings (ms-swift does too)."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        for message in record["messages"]:
            for call in message.get("tool_calls", []):
                call["function"]["arguments"] = json.dumps(call["function"]["arguments"], ensure_ascii=False)
        record["tools"] = json.dumps(record.get("tools", []), ensure_ascii=False)
        records.append(record)
    return records


def test_json_parquet_and_saved_datasets_give_the_same_conversations(tmp_path):
    import datasets

    records = _table_records(SAMPLE_DATA)
    expected = _without_origin(iter_conversations([SAMPLE_DATA]))
    (tmp_path / "array.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    table = datasets.Dataset.from_list(records)
    table.to_parquet(str(tmp_path / "table.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved_dict"))
    for name in ("array.json", "lines.json", "table.parquet", "saved", "saved_dict"):
        items = list(iter_conversations([tmp_path / name]))
        assert not [i for i in items if isinstance(i, DataError)], name
        assert _without_origin(items) == expected, name
    origins = [item.origin for item in iter_conversations([tmp_path / "table.parquet"])]
    assert str(origins[2]) == f"{tmp_path / 'table.parquet'} row 3"


def test_source_kinds_and_missing_inputs(tmp_path):
    assert source_kind("swift/Chinese-Qwen3-235B-2507-Distill-data-110k-SFT") == "modelscope"
    assert source_kind("owner/name:subset") == "modelscope"
    assert source_kind(tmp_path) == "saved_dataset"
    assert source_kind("x.JSONL") == "jsonl" and source_kind("x.parquet") == "parquet"
    with pytest.raises(UserError, match=r"notes\.txt: not a \.jsonl"):
        source_kind("notes.txt")
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl: input does not exist"):
        list(iter_records(tmp_path / "missing.jsonl"))
