"""From an RL recipe to a ready run: the weight-sync layout, the trainer (train/setup.py), the prompt set, the
rewards, the reference model and the rollout engine.

Notable:
- Order matters once: the sync layout (which checkpoint-key regions make up each full tensor) is computed at
  TP = PP = EP = 1 before the trainer's layout exists (rl/weight_sync.py); then `build_trainer` as for `sft`.
- Prompts are rendered once with the generation prompt (thinking on or off as `rl.rollout.thinking` says);
  prompts that leave no room for `max_new_tokens` within `data.max_length` are dropped and reported by line,
  like every other unusable record (`prompts_report.json` in the run directory).
- With `rl.environment` (agent rollouts, rl/agent) the environment and its tools are built before the trainer (a
  bad tool fails in seconds), and prompts without tools of their own declare the environment's.
- The reference for the KL term: none at kl_coeff 0; the same model with adapters disabled for LoRA; for full
  training a frozen second copy of the base weights, built and loaded like the policy.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from glm45_train.config.layout import ParallelLayout
from glm45_train.config.recipe import Recipe, validate_layout
from glm45_train.config.rl import check_rl_values, updates_per_step
from glm45_train.data.conversation import DataError, Reason
from glm45_train.errors import UserError
from glm45_train.rl.agent.episodes import EpisodeRunner
from glm45_train.rl.agent.registry import environment_for
from glm45_train.rl.prompts import PromptRecord, PromptSet, load_prompts, render_prompts
from glm45_train.rl.rewards import RewardSet, RewardSpec
from glm45_train.rl.rollout import RolloutEngine, SamplingParams
from glm45_train.train.batches import DataPosition
from glm45_train.train.setup import DTYPES, Trainer, build_trainer, model_config_of, world_size_from_env


@dataclass(frozen=True)
class Prompt:
    index: int  # in the prompt set
    record: PromptRecord
    ids: tuple[int, ...]


class PromptPlan:
    """The prompts in a seeded order per epoch; each step takes the next `per_step` of them."""

    def __init__(self, prompts: list[Prompt], seed: int, per_step: int) -> None:
        if len(prompts) < per_step:
            raise UserError(f"{len(prompts)} usable prompts are fewer than rl.prompts_per_step = {per_step}")
        self.prompts, self.seed, self.per_step = prompts, seed, per_step

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))

    def next_prompts(self, position: DataPosition) -> tuple[list[Prompt], DataPosition]:
        if position.consumed_rows + self.per_step > len(self.prompts):
            position = DataPosition(position.epoch + 1, 0)
        start = position.consumed_rows
        chosen = self.order(position.epoch)[start : start + self.per_step]
        return [self.prompts[int(i)] for i in chosen], DataPosition(position.epoch, start + self.per_step)


class NullEngine:
    """What ranks without an engine hold (SGLang engines span rl.rollout.tp ranks): takes part in nothing."""

    def update_weights(self, tensors: Any) -> None:
        for _ in tensors:  # the gather is collective: every rank consumes it
            pass

    def generate(self, requests: list, params: SamplingParams) -> list:
        return []

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


@dataclass
class RLRun:
    recipe: Recipe
    trainer: Trainer
    engine: RolloutEngine
    engine_owners: list[int]  # ranks that own an engine, in order
    prompts: PromptPlan
    rewards: RewardSet
    tokenizer: Any  # tokenizers.Tokenizer
    params: SamplingParams
    pad_id: int
    reference: Any  # None | "adapters" | a frozen model holder with `.model`
    sync: Any  # rl/weight_sync.py's layout
    probe_ids: tuple[int, ...]  # rl/probe.py's fixed prompt
    replay: Any = None  # rl/routing_replay.py's RoutingReplay with rl.routing_replay: rollout
    inputs: Any = None  # train/run_inputs.py's RunInputs: what the checkpoints record and a resume must match
    episodes: Any = None  # rl/agent/episodes.py's EpisodeRunner with rl.environment (multi-turn rollouts)

    def shutdown(self) -> None:
        self.engine.shutdown()
        if self.episodes is not None:
            self.episodes.environment.close()

    def sync_weights(self) -> Any:
        """The policy's weights into the engine (a collective: every rank, every step); the sync's summary."""
        from glm45_train.rl.weight_sync import SyncSummary, hf_weights

        summary = SyncSummary()
        self.engine.update_weights(hf_weights(self.sync, self.trainer.module, dtype=self.engine_dtype, summary=summary))
        return summary

    @property
    def engine_dtype(self) -> torch.dtype:
        return engine_dtype(self.recipe)


def build_rl_run(recipe: Recipe) -> RLRun:
    from glm45_train.model.tokenizer import stop_token_ids
    from glm45_train.rl.weight_sync import SyncLayout
    from glm45_train.runtime import distributed
    from glm45_train.train import checkpoint
    from glm45_train.train.inputs import tokenizer_dir_for
    from glm45_train.train.run_dir import write_run_metadata

    check_rl_values(recipe)
    check_engine_support(recipe)
    rewards = reward_set(recipe)  # before anything is built: a bad reward fails in seconds
    environment = environment_for(recipe.rl.environment)  # so does a bad tool
    hf = model_config_of(recipe.model.source)
    validate_layout(recipe, world_size_from_env(), hf)
    distributed.initialize(ParallelLayout(), seed=recipe.train.seed)
    sync = SyncLayout.build(hf, with_mtp=False)
    trainer = build_trainer(recipe, lambda _dp: (recipe.train.steps or 0) * updates_per_step(recipe))
    run_dir = Path(recipe.checkpoint.dir)
    if dist.get_rank() == 0:
        write_run_metadata(recipe, run_dir)
        checkpoint.remove_partials(run_dir)
    tokenizer_dir = tokenizer_dir_for(recipe)
    from glm45_train.data.chat import load_chat_tokenizer

    tokenizer = load_chat_tokenizer(tokenizer_dir)
    prompts = _prompts(recipe, tokenizer, run_dir, environment.tools() if environment is not None else None)
    rollout = recipe.rl.rollout
    params = SamplingParams(
        rollout.temperature, rollout.top_p, rollout.max_new_tokens, tuple(stop_token_ids(tokenizer_dir))
    )
    engine, owners = make_engine(recipe)
    dist.barrier()
    from glm45_train.rl.probe import probe_prompt

    return RLRun(
        recipe=recipe,
        trainer=trainer,
        engine=engine,
        engine_owners=owners,
        prompts=PromptPlan(prompts, recipe.train.seed, recipe.rl.prompts_per_step),
        rewards=rewards,
        tokenizer=tokenizer,
        params=params,
        pad_id=_pad_id(tokenizer),
        reference=reference_for(recipe, trainer),
        sync=sync,
        probe_ids=probe_prompt([prompt.ids for prompt in prompts], recipe.data.max_length, rollout.max_new_tokens),
        replay=routing_replay_for(recipe, trainer),
        inputs=run_inputs_for(recipe, prompts, trainer.total_steps),
        episodes=EpisodeRunner.for_recipe(recipe, engine, environment, tokenizer) if environment else None,
    )


def run_inputs_for(recipe: Recipe, prompts: list[Prompt], total_steps: int) -> Any:
    """The prompts as rendered (ids, answers, reward fields) and the keys that pick each step's prompts."""
    from glm45_train.train.run_inputs import RunInputs, fingerprint_of, schedule_inputs

    parts = (
        json.dumps([p.ids, p.record.answer, p.record.extra], sort_keys=True, default=str).encode() for p in prompts
    )
    data = {
        "fingerprint": fingerprint_of(parts),
        "train.seed": recipe.train.seed,
        "rl.prompts_per_step": recipe.rl.prompts_per_step,
    }
    schedule = schedule_inputs(recipe.train, total_steps)
    return RunInputs(data, schedule, frozenset(recipe.checkpoint.allow_changes))


def routing_replay_for(recipe: Recipe, trainer: Trainer) -> Any:
    if recipe.rl.routing_replay == "none":
        return None
    from glm45_train.rl.routing_replay import RoutingReplay

    sequence_parallel, recompute = bool(trainer.config.sequence_parallel), recipe.train.recompute == "full"
    return RoutingReplay([trainer.model], trainer.hf.first_k_dense_replace, sequence_parallel, recompute)


def _pad_id(tokenizer: Any) -> int:
    """`<|endoftext|>`, as data prepare pads (the padding is never trained)."""
    from glm45_train.model.tokenizer import PAD_TOKEN

    found = tokenizer.token_to_id(PAD_TOKEN)
    if found is None:
        raise UserError(f"the tokenizer has no {PAD_TOKEN} token (not a GLM-4.5 tokenizer?)")
    return int(found)


def reward_set(recipe: Recipe) -> RewardSet:
    """The recipe's rewards; `rl.overlong.mode: penalty` adds the `length` reward (DAPO's soft overlong penalty)
    at the rollout's limit, so the shaping has one implementation whichever way it is asked for."""
    specs = [RewardSpec.from_dict(_plain(entry), f"rl.rewards[{i}]") for i, entry in enumerate(recipe.rl.rewards)]
    overlong, limit = recipe.rl.overlong, recipe.rl.rollout.max_new_tokens
    if overlong.mode == "penalty":
        specs.append(RewardSpec("length", overlong.weight, {"max_len": limit, "buffer": overlong.buffer}))
    return RewardSet(specs, max_failure_fraction=recipe.rl.max_reward_failure_fraction)


def _plain(entry: Any) -> Any:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(entry) if isinstance(entry, DictConfig) else entry


def _prompts(recipe: Recipe, tokenizer: Any, run_dir: Path, tools: list[dict[str, Any]] | None) -> list[Prompt]:
    """The usable prompts, rendered; `tools` (an agent environment's) are declared in prompts that have none."""
    rl = recipe.rl
    found: PromptSet = load_prompts(recipe.data.inputs, on_error=rl.on_error, answer_field=rl.answer_field)  # type: ignore[arg-type]
    if tools:
        found.records[:] = [record if record.tools else replace(record, tools=tools) for record in found.records]
    ids = render_prompts(found.records, tokenizer, thinking=rl.rollout.thinking)
    room = recipe.data.max_length - rl.rollout.max_new_tokens
    prompts = []
    for index, (record, prompt_ids) in enumerate(zip(found.records, ids, strict=True)):
        if len(prompt_ids) > room:
            detail = f"{len(prompt_ids)} prompt tokens leave no room for {rl.rollout.max_new_tokens} new ones"
            error = DataError(
                Reason.OVERLONG, f"{detail} within data.max_length {recipe.data.max_length}", record.origin
            )
            if rl.on_error == "fail":
                raise error
            found.report.note(error)
            continue
        prompts.append(Prompt(index, record, tuple(prompt_ids)))
    found.report.prompts_kept = len(prompts)
    if dist.get_rank() == 0:
        report = found.report.to_json()
        (run_dir / "prompts_report.json").write_text(json.dumps(report, indent=2) + "\n")
        dropped = report["records"]["dropped"]
        print(
            f"prompts: {len(prompts)} usable of {found.report.records_read} "
            f"({dropped} dropped, see {run_dir / 'prompts_report.json'})"
        )
    return prompts


def engine_kind(requested: str) -> str:
    """`auto`: vllm where installed, else SGLang on GPUs where installed, else the transformers engine."""
    if requested != "auto":
        return requested
    from glm45_train.runtime.vllm_cpu import is_installed

    if is_installed():
        return "vllm"
    return "sglang" if torch.cuda.is_available() and importlib.util.find_spec("sglang") else "hf"


def engine_dtype(recipe: Recipe) -> torch.dtype:
    return DTYPES[recipe.rl.rollout.dtype or recipe.model.dtype]


def make_engine(recipe: Recipe) -> tuple[RolloutEngine, list[int]]:
    """This rank's engine (or a NullEngine) and the ranks that own one."""
    rollout, world, rank = recipe.rl.rollout, dist.get_world_size(), dist.get_rank()
    kind = engine_kind(rollout.engine)
    from glm45_train.rl.engines.hf import model_assets_dir

    assets = model_assets_dir(recipe.model.source)
    record = recipe.rl.routing_replay == "rollout"
    if kind == "hf":
        from glm45_train.rl.engines.hf import HFEngine

        device = "cuda" if torch.cuda.is_available() else "cpu"
        engine = HFEngine(assets, dtype=engine_dtype(recipe), device=device, record_routing=record)
        return engine, list(range(world))
    if kind == "vllm":
        return _vllm_engine(recipe, assets, rank, world)
    if not torch.cuda.is_available():
        raise UserError("key 'rl.rollout.engine': sglang needs GPUs; `hf` and `vllm` run everywhere")
    owners = list(range(0, world, rollout.tp))
    if rank not in owners:
        return NullEngine(), owners
    from glm45_train.rl.engines.sglang import SGLangEngine

    run_dir = Path(recipe.checkpoint.dir)
    return SGLangEngine(assets, rollout, seed=recipe.train.seed, run_dir=run_dir, record_routing=record), owners


def check_engine_support(recipe: Recipe) -> None:
    """What the chosen engine cannot do here, refused before any process starts: routing replay with vLLM, which
    returns routed experts (`enable_return_routed_experts`, 0.32) from its GPU model runner only, and which our
    wiring reads from the offline engine's outputs."""
    if recipe.rl.routing_replay != "rollout" or engine_kind(recipe.rl.rollout.engine) != "vllm":
        return
    if not torch.cuda.is_available():
        raise UserError(
            "key 'rl.routing_replay': vLLM's CPU build cannot return the experts it routed to "
            "(enable_return_routed_experts needs Model Runner V2, which needs Triton): use rl.rollout.engine hf "
            "on CPU, or rl.routing_replay none"
        )
    if recipe.rl.rollout.placement != "in_process":
        raise UserError(
            "key 'rl.routing_replay': with the vllm engine the routed experts are read from the in-process "
            "engine's outputs: use rl.rollout.placement in_process (or rl.rollout.engine sglang)"
        )


def _vllm_engine(recipe: Recipe, assets: Path, rank: int, world: int) -> tuple[RolloutEngine, list[int]]:
    from glm45_train.config.rl import engine_count
    from glm45_train.rl.engines.vllm import build_vllm_engine

    rollout = recipe.rl.rollout
    count = engine_count(rollout, world)
    owners = list(range(0, world, world // count))
    if rank not in owners:
        return NullEngine(), owners
    index = owners.index(rank)
    engine = build_vllm_engine(
        assets,
        rollout,
        dtype=engine_dtype(recipe),
        seed=recipe.train.seed + index,
        max_model_len=recipe.data.max_length,
        work_dir=Path(recipe.checkpoint.dir) / "vllm" / f"engine{index}",
        index=index,
        url=rollout.urls[index] if rollout.urls else None,
        record_routing=recipe.rl.routing_replay == "rollout",
    )
    return engine, owners


def reference_for(recipe: Recipe, trainer: Trainer) -> Any:
    if recipe.rl.grpo.kl_coeff == 0:
        return None
    if recipe.lora.enabled:
        return "adapters"
    return FrozenReference.build(recipe, trainer)


@dataclass
class FrozenReference:
    """The base weights once more, frozen, at the trainer's layout (full training with a KL term)."""

    model: Any

    @classmethod
    def build(cls, recipe: Recipe, trainer: Trainer) -> FrozenReference:
        from megatron.core import parallel_state

        from glm45_train.model.build import build_model
        from glm45_train.train.setup import load_base_weights, transformer_config

        model = build_model(  # a fresh config: the trainer's now holds its DDP's hooks
            trainer.hf,
            transformer_config(recipe, trainer.hf),
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        )
        load_base_weights(model, recipe.model.source)
        for param in model.parameters():
            param.requires_grad_(False)
        return cls(model.eval())
