"""`data prepare` end to end on the sample data: files on disk, report, modes, bad data, over-length."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from glm45_train.cli import data as data_cli
from glm45_train.data.chat import RenderOptions, parse_mode, render_conversation, without_reasoning
from glm45_train.data.conversation import DataError, Reason
from glm45_train.data.pack import pack_first_fit_decreasing
from glm45_train.data.prepare import PrepareOptions, prepare_dataset, render_samples
from glm45_train.data.prepared import load_prepared
from glm45_train.data.sources import iter_conversations
from glm45_train.errors import UserError

BAD_RECORDS = Path(__file__).parent / "data" / "bad_records.jsonl"
SAMPLE_DATA = Path(__file__).resolve().parents[1] / "data" / "sample_distill.jsonl"


def _prepare(tokenizer_dir, out, inputs=None, **options):
    options.setdefault("max_length", 1024)
    options.setdefault("show_progress", False)
    return prepare_dataset(inputs or [SAMPLE_DATA], tokenizer_dir, out, PrepareOptions(**options))


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text(encoding="utf-8"))


def test_samples_on_disk_are_the_rendered_conversations(tiny_tokenizer_dir, chat_tokenizer, tmp_path):
    out = tmp_path / "keep"
    _prepare(tiny_tokenizer_dir, out)
    dataset = load_prepared(out)
    conversations = list(iter_conversations([SAMPLE_DATA]))
    assert len(dataset) == dataset.num_samples == len(conversations)
    for index, conversation in enumerate(conversations):
        expected = render_conversation(conversation, chat_tokenizer)
        ids, trained = dataset.sample(index)
        assert ids.tolist() == expected.input_ids and trained.astype(int).tolist() == expected.loss_mask
    example = dataset[0]
    assert example.labels[:-1].tolist() == example.input_ids[1:].tolist()
    assert example.loss_mask.tolist() == [*dataset.sample(0)[1][1:].astype(float), 0.0]
    metadata = dataset.metadata
    assert (metadata["mode"], metadata["packed"], metadata["max_length"]) == ("keep", False, 1024)
    assert metadata["tokenizer"]["chat_template_is_official"] is True
    assert metadata["pad_token_id"] == chat_tokenizer.token_to_id("<|endoftext|>")


def test_packed_rows_hold_whole_samples(tiny_tokenizer_dir, tmp_path):
    out = tmp_path / "packed"
    report = _prepare(tiny_tokenizer_dir, out, pack=True)
    dataset = load_prepared(out)
    lengths = [len(dataset.sample(i)[0]) for i in range(dataset.num_samples)]
    rows = [dataset.samples_in_row(r) for r in range(len(dataset))]
    assert rows == pack_first_fit_decreasing(lengths, 1024)
    assert len(dataset) < dataset.num_samples
    for r, samples in enumerate(rows):
        example = dataset[r]
        assert example.seq_lengths == tuple(lengths[i] for i in samples)
        assert example.input_ids.tolist() == np.concatenate([dataset.sample(i)[0] for i in samples]).tolist()
        assert len(example.input_ids) <= 1024
    summary = _report(out)
    assert summary["packing"]["real_token_fraction"] == pytest.approx(sum(lengths) / (len(rows) * 1024))
    assert summary["records"] == {"read": 40, "kept": 40, "dropped": 0, "changed": 0}
    assert report.samples_kept == 40


def test_non_thinking_mode_trains_empty_think_and_appends_nothink(tiny_tokenizer_dir, chat_tokenizer, tmp_path):
    out = tmp_path / "non_thinking"
    _prepare(tiny_tokenizer_dir, out, mode=parse_mode("non-thinking"))
    dataset = load_prepared(out)
    think_id, end_think_id = chat_tokenizer.token_to_id("<think>"), chat_tokenizer.token_to_id("</think>")
    user_id, nothink_id = chat_tokenizer.token_to_id("<|user|>"), chat_tokenizer.token_to_id("/nothink")
    for index in range(dataset.num_samples):
        ids = dataset.sample(index)[0].tolist()
        starts = [i for i, t in enumerate(ids) if t == think_id]
        assert starts and all(ids[i + 1] == end_think_id for i in starts)  # every think block is empty
        assert ids.count(nothink_id) == ids.count(user_id)  # each user turn carries /nothink
    summary = _report(out)
    assert summary["mode"]["non_thinking_samples"] == 40
    assert summary["changed_by_reason"] == {"reasoning_removed": summary["records"]["changed"]}
    assert summary["records"]["changed"] >= 10
    assert load_prepared(out).metadata["mode"] == "non-thinking"


def test_mixed_mode_is_seeded(tiny_tokenizer_dir, tmp_path):
    counts = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        _prepare(tiny_tokenizer_dir, tmp_path / name, mode=parse_mode("mixed:0.5"), seed=seed)
        counts.append(Path(tmp_path / name / "tokens.bin").read_bytes())
    assert counts[0] == counts[1] and counts[0] != counts[2]
    chosen = _report(tmp_path / "a")["mode"]["non_thinking_samples"]
    assert 5 < chosen < 35
    assert load_prepared(tmp_path / "a").metadata["mode"] == "mixed:0.5"
    with pytest.raises(UserError, match="mode 'mixed:2'"):
        parse_mode("mixed:2")


def test_no_train_empty_think_trains_fewer_tokens(tiny_tokenizer_dir, tmp_path):
    with_think = _prepare(tiny_tokenizer_dir, tmp_path / "a", mode=parse_mode("non-thinking"))
    without = _prepare(tiny_tokenizer_dir, tmp_path / "b", mode=parse_mode("non-thinking"), train_empty_think=False)
    assert without.tokens == with_think.tokens and without.trained_tokens < with_think.trained_tokens


def test_bad_records_are_skipped_and_each_one_reported(tiny_tokenizer_dir, tmp_path):
    out = tmp_path / "bad"
    _prepare(tiny_tokenizer_dir, out, inputs=[BAD_RECORDS])
    summary = _report(out)
    dropped = [(p["line"], p["reason"]) for p in summary["problems"] if p["action"] == "dropped"]
    assert [line for line, _ in dropped] == [2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 15, 16]
    assert summary["records"] == {"read": 15, "kept": 2, "dropped": 13, "changed": 0}
    assert summary["dropped_by_reason"]["wrong_type"] == 5


def test_on_error_fail_stops_at_the_first_bad_line_and_writes_nothing(tiny_tokenizer_dir, tmp_path):
    out = tmp_path / "fail"
    with pytest.raises(DataError, match=r"bad_records.jsonl:2: malformed_json"):
        _prepare(tiny_tokenizer_dir, out, inputs=[BAD_RECORDS], on_error="fail")
    assert list(tmp_path.iterdir()) == []


def test_overlong_policies(tiny_tokenizer_dir, tmp_path):
    dropped = _prepare(tiny_tokenizer_dir, tmp_path / "drop", max_length=200)
    summary = _report(tmp_path / "drop")
    assert summary["dropped_by_reason"] == {"overlong": 40 - dropped.samples_kept} and dropped.samples_kept < 40
    truncated = _prepare(tiny_tokenizer_dir, tmp_path / "cut", max_length=200, overlong="truncate")
    cut = _report(tmp_path / "cut")
    changes = [p for p in cut["problems"] if p["reason"] == "truncated"]
    # Truncation keeps a sample unless nothing trained is left in the first 200 tokens (then it is dropped).
    assert truncated.samples_kept + cut["dropped_by_reason"].get("overlong", 0) == 40
    assert truncated.samples_kept > dropped.samples_kept
    assert len(changes) == cut["records"]["changed"] == truncated.samples_kept - dropped.samples_kept
    assert all("trained tokens removed" in p["detail"] for p in changes)
    assert truncated.max_sample_tokens == 200
    with pytest.raises(DataError, match=r"sample_distill.jsonl:\d+: overlong: \d+ tokens > max_length 200"):
        _prepare(tiny_tokenizer_dir, tmp_path / "error", max_length=200, overlong="error")


def test_a_huge_line_is_dropped_by_its_length_before_it_is_tokenized(tiny_tokenizer_dir, tmp_path):
    """A 42 MB line once cost 5.9 GB of tokenizer memory before being dropped as over-length; a sample whose text
    has more bytes than max_length tokens can cover is now refused untokenized (drop and error), while truncate
    still tokenizes it to keep its first max_length tokens (control)."""
    huge = {"messages": [{"role": "user", "content": "Q " * 400_000}, {"role": "assistant", "content": "A."}]}
    data = tmp_path / "huge.jsonl"
    data.write_text(SAMPLE_DATA.read_text() + json.dumps(huge) + "\n")
    kept = _prepare(tiny_tokenizer_dir, tmp_path / "drop", inputs=[data], max_length=1024)
    problem = _report(tmp_path / "drop")["problems"][-1]
    assert (problem["line"], problem["reason"], kept.samples_kept) == (41, "overlong", 40)
    assert problem["detail"] == "800,066 bytes of text: more than max_length 1024 tokens (not tokenized)"
    with pytest.raises(DataError, match=r"huge.jsonl:41: overlong: 800,066 bytes of text"):
        _prepare(tiny_tokenizer_dir, tmp_path / "error", inputs=[data], max_length=1024, overlong="error")
    _prepare(tiny_tokenizer_dir, tmp_path / "cut", inputs=[data], max_length=1024, overlong="truncate")
    assert "tokens > max_length 1024" in _report(tmp_path / "cut")["problems"][-1]["detail"]


def test_output_dir_is_replaced_only_with_overwrite_and_only_if_it_is_a_prepared_dataset(tiny_tokenizer_dir, tmp_path):
    """Re-preparing into a dataset a run trains on once replaced it silently (a resumed run then trained on the
    new data): now only with --overwrite, and never a folder that is not a prepared dataset."""
    out = tmp_path / "out"
    _prepare(tiny_tokenizer_dir, out)
    with pytest.raises(FileExistsError, match=r"out: already holds a prepared dataset .*pass --overwrite"):
        _prepare(tiny_tokenizer_dir, out, pack=True)
    assert load_prepared(out).metadata["packed"] is False  # untouched
    _prepare(tiny_tokenizer_dir, out, pack=True, overwrite=True)
    assert load_prepared(out).metadata["packed"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="precious: exists and is not a prepared dataset"):
        _prepare(tiny_tokenizer_dir, precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_render_samples_thinking_off_is_the_non_thinking_mode(tiny_tokenizer_dir, chat_tokenizer):
    rendered = list(render_samples([SAMPLE_DATA], tiny_tokenizer_dir, RenderOptions(thinking=False)))
    expected = [
        render_conversation(without_reasoning(c)[0], chat_tokenizer, RenderOptions(thinking=False))
        for c in iter_conversations([SAMPLE_DATA])
    ]
    assert rendered == expected
    with pytest.raises(DataError) as error:
        list(render_samples([BAD_RECORDS], tiny_tokenizer_dir, RenderOptions()))
    assert error.value.reason == Reason.MALFORMED_JSON and error.value.origin.line == 2


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="glm45-train")
    data_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_render_and_prepare(tiny_tokenizer_dir, tmp_path, capsys):
    assert _cli("data", "render", str(SAMPLE_DATA), "--tokenizer", str(tiny_tokenizer_dir), "--thinking", "off") == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 40 and set(lines[0]) == {"text", "input_ids", "loss_mask"}
    assert lines[0]["text"].startswith("[gMASK]<sop><|user|>") and "/nothink" in lines[0]["text"]
    out = tmp_path / "prepared"
    argv = [
        "data",
        "prepare",
        str(SAMPLE_DATA),
        "--tokenizer",
        str(tiny_tokenizer_dir),
        "--output-dir",
        str(out),
    ]
    argv += [
        "--max-length",
        "512",
        "--mode",
        "mixed:0.3",
        "--pack",
        "--overlong",
        "truncate",
        "--no-progress",
        "--workers",
        "2",
    ]
    assert _cli(*argv) == 0
    printed = capsys.readouterr().out
    assert f"into {out}" in printed and "report.json" in printed
    assert load_prepared(out).metadata["mode"] == "mixed:0.3"
    with pytest.raises(DataError, match=r"bad_records\.jsonl:2"):
        _cli("data", "render", str(BAD_RECORDS), "--tokenizer", str(tiny_tokenizer_dir))


def test_tokenizer_dir_must_hold_a_glm_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE()).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match=r"not a GLM-4.5 tokenizer.*\[gMASK\]"):
        _prepare(tmp_path, tmp_path / "out")
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def test_metadata_says_whether_the_tokenizer_ships_the_official_template(tiny_tokenizer_dir, tmp_path):
    tokenizer_dir = tmp_path / "tokenizer"
    shutil.copytree(tiny_tokenizer_dir, tokenizer_dir)
    (tokenizer_dir / "chat_template.jinja").unlink()  # the template then comes from tokenizer_config.json
    _prepare(tokenizer_dir, tmp_path / "a")
    assert load_prepared(tmp_path / "a").metadata["tokenizer"]["chat_template_is_official"] is True
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = config["chat_template"].replace("/nothink", "/no_think")
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    _prepare(tokenizer_dir, tmp_path / "b")
    assert load_prepared(tmp_path / "b").metadata["tokenizer"]["chat_template_is_official"] is False


def test_missing_inputs_fail_before_any_work(tiny_tokenizer_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.jsonl: input does not exist"):
        _prepare(tiny_tokenizer_dir, tmp_path / "out", inputs=[SAMPLE_DATA, tmp_path / "nowhere.jsonl"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["keep", "non-thinking", "mixed:0.5"])
def test_reasoning_left_in_the_answer_is_refused_in_every_mode(tiny_tokenizer_dir, chat_tokenizer, tmp_path, mode):
    """A reasoning field plus an inline think block (the template keeps the inline one as answer text) would train
    reasoning even in non-thinking mode: such records are dropped by line, the clean ones kept."""

    def answered(**assistant):
        return {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", **assistant}]}

    records = [
        answered(content="The answer is 4."),
        answered(reasoning_content="FIELD", content="<think>INLINE</think>The answer is 4."),
        answered(content="<think>A</think>x<think>B</think>4"),  # the template would drop "x<think>B" silently
        answered(content="<think>OK</think>4"),
    ]
    source = tmp_path / "think.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    _prepare(tiny_tokenizer_dir, out, inputs=[source], mode=parse_mode(mode))
    summary = _report(out)
    dropped = [(p["line"], p["reason"]) for p in summary["problems"] if p["action"] == "dropped"]
    assert dropped == [(2, "reasoning_in_content"), (3, "reasoning_in_content")]
    assert summary["records"]["kept"] == 2
    dataset = load_prepared(out)
    text = "".join(chat_tokenizer.decode(dataset.sample(i)[0].tolist(), skip_special_tokens=False) for i in range(2))
    assert "The answer is 4." in text and "INLINE" not in text and "FIELD" not in text, text
    if mode != "mixed:0.5":  # a single inline block: kept, or removed in non-thinking mode
        assert ("OK" in text) == (mode == "keep"), text
    with pytest.raises(DataError, match=r"think.jsonl:2: reasoning_in_content: message 1 \(assistant\)"):
        list(render_samples([source], tiny_tokenizer_dir, RenderOptions(thinking=mode == "keep")))


def test_a_chunk_that_keeps_no_sample_is_no_crash(tiny_tokenizer_dir, tmp_path):
    """256 records then a blank line (the second chunk keeps nothing), a good file beside an all-bad one, a lone
    over-length line, a single blank line: each once crashed with `zip() argument 2 is shorter`."""
    good = SAMPLE_DATA.read_text().splitlines()
    exact = tmp_path / "exact.jsonl"
    exact.write_text("\n".join(good[i % len(good)] for i in range(256)) + "\n\n")
    assert _prepare(tiny_tokenizer_dir, tmp_path / "a", inputs=[exact]).samples_kept == 256
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert _prepare(tiny_tokenizer_dir, tmp_path / "b", inputs=[SAMPLE_DATA, bad]).samples_kept == 40
    long_line = tmp_path / "long.jsonl"
    long_line.write_text(good[0] + "\n")
    with pytest.raises(
        UserError, match=r"no usable samples in .*long.jsonl \(1 record\(s\) read, dropped: overlong 1\)"
    ):
        _prepare(tiny_tokenizer_dir, tmp_path / "c", inputs=[long_line], max_length=8)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n")
    with pytest.raises(UserError, match=r"no usable samples in .*blank.jsonl \(no record: only blank lines\)"):
        _prepare(tiny_tokenizer_dir, tmp_path / "d", inputs=[blank])
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["a", "b"]  # nothing half-written


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_utf8_byte_order_mark_does_not_cost_the_first_record(tiny_tokenizer_dir, tmp_path, suffix):
    source = tmp_path / f"bom{suffix}"
    text = (
        SAMPLE_DATA.read_text()
        if suffix == ".jsonl"
        else json.dumps([json.loads(x) for x in SAMPLE_DATA.read_text().splitlines()])
    )
    source.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert _prepare(tiny_tokenizer_dir, tmp_path / "out", inputs=[source]).samples_kept == 40
    assert _report(tmp_path / "out")["records"]["dropped"] == 0


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda d: _truncate(d / "tokens.bin", 4), "tokens.bin: 26,984 bytes, metadata.json's num_tokens"),
        (lambda d: _truncate(d / "trained.bin", 1), "trained.bin:"),
        (lambda d: _truncate(d / "sample_offsets.npy", 8), "sample_offsets.npy: unreadable"),
        (lambda d: _truncate(d / "bin_offsets.npy", 8), "bin_offsets.npy: unreadable"),
        (lambda d: (d / "bin_samples.npy").unlink(), "bin_samples.npy: unreadable"),
        (lambda d: _poke(d / "tokens.bin", 100, 10**6), "token id 1000000 at position 100 is outside"),
        (lambda d: _poke(d / "tokens.bin", 7, -1), "token id -1 at position 7 is outside"),
    ],
)
def test_a_damaged_prepared_dataset_is_named_when_opened(tiny_tokenizer_dir, tmp_path, damage, named):
    """Once numpy/torch tracebacks (or silent garbage) naming no file."""
    out = tmp_path / "out"
    _prepare(tiny_tokenizer_dir, out, pack=True)
    damage(out)
    with pytest.raises(UserError, match=re.escape(named)):
        load_prepared(out)


def _truncate(path: Path, nbytes: int) -> None:
    path.write_bytes(path.read_bytes()[:-nbytes])


def _poke(path: Path, position: int, value: int) -> None:
    tokens = np.fromfile(path, dtype=np.int32)
    tokens[position] = value
    tokens.tofile(path)
