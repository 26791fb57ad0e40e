"""`glm45-train plan RECIPE.yaml [--gpu h20|h100|h200] [--nodes N --gpus-per-node G] [--config air|glm45|PATH]
[--mfu X] [key=value ...]`: memory per GPU, fit, GPUs needed and a step-time estimate, before submitting.

Without --nodes the plan is made for the smallest world size that fits the recipe's layout. An RL recipe
(`rl.rewards` set) is planned with its reference model and rollout engine; with separate rollout GPUs
(rl.rollout.colocate false) --nodes x --gpus-per-node counts them too, and the rest train.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING

from glm45_train.launch.gpus import GPUS

if TYPE_CHECKING:
    from glm45_train.config.recipe import Recipe


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan", help="memory per GPU, fit and step time of a recipe on H20/H100/H200", intermixed=True
    )
    parser.add_argument("recipe", metavar="RECIPE.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. parallel.ep=8")
    add_plan_arguments(parser)
    parser.add_argument("--nodes", type=int, help="plan for this many nodes (default: the fewest that fit)")
    parser.add_argument("--gpus-per-node", type=int, default=8, metavar="G", help="default: 8")
    parser.add_argument("--mfu", type=float, help="model FLOPs utilisation for the step time (default: mfu_table.py)")
    parser.set_defaults(func=run)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Options `plan` and `submit` share."""
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h20", help="GPU kind (default: h20)")
    parser.add_argument(
        "--config",
        metavar="air|glm45|PATH",
        help="model config to plan with when model.source is not on this machine (a known model or config.json)",
    )


def run(args: argparse.Namespace) -> int:
    from glm45_train.config.recipe import load_recipe
    from glm45_train.errors import UserError
    from glm45_train.launch.model_parts import resolve_model_config
    from glm45_train.launch.plan import plan, smallest_world
    from glm45_train.launch.report import format_plan

    recipe = load_recipe(args.recipe, args.overrides)
    hf = resolve_model_config(recipe.model.source, args.config)
    valid, fitting = smallest_world(recipe, hf, args.gpu)
    if args.nodes is not None:
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise UserError("--nodes and --gpus-per-node must be positive")
        world = args.nodes * args.gpus_per_node - _separate_rollout_gpus(recipe)
        if world < 1:
            raise UserError(f"--nodes x --gpus-per-node leaves no training GPU beside rl.rollout.gpus ({world})")
    elif valid is None:
        raise UserError("no world size up to 8192 GPUs makes this layout valid; check parallel.*")
    else:
        world = fitting or valid
    result = plan(recipe, hf, args.gpu, world)
    if args.mfu is not None:
        if not 0 < args.mfu <= 1:
            raise UserError("--mfu must be in (0, 1]")
        result = dataclasses.replace(result, mfu_override=args.mfu)
    print(format_plan(result, args.recipe, fitting))
    return 0 if result.fits else 1


def _separate_rollout_gpus(recipe: Recipe) -> int:
    """GPUs of the job that run rollout engines only: rl.rollout.gpus of an RL recipe that does not colocate."""
    from glm45_train.launch.rl_plan import is_rl

    rollout = recipe.rl.rollout
    return rollout.gpus if is_rl(recipe) and not rollout.colocate else 0
