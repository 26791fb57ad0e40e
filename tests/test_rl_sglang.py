"""The SGLang rollout engine without SGLang: the install hint, the engine's model directory, SGLang's output dicts
parsed into Completions (shaped as SGLang's Engine.generate returns them with return_logprob and
skip_tokenizer_init), the request expansion (one seeded request per response) and the weight-name check.
The engine itself runs only on a GPU with SGLang installed (marked `gpu`)."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from glm45_train.config.rl import RolloutSection
from glm45_train.errors import UserError
from glm45_train.model.hf_config import Glm45Config
from glm45_train.model.hf_layout import hf_tensor_shapes
from glm45_train.rl.engines.model_files import WeightCheck, prepare_model_dir
from glm45_train.rl.engines.sglang import (
    SGLangEngine,
    completion_from_output,
    group_completions,
    sampling_requests,
)
from glm45_train.rl.rollout import Completion, Request, SamplingParams

HAS_SGLANG = importlib.util.find_spec("sglang") is not None
STOP = (151329, 151336, 151338)  # GLM-4.5's <|endoftext|>, <|user|>, <|observation|>


def sglang_output(token_logprobs, finish_reason):
    """One element of `sglang.Engine.generate(input_ids=[...], return_logprob=True)` with skip_tokenizer_init:
    output_ids plus meta_info, output_token_logprobs as (logprob, token_id, text) with text None."""
    ids = [token for _, token in token_logprobs]
    return {
        "output_ids": ids,
        "meta_info": {
            "id": "9b1f3c",
            "finish_reason": finish_reason,
            "prompt_tokens": 5,
            "completion_tokens": len(ids),
            "cached_tokens": 0,
            "output_token_logprobs": [(logprob, token, None) for logprob, token in token_logprobs],
            "e2e_latency": 0.25,
        },
    }


# --- without SGLang -----------------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_SGLANG, reason="sglang is installed here")
def test_engine_without_sglang_says_how_to_install_it(tiny_air, tmp_path):
    with pytest.raises(UserError) as error:
        SGLangEngine(tiny_air, RolloutSection(engine="sglang"), seed=0, run_dir=tmp_path / "run")
    assert "pip install 'glm45-train[rl-gpu]'" in str(error.value)
    assert "rl.rollout.engine: hf" in str(error.value)
    assert not (tmp_path / "run").exists()  # nothing prepared before the import fails


# --- the engine's model directory ---------------------------------------------------------------------------


def test_model_dir_holds_config_and_tokenizer_but_no_weights(tiny_air, tmp_path):
    out = prepare_model_dir(tiny_air, tmp_path / "engine")
    names = {path.name for path in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "chat_template.jinja" in names
    assert not [name for name in names if name.endswith(".safetensors") or name.endswith(".index.json")]
    assert any(path.name.endswith(".safetensors") for path in tiny_air.iterdir())  # the source has weights
    assert (out / "config.json").read_bytes() == (tiny_air / "config.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Glm4MoeForCausalLM"]
    from tokenizers import Tokenizer

    Tokenizer.from_file(str(out / "tokenizer.json"))
    assert prepare_model_dir(tiny_air, out) == out  # prepared once: a second engine reuses it
    (out / "config.json").write_text("{}")
    with pytest.raises(UserError, match="prepared for another model"):
        prepare_model_dir(tiny_air, out)
    assert not [path for path in tmp_path.iterdir() if ".partial." in path.name]


def test_model_dir_refuses_a_source_sglang_cannot_start_from(tiny_air, tmp_path):
    with pytest.raises(UserError, match=r"no config\.json"):
        prepare_model_dir(tmp_path, tmp_path / "engine")
    other = tmp_path / "other"
    shutil.copytree(tiny_air, other, ignore=shutil.ignore_patterns("*.safetensors*"))
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(UserError, match="Glm4MoeForCausalLM"):
        prepare_model_dir(other, tmp_path / "engine")
    assert not (tmp_path / "engine").exists()


# --- SGLang's output dicts -> Completions --------------------------------------------------------------------


def test_stop_finished_output_keeps_the_stop_token():
    output = sglang_output([(-0.5, 11), (-1.25, 12), (-0.01, 151329)], {"type": "stop", "matched": 151329})
    assert completion_from_output(output, STOP) == Completion(
        response_ids=(11, 12, 151329), logprobs=(-0.5, -1.25, -0.01), finished=True
    )


def test_length_finished_output_is_unfinished():
    output = sglang_output([(-2.0, 7), (-0.75, 8), (-0.125, 9), (-3.5, 10)], {"type": "length", "length": 4})
    completion = completion_from_output(output, STOP)
    assert completion == Completion(response_ids=(7, 8, 9, 10), logprobs=(-2.0, -0.75, -0.125, -3.5), finished=False)


def test_length_finish_on_a_stop_token_counts_as_finished():
    """SGLang checks max_new_tokens before stop tokens: a stop token as the last allowed token reports 'length'."""
    output = sglang_output([(-0.5, 7), (-0.25, 151336)], {"type": "length", "length": 2})
    assert completion_from_output(output, STOP).finished


def test_outputs_that_are_not_a_sampled_response_are_errors():
    abort = sglang_output([], {"type": "abort", "message": "out of memory", "status_code": 500})
    with pytest.raises(RuntimeError, match="abort"):
        completion_from_output(abort, STOP)
    nan = sglang_output([(-0.5, 7), (-0.25, 151329)], {"type": "stop", "matched": "NaN happened"})
    with pytest.raises(RuntimeError, match="NaN happened"):
        completion_from_output(nan, STOP)
    trimmed = sglang_output([(-0.5, 7)], {"type": "stop", "matched": 151329})  # stop token not among the tokens
    with pytest.raises(RuntimeError, match="not on the last response token"):
        completion_from_output(trimmed, STOP)
    no_logprobs = sglang_output([(-0.5, 7)], {"type": "length", "length": 1})
    del no_logprobs["meta_info"]["output_token_logprobs"]
    with pytest.raises(ValueError, match="return_logprob"):
        completion_from_output(no_logprobs, STOP)


def test_outputs_are_grouped_per_request_in_order():
    requests = [Request(prompt_ids=(1, 2), samples=2, seed=10), Request(prompt_ids=(3,), samples=1, seed=20)]
    outputs = [sglang_output([(-0.1 * i, 100 + i)], {"type": "length", "length": 1}) for i in range(3)]
    groups = group_completions(outputs, requests, STOP)
    assert [[c.response_ids for c in group] for group in groups] == [[(100,), (101,)], [(102,)]]
    with pytest.raises(RuntimeError, match="2 outputs for 3 responses"):
        group_completions(outputs[:2], requests, STOP)


def test_every_response_is_its_own_request_with_its_own_seed():
    requests = [Request(prompt_ids=(1, 2), samples=3, seed=5), Request(prompt_ids=(9,), samples=1, seed=2**31 + 1)]
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=16, stop_token_ids=STOP)
    input_ids, sampling = sampling_requests(requests, params, seeded=True)
    assert input_ids == [[1, 2], [1, 2], [1, 2], [9]]
    assert [s["sampling_seed"] for s in sampling] == [5, 6, 7, 1]  # seed + j, kept in SGLang's int32 range
    assert sampling[0] == {
        "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 16, "stop_token_ids": list(STOP),
        "no_stop_trim": True, "sampling_seed": 5,
    }  # fmt: skip
    _, unseeded = sampling_requests(requests, params, seeded=False)
    assert all("sampling_seed" not in s for s in unseeded)  # SGLang ignores seeds without deterministic mode


# --- weight names ---------------------------------------------------------------------------------------------


def test_weight_check_takes_the_checkpoint_names_and_refuses_the_rest(tiny_air):
    hf = Glm45Config.from_file(tiny_air)
    tensors = list(hf_tensor_shapes(hf))
    check = WeightCheck(hf)
    mtp = [name for name, _ in tensors if check.is_mtp(name)]
    assert mtp and all(name.startswith(f"model.layers.{hf.num_hidden_layers}.") for name in mtp)
    for name, shape in tensors:
        if not check.is_mtp(name):
            check.take(name, shape)
    check.finish()

    def fresh() -> WeightCheck:
        return WeightCheck(hf)

    name, shape = (
        "model.layers.1.mlp.experts.0.gate_proj.weight",
        dict(tensors)["model.layers.1.mlp.experts.0.gate_proj.weight"],
    )
    with pytest.raises(ValueError, match="not a tensor of the checkpoint"):
        fresh().take("model.layers.1.mlp.experts.0.gate_up_proj.weight", shape)  # an SGLang-side name
    with pytest.raises(ValueError, match="expected"):
        fresh().take(name, (shape[1], shape[0]))
    twice = fresh()
    twice.take(name, shape)
    with pytest.raises(ValueError, match="sent twice"):
        twice.take(name, shape)
    with pytest.raises(ValueError, match="missing"):
        twice.finish()


# --- on a GPU with SGLang ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_SGLANG, reason="needs CUDA and SGLang")
def test_sglang_engine_samples_the_tiny_model_with_its_log_probs(tiny_air, tmp_path):
    """Weights through update_weights, seeded groups reproducible, the same after sleep/wake, and the engine's
    log-probs those of transformers' model at the sampling temperature."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from glm45_train.model.tokenizer import stop_token_ids

    weights: dict[str, torch.Tensor] = {}
    for path in sorted(tiny_air.glob("*.safetensors")):
        weights.update(load_file(str(path), device="cuda"))
    params = SamplingParams(
        temperature=0.8, top_p=1.0, max_new_tokens=12, stop_token_ids=tuple(stop_token_ids(tiny_air))
    )
    requests = [Request(prompt_ids=(5, 17, 23, 42), samples=3, seed=11)]
    engine = SGLangEngine(
        tiny_air, RolloutSection(engine="sglang", tp=1, gpu_memory_fraction=0.2), seed=0, run_dir=tmp_path
    )
    try:
        engine.update_weights(weights.items())
        first = engine.generate(requests, params)
        assert first == engine.generate(requests, params) and len(first[0]) == 3
        engine.sleep()
        engine.wake()
        engine.update_weights(weights.items())
        assert engine.generate(requests, params) == first
    finally:
        engine.shutdown()
    model = AutoModelForCausalLM.from_pretrained(tiny_air, dtype=torch.float32).cuda().eval()
    for completion in first[0]:
        ids = torch.tensor([[*requests[0].prompt_ids, *completion.response_ids]], device="cuda")
        with torch.no_grad():
            logits = model(ids).logits[0, len(requests[0].prompt_ids) - 1 : -1].float()
        expected = torch.log_softmax(logits / params.temperature, -1).gather(-1, ids[0, 4:, None])[:, 0]
        assert torch.allclose(torch.tensor(completion.logprobs, device="cuda"), expected, atol=0.05)
