"""The GLM-4.5 renderer against the official template (transformers' apply_chat_template), token for token,
and its loss mask decoded span by span.

The expected renderings in tests/data/glm45_renderings.jsonl were written by the official template; regenerate
them (only when the template asset changes) with `python tests/test_chat_render.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chat_cases import CASES  # tests/ is on sys.path under pytest and when run as a script

from glm45_train.data.chat import (
    RenderOptions,
    render_conversation,
    render_text,
    tokenize_rendered,
    without_reasoning,
)
from glm45_train.data.conversation import Origin, to_template_messages
from glm45_train.data.sources import iter_conversations, parse_record

GOLDEN = Path(__file__).parent / "data" / "glm45_renderings.jsonl"
SAMPLE_DATA = Path(__file__).resolve().parents[1] / "data" / "sample_distill.jsonl"
VARIANTS = [(thinking, prompt) for thinking in (True, False) for prompt in (False, True)]
STOPS = ("<|user|>", "<|observation|>", "<|endoftext|>")


def template_messages(record) -> list[dict]:
    """The record's messages as chat servers hand them to the template: `content: None` (an assistant turn of
    tool calls only, as OpenAI-style clients send it) as "". transformers from 5.20 and vLLM's chat endpoint do
    this themselves; transformers 5.19 (which vLLM's CPU build pins) passes None on and Jinja prints "None"."""
    return [{**m, "content": "" if m.get("content", "") is None else m.get("content", "")} for m in record["messages"]]


def template_text(hf_tokenizer, record, thinking: bool, generation_prompt: bool) -> str:
    return hf_tokenizer.apply_chat_template(
        template_messages(record),
        tools=record.get("tools"),
        tokenize=False,
        add_generation_prompt=generation_prompt,
        enable_thinking=thinking,
    )


def stop_suffix(record, generation_prompt: bool) -> str:
    """What training appends after the template's text: the stop of a final assistant turn."""
    last = record["messages"][-1]
    if generation_prompt or last["role"] != "assistant":
        return ""
    return "<|observation|>" if last.get("tool_calls") else "<|endoftext|>"


def trained_spans(hf_tokenizer, input_ids, loss_mask) -> list[str]:
    """Decoded runs of trained tokens."""
    spans, current = [], []
    for token, trained in zip(input_ids, loss_mask, strict=True):
        if trained:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [hf_tokenizer.decode(span) for span in spans]


def _conversation(name: str):
    return parse_record(CASES[name], Origin(name, 1))


@pytest.mark.parametrize(("thinking", "generation_prompt"), VARIANTS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_text_and_ids_equal_the_official_template(hf_tokenizer, chat_tokenizer, name, thinking, generation_prompt):
    record = CASES[name]
    expected_text = template_text(hf_tokenizer, record, thinking, generation_prompt)
    expected_text += stop_suffix(record, generation_prompt)
    options = RenderOptions(thinking=thinking, add_generation_prompt=generation_prompt)
    sample = render_conversation(_conversation(name), chat_tokenizer, options)
    assert sample.text == expected_text
    assert sample.input_ids == hf_tokenizer.encode(expected_text, add_special_tokens=False)
    template_ids = hf_tokenizer.apply_chat_template(
        template_messages(record),
        tools=record.get("tools"),
        add_generation_prompt=generation_prompt,
        enable_thinking=thinking,
        return_dict=False,
    )
    stop_ids = hf_tokenizer.encode(stop_suffix(record, generation_prompt), add_special_tokens=False)
    assert sample.input_ids == list(template_ids) + stop_ids


def test_canonical_messages_render_like_the_raw_ones(hf_tokenizer):
    for name, record in CASES.items():
        conversation = _conversation(name)
        canonical = hf_tokenizer.apply_chat_template(
            to_template_messages(conversation), tools=list(conversation.tools) or None, tokenize=False
        )
        assert canonical == template_text(hf_tokenizer, record, True, False), name


def test_expected_renderings_are_still_what_the_template_writes(hf_tokenizer):
    golden = [json.loads(line) for line in GOLDEN.read_text(encoding="utf-8").splitlines()]
    assert len(golden) == len(CASES) * len(VARIANTS)
    for entry in golden:
        record = CASES[entry["case"]]
        rendered = render_text(
            parse_record(record, Origin("golden", 1)),
            RenderOptions(thinking=entry["thinking"], add_generation_prompt=entry["generation_prompt"]),
        ).text
        assert rendered == entry["text"] + stop_suffix(record, entry["generation_prompt"]), entry["case"]
        assert template_text(hf_tokenizer, record, entry["thinking"], entry["generation_prompt"]) == entry["text"]


def test_negative_control_thinking_flag_and_generation_prompt_change_the_text(hf_tokenizer):
    for name, record in CASES.items():
        texts = {template_text(hf_tokenizer, record, *variant) for variant in VARIANTS}
        # A user turn already ending in /nothink renders the same with thinking on and off (no second one).
        assert len(texts) == (3 if name == "user_already_nothink" else 4), name


def test_negative_control_boundaries_inside_text_would_change_the_ids(chat_tokenizer):
    """Splitting text away from added tokens changes the ids: the id comparisons can fail."""
    whole = chat_tokenizer.encode("Hello world", add_special_tokens=False).ids
    split = chat_tokenizer.encode("Hel", add_special_tokens=False).ids
    split += chat_tokenizer.encode("lo world", add_special_tokens=False).ids
    assert split != whole


EXPECTED_SPANS = {
    "single_turn": ["\n<think></think>\nHello!<|endoftext|>"],
    "multi_turn": [
        "\n<think></think>\n4<|user|>",
        "\n<think></think>\n6<|user|>",
        "\n<think></think>\n8<|endoftext|>",
    ],
    "reasoning_field": ["\n<think>Try 7: 7 × 13 = 91.</think>\nNo, 91 = 7 × 13.<|endoftext|>"],
    "reasoning_inline": ["\n<think>10% is 8, 5% is 4.</think>\nIt is 12.<|endoftext|>"],
    # Earlier turns lost their reasoning to the template: their empty think block is not trained.
    "earlier_reasoning_dropped": [
        "\n144<|user|>",
        "\n169<|user|>",
        "\n<think>14 × 14 = 196</think>\n196<|endoftext|>",
    ],
    "tool_call_and_response": [
        "\n<think></think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n"
        "</tool_call><|observation|>",
        "\n<think></think>\n北京今天晴，23 度。<|endoftext|>",
    ],
    "consecutive_tool_messages": [
        "\n<think>Two cities, two calls.</think>\nChecking both.\n"
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
        "<arg_value>Rome</arg_value>\n</tool_call><|observation|>",
        "\n<think></think>\nRome is warmer (25C vs 18C).<|endoftext|>",
    ],
    "ends_with_tool_call": [
        "\n<think></think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n"
        "</tool_call><|observation|>"
    ],
    "prompt_only": [],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_SPANS))
def test_trained_spans_are_the_assistant_output_and_its_stop(hf_tokenizer, chat_tokenizer, name):
    sample = render_conversation(_conversation(name), chat_tokenizer)
    assert trained_spans(hf_tokenizer, sample.input_ids, sample.loss_mask) == EXPECTED_SPANS[name]


def test_no_train_empty_think_leaves_the_empty_block_out(hf_tokenizer, chat_tokenizer):
    options = RenderOptions(train_empty_think=False)
    sample = render_conversation(_conversation("multi_turn"), chat_tokenizer, options)
    assert trained_spans(hf_tokenizer, sample.input_ids, sample.loss_mask) == [
        "\n4<|user|>",
        "\n6<|user|>",
        "\n8<|endoftext|>",
    ]
    assert sample.input_ids == render_conversation(_conversation("multi_turn"), chat_tokenizer).input_ids


def test_negative_control_span_check_catches_an_untrained_stop(hf_tokenizer, chat_tokenizer):
    sample = render_conversation(_conversation("single_turn"), chat_tokenizer)
    planted = [*sample.loss_mask[:-1], 0]  # the final <|endoftext|> no longer trained
    assert trained_spans(hf_tokenizer, sample.input_ids, planted) != EXPECTED_SPANS["single_turn"]


def test_non_thinking_mode_is_the_template_with_thinking_off_and_no_reasoning(hf_tokenizer, chat_tokenizer):
    conversation, removed = without_reasoning(_conversation("consecutive_tool_messages"))
    assert removed
    sample = render_conversation(conversation, chat_tokenizer, RenderOptions(thinking=False))
    expected = hf_tokenizer.apply_chat_template(
        to_template_messages(conversation),
        tools=list(conversation.tools),
        tokenize=False,
        enable_thinking=False,
    )
    assert sample.text == expected + "<|endoftext|>"
    assert "Two cities" not in sample.text and "Weather in Paris and Rome?/nothink" in sample.text
    spans = trained_spans(hf_tokenizer, sample.input_ids, sample.loss_mask)
    assert [span[: len("\n<think></think>")] for span in spans] == ["\n<think></think>"] * 2


@pytest.mark.parametrize("thinking", [True, False])
def test_every_sample_conversation_matches_the_template(hf_tokenizer, chat_tokenizer, thinking):
    """All of data/sample_distill.jsonl, batched like prepare: exact ids, one span per assistant turn."""
    conversations = list(iter_conversations([SAMPLE_DATA]))
    assert len(conversations) >= 36
    if not thinking:
        conversations = [without_reasoning(c)[0] for c in conversations]
    options = RenderOptions(thinking=thinking)
    samples = tokenize_rendered([render_text(c, options) for c in conversations], chat_tokenizer)
    for conversation, sample in zip(conversations, samples, strict=True):
        reference = hf_tokenizer.apply_chat_template(
            to_template_messages(conversation),
            tools=list(conversation.tools) or None,
            tokenize=False,
            enable_thinking=thinking,
        )
        last = conversation.messages[-1]
        reference += "<|observation|>" if last.tool_calls else "<|endoftext|>"
        assert sample.input_ids == hf_tokenizer.encode(reference, add_special_tokens=False), conversation.origin
        spans = trained_spans(hf_tokenizer, sample.input_ids, sample.loss_mask)
        assert len(spans) == sum(m.role == "assistant" for m in conversation.messages), conversation.origin
        assert all(span.endswith(STOPS) for span in spans), conversation.origin


def _write_golden() -> None:
    import tempfile

    from transformers import AutoTokenizer

    from glm45_train.model.tokenizer import write_tokenizer

    with tempfile.TemporaryDirectory() as directory:
        write_tokenizer(Path(directory))
        hf_tokenizer = AutoTokenizer.from_pretrained(directory)
        lines = [
            json.dumps(
                {
                    "case": name,
                    "thinking": thinking,
                    "generation_prompt": prompt,
                    "text": template_text(hf_tokenizer, CASES[name], thinking, prompt),
                },
                ensure_ascii=False,
            )
            for name in sorted(CASES)
            for thinking, prompt in VARIANTS
        ]
    GOLDEN.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    _write_golden()
