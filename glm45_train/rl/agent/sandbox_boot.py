"""Runs one model-written program inside the code interpreter's sandbox (started by code_interpreter.py as
`python -I -B sandbox_boot.py PROGRAM`, in the episode's directory, under CPU, memory and file-size limits).

Before the program runs, an audit hook (PEP 578; it cannot be removed by the code it watches) refuses: starting
processes (fork, exec, spawn, subprocess, os.system: no fork bombs, no shell), sockets (no network, on top of the
network namespace where the machine allows one), loading native code through ctypes, and any write, rename,
removal or permission change outside the working directory. Reads are allowed. Standalone on purpose: it
imports nothing of glm45_train (the isolated interpreter does not see it).
"""

import os
import runpy
import sys
import traceback

HOME = os.path.realpath(os.getcwd())
FORBIDDEN = ("os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
             "pty.spawn", "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
             "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.kill", "os.killpg")  # fmt: skip
PATH_CHANGES = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink",
                "os.link", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move")  # fmt: skip
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _inside(path):
    if isinstance(path, int):
        return True  # an already open descriptor
    real = os.path.realpath(os.fsdecode(path))
    return real == HOME or real.startswith(HOME + os.sep)


def _writes(mode, flags):
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        return True
    return isinstance(flags, int) and flags & WRITE_FLAGS != 0


def _hook(event, args):
    if event in FORBIDDEN:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and args and args[0] is not None and _writes(*args[1:3]) and not _inside(args[0]):
        raise PermissionError(f"sandbox: writing {args[0]!r} outside the working directory is not allowed")
    if event in PATH_CHANGES:
        for path in args[:2]:
            if isinstance(path, (str, bytes, os.PathLike)) and not _inside(path):
                raise PermissionError(f"sandbox: {event} on {path!r} outside the working directory is not allowed")


def main():
    program = sys.argv[1]
    sys.argv = [program]
    sys.addaudithook(_hook)
    try:
        runpy.run_path(program, run_name="__main__")
    except SystemExit:
        raise
    except BaseException as exc:  # the program's own frames only: this file's and runpy's are noise to the model
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if os.path.basename(f.filename) == program]
        lines = traceback.format_list(frames) + traceback.format_exception_only(type(exc), exc)
        sys.stderr.write("Traceback (most recent call last):\n" + "".join(lines))
        sys.exit(1)


if __name__ == "__main__":
    main()
