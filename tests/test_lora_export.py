"""Exporting a LoRA run: merged HF checkpoint (== Megatron + adapters), HF-PEFT adapter (== merged, via peft),
assets carried unchanged, refusals."""

from __future__ import annotations

import json

import pytest
import torch

from glm45_train.cli.main import main
from glm45_train.convert.mapping import transforms
from glm45_train.lora.adapter_io import read_lora_run
from glm45_train.lora.hf_export import export_merged, export_peft_adapter, peft_tensors
from glm45_train.lora.merge_check import check_merged
from tests.conftest import REPO_ROOT

CARRIED = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def _train(tiny_air, run_dir, *overrides: str) -> None:
    args = [
        "sft", str(REPO_ROOT / "recipes/tiny_lora.yaml"), f"model.source={tiny_air}", f"checkpoint.dir={run_dir}",
        f"data.inputs=[{REPO_ROOT / 'data/sample_distill.jsonl'}]", "parallel.ep=1", "train.global_batch_size=2",
        "train.steps=3", "eval.interval=0", "logging.tensorboard=false", "logging.plot=false", *overrides,
    ]  # fmt: skip
    assert main(args) == 0


@pytest.fixture(scope="module")
def lora_run(tiny_air, tmp_path_factory):
    """Every target: attention, dense/shared MLP, each routed expert, the router; the MTP layer trained too."""
    run_dir = tmp_path_factory.mktemp("lora-export") / "run"
    targets = "linear_qkv,linear_proj,linear_fc1,linear_fc2,experts.linear_fc1,experts.linear_fc2,router"
    _train(tiny_air, run_dir, f"lora.targets=[{targets}]", "train.aux_loss_coeff=1e-3", "train.mtp_loss_weight=0.3")
    return run_dir


@pytest.fixture(scope="module")
def attention_run(tiny_air, tmp_path_factory):
    """The seed recipe's targets (linear_qkv, linear_proj): the adapters peft can load."""
    run_dir = tmp_path_factory.mktemp("lora-attention") / "run"
    _train(tiny_air, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def merged(lora_run, tmp_path_factory):
    return export_merged(lora_run, tmp_path_factory.mktemp("merged") / "hf", dtype="fp32")


def test_merged_export_equals_megatron_with_adapters(megatron_world, lora_run, merged):
    run = read_lora_run(lora_run)
    trained = {
        n.split("_lora.")[0].rsplit(".", 1)[-1] for n, t in run.state.items() if n.endswith("lora_B") and t.any()
    }
    assert {"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "router"} <= trained  # every kind really trained
    assert any(".local_experts." in n and t.any() for n, t in run.state.items() if n.endswith("lora_B"))
    assert any(n.startswith("mtp.") and t.any() for n, t in run.state.items() if n.endswith("lora_B"))  # MTP trained
    report = check_merged(run, merged, dtype="fp32")
    assert report.passed and report.logits.max_abs <= 1e-4, report.format()


def test_peft_adapter_loads_on_the_hf_base_and_matches_the_merged_model(
    megatron_world, attention_run, tiny_air, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = export_peft_adapter(attention_run, tmp_path / "adapter")
    merged = export_merged(attention_run, tmp_path / "merged", dtype="fp32")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    ids = torch.randint(0, 1500, (1, 40), generator=torch.Generator().manual_seed(1))
    base = AutoModelForCausalLM.from_pretrained(tiny_air, dtype=torch.float32)
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(base, str(adapter)).eval()(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(peft_logits, merged_logits, rtol=0, atol=1e-4)


def test_fused_adapters_are_split_exactly(megatron_world, attention_run):
    run = read_lora_run(attention_run)
    assert not any(n.startswith("mtp.") for n in run.state)  # mtp_loss_weight 0: no MTP block, no MTP adapters
    tensors = peft_tensors(run)
    prefix = "base_model.model.model.layers.0."
    q, k, v = (tensors[f"{prefix}self_attn.{p}_proj.lora_B.weight"] for p in "qkv")
    fused = run.state["decoder.layers.0.self_attention.linear_qkv_lora.lora_B"]
    assert torch.equal(transforms.qkv_merge(q, k, v, run.hf.num_key_value_heads), fused)
    o_proj = tensors[f"{prefix}self_attn.o_proj.lora_B.weight"]
    assert torch.equal(o_proj, run.state["decoder.layers.0.self_attention.linear_proj_lora.lora_B"])
    shared_a = run.state["decoder.layers.0.self_attention.linear_qkv_lora.lora_A"]
    assert all(torch.equal(tensors[f"{prefix}self_attn.{p}_proj.lora_A.weight"], shared_a) for p in "qkv")


def test_assets_are_carried_unchanged(attention_run, merged, tiny_air, tmp_path):
    adapter = export_peft_adapter(attention_run, tmp_path / "adapter")
    for name in CARRIED:
        assert (merged / name).read_bytes() == (tiny_air / name).read_bytes(), name
        assert (adapter / name).read_bytes() == (tiny_air / name).read_bytes(), name
    stops = json.loads((merged / "generation_config.json").read_text())["eos_token_id"]
    assert len(stops) == 3


def test_cli_merge_with_precision_and_chat(lora_run, tmp_path, capsys):
    out = tmp_path / "merged-cli"
    args = ["export", "--to-hf", "--model", str(lora_run), "--output-dir", str(out), "--dtype", "fp32"]
    assert main([*args, "--merge-lora", "--test-precision"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(args) == 2  # now non-empty: refused without --overwrite
    assert "not empty" in capsys.readouterr().err or "exists" in capsys.readouterr().err
    assert main(["chat", str(out), "--prompt", "hi", "--thinking", "off", "--max-new-tokens", "4"]) == 0


def test_mlp_expert_and_router_adapters_can_only_be_merged(lora_run, tmp_path, capsys):
    code = main(["export", "--to-hf", "--model", str(lora_run), "--output-dir", str(tmp_path / "a"), "--adapter-only"])
    assert code == 2
    assert "--merge-lora" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
