"""`glm45-train eval MODEL [MODEL …] --data SET [SET …]`: accuracy and answer length, thinking on and off, per model.

MODEL: an HF export, a training run (exported on the fly), `LABEL=PATH`, or a running vLLM server's URL.
SET: a JSONL/JSON/Parquet file, a saved datasets directory or a ModelScope dataset ID (messages or prompt,
answer, tools). Writes samples.jsonl, summary.json and summary.png to --output-dir and prints the table.
Exit status: 0 done, 2 bad input (a model, set, scorer or option named).
"""

from __future__ import annotations

import argparse

from glm45_train.cli.arg_types import non_negative_float, positive_int


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate exports on prompt sets (vLLM or transformers)")
    parser.add_argument("models", nargs="+", metavar="MODEL", help="export dir, run dir, LABEL=PATH or URL")
    parser.add_argument("--data", nargs="+", required=True, metavar="SET", help="prompt sets (file, dir, ID)")
    parser.add_argument("--scorer", nargs="+", metavar="NAME", help="one for all sets or one per set (default math)")
    parser.add_argument("--thinking", choices=["on", "off", "both"], default="off")
    parser.add_argument("--engine", choices=["auto", "vllm", "hf"], default="auto", help="auto: vllm if installed")
    parser.add_argument("--samples", type=positive_int, default=1, metavar="K", help="responses per prompt (pass@k)")
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=non_negative_float, default=1.0)
    parser.add_argument("--max-new-tokens", type=positive_int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="request i's responses use seeds seed + i*K + j")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="auto: the export's")
    parser.add_argument("--tokenizer", metavar="DIR", help="renders prompts for served models")
    parser.add_argument("--kv-cache-gib", type=non_negative_float, default=1.0, help="vLLM on CPU")
    parser.add_argument("--tp", type=positive_int, default=1, help="vLLM tensor parallel size (GPUs)")
    parser.add_argument("--output-dir", required=True, metavar="DIR")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from glm45_train.evaluate.engines import EngineOptions
    from glm45_train.evaluate.run import EvalOptions, evaluate

    engine = EngineOptions(
        kind=args.engine, dtype=args.dtype, seed=args.seed, kv_cache_gib=args.kv_cache_gib, tp=args.tp
    )
    options = EvalOptions(
        thinking=args.thinking,
        samples=args.samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        engine=engine,
    )
    evaluate(
        args.models,
        args.data,
        args.output_dir,
        options,
        scorers=args.scorer,
        tokenizer=args.tokenizer,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    return 0
