"""`glm45-train eval`: scoring that is exactly right, greedy decoding equal through vLLM and transformers (fp32),
seeded sampling, the report's shape, and bad input named.

The scoring tests know the answer in advance: a set whose reference answers are, for half its items, what the
tiny model answers greedily and, for the other half, something else must score 50% exactly. For `exact` the
tiny random model's own (gibberish) answers are used; for `math` a planted model whose residual writers are
zeroed answers "42" whatever it is asked (its next token depends on the current one only, through a chain laid
into lm_head), and the references say 42 in other forms (`\\frac{84}{2}`, `42.0`) or another number.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from glm45_train.cli.main import main
from glm45_train.data.chat import load_chat_tokenizer
from glm45_train.evaluate.summary import pass_at_k, summarize
from glm45_train.runtime.vllm_cpu import is_installed

QUESTIONS = [
    f"What is {a} + {b}? Put the final answer in \\boxed{{}}." for a, b in itertools.product((2, 5, 9), (3, 7))
]
QUESTIONS += ["Name a colour.", "Say hello."]  # 8 prompts


def write_set(path: Path, answers: list[str | None], extra: list[str] | None = None) -> Path:
    lines = [json.dumps({"messages": [{"role": "user", "content": q}], "answer": a}, ensure_ascii=False)
             for q, a in zip(QUESTIONS, answers, strict=True)]  # fmt: skip
    path.write_text("\n".join(lines + (extra or [])) + "\n", encoding="utf-8")
    return path


def run_eval(model, data, out: Path, *args: str) -> dict:
    argv = ["eval", *map(str, model if isinstance(model, list) else [model]), "--data", *map(str, data)]
    argv += ["--output-dir", str(out), "--no-progress", "--overwrite", "--max-new-tokens", "12", "--dtype", "fp32"]
    assert main([*argv, *args]) == 0
    return json.loads((out / "summary.json").read_text())


def samples_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def plant_answer(source: Path, out: Path, chain: list[tuple[str, str]]) -> Path:
    """A copy of `source` whose greedy continuation of token a is b for every (a, b) in `chain`, whatever the
    context: attention and MLP outputs zeroed (the residual stream is the token's embedding), lm_head rows aimed
    at each normed embedding."""
    shutil.copytree(source, out)
    tokenizer = load_chat_tokenizer(source)
    config = json.loads((source / "config.json").read_text())
    tensors = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors[shard] = load_file(shard)
    flat = {name: t for shard in tensors.values() for name, t in shard.items()}
    for shard in tensors.values():
        for name in shard:
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                shard[name] = torch.zeros_like(shard[name])
    embed, norm = flat["model.embed_tokens.weight"].float(), flat["model.norm.weight"].float()
    head_shard = next(shard for shard in tensors.values() if "lm_head.weight" in shard)
    head = head_shard["lm_head.weight"].float()
    for a, b in chain:
        e = embed[tokenizer.token_to_id(a)]
        h = e * torch.rsqrt(e.pow(2).mean() + config["rms_norm_eps"]) * norm
        head[tokenizer.token_to_id(b)] = 30.0 * h / h.pow(2).sum()
    head_shard["lm_head.weight"] = head.to(flat["lm_head.weight"].dtype)
    for shard, content in tensors.items():
        save_file(content, shard, metadata={"format": "pt"})
    return out


FORTY_TWO = [("</think>", "42"), ("<|assistant|>", "<think>"), ("<think>", "ox"), ("ox", "</think>"),
             ("42", "<|user|>")]  # fmt: skip


@pytest.fixture(scope="module")
def answers_42(tiny_air, tmp_path_factory) -> Path:
    return plant_answer(tiny_air, tmp_path_factory.mktemp("planted") / "answers-42", FORTY_TWO)


@pytest.mark.parametrize("thinking", ["off", "on"])
def test_exact_scores_half_exactly(tiny_air, tmp_path, thinking):
    first = run_eval(tiny_air, [write_set(tmp_path / "blank.jsonl", ["?"] * 8)], tmp_path / "greedy",
                     "--engine", "hf", "--scorer", "exact", "--thinking", thinking)  # fmt: skip
    assert first["summary"][0]["pass_at_1"] == 0.0
    answers = [row["answer"] for row in samples_of(tmp_path / "greedy")]
    assert len(set(answers)) > 2, answers  # the model answers differently: matching them means something
    references = [a if i % 2 == 0 else a + " (not this)" for i, a in enumerate(answers)]
    summary = run_eval(tiny_air, [write_set(tmp_path / "half.jsonl", references)], tmp_path / "half",
                       "--engine", "hf", "--scorer", "exact", "--thinking", thinking)["summary"]  # fmt: skip
    assert summary[0]["pass_at_1"] == 0.5 and summary[0]["mean_score"] == 0.5
    assert [row["correct"] for row in samples_of(tmp_path / "half")] == [i % 2 == 0 for i in range(8)]


@pytest.mark.parametrize("thinking", ["off", "on"])
def test_math_scores_half_exactly(answers_42, tmp_path, thinking):
    references = ["42", "41", "\\frac{84}{2}", "4.2", "42.0", "420", "84/2", "-42"]
    summary = run_eval(answers_42, [write_set(tmp_path / "math.jsonl", references)], tmp_path / "out",
                       "--engine", "hf", "--scorer", "math", "--thinking", thinking)["summary"][0]  # fmt: skip
    assert summary["pass_at_1"] == 0.5 and summary["scorer_failures"] == 0
    rows = samples_of(tmp_path / "out")
    assert {row["answer"] for row in rows} == {"42"}
    if thinking == "on":
        assert all(row["reasoning"] == "ox" and row["reasoning_tokens"] == 1 and row["thinks"] for row in rows)
        assert summary["thinks"] == 1.0 and summary["mean_reasoning_tokens"] == 1.0
    else:
        assert all(row["reasoning"] is None and not row["thinks"] for row in rows) and summary["thinks"] == 0.0
    # the negative control: the same references judged by exact string match are right only where written "42"
    exact = run_eval(answers_42, [tmp_path / "math.jsonl"], tmp_path / "exact",
                     "--engine", "hf", "--scorer", "exact", "--thinking", thinking)["summary"][0]  # fmt: skip
    assert exact["pass_at_1"] == 0.125


def test_report_shape_and_bad_records(tiny_air, answers_42, tmp_path, capsys):
    bad = ['{"messages": [{"role": "user", "content": "hi"}], "answer": "1"', '{"messages": []}']
    data = write_set(tmp_path / "set.jsonl", ["42"] * 8, extra=bad)
    report = run_eval([f"random={tiny_air}", f"planted={answers_42}"], [data], tmp_path / "out",
                      "--engine", "hf", "--thinking", "both")  # fmt: skip
    printed = capsys.readouterr().out
    assert "6 of 10 records" not in printed and "8 of 10 records" in printed and "set.jsonl:9" in printed
    problems = report["sets"]["set"]["problems"]
    assert [p["line"] for p in problems] == [9, 10]
    lines = {(s["model"], s["thinking"]): s for s in report["summary"]}
    assert set(lines) == {("random", "off"), ("random", "on"), ("planted", "off"), ("planted", "on")}
    assert lines["planted", "off"]["pass_at_1"] == 1.0 and lines["random", "off"]["pass_at_1"] == 0.0
    assert lines["planted", "off"]["mean_tokens"] == 2.0 and lines["planted", "off"]["truncated"] == 0.0
    assert lines["random", "off"]["truncated"] == 1.0 and lines["random", "off"]["p90_tokens"] == 12.0
    rows = samples_of(tmp_path / "out")
    assert len(rows) == 32 and {"prompt", "response", "reasoning", "answer", "tool_calls", "score", "tokens"} <= set(
        rows[0]
    )
    assert (tmp_path / "out" / "summary.png").stat().st_size > 10_000
    assert "pass@1" in printed and "planted" in printed


def test_sampling_is_seeded_per_sample(tiny_air, tmp_path):
    data = [write_set(tmp_path / "set.jsonl", ["x"] * 8)]
    args = ("--engine", "hf", "--samples", "3", "--temperature", "1.0", "--scorer", "exact")
    run_eval(tiny_air, data, tmp_path / "a", *args)
    run_eval(tiny_air, data, tmp_path / "b", *args)
    a, b = samples_of(tmp_path / "a"), samples_of(tmp_path / "b")
    assert [r["response"] for r in a] == [r["response"] for r in b]
    assert len({r["response"] for r in a if r["index"] == 0}) > 1  # three different samples of one prompt
    other = run_eval(tiny_air, data, tmp_path / "c", *args, "--seed", "1")
    assert other and [r["response"] for r in samples_of(tmp_path / "c")] != [r["response"] for r in a]


@pytest.mark.skipif(not is_installed(), reason="vLLM is not installed")
def test_vllm_greedy_equals_transformers(tiny_air, tmp_path):
    """fp32 greedy decoding: the same responses from vLLM and transformers, thinking on and off."""
    data = [write_set(tmp_path / "set.jsonl", ["x"] * 8)]
    hf = run_eval(tiny_air, data, tmp_path / "hf", "--engine", "hf", "--thinking", "both", "--max-new-tokens", "24")
    served = run_eval(tiny_air, data, tmp_path / "vllm", "--engine", "vllm", "--thinking", "both",
                      "--max-new-tokens", "24")  # fmt: skip
    assert hf["engine"] == "hf" and served["engine"] == "vllm"
    reference = [(r["thinking"], r["index"], r["response"]) for r in samples_of(tmp_path / "hf")]
    assert [(r["thinking"], r["index"], r["response"]) for r in samples_of(tmp_path / "vllm")] == reference
    assert len({response for *_, response in reference}) > 8  # different answers, in both modes


def test_a_run_directory_is_exported_on_the_fly(tiny_air, mcore_dirs, tmp_path):
    """A converted Megatron checkpoint given as the model is exported into the output and answers as its source."""
    data = [write_set(tmp_path / "set.jsonl", ["x"] * 8)]
    report = run_eval([f"source={tiny_air}", f"converted={mcore_dirs['air']}"], data, tmp_path / "out",
                      "--engine", "hf")  # fmt: skip
    rows = samples_of(tmp_path / "out")
    responses = {label: [r["response"] for r in rows if r["model"] == label] for label in ("source", "converted")}
    assert responses["source"] == responses["converted"] and len(responses["source"]) == 8
    assert report["models"]["converted"] == str(tmp_path / "out" / "exports" / "converted")
    assert (tmp_path / "out" / "exports" / "converted" / "config.json").is_file()


def test_bad_input_is_named_and_leaves_nothing(tiny_air, tmp_path, capsys):
    data = write_set(tmp_path / "set.jsonl", ["1"] * 8)
    cases = [
        ([str(tmp_path / "missing")], ["--data", str(data)], "missing: no such directory"),
        ([str(tiny_air)], ["--data", str(tmp_path / "nope.jsonl")], "nope.jsonl"),
        ([str(tiny_air)], ["--data", str(data), "--scorer", "mth"], "did you mean 'math'"),
        ([str(tiny_air)], ["--data", str(data), "--samples", "2"], "--samples > 1 needs --temperature > 0"),
        ([str(tiny_air)], ["--data", str(data), str(data), "--scorer", "a", "b", "c"], "3 scorers for 2 sets"),
        (["http://127.0.0.1:9"], ["--data", str(data), "--engine", "hf"], "--engine hf cannot sample from served"),
    ]
    for models, args, message in cases:
        out = tmp_path / "out"
        code = main(["eval", *models, *args, "--output-dir", str(out), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (args, err)
        assert not out.exists() and not (tmp_path / ".out.partial").exists()


def test_pass_at_k_is_the_unbiased_estimator():
    for n, c, k in itertools.product(range(1, 6), range(0, 6), range(1, 6)):
        if c > n or k > n:
            continue
        draws = list(itertools.combinations([True] * c + [False] * (n - c), k))
        assert math.isclose(pass_at_k(n, c, k), sum(any(d) for d in draws) / len(draws))


def test_summary_counts_thinking_truncation_and_tool_calls():
    base = {"index": 0, "score": 1.0, "correct": True, "finished": True, "tokens": 10, "reasoning_tokens": 0,
            "thinks": False, "tool_calls": [], "tool_call_problems": []}  # fmt: skip
    rows = [
        base,
        {**base, "index": 1, "thinks": True, "reasoning_tokens": 6, "tokens": 20},
        {**base, "index": 2, "finished": False, "score": 0.0, "correct": False, "tokens": 30},
        {**base, "index": 3, "tool_calls": [{"name": "f", "arguments": {}}]},
        {**base, "index": 4, "tool_calls": [{"name": "g", "arguments": {}}], "tool_call_problems": ["g: unknown"]},
        {**base, "index": 5, "score": None, "correct": None},
    ]
    line = summarize(rows, model="m", set_label="s", scorer="exact", thinking="off", samples=1)
    assert line.pass_at_1 == 0.8 and line.scorer_failures == 1 and line.prompts == 6
    assert line.thinks == pytest.approx(1 / 6) and line.truncated == pytest.approx(1 / 6)
    assert line.mean_reasoning_tokens == 1.0 and line.tool_call_validity == 0.5
    assert line.mean_tokens == 15.0


def test_prompt_field_stands_for_messages():
    from glm45_train.data.conversation import DataError, Origin
    from glm45_train.rl.prompts import prompt_from_record

    origin = Origin("set.jsonl", 3)
    plain, _ = prompt_from_record({"prompt": "What is 2 + 3?", "answer": 5, "level": 1}, origin)
    assert plain.messages == [{"role": "user", "content": "What is 2 + 3?"}]
    assert plain.answer == "5" and plain.extra == {"level": 1}
    listed, _ = prompt_from_record({"prompt": [{"role": "user", "content": "hi"}]}, origin)
    assert listed.messages == [{"role": "user", "content": "hi"}]
    with pytest.raises(DataError, match="messages"):
        prompt_from_record({"prompt": 7}, origin)
