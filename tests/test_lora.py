"""LoRA on Megatron layers: function preserved at init, frozen base, merge/deltas, state round trips, TP 2 and EP 2.

World-1 tests use the tiny Air preset (3 layers, first dense, 8 experts, shared expert, MTP 1). The torchrun tests
compare TP 2 (eval mode, plus a sequence-parallel MLP) and EP 2 (three SGD steps) with the same run in one process,
each with a negative control. GPU-only tests exercise the Transformer Engine path.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from glm45_train.config.recipe import LoraSection
from glm45_train.convert.sources import HFTensorSource, load_weights
from glm45_train.lora import (
    LoraError,
    apply_lora,
    base_weight_name,
    is_lora_name,
    iter_adapters,
    load_lora_state_dict,
    lora_deltas,
    lora_sharded_state_dict,
    lora_state_dict,
    merge_lora,
)
from glm45_train.model.build import build_model
from glm45_train.model.forward import logits
from glm45_train.model.hf_config import to_transformer_config
from tests.conftest import REPO_ROOT
from tests.dist.lora_common import full_grads, lora_section, randomize_lora, tokens

EXPECTED_WRAPPED = {  # tiny Air: 3 decoder layers (1 dense) + 1 MTP layer, 8 experts
    "linear_qkv": 4,
    "linear_proj": 4,
    "linear_fc1": 4,  # 1 dense MLP + 3 shared experts
    "linear_fc2": 4,
    "experts.linear_fc1": 24,
    "experts.linear_fc2": 24,
    "router": 3,
}


@pytest.fixture(scope="module")
def air(tiny_air, megatron_world):
    """(HF tensor source, the loaded local-spec state dict, checkpoint directory)."""
    source = HFTensorSource(tiny_air)
    model = build_model(source.hf)
    load_weights(model, source)
    return source, model.state_dict(), tiny_air


def fresh(air, lora=None, **overrides) -> Any:
    """The tiny Air with its HF weights (eval mode), LoRA applied when `lora` is given."""
    source, state, _ = air
    model = build_model(source.hf, to_transformer_config(source.hf, perform_initialization=False, **overrides))
    model.load_state_dict(state)
    model.eval()
    if lora is not None:
        apply_lora(model, lora)
    return model


def loss_of(model: Any, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    return model(ids, positions, None, labels=ids).mean()


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_fresh_adapters_keep_logits_and_only_they_train(air):
    model = fresh(air)
    ids = tokens(air[0].hf.vocab_size, seed=1)
    before, base_keys = logits(model, ids), set(model.state_dict())
    report = apply_lora(model, lora_section())
    assert report.wrapped == EXPECTED_WRAPPED
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)  # B = 0: exactly the base function
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == {name for name, _ in model.named_parameters() if is_lora_name(name)}
    assert report.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert {k for k in model.state_dict() if not is_lora_name(k)} == base_keys
    state = lora_state_dict(model)
    assert all(t.abs().max() == 0 for n, t in state.items() if n.endswith("lora_B"))
    a_tensors = [t for n, t in state.items() if n.endswith("lora_A")]
    assert all(t.abs().max() > 0 for t in a_tensors) and not torch.equal(a_tensors[0], a_tensors[1])
    with pytest.raises(LoraError, match="already"):
        apply_lora(model, lora_section())


def test_megatron_attributes_on_lora_tensors(air):
    model = fresh(air, lora_section())
    params: dict[str, Any] = dict(model.named_parameters())
    qkv = "decoder.layers.0.self_attention.linear_qkv_lora"
    proj = "decoder.layers.0.self_attention.linear_proj_lora"
    expert = "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1_lora"
    assert not params[f"{qkv}.lora_A"].tensor_model_parallel  # column: A replicated, B split on dim 0
    assert (params[f"{qkv}.lora_B"].tensor_model_parallel, params[f"{qkv}.lora_B"].partition_dim) == (True, 0)
    assert (params[f"{proj}.lora_A"].tensor_model_parallel, params[f"{proj}.lora_A"].partition_dim) == (True, 1)
    assert not params[f"{proj}.lora_B"].tensor_model_parallel  # row: A split on dim 1, B replicated
    assert params[f"{qkv}.lora_A"].allreduce and not params[f"{expert}.lora_A"].allreduce
    assert params["decoder.layers.1.mlp.router_lora.lora_B"].allreduce
    assert not any(p.sequence_parallel for n, p in params.items() if is_lora_name(n))  # no SP in this model


def test_router_and_expert_targets_act_and_get_gradients(air):
    ids = tokens(air[0].hf.vocab_size, seed=2)
    base = logits(fresh(air), ids)
    for targets in (["router"], ["experts.linear_fc1", "experts.linear_fc2"]):
        model = fresh(air, lora_section(targets))
        randomize_lora(model)
        assert (logits(model, ids) - base).abs().max() > 1e-3, targets
        loss_of(model, ids).backward()
        trained = {name.split("_lora.")[0] for name, g in full_grads(model).items() if g.abs().max() > 0}
        if targets == ["router"]:
            assert len(trained) == 3  # every router (2 decoder MoE layers, 1 MTP layer)
        else:  # only experts that received tokens learn: each MoE layer has some of them
            layers = {name.split(".mlp.")[0] for name in trained}
            assert layers == {"decoder.layers.1", "decoder.layers.2", "mtp.layers.0.transformer_layer"}
            assert len(trained) >= 2 * 3 * 3  # >= 3 experts x fc1, fc2 in each layer


def test_merge_equals_adapters_and_deltas(air):
    model = fresh(air, lora_section())
    randomize_lora(model)
    ids = tokens(air[0].hf.vocab_size, seed=3)
    with_adapters, state = logits(model, ids), lora_state_dict(model)
    base = {k: v for k, v in air[1].items() if v is not None}
    deltas = dict(lora_deltas(state, scaling=8.0 / 4))
    assert merge_lora(model) == 67
    assert not iter_adapters(model) and set(model.state_dict()) == set(air[1])
    merged = model.state_dict()
    assert set(deltas) == {base_weight_name(n) for n in state} and len(deltas) == 67
    for name, delta in deltas.items():
        torch.testing.assert_close(merged[name] - base[name], delta, rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(logits(model, ids), with_adapters, rtol=1e-5, atol=2e-5)
    assert (logits(model, ids) - logits(fresh(air), ids)).abs().max() > 1e-3  # the merge changed the model


def test_state_dict_round_trip_and_refusals(air, tmp_path):
    from megatron.core import dist_checkpointing

    trained = fresh(air, lora_section())
    randomize_lora(trained, seed=11)
    state = lora_state_dict(trained)
    with torch.no_grad():
        trained.decoder.layers[0].self_attention.linear_qkv_lora.lora_A.mul_(2.0)
    assert max_diff(lora_state_dict(trained), state) > 1e-3  # the state is a copy, not a view of the parameters
    load_lora_state_dict(trained, state)
    ids = tokens(air[0].hf.vocab_size, seed=4)
    (tmp_path / "ckpt").mkdir()
    dist_checkpointing.save(lora_sharded_state_dict(trained), str(tmp_path / "ckpt"))

    model = fresh(air, lora_section())
    load_lora_state_dict(model, state)
    torch.testing.assert_close(logits(model, ids), logits(trained, ids), rtol=0, atol=0)
    reloaded = fresh(air, lora_section())
    loaded = dist_checkpointing.load(lora_sharded_state_dict(reloaded), str(tmp_path / "ckpt"))
    reloaded.load_state_dict(loaded, strict=False)
    assert max_diff(lora_state_dict(reloaded), state) == 0

    name = "decoder.layers.0.self_attention.linear_qkv_lora.lora_B"
    with pytest.raises(LoraError, match="lacks"):
        load_lora_state_dict(model, {k: v for k, v in state.items() if k != name})
    with pytest.raises(LoraError, match="shape"):
        load_lora_state_dict(model, {**state, name: state[name][:, :2]})
    with pytest.raises(LoraError, match="no adapter"):
        load_lora_state_dict(model, {**state, "decoder.layers.9.mlp.linear_fc1_lora.lora_A": state[name]})


def test_full_recompute_keeps_lora_gradients(air, monkeypatch):
    from megatron.core.tensor_parallel import random as mcore_random

    # Megatron's recompute saves the CUDA RNG state; on CPU there is none (runtime/cpu.py does not bridge it yet).
    monkeypatch.setattr(mcore_random, "_get_cuda_rng_state", lambda *args, **kwargs: torch.get_rng_state())
    monkeypatch.setattr(mcore_random, "_set_cuda_rng_state", lambda *args, **kwargs: None)
    ids = tokens(air[0].hf.vocab_size, seed=5)
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    grads = []
    for overrides in ({}, recompute):
        model = fresh(air, lora_section(["linear_qkv", "linear_proj"]), **overrides)
        randomize_lora(model)
        model.train()
        loss_of(model, ids).backward()
        grads.append(full_grads(model))
    assert all(g.abs().max() > 0 for g in grads[1].values())
    assert max_diff(grads[0], grads[1]) < 1e-6
    model.embedding._forward_hooks.clear()  # negative control: without the embedding hook, no gradient at all
    assert not loss_of(model, ids).requires_grad


def test_apply_refuses_bad_sections(air):
    model = fresh(air)
    with pytest.raises(LoraError, match="enabled"):
        apply_lora(model, LoraSection(enabled=False))
    with pytest.raises(LoraError, match="eh_proj"):
        apply_lora(model, lora_section(["eh_proj"]))
    assert not iter_adapters(model) and all(p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_tp2_matches_world_1(air, tmp_path):
    from megatron.core import dist_checkpointing

    from tests.test_expert_parallel import torchrun

    model = fresh(air)
    (tmp_path / "base_ckpt").mkdir()
    (tmp_path / "lora_ckpt_tp2").mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path / "base_ckpt"))
    apply_lora(model, lora_section())
    randomize_lora(model)
    torch.save(lora_state_dict(model), tmp_path / "start.pt")
    ids = tokens(air[0].hf.vocab_size, seed=3)
    reference_logits, loss = logits(model, ids), loss_of(model, ids)
    loss.backward()
    reference_grads = full_grads(model)

    torchrun(str(REPO_ROOT / "tests/dist/lora_tp.py"), str(air[2]), str(tmp_path))
    tp = torch.load(tmp_path / "tp.pt")
    torch.testing.assert_close(tp["logits"], reference_logits, rtol=0, atol=1e-5)
    assert abs(tp["loss"] - loss.item()) < 1e-6
    for name, grad in reference_grads.items():
        scale = grad.abs().max().clamp_min(1e-12)
        assert (tp["grads"][name] - grad).abs().max() / scale < 1e-5, name

    reloaded = fresh(air, lora_section())  # adapter-only checkpoint written at TP 2, read at TP 1
    reloaded.load_state_dict(
        dist_checkpointing.load(lora_sharded_state_dict(reloaded), str(tmp_path / "lora_ckpt_tp2")), strict=False
    )
    assert max_diff(lora_state_dict(reloaded), torch.load(tmp_path / "start.pt")) == 0
    assert "expert tensor parallel" in tp["etp_error"]
    check_sequence_parallel_mlp(tp)


def check_sequence_parallel_mlp(tp: dict) -> None:
    from tests.dist.lora_common import build_mlp, mlp_inputs

    root = build_mlp(tp=1, tp_rank=0, sequence_parallel=False)
    x, w = mlp_inputs()
    out, _ = root.mlp(x)
    (out * w).sum().backward()
    reference = full_grads(root)
    torch.testing.assert_close(tp["mlp_out"], out.detach(), rtol=0, atol=1e-5)
    assert max_diff(tp["mlp_grads"], reference) < 1e-4
    replicated = ["mlp.linear_fc1_lora.lora_A", "mlp.linear_fc2_lora.lora_B"]  # marked sequence_parallel
    for name in replicated:  # negative control: without the TP all-reduce their gradients are partial
        assert (tp["mlp_grads_unreduced"][name] - reference[name]).abs().max() > 1e-2, name


@pytest.mark.slow
def test_ep2_training_matches_world_1(air, tmp_path):
    from megatron.core import dist_checkpointing

    from tests.dist.lora_ep import STEPS, train
    from tests.test_expert_parallel import torchrun

    (tmp_path / "lora_ckpt_ep2").mkdir()
    torchrun(str(REPO_ROOT / "tests/dist/lora_ep.py"), str(air[2]), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    model = fresh(air, lora_section(), mtp_loss_scaling_factor=0.3)
    randomize_lora(model)
    model.train()
    vocab = air[0].hf.vocab_size
    batch = torch.cat([tokens(vocab, seed=100 + r, batch=1, seq=32) for r in range(2)])
    losses = train(model, batch)
    expected = lora_state_dict(model)

    assert len(losses) == STEPS
    for step, loss in enumerate(losses):
        assert abs((ranks[0]["losses"][step] + ranks[1]["losses"][step]) / 2 - loss) < 1e-5
    assert max_diff(ranks[0]["lora"], expected) < 1e-6 and max_diff(ranks[1]["lora"], expected) < 1e-6
    experts = [n for n in expected if ".local_experts." in n]
    assert max((ranks[0]["control"][n] - expected[n]).abs().max().item() for n in experts) > 1e-4

    reloaded = fresh(air, lora_section())  # adapter-only checkpoint written at EP 2, read at EP 1
    loaded = dist_checkpointing.load(lora_sharded_state_dict(reloaded), str(tmp_path / "lora_ckpt_ep2"))
    reloaded.load_state_dict(loaded, strict=False)
    assert max_diff(lora_state_dict(reloaded), ranks[0]["lora"]) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and Transformer Engine")
def test_transformer_engine_layers(tiny_air, megatron_world):
    """TE spec: fused LayerNorm+linear qkv/fc1, TE row/column linears, TEGroupedMLP experts."""
    pytest.importorskip("transformer_engine")
    source = HFTensorSource(tiny_air, spec="te")
    model = build_model(source.hf, use_te=True)
    load_weights(model, source)
    model.eval()
    ids = tokens(source.hf.vocab_size, seed=6).cuda()
    before = logits(model, ids)
    report = apply_lora(model, lora_section())
    assert report.wrapped == EXPECTED_WRAPPED | {"experts.linear_fc1": 3, "experts.linear_fc2": 3}  # grouped
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)
    randomize_lora(model)
    with_adapters = logits(model, ids)
    assert (with_adapters - before).abs().max() > 1e-3
    loss_of(model, ids).backward()
    assert all(g.abs().max() > 0 for n, g in full_grads(model).items() if ".local_experts." not in n)
    state = lora_state_dict(model)
    assert {n for n in state if ".local_experts." in n} == {
        f"{layer}.mlp.experts.local_experts.{e}.linear_fc{i}_lora.lora_{ab}"
        for layer in ("decoder.layers.1", "decoder.layers.2", "mtp.layers.0.transformer_layer")
        for e in range(8)
        for i in (1, 2)
        for ab in "AB"
    }
    assert merge_lora(model) == 4 * 4 + 3 + 3 * 8 * 2
    torch.testing.assert_close(logits(model, ids), with_adapters, rtol=1e-4, atol=1e-4)
