"""`glm45-train` entry point: one subcommand per module in this package, each parsing and calling one function."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from glm45_train import __version__
from glm45_train.cli import chat, check, data, export, make_tiny, plan, push, rl, serve, sft, submit
from glm45_train.errors import UserError

COMMANDS = (make_tiny, export, data, check, sft, rl, chat, serve, plan, submit, push)


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser; `add_parser(..., intermixed=True)` lets options follow positionals (the `key=value`
    overrides of plan/submit/sft): argparse's intermixed parsing, which the subcommand action reaches through
    `parse_known_args`."""

    def __init__(self, *args: Any, intermixed: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.intermixed, self._inside_intermixed = intermixed, False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if not self.intermixed or self._inside_intermixed:  # parse_known_intermixed_args calls back here
            return super().parse_known_args(args, namespace)
        self._inside_intermixed = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside_intermixed = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glm45-train",
        description="Train and fine-tune GLM-4.5 / GLM-4.5-Air on Megatron-Core.",
    )
    parser.add_argument("--version", action="version", version=f"glm45-train {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def quiet_third_party_noise() -> None:
    """Known, harmless messages that would bury ours: Megatron's Apex fallbacks and transformers' load
    report listing the MTP layer it does not use (we convert and check that layer ourselves)."""
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed.*")
    warnings.filterwarnings("ignore", message=".*cuda_graph_scope.*")
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed.checkpoint API renames
    warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
    import transformers

    transformers.logging.set_verbosity_error()


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """argparse's parse, except that a command setting `passes_unknown_args` (serve: vLLM's options) receives
    the options it does not know as `args.unknown_args` instead of an error."""
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "passes_unknown_args", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.unknown_args = unknown
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    quiet_third_party_noise()
    try:
        return int(args.func(args) or 0)
    except (UserError, FileExistsError, FileNotFoundError) as err:
        print(f"glm45-train {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BaseException as err:
        if not is_interruption(err):
            raise
        print(f"glm45-train {args.command}: interrupted", file=sys.stderr)
        return 130


def is_interruption(err: BaseException | None) -> bool:
    """Ctrl-C, also when it reaches us inside another exception: torch.distributed.checkpoint gathers every
    rank's failure into one CheckpointException (`failures`: rank -> (exception, trace)), which would
    otherwise print 45 lines for a plain interrupt during a checkpoint write."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, KeyboardInterrupt):
            return True
        failures = getattr(err, "failures", None)
        if isinstance(failures, dict) and any(is_interruption(failure[0]) for failure in failures.values()):
            return True
        err = err.__cause__ or err.__context__
    return False


if __name__ == "__main__":
    sys.exit(main())
