"""The engine `eval` samples with: vLLM (a `vllm serve` started on the export, or a running server) or
transformers, both behind the RL rollout protocol (`generate(requests, params)`).

Notable:
- vllm: the export is served with GLM-4.5's flags (serve/server.py) and the RL engine's arguments (CPU: eager,
  no chunked prefill, a KV cache of `kv_cache_gib`; GPUs: `gpu_memory_fraction`, `tp`); requests go out
  concurrently and vLLM batches them continuously. The server's log lands in the output directory.
- hf: transformers' model built from the export's config and fed its tensors (open_hf_reader: FP8 exports are
  dequantised), sampling batched as in RL (rl/engines/hf.py).
- Greedy decoding (temperature 0) takes the most likely token in both; in fp32 the two give the same responses.
  Sampling is seeded per response (`Request.seed + j`), so a sampled evaluation is reproducible.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from glm45_train.errors import UserError
from glm45_train.evaluate.models import EvalModel
from glm45_train.rl.rollout import Completion, Request, SamplingParams

ENGINES = ("auto", "vllm", "hf")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONFIG_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EvalEngine(Protocol):
    def generate(self, requests: list[Request], params: SamplingParams) -> list[list[Completion]]: ...

    def shutdown(self) -> None: ...


@dataclass(frozen=True)
class EngineOptions:
    kind: str = "auto"  # auto: vllm where it is installed, else hf
    dtype: str = "auto"  # auto: the export's torch_dtype
    seed: int = 0
    max_model_len: int = 4096
    kv_cache_gib: float = 1.0  # vllm on CPU
    gpu_memory_fraction: float = 0.9  # vllm on GPUs
    tp: int = 1  # vllm engine tensor parallel size


def engine_kind(kind: str, models: list[EvalModel]) -> str:
    """The engine `kind` stands for here; served models need vllm."""
    from glm45_train.runtime.vllm_cpu import is_installed

    if kind not in ENGINES:
        raise UserError(f"--engine {kind!r}: expected one of {', '.join(ENGINES)}")
    served = [model.label for model in models if model.url is not None]
    if kind == "hf" and served:
        raise UserError(f"--engine hf cannot sample from served models ({', '.join(served)}): use --engine vllm")
    if kind == "auto":
        return "vllm" if is_installed() or served else "hf"
    return kind


def open_engine(model: EvalModel, kind: str, options: EngineOptions, log_dir: Path) -> EvalEngine:
    if kind == "hf":
        assert model.directory is not None
        return open_hf(model.directory, weights_dtype(model.directory, options.dtype))
    return open_vllm(model, options, log_dir)


def weights_dtype(model_dir: Path, dtype: str) -> torch.dtype:
    if dtype in DTYPES:
        return DTYPES[dtype]
    if dtype != "auto":
        raise UserError(f"--dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    config = json.loads((model_dir / "config.json").read_text())
    return CONFIG_DTYPES.get(str(config.get("torch_dtype") or config.get("dtype")), torch.float32)


def open_hf(model_dir: Path, dtype: torch.dtype) -> EvalEngine:
    from glm45_train.formats.fp8 import open_hf_reader
    from glm45_train.rl.engines.hf import HFEngine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = HFEngine(model_dir, dtype=dtype, device=device)
    reader = open_hf_reader(model_dir)
    engine.update_weights((name, reader.get(name)) for name in reader.names())
    return engine


def open_vllm(model: EvalModel, options: EngineOptions, log_dir: Path) -> EvalEngine:
    from glm45_train.config.rl import RolloutSection
    from glm45_train.model.hf_config import Glm45Config
    from glm45_train.rl.engines.vllm import Server, VLLMEngine, as_cli_flags, engine_args
    from glm45_train.serve.server import VLLMServer

    if model.url is not None:
        server = Server(VLLMServer(url=model.url).start(timeout=60))
        return VLLMEngine(server, None, log_dir, loaded=True)
    assert model.directory is not None
    rollout: Any = RolloutSection(
        cpu_kv_cache_gib=options.kv_cache_gib, gpu_memory_fraction=options.gpu_memory_fraction, tp=options.tp
    )
    dtype = weights_dtype(model.directory, options.dtype)
    args = engine_args(dtype, options.seed, options.max_model_len, rollout)
    log_path = log_dir / f"vllm_{model.label}.log"
    print(f"eval: starting vLLM on {model.directory} (log: {log_path})", flush=True)
    server = Server(VLLMServer(model.directory, extra_args=as_cli_flags(args), log_path=log_path).start())
    return VLLMEngine(server, Glm45Config.from_file(model.directory / "config.json"), log_dir, loaded=True)
