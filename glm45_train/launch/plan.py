"""`plan`: will a recipe fit, per GPU, on H20 / H100 / H200 — and roughly how long is a step.

Per pipeline stage and GPU, in bytes:

    weights      every parameter on the stage in its built dtype, sharded per part (model_parts.py):
                 attention/dense/shared-expert/embedding/output by TP, routed experts by EP x ETP,
                 layers by PP (embedding on the first stage, output + MTP on the last)
    gradients    4 bytes per trained parameter (Megatron DDP's fp32 grad buffer; frozen LoRA base: none)
    optimizer    Adam m, v (8 bytes) + an fp32 master copy for 16-bit parameters (4), per trained
                 parameter; divided by the data-parallel size of its part with the distributed optimizer
    activations  activations.py: kept for backward under the recipe's recompute, times the micro-batches a
                 1F1B schedule holds on the stage; the recompute working set; the loss logits on the last stage
    overheads    CONTEXT_GIB per process, plus the caching allocator's reserve (RESERVE_FRACTION of the above)

Assumptions: the MTP block is built (and counted) only when train.mtp_loss_weight > 0; packed rows are full
(max_length tokens); routed tokens are spread evenly over experts; LoRA adapters use the model's dtype.

Calibration (the only fitted constant is RESERVE_FRACTION): the seed reports GLM-4.5-Air LoRA on 4 x H20
at ~95 GiB/GPU with EP 4 and ~70 GiB with TP 4 + EP 4 (reference/training-and-clusters.md). Those are
nvidia-smi readings, i.e. memory the caching allocator reserved, which exceeds the peak of live tensors
through fragmentation (MoE token buffers change size every step). The formulas above give 74.6 and 53.7 GiB
allocated (+ 2 GiB context); the two readings need a reserve of 24.7% and 26.5% of that; 25% gives 95.2 and
69.2 GiB (+0.2%, -1.2%). The two points cannot tell this form from a constant ~16.4 GiB reserve (-2.2%,
+3.0%); the proportional form was chosen as the usual allocator behaviour. It predicts less than the
constant form below ~66 GiB allocated: every shipped recipe fits under both (tests/test_plan.py).
MFU defaults: H20 0.60 from the seed's ~40 s/iteration (TP 4 + EP 4, the only published GLM-4.5 timing;
0.62 exactly, counting attention over the whole packed row); H100/H200 0.35, near DeepSeek-V3's 338 TFLOP/s
per H100 against the 989 TFLOP/s dense bf16 peak. Treat step times as +-50%.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from glm45_train.config.recipe import Recipe, RecipeError, mtp_layers, validate_layout
from glm45_train.launch import activations as act
from glm45_train.launch.model_parts import ModelParts, count_parts
from glm45_train.model.hf_config import Glm45Config

GIB = 1024**3
Numel = dict[tuple[str, int], float]  # (sharding class, bytes per element) -> elements on one GPU
CONTEXT_GIB = 2.0  # CUDA context, cuBLAS/cuDNN workspaces, NCCL communicator buffers (assumed, not fitted)
RESERVE_FRACTION = 0.25  # caching-allocator reserve over the allocated peak (fitted, see above)
CONSTANT_RESERVE_GIB = 16.4  # the alternative fit: a fixed reserve (used by the tests as a robustness check)
BACKWARD_TRANSIENT_LAYERS = 1.0  # activation gradients alive during one layer's backward, in layers (assumed)


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gib: float  # total memory as nvidia-smi reports it
    peak_tflops: float  # dense bf16 tensor-core peak
    mfu: float  # default utilisation of that peak for step-time estimates (see the docstring)


GPUS = {
    "h20": GpuSpec("H20 96GB", 95.6, 148.0, 0.60),
    "h100": GpuSpec("H100 80GB SXM", 79.6, 989.0, 0.35),
    "h200": GpuSpec("H200 141GB", 140.4, 989.0, 0.35),
}


@dataclass(frozen=True)
class StageMemory:
    """One GPU of one pipeline stage, bytes."""

    stage: int
    frozen_weights: float
    trained_weights: float
    gradients: float
    optimizer: float
    kept_activations: float
    working_activations: float
    logits: float

    @property
    def weights(self) -> float:
        return self.frozen_weights + self.trained_weights

    @property
    def activations(self) -> float:
        return self.kept_activations + self.working_activations + self.logits

    @property
    def allocated(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def reserve(self) -> float:
        return RESERVE_FRACTION * self.allocated

    @property
    def overheads(self) -> float:
        return CONTEXT_GIB * GIB + self.reserve

    @property
    def total(self) -> float:
        return self.allocated + self.overheads


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    hf: Glm45Config
    gpu: GpuSpec
    world: int
    dp: int
    expert_dp: int
    microbatches: int
    stages: tuple[StageMemory, ...]
    tokens_per_step: int
    flops_per_token: float
    total_params: int
    trained_params: int
    mtp_built: bool
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda stage: stage.total)

    @property
    def fits(self) -> bool:
        return self.worst.total <= self.gpu.memory_gib * GIB

    def step_seconds(self, mfu: float | None = None) -> float:
        rate = self.world * self.gpu.peak_tflops * 1e12 * (mfu or self.gpu.mfu)
        return self.tokens_per_step * self.flops_per_token / rate


def plan(recipe: Recipe, hf: Glm45Config, gpu: str, world: int) -> Plan:
    """Memory per GPU (every pipeline stage) and step FLOPs of `recipe` on `world` GPUs of kind `gpu`."""
    if gpu not in GPUS:
        raise RecipeError(f"unknown GPU {gpu!r}; choose from {', '.join(GPUS)}")
    dp = validate_layout(recipe, world, hf)
    p, t = recipe.parallel, recipe.train
    expert_dp = world // (p.pp * p.ep * p.etp)
    microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    parts = count_parts(hf, 2 if recipe.model.dtype == "bf16" else 4)
    mtp = mtp_layers(recipe, hf) is not None
    stages = tuple(_stage_memory(recipe, parts, stage, dp, expert_dp, microbatches, mtp) for stage in range(p.pp))
    total, trained = _model_totals(recipe, parts, mtp)
    return Plan(
        recipe=recipe,
        hf=hf,
        gpu=GPUS[gpu],
        world=world,
        dp=dp,
        expert_dp=expert_dp,
        microbatches=microbatches,
        stages=stages,
        tokens_per_step=t.global_batch_size * recipe.data.max_length,
        flops_per_token=_flops_per_token(recipe, parts, mtp),
        total_params=total,
        trained_params=trained,
        mtp_built=mtp,
    )


def smallest_world(recipe: Recipe, hf: Glm45Config, gpu: str, limit: int = 8192) -> tuple[int | None, int | None]:
    """(smallest valid world size for the layout, smallest valid world size that also fits `gpu`)."""
    step = recipe.parallel.tp * recipe.parallel.pp * recipe.parallel.cp
    smallest_valid = None
    for world in range(step, limit + 1, step):
        try:
            result = plan(recipe, hf, gpu, world)
        except RecipeError:
            continue
        smallest_valid = smallest_valid or world
        if result.fits:
            return smallest_valid, world
    return smallest_valid, None


# --- per stage ---------------------------------------------------------------------------------------------


def _stage_blocks(parts: ModelParts, stage: int, pp: int, mtp: bool) -> Counter[str]:
    """How many of each block (embedding, dense_layer, moe_layer, mtp, head) pipeline stage `stage` holds."""
    layers = parts.hf.num_hidden_layers // pp
    first, last = stage * layers, (stage + 1) * layers
    dense = max(0, min(last, parts.hf.first_k_dense_replace) - first)
    blocks: Counter[str] = Counter(dense_layer=dense, moe_layer=layers - dense)
    if stage == 0:
        blocks["embedding"] += 1
    if stage == pp - 1:
        blocks["head"] += 1
        if mtp:
            blocks["mtp"] += 1
            if pp > 1:
                blocks["embedding"] += 1  # Megatron keeps an embedding copy on the last stage for MTP
    return blocks


def _stage_memory(
    recipe: Recipe, parts: ModelParts, stage: int, dp: int, expert_dp: int, microbatches: int, mtp: bool
) -> StageMemory:
    p = recipe.parallel
    blocks = _stage_blocks(parts, stage, p.pp, mtp)
    divisor = {"tp": p.tp, "replicated": 1, "expert": p.ep * p.etp}
    base: Numel = defaultdict(float)
    for block, count in blocks.items():
        for (sharding, size), numel in parts.numel[block].items():
            base[(sharding, size)] += count * numel / divisor[sharding]
    trained = _lora_numel(recipe, parts, blocks) if recipe.lora.enabled else base
    frozen: Numel = base if recipe.lora.enabled else {}
    kept, working, logits = _stage_activations(recipe, parts.hf, blocks, min(p.pp - stage, microbatches), mtp)
    return StageMemory(
        stage=stage,
        frozen_weights=_bytes(frozen),
        trained_weights=_bytes(trained),
        gradients=4.0 * sum(trained.values()),
        optimizer=_optimizer_bytes(trained, recipe.train.distributed_optimizer, dp, expert_dp),
        kept_activations=kept,
        working_activations=working,
        logits=logits,
    )


def _bytes(numel: Numel) -> float:
    return float(sum(count * size for (_, size), count in numel.items()))


def _optimizer_bytes(trained: Numel, distributed: bool, dp: int, expert_dp: int) -> float:
    """Adam m and v in fp32, plus an fp32 master copy of 16-bit parameters; sharded over DP if distributed."""
    total = 0.0
    for (sharding, size), numel in trained.items():
        per_param = 8 + (4 if size < 4 else 0)
        shards = (expert_dp if sharding == "expert" else dp) if distributed else 1
        total += numel * per_param / shards
    return total


def _lora_numel(recipe: Recipe, parts: ModelParts, blocks: Counter[str]) -> Numel:
    """Adapter parameters on one GPU of the stage, by sharding class (see model_parts.py for the layout)."""
    lora, p = recipe.lora, recipe.parallel
    size = 2 if recipe.model.dtype == "bf16" else 4
    numel: Numel = defaultdict(float)
    for linear in parts.linears:
        count = blocks[linear.block]
        if not count or linear.target not in lora.targets:
            continue
        a, b = lora.rank * linear.in_features, linear.out_features * lora.rank
        if linear.target.startswith("experts."):
            numel[("expert", size)] += count * (a + b) / (p.ep * p.etp)
        elif linear.target == "router":
            numel[("replicated", size)] += count * (a + b)
        elif linear.target in ("linear_qkv", "linear_fc1"):  # column-parallel: B split over TP
            numel[("replicated", size)] += count * a
            numel[("tp", size)] += count * b / p.tp
        else:  # row-parallel: A split over TP
            numel[("tp", size)] += count * a / p.tp
            numel[("replicated", size)] += count * b
    return numel


def _stage_activations(
    recipe: Recipe, hf: Glm45Config, blocks: Counter[str], in_flight: int, mtp: bool
) -> tuple[float, float, float]:
    """(kept for backward x micro-batches in flight, recompute + backward working set, loss logits)."""
    p, t = recipe.parallel, recipe.train
    tokens = t.micro_batch_size * recipe.data.max_length // p.cp
    shape = act.LayerShape(hf=hf, tokens=tokens, tp=p.tp, sp=p.sp, etp=p.etp)
    layers = [act.layer_bytes(shape, moe=False)] * blocks["dense_layer"]
    layers += [act.layer_bytes(shape, moe=True)] * (blocks["moe_layer"] + blocks["mtp"])
    if not layers:
        return 0.0, 0.0, 0.0
    largest = max(layers)
    transient = BACKWARD_TRANSIENT_LAYERS * largest
    if t.recompute == "full":
        chunk = max(1, t.recompute_num_layers)
        kept = math.ceil(len(layers) / chunk) * act.layer_input_bytes(shape)
        working = min(chunk, len(layers)) * largest + transient
    else:  # selective recomputes the attention core, which flash attention does not keep anyway
        kept, working = sum(layers), transient
    logits = act.logits_bytes(shape) * (blocks["head"] + blocks["mtp"]) if blocks["head"] else 0.0
    return kept * in_flight, working, logits


# --- totals and FLOPs --------------------------------------------------------------------------------------


def _model_totals(recipe: Recipe, parts: ModelParts, mtp: bool) -> tuple[int, int]:
    """(parameters of the model as built, trained parameters), over all GPUs (TP=EP=PP=1 counts)."""
    blocks = Counter(embedding=1, head=1, **parts.layer_counts())
    if mtp:
        blocks["mtp"] = 1
    total = sum(count * sum(parts.numel[block].values()) for block, count in blocks.items())
    if not recipe.lora.enabled:
        return int(total), int(total)
    single = Recipe(model=recipe.model, lora=recipe.lora)  # default layout: TP = EP = 1
    return int(total), int(sum(_lora_numel(single, parts, blocks).values()))


def _flops_per_token(recipe: Recipe, parts: ModelParts, mtp: bool) -> float:
    """Training FLOPs per token: every layer (and MTP), the output layer(s), at the recipe's recompute."""
    hf = parts.hf
    topk_share = hf.num_experts_per_tok / hf.n_routed_experts
    core = act.attention_core_flops(hf, recipe.data.max_length)
    total = 0.0
    blocks = Counter(head=1 + int(mtp), mtp=int(mtp), **parts.layer_counts())
    for block, count in blocks.items():
        numel = parts.numel[block]
        weights = float(sum(n for (sharding, _), n in numel.items() if sharding != "expert"))
        weights += topk_share * sum(n for (sharding, _), n in numel.items() if sharding == "expert")
        frozen, trained = (2.0 * weights, 0.0) if recipe.lora.enabled else (0.0, 2.0 * weights)
        layer = act.LayerFlops(frozen=frozen, trained=trained, attention_core=core if block != "head" else 0.0)
        recompute = recipe.train.recompute if block != "head" else "none"
        total += count * act.training_flops_per_token(layer, recompute)
    return total
