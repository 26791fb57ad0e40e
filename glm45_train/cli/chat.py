"""`glm45-train chat MODEL_DIR [--adapter DIR] [--thinking on|off] [--prompt TEXT]`: interactive, or one reply."""

from __future__ import annotations

import argparse
import sys

from glm45_train.cli.arg_types import non_negative_float, positive_int


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("chat", help="chat with an exported HF checkpoint (streams tokens)")
    parser.add_argument("model_dir", metavar="MODEL_DIR")
    parser.add_argument("--adapter", help="an HF-PEFT adapter directory to load on MODEL_DIR")
    parser.add_argument("--thinking", choices=["on", "off"], default="on")
    parser.add_argument("--prompt", help="answer this one message and exit (otherwise: interactive)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=512)
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from glm45_train.infer.chat import ChatSession, interactive, load_for_chat

    model, tokenizer = load_for_chat(args.model_dir, args.adapter, args.dtype)
    session = ChatSession(model, tokenizer, args.thinking == "on", args.max_new_tokens, args.temperature)
    if args.prompt is None:
        interactive(session)
        return 0
    for piece in session.stream_reply(args.prompt):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
