"""`glm45-train submit RECIPE.yaml --nodes N [--gpus-per-node G] [--partition P] [--account A] [--time T]
[--container-image IMG] [--container-mounts SRC:DST,...] [--env NAME[=VALUE]] [--dry-run] [key=value ...]`.

Checks before anything is written: the recipe (schema and overrides), its layout against nodes x GPUs, and
on GPUs that `plan` says it fits (--force to submit anyway). Then the job is rendered from slurm/train.sbatch
into CHECKPOINT_DIR/slurm/ with the resolved recipe next to it, and sbatch'ed (--dry-run prints it instead).
`--gpus-per-node 0` renders a CPU job (gloo) for rehearsals and local Slurm tests. `--rehearse` runs the
recipe's layout on a scaled-down model on CPU processes here (launch/rehearse.py) and stops: nothing is submitted.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from glm45_train.cli.plan import add_plan_arguments
from glm45_train.cli.sft import add_rehearse_arguments, run_rehearsal


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("submit", help="check a recipe, render its Slurm job and sbatch it", intermixed=True)
    parser.add_argument("recipe", metavar="RECIPE.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. train.lr=2e-5")
    parser.add_argument("--nodes", type=int, help="required unless --rehearse")
    parser.add_argument("--gpus-per-node", type=int, default=8, metavar="G", help="default 8; 0 = CPU job (gloo)")
    parser.add_argument("--procs-per-node", type=int, metavar="P", help="CPU jobs: processes per node")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--time", default="24:00:00", help="Slurm time limit (default 24:00:00)")
    parser.add_argument("--signal-seconds", type=int, default=300, help="USR1 this long before the limit")
    parser.add_argument("--container-image", metavar="IMG", help="run under pyxis/enroot with this image")
    parser.add_argument("--container-mounts", metavar="SRC:DST,...", help="extra pyxis mounts")
    parser.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]", help="set or forward")
    parser.add_argument("--force", action="store_true", help="submit even if plan says it does not fit")
    parser.add_argument("--dry-run", action="store_true", help="print the job; write and submit nothing")
    add_plan_arguments(parser)
    add_rehearse_arguments(parser, "; then stop without submitting (--nodes and the Slurm options are not used)")
    parser.set_defaults(func=run)


def command_for(recipe) -> str:
    """`rl` for an RL recipe (it names rewards), else `sft`."""
    from glm45_train.config.rl import is_rl_recipe

    return "rl" if is_rl_recipe(recipe) else "sft"


def run(args: argparse.Namespace) -> int:
    from glm45_train.config.recipe import load_recipe
    from glm45_train.launch import slurm
    from glm45_train.launch.model_parts import resolve_model_config

    if args.rehearse:
        return run_rehearsal(args, config_hint=args.config)
    recipe = load_recipe(args.recipe, args.overrides)
    hf = resolve_model_config(recipe.model.source, args.config)
    procs = _processes_per_node(args, recipe, hf)
    _check_fit(args, recipe, hf, args.nodes * procs)
    run_dir = Path(recipe.checkpoint.dir).resolve()
    recipe.checkpoint.dir = str(run_dir)
    spec = slurm.JobSpec(
        run_dir=run_dir,
        workdir=Path.cwd(),
        entry=("-m", "glm45_train.cli.main", command_for(recipe), str(run_dir / "slurm" / "recipe.yaml")),
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        procs_per_node=procs,
        job_name=slurm.job_name_for(args.recipe),
        time=args.time,
        partition=args.partition,
        account=args.account,
        signal_seconds=args.signal_seconds,
        container_image=args.container_image,
        container_mounts=_mounts(args, recipe, run_dir),
        env=_env_flags(args.env),
    )
    script = slurm.render_job(spec)
    recipe_text = slurm.dump_recipe(recipe)
    if args.dry_run:
        print(script, end="")
        return 0
    spec.slurm_dir.mkdir(parents=True, exist_ok=True)
    (spec.slurm_dir / "recipe.yaml").write_text(recipe_text)
    path = slurm.write_job(spec, script)
    job_id = slurm.sbatch(path)
    print(f"submitted job {job_id}: {path}\n  logs: {spec.log_dir}/{spec.job_name}-{job_id}.out")
    return 0


def _processes_per_node(args: argparse.Namespace, recipe, hf) -> int:
    """GPUs per node on GPUs; on CPU --procs-per-node, or the fewest processes that make the layout valid."""
    from glm45_train.config.recipe import RecipeError, validate_layout
    from glm45_train.errors import UserError

    if args.nodes is None:
        raise UserError("--nodes N is required (unless --rehearse)")
    if args.nodes < 1:
        raise UserError(f"--nodes must be >= 1, got {args.nodes}")
    if args.gpus_per_node > 0:
        return args.gpus_per_node
    if args.procs_per_node:
        return args.procs_per_node
    for procs in range(1, 257):
        try:
            validate_layout(recipe, args.nodes * procs, hf)
        except RecipeError:
            continue
        return procs
    raise UserError("no processes-per-node count up to 256 makes the layout valid; check parallel.*")


def _check_fit(args: argparse.Namespace, recipe, hf, world: int) -> None:
    from glm45_train.config.recipe import check_trainable_layout, validate_layout
    from glm45_train.errors import UserError
    from glm45_train.launch.plan import GIB, plan

    validate_layout(recipe, world, hf)
    check_trainable_layout(recipe)
    if args.gpus_per_node == 0:
        _note(f"submit: CPU job, {world} processes (layout checked; no GPU memory plan)")
        return
    result = plan(recipe, hf, args.gpu, world)
    line = f"plan: {result.worst.total / GIB:.1f} GiB per GPU of {result.gpu.memory_gib:.1f} ({result.gpu.name})"
    if result.fits:
        _note(f"submit: {line}: fits")
    elif args.force:
        _note(f"submit: {line}: does NOT fit; submitting anyway (--force)")
    else:
        raise UserError(f"{line}: does not fit; see `glm45-train plan {args.recipe}`, or use --force")


def _note(message: str) -> None:
    """Progress goes to stderr: with --dry-run, stdout is exactly the job script."""
    import sys

    print(message, file=sys.stderr)


def _mounts(args: argparse.Namespace, recipe, run_dir: Path) -> tuple[str, ...]:
    """Pyxis mounts: the run directory, the working directory, the model and data, then --container-mounts."""
    if not args.container_image:
        return ()
    paths = [run_dir, Path.cwd()]
    for value in (recipe.model.source, recipe.data.prepared, recipe.data.tokenizer, *recipe.data.inputs):
        if value and Path(value).exists():
            paths.append(Path(value).resolve())
    mounts = list(dict.fromkeys(f"{path}:{path}" for path in paths))
    extra = [m for m in (args.container_mounts or "").split(",") if m]
    return tuple(mounts + extra)


def _env_flags(values: list[str]) -> dict[str, str]:
    """--env NAME=VALUE sets a value; --env NAME forwards the submitting shell's value."""
    import os

    from glm45_train.errors import UserError

    env = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep:
            if name not in os.environ:
                raise UserError(f"--env {name}: not set in this shell (use --env {name}=VALUE)")
            value = os.environ[name]
        env[name] = value
    return env
