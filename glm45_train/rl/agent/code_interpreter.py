"""`code_interpreter`: the policy runs Python it writes (the ReTool-style tool), in a sandbox per episode.

    rl:
      environment:
        name: code_interpreter
        tool_timeout_s: 10
        args: {memory_mb: 512, cpu_s: 10, file_mb: 16}

The tool is `python(code: str)`: the program runs in a fresh interpreter (`python -I -B`: no PYTHONPATH, user site or
environment variables of this process), in the episode's throwaway
directory (files persist between the calls of one episode, variables do not; the directory is removed when the
episode closes); the observation is what it printed (stdout and stderr, cut to rl.environment.max_observation_chars)
and its exit status when not 0.

Limits, each reported in the observation when it stops a program:
- wall clock `rl.environment.tool_timeout_s` (the process group is killed), CPU seconds `cpu_s` (SIGXCPU), address
  space `memory_mb` (MemoryError), bytes per file written `file_mb` (SIGXFSZ; its printed output goes to such a
  file too, so a print flood stops there);
- sandbox_boot.py's audit hook: no processes (fork bombs end at the first fork), no sockets, no ctypes, no writes
  outside the directory;
- no network: a user network namespace (`unshare -rn`) where the machine allows one, besides the hook.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from glm45_train.data.tool_calls import ParsedCall, call_problems_against_schema, typed_arguments
from glm45_train.errors import UserError
from glm45_train.rl.agent.environment import TRUNCATED, EnvironmentConfig, StepResult, ToolResult, truncated

BOOT = Path(__file__).with_name("sandbox_boot.py")
LIMITS = {"memory_mb": 512, "cpu_s": 10, "file_mb": 16}
TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "python",
        "description": "Run a Python program and return what it prints.",
        "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
    },
}
SIGNALS: dict[int, str] = {signal.SIGXCPU: "CPU time limit", signal.SIGXFSZ: "file size limit", signal.SIGKILL: "kill"}


class CodeInterpreter:
    def __init__(self, config: EnvironmentConfig) -> None:
        unknown = sorted(set(config.args) - set(LIMITS))
        if unknown:
            raise UserError(f"rl.environment.args: unknown keys {unknown} (code_interpreter takes {sorted(LIMITS)})")
        self.limits = {**LIMITS, **config.args}
        for key, value in self.limits.items():
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise UserError(f"rl.environment.args.{key}: expected a positive number, got {value!r}")
        self.config = config

    def tools(self) -> list[dict[str, Any]]:
        return [TOOL]

    def start(self, prompt: Any) -> _Episode:
        return _Episode(self, Path(tempfile.mkdtemp(prefix="glm45-code-")))

    def close(self) -> None:
        pass

    def run(self, code: str, directory: Path) -> ToolResult:
        program = directory / f"program_{len(list(directory.glob('program_*.py')))}.py"
        program.write_text(code)
        output = Path(tempfile.mkstemp(prefix="glm45-code-out-")[1])
        command = [*network_isolation(), sys.executable, "-I", "-B", str(BOOT), program.name]
        try:
            with output.open("wb") as sink:
                process = subprocess.Popen(
                    command, cwd=directory, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                    preexec_fn=functools.partial(_limit, self.limits), env=_clean_env(),
                )  # fmt: skip
                try:
                    status = process.wait(timeout=self.config.tool_timeout_s)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                    text, _ = _read(output, self.config.max_observation_chars)
                    why = f"error: stopped after {self.config.tool_timeout_s:g} s (wall-clock limit)"
                    return ToolResult(f"{text}\n{why}".lstrip(), True, True)
            text, size = _read(output, self.config.max_observation_chars)
        finally:
            output.unlink(missing_ok=True)
        if status == 0:
            return ToolResult(text)
        why = SIGNALS.get(-status, f"signal {-status}") if status < 0 else f"exit status {status}"
        if size >= int(self.limits["file_mb"]) << 20:
            why = f"its output reaching the {self.limits['file_mb']} MB limit"
        return ToolResult(f"{text}\nerror: the program ended with {why}".lstrip(), error=True)


class _Episode:
    def __init__(self, interpreter: CodeInterpreter, directory: Path) -> None:
        self.interpreter, self.directory = interpreter, directory

    def act(self, calls: list[ParsedCall]) -> StepResult:
        schemas = {"python": TOOL["function"]["parameters"]}
        results = []
        for call in calls:
            problems = call_problems_against_schema(call, schemas)
            if problems:
                results.append(ToolResult("error: " + "; ".join(problems), error=True))
                continue
            results.append(self.interpreter.run(typed_arguments(call, schemas["python"])["code"], self.directory))
        return StepResult(results)

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _limit(limits: dict[str, Any]) -> None:
    """In the child before exec: its own process group, and the resource limits."""
    os.setsid()
    memory = int(limits["memory_mb"]) << 20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    cpu = max(1, int(limits["cpu_s"]))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    size = int(limits["file_mb"]) << 20
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _clean_env() -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL", "HOME")
    return {key: os.environ[key] for key in keep if key in os.environ} | {"OMP_NUM_THREADS": "1"}


def _read(path: Path, limit: int) -> tuple[str, int]:
    """(what the program printed, cut to `limit` characters, saying so; its size in bytes)."""
    with path.open("rb") as file:
        data = file.read(limit * 4 + 4)  # a UTF-8 character is at most 4 bytes
    text = data.decode("utf-8", errors="replace")
    size = path.stat().st_size
    if len(text) > limit or size > len(data):
        return text[:limit] + f"{TRUNCATED}{size} bytes of output in all]", size
    return truncated(text, limit), size


@functools.cache
def network_isolation() -> tuple[str, ...]:
    """`unshare -rn` (a user network namespace: no interface but loopback) where it works here, else nothing."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    try:
        subprocess.run([unshare, "-rn", "true"], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ()
    return (unshare, "-rn")
