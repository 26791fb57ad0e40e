"""The MFU numerator counts the matmul weights a token really passes through (checked against the meta build)."""

from __future__ import annotations

from glm45_train.model.build import build_model, count_parameters
from glm45_train.model.hf_config import Glm45Config
from glm45_train.train.mfu import matmul_weights_per_token, peak_flops
from tests.test_hf_config import AIR_RELEASE


def test_active_weights_match_the_built_model(megatron_world):
    hf = Glm45Config.from_dict(AIR_RELEASE)
    counts = count_parameters(build_model(hf, device="meta"))
    main = counts["total"] - counts["mtp"]
    norms_and_embedding = hf.vocab_size * hf.hidden_size + hf.hidden_size * (2 * hf.num_hidden_layers + 1)
    bias = hf.num_hidden_layers * (hf.num_attention_heads + 2 * hf.num_key_value_heads) * hf.head_dim
    routed_skipped = counts["experts"] - counts["experts"] * hf.num_experts_per_tok // hf.n_routed_experts
    assert matmul_weights_per_token(hf, with_mtp=False) == main - norms_and_embedding - bias - routed_skipped
    assert 11e9 < matmul_weights_per_token(hf, with_mtp=False) < 13e9  # "A12B": about 12B active parameters


def test_peak_by_device_name():
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA H20") == 148e12
    assert peak_flops("Tesla T4") is None
