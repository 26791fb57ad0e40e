"""RL throughput on CPU: the rollout engines against transformers' `generate`, and where an RL step's time goes.

    .venv/bin/python bench/rl.py [--repeats 3] [--steps 12] [--update-docs]

Notable:
- Rollouts: the same tiny GLM-4.5-Air (make-tiny), the same rendered prompts, groups of G responses of exactly
  max_new_tokens tokens (no stop tokens, so both sides generate the same number), sampling at temperature 1 with
  the log-prob of every sampled token (what GRPO needs): `HFEngine.generate` vs `model.generate(...,
  num_return_sequences=G, output_logits=True)` + the log-softmax of the chosen tokens, on the same model object.
  Rates are the best of `--repeats` interleaved runs; the ratio is also given as the median per repeat.
- vLLM (CPU build) on the same prompts and seeds, fed the same weights: in-process (`vllm.LLM`, one engine core
  process) and server (`vllm serve`, one HTTP request per response); it stops at the model's end-of-text tokens,
  so its rate is per token generated. Warm engines: start-up (about 20 s each) is not counted.
- Step split: `glm45-train rl recipes/tiny_grpo.yaml` on 2 processes (EP 2) for `--steps` steps with each engine
  (hf; vllm in-process, one engine per rank; vllm server, one server); from its metrics.jsonl (step 1 left out:
  warm-up), the share of step time in weight sync, engine verification (rl/probe.py), rollout, training (log-prob
  passes and updates) and the rest (rewards, batching, gathering).
- --update-docs rewrites the `## RL` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
PROMPTS, GROUP, NEW_TOKENS = 8, 4, 64


def load_engine(model_dir: Path):
    from safetensors.torch import load_file

    from glm45_train.rl.engines.hf import HFEngine

    engine = HFEngine(model_dir)
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(shard))
    engine.update_weights(tensors.items())
    return engine


def prompt_ids(model_dir: Path) -> list[tuple[int, ...]]:
    from glm45_train.data.chat import load_chat_tokenizer
    from glm45_train.rl.prompts import load_prompts, render_prompts

    records = load_prompts([REPO / "data/rl_prompts_sample.jsonl"]).records[:PROMPTS]
    return [tuple(ids) for ids in render_prompts(records, load_chat_tokenizer(model_dir), thinking=False)]


def time_engine(engine, prompts) -> tuple[float, int]:
    from glm45_train.rl.rollout import Request, SamplingParams

    params = SamplingParams(1.0, 1.0, NEW_TOKENS, ())
    started = time.perf_counter()
    out = engine.generate([Request(p, GROUP, seed=i) for i, p in enumerate(prompts)], params)
    return time.perf_counter() - started, sum(len(c.response_ids) for group in out for c in group)


@torch.no_grad()
def time_generate(model, prompts) -> tuple[float, int]:
    started, tokens = time.perf_counter(), 0
    for i, prompt in enumerate(prompts):
        torch.manual_seed(i)
        ids = torch.tensor([prompt])
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
            max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_return_sequences=GROUP,
            output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
        chosen = out.sequences[:, ids.shape[1] :]
        logits = torch.stack(out.logits, dim=1).float()
        torch.log_softmax(logits, -1).gather(-1, chosen[..., None])
        tokens += chosen.numel()
    return time.perf_counter() - started, tokens


SHAPES = {  # label -> recipe overrides: the recipe's toy step, and one closer to an RL step's shape
    "`tiny_grpo.yaml` as written: 4 prompts x 4 responses, up to 24 tokens, 2 updates": [],
    "16 prompts x 8 responses, up to 64 tokens, 2 updates": [
        "rl.prompts_per_step=16", "rl.rollout.group_size=8", "rl.rollout.max_new_tokens=64",
        "train.global_batch_size=64", "train.micro_batch_size=16",
    ],
}  # fmt: skip
ENGINES = {  # label -> recipe overrides
    "hf": ["rl.rollout.engine=hf"],
    "vllm in-process": ["rl.rollout.engine=vllm"],
    "vllm server": ["rl.rollout.engine=vllm", "rl.rollout.placement=server", "rl.rollout.engines=1"],
}


def vllm_engines(model_dir: Path, scratch: Path) -> dict[str, object]:
    """Both vLLM placements, warm, holding the tiny model's weights."""
    from types import SimpleNamespace

    from safetensors.torch import load_file

    from glm45_train.rl.engines.vllm import build_vllm_engine

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(shard))
    weights = {name: t.float() for name, t in tensors.items() if not name.startswith("model.layers.3.")}  # no MTP
    engines = {}
    for index, placement in enumerate(("in_process", "server")):
        rollout = SimpleNamespace(tp=1, gpu_memory_fraction=0.5, cpu_kv_cache_gib=1.0, placement=placement)
        engine = build_vllm_engine(
            model_dir, rollout, dtype=torch.float32, seed=0, max_model_len=512,
            work_dir=scratch / "vllm" / placement, index=index,
        )  # fmt: skip
        engine.update_weights(weights.items())
        engines[f"vllm {placement.replace('_', '-')}"] = engine
    return engines


def step_split(model_dir: Path, steps: int, scratch: Path, overrides: list[str]) -> dict[str, float]:
    run_dir = scratch / ("rl-" + "-".join(o.split("=")[-1] for o in overrides)[:120])
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
        "glm45_train.cli.main", "rl", str(REPO / "recipes/tiny_grpo.yaml"), f"model.source={model_dir}",
        f"checkpoint.dir={run_dir}", f"train.steps={steps}", f"checkpoint.interval={steps}", "logging.plot=false",
        *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run(command, check=True, env=env, capture_output=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]

    def total(key: str) -> float:
        return sum(r[key] for r in records)

    step = total("step_seconds")
    return {
        "step_s": step / len(records),
        "rollout": total("rollout_seconds") / step,
        "train": total("train_seconds") / step,
        "sync_verify_s": (total("sync_seconds") + total("verify_seconds")) / len(records),
        "sync": total("sync_seconds") / step,
        "probe": total("verify_seconds") / step,
        "reward": total("reward_seconds") / step,
        "outside": 1 - (total("rollout_seconds") + total("train_seconds")) / step,
        "rollout_tokens_per_s": statistics.median(r["rollout_tokens_per_s"] for r in records),
    }


def run(repeats: int, steps: int) -> str:
    from glm45_train.model.tiny import make_tiny

    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        model_dir = make_tiny(scratch / "tiny", preset="air")
        engine, prompts = load_engine(model_dir), prompt_ids(model_dir)
        others = vllm_engines(model_dir, scratch)
        time_engine(engine, prompts[:1]), time_generate(engine.model, prompts[:1])  # warm-up
        for other in others.values():
            time_engine(other, prompts[:1])
        rates: dict[str, list[tuple[float, int]]] = {"generate": [], "hf": [], **{k: [] for k in others}}
        for _ in range(repeats):
            rates["generate"].append(time_generate(engine.model, prompts))
            rates["hf"].append(time_engine(engine, prompts))
            for label, other in others.items():
                rates[label].append(time_engine(other, prompts))
        for other in others.values():
            other.shutdown()  # type: ignore[attr-defined]
        splits = {
            shape: {name: step_split(model_dir, steps, scratch, [*engine, *sized]) for name, engine in ENGINES.items()}
            for shape, sized in SHAPES.items()
        }  # fmt: skip
    return _section(rates, splits, repeats, steps)


ROLLOUT_ROWS = {
    "generate": "transformers `generate` (num_return_sequences, output_logits)",
    "hf": "`HFEngine.generate` (prompts batched, one prefill per group, finished rows dropped)",
    "vllm in-process": "vLLM in-process (`vllm.LLM`, CPU build, fp32, eager)",
    "vllm server": "vLLM server (`vllm serve`, one HTTP request per response)",
}


def _section(rates: dict[str, list[tuple[float, int]]], splits: dict[str, dict], repeats: int, steps: int) -> str:
    lines = _rollout_lines(rates, repeats, steps)
    for shape, rows in splits.items():
        lines += ["", f"One RL step of {shape} (2 processes, EP 2; mean of steps 2-{steps}):", ""]
        lines += _split_lines(rows)
    lines += [
        "",
        "Targets: the CPU engine ≥ transformers generate; weight sync + verification ≤ 10% of the step.",
        "",
    ]
    return "\n".join(lines)


def _rollout_lines(rates: dict[str, list[tuple[float, int]]], repeats: int, steps: int) -> list[str]:
    def best(label: str) -> float:
        return max(tokens / seconds for seconds, tokens in rates[label])

    def median_ratio(label: str) -> float:
        pairs = zip(rates[label], rates["generate"], strict=True)
        return statistics.median((o[1] / o[0]) / (t[1] / t[0]) for o, t in pairs)

    header = (
        f"`bench/rl.py --repeats {repeats} --steps {steps}` on {os.cpu_count()} CPU cores ({platform.machine()}), "
        f"tiny GLM-4.5-Air (make-tiny), {PROMPTS} prompts x {GROUP} responses x {NEW_TOKENS} new tokens, fp32, "
        f"sampling with log-probs; load average (1 min) {os.getloadavg()[0]:.1f}."
    )
    lines = [
        "## RL", "", header, "",
        "| rollout path | tokens/s (best) | × transformers generate (best / best) | (median per repeat) |",
        "|---|---:|---:|---:|",
    ]  # fmt: skip
    for label, text in ROLLOUT_ROWS.items():
        lines.append(
            f"| {text} | {best(label):,.0f} | {best(label) / best('generate'):.2f} | {median_ratio(label):.2f} |"
        )
    return lines


def _split_lines(splits: dict[str, dict]) -> list[str]:
    lines = [
        "| engine | step s | sync + verification s | weight sync | verification (probe) | rollout | training | rest "
        "| rollout tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, split in splits.items():
        rest = split["outside"] - split["sync"] - split["probe"]
        lines.append(
            f"| {label} | {split['step_s']:.2f} | {split['sync_verify_s']:.2f} | {split['sync']:.0%} "
            f"| {split['probe']:.0%} | {split['rollout']:.0%} | {split['train']:.0%} | {rest:.0%} "
            f"| {split['rollout_tokens_per_s']:,.0f} |"
        )
    return lines


def update_docs(section: str) -> None:
    text = DOCS.read_text(encoding="utf-8")
    pattern = re.compile(r"^## RL\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    DOCS.write_text(text.rstrip() + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args()
    section = run(args.repeats, args.steps)
    print(section)
    if args.update_docs:
        update_docs(section)


if __name__ == "__main__":
    main()
