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

RL recipes (with `rl.rewards`): rl_plan.py adds the reference model (a frozen bf16 copy in every stage's
weights when full training has rl.grpo.kl_coeff > 0) and the rollout engine's phases, which `fits` includes.

Assumptions: the MTP block is built (and counted) only when train.mtp_loss_weight > 0; packed rows are full
(max_length tokens); routed tokens are spread evenly over experts; LoRA adapters use the model's dtype.

The allocator reserve. The published figures are nvidia-smi readings: memory PyTorch's caching allocator
has reserved from the driver (+ the context), not the peak of live tensors. The difference is fragmentation:
a freed block stays reserved, and is reused only by a request that fits in it. Weights and optimizer states
are allocated once, but between them lie the holes of what was freed while they were allocated (checkpoint
load and conversion buffers, initialisation temporaries), and every step reallocates activations and MoE
token buffers whose sizes change with the routing; so the reserve grows with everything allocated, not
with activations alone. Published measurements of that ratio for LLM fine-tuning with recompute, LoRA and
distributed training on A100-80GB: 15% of reserved memory on average, up to 33% (GMLake, ASPLOS 2024,
arXiv 2401.08156), i.e. a reserve of 18% (up to 49%) of allocated memory; allocators that plan lifetimes
report up to 43% wasted by PyTorch's default (STWeaver, arXiv 2507.16274). The reserve is not a hard
requirement: before an out-of-memory error the allocator releases its free cached blocks and retries, so a
reading at the GPU's capacity bounds it from below only.

Calibration, one set of constants for both published Air LoRA figures (4 x H20, 95.6 GiB each;
reference/training-and-clusters.md), each constant fitted on one figure and checked on the other
(tests/test_plan.py):
- RESERVE_FRACTION, fitted on the EP 4 reading (~95 GiB): its 74.6 GiB allocated + 2 GiB context need a
  reserve of 24.7% (18.4 GiB), 25% rounded: 95.2 GiB. It predicts TP 4 + EP 4 (53.7 GiB allocated): 69.2 GiB
  against ~70 (-1.2%). The EP 4 reading is at 99% of the H20's capacity, where the allocator stops growing,
  so 24.7% is a lower bound: the TP 4 + EP 4 reading, well below capacity, needs 26.5%, as that predicts.
  Both lie inside GMLake's range. Other forms fitted on the same figure predict the second worse: a
  constant 18.4 GiB reserve gives 74.2 GiB (+6%), a reserve in proportion to activations only 60.3 GiB
  (-14%: the TP 4 run's activations are a quarter of the EP 4 run's, its reserve is not).
- CONTEXT_GIB and BACKWARD_TRANSIENT_LAYERS are assumed, not fitted.
Treat memory figures as +-10%.

Step time: the step's executed FLOPs (activations.py: forward, input gradients, weight gradients of trained
weights only, attention core, the recompute forward) over world x peak x HFU, the hardware utilisation that
mfu_table.py states and sources per GPU kind, dense or MoE, and LoRA or full; printed for its whole range.
`--mfu` replaces it with a model FLOP utilisation (the recompute forward not counted as model work).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from glm45_train.config.recipe import Recipe, RecipeError, mtp_layers, validate_layout
from glm45_train.launch import activations as act
from glm45_train.launch import rl_plan
from glm45_train.launch.gpus import GPUS, GpuSpec
from glm45_train.launch.mfu_table import Utilisation, utilisation
from glm45_train.launch.model_parts import ModelParts, count_parts
from glm45_train.model.hf_config import Glm45Config

GIB = 1024**3
Numel = dict[tuple[str, int], float]  # (sharding class, bytes per element) -> elements on one GPU
CONTEXT_GIB = 2.0  # CUDA context, cuBLAS/cuDNN workspaces, NCCL communicator buffers (assumed, not fitted)
RESERVE_FRACTION = 0.25  # caching-allocator reserve over the allocated peak (fitted on Air LoRA EP 4, see above)
CONSTANT_RESERVE_GIB = 18.4  # the alternative form fitted on the same figure (tests: recipes fit under it too)
BACKWARD_TRANSIENT_LAYERS = 1.0  # activation gradients alive during one layer's backward, in layers (assumed)


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
    reference_weights: float = 0.0  # RL: the frozen reference copy (rl_plan.py)

    @property
    def weights(self) -> float:
        return self.frozen_weights + self.trained_weights + self.reference_weights

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
    flops_per_token: float  # executed: the recompute forward included
    model_flops_per_token: float  # without the recompute forward (MFU's numerator)
    total_params: int
    trained_params: int
    mtp_built: bool
    utilisation: Utilisation  # HFU of this GPU and training kind (mfu_table.py)
    mfu_override: float | None = None  # `plan --mfu`
    extra: dict[str, float] = field(default_factory=dict)
    rl: rl_plan.RolloutPlan | None = None  # RL recipes: reference model and rollout engine

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda stage: stage.total)

    @property
    def fits(self) -> bool:
        return self.worst.total <= self.gpu.memory_gib * GIB and (self.rl is None or self.rl.fits)

    @property
    def recompute_share(self) -> float:
        """Model FLOPs / executed FLOPs: MFU = HFU x this."""
        return self.model_flops_per_token / self.flops_per_token

    def step_seconds(self, mfu: float | None = None) -> float:
        """Seconds per step at MFU `mfu`, else at `--mfu`, else at the table's central HFU."""
        mfu = mfu or self.mfu_override or self.utilisation.central * self.recompute_share
        rate = self.world * self.gpu.peak_tflops * 1e12 * mfu
        return self.tokens_per_step * self.model_flops_per_token / rate

    def step_range(self) -> tuple[float, float]:
        """(fastest, slowest) seconds per step over the table's HFU range (one value under `--mfu`)."""
        if self.mfu_override is not None:
            return (self.step_seconds(),) * 2
        share = self.recompute_share
        return self.step_seconds(self.utilisation.high * share), self.step_seconds(self.utilisation.low * share)


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
    moe = hf.n_routed_experts > 0 and hf.num_hidden_layers > hf.first_k_dense_replace
    capacity, context = GPUS[gpu].memory_gib * GIB, CONTEXT_GIB * GIB
    rl = rl_plan.plan_rollout(recipe, hf, world, stages, capacity, context) if rl_plan.is_rl(recipe) else None
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
        flops_per_token=_flops_per_token(recipe, parts, mtp, recipe.train.recompute),
        model_flops_per_token=_flops_per_token(recipe, parts, mtp, "none"),
        total_params=total,
        trained_params=trained,
        mtp_built=mtp,
        utilisation=utilisation(gpu, moe=moe, lora=recipe.lora.enabled),
        rl=rl,
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
        reference_weights=rl_plan.reference_bytes(recipe, sum(base.values())),
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


def _flops_per_token(recipe: Recipe, parts: ModelParts, mtp: bool, recompute: str) -> float:
    """Training FLOPs per token: every layer (and MTP), the output layer(s), at `recompute`."""
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
        total += count * act.training_flops_per_token(layer, recompute if block != "head" else "none")
    return total
