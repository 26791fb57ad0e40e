"""What `eval` evaluates: an HF export directory, a training run (exported to HF on the fly through `export`'s own
path) or the URL of a running vLLM server.

Notable:
- `LABEL=PATH` names a model in the table (`base=runs/demo/tiny-air-hf`); otherwise the directory's name (or the
  URL's host:port) is its label, with `#2`, `#3` … for repeats.
- A run directory (a Megatron checkpoint: SFT, LoRA or RL) is exported once into the output's `exports/LABEL`:
  a LoRA run merged (`export --to-hf --merge-lora`), a full run as `export --to-hf` writes it.
- An export is checked before any engine starts, as `chat` checks it (config, weights, tokenizer), so a wrong
  path is one line naming it.
- A served model has no local files: its prompts are rendered with `--tokenizer` (or the first local model's).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from glm45_train.errors import UserError

LABEL = re.compile(r"^([\w.-]+)=(.+)$")


@dataclass(frozen=True)
class EvalModel:
    label: str
    directory: Path | None  # an HF export (config, weights, tokenizer); None for a served model
    url: str | None = None

    def __str__(self) -> str:
        return self.url or str(self.directory)


def parse_model_specs(specs: Sequence[str]) -> list[tuple[str, str]]:
    """(label, path or URL) for every `MODEL` argument, labels made unique."""
    named = []
    for spec in specs:
        match = LABEL.match(spec)
        if match and not Path(spec).exists() and not spec.startswith(("http://", "https://")):
            named.append((match[1], match[2]))
        else:
            named.append((_default_label(spec), spec))
    return unique_labels(named)


def unique_labels(named: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen: dict[str, int] = {}
    out = []
    for label, target in named:
        seen[label] = seen.get(label, 0) + 1
        out.append((label if seen[label] == 1 else f"{label}#{seen[label]}", target))
    return out


def _default_label(spec: str) -> str:
    if spec.startswith(("http://", "https://")):
        return spec.split("://", 1)[1].split("/", 1)[0]
    return Path(spec.rstrip("/")).name or spec


def resolve_models(specs: Sequence[str], exports_dir: Path) -> list[EvalModel]:
    """Every model checked (and runs exported into `exports_dir`) before any engine starts."""
    from glm45_train.infer.chat import check_chat_dir

    models = []
    for label, target in parse_model_specs(specs):
        if target.startswith(("http://", "https://")):
            models.append(EvalModel(label, None, target.rstrip("/")))
            continue
        path = Path(target)
        if is_training_run(path):
            path = export_run(path, exports_dir / label)
        check_chat_dir(path, None)
        models.append(EvalModel(label, path))
    return models


def is_training_run(path: Path) -> bool:
    from glm45_train.convert.torch_dist.directory import METADATA_NAME, TRACKER_NAME

    return (path / TRACKER_NAME).exists() or (path / METADATA_NAME).exists()


def export_run(run_dir: Path, out_dir: Path) -> Path:
    """The run as an HF export in `out_dir` (LoRA merged), through export's own functions."""
    from glm45_train.convert.to_hf import mcore_to_hf
    from glm45_train.lora.adapter_io import is_lora_run
    from glm45_train.lora.hf_export import export_merged

    print(f"eval: exporting the run {run_dir} to {out_dir}", flush=True)
    if is_lora_run(run_dir):
        export_merged(run_dir, out_dir, overwrite=True)
    else:
        mcore_to_hf(run_dir, out_dir, overwrite=True)
    return out_dir


def tokenizer_dir(models: Sequence[EvalModel], given: str | Path | None) -> Path:
    """`--tokenizer`, else the first local model's directory; served-only evaluations must give one."""
    if given is not None:
        path = Path(given)
        if not (path / "tokenizer.json").is_file():
            raise UserError(f"--tokenizer {path}: no tokenizer.json there")
        return path
    for model in models:
        if model.directory is not None:
            return model.directory
    raise UserError("served models only: give --tokenizer DIR (the served model's tokenizer) to render prompts")
