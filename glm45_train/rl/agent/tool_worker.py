"""The process that runs an environment's Python tools, so a tool that hangs, crashes or floods stdout costs one
call, never the run.

`ToolWorker` spawns one child (multiprocessing's spawn: no torch or distributed state inherited) that imports the
tools and answers calls one at a time. A call that does not answer within its timeout kills the child, which is
started again for the next call. In the child a tool's stdout and stderr are captured; the observation is the
tool's return value (str as is, anything else as JSON, else repr), or what it printed when it returned None, cut to
the size limit there, so a megabyte print never crosses the pipe whole.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import traceback
from collections.abc import Callable
from typing import Any

from glm45_train.rl.agent.environment import ToolResult, truncated

START_TIMEOUT_S = 120.0  # a fresh child imports the tools' modules before its first call (not the tool's time)


class ToolWorker:
    def __init__(self, specs: dict[str, str], max_chars: int) -> None:
        self.specs, self.max_chars = specs, max_chars  # tool name -> "module:function"
        self._process: Any = None
        self._conn: Any = None

    def call(self, name: str, arguments: dict[str, Any], timeout_s: float) -> ToolResult:
        if self._process is None or not self._process.is_alive():
            problem = self._start()
            if problem:
                return ToolResult(f"error: {problem}", error=True)
        self._conn.send((name, arguments))
        if not self._conn.poll(timeout_s):
            self._stop()
            return ToolResult(f"error: {name} did not answer within {timeout_s:g} s and was stopped", True, True)
        try:
            ok, text = self._conn.recv()
        except EOFError:  # the child died mid-call (os._exit, a signal, out of memory)
            code = self._process.exitcode if self._process is not None else None
            self._stop()
            return ToolResult(f"error: {name} ended the tool process (exit code {code})", True)
        return ToolResult(text, error=not ok)

    def _start(self) -> str | None:
        """Start the child and wait until it has imported every tool; what went wrong, or None."""
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=serve, args=(child, self.specs, self.max_chars), daemon=True)
        self._process.start()
        child.close()
        if not self._conn.poll(START_TIMEOUT_S):
            self._stop()
            return f"the tool process did not start within {START_TIMEOUT_S:g} s"
        try:
            problem = self._conn.recv()
        except EOFError:
            problem = "the tool process ended while starting"
        if problem:
            self._stop()
        return problem

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join(5)
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None

    def close(self) -> None:
        self._stop()


def serve(conn: Any, specs: dict[str, str], max_chars: int) -> None:
    """The child's loop: (name, arguments) in, (ok, observation text) out."""
    from glm45_train.rl.user_code import load_user_callable

    functions: dict[str, Callable[..., Any]] = {}
    try:
        for name, spec in specs.items():
            functions[name] = load_user_callable(spec, "rl.environment.tools", what="tool")
    except Exception as exc:  # the parent imported them; here the import failed anyway
        conn.send(f"importing the tools failed in the tool process: {exc}")
        return
    conn.send(None)  # ready
    while True:
        try:
            name, arguments = conn.recv()
        except EOFError:
            return
        if name not in functions:
            conn.send((False, f"error: unknown tool {name!r} (known: {sorted(functions)})"))
            continue
        ok, text = _run(functions[name], arguments)
        conn.send((ok, truncated(text, max_chars)))


def _run(function: Callable[..., Any], arguments: dict[str, Any]) -> tuple[bool, str]:
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            value = function(**arguments)
    except Exception as exc:
        last = traceback.extract_tb(exc.__traceback__)[-1]
        return False, f"error: {type(exc).__name__}: {exc} (line {last.lineno})"
    if value is None:
        return True, printed.getvalue()
    if isinstance(value, str):
        return True, value
    try:
        return True, json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return True, repr(value)
