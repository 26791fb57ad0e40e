"""`glm45-train` entry point: one subcommand per module in this package, each parsing and calling one function."""

from __future__ import annotations

import argparse
import errno
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from glm45_train import __version__
from glm45_train.cli import chat, check, data, evaluate, export, make_tiny, plan, push, rl, serve, sft, submit
from glm45_train.errors import UserError

COMMANDS = (make_tiny, export, data, check, sft, rl, chat, evaluate, serve, plan, submit, push)


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
        if found_inside(err, KeyboardInterrupt) is not None:
            print(f"glm45-train {args.command}: interrupted", file=sys.stderr)
            return 130
        disk = found_inside(err, OSError)
        if not isinstance(disk, OSError) or disk.errno not in DISK_ERRNOS:
            raise
        print(f"glm45-train {args.command}: error: {disk_error(disk, args)}", file=sys.stderr)
        return 2


DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def disk_error(err: OSError, args: argparse.Namespace) -> str:
    """A full, read-only or forbidden output: which path, why, and what room its filesystem has. (The commands
    write into a staging folder that they remove on failure, so nothing half-written is left to look complete.)"""
    output = getattr(args, "output_dir", None)
    path = Path(err.filename or output or ".")
    shown = str(path)
    if output and err.filename and path.name.startswith("." + Path(output).name):
        shown = f"{output} (its staging folder {path.parent / path.name.split('/')[0]})"
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(existing).free / 2**30
    needs = " (the output needs about as much room as its source)" if err.errno in FULL_ERRNOS else ""
    return f"{shown}: {err.strerror}; {free:.1f} GiB free on its filesystem{needs}; nothing was left behind"


FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def found_inside(err: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """`err` or the first exception of `kind` it carries: its cause or context, or — torch.distributed.checkpoint
    gathers every rank's failure into one CheckpointException (`failures`: rank -> (exception, trace)) — a
    failure. So Ctrl-C or a full disk during a checkpoint write is one line, not 45 of traces."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, kind):
            return err
        failures = getattr(err, "failures", None)
        for failure in failures.values() if isinstance(failures, dict) else ():
            inner = found_inside(failure[0], kind)
            if inner is not None:
                return inner
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
