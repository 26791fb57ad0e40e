"""GLM-4.5 in Megatron-Core: tiny presets train (forward + backward with MTP loss); full sizes build on `meta`."""

from __future__ import annotations

import pytest
import torch

from glm45_train.model.build import build_model, count_parameters, transformer_engine_usable
from glm45_train.model.hf_config import Glm45Config, to_transformer_config
from glm45_train.model.releases import RELEASED_CONFIGS
from tests.test_hf_config import AIR_RELEASE

GLM45_RELEASE = RELEASED_CONFIGS["glm45"]


def independent_count(c: dict) -> tuple[int, int]:
    """(main model, MTP layer) parameter counts from the config alone: the formula, not our mapping code."""
    h, v, d = c["hidden_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    attention = h * (q + 2 * kv) + (q + 2 * kv) + q * h + 2 * h + (2 * d if c["use_qk_norm"] else 0)
    dense_mlp = 3 * h * c["intermediate_size"]
    expert = 3 * h * c["moe_intermediate_size"]
    moe_mlp = c["n_routed_experts"] * (h + expert) + c["n_shared_experts"] * expert
    dense, moe = c["first_k_dense_replace"], c["num_hidden_layers"] - c["first_k_dense_replace"]
    main = 2 * v * h + h + dense * (attention + dense_mlp) + moe * (attention + moe_mlp)
    mtp = attention + moe_mlp + 3 * h + 2 * h * h  # enorm, hnorm, final norm, eh_proj; embeddings shared
    return main, mtp


@pytest.mark.parametrize(("release", "billions"), [(AIR_RELEASE, 106.8), (GLM45_RELEASE, 353.0)], ids=["air", "glm45"])
def test_full_size_builds_on_meta_with_the_published_parameter_count(megatron_world, release, billions):
    model = build_model(Glm45Config.from_dict(release), device="meta")
    counts = count_parameters(model)
    main, mtp = independent_count(release)
    assert counts["total"] == main + mtp
    assert counts["mtp"] == mtp
    assert abs(main / 1e9 - billions) / billions < 0.01
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("preset", ["air", "glm45"])
def test_tiny_preset_forward_backward_with_mtp_loss(megatron_world, tiny_dirs, preset):
    hf = Glm45Config.from_file(tiny_dirs[preset])
    model = build_model(hf, to_transformer_config(hf, mtp_loss_scaling_factor=0.3))
    assert len(model.decoder.layers) == hf.num_hidden_layers
    dense = [layer for layer in model.decoder.layers if not hasattr(layer.mlp, "router")]
    assert len(dense) == hf.first_k_dense_replace
    tokens = torch.randint(0, hf.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(24).expand(2, 24)
    loss = model(tokens, positions, None, labels=tokens)
    assert loss.shape == (2, 24) and torch.isfinite(loss).all()
    loss.mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    mtp_grad = grads["mtp.layers.0.eh_proj.weight"]
    assert mtp_grad.abs().sum() > 0  # the MTP loss reaches the MTP layer
    router = model.decoder.layers[-1].mlp.router
    assert router.expert_bias.dtype == torch.float32 and not router.expert_bias.requires_grad


def test_layer_spec_falls_back_to_local_without_cuda():
    assert transformer_engine_usable() is torch.cuda.is_available() or not torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert transformer_engine_usable() is False


@pytest.mark.gpu
@pytest.mark.skipif(not transformer_engine_usable(), reason="needs CUDA and Transformer Engine")
def test_transformer_engine_spec_on_gpu(megatron_world, tiny_air):
    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear

    hf = Glm45Config.from_file(tiny_air)
    model = build_model(hf).cuda()
    assert isinstance(model.decoder.layers[0].self_attention.linear_qkv, TELayerNormColumnParallelLinear)
