"""LoRA training at expert parallel 2 (run under torchrun, 2 processes, gloo); tests/test_lora.py compares with world 1.

LoRA on every target of the tiny GLM-4.5 (experts split 4 + 4), each rank its own batch, STEPS SGD steps.
Gradients are reduced by the rule Megatron's DDP derives from the tensors' attributes (`reduce_grads`):
`allreduce` True -> sum over data parallel, False -> sum over expert data parallel; both scaled by
1 / data-parallel size. The negative control reduces everything over data parallel (as if the expert adapters
lacked `allreduce=False`), which mixes different experts' gradients. Writes OUT/rank{r}.pt with the losses and
the full LoRA state after the steps, and an adapter-only torch_dist checkpoint OUT/lora_ckpt_ep2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

LR = 0.5
STEPS = 3


def reduce_grads(model: torch.nn.Module, honour_allreduce: bool = True) -> None:
    from megatron.core import parallel_state

    dp_group = parallel_state.get_data_parallel_group()
    expert_dp_group = parallel_state.get_expert_data_parallel_group()
    for param in model.parameters():
        if not param.requires_grad:
            continue
        expert = honour_allreduce and not getattr(param, "allreduce", True)
        assert param.grad is not None
        dist.all_reduce(param.grad, group=expert_dp_group if expert else dp_group)
        param.grad /= dp_group.size()


def train(model: torch.nn.Module, batch: torch.Tensor, honour_allreduce: bool = True) -> list[float]:
    positions = torch.arange(batch.shape[1]).expand_as(batch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for _ in range(STEPS):
        for param in trainable:
            param.grad = None
        loss = model(batch, positions, None, labels=batch).mean()
        loss.backward()
        reduce_grads(model, honour_allreduce)
        with torch.no_grad():
            for param in trainable:
                assert param.grad is not None
                param.sub_(LR * param.grad)
        losses.append(loss.item())
    return losses


def main(hf_dir: str, out_dir: str) -> None:
    from megatron.core import dist_checkpointing

    from glm45_train.config.layout import ParallelLayout
    from glm45_train.convert.sources import HFTensorSource, load_weights
    from glm45_train.lora import apply_lora, load_lora_state_dict, lora_sharded_state_dict, lora_state_dict
    from glm45_train.model.build import build_model
    from glm45_train.model.hf_config import to_transformer_config
    from glm45_train.runtime import distributed
    from tests.dist.lora_common import lora_section, randomize_lora, tokens

    layout = ParallelLayout(ep=2)
    distributed.initialize(layout)
    rank = dist.get_rank()
    source = HFTensorSource(hf_dir)
    model = build_model(source.hf, to_transformer_config(source.hf, layout=layout, mtp_loss_scaling_factor=0.3))
    load_weights(model, source)
    apply_lora(model, lora_section())
    randomize_lora(model)
    start = lora_state_dict(model)
    batch = tokens(source.hf.vocab_size, seed=100 + rank, batch=1, seq=32)
    losses = train(model, batch)
    dist_checkpointing.save(lora_sharded_state_dict(model), str(Path(out_dir) / "lora_ckpt_ep2"))
    trained = lora_state_dict(model)
    load_lora_state_dict(model, start)
    control = train(model, batch, honour_allreduce=False) and lora_state_dict(model)
    result = {"losses": losses, "lora": trained, "control": control}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
