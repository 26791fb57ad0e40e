"""Each CPU adaptation of Megatron-Core (glm45_train/runtime/cpu.py) does what its row promises."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from glm45_train.runtime import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the adaptations are CPU-only by design")


def test_apply_is_idempotent_and_reports_cpu_mode():
    assert cpu.apply() is True
    assert cpu.apply() is True


def test_current_device_answers_cpu_so_the_router_builds(megatron_world):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.router import TopKRouter

    from glm45_train.model.hf_config import Glm45Config, to_transformer_config
    from glm45_train.model.tiny import tiny_config

    assert torch.cuda.current_device() == torch.device("cpu")
    config = to_transformer_config(Glm45Config.from_dict(tiny_config("air", 128, [0, 1, 2])))
    router = TopKRouter(config=config, pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    assert router.weight.device.type == "cpu" and router.expert_bias.dtype == torch.float32


def test_rng_tracker_forks_named_streams_reproducibly(megatron_world):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    assert isinstance(tracker, cpu.CpuRNGStatesTracker)
    saved = tracker.get_states()
    before_default = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before_default)  # the default stream is untouched
    tracker.set_states(saved)
    with tracker.fork():
        again = torch.rand(4)
    assert torch.equal(first, again)  # restoring the states replays the stream (exact resume)
    with pytest.raises(RuntimeError, match="not added"), tracker.fork("no-such-stream"):
        pass


def test_missing_te_symbol_is_defined():
    from megatron.core.transformer.moe import moe_utils

    assert moe_utils.te_general_gemm is None


def test_synchronize_is_a_noop():
    assert torch.cuda.synchronize() is None


def test_default_causal_mask_is_built_on_cpu():
    from megatron.core.fusions import fused_softmax

    mask = fused_softmax.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.dtype == torch.bool
    assert torch.equal(mask, torch.ones(4, 4).triu(1).bool())


def test_full_recompute_gives_the_same_gradients(megatron_world, tiny_air):
    from glm45_train.convert.sources import HFTensorSource, load_weights
    from glm45_train.model.build import build_model
    from glm45_train.model.hf_config import to_transformer_config

    source = HFTensorSource(tiny_air)
    tokens = torch.randint(0, source.hf.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    grads = []
    for recompute in ({}, {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}):
        model = build_model(source.hf, to_transformer_config(source.hf, **recompute))
        load_weights(model, source)
        model(tokens, torch.arange(16)[None], None, labels=tokens).mean().backward()
        grads.append(model.decoder.layers[0].self_attention.linear_qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)


def _norm_config(sequence_parallel: bool) -> SimpleNamespace:
    """What Megatron's local norm reads of a TransformerConfig."""
    return SimpleNamespace(
        sequence_parallel=sequence_parallel,
        normalization="RMSNorm",
        layernorm_zero_centered_gamma=False,
        persist_layer_norm=False,
        memory_efficient_layer_norm=False,
    )


def test_local_norm_builds_with_sequence_parallel_and_marks_its_weight():
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    cpu.apply()
    norm = WrappedTorchNorm(_norm_config(sequence_parallel=True), 64, eps=1e-5)
    assert isinstance(norm, torch.nn.RMSNorm) and norm.eps == 1e-5
    assert norm.weight.sequence_parallel is True  # finalize_model_grads sums it over the TP group
    plain = WrappedTorchNorm(_norm_config(sequence_parallel=False), 64)
    assert not getattr(plain.weight, "sequence_parallel", False)
    with pytest.raises(AssertionError, match="zero_centered_gamma"):  # Megatron's other refusals still apply
        WrappedTorchNorm(SimpleNamespace(**{**vars(_norm_config(True)), "layernorm_zero_centered_gamma": True}), 64)


def test_mtp_stage_sets_up_its_embedding_copy_on_cpu(megatron_world):
    """The last pipeline stage with MTP (not the first): the copy is zeroed, then averaged with the first stage's."""
    import torch.distributed as dist
    from megatron.core.models.common.language_module.language_module import LanguageModule

    copy = torch.nn.Parameter(torch.ones(8, 4))
    last_stage = SimpleNamespace(
        pre_process=False,
        post_process=True,
        mtp_process=True,
        share_embeddings_and_output_weights=False,
        config=SimpleNamespace(mtp_num_layers=1, pipeline_model_parallel_size=2),
        output_layer=SimpleNamespace(weight=torch.nn.Parameter(torch.zeros(8, 4))),
        vp_stage=None,
        vp_size=None,
        pp_group=SimpleNamespace(rank=lambda: 1, size=lambda: 2),
        embd_group=dist.group.WORLD,
        _is_in_embd_group=lambda: True,
        shared_embedding_or_output_weight=lambda: copy,
    )
    LanguageModule.setup_embeddings_and_output_layer(last_stage)  # calls weight.data.cuda() inside
    assert copy.device.type == "cpu" and copy.shared_embedding and not copy.any()
