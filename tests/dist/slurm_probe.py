"""A stand-in for `glm45-train sft` inside Slurm jobs rendered from slurm/train.sbatch (run under torchrun).

slurm_probe.py STATE_DIR quick   print what the job gave this process (rank, world, rendezvous, env), exit 0
slurm_probe.py STATE_DIR wait    first start: count "steps" until SIGUSR1, then save the step and exit 0
                                  (as training checkpoints on the signal); a restart (SLURM_RESTART_COUNT > 0)
                                  reads the saved step, reports it resumed from there and exits 0
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def report(message: str) -> None:
    """One line in one write: both ranks share the job's log, and print's separate write of the newline let
    another rank's line land in between (seen once in CI as two reports on one line)."""
    line = f"probe rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: {message}\n"
    os.write(sys.stdout.fileno(), line.encode())


def quick() -> None:
    keys = ("MASTER_ADDR", "SLURM_JOB_ID", "SLURM_RESTART_COUNT", "PYTHONUNBUFFERED", "GLM45_PROBE")
    report(json.dumps({key: os.environ.get(key) for key in keys}))


def wait_for_usr1(state: Path) -> None:
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    saved = state / f"step.rank{os.environ['RANK']}"
    if restarts > 0:
        report(f"restart {restarts}: resumed from step {saved.read_text()}")
        return
    stop = []
    signal.signal(signal.SIGUSR1, lambda *_: stop.append(True))
    step = 0
    report("waiting for USR1")
    deadline = time.monotonic() + 600
    while not stop and time.monotonic() < deadline:
        step += 1
        time.sleep(0.1)
    saved.write_text(str(step))
    report(f"USR1: checkpoint at step {step}, exiting")


if __name__ == "__main__":
    state_dir, mode = Path(sys.argv[1]), sys.argv[2]
    state_dir.mkdir(parents=True, exist_ok=True)
    quick() if mode == "quick" else wait_for_usr1(state_dir)
