"""One run per run directory: the first rank of a run holds an exclusive lock on `RUN_DIR/.lock` for its life.

Notable:
- `flock` is released by the kernel when the process ends, however it ends (SIGKILL, OOM, node reboot), so a
  crashed run never leaves a stale lock: the next run takes it and overwrites the owner line. Nothing is
  deleted on exit, so there is no window in which two runs both believe they own the folder.
- The owner line (pid, host, start time, command) is only for the error the second run prints.
- Taken before anything is written into the directory (data preparation, recipe.yaml, metrics, checkpoints);
  a second run stops with exit 2 and leaves the folder as the first run keeps it.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO

from glm45_train.errors import UserError

LOCK_NAME = ".lock"
_held: dict[Path, IO[str]] = {}  # run directory -> its open lock file, kept open for the process's life


class RunDirInUse(UserError):
    """Another live run holds the run directory."""


def claim_run_dir(run_dir: str | Path) -> None:
    """Take `run_dir` for this process (creating it), or raise `RunDirInUse` naming the run that has it."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = (run_dir / LOCK_NAME).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "a process that has not written its name yet"
        handle.close()
        raise RunDirInUse(
            f"{run_dir}: in use by another run ({owner}); wait for it to end or set another checkpoint.dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {started}: {' '.join(sys.argv)[:300]}\n")
    handle.flush()
    _held[run_dir] = handle


def release_run_dir(run_dir: str | Path) -> None:
    """Let go of `run_dir` before the process ends (tests running several runs in one process)."""
    handle = _held.pop(Path(run_dir).resolve(), None)
    if handle is not None:
        handle.close()
