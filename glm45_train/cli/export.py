"""`glm45-train export`: HF <-> Megatron-Core checkpoints, optionally followed by the precision check.

export --to-mcore --model SRC --output-dir DIR [--tp N --pp N --ep N --etp N] [--dtype bf16|fp32]
       [--test-precision] [--overwrite]
export --to-hf --model MCORE_DIR --output-dir DIR [--test-precision] [--overwrite]
export --to-hf --model LORA_RUN --output-dir DIR [--merge-lora [--dtype bf16|fp32] | --adapter-only] [--test-precision]

SRC is a local HF directory or a ModelScope model ID. To write at a parallel layout, launch under torchrun
(`torchrun --nproc-per-node 4 -m glm45_train.cli.main export --to-mcore --tp 2 --ep 2 ...`): each rank writes its
own shards. Exit status: 0 done (and precision passed), 1 precision check failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import os

from glm45_train.cli.arg_types import positive_int

LAYOUT_FLAGS = ("tp", "pp", "ep", "etp")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("export", help="convert HF <-> Megatron-Core (torch_dist) checkpoints")
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to-mcore", action="store_true", help="HF safetensors -> Megatron torch_dist")
    direction.add_argument("--to-hf", action="store_true", help="Megatron torch_dist -> HF safetensors")
    parser.add_argument("--model", required=True, metavar="SRC", help="HF dir / ModelScope ID, or Megatron dir")
    parser.add_argument("--output-dir", required=True, metavar="DIR")
    for flag in LAYOUT_FLAGS:
        parser.add_argument(f"--{flag}", type=positive_int, default=None, metavar="N", help=f"{flag} size (--to-mcore)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="mcore dtype (default bf16)")
    lora = parser.add_mutually_exclusive_group()
    lora.add_argument("--merge-lora", action="store_true", help="LoRA run: a full HF checkpoint (the default)")
    lora.add_argument("--adapter-only", action="store_true", help="LoRA run: an HF-PEFT adapter")
    parser.add_argument("--test-precision", action="store_true", help="then compare logits with transformers (fp32)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from glm45_train.config.layout import ParallelLayout
    from glm45_train.convert.to_hf import mcore_to_hf
    from glm45_train.convert.to_mcore import hf_to_mcore
    from glm45_train.convert.torch_dist.reader import McoreTensorSource
    from glm45_train.errors import UserError
    from glm45_train.hub.fetch import resolve_model_dir

    progress = None if args.no_progress or not _is_rank_zero() else TqdmProgress("converting")
    if args.to_hf and _is_lora_run(args.model):
        return _export_lora(args)
    if args.merge_lora or args.adapter_only:
        raise UserError(f"{args.model}: --merge-lora / --adapter-only apply to a LoRA training run directory")
    if args.to_hf:
        given = [f"--{flag}" for flag in (*LAYOUT_FLAGS, "dtype") if getattr(args, flag) is not None]
        if given:
            raise UserError(f"{', '.join(given)} apply to --to-mcore only (an HF export is layout-free)")
        summary = mcore_to_hf(args.model, args.output_dir, overwrite=args.overwrite, progress=progress)
        hf_dir, mcore_dir = args.output_dir, args.model
    else:
        hf_dir, mcore_dir = resolve_model_dir(args.model), args.output_dir
        layout = ParallelLayout(tp=args.tp or 1, pp=args.pp or 1, ep=args.ep or 1, etp=args.etp or 1)
        summary = hf_to_mcore(
            hf_dir, mcore_dir, layout=layout, dtype=args.dtype or "bf16", overwrite=args.overwrite, progress=progress
        )
    _print(summary.format())
    if not args.test_precision:
        return 0
    from glm45_train.convert.precision.check import check

    report = check(hf_dir, McoreTensorSource(mcore_dir), dtype="fp32")
    _print(report.format())
    return 0 if report.passed else 1


def _is_lora_run(path: str) -> bool:
    from pathlib import Path

    from glm45_train.convert.torch_dist.directory import METADATA_NAME

    metadata = Path(path) / METADATA_NAME
    return metadata.exists() and '"kind": "lora"' in metadata.read_text()


def _export_lora(args: argparse.Namespace) -> int:
    from glm45_train.errors import UserError
    from glm45_train.lora.hf_export import export_merged, export_peft_adapter

    if args.adapter_only:
        if args.dtype or args.test_precision:
            raise UserError("--dtype and --test-precision apply to --merge-lora exports")
        _print(f"adapter -> {export_peft_adapter(args.model, args.output_dir, overwrite=args.overwrite)}")
        return 0
    out = export_merged(args.model, args.output_dir, dtype=args.dtype, overwrite=args.overwrite)
    _print(f"merged LoRA -> {out}")
    if not args.test_precision:
        return 0
    from glm45_train.lora.adapter_io import read_lora_run
    from glm45_train.lora.merge_check import check_merged

    report = check_merged(read_lora_run(args.model), out, dtype=args.dtype or "bf16")
    _print(report.format())
    return 0 if report.passed else 1


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _print(text: str) -> None:
    if _is_rank_zero():
        print(text, flush=True)


class TqdmProgress:
    """Bytes written, with rate and ETA (the `Progress` protocol of formats/progress.py)."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.bar = None

    def start(self, total_bytes: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total_bytes, desc=self.description, unit="B", unit_scale=True, unit_divisor=1024)

    def advance(self, nbytes: int) -> None:
        if self.bar is not None:
            self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
