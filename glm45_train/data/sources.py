"""Input data → `Conversation`s: JSONL / JSON / Parquet files, saved `datasets` dirs, ModelScope dataset IDs.

Notable:
- Records use ms-swift's messages format: `{"messages": [...], "tools": [...] | "<json>"}` with roles system
  / user / assistant / tool, assistant `reasoning_content` and OpenAI-style `tool_calls`. ms-swift's own
  agent roles are accepted too: a `tool_call` message (content `{"name", "arguments"}`) joins the assistant
  turn before it (or opens one), `tool_response` is a `tool` message.
- Nothing is dropped silently: `iter_conversations` yields either a `Conversation` or a `DataError` with the
  reason and the record's line (JSONL) or row (tables); the caller decides to skip or stop.
- Errors name messages by their 0-based position in the record's `messages` list.
- Keys whose value is null count as absent (Arrow tables fill missing struct fields with null).
- A spec that names no existing path but looks like `owner/name[:subset]` is loaded from ModelScope
  (network).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from glm45_train.data.conversation import ROLES, Conversation, DataError, Message, Origin, Reason, ToolCall
from glm45_train.errors import UserError

SWIFT_ROLE_ALIASES = {"tool_response": "tool"}
JSONL_SUFFIXES = (".jsonl", ".ndjson")
MODELSCOPE_ID = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+)?$")

RecordOrError = tuple[Origin, Any] | DataError


def iter_conversations(inputs: Sequence[str | Path]) -> Iterator[Conversation | DataError]:
    """Every record of every input, parsed; bad records come out as `DataError`s carrying their origin."""
    for spec in inputs:
        for item in iter_records(spec):
            if isinstance(item, DataError):
                yield item
                continue
            origin, record = item
            try:
                yield parse_record(record, origin)
            except DataError as error:
                yield error


def check_inputs(inputs: Sequence[str | Path]) -> None:
    """Fail before any work if an input is missing or of an unknown kind (ModelScope IDs are checked on load)."""
    if not inputs:
        raise UserError("no input given")
    for spec in inputs:
        if source_kind(spec) != "modelscope" and not Path(spec).exists():
            raise FileNotFoundError(f"{spec}: input does not exist")


def source_kind(spec: str | Path) -> str:
    """'jsonl', 'json', 'parquet', 'saved_dataset' or 'modelscope' — how `spec` will be read."""
    path = Path(spec)
    if path.is_dir():
        return "saved_dataset"
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix == ".parquet":
        return "parquet"
    if not path.exists() and MODELSCOPE_ID.match(str(spec)):
        return "modelscope"
    raise UserError(f"{spec}: not a .jsonl/.json/.parquet file, a saved datasets directory or a ModelScope ID")


def iter_records(spec: str | Path) -> Iterator[RecordOrError]:
    """Raw records of one input with their origins (malformed JSON lines come out as errors)."""
    kind = source_kind(spec)
    if kind == "modelscope":
        yield from _rows(_load_modelscope(str(spec)), str(spec))
        return
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{path}: input does not exist")
    if kind == "jsonl":
        yield from _jsonl_records(path)
    elif kind == "json":
        yield from _json_records(path)
    elif kind == "parquet":
        yield from _parquet_records(path)
    else:
        yield from _rows(_load_saved_dataset(path), str(path))


UTF8_BOM = b"\xef\xbb\xbf"


def jsonl_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of every line, a leading UTF-8 byte-order mark removed (editors on
    Windows write one; it made the first record malformed JSON)."""
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            yield line_number, raw.removeprefix(UTF8_BOM) if line_number == 1 else raw


def _jsonl_records(path: Path) -> Iterator[RecordOrError]:
    for line_number, raw in jsonl_lines(path):
        if not raw.strip():
            continue
        origin = Origin(str(path), line_number)
        try:
            yield origin, json.loads(raw.decode("utf-8").rstrip())
        except UnicodeDecodeError as exc:
            yield DataError(Reason.MALFORMED_JSON, f"not valid UTF-8 ({exc.reason})", origin)
        except json.JSONDecodeError as exc:
            yield DataError(Reason.MALFORMED_JSON, f"{exc.msg} at column {exc.colno}", origin)


def _json_records(path: Path) -> Iterator[RecordOrError]:
    text = path.read_text(encoding="utf-8-sig")
    if not text.lstrip().startswith("["):
        yield from _jsonl_records(path)  # JSON lines saved under a .json name
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        yield DataError(Reason.MALFORMED_JSON, f"{exc.msg} (JSON array file)", Origin(str(path), exc.lineno))
        return
    for index, record in enumerate(records, start=1):
        yield Origin(str(path), index, "row"), record


def _parquet_records(path: Path) -> Iterator[RecordOrError]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield Origin(str(path), row, "row"), record


def _rows(table: Iterable[Any], name: str) -> Iterator[RecordOrError]:
    for index, record in enumerate(table, start=1):
        yield Origin(name, index, "row"), record


def _load_saved_dataset(path: Path) -> Any:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        return _pick_split(loaded, str(path))
    return loaded


def _pick_split(splits: Any, name: str) -> Any:
    if "train" in splits:
        return splits["train"]
    if len(splits) == 1:
        return next(iter(splits.values()))
    raise UserError(f"{name}: several splits ({', '.join(splits)}) and none is 'train'")


def _load_modelscope(spec: str) -> Any:
    from modelscope.msdatasets import MsDataset

    dataset_id, _, subset = spec.partition(":")
    try:
        loaded = MsDataset.load(dataset_id, subset_name=subset or None, split="train")
    except Exception as exc:  # modelscope raises many types; the message must name the spec
        raise UserError(f"{spec}: not a local path, and loading it from ModelScope failed: {exc}") from exc
    return loaded.to_hf_dataset() if hasattr(loaded, "to_hf_dataset") else loaded


def parse_record(record: Any, origin: Origin) -> Conversation:
    """One ms-swift record → `Conversation`; raises `DataError` (at `origin`) for anything malformed."""
    try:
        if not isinstance(record, dict):
            raise DataError(Reason.WRONG_TYPE, f"record is {_type_name(record)}, expected an object with 'messages'")
        raw_messages = record.get("messages")
        if not isinstance(raw_messages, list) or not raw_messages:
            got = "missing" if raw_messages is None else _type_name(raw_messages)
            raise DataError(Reason.WRONG_TYPE, f"'messages' must be a non-empty list (got {got})")
        messages = _join_swift_tool_calls(raw_messages)
        return Conversation(tuple(messages), _parse_tools(record.get("tools")), origin)
    except DataError as error:
        raise error.at(origin) from None


def _join_swift_tool_calls(raw_messages: list[Any]) -> list[Message]:
    messages: list[Message] = []
    for index, raw in enumerate(raw_messages):
        if isinstance(raw, dict) and raw.get("role") == "tool_call":
            call = _parse_swift_tool_call(raw.get("content"), index)
            if messages and messages[-1].role == "assistant":
                messages[-1] = replace(messages[-1], tool_calls=(*messages[-1].tool_calls, call))
            else:
                messages.append(Message("assistant", tool_calls=(call,)))
        else:
            message = _parse_message(raw, index)
            if message.role == "tool" and not (messages and (messages[-1].role == "tool" or messages[-1].tool_calls)):
                raise DataError(Reason.TOOL_RESPONSE_WITHOUT_CALL, f"message {index} (tool) follows no tool call")
            messages.append(message)
    return messages


def _parse_message(raw: Any, index: int) -> Message:
    if not isinstance(raw, dict):
        raise DataError(Reason.WRONG_TYPE, f"message {index} is {_type_name(raw)}, expected an object")
    role = raw.get("role")
    if not isinstance(role, str):
        raise DataError(Reason.UNKNOWN_ROLE, f"message {index} has no role (got {_type_name(role)})")
    role = SWIFT_ROLE_ALIASES.get(role, role)
    if role not in ROLES:
        expected = ", ".join((*ROLES, "tool_call", "tool_response"))
        raise DataError(Reason.UNKNOWN_ROLE, f"message {index} has role {role!r} (expected one of {expected})")
    content = _text_of(raw.get("content"), f"message {index} content")
    if role != "assistant":
        if raw.get("tool_calls"):
            raise DataError(Reason.WRONG_TYPE, f"message {index} ({role}) has tool_calls; only assistant may")
        return Message(role, content)
    reasoning = raw.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise DataError(Reason.WRONG_TYPE, f"message {index} reasoning_content is {_type_name(reasoning)}")
    calls = tuple(_parse_tool_call(call, index) for call in raw.get("tool_calls") or ())
    return Message(role, content, reasoning, calls)


def _text_of(content: Any, where: str) -> str:
    """Visible text: a string, or the text parts of a list (other parts, e.g. images, carry no text)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError(Reason.WRONG_TYPE, f"{where} is {_type_name(content)}, expected a string or a list of parts")
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text":
            if not isinstance(part.get("text"), str):
                raise DataError(Reason.WRONG_TYPE, f"{where}: a text part has no string 'text'")
            texts.append(part["text"])
        elif not isinstance(part, dict):
            raise DataError(Reason.WRONG_TYPE, f"{where}: a part is {_type_name(part)}")
    return "".join(texts)


def _parse_tool_call(raw: Any, index: int) -> ToolCall:
    if not isinstance(raw, dict):
        raise DataError(Reason.WRONG_TYPE, f"message {index}: a tool call is {_type_name(raw)}")
    function = raw.get("function") or raw
    if not isinstance(function, dict):
        raise DataError(Reason.WRONG_TYPE, f"message {index}: tool call 'function' is {_type_name(function)}")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise DataError(Reason.WRONG_TYPE, f"message {index}: a tool call has no name")
    return ToolCall(name, _arguments_of(function.get("arguments"), index))


def _parse_swift_tool_call(content: Any, index: int) -> ToolCall:
    if isinstance(content, str):
        try:
            content = json.loads(content)
        except json.JSONDecodeError as exc:
            raise DataError(Reason.MALFORMED_JSON, f"message {index} (tool_call) content: {exc.msg}") from None
    return _parse_tool_call(content, index)


def _arguments_of(arguments: Any, index: int) -> dict[str, Any]:
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise DataError(Reason.MALFORMED_JSON, f"message {index}: tool call arguments: {exc.msg}") from None
    if not isinstance(arguments, dict):
        raise DataError(Reason.WRONG_TYPE, f"message {index}: tool call arguments are {_type_name(arguments)}")
    return arguments


def _parse_tools(tools: Any) -> tuple[dict[str, Any], ...]:
    if tools is None:
        return ()
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else []
        except json.JSONDecodeError as exc:
            raise DataError(Reason.MALFORMED_JSON, f"'tools': {exc.msg}") from None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise DataError(Reason.WRONG_TYPE, "'tools' must be a list of objects")
    return tuple(tools)


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )
