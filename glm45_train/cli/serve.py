"""`glm45-train serve MODEL_DIR [--adapter DIR] [--port N] [--check] [vLLM args...]`: vLLM on an export.

Options this command does not know, after MODEL_DIR, go to `vllm serve` unchanged (parse_known_args); after a
`--`, everything does, even names this command also has. Exit status: serving, 0 after Ctrl-C; `--check`, 0
when every item of the serving contract holds, 1 when one fails; 2 for bad input (nothing is started).
"""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Serve an HF export (merged, RL or converted) with vLLM's OpenAI-compatible server and GLM-4.5's flags
(--tool-call-parser glm45 --reasoning-parser glm45 --enable-auto-tool-choice, model name "glm45"); prints the
URL and a sample request, runs until Ctrl-C. Unknown options after MODEL_DIR are passed to `vllm serve` (after
`--`, all of them are), e.g. `glm45-train serve runs/merged --max-model-len 8192 --dtype bfloat16`.

--check instead starts the server, runs the serving contract and stops: (a) /v1/completions prompt log-probs =
transformers fp32 within 1e-4; (b) the chat endpoint's prompt token ids = our renderer's, thinking on and off;
(c) vLLM's glm45 parsers give back each trained turn's reasoning and tool calls; (d) with --adapter, the
adapter served by vLLM = the base with it merged. It serves in fp32 (--dtype float32; (a) means nothing in
bf16) and, on CPU, with --enforce-eager --kv-cache-memory-bytes 1G, unless you pass those yourself. It loads
the export in transformers (fp32) beside the server: meant for small exports, or machines that hold that copy.
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve an export with vLLM (GLM-4.5 tool/reasoning parsers); --check runs the serving contract",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a vLLM option must never be taken for an abbreviation of ours
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="an HF export (`export --to-hf`)")
    parser.add_argument("--adapter", metavar="DIR", help="an HF-PEFT adapter (`export --to-hf --adapter-only`)")
    parser.add_argument("--adapter-name", metavar="NAME", help="its model name in requests (default: DIR's name)")
    parser.add_argument("--port", type=int, help="default 8000 (a free port for --check)")
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1; 0.0.0.0 serves other machines")
    parser.add_argument("--check", action="store_true", help="run the serving contract, print PASS/FAIL, stop")
    parser.add_argument("--check-data", metavar="FILE", help="chat data for --check (default: data/'s sample)")
    parser.add_argument("--log", metavar="FILE", help="vLLM's log file (default: a new file in the temp dir)")
    parser.add_argument("--start-timeout", type=float, default=1800.0, metavar="S", help="seconds to wait for /health")
    parser.set_defaults(func=run, passes_unknown_args=True)


def vllm_args(unknown: list[str]) -> list[str]:
    """The arguments for vLLM: the unknown ones, without the `--` that may separate them."""
    if "--" in unknown:
        unknown = list(unknown)
        unknown.remove("--")
    return unknown


def run(args: argparse.Namespace) -> int:
    from glm45_train.serve.launch import build_server, check_export, serve_until_interrupted, serving_port
    from glm45_train.serve.options import check_model_dir, read_adapter

    model_dir = check_model_dir(args.model_dir)
    adapter = read_adapter(args.adapter, args.adapter_name) if args.adapter else None
    extra = vllm_args(getattr(args, "unknown_args", []))
    server = build_server(
        model_dir,
        adapter=adapter,
        extra_args=extra,
        port=serving_port(args.port, args.check),
        host=args.host,
        log_path=args.log,
        check=args.check,
    )
    if args.check:
        return check_export(server, adapter, args.check_data, args.start_timeout)
    return serve_until_interrupted(server, adapter, args.start_timeout)
