"""`glm45-train push DIR --repo-id OWNER/NAME [--public] [--revision BRANCH] [--message TEXT] [--endpoint URL]`.

DIR must be a complete export (an HF checkpoint or a PEFT adapter); it is checked before anything is contacted.
The token comes from MODELSCOPE_API_TOKEN and is never printed. A rerun after an interruption resumes.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("push", help="upload an exported checkpoint or adapter to ModelScope")
    parser.add_argument("directory", metavar="DIR", help="an export: HF checkpoint or PEFT adapter directory")
    parser.add_argument("--repo-id", required=True, metavar="OWNER/NAME", help="model repository (created if missing)")
    parser.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    parser.add_argument("--revision", metavar="BRANCH", help="branch to commit to (default: master)")
    parser.add_argument("--message", metavar="TEXT", help="commit message")
    parser.add_argument("--endpoint", metavar="URL", help="hub address (default: https://modelscope.cn)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from glm45_train.hub.push import push

    summary = push(
        args.directory,
        args.repo_id,
        private=not args.public,
        commit_message=args.message,
        revision=args.revision,
        endpoint=args.endpoint,
        progress=not args.no_progress,
    )
    print(summary.format(), flush=True)
    return 0
