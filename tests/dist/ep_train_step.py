"""One training step of the tiny GLM-4.5 at expert parallel 2 (run under torchrun, 2 processes, gloo).

Each rank takes its own batch (data parallel 2 for dense weights; experts split 4 + 4), runs forward and
backward with the MTP loss, reduces gradients by Megatron's DDP rule (dense: average over data parallel;
experts: local, scaled by 1 / data-parallel size) and applies one SGD step. Writes every updated parameter
under its global (EP 1) name to OUT/rank{r}.pt for the test to compare with a single-process step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

LR = 0.5


def batch_for(rank: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(100 + rank))


def main(hf_dir: str, out_dir: str) -> None:
    from megatron.core import parallel_state

    from glm45_train.config.layout import ParallelLayout
    from glm45_train.convert.sources import HFTensorSource, load_weights
    from glm45_train.convert.mapping.names import global_expert_name
    from glm45_train.model.build import build_model
    from glm45_train.model.hf_config import to_transformer_config
    from glm45_train.runtime import distributed

    layout = ParallelLayout(ep=2)
    distributed.initialize(layout)
    rank, world = dist.get_rank(), dist.get_world_size()
    source = HFTensorSource(hf_dir)
    model = build_model(source.hf, to_transformer_config(source.hf, layout=layout, mtp_loss_scaling_factor=0.3))
    load_weights(model, source)
    tokens = batch_for(rank, source.hf.vocab_size)
    positions = torch.arange(tokens.shape[1])[None]
    loss = model(tokens, positions, None, labels=tokens).mean()
    loss.backward()
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            param.grad /= world  # Megatron DDP's expert_gradient_scaling_factor = 1 / data-parallel size
        else:
            dist.all_reduce(param.grad, group=parallel_state.get_data_parallel_group())
            param.grad /= world
    with torch.no_grad():
        for param in model.parameters():
            param -= LR * param.grad
    local_experts = source.hf.n_routed_experts // layout.ep
    state = {
        global_expert_name(name, parallel_state.get_expert_model_parallel_rank(), local_experts): p.detach()
        for name, p in model.named_parameters()
    }
    torch.save({"loss": loss.item(), "params": state}, Path(out_dir) / f"rank{rank}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
