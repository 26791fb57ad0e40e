"""`glm45-train make-tiny OUT_DIR [--preset air|glm45] [--seed N] [--fp8 per-channel|block] [--overwrite]`."""

from __future__ import annotations

import argparse

PRESET_NAMES = ("air", "glm45")  # model/tiny.py's PRESETS, named here so that importing the CLI loads no torch


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "make-tiny",
        help="write a tiny GLM-4.5 checkpoint (released on-disk format) with a local tokenizer",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR")
    parser.add_argument("--preset", choices=PRESET_NAMES, default="air")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fp8",
        choices=("per-channel", "block"),
        default=None,
        help="quantise the projections to FP8 like the FP8 releases (per-channel weight_scale or 128x128 blocks)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from glm45_train.model.tiny import make_tiny

    out = make_tiny(args.out_dir, preset=args.preset, seed=args.seed, overwrite=args.overwrite, fp8=args.fp8)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    kind = f", FP8 {args.fp8}" if args.fp8 else ""
    print(f"wrote tiny GLM-4.5 ({args.preset}{kind}, seed {args.seed}) to {out}: {len(shards)} shards")
    return 0
