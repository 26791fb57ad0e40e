"""Render a Slurm batch job from slurm/train.sbatch and submit it with sbatch.

Shell safety is the point of this module. A value reaches the job in one of two places:
- `#SBATCH` lines, which sbatch parses itself (no shell quoting applies there): only a safe character set is
  accepted (`check_directive_value`), anything else is refused naming the option;
- the bash body: every value goes through `shlex.quote`, so `$(...)`, backticks, `;`, quotes and newlines
  arrive as literal text. Pyxis mount specs use `:` and `,` as separators: paths holding them are refused.

GPU mode runs one torchrun per node (`--nproc-per-node` = GPUs per node) with NCCL/CUDA defaults; CPU mode
(`gpus_per_node == 0`, for rehearsals and the local-Slurm tests) asks for no GPUs and trains over gloo.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from glm45_train.errors import UserError

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "train.sbatch"
_FIELD = re.compile(r"\{\{(\w+)\}\}")
_SAFE_DIRECTIVE = re.compile(r"[A-Za-z0-9_.,:@+=/-]+")
SIGNAL_RESOLUTION = 60  # Slurm may send --signal's warning up to this many seconds early (sbatch(1))
_SAFE_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Set on GPU nodes unless the user sets them (--env): Megatron's usual settings (reference: Slurm patterns).
GPU_ENV_DEFAULTS = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    "NCCL_NVLS_ENABLE": "0",
}
COMMON_ENV_DEFAULTS = {"PYTHONUNBUFFERED": "1"}
# Forwarded from the submitting shell when set there. Not in a container: the image brings its own paths.
FORWARDED_ENV = ("HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MODELSCOPE_CACHE", "NCCL_SOCKET_IFNAME",
                 "NCCL_IB_HCA", "NCCL_IB_GID_INDEX", "GLOO_SOCKET_IFNAME")  # fmt: skip
HOST_ONLY_ENV = ("PATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "PYTHONPATH", "CUDA_HOME")


@dataclass(frozen=True)
class JobSpec:
    """Everything the job needs; `entry` is what torchrun runs (a script, or `-m module`) with its arguments."""

    run_dir: Path
    workdir: Path
    entry: tuple[str, ...]
    nodes: int = 1
    gpus_per_node: int = 8  # 0: CPU mode (gloo)
    procs_per_node: int | None = None  # processes per node; default: gpus_per_node
    job_name: str = "glm45-train"
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    exclusive: bool = True
    signal_seconds: int = 300
    container_image: str | None = None
    container_mounts: tuple[str, ...] = ()
    python: str | None = None  # default: this interpreter, or `python` inside a container
    env: dict[str, str] = field(default_factory=dict)  # explicit NAME -> value, on top of the defaults

    @property
    def slurm_dir(self) -> Path:
        return self.run_dir / "slurm"

    @property
    def log_dir(self) -> Path:
        return self.slurm_dir / "logs"

    @property
    def processes_per_node(self) -> int:
        return self.procs_per_node or self.gpus_per_node


def check_directive_value(option: str, value: str) -> str:
    """A value for an `#SBATCH` line, or UserError: sbatch reads these lines itself, so quoting cannot help."""
    if not _SAFE_DIRECTIVE.fullmatch(value):
        raise UserError(
            f"{option}: {value!r} cannot go into an #SBATCH line; use letters, digits and . , : @ + = / _ - only"
        )
    return value


def job_name_for(recipe_path: str | Path) -> str:
    """`glm45-<recipe stem>` with anything outside the safe set replaced, so any file name works."""
    return "glm45-" + re.sub(r"[^A-Za-z0-9_.-]", "_", Path(recipe_path).stem)


def job_environment(spec: JobSpec, source: dict[str, str] | None = None) -> dict[str, str]:
    """The variables the job exports: defaults, names forwarded from `source` (the submitting shell), --env."""
    source = dict(os.environ if source is None else source)
    env = dict(COMMON_ENV_DEFAULTS)
    if spec.gpus_per_node > 0:
        env.update(GPU_ENV_DEFAULTS)
    forwarded = FORWARDED_ENV if spec.container_image else HOST_ONLY_ENV + FORWARDED_ENV
    env.update({name: source[name] for name in forwarded if name in source})
    for name, value in spec.env.items():
        if not _ENV_NAME.fullmatch(name):
            raise UserError(f"--env: {name!r} is not a valid environment variable name")
        env[name] = value
    return env


def render_job(spec: JobSpec, environment: dict[str, str] | None = None) -> str:
    """The batch script for `spec` (pure: reads the template, writes nothing)."""
    _check_spec(spec)
    env = job_environment(spec) if environment is None else environment
    python = spec.python or ("python" if spec.container_image else _this_python())
    values = {
        "job_name": check_directive_value("job name", spec.job_name),
        "nodes": str(spec.nodes),
        "resource_directives": _resource_directives(spec),
        "time": _check_time(spec.time),
        "queue_directives": _queue_directives(spec),
        "log_dir": check_directive_value("checkpoint.dir (log directory)", str(spec.log_dir)),
        "signal_seconds": str(spec.signal_seconds),
        "environment": "\n".join(f"export {name}={shlex.quote(value)}" for name, value in sorted(env.items())),
        "run_dir": shlex.quote(str(spec.run_dir)),
        "workdir": shlex.quote(str(spec.workdir)),
        "container_options": _container_options(spec),
        "python": shlex.quote(python),
        "procs_per_node": str(spec.processes_per_node),
        "entry": " ".join(shlex.quote(arg) for arg in spec.entry),
    }
    return fill_template(TEMPLATE.read_text(), values)


def fill_template(text: str, values: dict[str, str]) -> str:
    """Replace every {{name}}; a field without a value, or a value without a field, is a bug."""
    used = set(_FIELD.findall(text))
    if used != set(values):
        raise ValueError(f"template fields {sorted(used)} do not match values {sorted(values)}")
    return _FIELD.sub(lambda match: values[match.group(1)], text)


def write_job(spec: JobSpec, script: str) -> Path:
    """Write the script into the run directory (atomically) and create the log directory."""
    spec.log_dir.mkdir(parents=True, exist_ok=True)
    path = spec.slurm_dir / "job.sbatch"
    partial = path.with_suffix(".sbatch.partial")
    partial.write_text(script)
    partial.chmod(0o755)
    partial.replace(path)
    return path


def sbatch(script: Path, env: dict[str, str] | None = None) -> str:
    """Submit with sbatch; returns the job id. Arguments are a list: no shell is involved."""
    try:
        result = subprocess.run(
            ["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120, env=env
        )
    except FileNotFoundError:
        raise UserError("sbatch not found: run on a Slurm login node, or use --dry-run") from None
    if result.returncode != 0:
        raise UserError(f"sbatch failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout.strip().split(";")[0]


def _check_spec(spec: JobSpec) -> None:
    if spec.nodes < 1:
        raise UserError(f"--nodes must be >= 1, got {spec.nodes}")
    if spec.gpus_per_node < 0:
        raise UserError(f"--gpus-per-node must be >= 0, got {spec.gpus_per_node}")
    if spec.processes_per_node < 1:
        raise UserError("CPU mode (--gpus-per-node 0) needs --procs-per-node >= 1")
    if spec.signal_seconds < 1:
        raise UserError(f"--signal-seconds must be >= 1, got {spec.signal_seconds}")
    limit = time_limit_seconds(_check_time(spec.time))
    if limit - spec.signal_seconds < SIGNAL_RESOLUTION:
        raise UserError(
            f"--signal-seconds {spec.signal_seconds} leaves less than {SIGNAL_RESOLUTION} s of a --time {spec.time} "
            f"job before the warning; Slurm may send it that much early, before the job listens for it"
        )
    if not spec.entry:
        raise ValueError("JobSpec.entry is empty")
    for name, path in (("checkpoint.dir", spec.run_dir), ("working directory", spec.workdir)):
        if not path.is_absolute():
            raise ValueError(f"{name} must be absolute here, got {path}")


def time_limit_seconds(value: str) -> int:
    """Seconds in a Slurm time: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    days, _, clock = value.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:
        hours, minutes, seconds = [*parts, 0, 0][:3]
    else:
        hours, minutes, seconds = {1: [0, parts[0], 0], 2: [0, *parts], 3: parts}[len(parts)]
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def _check_time(value: str) -> str:
    if not _SAFE_TIME.fullmatch(value):
        raise UserError(f"--time: {value!r} is not a Slurm time (minutes, HH:MM:SS, D-HH:MM:SS)")
    return value


def _resource_directives(spec: JobSpec) -> str:
    lines = [f"#SBATCH --gpus-per-node={spec.gpus_per_node}"] if spec.gpus_per_node else []
    if spec.exclusive:
        lines.append("#SBATCH --exclusive")
    return "\n".join(lines) or "# (CPU mode: no GPUs requested)"


def _queue_directives(spec: JobSpec) -> str:
    lines = []
    if spec.partition:
        lines.append(f"#SBATCH --partition={check_directive_value('--partition', spec.partition)}")
    if spec.account:
        lines.append(f"#SBATCH --account={check_directive_value('--account', spec.account)}")
    return "\n".join(lines) or "# (default partition and account)"


def _container_options(spec: JobSpec) -> str:
    if not spec.container_image:
        return ""
    mounts = []
    for mount in spec.container_mounts:
        parts = mount.split(":")
        if "," in mount or not 1 <= len(parts) <= 3 or not all(parts[:2]):
            raise UserError(f"--container-mounts: {mount!r} is not SRC[:DST[:FLAGS]] without ',' in paths")
        mounts.append(mount)
    options = [
        f"--container-image={shlex.quote(spec.container_image)}",
        f"--container-workdir={shlex.quote(str(spec.workdir))}",
    ]
    if mounts:
        options.append(f"--container-mounts={shlex.quote(','.join(mounts))}")
    return " \\\n  " + " ".join(options)


def _this_python() -> str:
    import sys

    return sys.executable


def dump_recipe(recipe: object) -> str:
    """The resolved recipe as YAML for the job to read (`sft` loads it strictly again).

    A resolved string holding `${` would be read back as an OmegaConf interpolation: refused.
    """
    from omegaconf import OmegaConf

    text = OmegaConf.to_yaml(OmegaConf.structured(recipe))
    if "${" in text:
        raise UserError("the resolved recipe holds a literal '${', which the job would read as an interpolation")
    return text
