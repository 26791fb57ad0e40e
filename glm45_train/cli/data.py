"""`glm45-train data render …` and `glm45-train data prepare …`: parse, call `data.prepare`, print.

data render FILE --tokenizer DIR [--thinking on|off] [--generation-prompt] [--no-train-empty-think]
data prepare INPUT... --tokenizer DIR --output-dir DIR --max-length N [--mode keep|non-thinking|mixed:P]
             [--pack] [--on-error skip|fail] [--overlong drop|truncate|error] [--seed N]
             [--no-train-empty-think] [--no-progress] [--workers N] [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from glm45_train.cli.arg_types import positive_int


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("data", help="render and prepare chat data in the GLM-4.5 format")
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    _add_render_parser(commands)
    _add_prepare_parser(commands)


def _add_render_parser(commands) -> None:
    parser = commands.add_parser(
        "render",
        help="print one JSON line {text, input_ids, loss_mask} per conversation: exactly what training sees",
    )
    parser.add_argument("file", metavar="FILE", help="JSONL / JSON / Parquet file or saved datasets directory")
    parser.add_argument("--tokenizer", required=True, metavar="DIR", help="directory holding tokenizer.json")
    parser.add_argument(
        "--thinking",
        choices=("on", "off"),
        default="on",
        help="off = non-thinking mode: reasoning removed, /nothink on user turns (default: on)",
    )
    parser.add_argument(
        "--generation-prompt", action="store_true", help="end with the assistant prompt (for inference)"
    )
    _add_empty_think_flag(parser)
    parser.set_defaults(func=run_render)


def _add_prepare_parser(commands) -> None:
    parser = commands.add_parser(
        "prepare", help="tokenize (and pack) conversations into a dataset the trainer reads, with a report"
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files, saved datasets or ModelScope IDs")
    parser.add_argument("--tokenizer", required=True, metavar="DIR", help="directory holding tokenizer.json")
    parser.add_argument("--output-dir", required=True, metavar="DIR")
    parser.add_argument("--max-length", required=True, type=positive_int, metavar="N", help="tokens per sample / row")
    parser.add_argument("--mode", default="keep", help="keep | non-thinking | mixed:P (default: keep)")
    parser.add_argument("--pack", action="store_true", help="pack whole samples into rows of --max-length")
    parser.add_argument(
        "--on-error",
        choices=("skip", "fail"),
        default="skip",
        help="bad records: skip and report (default), or stop at the first",
    )
    parser.add_argument(
        "--overlong",
        choices=("drop", "truncate", "error"),
        default="drop",
        help="samples longer than --max-length (default: drop)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the mixed:P choice (default: 0)")
    parser.add_argument(
        "--workers",
        type=positive_int,
        metavar="N",
        help="processes that parse, render and tokenize; the output does not depend on it "
        "(default: the CPUs available, at most 32)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true", help="replace a prepared dataset in --output-dir")
    _add_empty_think_flag(parser)
    parser.set_defaults(func=run_prepare)


def _add_empty_think_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-train-empty-think",
        action="store_true",
        help="leave empty <think></think> blocks out of the loss",
    )


def run_render(args: argparse.Namespace) -> int:
    from glm45_train.data.chat import RenderOptions
    from glm45_train.data.prepare import render_samples

    options = RenderOptions(
        thinking=args.thinking == "on",
        add_generation_prompt=args.generation_prompt,
        train_empty_think=not args.no_train_empty_think,
    )
    for sample in render_samples([args.file], Path(args.tokenizer), options):
        line = {"text": sample.text, "input_ids": sample.input_ids, "loss_mask": sample.loss_mask}
        sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from glm45_train.data.chat import parse_mode
    from glm45_train.data.prepare import PrepareOptions, available_cpus, default_workers, prepare_dataset

    workers = default_workers() if args.workers is None else args.workers
    if workers > 2 * available_cpus():  # one process per chunk only competes for the same CPUs
        print(f"--workers {workers}: capped at {2 * available_cpus()} (twice the CPUs available)", file=sys.stderr)
        workers = 2 * available_cpus()
    options = PrepareOptions(
        max_length=args.max_length,
        mode=parse_mode(args.mode),
        pack=args.pack,
        on_error=args.on_error,
        overlong=args.overlong,
        seed=args.seed,
        train_empty_think=not args.no_train_empty_think,
        show_progress=not args.no_progress,
        workers=workers,
        overwrite=args.overwrite,
    )
    output_dir = Path(args.output_dir)
    report = prepare_dataset(args.inputs, Path(args.tokenizer), output_dir, options).to_json(options)
    print(_summary(report, output_dir))
    return 0


def _summary(report: dict, output_dir: Path) -> str:
    records, tokens, packing = report["records"], report["tokens"], report["packing"]
    lines = [
        f"prepared {records['kept']} of {records['read']} records into {output_dir} "
        f"({packing['rows']} rows, {tokens['total']} tokens, {tokens['trained']} trained, "
        f"real-token fraction {packing['real_token_fraction']:.3f})",
        f"dropped {records['dropped']} {_by_reason(report['dropped_by_reason'])}; "
        f"changed {records['changed']} {_by_reason(report['changed_by_reason'])}",
        f"every dropped or changed record, with its line: {output_dir / 'report.json'}",
    ]
    return "\n".join(lines)


def _by_reason(counts: dict[str, int]) -> str:
    return "(" + ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items())) + ")" if counts else ""
