"""The recipe schema (typed dataclasses) and its strict loading: YAML file + `key=value` overrides.

Loading goes through OmegaConf structured configs, so unknown keys and wrong types fail with the key path
before anything starts; `validate_layout` then checks the parallel layout against the world size and the
model (experts % ep, heads and query groups % tp, layers % pp, ...), naming the key at fault.
Comments name the ms-swift flag each key corresponds to, for users coming from `megatron sft`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glm45_train.config.errors import RecipeError
from glm45_train.config.layout import ParallelLayout
from glm45_train.config.rl import RLSection

LORA_TARGETS = (
    "linear_qkv",  # attention QKV (fused)
    "linear_proj",  # attention output
    "linear_fc1",  # dense MLP and shared-expert fc1 (gate+up)
    "linear_fc2",  # dense MLP and shared-expert fc2 (down)
    "experts.linear_fc1",  # every routed expert's fc1, one adapter per expert
    "experts.linear_fc2",  # every routed expert's fc2, one adapter per expert
    "router",  # the MoE router (gate) weight
)
RECOMPUTE = ("none", "selective", "full")
DATA_MODES = ("keep", "non-thinking")  # and "mixed:P" with 0 <= P <= 1
CHANGE_GROUPS = ("data", "schedule")  # what a resume may find changed, if allowed (train/run_inputs.py)


@dataclass
class ModelSection:
    source: str = "???"  # mcore checkpoint from `export --to-mcore` (ms-swift: --load) or an HF directory
    dtype: str = "bf16"  # bf16 | fp32 (ms-swift: --bf16 true)
    train_expert_bias: bool = False  # update the router's expert bias (moe_router_bias_update_rate > 0)


@dataclass
class ParallelSection:
    tp: int = 1  # --tensor_model_parallel_size
    pp: int = 1  # --pipeline_model_parallel_size
    ep: int = 1  # --expert_model_parallel_size
    etp: int = 1  # --expert_tensor_parallel_size
    cp: int = 1  # --context_parallel_size
    sp: bool = False  # --sequence_parallel

    def layout(self) -> ParallelLayout:
        return ParallelLayout(tp=self.tp, pp=self.pp, ep=self.ep, etp=self.etp, cp=self.cp, sp=self.sp)


@dataclass
class LoraSection:
    enabled: bool = True  # --train_type lora (ms-swift 4: --tuner_type lora)
    rank: int = 32  # --lora_rank
    alpha: float = 64.0  # --lora_alpha
    dropout: float = 0.0  # --lora_dropout
    targets: list[str] = field(default_factory=lambda: ["linear_qkv", "linear_proj"])  # --target_modules


@dataclass
class DataSection:
    prepared: str | None = None  # a directory written by `glm45-train data prepare`
    inputs: list[str] = field(default_factory=list)  # raw inputs, prepared at start (ms-swift: --dataset)
    mode: str = "non-thinking"  # keep | non-thinking | mixed:P
    max_length: int = 8192  # --max_length
    pack: bool = True  # --packing true
    tokenizer: str | None = None  # defaults to the tokenizer stored with the model


@dataclass
class TrainSection:
    micro_batch_size: int = 1  # --micro_batch_size
    global_batch_size: int = 16  # --global_batch_size
    epochs: int | None = None  # --max_epochs (ms-swift 4: --num_train_epochs)
    steps: int | None = None  # --train_iters; exactly one of epochs / steps
    lr: float = 1e-4  # --lr
    min_lr: float = 1e-5  # --min_lr
    warmup_fraction: float = 0.05  # --lr_warmup_fraction
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    seed: int = 42
    recompute: str = "none"  # none | selective | full (--recompute_granularity)
    recompute_num_layers: int = 1  # --recompute_num_layers (full, uniform)
    aux_loss_coeff: float = 1e-3  # --moe_aux_loss_coeff
    mtp_loss_weight: float = 0.0  # --mtp_loss_scaling_factor; 0 trains without the MTP loss
    distributed_optimizer: bool = True  # --use_distributed_optimizer


@dataclass
class CheckpointSection:
    dir: str = "???"  # --save
    interval: int = 200  # --save_steps / --save_interval
    keep_last: int = 2
    save_optimizer: bool = True  # ms-swift's seed recipe used --no_save_optim: exact resume needs it
    allow_changes: list[str] = field(default_factory=list)  # on resume: data, schedule (else a change stops it)


@dataclass
class EvalSection:
    split: float = 0.01  # --split_dataset_ratio
    interval: int = 200  # --eval_steps / --eval_interval; 0 = no evaluation


@dataclass
class LoggingSection:
    interval: int = 1  # --log_interval
    tensorboard: bool = True
    plot: bool = True  # loss-curve PNG at the end


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    rl: RLSection = field(default_factory=RLSection)  # read by `rl` only (config/rl.py)


def mtp_layers(recipe: Recipe, hf: Any) -> int | None:
    """The MTP layers to build: the model's, when the recipe trains them (train.mtp_loss_weight > 0), else none.

    Without its loss the MTP block only costs memory and compute (Air: 2.4B parameters, one more MoE layer and a
    second output head per stage); its weights then come from the base model at export.
    """
    return (hf.num_nextn_predict_layers or None) if recipe.train.mtp_loss_weight > 0 else None


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe strictly, apply `key=value` overrides, check values. Raises RecipeError naming the key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = OmegaConf.structured(Recipe)
    try:
        merged = schema
        if path is not None:
            merged = OmegaConf.merge(merged, OmegaConf.load(str(path)))
        for override in overrides:
            if "=" not in override:
                raise RecipeError(f"override {override!r} is not of the form key=value")
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise RecipeError(f"{path or 'recipe'}: required key(s) not set: {', '.join(missing)}")
        recipe: Recipe = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except OmegaConfBaseException as err:
        raise RecipeError(f"{path or 'recipe'}: {_explain(err)}") from None
    check_values(recipe)
    return recipe


def _explain(err: Any) -> str:
    key = getattr(err, "full_key", None)
    message = str(err).splitlines()[0]
    if not key:
        return message
    suggestion = _closest_key(key)
    return f"key '{key}': {message}" + (f" (did you mean '{suggestion}'?)" if suggestion else "")


def _closest_key(full_key: str) -> str | None:
    """The known key closest to a misspelt one, e.g. 'trian.lr' -> 'train', 'train.lrr' -> 'train.lr'."""
    import difflib

    *parents, leaf = full_key.split(".")
    section: Any = Recipe
    for name in parents:
        fields = {f.name: f for f in dataclasses.fields(section)}
        if name not in fields or not dataclasses.is_dataclass(fields[name].default_factory):
            return None
        section = fields[name].default_factory
    names = [f.name for f in dataclasses.fields(section)]
    if leaf in names:
        return None
    match = difflib.get_close_matches(leaf, names, n=1)
    return ".".join([*parents, match[0]]) if match else None


# (key, lowest, highest, whether the bounds are included): numbers outside crash later or train nonsense.
RANGES: tuple[tuple[str, float, float, tuple[bool, bool]], ...] = (
    ("train.lr", 0.0, math.inf, (False, False)),
    ("train.min_lr", 0.0, math.inf, (True, False)),
    ("train.weight_decay", 0.0, math.inf, (True, False)),
    ("train.adam_beta1", 0.0, 1.0, (True, False)),
    ("train.adam_beta2", 0.0, 1.0, (True, False)),
    ("train.clip_grad", 0.0, math.inf, (True, False)),
    ("train.aux_loss_coeff", 0.0, math.inf, (True, False)),
    ("train.mtp_loss_weight", 0.0, math.inf, (True, False)),
    ("train.micro_batch_size", 1, math.inf, (True, False)),
    ("train.global_batch_size", 1, math.inf, (True, False)),
    ("train.recompute_num_layers", 1, math.inf, (True, False)),
    ("data.max_length", 1, math.inf, (True, False)),
    ("lora.alpha", 0.0, math.inf, (False, False)),
    ("lora.dropout", 0.0, 1.0, (True, False)),
    ("checkpoint.interval", 1, math.inf, (True, False)),
    ("checkpoint.keep_last", 1, math.inf, (True, False)),
    ("eval.split", 0.0, 1.0, (True, False)),
    ("eval.interval", 0, math.inf, (True, False)),  # 0: no evaluation
    ("logging.interval", 1, math.inf, (True, False)),
)


def check_numbers(recipe: Any) -> None:
    """No NaN or infinity anywhere in the recipe (rl keys too), and the keys of `RANGES` inside their range."""
    for key, value in _numbers(recipe, ""):
        if not math.isfinite(value):
            raise RecipeError(f"key '{key}': {value} is not a finite number")
    for key, low, high, (low_in, high_in) in RANGES:
        value = _lookup(recipe, key)
        if not ((low <= value if low_in else low < value) and (value <= high if high_in else value < high)):
            interval = f"{'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}".replace("inf", "∞")
            raise RecipeError(f"key '{key}': {value} is outside {interval}")


def _numbers(section: Any, prefix: str) -> Iterator[tuple[str, float]]:
    for item in dataclasses.fields(section):
        value = getattr(section, item.name)
        key = f"{prefix}{item.name}"
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, key + ".")
        elif isinstance(value, float):
            yield key, value


def _lookup(section: Any, key: str) -> Any:
    for name in key.split("."):
        section = getattr(section, name)
    return section


def check_values(recipe: Recipe) -> None:
    def fail(key: str, why: str) -> None:
        raise RecipeError(f"key '{key}': {why}")

    check_numbers(recipe)
    try:
        recipe.parallel.layout()
    except ValueError as err:
        raise RecipeError(str(err)) from None
    if recipe.model.dtype not in ("bf16", "fp32"):
        fail("model.dtype", f"{recipe.model.dtype!r} is not one of bf16, fp32")
    for target in recipe.lora.targets:
        if target not in LORA_TARGETS:
            fail("lora.targets", f"{target!r} is not one of {', '.join(LORA_TARGETS)}")
    if recipe.lora.enabled and (recipe.lora.rank < 1 or not recipe.lora.targets):
        fail("lora", "LoRA needs rank >= 1 and at least one target")
    if not (recipe.data.mode in DATA_MODES or _is_mixed(recipe.data.mode)):
        fail("data.mode", f"{recipe.data.mode!r} is not keep, non-thinking or mixed:P with 0 <= P <= 1")
    if (recipe.data.prepared is None) == (not recipe.data.inputs):
        fail("data", "set exactly one of data.prepared and data.inputs")
    for group in recipe.checkpoint.allow_changes:
        if group not in CHANGE_GROUPS:
            fail("checkpoint.allow_changes", f"{group!r} is not one of {', '.join(CHANGE_GROUPS)}")
    train = recipe.train
    if (train.epochs is None) == (train.steps is None):
        fail("train", "set exactly one of train.epochs and train.steps")
    if train.recompute not in RECOMPUTE:
        fail("train.recompute", f"{train.recompute!r} is not one of {', '.join(RECOMPUTE)}")
    if not 0 <= train.warmup_fraction < 1:
        fail("train.warmup_fraction", "must be in [0, 1)")
    if train.min_lr > train.lr:
        fail("train.min_lr", f"{train.min_lr} is larger than train.lr = {train.lr}")
    if train.global_batch_size % train.micro_batch_size:
        fail("train.global_batch_size", "must be a multiple of train.micro_batch_size")


def _is_mixed(mode: str) -> bool:
    if not mode.startswith("mixed:"):
        return False
    try:
        return 0.0 <= float(mode.split(":", 1)[1]) <= 1.0
    except ValueError:
        return False


def check_trainable_layout(recipe: Recipe) -> None:
    """Layouts Megatron builds and plans but trains wrongly. At ep = 1 it treats routed experts as dense weights
    and reduces their gradients over data parallel only; with etp != tp the ranks that hold the same expert
    weights are then not the ranks that reduce them (measured at tp 2, etp 1: expert gradients differ across
    TP ranks, grad norm off by 1e-3)."""
    p = recipe.parallel
    if p.ep == 1 and p.etp != p.tp:
        raise RecipeError(
            f"key 'parallel.etp': with ep = 1, training needs etp = tp = {p.tp} (experts split like "
            f"the dense layers), or ep > 1"
        )


def validate_layout(recipe: Recipe, world_size: int, hf: Any) -> int:
    """Check the parallel layout against the world size and the model; returns the data-parallel size."""
    p, t = recipe.parallel, recipe.train

    def fail(key: str, why: str) -> None:
        raise RecipeError(f"key '{key}': {why}")

    if world_size % (p.tp * p.pp * p.cp):
        fail("parallel.tp", f"world size {world_size} is not divisible by tp*pp*cp = {p.tp}*{p.pp}*{p.cp}")
    try:
        dp = p.layout().data_parallel_size(world_size)
    except ValueError as err:  # ep*etp must divide the ranks of a pipeline stage
        raise RecipeError(f"key 'parallel.ep': {err}") from None
    if hf.n_routed_experts % p.ep:
        fail("parallel.ep", f"{hf.n_routed_experts} experts are not divisible by ep = {p.ep}")
    if hf.num_attention_heads % p.tp:
        fail("parallel.tp", f"{hf.num_attention_heads} attention heads are not divisible by tp = {p.tp}")
    if hf.num_key_value_heads % p.tp:
        fail("parallel.tp", f"{hf.num_key_value_heads} query groups (KV heads) are not divisible by tp = {p.tp}")
    if hf.num_hidden_layers % p.pp:
        fail("parallel.pp", f"{hf.num_hidden_layers} layers are not divisible by pp = {p.pp}")
    if hf.vocab_size % p.tp:
        fail("parallel.tp", f"vocab size {hf.vocab_size} is not divisible by tp = {p.tp}")
    if p.sp and p.tp == 1:
        fail("parallel.sp", "sequence parallelism needs tp > 1")
    if p.etp > 1 and recipe.lora.enabled and any(x.startswith("experts.") for x in recipe.lora.targets):
        fail("parallel.etp", "LoRA on routed experts needs etp = 1 (the expert path is not reduced over ETP)")
    if t.global_batch_size % (t.micro_batch_size * dp):
        fail(
            "train.global_batch_size",
            f"{t.global_batch_size} is not a multiple of micro_batch_size * data-parallel size = "
            f"{t.micro_batch_size} * {dp}",
        )
    return dp
