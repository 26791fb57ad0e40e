"""`glm45-train chat` on the tiny model: prompt rendering by thinking mode, streaming, history, stop tokens."""

from __future__ import annotations

import io

import pytest

from glm45_train.cli.main import main
from glm45_train.infer.chat import ChatSession, interactive, load_for_chat, render_prompt


@pytest.fixture(scope="module")
def tiny_chat(tiny_air):
    return load_for_chat(tiny_air, dtype="fp32")


def test_thinking_off_renders_the_non_thinking_prompt(tiny_chat):
    _, tokenizer = tiny_chat
    messages = [{"role": "user", "content": "Hi"}]
    assert render_prompt(tokenizer, messages, thinking=False).endswith(
        "<|user|>\nHi/nothink<|assistant|>\n<think></think>"
    )
    assert render_prompt(tokenizer, messages, thinking=True).endswith("<|user|>\nHi<|assistant|>")


def test_generation_stops_on_the_three_glm45_stop_tokens(tiny_chat):
    model, tokenizer = tiny_chat
    stops = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|observation|>"])
    assert sorted(model.generation_config.eos_token_id) == sorted(stops)


def test_interactive_session_keeps_history_and_resets(tiny_chat):
    model, tokenizer = tiny_chat
    session = ChatSession(model, tokenizer, thinking=False, max_new_tokens=4)
    lines = iter(["hello", "again", "/reset", "third", "/exit"])
    out = io.StringIO()
    interactive(session, read=lambda _prompt: next(lines), out=out)
    assert out.getvalue().count("glm> ") == 3
    assert [m["role"] for m in session.history] == ["user", "assistant"]  # reset dropped the first two turns
    assert session.history[0]["content"] == "third"


def test_one_shot_cli_streams_a_reply(tiny_air, capsys):
    assert main(["chat", str(tiny_air), "--prompt", "你好", "--thinking", "off", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip()


def test_chat_on_a_directory_it_cannot_use_says_why(tiny_air, mcore_dirs, tmp_path, capsys):
    """A folder without a tokenizer, an empty one, a Megatron checkpoint: each once a transformers traceback about a
    missing `model_type`."""
    import shutil

    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_air, no_tokenizer)
    (no_tokenizer / "tokenizer_config.json").unlink()
    (tmp_path / "empty").mkdir()
    cases = {
        no_tokenizer: "no tokenizer (tokenizer_config.json)",
        tmp_path / "empty": "no config.json",
        mcore_dirs["air"]: "a Megatron checkpoint, not an HF one; export it first: glm45-train export --to-hf",
    }
    for directory, why in cases.items():
        assert main(["chat", str(directory), "--prompt", "hi"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{directory}: {why}" in err, err
