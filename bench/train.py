"""Training-loop overhead: our `sft` loop against a bare Megatron-Core loop, same model, same batches.

Both run in one process on the tiny GLM-4.5-Air (fp32, CPU) over the same packed global batches of the sample
data. "Bare" is Megatron's forward/backward schedule + optimizer step + LR scheduler on pre-collated batches;
"ours" is `run_sft` (batch planning and collation each step, metrics, signal polling, interval checks;
checkpoint writes excluded). Reported: tokens/s of each and ours/bare time ratio (target <= 1.10).

    python bench/train.py [--steps 30] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def prepare(work: Path) -> tuple[Path, Path]:
    from glm45_train.data.chat import parse_mode
    from glm45_train.data.prepare import PrepareOptions, prepare_dataset
    from glm45_train.model.tiny import make_tiny

    hf_dir = make_tiny(work / "hf", preset="air")
    options = PrepareOptions(
        max_length=512, mode=parse_mode("non-thinking"), pack=True, show_progress=False, overwrite=True
    )
    prepare_dataset([REPO / "data/sample_distill.jsonl"], hf_dir, work / "prepared", options)
    return hf_dir, work / "prepared"


def recipe_for(hf_dir: Path, prepared: Path, run_dir: Path, steps: int):
    from glm45_train.config.recipe import load_recipe

    overrides = [
        f"model.source={hf_dir}", "parallel.ep=1", f"train.steps={steps}", "train.global_batch_size=2",
        f"data.prepared={prepared}", "data.inputs=[]", f"checkpoint.dir={run_dir}", f"checkpoint.interval={10**6}",
        "eval.interval=0", "logging.tensorboard=false", "logging.plot=false",
    ]  # fmt: skip
    return load_recipe(REPO / "recipes/tiny_sft.yaml", overrides)


def ours(recipe) -> tuple[float, int]:
    from glm45_train.train.loop import run_sft

    result = run_sft(recipe)
    return result.train_seconds, result.tokens


def bare(recipe, steps: int) -> tuple[float, int]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from glm45_train.data.prepared import load_prepared
    from glm45_train.runtime.cpu import on_cpu_device
    from glm45_train.train.batches import BatchPlan, DataPosition, micro_batches
    from glm45_train.train.loop import collation_for, forward_step
    from glm45_train.train.setup import build_trainer

    dataset = load_prepared(recipe.data.prepared)
    plan = BatchPlan(dataset, seed=recipe.train.seed, eval_fraction=recipe.eval.split, global_batch_size=2)
    trainer = build_trainer(recipe, lambda _dp: steps)
    collation = collation_for(recipe)
    position, global_batches = DataPosition(), []
    for _ in range(steps):
        rows, position = plan.global_batch(position)
        global_batches.append(micro_batches(plan, rows, 0, 1, collation))
    forward_backward = get_forward_backward_func()
    started = time.perf_counter()
    for batches in global_batches:
        trainer.model.zero_grad_buffer()
        trainer.optimizer.zero_grad()
        forward_backward(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[trainer.model],
            num_microbatches=len(batches), seq_length=batches[0].tokens.shape[1],
            micro_batch_size=batches[0].tokens.shape[0], forward_only=False,
        )  # fmt: skip
        with on_cpu_device():
            trainer.optimizer.step()
        trainer.scheduler.step(increment=1)
    seconds = time.perf_counter() - started
    return seconds, sum(b.tokens.numel() for batches in global_batches for b in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        hf_dir, prepared = prepare(work)
        timings: dict[str, list[float]] = {"bare": [], "ours": []}
        tokens = {}
        for repeat in range(args.repeats):  # alternate, keep the best of each: the machine is shared
            recipe = recipe_for(hf_dir, prepared, work / f"run{repeat}", args.steps)
            seconds, tokens["bare"] = bare(recipe, args.steps)
            timings["bare"].append(seconds)
            seconds, tokens["ours"] = ours(recipe)
            timings["ours"].append(seconds)
    best = {k: min(v) for k, v in timings.items()}
    assert tokens["bare"] == tokens["ours"], tokens
    print(f"steps {args.steps}, tokens per run {tokens['ours']}, best of {args.repeats}")
    print("| loop | seconds | tokens/s |\n|---|---|---|")
    for name in ("bare", "ours"):
        print(f"| {name} | {best[name]:.2f} | {tokens[name] / best[name]:.0f} |")
    print(f"overhead ours/bare: {best['ours'] / best['bare']:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
