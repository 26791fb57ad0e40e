"""`glm45-train serve`'s two modes as library calls: serve an export until Ctrl-C, or check it and stop.

Notable:
- Both start vLLM's OpenAI-compatible server through serve/server.py (runtime/vllm_cpu.py's launcher, GLM-4.5's
  flags: `--tool-call-parser glm45 --reasoning-parser glm45 --enable-auto-tool-choice`), after serve/options.py
  has checked every input; vLLM's own output goes to a log file whose path is printed, and a start that fails
  quotes its tail.
- `serve_until_interrupted` prints the URL and a sample request (a chat with a tool, thinking off per request
  through `chat_template_kwargs`), then waits; Ctrl-C (or SIGTERM) stops the server and is a normal end (exit
  0). The server ending on its own is an error quoting its log.
- `check_export` runs the serving contract (serve/contract/) on a server started for it, prints the table,
  stops the server and returns 0 only if every item holds (1 otherwise).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from glm45_train.errors import UserError
from glm45_train.runtime.vllm_cpu import installed_version
from glm45_train.serve.options import Adapter, adapter_args, check_args, served_name
from glm45_train.serve.server import INSTALL_HINT, ServerError, VLLMServer, free_port, serve_command

DEFAULT_PORT = 8000
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def sample_chat_request(model: str, max_tokens: int = 256) -> dict[str, Any]:
    """A chat request with a tool, thinking off for this request only."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": "What is the weather in Beijing right now?"}],
        "tools": [WEATHER_TOOL],
        "chat_template_kwargs": {"enable_thinking": False},
        "max_tokens": max_tokens,
    }


def curl_command(url: str, body: dict[str, Any]) -> str:
    data = json.dumps(body, ensure_ascii=False, indent=2)
    return f"curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d {shlex.quote(data)}"


def build_server(
    model_dir: Path,
    *,
    adapter: Adapter | None,
    extra_args: list[str],
    port: int,
    host: str,
    log_path: str | Path | None,
    check: bool,
) -> VLLMServer:
    """A not yet started server with GLM-4.5's flags, the adapter's, the check's defaults, then the user's."""
    if installed_version() is None:
        raise UserError(INSTALL_HINT)
    ours = (adapter_args(adapter, extra_args) if adapter else []) + (check_args(extra_args) if check else [])
    log = Path(log_path) if log_path else Path(tempfile.gettempdir()) / f"glm45-serve-{os.getpid()}-{port}.log"
    return VLLMServer(model_dir, port=port, host=host, extra_args=[*ours, *extra_args], log_path=log)


def _start(server: VLLMServer, timeout: float, say: Callable[[str], None]) -> None:
    say(f"starting vLLM {installed_version()} on {server.model_dir}; its log: {server.log_path}")
    argv = serve_command(str(server.model_dir), server.port, server.host, server.extra_args)
    say("$ vllm serve " + " ".join(shlex.quote(arg) for arg in argv[argv.index("serve") + 1 :]))
    started = time.monotonic()
    server.start(timeout)
    say(f"serving at {server.url} (up after {time.monotonic() - started:.0f} s)")


def serve_until_interrupted(
    server: VLLMServer, adapter: Adapter | None, timeout: float, say: Callable[[str], None] = print
) -> int:
    name = served_name(server.extra_args)
    names = f"'{name}'" + (f" and the adapter '{adapter.name}'" if adapter else "")
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _start(server, timeout, say)
        say(f"models: {names}; OpenAI API at {server.url}/v1. Try (thinking off for this request):")
        say(curl_command(server.url, sample_chat_request(adapter.name if adapter else name)))
        say("Ctrl-C stops the server.")
        while server.process is not None and server.process.poll() is None:
            time.sleep(0.5)
        code = server.process.returncode if server.process is not None else "?"
        raise ServerError(f"vLLM server for {server.model_dir} exited with {code}{server.log_tail()}")
    except KeyboardInterrupt:
        say("stopping the server")
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C; SIGINT too where it was ignored (started in the background)


def check_export(
    server: VLLMServer,
    adapter: Adapter | None,
    data: str | Path | None,
    timeout: float,
    say: Callable[[str], None] = print,
) -> int:
    from glm45_train.serve.contract import all_hold, format_table, run_contract
    from glm45_train.serve.contract.cases import load_conversations

    load_conversations(data)  # a bad data file fails before the server starts
    assert server.model_dir is not None
    try:
        _start(server, timeout, say)
        results = run_contract(
            server, server.model_dir, served_name=served_name(server.extra_args), adapter=adapter, data=data
        )
    finally:
        server.stop()
    say(format_table(results))
    return 0 if all_hold(results) else 1


def serving_port(port: int | None, check: bool) -> int:
    """The port to serve on: the user's, else 8000 for serving and a free one for a check."""
    if port is not None:
        return port
    return free_port() if check else DEFAULT_PORT
