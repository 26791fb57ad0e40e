"""The tiny GLM-4.5 tokenizer: deterministic files, added tokens in release order, loads in transformers."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models

from glm45_train.model.tokenizer import (
    SKIPPED_ON_DECODE,
    SPECIAL_TOKENS,
    STOP_TOKENS,
    chat_template_text,
    stop_token_ids,
    vocab_size_for,
    write_tokenizer,
)

FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _digests(directory: Path) -> dict[str, str]:
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in FILES}


def test_files_are_identical_across_runs_and_processes(tiny_tokenizer_dir, tmp_path):
    write_tokenizer(tmp_path / "again")
    script = "from pathlib import Path; from glm45_train.model.tokenizer import write_tokenizer; "
    script += f"write_tokenizer(Path({str(tmp_path / 'other_process')!r}))"
    subprocess.run([sys.executable, "-c", script], check=True)
    expected = _digests(tiny_tokenizer_dir)
    assert _digests(tmp_path / "again") == expected
    assert _digests(tmp_path / "other_process") == expected


def test_added_tokens_follow_the_bpe_vocab_in_release_order(tiny_tokenizer_dir):
    backend = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    base = backend.get_vocab_size(with_added_tokens=False)
    assert [backend.token_to_id(token) for token in SPECIAL_TOKENS] == list(range(base, base + 36))
    assert len(SPECIAL_TOKENS) == 36 and SPECIAL_TOKENS[2] == "[gMASK]" and SPECIAL_TOKENS[-1] == "<|video|>"
    assert 1000 <= vocab_size_for(tiny_tokenizer_dir) <= 2000


def test_loads_offline_in_transformers_with_the_official_template(tiny_tokenizer_dir, hf_tokenizer):
    assert hf_tokenizer.eos_token == "<|endoftext|>" and hf_tokenizer.pad_token == "<|endoftext|>"
    assert hf_tokenizer.chat_template == chat_template_text()
    assert (tiny_tokenizer_dir / "chat_template.jinja").read_text(encoding="utf-8") == chat_template_text()
    assert len(hf_tokenizer) == vocab_size_for(tiny_tokenizer_dir)
    messages = [{"role": "user", "content": "hi"}]
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert hf_tokenizer.convert_ids_to_tokens(ids[:3]) == ["[gMASK]", "<sop>", "<|user|>"]


def test_each_added_token_is_one_id_inside_text(hf_tokenizer):
    for token in SPECIAL_TOKENS:
        ids = hf_tokenizer.encode(f"a{token}b", add_special_tokens=False)
        assert hf_tokenizer.convert_ids_to_tokens(ids)[1] == token and len(ids) == 3, token


def test_decode_skips_only_the_release_special_tokens(hf_tokenizer):
    text = "[gMASK]<sop><|user|>\nhi<|assistant|>\n<think>x</think>\n<tool_call>f\n</tool_call>/nothink"
    text += "<|endoftext|>"
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    assert hf_tokenizer.decode(ids) == text
    kept = hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert kept == "\nhi\n<think>x</think>\n<tool_call>f\n</tool_call>/nothink"
    assert all(token not in kept for token in SKIPPED_ON_DECODE)


@pytest.mark.parametrize(
    "text", ["Hello, world!  Two  spaces.", "你好，世界！今天天气很好。", "emoji 🙂 café ñ\n\ttab"]
)
def test_text_round_trips(hf_tokenizer, text):
    assert hf_tokenizer.decode(hf_tokenizer.encode(text, add_special_tokens=False)) == text


def test_stop_tokens(tiny_tokenizer_dir, hf_tokenizer):
    assert stop_token_ids(tiny_tokenizer_dir) == hf_tokenizer.convert_tokens_to_ids(list(STOP_TOKENS))


def test_errors_name_the_directory_and_token(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        vocab_size_for(tmp_path)
    Tokenizer(models.BPE()).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"token '<\|endoftext\|>' is missing"):
        stop_token_ids(tmp_path)
