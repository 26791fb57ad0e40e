"""`data prepare --workers N`: the same bytes and report as one process, the first error in file order, and
chunking that parses exactly what sources.py parses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glm45_train.data.chat import parse_mode
from glm45_train.data.chunks import iter_chunks, progress_total
from glm45_train.data.conversation import DataError
from glm45_train.data.prepare import PrepareOptions, default_workers, prepare_dataset
from glm45_train.data.sources import iter_conversations
from glm45_train.data.workers import _conversations
from glm45_train.errors import UserError

DATA = Path(__file__).parent / "data"
SAMPLE_DATA = Path(__file__).resolve().parents[1] / "data" / "sample_distill.jsonl"
GOOD = '{"messages": [{"role": "user", "content": "q%d"}, {"role": "assistant", "content": "a%d"}]}'
LONG = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "%s"}]}' % ("long " * 1000)


def _prepare(tokenizer_dir, out, inputs, **options):
    options = {"max_length": 512, "show_progress": False, "chunk_size": 8, **options}
    return prepare_dataset(inputs, tokenizer_dir, out, PrepareOptions(**options))


def _files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_two_workers_write_the_same_bytes_as_one(tiny_tokenizer_dir, tmp_path):
    """Many chunks over two processes: dropped, changed (mode, truncation) and kept samples in every chunk."""
    again = tmp_path / "again.jsonl"
    again.write_bytes(SAMPLE_DATA.read_bytes())
    inputs = [SAMPLE_DATA, DATA / "bad_records.jsonl", again]
    options = {"mode": parse_mode("mixed:0.5"), "pack": True, "overlong": "truncate", "max_length": 300}
    _prepare(tiny_tokenizer_dir, tmp_path / "one", inputs, workers=1, **options)
    _prepare(tiny_tokenizer_dir, tmp_path / "two", inputs, workers=2, **options)
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert one == two
    report = json.loads(one["report.json"])
    actions = {(p["action"], p["reason"]) for p in report["problems"]}
    assert {("dropped", "malformed_json"), ("changed", "truncated"), ("changed", "reasoning_removed")} <= actions
    lines = [(p["source"], p["line"]) for p in report["problems"] if "line" in p]
    assert lines == sorted(lines, key=lambda p: (inputs.index(Path(p[0])), p[1]))  # file order
    _prepare(tiny_tokenizer_dir, tmp_path / "big_chunks", inputs, workers=1, chunk_size=1000, **options)
    assert _files(tmp_path / "big_chunks") == one  # nor on the chunk size
    _prepare(tiny_tokenizer_dir, tmp_path / "keep", inputs, workers=2, max_length=300)
    assert _files(tmp_path / "keep")["tokens.bin"] != one["tokens.bin"]  # negative control: options do matter


def _lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_first_error_in_file_order_stops_the_run(tiny_tokenizer_dir, tmp_path):
    """Chunks of 4 records: the bad line 7 is in the 2nd chunk, 15 in the 4th; an over-long sample before a bad
    record in the same chunk stops first under overlong="error"."""
    records = [GOOD % (i, i) for i in range(20)]
    records[6] = records[14] = "{not json"
    data = _lines(tmp_path / "in.jsonl", records)
    for workers in (1, 2):
        with pytest.raises(DataError, match=r"in\.jsonl:7: malformed_json"):
            _prepare(tiny_tokenizer_dir, tmp_path / "out", [data], workers=workers, chunk_size=4, on_error="fail")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # nothing written
    records[5] = LONG
    _lines(data, records)
    stop_early = {"workers": 2, "chunk_size": 4, "on_error": "fail"}
    with pytest.raises(DataError, match=r"in\.jsonl:6: overlong"):
        _prepare(tiny_tokenizer_dir, tmp_path / "out", [data], overlong="error", **stop_early)
    with pytest.raises(DataError, match=r"in\.jsonl:7: malformed_json"):  # negative control: overlong allowed
        _prepare(tiny_tokenizer_dir, tmp_path / "out", [data], **stop_early)


def _key(item):
    if isinstance(item, DataError):
        return ("error", item.reason, item.detail, item.origin)
    return ("conversation", item)


def test_chunks_parse_exactly_what_sources_parse(tmp_path):
    """Workers decode JSONL lines themselves (fast path + json.loads): same records and errors as sources.py."""
    tricky = [
        GOOD % (1, 1),
        "  " + GOOD % (2, 2),  # leading whitespace
        GOOD % (3, 3) + " \u3000",  # trailing (Unicode) whitespace
        "\ufeff" + GOOD % (4, 4),  # a BOM inside the file
        GOOD % (5, 5) + " {}",  # extra data
        "[1, 2]",
        '"text"',
        "",  # blank line: skipped, not a record
        "{",
    ]
    data = _lines(tmp_path / "tricky.jsonl", tricky)
    with data.open("ab") as handle:
        handle.write(b'{"messages": "\xff"}\n')  # not UTF-8
    files = [data, DATA / "bad_records.jsonl", SAMPLE_DATA]
    expected = [_key(item) for item in iter_conversations(files)]
    for size in (1, 3, 1000):
        chunks = list(iter_chunks(files, size))
        assert [_key(item) for chunk in chunks for item in _conversations(chunk)] == expected
        assert sum(chunk.progress for chunk in chunks) == progress_total(files)


def test_parquet_chunks_cover_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [json.loads(line) for line in SAMPLE_DATA.read_text(encoding="utf-8").splitlines()[:10]]
    table = pa.table({"messages": [json.dumps(r["messages"]) for r in records]})
    pq.write_table(table, tmp_path / "t.parquet")
    chunks = list(iter_chunks([tmp_path / "t.parquet"], 3))
    assert [len(c.records) for c in chunks] == [3, 3, 3, 1]
    assert sum(c.progress for c in chunks) == (tmp_path / "t.parquet").stat().st_size


def test_worker_count_is_checked():
    assert 1 <= default_workers() <= 32
    with pytest.raises(UserError, match="workers 0: must be at least 1"):
        PrepareOptions(max_length=64, workers=0).check()


def test_worker_processes_start_without_torch():
    """Spawned workers import the caller's main module (the CLI) and workers.py: neither may load torch (~1 s
    a worker, which is most of a small corpus's time)."""
    import subprocess
    import sys

    code = "import sys, glm45_train.cli.main, glm45_train.data.prepare; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
