"""`glm45-train sft RECIPE.yaml [key=value ...] [--print-config] [--rehearse [--max-procs N]]`: LoRA or full SFT.

Runs directly for one process or under torchrun for several; every rank runs this same command. `--rehearse`
runs the recipe's layout on a scaled-down model on CPU processes instead (launch/rehearse.py).
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("sft", help="LoRA or full supervised fine-tuning from a recipe", intermixed=True)
    parser.add_argument("recipe", metavar="RECIPE.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. train.lr=2e-4")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    add_rehearse_arguments(parser)
    parser.set_defaults(func=run)


def add_rehearse_arguments(parser: argparse.ArgumentParser, what: str = "") -> None:
    """Options `sft` and `submit` share."""
    parser.add_argument(
        "--rehearse",
        action="store_true",
        help="run the recipe's parallel layout (tp/pp/ep/etp/cp/sp, LoRA, recompute as written) for 2 steps on a "
        "scaled-down GLM-4.5 of its family, over gloo with CPU processes, and report PASS/FAIL" + what,
    )
    parser.add_argument(
        "--max-procs", type=int, default=16, metavar="N", help="--rehearse: refuse layouts needing more (default 16)"
    )


def run_rehearsal(args: argparse.Namespace, config_hint: str | None = None) -> int:
    from glm45_train.launch.rehearse import rehearse

    result = rehearse(args.recipe, args.overrides, max_procs=args.max_procs, config_hint=config_hint)
    print(result.report())
    return 0 if result.passed else 1


def is_first_rank() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def run(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from glm45_train.config.recipe import load_recipe

    if args.rehearse:
        return run_rehearsal(args)
    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_config:
        print(OmegaConf.to_yaml(OmegaConf.structured(recipe)), end="")
        return 0
    from glm45_train.config.recipe import validate_layout
    from glm45_train.train.inputs import ensure_prepared
    from glm45_train.train.loop import run_sft
    from glm45_train.train.setup import model_config_of, world_size_from_env

    validate_layout(recipe, world_size_from_env(), model_config_of(recipe.model.source))  # before any work

    result = run_sft(ensure_prepared(recipe))
    how = "stopped by signal, checkpointed" if result.stopped_by_signal else "finished"
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    if is_first_rank():  # every rank runs this command; one summary line
        print(f"sft {how} at step {result.steps}; last loss {loss}; run directory {result.run_dir}")
    return 0
