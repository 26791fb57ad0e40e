"""Pieces shared by tests/test_lora.py and the LoRA torchrun scripts: the same inputs and adapters at every layout.

Everything here is a pure function of names and seeds, so a world-1 reference and a TP 2 / EP 2 run see the same
tokens, base weights and LoRA tensors. B is made nonzero (`randomize_lora`) so A gets gradients.
"""

from __future__ import annotations

from typing import Any

import torch

from glm45_train.config.recipe import LORA_TARGETS, LoraSection
from glm45_train.lora import iter_adapters, load_lora_state_dict, lora_state_dict
from glm45_train.lora.sharding import Shard, name_seeded_uniform, to_full, to_local

HIDDEN, FFN, SEQ, BATCH = 64, 32, 8, 2  # the stand-alone MLP of the sequence-parallel check


def lora_section(targets=LORA_TARGETS) -> LoraSection:
    return LoraSection(enabled=True, rank=4, alpha=8.0, dropout=0.0, targets=list(targets))


def tokens(vocab: int, seed: int, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def randomize_lora(model: torch.nn.Module, seed: int = 7) -> None:
    """Nonzero B from name-seeded generators (collective at TP/EP > 1: call on every rank)."""
    state = lora_state_dict(model)
    for name, tensor in state.items():
        if name.endswith("lora_B"):
            state[name] = name_seeded_uniform(name, tuple(tensor.shape), 0.05, seed)
    load_lora_state_dict(model, state)


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of every LoRA tensor, gathered to full tensors over TP (not over EP)."""
    grads = {}
    for adapter in iter_adapters(model):
        for name, param, shard in adapter.entries():
            assert param.grad is not None, name
            grads[name] = to_full(param.grad.detach(), shard).clone()
    return grads


def mlp_config(tp: int, sequence_parallel: bool):
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        num_attention_heads=4,
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
    )


@torch.no_grad()
def build_mlp(tp: int, tp_rank: int, sequence_parallel: bool) -> Any:
    """A root module holding Megatron's MLP (gated fc1, fc2; local layers) with LoRA on both linears."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP, MLPSubmodules

    from glm45_train.lora import apply_lora

    root: Any = torch.nn.Module()
    root.mlp = MLP(
        mlp_config(tp, sequence_parallel),
        MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
        ffn_hidden_size=FFN,
    )
    fc1 = name_seeded_uniform("fc1", (2 * FFN, HIDDEN), 0.2, 0)
    fc2 = name_seeded_uniform("fc2", (HIDDEN, FFN), 0.2, 0)
    root.mlp.linear_fc1.weight.copy_(to_local(fc1, Shard(0, tp_rank, tp, gated=True)))
    root.mlp.linear_fc2.weight.copy_(to_local(fc2, Shard(1, tp_rank, tp)))
    apply_lora(root, lora_section(["linear_fc1", "linear_fc2"]))
    randomize_lora(root)
    return root


def mlp_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """(x [s, b, h], loss weights [s, b, h]) for the MLP check."""
    x = name_seeded_uniform("x", (SEQ, BATCH, HIDDEN), 1.0, 0)
    return x, name_seeded_uniform("w", (SEQ, BATCH, HIDDEN), 1.0, 0)
