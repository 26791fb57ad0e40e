"""From a validated recipe to a ready Trainer: process groups, GLM-4.5 model, base weights, LoRA, Megatron's
DDP wrapper, (distributed) optimizer and LR scheduler — all Megatron-Core's own machinery.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from glm45_train.config.recipe import Recipe, check_trainable_layout, mtp_layers, validate_layout
from glm45_train.model.hf_config import Glm45Config, to_transformer_config
from glm45_train.runtime import cpu, distributed

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Trainer:
    recipe: Recipe
    hf: Glm45Config
    config: Any  # megatron TransformerConfig
    model: Any  # megatron DistributedDataParallel wrapping the GPTModel
    optimizer: Any
    scheduler: Any
    total_steps: int
    dp_rank: int
    dp_size: int

    @property
    def module(self) -> Any:
        return self.model.module

    @property
    def lora(self) -> bool:
        return self.recipe.lora.enabled

    @property
    def checkpoint_kind(self) -> str:
        return "lora" if self.lora else "full"

    @property
    def save_optimizer(self) -> bool:
        return self.recipe.checkpoint.save_optimizer

    @property
    def keep_last(self) -> int:
        return self.recipe.checkpoint.keep_last

    def cpu_context(self) -> contextlib.AbstractContextManager[object]:
        return cpu.on_cpu_device()

    def model_sharded_state_dict(self, for_save: bool) -> dict[str, Any]:
        if self.lora:
            from glm45_train.lora import lora_sharded_state_dict

            return lora_sharded_state_dict(self.module)
        from glm45_train.convert.torch_dist.layout import te_style_sharded_state_dict

        # the converter's key convention: a full-SFT checkpoint exports with `export --to-hf` like a converted one
        return te_style_sharded_state_dict(self.module, for_save=for_save)

    def load_model_state(self, state: dict[str, Any]) -> None:
        if not self.lora:
            self.module.load_state_dict(state, strict=True)
            return
        from glm45_train.lora import is_lora_name

        result = self.module.load_state_dict(state, strict=False)  # adapters only; the base came from model.source
        unset = [k for k in result.missing_keys if is_lora_name(k)]
        if unset or result.unexpected_keys:
            raise RuntimeError(
                f"adapter checkpoint does not match the model: missing {unset[:3]}, "
                f"unexpected {result.unexpected_keys[:3]}"
            )


def model_config_of(source: str | Path) -> Glm45Config:
    """The GLM-4.5 config of an HF directory or of a checkpoint written by `export --to-mcore`."""
    path = Path(source)
    if (path / "config.json").exists():
        return Glm45Config.from_file(path)
    from glm45_train.convert.torch_dist.reader import McoreTensorSource

    return McoreTensorSource(path).hf


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def transformer_config(recipe: Recipe, hf: Glm45Config) -> Any:
    train = recipe.train
    overrides: dict[str, Any] = dict(
        calculate_per_token_loss=True,  # loss = mean over every trained token of the global batch
        pipeline_dtype=DTYPES[recipe.model.dtype],  # what pipeline stages send each other
        mtp_num_layers=mtp_layers(recipe, hf),
        mtp_loss_scaling_factor=train.mtp_loss_weight,
        moe_router_bias_update_rate=1e-3 if recipe.model.train_expert_bias else 0.0,
    )
    if train.aux_loss_coeff > 0:
        overrides.update(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=aux_loss_coeff(recipe))
    if train.recompute == "full":
        overrides.update(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=train.recompute_num_layers
        )
    elif train.recompute == "selective":
        overrides.update(recompute_granularity="selective")
    return to_transformer_config(
        hf, params_dtype=DTYPES[recipe.model.dtype], layout=recipe.parallel.layout(), **overrides
    )


def aux_loss_coeff(recipe: Recipe) -> float:
    """The coefficient to hand Megatron so that the aux loss weighs `train.aux_loss_coeff` at every layout.

    With per-token loss, Megatron 0.16.1 multiplies each rank's aux loss by the tokens that rank routed
    (router.py, attach_and_log_load_balancing_loss) while the LM loss counts the whole sequence on every TP rank;
    under sequence parallelism a rank routes 1/tp of the sequence, so the aux loss would act tp times weaker
    (measured on the tiny model at TP 2 + SP: grad norm 4.3 % off TP 1 with coefficient 0.1; compensated: equal).
    """
    p = recipe.parallel
    return recipe.train.aux_loss_coeff * (p.tp if p.sp and p.tp > 1 else 1)


def load_base_weights(model: Any, source: str | Path) -> None:
    path = Path(source)
    if (path / "config.json").exists():
        from megatron.core import parallel_state

        from glm45_train.convert.sources import HFTensorSource, load_weights

        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            raise ValueError(
                f"{path} is an HF checkpoint; for tp > 1 convert it first with "
                "`glm45-train export --to-mcore` and point model.source at the result"
            )
        load_weights(model, HFTensorSource(path))  # each pipeline stage its own layers
        return
    from glm45_train.convert.load import load_mcore

    load_mcore(model, path)


def build_trainer(recipe: Recipe, total_steps_for: Any) -> Trainer:
    """Everything before the first step. `total_steps_for(dp_size)` gives the run length (it needs the data)."""
    from megatron.core import parallel_state

    hf = model_config_of(recipe.model.source)
    validate_layout(recipe, world_size_from_env(), hf)  # before any process group exists
    check_trainable_layout(recipe)
    distributed.initialize(recipe.parallel.layout(), seed=recipe.train.seed)
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    # Megatron's MoE loss tracker is per process, sized by the first model built: a later run in the same
    # process (tests, notebooks) with another layer count would index past it.
    get_moe_layer_wise_logging_tracker().clear()
    from glm45_train.model.build import build_model

    config = transformer_config(recipe, hf)
    model = build_model(  # each pipeline stage builds only its part (embedding first, output head last)
        hf,
        config,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    load_base_weights(model, recipe.model.source)
    if recipe.lora.enabled:
        from glm45_train.lora import apply_lora

        report = apply_lora(model, recipe.lora, seed=recipe.train.seed)
        if dist.get_rank() == 0:
            print(report.summary(), flush=True)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    total_steps = total_steps_for(dp_size)
    with cpu.on_cpu_device():
        ddp_model, optimizer = _wrap(config, model, recipe)
    scheduler = _scheduler(optimizer, recipe, total_steps)
    return Trainer(recipe, hf, config, ddp_model, optimizer, scheduler, total_steps, dp_rank, dp_size)


def _wrap(config: Any, model: Any, recipe: Recipe) -> tuple[Any, Any]:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    train = recipe.train
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=torch.cuda.is_available(),  # overlapping needs CUDA streams
        use_distributed_optimizer=train.distributed_optimizer,
    )
    ddp_model = DistributedDataParallel(config, ddp_config, model)
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=train.lr,
        min_lr=train.min_lr,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        clip_grad=train.clip_grad,
        bf16=config.bf16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=train.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(optimizer_config, [ddp_model])
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp_model.no_sync
    config.grad_scale_func = optimizer.scale_loss
    return ddp_model, optimizer


def _scheduler(optimizer: Any, recipe: Recipe, total_steps: int) -> Any:
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    train = recipe.train
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train.lr,
        min_lr=train.min_lr,
        lr_warmup_steps=int(train.warmup_fraction * total_steps),
        lr_decay_steps=total_steps,
        lr_decay_style="cosine",
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=total_steps,
        wd_incr_style="constant",
    )
