"""Export a LoRA run for serving: merged into a full HF checkpoint, or as an HF-PEFT adapter.

Merged: the base model is streamed tensor by tensor through the mapping table; each adapted weight gets its
delta `(alpha/r) · B @ A` added in fp32, then is cast to the checkpoint dtype (the base's, or `dtype`).
Adapter: `adapter_config.json` + `adapter_model.safetensors` with HF module names. Fused Megatron adapters are
expressed exactly on HF modules: a fused qkv adapter (A, B) becomes q/k/v_proj adapters sharing A with B split
by the same group interleave as the weight; fc1 becomes gate/up_proj sharing A with B split [gate; up]; routed
experts would get per-expert names — but transformers >= 5 fuses GLM-4.5's expert projections and peft (0.21)
remaps every `gate/up/down_proj` target onto those fused expert parameters, dense MLPs included, so MLP, expert and
router adapters cannot be loaded faithfully by peft: they are refused for `--adapter-only` and exported merged.
Tokenizer, chat template and generation config travel with both.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from glm45_train.convert.mapping.table import Glm45Mapping
from glm45_train.convert.torch_dist.directory import check_output_dir, fresh_staging_dir, publish
from glm45_train.errors import UserError
from glm45_train.formats.hf_io import HFCheckpointWriter
from glm45_train.lora.adapter_io import LoraRun, read_lora_run
from glm45_train.lora.state import base_weight_name, lora_deltas

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PEFT_PREFIX = "base_model.model."


def _base_source(run: LoraRun):
    from glm45_train.convert.sources import open_source

    return open_source(run.base)


def _carry_assets(run: LoraRun, staging: Path) -> None:
    for path in sorted(run.directory.assets.iterdir()):
        if path.is_file():
            shutil.copy2(path, staging / path.name)


def export_merged(
    run_path: str | Path, out_dir: str | Path, *, dtype: str | None = None, overwrite: bool = False,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:  # fmt: skip
    """The run's adapters merged into its base model, as a complete HF checkpoint in `out_dir`."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    run = read_lora_run(run_path)
    deltas = dict(lora_deltas(run.state, run.scaling))
    source = _base_source(run)
    mapping = Glm45Mapping(run.hf, "local")
    unknown = sorted(set(deltas) - set(mapping.rules))
    if unknown:
        raise UserError(f"{run.directory.root}: adapters on weights the HF model does not have: {unknown[:3]}")
    staging = fresh_staging_dir(out_dir)
    writer = HFCheckpointWriter(staging, max_shard_bytes=max_shard_bytes)
    cast = DTYPES[dtype] if dtype else None
    for name in mapping.rules:
        tensor = source.get(name)
        if name in deltas:
            tensor = (tensor.float() + deltas[name]).to(cast or tensor.dtype)
        for hf_name, part in mapping.to_hf(name, tensor):
            writer.add(hf_name, _as(part, cast, hf_name))
    for copy_name, source_name in mapping.copies.items():  # the MTP layer's embedding / head copies
        rule = next(r for r in mapping.rules.values() if source_name in r.hf)
        writer.add(copy_name, _as(source.get(rule.mcore), cast, copy_name))
    writer.finish()
    _carry_assets(run, staging)
    if cast is not None:
        config = json.loads((staging / "config.json").read_text())
        config["torch_dtype"] = {"bf16": "bfloat16", "fp32": "float32"}[dtype or "bf16"]
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    publish(staging, out_dir)
    return out_dir


def _as(tensor: torch.Tensor, dtype: torch.dtype | None, hf_name: str) -> torch.Tensor:
    if dtype is None or hf_name.endswith("e_score_correction_bias"):  # the expert bias stays fp32
        return tensor.contiguous()
    return tensor.to(dtype).contiguous()


def peft_tensors(run: LoraRun) -> dict[str, torch.Tensor]:
    """Every adapter under HF-PEFT names (`base_model.model.<HF module>.lora_A.weight` / `.lora_B.weight`)."""
    from glm45_train.convert.mapping import transforms

    mapping = Glm45Mapping(run.hf, "local")
    hf = run.hf
    out: dict[str, torch.Tensor] = {}
    for name in sorted(n for n in run.state if n.endswith("_lora.lora_A")):
        base = base_weight_name(name)
        rule = mapping.rules.get(base)
        if rule is None or ".self_attn." not in rule.hf[0]:
            raise UserError(
                f"adapter on {base} cannot be exported for peft: transformers >= 5 fuses GLM-4.5's MLP/expert "
                "projections and peft remaps gate/up/down_proj targets onto the fused expert parameters (the router "
                "gate is no Linear at all), so only attention adapters load faithfully; export with --merge-lora"
            )
        lora_a, lora_b = run.state[name], run.state[name[: -len("lora_A")] + "lora_B"]
        if rule.transform == "qkv":
            b_parts: tuple[torch.Tensor, ...] = transforms.qkv_split(
                lora_b, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim
            )
        elif rule.transform == "gate_up":
            b_parts = transforms.gate_up_split(lora_b)
        else:
            b_parts = (lora_b,)
        for hf_weight, part in zip(rule.hf, b_parts, strict=True):
            module = PEFT_PREFIX + hf_weight.removesuffix(".weight")
            out[f"{module}.lora_A.weight"] = lora_a.clone()  # shared A, stored once per HF module
            out[f"{module}.lora_B.weight"] = part.contiguous()
    return out


def export_peft_adapter(run_path: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """`adapter_config.json` + `adapter_model.safetensors` (+ tokenizer files) loadable by peft and vLLM."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    run = read_lora_run(run_path)
    tensors = peft_tensors(run)
    staging = fresh_staging_dir(out_dir)
    save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
    modules = sorted({name.split(".")[-3] for name in tensors})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(run.base),
        "r": run.lora.rank,
        "lora_alpha": run.lora.alpha,
        "lora_dropout": run.lora.dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    _carry_assets(run, staging)
    publish(staging, out_dir)
    return out_dir
