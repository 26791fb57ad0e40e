"""`glm45-train rl RECIPE.yaml [key=value ...] [--print-config] [--rehearse [--max-procs N]]`: GRPO after SFT.

The same conventions as `sft`: one process directly or several under torchrun (every rank runs this command),
the same run directory, checkpoints, metrics and Slurm path; `--rehearse` runs the recipe's layout on a
scaled-down model on CPU processes (launch/rehearse.py).
"""

from __future__ import annotations

import argparse

from glm45_train.cli.sft import add_rehearse_arguments, is_first_rank


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("rl", help="GRPO reinforcement learning from a recipe (after SFT)", intermixed=True)
    parser.add_argument("recipe", metavar="RECIPE.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. rl.grpo.kl_coeff=0")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    add_rehearse_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from glm45_train.config.recipe import load_recipe
    from glm45_train.config.rl import check_rl_values

    if args.rehearse:
        from glm45_train.launch.rehearse import rehearse

        rehearsal = rehearse(args.recipe, args.overrides, max_procs=args.max_procs, command="rl")
        print(rehearsal.report())
        return 0 if rehearsal.passed else 1
    recipe = load_recipe(args.recipe, args.overrides)
    check_rl_values(recipe)
    from glm45_train.rl.setup import check_engine_support, reward_set

    check_engine_support(recipe)
    reward_set(recipe)  # the rewards resolve (user modules import) before any process or folder exists
    if args.print_config:
        print(OmegaConf.to_yaml(OmegaConf.structured(recipe)), end="")
        return 0
    from glm45_train.rl.loop import run_rl

    result = run_rl(recipe)
    how = "stopped by signal, checkpointed" if result.stopped_by_signal else "finished"
    reward = f"{result.final_reward:.4f}" if result.final_reward is not None else "n/a"
    if is_first_rank():
        print(f"rl {how} at step {result.steps}; last mean reward {reward}; run directory {result.run_dir}")
    return 0
