"""The text `glm45-train plan` prints: layout, memory per GPU by kind (worst pipeline stage), fit, step time;
for RL recipes also the step's samples and updates, the reference model and the rollout engine (rl_plan.py)."""

from __future__ import annotations

from glm45_train.config.recipe import Recipe
from glm45_train.launch.plan import CONTEXT_GIB, GIB, RESERVE_FRACTION, Plan, StageMemory
from glm45_train.launch.rl_plan import ENGINE_CONTEXT_GIB, ENGINE_WORKSPACE_GIB, Phase, RolloutPlan

TIGHT = 0.05  # headroom below this share of the GPU's memory is flagged


def _gib(value: float) -> str:
    return f"{value / GIB:7.2f} GiB"


def format_plan(result: Plan, source: str, gpus_needed: int | None) -> str:
    recipe, p = result.recipe, result.recipe.parallel
    lines = [f"plan: {source}", f"  model: {_model_line(result)}", f"  layout: {_layout_line(result)}"]
    worst = result.worst
    where = f"stage {worst.stage} of {p.pp}" if p.pp > 1 else "every GPU"
    lines.append(f"memory per GPU on {result.gpu.name} ({result.gpu.memory_gib:.1f} GiB), {where}:")
    lines += _memory_lines(result, worst)
    lines.append(f"  {'total':<18}{_gib(worst.total)}   -> {_verdict(result)}")
    if p.pp > 1:
        per_stage = ", ".join(f"{stage.total / GIB:.1f}" for stage in result.stages)
        lines.append(f"  per stage (GiB): {per_stage}")
    if gpus_needed is None:
        lines.append(f"GPUs needed: none with this layout fits {result.gpu.name}; raise ep, pp or tp")
    else:
        rollout = f" + {result.rl.gpus} rollout GPUs" if result.rl is not None and not result.rl.colocated else ""
        lines.append(f"GPUs needed: {gpus_needed}{rollout} (smallest valid world for this layout that fits)")
    if result.rl is not None:
        lines += _rl_lines(result, result.rl)
    lines += _step_lines(result)
    if recipe.train.recompute != "full":
        lines.append(f"note: train.recompute = {recipe.train.recompute}; 'full' keeps only layer inputs")
    return "\n".join(lines)


def _model_line(result: Plan) -> str:
    recipe, hf = result.recipe, result.hf
    mtp = "MTP built" if result.mtp_built else "MTP not built (train.mtp_loss_weight = 0)"
    total = f"{result.total_params / 1e9:.1f}B parameters, {hf.num_hidden_layers} layers, {mtp}"
    if not recipe.lora.enabled:
        kind = "full RL" if result.rl is not None else "full SFT"
        return f"{total}; {kind}: all trained ({recipe.model.dtype})"
    targets = ", ".join(recipe.lora.targets)
    return f"{total}; LoRA r{recipe.lora.rank} on {targets}: {result.trained_params / 1e6:.1f}M trained"


def _layout_line(result: Plan) -> str:
    p = result.recipe.parallel
    sp = ", sp" if p.sp else ""
    return (
        f"{result.world} GPUs = tp {p.tp} x pp {p.pp} x cp {p.cp} x dp {result.dp}{sp}; "
        f"ep {p.ep} x etp {p.etp} (expert dp {result.expert_dp}); "
        f"{result.microbatches} micro-batches per step per DP rank"
    )


def _memory_lines(result: Plan, stage: StageMemory) -> list[str]:
    recipe = result.recipe
    dtype = recipe.model.dtype
    sharded = "/ dp" if recipe.train.distributed_optimizer else "not sharded"
    weights = f"frozen {dtype} {stage.frozen_weights / GIB:.2f}, trained {stage.trained_weights / GIB:.2f}"
    if stage.reference_weights:
        weights += f", RL reference bf16 {stage.reference_weights / GIB:.2f}"
    rows = [
        ("weights", stage.weights, weights),
        ("gradients", stage.gradients, "fp32 grad buffer of trained parameters"),
        ("optimizer states", stage.optimizer, f"Adam m, v + fp32 master copies, {sharded}"),
        ("activations", stage.activations, _activation_detail(result, stage)),
        (
            "buffers/overheads",
            stage.overheads,
            f"CUDA context + workspaces {CONTEXT_GIB:.1f}, caching-allocator reserve (fragmentation) "
            f"{RESERVE_FRACTION:.0%} of allocated {stage.reserve / GIB:.2f}",
        ),
    ]
    return [f"  {name:<18}{_gib(value)}   ({detail})" for name, value, detail in rows]


def _activation_detail(result: Plan, stage: StageMemory) -> str:
    t = result.recipe.train
    kept = "layer inputs" if t.recompute == "full" else "saved activations"
    return (
        f"{t.recompute} recompute: {kept} {stage.kept_activations / GIB:.2f}, working set "
        f"{stage.working_activations / GIB:.2f}, loss logits {stage.logits / GIB:.2f}"
    )


def _verdict(result: Plan) -> str:
    capacity = result.gpu.memory_gib * GIB
    headroom = capacity - result.worst.total
    if headroom < 0:
        return f"does NOT fit ({-headroom / GIB:.1f} GiB over)"
    tight = " (tight: the estimate is +-10%)" if headroom < TIGHT * capacity else ""
    return f"fits, {headroom / GIB:.1f} GiB headroom{tight}"


def _step_lines(result: Plan) -> list[str]:
    """The step time over the utilisation range, what it counts, and where the utilisation comes from."""
    gpu, hfu, share = result.gpu, result.utilisation, result.recompute_share
    on = f"on {result.world} x {gpu.name} ({gpu.peak_tflops:.0f} TFLOP/s bf16 each)"
    work = (
        f"  work: {result.tokens_per_step:,} tokens x {result.flops_per_token / 1e9:.0f} GFLOP/token executed = "
        f"{result.tokens_per_step * result.flops_per_token / 1e15:.1f} PFLOP ({result.model_flops_per_token / 1e9:.0f}"
        f" model{_recompute_part(result)}; MFU = HFU x {share:.2f})"
    )
    if result.mfu_override is not None:
        return [f"step time: ~{result.step_seconds():.0f} s at MFU {result.mfu_override:.2f} (--mfu) {on}", work]
    fast, slow = result.step_range()
    kind = "engineering estimate" if hfu.estimate else "published"
    return [
        f"step time: ~{result.step_seconds():.0f} s ({fast:.0f}-{slow:.0f} s) at MFU {hfu.central * share:.2f} "
        f"({hfu.low * share:.2f}-{hfu.high * share:.2f}), HFU {hfu.central:.2f} ({hfu.low:.2f}-{hfu.high:.2f}) {on}",
        work,
        f"  HFU source ({kind}): {hfu.source} (launch/mfu_table.py; override with --mfu)",
    ]


def _recompute_part(result: Plan) -> str:
    extra = result.flops_per_token - result.model_flops_per_token
    recompute = result.recipe.train.recompute
    return f" + {extra / 1e9:.0f} {recompute}-recompute GFLOP/token" if extra > 0 else " GFLOP/token"


def _rl_lines(result: Plan, rl: RolloutPlan) -> list[str]:
    """The RL step, the reference model, the rollout engine's share and both phases, and the RL verdict."""
    recipe = result.recipe
    gib = result.gpu.memory_gib
    where = f"colocated on the {rl.gpus} training GPUs" if rl.colocated else f"on {rl.gpus} separate GPUs"
    lines = [
        f"rl: {recipe.rl.prompts_per_step} prompts x {recipe.rl.rollout.group_size} responses = {rl.samples} "
        f"samples per step = {rl.updates} optimizer updates of {recipe.train.global_batch_size}; training rows "
        f"of data.max_length = {rl.row_tokens} tokens (prompt + response, counted full)",
        f"  reference model: {_reference_line(recipe, rl)}",
        f"  rollout engine (rl.rollout.engine = {recipe.rl.rollout.engine}; figures are SGLang's): {where}, "
        f"{rl.engines} engine(s) of tp {rl.tp}; rl.rollout.gpu_memory_fraction {rl.fraction} = "
        f"{rl.engine_share / GIB:.1f} of {gib:.1f} GiB per GPU",
        f"    {'engine weights':<16}{_gib(rl.engine_weights)}   (bf16 checkpoint without the MTP layer / tp {rl.tp})",
        f"    {'KV cache':<16}{_gib(rl.kv_cache)}   ({rl.kv_per_token / 1024:.1f} KiB per token per GPU: "
        f"{max(0.0, rl.kv_cache) / rl.kv_per_token / 1e3:.0f}k tokens = {rl.kv_rows:.1f} rows of {rl.row_tokens})",
    ]
    lines += [f"  {_phase_line(phase)}" for phase in rl.phases]
    if recipe.rl.environment.name is not None:
        lines.append(f"  {_agent_line(recipe)}")
    if rl.routing_record:
        lines.append(
            f"  routing replay record: {rl.routing_record / GIB:.2f} GiB of host memory per rank per step "
            f"({rl.samples} samples x {rl.row_tokens} tokens x MoE layers x top-k expert ids)"
        )
    lines.append(
        f"  assumed, not measured: engine CUDA context {ENGINE_CONTEXT_GIB:.1f} GiB (kept asleep), workspace "
        f"{ENGINE_WORKSPACE_GIB:.1f} GiB outside its fraction; the trainer frees activations and empties its "
        "cache before the engine wakes"
    )
    lines.append(
        f"  training per RL step: ~{rl.updates * result.step_seconds():.0f} s ({rl.updates} x the step time "
        "below); rollout time is not estimated"
    )
    failure = rl.failure()
    lines.append(f"rl fit: {'fits' if failure is None else 'does NOT fit: ' + failure}")
    return lines


def _agent_line(recipe: Recipe) -> str:
    """The multi-turn rollout budget: what one trajectory may hold, inside the row the figures above count."""
    environment, rollout = recipe.rl.environment, recipe.rl.rollout
    budget = environment.max_tokens or recipe.data.max_length
    return (
        f"agent episodes (rl.environment = {environment.name}): up to {environment.max_turns} assistant turns of "
        f"<= {rollout.max_new_tokens} tokens with tool results between them, at most {budget} tokens after the "
        f"prompt and {recipe.data.max_length} in all (each turn re-enters the engine with the whole trajectory: "
        "its KV cache and the training row are counted at that length)"
    )


def _reference_line(recipe: Recipe, rl: RolloutPlan) -> str:
    if rl.reference == "none":
        return "none (rl.grpo.kl_coeff = 0: no KL term, no reference forward)"
    if rl.reference == "lora-base":
        return f"the base with the LoRA adapters disabled (kl_coeff {recipe.rl.grpo.kl_coeff}; no extra memory)"
    return (
        f"a frozen bf16 copy sharded like the model (kl_coeff {recipe.rl.grpo.kl_coeff}): "
        f"{rl.reference_bytes / GIB:.2f} GiB per GPU, in the weights above"
    )


def _phase_line(phase: Phase) -> str:
    parts = " + ".join(f"{name} {size / GIB:.1f}" for name, size in phase.parts)
    headroom = (phase.capacity - phase.total) / GIB
    verdict = f"fits, {headroom:.1f} GiB headroom" if phase.fits else f"does NOT fit ({-headroom:.1f} GiB over)"
    return f"{phase.name}: {parts} = {phase.total / GIB:.1f} GiB -> {verdict}"
