"""`glm45-train check HF_DIR MCORE_DIR [--dtype fp32|bf16] [--layerwise]`: the precision check on its own.

MCORE_DIR is a checkpoint written by `export --to-mcore`; an HF directory is accepted too (then the check
compares our Megatron model, filled through the mapping table, with transformers on the same weights).
Exit 0 only on pass.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "check", help="compare a Megatron checkpoint with its HF source (logits, layers, MTP)"
    )
    parser.add_argument("hf_dir", metavar="HF_DIR")
    parser.add_argument("mcore_dir", metavar="MCORE_DIR")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--layerwise", action="store_true", help="one decoder layer in memory at a time")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from glm45_train.convert.precision.check import check
    from glm45_train.convert.sources import open_source

    report = check(args.hf_dir, open_source(args.mcore_dir), dtype=args.dtype, layerwise=args.layerwise)
    print(report.format())
    return 0 if report.passed else 1
