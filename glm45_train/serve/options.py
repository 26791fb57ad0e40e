"""What `glm45-train serve` checks and adds before vLLM starts: the export, the adapter, the vLLM arguments.

Notable:
- Everything is checked before any process starts, and a problem names its culprit: a missing directory, a
  directory without `config.json` (not an HF export), tokenizer or safetensors weights, an adapter given as
  the model, an adapter directory without `adapter_config.json`.
- An adapter becomes vLLM's LoRA flags: `--enable-lora --lora-modules NAME=DIR`, `--max-lora-rank` (the
  smallest vLLM accepts that holds the adapter's rank) and `--lora-target-modules` (the adapter's own
  targets). On CPU the targets matter: vLLM 0.32 runs expert LoRA only in Triton kernels, so an adapter whose
  targets include routed experts (or that names none, which means every module) is refused here, and the
  others need runtime/vllm_cpu.py's row 5 in the worker, which `--worker-extension-cls` brings
  (serve/vllm_worker.py).
- `--check` runs the server in fp32 (`--dtype float32`; item (a)'s 1e-4 needs it) and, on CPU, eager
  (`--enforce-eager`: torch.compile adds about a minute to the start and nothing to a check) with a 1 GiB KV
  cache (`--kv-cache-memory-bytes 1G`: by default vLLM's CPU worker reserves 92% of the machine's memory and
  refuses to start when other processes hold more than 8%), unless the user's own vLLM arguments say otherwise.
- The user's vLLM arguments always come last, so they win over ours.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from glm45_train.errors import UserError
from glm45_train.runtime.vllm_cpu import experts_targeted
from glm45_train.serve.server import SERVED_NAME
from glm45_train.serve.vllm_worker import EXTENSION

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.32's `--max-lora-rank` choices
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CHECK_CPU_KV_CACHE = "1G"  # --check on CPU: vLLM would otherwise reserve 92% of the machine's memory


@dataclass(frozen=True)
class Adapter:
    name: str  # the model name requests use for it
    directory: Path
    rank: int
    target_modules: list[str] | None  # None: a pattern or nothing, i.e. not an explicit list


def check_model_dir(path: str | Path) -> Path:
    """An HF export vLLM can serve: a directory with config.json, a tokenizer and safetensors weights."""
    directory = Path(path)
    if not directory.is_dir():
        raise UserError(f"{directory}: no such model directory")
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory}: no config.json, not an HF checkpoint (export one with `export --to-hf`)")
    if (directory / "adapter_config.json").is_file():
        raise UserError(f"{directory}: an HF-PEFT adapter, not a model; serve its base with --adapter {directory}")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{directory}: no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    if not any(directory.glob("*.safetensors")):
        raise UserError(f"{directory}: no *.safetensors weights")
    return directory


def read_adapter(path: str | Path, name: str | None = None) -> Adapter:
    """An HF-PEFT adapter directory (`export --to-hf --adapter-only`), checked to be servable here."""
    directory = Path(path)
    config_path = directory / "adapter_config.json"
    if not config_path.is_file():
        raise UserError(f"{directory}: no adapter_config.json, not an HF-PEFT adapter (`export --adapter-only`)")
    try:
        config = json.loads(config_path.read_text())
        rank = int(config["r"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{config_path}: not a LoRA adapter config ({err})") from None
    targets = config.get("target_modules")
    adapter = Adapter(name or directory.name, directory.resolve(), rank, targets if isinstance(targets, list) else None)
    if rank > VLLM_LORA_RANKS[-1]:
        raise UserError(f"{config_path}: rank {rank} is above vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}")
    if not torch.cuda.is_available() and experts_targeted(adapter.target_modules):
        raise UserError(
            f"{config_path}: target_modules {targets!r} reach the routed experts (or are not a list), and vLLM 0.32 "
            "serves expert LoRA only with Triton kernels, which do not run on CPU; serve the merged export "
            "(`export --to-hf --merge-lora`) instead"
        )
    return adapter


def given(extra_args: list[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in extra_args)


def served_name(extra_args: list[str]) -> str:
    """The base model's name in requests: the user's `--served-model-name` (its first name), else ours."""
    for index, arg in enumerate(extra_args):
        if arg.startswith("--served-model-name="):
            return arg.split("=", 1)[1]
        if arg == "--served-model-name" and index + 1 < len(extra_args):
            return extra_args[index + 1]
    return SERVED_NAME


def adapter_args(adapter: Adapter, extra_args: list[str]) -> list[str]:
    """vLLM's flags to serve `adapter` beside the base model (those the user set are left to them)."""
    args = ["--enable-lora", "--lora-modules", f"{adapter.name}={adapter.directory}"]
    if not given(extra_args, "--max-lora-rank"):
        args += ["--max-lora-rank", str(min(r for r in VLLM_LORA_RANKS if r >= adapter.rank))]
    if adapter.target_modules is not None and not given(extra_args, "--lora-target-modules"):
        args += ["--lora-target-modules", *adapter.target_modules]
    if not given(extra_args, "--worker-extension-cls"):
        args += ["--worker-extension-cls", EXTENSION]  # brings runtime/vllm_cpu.py row 5 into the worker
    return args


def check_args(extra_args: list[str]) -> list[str]:
    """What `--check` adds: fp32; on CPU eager mode and a small KV cache; each unless the user chose."""
    args = [] if given(extra_args, "--dtype") else ["--dtype", "float32"]
    if torch.cuda.is_available():
        return args
    if not given(extra_args, "--enforce-eager"):
        args.append("--enforce-eager")
    if not any(given(extra_args, flag) for flag in ("--kv-cache-memory-bytes", "--gpu-memory-utilization")):
        args += ["--kv-cache-memory-bytes", CHECK_CPU_KV_CACHE]
    return args
