"""`sft/rl/submit RECIPE --rehearse`: run a recipe's parallel layout for real on a scaled-down GLM-4.5, over gloo with
CPU processes, to catch layout and config errors before a cluster is touched.

Kept as written: parallel (tp/pp/ep/etp/cp/sp), lora, train.recompute and every other key the user did not
override. Scaled down:
- the model, of the recipe's family (read from model.source when it is on this machine, else the released
  config chosen by the source's name): hidden 64, query groups a multiple of tp, experts of ep (and of n_group),
  first_k_dense_replace + 1 layers per pipeline stage (a MoE layer on every stage), MTP only when the recipe
  trains it; written by `make_tiny`, and converted to torch_dist when the recipe's source is one (so loading
  reshards as it will on the cluster);
- the data: the sample set rendered in the recipe's mode and packing, rows of at most 256 tokens (RL: the sample
  prompts, groups of 2, 16 new tokens, the CPU engine);
- the run: fp32, 2 steps, global batch = micro batch x dp x pp micro-batches (the pipeline schedule interleaves),
  an eval and a checkpoint at step 2, on the fewest processes the layout allows: lcm(tp*pp*cp, ep*etp*pp).
The recipe runs through the ordinary `sft` command under torchrun (the recipe file + the user's overrides +
the rehearsal's overrides); per-rank logs are kept so a failure shows the failing rank's own error.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from glm45_train.config.recipe import Recipe, load_recipe
from glm45_train.config.rl import is_rl_recipe
from glm45_train.errors import UserError
from glm45_train.model.hf_config import Glm45Config
from glm45_train.model.releases import RELEASED_CONFIGS

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_DATA = PACKAGE_ROOT / "data" / "sample_distill.jsonl"
SAMPLE_PROMPTS = PACKAGE_ROOT / "data" / "rl_prompts_sample.jsonl"
STEPS = 2
MAX_ROW_TOKENS = 256
TINY_SIZES = dict(
    hidden_size=64, head_dim=32, intermediate_size=128, moe_intermediate_size=32, max_position_embeddings=4096
)


@dataclass
class Rehearsal:
    """What was run and what came of it."""

    recipe_path: str
    model: str  # one line: the scaled model and where its family config came from
    layout: str
    processes: int
    global_batch: int
    losses: list[float] = field(default_factory=list)
    checkpoint: str | None = None
    error: str | None = None  # the failing rank's error line
    error_tail: str = ""
    seconds: float = 0.0
    work_dir: Path | None = None

    @property
    def passed(self) -> bool:
        return self.error is None

    def report(self) -> str:
        lines = [
            f"rehearse {self.recipe_path}: {'PASS' if self.passed else 'FAIL'} ({self.seconds:.0f} s)",
            f"  model:      {self.model}",
            f"  layout:     {self.layout}",
            f"  processes:  {self.processes} (CPU, gloo); global batch {self.global_batch}",
        ]
        if self.losses:
            lines.append("  loss:       " + ", ".join(f"step {i} {x:.4f}" for i, x in enumerate(self.losses, 1)))
        lines.append(f"  checkpoint: {self.checkpoint or 'none written'}")
        if not self.passed:
            lines.append(f"  error:      {self.error}")
            lines.append(f"  work dir kept: {self.work_dir}")
            lines.extend("  | " + line for line in self.error_tail.splitlines())
        return "\n".join(lines)


def world_size_for(recipe: Recipe) -> int:
    """The fewest processes the recipe's layout runs on."""
    return recipe.parallel.layout().smallest_world


def check_process_count(recipe: Recipe, max_procs: int) -> int:
    """The rehearsal's world size, or a UserError naming what drives it and an override that fits."""
    world = world_size_for(recipe)
    if world <= max_procs:
        return world
    p = recipe.parallel
    smaller, fits_in = _smaller_layout(recipe, max_procs)
    hint = f"e.g. {' '.join(smaller)} ({fits_in} processes)" if smaller else "lowering parallel.ep / parallel.tp"
    raise UserError(
        f"rehearsing needs {world} processes, above --max-procs {max_procs}: the smallest world for this layout "
        f"is lcm(tp*pp*cp = {p.tp}*{p.pp}*{p.cp}, ep*etp*pp = {p.ep}*{p.etp}*{p.pp}) = {world}. "
        f"Rehearse a smaller layout with an override, {hint}, or raise --max-procs"
    )


def _smaller_layout(recipe: Recipe, max_procs: int) -> tuple[list[str], int]:
    """Overrides halving ep, then tp, then pp until the world fits (ep first: it is what grows worlds most), and
    the world they need; no overrides if even ep = tp = pp = 1 does not fit."""
    p = recipe.parallel
    sizes = {"ep": p.ep, "tp": p.tp, "pp": p.pp}

    def world() -> int:
        return replace(p.layout(), ep=sizes["ep"], tp=sizes["tp"], pp=sizes["pp"]).smallest_world

    for key in sizes:
        while sizes[key] > 1 and world() > max_procs:
            sizes[key] //= 2
    if world() > max_procs:
        return [], world()
    return [f"parallel.{k}={v}" for k, v in sizes.items() if v != getattr(p, k)], world()


def family_config(recipe: Recipe, config_hint: str | None = None) -> tuple[Glm45Config, str]:
    """The recipe's model config and where it came from: model.source (or --config) when readable here, else the
    released config of the family the source's name says (Air when it contains 'air')."""
    from glm45_train.launch.model_parts import resolve_model_config

    source = recipe.model.source
    if config_hint or Path(source).exists():
        where = f"--config {config_hint}" if config_hint else source
        return resolve_model_config(source, config_hint), f"config of {where}"
    family = "air" if "air" in Path(source).name.lower() else "glm45"
    name = {"air": "GLM-4.5-Air", "glm45": "GLM-4.5"}[family]
    return (
        Glm45Config.from_dict(RELEASED_CONFIGS[family], source=f"released {name}"),
        f"released {name} config (RELEASED_CONFIGS['{family}']; {source} is not on this machine)",
    )


def scaled_config(base: Glm45Config, recipe: Recipe) -> dict[str, Any]:
    """config.json fields of a tiny model of `base`'s family on which the recipe's layout is valid."""
    p = recipe.parallel
    query_groups = p.tp if p.tp > 1 else 2
    groups = base.n_group
    per_token = 2 * base.topk_group if groups > 1 else 2  # Megatron's group score = HF's top-2 per group
    step = math.lcm(p.ep, groups)
    experts = step * math.ceil(max(8, 2 * per_token, 2 * groups) / step)
    first_dense = base.first_k_dense_replace
    # every stage holds a MoE layer, as the released models do: a stage without experts leaves the distributed
    # optimizer an empty expert shard, which megatron-core 0.16.1 cannot checkpoint (distrib_optimizer.state_dict)
    layers = p.pp * (first_dense + 1)
    return {
        **TINY_SIZES,
        "num_hidden_layers": layers,
        "first_k_dense_replace": first_dense,
        "num_attention_heads": 2 * query_groups,
        "num_key_value_heads": query_groups,
        "n_routed_experts": experts,
        "num_experts_per_tok": per_token,
        "n_group": groups,
        "topk_group": base.topk_group,
        "n_shared_experts": base.n_shared_experts,
        "num_nextn_predict_layers": base.num_nextn_predict_layers if recipe.train.mtp_loss_weight > 0 else 0,
        "use_qk_norm": base.use_qk_norm,
        "attention_bias": base.attention_bias,
        "routed_scaling_factor": base.routed_scaling_factor,
        "partial_rotary_factor": base.partial_rotary_factor,
        "norm_topk_prob": base.norm_topk_prob,
        "tie_word_embeddings": base.tie_word_embeddings,
        "rope_theta": base.rope_theta,
        "rms_norm_eps": base.rms_norm_eps,
    }


def describe_model(config: dict[str, Any], origin: str) -> str:
    c = config
    mtp = f"MTP {c['num_nextn_predict_layers']}" if c["num_nextn_predict_layers"] else "no MTP"
    groups = f", {c['n_group']} groups top-{c['topk_group']}" if c["n_group"] > 1 else ""
    return (
        f"{c['num_hidden_layers']} layers ({c['first_k_dense_replace']} dense), hidden {c['hidden_size']}, "
        f"{c['num_attention_heads']} heads / {c['num_key_value_heads']} query groups, {c['n_routed_experts']} "
        f"experts top-{c['num_experts_per_tok']}{groups}, {mtp}; scaled from the {origin}"
    )


def describe_layout(recipe: Recipe, world: int) -> str:
    p, t = recipe.parallel, recipe.train
    dp = world // (p.tp * p.pp * p.cp)
    lora = f"LoRA r{recipe.lora.rank} on {', '.join(recipe.lora.targets)}" if recipe.lora.enabled else "full SFT"
    recompute = f"recompute {t.recompute}" if t.recompute != "none" else "no recompute"
    return (
        f"tp {p.tp} pp {p.pp} ep {p.ep} etp {p.etp} cp {p.cp} sp {'on' if p.sp else 'off'} (dp {dp}); "
        f"{lora}; {recompute}; distributed optimizer {'on' if t.distributed_optimizer else 'off'}"
    )


def rehearse(
    recipe_path: str,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    max_procs: int = 16,
    config_hint: str | None = None,
    timeout_s: float = 1800.0,
    echo: Any = print,
    command: str | None = None,
) -> Rehearsal:
    """Scale the recipe's model and data down, run it on CPU processes, and say how it went (see the docstring)."""
    recipe = load_recipe(recipe_path, overrides)
    command = command or ("rl" if is_rl_recipe(recipe) else "sft")
    if recipe.parallel.cp > 1:
        raise UserError(
            "parallel.cp > 1 cannot be rehearsed on CPU: Megatron's local attention has no context parallelism "
            "(Transformer Engine's only); rehearse with parallel.cp=1"
        )
    world = check_process_count(recipe, max_procs)  # before anything is written or started
    base, origin = family_config(recipe, config_hint)
    config = scaled_config(base, recipe)
    p, t = recipe.parallel, recipe.train
    dp = world // (p.tp * p.pp * p.cp)
    global_batch = t.micro_batch_size * dp * p.pp
    result = Rehearsal(recipe_path, describe_model(config, origin), describe_layout(recipe, world), world, global_batch)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="glm45-rehearse-"))
    result.work_dir = work
    source, tokenizer = _write_model(config, recipe, work)
    run_dir = work / "run"
    data_settings = (
        _rl_settings(global_batch) if command == "rl" else _sft_data_settings(recipe, tokenizer, work, global_batch, dp)
    )
    settings = [
        f"model.source={source}",
        "model.dtype=fp32",
        *data_settings,
        f"data.tokenizer={tokenizer}",
        f"data.max_length={min(recipe.data.max_length, MAX_ROW_TOKENS)}",
        f"train.steps={STEPS}",
        "train.epochs=null",
        f"train.global_batch_size={global_batch}",
        f"checkpoint.dir={run_dir}",
        f"checkpoint.interval={STEPS}",
        "logging.interval=1",
        "logging.tensorboard=false",
        "logging.plot=false",
    ]
    echo(f"rehearse: scaled model and data in {work}; {STEPS} steps on {world} processes...")
    returncode, output = _launch(command, recipe_path, [*overrides, *settings], world, work / "logs", timeout_s)
    result.seconds = time.perf_counter() - started
    _collect(result, run_dir, returncode, output, work / "logs")
    if result.passed:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _sft_data_settings(recipe: Recipe, tokenizer: Path, work: Path, global_batch: int, dp: int) -> list[str]:
    eval_rows = recipe.train.micro_batch_size * dp
    data, rows = _prepare_data(recipe, tokenizer, work / "data", global_batch + eval_rows)
    return [
        f"data.prepared={data}",
        "data.inputs=[]",
        f"eval.split={(eval_rows - 0.5) / rows}",  # exactly eval_rows rows: one micro-batch per DP rank
        f"eval.interval={STEPS}",
    ]


def _rl_settings(global_batch: int) -> list[str]:
    """RL: the sample prompts, groups of 2, two updates per step, 16 new tokens, the CPU engine (rollout layout
    and memory are `plan`'s: the engine itself cannot run here)."""
    return [
        "data.prepared=null",
        f"data.inputs=[{SAMPLE_PROMPTS}]",
        f"rl.prompts_per_step={global_batch}",
        "rl.rollout.group_size=2",
        "rl.rollout.max_new_tokens=16",
        "rl.rollout.engine=hf",
        "rl.rollout.placement=in_process",  # a vllm recipe's server placement, URLs and dtype are the engine's
        "rl.rollout.urls=[]",
        "rl.rollout.engines=0",
        "rl.rollout.dtype=null",
    ]


def _write_model(config: dict[str, Any], recipe: Recipe, work: Path) -> tuple[Path, Path]:
    """(model.source for the run, tokenizer dir): HF when the recipe's source is an HF directory, else torch_dist."""
    from glm45_train.model.tiny import make_tiny

    preset = "glm45" if config["use_qk_norm"] else "air"  # every structural field is overridden anyway
    hf_dir = make_tiny(work / "model-hf", preset=preset, overrides=config)
    if (Path(recipe.model.source) / "config.json").exists():
        return hf_dir, hf_dir
    mcore_dir = work / "model-mcore"
    command = [
        sys.executable, "-m", "glm45_train.cli.main", "export", "--to-mcore", "--model", str(hf_dir),
        "--output-dir", str(mcore_dir), "--dtype", "fp32", "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(command, env=_child_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"converting the scaled model failed:\n{done.stderr[-3000:]}")
    return mcore_dir, hf_dir


def _prepare_data(recipe: Recipe, tokenizer: Path, target: Path, rows_needed: int) -> tuple[Path, int]:
    """The sample set in the recipe's mode and packing, repeated until it has `rows_needed` rows."""
    from glm45_train.data.chat import parse_mode
    from glm45_train.data.prepare import PrepareOptions, prepare_dataset

    options = PrepareOptions(
        max_length=min(recipe.data.max_length, MAX_ROW_TOKENS),
        mode=parse_mode(recipe.data.mode),
        pack=recipe.data.pack,
        seed=recipe.train.seed,
        show_progress=False,
        overwrite=True,  # grown until it has the rows, in the rehearsal's own folder
    )
    copies = 1
    while True:
        rows = prepare_dataset([SAMPLE_DATA] * copies, tokenizer, target, options).bins
        if rows >= rows_needed:
            return target, rows
        copies = math.ceil(copies * rows_needed / max(rows, 1)) + 1


def _child_env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _launch(
    command_name: str, recipe_path: str, overrides: list[str], world: int, log_dir: Path, timeout_s: float
) -> tuple[int, str]:
    """`torchrun ... glm45-train sft|rl RECIPE overrides`; returns (exit code, torchrun's own output)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
        f"--log-dir={log_dir}", "--redirects=3",
        "-m", "glm45_train.cli.main", command_name, recipe_path, *overrides,
    ]  # fmt: skip
    process = subprocess.Popen(
        command, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and every rank it started (their own session)
        output, _ = process.communicate()
        return -1, output + f"\nrehearsal timed out after {timeout_s:.0f} s"
    return process.returncode, output


def _collect(result: Rehearsal, run_dir: Path, returncode: int, output: str, log_dir: Path) -> None:
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        result.losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines() if line.strip()]
    latest = run_dir / "latest_checkpointed_iteration.txt"
    step = int(latest.read_text()) if latest.exists() else None
    if step is not None:
        files = [f for f in (run_dir / f"iter_{step:07d}").rglob("*") if f.is_file()]
        size = sum(f.stat().st_size for f in files)
        result.checkpoint = f"iter_{step:07d} ({len(files)} files, {size / 2**20:.1f} MiB)"
    if returncode == 0 and len(result.losses) == STEPS and step == STEPS:
        return
    rank, tail = failing_rank_log(output, log_dir)
    result.error_tail = tail
    line = error_line(tail) or error_line(output) or f"exit code {returncode}"
    result.error = f"rank {rank}: {line}" if rank is not None else line
    if returncode == 0:
        result.error = f"the run ended without {STEPS} logged steps and a step-{STEPS} checkpoint"


_ROOT_CAUSE_RANK = re.compile(r"Root Cause.*?rank\s*:\s*(\d+)", re.S)
_RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s?", re.M)  # torch prefixes uncaught exceptions' lines with the rank
_ERROR = re.compile(r"^(?:[A-Za-z_][\w.]*(?:Error|Exception|Interrupt)\b.*|glm45-train \w+: error: .*)$")


def failing_rank_log(output: str, log_dir: Path, lines: int = 12) -> tuple[int | None, str]:
    """(rank, last lines of its stderr): torchrun's first observed failure, else the first rank with a traceback."""
    logs = {int(p.parent.name): p for p in log_dir.glob("*/attempt_*/*/stderr.log") if p.parent.name.isdigit()}
    match = _ROOT_CAUSE_RANK.search(output)
    candidates = [int(match.group(1))] if match else []
    candidates += sorted(r for r, p in logs.items() if "Traceback" in p.read_text(errors="replace"))
    for rank in candidates:
        if rank in logs:
            text = _RANK_PREFIX.sub("", logs[rank].read_text(errors="replace"))
            return rank, "\n".join(text.splitlines()[-lines:])
    return (candidates[0] if candidates else None), "\n".join(output.splitlines()[-lines:])


def error_line(text: str) -> str | None:
    """The last exception line (`SomeError: message`) or `glm45-train ...: error:` line of a log; torchrun's own
    ChildFailedError only says that a rank failed."""
    for line in reversed(_RANK_PREFIX.sub("", text).splitlines()):
        if _ERROR.match(line.strip()) and "ChildFailedError" not in line:
            return line.strip()
    return None
