"""The RL parts of `plan` (a recipe with `rl.rewards`): the reference model, the rollout engine, their fit.

The trainer's side is plan.py's, unchanged; an RL step adds, per GPU:

    reference    rl.grpo.kl_coeff = 0: none. LoRA: the base with the adapters switched off (no memory).
                 Full training with kl > 0: a frozen bf16 copy of the weights, sharded like the model, no
                 gradients or optimizer (plan.py adds it to every stage's weights).
    engine       SGLang holding rl.rollout.gpu_memory_fraction of each GPU (its mem_fraction_static: the
                 weights at rollout tp + the KV cache). Weights: the HF checkpoint without the MTP layer
                 (SGLang's Glm4MoeForCausalLM skips layers >= num_hidden_layers) in bf16, / rl.rollout.tp
                 (model/hf_layout.py; what SGLang replicates across TP ranks instead, norms, router and the K/V
                 projections at tp > KV heads, is under 1% and not counted). KV cache: the rest of the share;
                 K and V of every layer, bf16, max(1, kv_heads / tp) heads per GPU (SGLang replicates KV
                 heads when tp > kv_heads).
                 It must hold at least one row of data.max_length tokens (SGLang refuses longer requests).

Colocated (rl.rollout.colocate), two phases, each must fit the GPU:
    generating   the trainer's persistent state (weights, reference, grad buffers, optimizer: allocated once,
                 kept) + its CUDA context + the engine's share + the engine's own CUDA context and its
                 workspace outside mem_fraction_static. Assumes the trainer's activations are freed and the
                 caching allocator emptied (torch.cuda.empty_cache) before the engine wakes.
    training     plan.py's peak (activations, allocator reserve) + what a sleeping engine keeps: its CUDA
                 context; weights, KV cache and CUDA graphs are released (SGLang's memory saver).
Routing replay (rl.routing_replay: rollout): the engine's expert ids ride with every sample, one byte each (two
beyond 256 experts), tokens x MoE layers x top-k; every rank holds the step's samples in host memory (the
rollout is gathered), and each micro-batch's share reaches the GPU as int64 for the routers (counted with
activations: under a percent of them).
Separate rollout GPUs (colocate false, rl.rollout.gpus of the same kind): the engine's share + its context and
workspace on each rollout GPU; the training GPUs are plan.py's alone.

ENGINE_CONTEXT_GIB and ENGINE_WORKSPACE_GIB are assumed, not measured (no GLM-4.5 RL memory figure is
published). Training rows are data.max_length tokens (prompt + response), counted full as in plan.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from glm45_train.config.recipe import RecipeError
from glm45_train.config.rl import samples_per_step, updates_per_step
from glm45_train.model.hf_config import Glm45Config
from glm45_train.model.hf_layout import hf_tensor_shapes

_GIB = 1024**3
ENGINE_CONTEXT_GIB = 1.5  # SGLang process per GPU: CUDA context + NCCL buffers, kept while asleep (assumed)
ENGINE_WORKSPACE_GIB = 2.0  # decode activations, sampler, CUDA graphs: outside mem_fraction_static (assumed)
ENGINE_BYTES = 2  # bf16 weights and KV cache


def is_rl(recipe: Any) -> bool:
    """An RL recipe: one with rewards (`glm45-train rl`); plan.py leaves every other recipe as it was."""
    return bool(recipe.rl.rewards)


def reference_kind(recipe: Any) -> str:
    """none | lora-base (adapters disabled, no memory) | frozen-copy (bf16 weights, sharded like the model)."""
    if not is_rl(recipe) or recipe.rl.grpo.kl_coeff == 0:
        return "none"
    return "lora-base" if recipe.lora.enabled else "frozen-copy"


def reference_bytes(recipe: Any, stage_numel: float) -> float:
    """Bytes of the reference model on one GPU of a stage holding `stage_numel` model parameters."""
    return ENGINE_BYTES * stage_numel if reference_kind(recipe) == "frozen-copy" else 0.0


def engine_weight_bytes(hf: Glm45Config) -> float:
    """bf16 bytes of every tensor SGLang loads: the checkpoint's, the MTP layer's excepted."""
    total = 0
    for name, shape in hf_tensor_shapes(hf):
        if name.startswith("model.layers.") and int(name.split(".")[2]) >= hf.num_hidden_layers:
            continue
        total += math.prod(shape)
    return float(ENGINE_BYTES * total)


def kv_bytes_per_token(hf: Glm45Config, tp: int) -> float:
    """K and V of every layer for one token on one GPU of an engine at tensor parallel `tp`."""
    heads = max(1, hf.num_key_value_heads // tp)
    return float(2 * hf.num_hidden_layers * heads * hf.head_dim * ENGINE_BYTES)


@dataclass(frozen=True)
class Phase:
    """One memory check on one GPU: what is resident at once, against the GPU's capacity."""

    name: str
    parts: tuple[tuple[str, float], ...]  # (what, bytes)
    capacity: float

    @property
    def total(self) -> float:
        return sum(size for _, size in self.parts)

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


@dataclass(frozen=True)
class RolloutPlan:
    """An RL recipe's step, reference model and rollout engine on one GPU kind."""

    samples: int  # per RL step: rl.prompts_per_step x rl.rollout.group_size
    updates: int  # optimizer updates per RL step
    row_tokens: int  # data.max_length: prompt + response
    reference: str  # reference_kind
    reference_bytes: float  # per GPU, worst stage
    colocated: bool
    tp: int
    gpus: int  # GPUs the engines run on
    fraction: float
    engine_share: float  # bytes per GPU: fraction x capacity
    engine_weights: float  # bytes per GPU
    kv_per_token: float  # bytes per GPU
    phases: tuple[Phase, ...]
    routing_record: float = 0.0  # host bytes per rank: the step's routing record (routing replay), or 0

    @property
    def engines(self) -> int:
        return self.gpus // self.tp

    @property
    def kv_cache(self) -> float:
        return self.engine_share - self.engine_weights

    @property
    def kv_rows(self) -> float:
        """Full rows (data.max_length tokens) the KV cache of one engine holds at once."""
        return max(0.0, self.kv_cache) / (self.row_tokens * self.kv_per_token)

    def failure(self) -> str | None:
        """Why the RL parts do not fit (naming the rollout engine), or None."""
        if self.gpus < self.tp:
            return f"rollout engine: rl.rollout.gpus = {self.gpus} separate GPUs, an engine needs tp = {self.tp}"
        if self.kv_rows < 1:
            return (
                f"rollout engine: rl.rollout.gpu_memory_fraction {self.fraction} = {self.engine_share / _GIB:.1f} "
                f"GiB holds its weights ({self.engine_weights / _GIB:.1f} GiB at tp {self.tp}) but not one "
                f"{self.row_tokens}-token row of KV cache; raise the fraction or rl.rollout.tp"
            )
        for phase in self.phases:
            if not phase.fits:
                over = (phase.total - phase.capacity) / _GIB
                return f"rollout engine: {phase.name} needs {phase.total / _GIB:.1f} GiB per GPU, {over:.1f} over"
        return None

    @property
    def fits(self) -> bool:
        return self.failure() is None


def routing_record_bytes(recipe: Any, hf: Glm45Config) -> float:
    """The step's routing record: samples x data.max_length tokens x MoE layers x top-k expert ids."""
    if recipe.rl.routing_replay == "none":
        return 0.0
    moe_layers = hf.num_hidden_layers - hf.first_k_dense_replace
    id_bytes = 1 if hf.n_routed_experts <= 256 else 2  # rl/rollout.py routing_dtype
    return float(samples_per_step(recipe.rl) * recipe.data.max_length * moe_layers * hf.num_experts_per_tok * id_bytes)


def validate_rollout(recipe: Any, world: int, hf: Glm45Config) -> None:
    """The engine layout against the model and, colocated, the training world; RecipeError naming the key."""
    rollout = recipe.rl.rollout
    if hf.num_attention_heads % rollout.tp:
        raise RecipeError(
            f"key 'rl.rollout.tp': {hf.num_attention_heads} attention heads are not divisible by {rollout.tp}"
        )
    if rollout.colocate and world % rollout.tp:
        raise RecipeError(
            f"key 'rl.rollout.tp': colocated engines of tp {rollout.tp} do not tile the {world} training GPUs"
        )


def plan_rollout(
    recipe: Any, hf: Glm45Config, world: int, stages: tuple[Any, ...], capacity: float, context: float
) -> RolloutPlan:
    """The RL parts of a plan; `stages` are plan.py's StageMemory, `capacity` and `context` bytes per GPU."""
    validate_rollout(recipe, world, hf)
    rollout = recipe.rl.rollout
    share = rollout.gpu_memory_fraction * capacity
    engine = (("engine CUDA context (assumed)", ENGINE_CONTEXT_GIB * _GIB),)
    working = (("engine share", share), *engine, ("engine workspace (assumed)", ENGINE_WORKSPACE_GIB * _GIB))
    phases: tuple[Phase, ...] = (Phase("generating (rollout GPUs)", working, capacity),)
    if rollout.colocate:
        resident = max(s.weights + s.gradients + s.optimizer for s in stages)
        trainer = (("trainer resident state", resident), ("trainer CUDA context", context))
        peak = max(s.total for s in stages)
        phases = (
            Phase("generating (colocated)", trainer + working, capacity),
            Phase("training (engine asleep)", (("training peak", peak), *engine), capacity),
        )
    return RolloutPlan(
        samples=samples_per_step(recipe.rl),
        updates=updates_per_step(recipe),
        row_tokens=recipe.data.max_length,
        reference=reference_kind(recipe),
        reference_bytes=max(s.reference_weights for s in stages),
        colocated=rollout.colocate,
        tp=rollout.tp,
        gpus=world if rollout.colocate else rollout.gpus,
        fraction=rollout.gpu_memory_fraction,
        engine_share=share,
        engine_weights=engine_weight_bytes(hf) / rollout.tp,
        kv_per_token=kv_bytes_per_token(hf, rollout.tp),
        phases=phases,
        routing_record=routing_record_bytes(recipe, hf),
    )
