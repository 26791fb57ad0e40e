"""LoRA at tensor parallel 2 (run under torchrun, 2 processes, gloo); tests/test_lora.py compares with world 1.

1. The tiny GLM-4.5 at TP 2 in eval mode (on CPU, MoE + TP training needs sequence parallelism, which the local
   torch norm refuses), base weights from a TP 1 torch_dist checkpoint, LoRA on every target with the test's
   start state: full logits, loss, every LoRA gradient gathered to full tensors, and an adapter-only torch_dist
   checkpoint written at TP 2.
2. Megatron's MLP with sequence parallelism (gated fc1 + fc2, LoRA on both): output, and LoRA gradients with and
   without the TP all-reduce that finalize_model_grads applies to tensors marked `sequence_parallel` (the control).
3. Expert tensor parallel 2: apply_lora on routed experts must refuse.
Rank 0 writes OUT/tp.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist


def gpt_part(hf_dir: str, out: Path) -> dict:
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from glm45_train.config.layout import ParallelLayout
    from glm45_train.lora import apply_lora, load_lora_state_dict, lora_sharded_state_dict
    from glm45_train.model.build import build_model
    from glm45_train.model.forward import without_mtp
    from glm45_train.model.hf_config import Glm45Config, to_transformer_config
    from glm45_train.runtime import distributed
    from tests.dist.lora_common import full_grads, lora_section, tokens

    layout = ParallelLayout(tp=2)
    distributed.initialize(layout)
    hf = Glm45Config.from_file(hf_dir)
    model = build_model(hf, to_transformer_config(hf, layout=layout))
    model.eval()
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(out / "base_ckpt")))
    apply_lora(model, lora_section())
    load_lora_state_dict(model, torch.load(out / "start.pt"))
    ids = tokens(hf.vocab_size, seed=3)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad(), without_mtp(model):
        logits = gather_from_tensor_model_parallel_region(model(ids, positions, None))
    loss = model(ids, positions, None, labels=ids).mean()
    loss.backward()
    grads = full_grads(model)
    dist_checkpointing.save(lora_sharded_state_dict(model), str(out / "lora_ckpt_tp2"))
    assert parallel_state.get_tensor_model_parallel_world_size() == 2
    return {"logits": logits, "loss": loss.item(), "grads": grads}


def sp_mlp_part() -> dict:
    from megatron.core import parallel_state

    from glm45_train.lora import iter_adapters
    from tests.dist.lora_common import build_mlp, full_grads, mlp_inputs

    rank = parallel_state.get_tensor_model_parallel_rank()
    group = parallel_state.get_tensor_model_parallel_group()
    root = build_mlp(tp=2, tp_rank=rank, sequence_parallel=True)
    x, w = mlp_inputs()
    out, _ = root.mlp(x.chunk(2)[rank])
    (out * w.chunk(2)[rank]).sum().backward()
    pieces = [torch.empty_like(out) for _ in range(2)]
    dist.all_gather(pieces, out.detach().contiguous(), group=group)
    raw = full_grads(root)
    for adapter in iter_adapters(root):
        for param in adapter.parameters():
            if getattr(param, "sequence_parallel", False):  # what finalize_model_grads does under sequence parallelism
                dist.all_reduce(param.grad, group=group)
    return {"mlp_out": torch.cat(pieces), "mlp_grads": full_grads(root), "mlp_grads_unreduced": raw}


def etp_part(hf_dir: str) -> str:
    from glm45_train.config.layout import ParallelLayout
    from glm45_train.lora import LoraError, apply_lora
    from glm45_train.model.build import build_model
    from glm45_train.model.hf_config import Glm45Config, to_transformer_config
    from glm45_train.runtime import distributed
    from tests.dist.lora_common import lora_section

    layout = ParallelLayout(tp=2, etp=2)
    distributed.initialize(layout)
    hf = Glm45Config.from_file(hf_dir)
    model = build_model(hf, to_transformer_config(hf, layout=layout))
    try:
        apply_lora(model, lora_section(["experts.linear_fc1"]))
    except LoraError as err:
        return str(err)
    return ""


def main(hf_dir: str, out_dir: str) -> None:
    from glm45_train.runtime import distributed

    out = Path(out_dir)
    result = gpt_part(hf_dir, out)
    result.update(sp_mlp_part())
    result["etp_error"] = etp_part(hf_dir)
    if dist.get_rank() == 0:
        torch.save(result, out / "tp.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
