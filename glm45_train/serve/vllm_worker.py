"""Methods our rollout engines add to vLLM's worker (`worker_extension_cls`): new weights from safetensors files.

Runs inside vLLM's worker process (in-process engines: the worker vLLM spawns; servers: the server's worker),
reached through `collective_rpc` (`LLM.collective_rpc`, or the server's `/collective_rpc` with
VLLM_SERVER_DEV_MODE=1, which passes string arguments only: the file list travels as JSON).

Notable:
- Files, not tensors: raw tensors do not pickle through vLLM's RPC ("cannot pickle memoryview objects"); the
  trainer writes its HF-named stream in buckets of safetensors files (rl/engines/weight_files.py) and this
  reads them lazily, one tensor at a time, into vLLM's layerwise reload (`model_runner.reload_weights`), which
  takes checkpoint names and does vLLM's own fusing (q/k/v -> qkv_proj, gate/up, per-expert -> w13/w2).
- Then runtime/vllm_cpu.py's row 2 (the routed experts repacked on CPU). The prefix cache is reset by the
  caller: it lives in the engine core, not here.
- Imported by vLLM's worker (`init_worker` resolves `--worker-extension-cls` before it builds the model), this
  module applies runtime/vllm_cpu.py's row 5 there: LoRA adapters that target no routed experts run on CPU.
  Imported anywhere else (the RL engine reads EXTENSION from here), it changes nothing.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any

from glm45_train.runtime.vllm_cpu import keep_untargeted_moe_on_cpu_experts

EXTENSION = "glm45_train.serve.vllm_worker.WeightLoader"  # for LLM(worker_extension_cls=) / --worker-extension-cls
LOAD_METHOD = "glm45_load_weights"
VLLM_WORKER_MODULE = "vllm.v1.worker.worker_base"  # loaded in every process that runs a vLLM worker

if VLLM_WORKER_MODULE in sys.modules:
    keep_untargeted_moe_on_cpu_experts()


def _tensors(files: list[str]) -> Iterator[tuple[str, Any]]:
    from safetensors import safe_open

    for path in files:
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open has keys(), no iteration)
                yield name, handle.get_tensor(name)


class WeightLoader:
    """Mixed into vLLM's worker class: `self.model_runner` is the worker's."""

    model_runner: Any

    def glm45_load_weights(self, files_json: str, repack_experts: str = "true") -> dict[str, Any]:
        """Load every tensor of the safetensors files `files_json` (a JSON list of paths) into the live model."""
        from glm45_train.runtime.vllm_cpu import repack_routed_experts

        started = time.perf_counter()
        names: list[str] = []

        def counted() -> Iterator[tuple[str, Any]]:
            for name, tensor in _tensors(json.loads(files_json)):
                names.append(name)
                yield name, tensor

        self.model_runner.reload_weights(weights_iterator=counted())
        repacked = repack_routed_experts(self.model_runner.get_model()) if repack_experts == "true" else 0
        return {"tensors": len(names), "repacked_moe_layers": repacked, "seconds": time.perf_counter() - started}
