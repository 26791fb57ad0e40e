"""The one place that adapts Megatron-Core 0.16.1 to machines without CUDA.

Megatron-Core assumes a GPU in a handful of spots that matter for building, running and checkpointing GLM-4.5
on CPU (tests, rehearsals, conversion on CPU-only hosts). Each adaptation below names the symptom it fixes and
is tested in tests/test_runtime_cpu.py. `apply()` is idempotent and does nothing when CUDA is present: on GPUs
Megatron runs untouched.

Adaptations (symptom -> cause -> fix):

1. "Torch not compiled with CUDA enabled" building an MoE layer: `TopKRouter` and the rotary embedding place
   tensors on `torch.cuda.current_device()`. -> `torch.cuda.current_device` answers the CPU device.
2. "cuda rng state model-parallel-rng is not added": attention and initialisation fork Megatron's CUDA RNG
   tracker. -> a tracker with the same `add`/`fork`/`get_states`/`set_states` contract over CPU generator states.
3. `NameError: te_general_gemm` in the router GEMM (0.16.1 refers to a Transformer Engine symbol it never
   imports when TE is absent). -> define it as None so the plain matmul path runs.
4. `torch.cuda.synchronize` during `dist_checkpointing.save` (async filesystem writer and friends). -> no-op.
5. "Torch not compiled with CUDA enabled" in attention when no mask is passed: the unfused softmax builds its
   default causal mask with `device="cuda"`. -> the same mask built on the CPU.

6. Megatron's DDP, optimizers, grad clipping, grad scaler and schedules create helper tensors with
   `device="cuda"` / `.cuda()` and assert `param.type() == "torch.cuda.FloatTensor"`. -> `on_cpu_device()`, a
   TorchFunctionMode the trainer enters around DDP/optimizer construction and the optimizer step (not around
   forward/backward: a Python mode on every op costs 8x there), places those tensors on the CPU and answers
   the type query with the CUDA name for CPU float tensors.
7. The schedules (token counter) and the MoE aux-loss tracker allocate with `device="cuda"` inside the
   forward/backward pass. -> those two modules see a `torch` whose factory functions place on the CPU.
8. "Torch not compiled with CUDA enabled" in activation recompute: Megatron's CheckpointFunction saves and
   restores the CUDA generator state next to the CPU one. -> with no CUDA generator, that part is empty and
   restoring it does nothing (the CPU state and the named streams are still saved and restored).
9. "sequence parallel not supported by torch LayerNorm" building any layer with tensor + sequence parallelism:
   Megatron's local norm (`WrappedTorchNorm`) refuses SP, so no recipe with TP > 1 could train (MoE + TP
   needs SP). A norm needs nothing from SP but its weight gradient summed over the TP group, as each rank
   sees a slice of the sequence. -> with SP the same torch norm is built and its parameters are marked
   `sequence_parallel`, which is how Transformer Engine's norms ask `finalize_model_grads` for that sum.
10. "Torch not compiled with CUDA enabled" building the last pipeline stage with MTP: the stage keeps a copy
   of the word embedding, which `setup_embeddings_and_output_layer` moves with `.cuda()` before averaging it
   with the first stage's. -> that method runs under the mode of row 6.

Not patched, chosen by configuration instead (see model/hf_config.py): the `allgather` token dispatcher (the
`alltoall` one creates a CUDA stream at build time), no fused kernels, local (non-TE) layer specs.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False


def cuda_available() -> bool:
    """True when Megatron can run as designed (CUDA present): then no adaptation is applied."""
    return torch.cuda.is_available()


def apply() -> bool:
    """Apply every CPU adaptation once. Returns True if they are active (no CUDA), False on GPU machines."""
    global _APPLIED
    if cuda_available():
        return False
    if _APPLIED:
        return True
    _answer_cpu_for_current_device()
    _install_cpu_rng_tracker()
    _define_missing_te_gemm()
    _make_synchronize_noop()
    _build_default_causal_mask_on_cpu()
    _place_factories_on_cpu_in_step_modules()
    _no_cuda_generator_in_recompute()
    _sequence_parallel_local_norm()
    _embedding_copy_on_cpu()
    _APPLIED = True
    return True


def _answer_cpu_for_current_device() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment,return-value]


def _make_synchronize_noop() -> None:
    torch.cuda.synchronize = lambda device=None: None


def _define_missing_te_gemm() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _build_default_causal_mask_on_cpu() -> None:
    from megatron.core.fusions import fused_softmax

    @functools.lru_cache(maxsize=32)
    def causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    fused_softmax.get_default_causal_mask = causal_mask


class _CudaCallsOnCpu(TorchFunctionMode):
    """Rewrites CUDA placement requests inside Megatron's training machinery to the CPU (see row 6)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if name in _CPU_FLOAT_TYPES else name
        device = kwargs.get("device")
        if device is not None and _is_cuda(device):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and args[1:] and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


_CPU_FLOAT_TYPES = ("torch.FloatTensor", "torch.BFloat16Tensor", "torch.HalfTensor")


def _is_cuda(device: object) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # a bare index means a CUDA device to Megatron
    return (isinstance(device, str) and device.startswith("cuda")) or (
        isinstance(device, torch.device) and device.type == "cuda"
    )


_FACTORIES = frozenset({"tensor", "zeros", "ones", "empty", "full", "arange"})
_STEP_MODULES = ("megatron.core.pipeline_parallel.schedules", "megatron.core.transformer.moe.moe_utils")


class _TorchWithCpuFactories(types.ModuleType):
    """`torch` as seen by one Megatron module: factory calls asking for CUDA get the CPU."""

    def __getattr__(self, name: str) -> object:
        value = getattr(torch, name)
        if name not in _FACTORIES:
            return value

        @functools.wraps(value)
        def on_cpu(*args: object, **kwargs: object) -> object:
            if _is_cuda(kwargs.get("device")):
                kwargs["device"] = "cpu"
            return value(*args, **kwargs)

        return on_cpu


def _place_factories_on_cpu_in_step_modules() -> None:
    import importlib

    for module_name in _STEP_MODULES:
        importlib.import_module(module_name).torch = _TorchWithCpuFactories("torch")  # type: ignore[attr-defined]


def _no_cuda_generator_in_recompute() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    mcore_random._set_cuda_rng_state = lambda *args, **kwargs: None


class _ConfigWithoutSP:
    """A TransformerConfig seen as if sequence parallelism were off (row 9); every other field unchanged."""

    sequence_parallel = False

    def __init__(self, config: object) -> None:
        self._config = config

    def __getattr__(self, name: str) -> object:
        return getattr(self._config, name)


def _sequence_parallel_local_norm() -> None:
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    build = WrappedTorchNorm.__new__

    def new(cls, config, *args, **kwargs):
        if not config.sequence_parallel:
            return build(cls, config, *args, **kwargs)
        norm = build(cls, _ConfigWithoutSP(config), *args, **kwargs)  # Megatron's other checks still run
        for param in norm.parameters():
            param.sequence_parallel = True  # finalize_model_grads sums these grads over TP
        return norm

    WrappedTorchNorm.__new__ = new


def _embedding_copy_on_cpu() -> None:
    from megatron.core.models.common.language_module.language_module import LanguageModule

    setup = LanguageModule.setup_embeddings_and_output_layer

    @functools.wraps(setup)
    def on_cpu(self: LanguageModule) -> None:
        with _CudaCallsOnCpu():
            setup(self)

    LanguageModule.setup_embeddings_and_output_layer = on_cpu


def on_cpu_device() -> contextlib.AbstractContextManager[object]:
    """Context for running Megatron's training machinery (DDP, optimizer, schedules) on CPU; no-op with CUDA."""
    if cuda_available():
        return contextlib.nullcontext()
    return _CudaCallsOnCpu()


class CpuRNGStatesTracker:
    """Megatron's named RNG streams (`model-parallel-rng`, `expert-parallel-rng`, ...) over the CPU generator.

    Same contract as `megatron.core.tensor_parallel.random.CudaRNGStatesTracker`: `add(name, seed)` registers a
    stream, `fork(name)` runs a block on that stream and restores the default one afterwards, and the states can
    be saved and restored for exact resume.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        default_state = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(default_state)


def _install_cpu_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
