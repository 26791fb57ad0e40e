"""`make-tiny` writes the released on-disk format, loadable offline by transformers, deterministically."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open

from glm45_train.cli.main import main
from glm45_train.formats.hf_io import HFCheckpointReader
from glm45_train.model.hf_config import Glm45Config
from glm45_train.model.hf_layout import hf_tensor_shapes
from glm45_train.model.tiny import make_tiny


@pytest.mark.parametrize("preset", ["air", "glm45"])
def test_released_layout(tiny_dirs, preset):
    directory = tiny_dirs[preset]
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (directory / name).is_file(), name
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    hf = Glm45Config.from_file(directory)
    expected = dict(hf_tensor_shapes(hf))
    reader = HFCheckpointReader(directory)
    assert set(reader.names()) == set(expected)
    assert all(reader.shape_and_dtype(n)[0] == s for n, s in expected.items())
    mtp = f"model.layers.{hf.num_hidden_layers}."
    for suffix in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "embed_tokens", "shared_head.head"):
        assert f"{mtp}{suffix}.weight" in expected
    assert f"{mtp}mlp.experts.{hf.n_routed_experts - 1}.down_proj.weight" in expected  # per-expert names
    bias = reader.get(f"model.layers.{hf.first_k_dense_replace}.mlp.gate.e_score_correction_bias")
    assert bias.dtype == torch.float32 and bias.abs().min() > 0
    assert reader.get("model.embed_tokens.weight").dtype == torch.bfloat16
    total = sum(t.numel() * t.element_size() for _, t in reader)
    assert index["metadata"]["total_size"] == total


def test_generation_config_stops_on_the_three_glm45_tokens(tiny_air):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_air)
    stops = json.loads((tiny_air / "generation_config.json").read_text())["eos_token_id"]
    assert tokenizer.convert_ids_to_tokens(stops) == ["<|endoftext|>", "<|user|>", "<|observation|>"]
    assert json.loads((tiny_air / "config.json").read_text())["eos_token_id"] == stops


@pytest.mark.parametrize("preset", ["air", "glm45"])
def test_transformers_loads_it_offline_and_runs(tiny_dirs, preset):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs[preset])
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[preset], dtype=torch.float32)
    assert type(model).__name__ == "Glm4MoeForCausalLM"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "你好, GLM"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.startswith("[gMASK]<sop><|user|>\n你好, GLM<|assistant|>")
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
    expected = HFCheckpointReader(tiny_dirs[preset]).get("model.layers.0.self_attn.q_proj.weight")
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, expected.float())


def _digest(directory) -> dict[str, str]:
    digests = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118
                digests[name] = hashlib.sha256(handle.get_tensor(name).view(torch.uint8).numpy()).hexdigest()
    return digests


def test_deterministic_per_seed(tmp_path, tiny_air):
    again = make_tiny(tmp_path / "again", preset="air", seed=0)
    other = make_tiny(tmp_path / "other", preset="air", seed=1)
    assert _digest(again) == _digest(tiny_air)
    assert (again / "tokenizer.json").read_bytes() == (tiny_air / "tokenizer.json").read_bytes()
    differing = [k for k, v in _digest(other).items() if _digest(again)[k] != v]
    assert len(differing) == len(_digest(again))


def test_cli_refuses_non_empty_output_and_keeps_it(tmp_path, capsys):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    assert main(["make-tiny", str(target)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (target / "keep.txt").read_text() == "user data"
    assert main(["make-tiny", str(target), "--preset", "glm45", "--overwrite"]) == 0
    assert Glm45Config.from_file(target).use_qk_norm
    assert not (tmp_path / "out.partial").exists()
