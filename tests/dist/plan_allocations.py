"""What real 2-process runs allocate per rank, for `plan` to be checked against (run under torchrun, gloo).

1. Parameter bytes per rank of the tiny GLM-4.5 built (on `meta`) at TP 2, PP 2, EP 2, ETP 2 and TP 2 + EP 2,
   each stage with the pre/post-processing and MTP placement Megatron gives it.
2. At EP 2 (data parallel 2 for dense weights): Megatron's DDP + distributed optimizer after one step;
   parameter, grad-buffer and optimizer-state bytes per rank.

Writes OUT/rank{r}.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

LAYOUTS = {"tp2": dict(tp=2), "pp2": dict(pp=2), "ep2": dict(ep=2), "etp2": dict(etp=2), "tp2ep2": dict(tp=2, ep=2)}


def built_bytes(hf, layout) -> dict:
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec

    from glm45_train.model.hf_config import to_transformer_config
    from glm45_train.runtime import cpu, distributed

    distributed.initialize(layout)
    config = to_transformer_config(
        hf,
        params_dtype=torch.bfloat16,
        layout=layout,
        on_gpu=False,
        perform_initialization=False,
        pipeline_dtype=torch.bfloat16,
    )
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    mtp = get_gpt_mtp_block_spec(config, block.layer_specs[-1], use_transformer_engine=False)
    with cpu.on_cpu_device(), torch.device("meta"):  # PP + MTP: the last stage's embedding copy calls .cuda()
        model = GPTModel(
            config=config,
            transformer_layer_spec=block,
            vocab_size=hf.vocab_size,
            max_sequence_length=hf.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            position_embedding_type="rope",
            rotary_percent=hf.partial_rotary_factor,
            mtp_block_spec=mtp,
        )
    return {
        "stage": parallel_state.get_pipeline_model_parallel_rank(),
        "bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }


def trained_bytes(hf_dir: str) -> dict:
    """EP 2, bf16, distributed optimizer: what Megatron allocates on this rank after one step."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from glm45_train.config.layout import ParallelLayout
    from glm45_train.model.build import build_model
    from glm45_train.model.hf_config import Glm45Config, to_transformer_config
    from glm45_train.runtime import cpu, distributed

    layout = ParallelLayout(ep=2)
    distributed.initialize(layout)
    hf = Glm45Config.from_file(hf_dir)
    config = to_transformer_config(hf, params_dtype=torch.bfloat16, layout=layout, mtp_loss_scaling_factor=0.3)
    model = build_model(hf, config)
    with cpu.on_cpu_device():
        ddp = DistributedDataParallel(
            config,
            DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True
            ),
            model,
        )
        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=1e-4, bf16=True, params_dtype=torch.bfloat16, use_distributed_optimizer=True
            ),
            [ddp],
        )
        tokens = torch.randint(0, hf.vocab_size, (1, 16), generator=torch.Generator().manual_seed(dist.get_rank()))
        ddp(tokens, torch.arange(16)[None], None, labels=tokens).mean().backward()
        ddp.finish_grad_sync()
        optimizer.step()
    weight_padding, grad_padding = ddp_padding_bytes(ddp)
    return {
        "weights": parameter_bytes(model),
        "gradients": grad_buffer_bytes(ddp),
        "optimizer": optimizer_state_bytes(optimizer, model),
        "weight_padding": weight_padding,
        "grad_padding": grad_padding,
    }


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the storages holding the model's parameters (DDP's param buffer when it owns them)."""
    return _storage_bytes(model.parameters())


def optimizer_state_bytes(optimizer, model: torch.nn.Module) -> int:
    """Bytes the optimizer holds beyond the model: fp32 master copies and Adam m, v (scalar `step` ignored)."""
    owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tensors = []
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = inner.optimizer
        for group in torch_optimizer.param_groups:
            for param in group["params"]:
                tensors.append(param)
                state = torch_optimizer.state.get(param, {})
                tensors += [v for v in state.values() if torch.is_tensor(v) and v.numel() > 1]
    return _storage_bytes(t for t in tensors if t.untyped_storage().data_ptr() not in owned)


def grad_buffer_bytes(ddp) -> int:
    return sum(b.grad_data.numel() * b.grad_data.element_size() for b in _buffers(ddp))


def ddp_padding_bytes(ddp) -> tuple[int, int]:
    """(param buffer, grad buffer) bytes Megatron's DDP adds for alignment with the distributed optimizer
    (each parameter starts at a multiple of 64 elements, each bucket ends at a multiple of lcm(dp, 128))."""
    weights = grads = 0
    for buffer in _buffers(ddp):
        padding = buffer.grad_data.numel() - sum(p.numel() for p in buffer.params)
        grads += padding * buffer.grad_data.element_size()
        if buffer.param_data is not None:
            weights += padding * buffer.param_data.element_size()
    return weights, grads


def _buffers(ddp) -> list:
    return list(ddp.buffers) + list(ddp.expert_parallel_buffers)


def _storage_bytes(tensors) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def main(hf_dir: str, out_dir: str) -> None:
    from glm45_train.config.layout import ParallelLayout
    from glm45_train.model.hf_config import Glm45Config
    from glm45_train.runtime import distributed

    tiny = json.loads((Path(hf_dir) / "config.json").read_text())
    hf = Glm45Config.from_dict({**tiny, "num_hidden_layers": 4})  # 4 layers: divisible by pp 2
    result = {name: built_bytes(hf, ParallelLayout(**layout)) for name, layout in LAYOUTS.items()}
    result["trained_ep2"] = trained_bytes(hf_dir)
    (Path(out_dir) / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
