"""A real single-node Slurm cluster on localhost for tests: munged + slurmctld + slurmd under one directory.

Everything is private to the directory: the munge key and socket, slurm.conf with free ports, state, spool,
pid and log files. Nothing touches /etc/slurm or the system munge, so several clusters (test sessions run
concurrently by different engineers) can live on one machine. Needs Debian's `slurm-wlm` and `munge`
(scripts/install_slurm.sh) and root (slurmd must switch users and track processes).

    python -m tests.slurm_cluster start DIR    # prints `export SLURM_CONF=...`; then sbatch/squeue work
    python -m tests.slurm_cluster stop DIR
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "srun", "sinfo")
PARTITION = "debug"


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here; the message says why (used as the pytest skip reason)."""


def why_unavailable() -> str | None:
    """None when a local cluster can start; otherwise the reason."""
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name, path=_sbin_path()) is None]
    if missing:
        return f"Slurm/munge not installed (missing {', '.join(missing)}): run scripts/install_slurm.sh"
    if os.geteuid() != 0:
        return "a local slurmd needs root (it switches users and tracks job processes)"
    return None


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class LocalSlurm:
    """Start with `start()`, stop with `stop()`; `env` is what client commands (sbatch...) need."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.conf = self.root / "slurm.conf"
        self.node = socket.gethostname().split(".")[0]
        self.munge_socket = self.root / "munge" / "munge.socket"

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60.0) -> None:
        reason = why_unavailable()
        if reason:
            raise SlurmUnavailable(reason)
        for sub in ("munge", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._write_conf()
        self._run("slurmctld", "-f", str(self.conf), "-c")  # -c: clear state from any earlier cluster
        self._run("slurmd", "-f", str(self.conf), "-N", self.node)
        self._wait_for_idle_node(timeout)

    def stop(self) -> None:
        """Stop the daemons by their pid files (never by name: other clusters may run on this machine)."""
        for pid_file in ("run/slurmd.pid", "run/slurmctld.pid", "munge/munged.pid"):
            self._stop_pid(self.root / pid_file)

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        self.root.joinpath("munge").chmod(0o700)
        self._run(
            "munged",
            "--force",
            f"--socket={self.munge_socket}",
            f"--key-file={key}",
            f"--pid-file={self.root / 'munge' / 'munged.pid'}",
            f"--log-file={self.root / 'munge' / 'munged.log'}",
            f"--seed-file={self.root / 'munge' / 'munged.seed'}",
        )

    def _write_conf(self) -> None:
        ctld_port, slurmd_port = _free_ports(2)
        cpus = os.cpu_count() or 1
        r = self.root
        lines = [
            "ClusterName=glm45local",
            # Clusters of concurrent test sessions share this machine: distinct job ids keep the jobs' ports
            # (derived from the job id by the template) and torchrun rendezvous ids apart.
            f"FirstJobId={random.randint(1000, 900_000)}",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=2",  # requeued jobs start again within seconds
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "MinJobAge=600",  # keep finished jobs visible to `scontrol show job` for the tests
            "KillWait=30",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _run(self, *argv: str) -> None:
        binary = shutil.which(argv[0], path=_sbin_path())
        assert binary is not None
        result = subprocess.run([binary, *argv[1:]], env=self._env(), capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise SlurmUnavailable(f"{argv[0]} failed to start: {(result.stderr or result.stdout).strip()[-500:]}")

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def _wait_for_idle_node(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            result = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%T"], env=self._env(), capture_output=True, text=True, timeout=30
            )
            state = result.stdout.strip()
            if result.returncode == 0 and state == "idle":
                return
            time.sleep(0.5)
        logs = "\n".join(self._tail(name) for name in ("slurmctld.log", "slurmd.log"))
        raise SlurmUnavailable(f"node never became idle (last state {state!r}); logs:\n{logs}")

    def _tail(self, name: str, lines: int = 15) -> str:
        path = self.root / "log" / name
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    @staticmethod
    def _stop_pid(pid_file: Path, timeout: float = 15.0) -> None:
        try:
            pid = int(pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python -m tests.slurm_cluster start|stop DIR", file=sys.stderr)
        return 2
    cluster = LocalSlurm(Path(argv[1]))
    if argv[0] == "stop":
        cluster.stop()
        return 0
    try:
        cluster.start()
    except SlurmUnavailable as err:
        print(f"cannot start Slurm: {err}", file=sys.stderr)
        cluster.stop()
        return 1
    print(f"export SLURM_CONF={cluster.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
