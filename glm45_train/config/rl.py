"""The `rl:` section of a recipe (GRPO after SFT) and its checks.

An RL recipe is an SFT recipe with this section: `model`, `parallel`, `lora`, `train`, `checkpoint` and
`logging` mean what they mean for `sft` (one model build, one LoRA, one checkpoint format); `data.inputs` are
the prompt sets (messages JSONL / JSON / Parquet / datasets / ModelScope IDs, as for `data prepare`), and
`data.max_length` bounds prompt + response. One RL step: `rl.prompts_per_step` prompts, `rl.rollout.group_size`
responses each, scored, then `prompts_per_step x group_size / train.global_batch_size` optimizer updates on them
(verl's ppo_mini_batch_size; ms-swift's `--num_generations` is the group size). `train.steps` counts RL steps.
Comments name the ms-swift / verl flag each key corresponds to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from glm45_train.config.errors import RecipeError

ENGINES = ("auto", "hf", "vllm", "sglang")  # auto: vllm where installed, else sglang on GPUs when installed, else hf
PLACEMENTS = ("in_process", "server")  # vllm: its offline engine in the trainer process, or `vllm serve`
ENGINE_DTYPES = ("fp32", "bf16")


@dataclass
class RolloutSection:
    engine: str = "auto"  # hf: transformers on the live weights (CPU or GPU); vllm (CPU or GPU); sglang (GPU)
    placement: str = "in_process"  # vllm: in_process (offline engine, colocated) | server (`vllm serve` per engine)
    urls: list[str] = field(default_factory=list)  # vllm server placement: running servers to use (one per engine)
    engines: int = 0  # engines in the run (0: one per rl.rollout.tp ranks); with urls, one per URL
    dtype: str | None = None  # the engine's weights: fp32 | bf16 (default: model.dtype)
    cpu_kv_cache_gib: float = 1.0  # vllm on CPU: KV cache per engine
    group_size: int = 8  # G responses per prompt (--num_generations; verl: rollout.n)
    temperature: float = 1.0  # --temperature
    top_p: float = 1.0  # --top_p
    max_new_tokens: int = 512  # --max_completion_length (verl: response_length)
    thinking: bool = False  # prompts with thinking on; off renders the empty <think></think> (non-thinking)
    colocate: bool = True  # the engine shares the training GPUs, its memory released while training
    gpu_memory_fraction: float = 0.45  # engine's share of each GPU (SGLang mem_fraction_static)
    tp: int = 1  # engine tensor parallel size (SGLang tp_size)
    gpus: int = 0  # separate rollout GPUs when colocate is false


@dataclass
class GrpoSection:
    std_normalize: bool = True  # advantage = (r - mean) / std of the group; false: r - mean (Dr.GRPO)
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high] (DAPO clip-higher)
    clip_high: float = 0.28
    kl_coeff: float = 0.0  # k3 KL to the frozen reference (--beta); 0: no reference model is used
    policy_loss: bool = True  # false trains on the KL term only (a negative control for tests)


LOSSES = ("grpo", "gspo")  # rl/losses: the registered policy losses
CORRECTION_MODES = ("none", "tis", "mis")
CORRECTION_LEVELS = ("token", "sequence", "geometric")
ROUTING_REPLAY = ("none", "rollout")


@dataclass
class GspoSection:
    clip_low: float = 3e-4  # the sequence ratio clipped to [1 - clip_low, 1 + clip_high] (GSPO paper: 3e-4, 4e-4)
    clip_high: float = 4e-4


@dataclass
class CorrectionSection:
    """Train/inference mismatch: the engine's log-probs (pi_engine) are not the trainer's (pi_old)."""

    mode: str = "none"  # tis: weight min(pi_old / pi_engine, tis_cap) (slime --use-tis); mis: mask outside the range
    level: str = "token"  # token | sequence (product of the ratios) | geometric (their geometric mean)
    tis_cap: float = 2.0  # TIS's truncation C (slime, verl: 2.0)
    mis_low: float = 0.5  # MIS keeps ratios in [mis_low, mis_high] (verl rollout_rs thresholds)
    mis_high: float = 2.0
    veto_logprob: float | None = None  # a sequence holding a token the engine gave log-prob < this is not trained


@dataclass
class DynamicSamplingSection:
    enabled: bool = False  # DAPO: groups whose rewards are all equal are dropped and more prompts sampled
    max_rounds: int = 3  # extra sampling rounds at most per step (verl: max_num_gen_batches)


OVERLONG_MODES = ("none", "penalty", "filter")


@dataclass
class OverlongSection:
    mode: str = "none"  # penalty: DAPO's soft penalty near max_new_tokens; filter: no loss on truncated responses
    buffer: int = 0  # penalty: width of the soft zone before rl.rollout.max_new_tokens (DAPO: 4096 of 20480)
    weight: float = 1.0  # penalty: its weight beside the other rewards


@dataclass
class EnvironmentSection:
    """Multi-turn agent rollouts (rl/agent): the policy calls tools, their results come back as observations."""

    name: str | None = None  # python_tools | code_interpreter | module:ClassOrFactory; unset: single-turn rollouts
    tools: list[Any] = field(default_factory=list)  # python_tools: "module:function" or {function, schema}
    max_turns: int = 4  # assistant turns per episode (slime / verl multi-turn: max_turns)
    max_tokens: int = 0  # tokens after the prompt, model and observations (0: up to data.max_length)
    tool_timeout_s: float = 10.0  # one tool call's wall-clock limit
    max_observation_chars: int = 4000  # a longer tool result is cut, and says so
    args: dict[str, Any] = field(default_factory=dict)  # the environment's own arguments (code_interpreter limits)
    train_observations: bool = False  # negative control only: tool results trained as if the model wrote them


@dataclass
class RLSection:
    prompts_per_step: int = 4  # prompts per RL step (verl: data.train_batch_size)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    grpo: GrpoSection = field(default_factory=GrpoSection)
    loss: str = "grpo"  # grpo: token-level ratio (rl.grpo's clip); gspo: sequence-level ratio (rl.gspo's clip)
    gspo: GspoSection = field(default_factory=GspoSection)
    correction: CorrectionSection = field(default_factory=CorrectionSection)
    routing_replay: str = "none"  # rollout: the engine's expert choices replayed in the trainer (R3)
    dynamic_sampling: DynamicSamplingSection = field(default_factory=DynamicSamplingSection)
    overlong: OverlongSection = field(default_factory=OverlongSection)
    environment: EnvironmentSection = field(default_factory=EnvironmentSection)
    rewards: list[Any] = field(default_factory=list)  # [{name, weight, args}]: built-in names or module:function
    max_reward_failure_fraction: float = 0.5  # one reward failing on more of a batch stops the run
    answer_field: str = "answer"  # the prompt field holding the reference answer
    on_error: str = "skip"  # bad prompt records: skip (reported by line) | fail


def is_rl_recipe(recipe: Any) -> bool:
    """An RL recipe names its rewards (`sft` ignores the rl section; `submit` and `--rehearse` run `rl` for it)."""
    return bool(recipe.rl.rewards)


def samples_per_step(rl: RLSection) -> int:
    return rl.prompts_per_step * rl.rollout.group_size


def updates_per_step(recipe: Any) -> int:
    """Optimizer updates per RL step: the step's samples in global batches of train.global_batch_size."""
    return samples_per_step(recipe.rl) // recipe.train.global_batch_size


def check_rl_values(recipe: Any) -> None:
    """What `rl` needs of a recipe beyond what `sft` checks; RecipeError naming the key. (The rewards themselves
    are resolved and their arguments checked by rl/rewards when the run starts: `rl.setup.reward_set`.)"""

    def fail(key: str, why: str) -> None:
        raise RecipeError(f"key '{key}': {why}")

    rl, rollout, grpo = recipe.rl, recipe.rl.rollout, recipe.rl.grpo
    if not recipe.data.inputs:
        fail("data.inputs", "RL reads prompt sets (messages JSONL, datasets, ModelScope IDs), not data.prepared")
    if rollout.engine not in ENGINES:
        fail("rl.rollout.engine", f"{rollout.engine!r} is not one of {', '.join(ENGINES)}")
    if rollout.group_size < 2:
        fail("rl.rollout.group_size", "GRPO compares responses within a group: at least 2")
    if rl.prompts_per_step < 1:
        fail("rl.prompts_per_step", "must be at least 1")
    if not rollout.temperature > 0:
        fail("rl.rollout.temperature", "must be > 0 (the policy's log-probs are taken at this temperature)")
    if not 0 < rollout.top_p <= 1:
        fail("rl.rollout.top_p", "must be in (0, 1]")
    if not 0 < rollout.max_new_tokens < recipe.data.max_length:
        fail("rl.rollout.max_new_tokens", f"must be in (0, data.max_length = {recipe.data.max_length})")
    _check_engine_values(recipe, fail)
    _check_sampling_values(rl, fail)
    _check_loss_values(rl, fail)
    _check_environment_values(recipe, fail)
    if not 0 < rollout.gpu_memory_fraction < 1:
        fail("rl.rollout.gpu_memory_fraction", "must be in (0, 1)")
    if rollout.tp < 1 or rollout.gpus < 0:
        fail("rl.rollout", "tp must be >= 1 and gpus >= 0")
    if not rollout.colocate and rollout.gpus % rollout.tp:
        fail("rl.rollout.gpus", f"{rollout.gpus} separate rollout GPUs are not a multiple of rl.rollout.tp")
    if grpo.clip_low < 0 or grpo.clip_high < 0 or grpo.clip_low >= 1:
        fail("rl.grpo.clip_low", "clip ranges must be >= 0, clip_low < 1")
    if grpo.kl_coeff < 0:
        fail("rl.grpo.kl_coeff", "must be >= 0")
    if not grpo.policy_loss and grpo.kl_coeff == 0:
        fail("rl.grpo.policy_loss", "with the policy loss off and kl_coeff 0 there is nothing to train")
    if not rl.rewards:
        fail("rl.rewards", "no rewards given, e.g. [{name: math}] (built-ins: see glm45_train/rl/rewards)")
    if not 0 <= rl.max_reward_failure_fraction <= 1:
        fail("rl.max_reward_failure_fraction", "must be in [0, 1]")
    if rl.on_error not in ("skip", "fail"):
        fail("rl.on_error", f"{rl.on_error!r} is not skip or fail")
    samples = samples_per_step(rl)
    if samples % recipe.train.global_batch_size:
        fail(
            "train.global_batch_size",
            f"{recipe.train.global_batch_size} does not divide the {samples} samples of a step "
            f"(rl.prompts_per_step {rl.prompts_per_step} x rl.rollout.group_size {rollout.group_size})",
        )
    if recipe.train.steps is None:
        fail("train.steps", "RL runs are counted in steps (train.epochs is for sft)")
    if recipe.train.mtp_loss_weight > 0:
        fail("train.mtp_loss_weight", "RL trains no MTP loss: set 0 (the MTP block is exported from the base)")


def _check_sampling_values(rl: RLSection, fail: Any) -> None:
    if rl.dynamic_sampling.max_rounds < 0:
        fail("rl.dynamic_sampling.max_rounds", "must be >= 0")
    overlong = rl.overlong
    if overlong.mode not in OVERLONG_MODES:
        fail("rl.overlong.mode", f"{overlong.mode!r} is not one of {', '.join(OVERLONG_MODES)}")
    if overlong.mode == "penalty" and not 0 < overlong.buffer <= rl.rollout.max_new_tokens:
        fail(
            "rl.overlong.buffer",
            f"the penalty's soft zone needs 0 < buffer <= rl.rollout.max_new_tokens ({rl.rollout.max_new_tokens}), "
            f"got {overlong.buffer}",
        )


def _check_environment_values(recipe: Any, fail: Any) -> None:
    environment = recipe.rl.environment
    if environment.name is None:
        return
    if environment.max_turns < 1:
        fail("rl.environment.max_turns", "must be at least 1")
    if not 0 <= environment.max_tokens < recipe.data.max_length:
        fail("rl.environment.max_tokens", f"must be in [0, data.max_length = {recipe.data.max_length})")
    if 0 < environment.max_tokens < recipe.rl.rollout.max_new_tokens:
        fail("rl.environment.max_tokens", "is below rl.rollout.max_new_tokens: the first turn would not fit")
    if not environment.tool_timeout_s > 0:
        fail("rl.environment.tool_timeout_s", "must be > 0")
    if environment.max_observation_chars < 1:
        fail("rl.environment.max_observation_chars", "must be at least 1")
    if environment.name == "python_tools" and not environment.tools:
        fail("rl.environment.tools", "python_tools needs its tools: a list of 'module:function'")


def _check_loss_values(rl: RLSection, fail: Any) -> None:
    def choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            fail(key, f"{value!r} is not one of {', '.join(allowed)}")

    choice("rl.loss", rl.loss, LOSSES)
    choice("rl.routing_replay", rl.routing_replay, ROUTING_REPLAY)
    correction = rl.correction
    choice("rl.correction.mode", correction.mode, CORRECTION_MODES)
    choice("rl.correction.level", correction.level, CORRECTION_LEVELS)
    if not 0 < rl.gspo.clip_low < 1 or not rl.gspo.clip_high > 0:
        fail("rl.gspo.clip_low", "GSPO's clip range needs 0 < clip_low < 1 and clip_high > 0")
    if not correction.tis_cap >= 1:
        fail("rl.correction.tis_cap", f"must be >= 1 (a cap below 1 shrinks every token), got {correction.tis_cap}")
    if not 0 <= correction.mis_low < 1 < correction.mis_high:
        fail("rl.correction.mis_low", "MIS's range needs 0 <= mis_low < 1 < mis_high")
    if correction.veto_logprob is not None and not correction.veto_logprob < 0:
        fail("rl.correction.veto_logprob", f"a log-probability threshold: must be < 0, got {correction.veto_logprob}")


def _check_engine_values(recipe: Any, fail: Any) -> None:
    rollout = recipe.rl.rollout
    if rollout.placement not in PLACEMENTS:
        fail("rl.rollout.placement", f"{rollout.placement!r} is not one of {', '.join(PLACEMENTS)}")
    if rollout.dtype is not None and rollout.dtype not in ENGINE_DTYPES:
        fail("rl.rollout.dtype", f"{rollout.dtype!r} is not one of {', '.join(ENGINE_DTYPES)}")
    if rollout.engines < 0 or rollout.cpu_kv_cache_gib <= 0:
        fail("rl.rollout", "engines must be >= 0 and cpu_kv_cache_gib > 0")
    if rollout.engine in ("hf", "sglang"):
        if rollout.placement != "in_process" or rollout.urls:
            fail("rl.rollout.placement", f"placement and urls are vllm's (rl.rollout.engine is {rollout.engine})")
        return
    if rollout.urls and rollout.placement != "server":
        fail("rl.rollout.urls", "running servers are used with rl.rollout.placement: server")
    if rollout.urls and rollout.engines not in (0, len(rollout.urls)):
        fail("rl.rollout.engines", f"{rollout.engines} engines but {len(rollout.urls)} urls")
    if rollout.top_p < 1:
        fail(
            "rl.rollout.top_p",
            "vllm reports log-probs renormalised over the top-p nucleus, the trainer over the whole vocabulary: "
            "use top_p 1.0 with the vllm engine",
        )


def engine_count(rollout: RolloutSection, world: int) -> int:
    """How many engines a run of `world` ranks has: one per URL, rl.rollout.engines, or one per tp ranks."""
    count = len(rollout.urls) or rollout.engines or max(1, world // rollout.tp)
    if world % count:
        raise RecipeError(f"key 'rl.rollout.engines': {count} engines do not divide {world} ranks evenly")
    return count
