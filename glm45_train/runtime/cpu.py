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

Not patched, chosen by configuration instead (see model/hf_config.py): the `allgather` token dispatcher (the
`alltoall` one creates a CUDA stream at build time), no fused kernels, local (non-TE) layer specs.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

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
