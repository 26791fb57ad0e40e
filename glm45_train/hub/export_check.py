"""Is a directory a complete export, safe to publish? `check_export(dir)` names its kind or the culprit file/tensor.

Two kinds are publishable:
- an HF checkpoint (`export --to-hf`, `--merge-lora`, `make-tiny`): config.json (glm4_moe, validated as conversion
  validates it), generation_config.json, tokenizer.json + tokenizer_config.json with a chat template (in
  tokenizer_config.json or chat_template.jinja), and safetensors weights: every shard the index names exists, its
  header parses, its size is exactly header + data (one byte short or long is refused), and index and shard headers
  list the same tensors; a `.safetensors` file the index does not name is refused too;
- a PEFT adapter (`export --adapter-only`): adapter_config.json (LoRA, naming its base model) and
  adapter_model.safetensors (header parses, exact size). The tokenizer files it carries are not required.
Whatever an interrupted write leaves behind is refused: `*.partial` (hf_io.py's shards, torch_dist/directory.py's
staging directory) and `*.incomplete` (hub downloads). Only headers are read, with plain reads (no memory map), so
checking a 700 GB export reads a few megabytes. Nothing is unpickled: a torch_dist directory is not an export.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any

from glm45_train.errors import UserError
from glm45_train.formats import safetensors_format as st
from glm45_train.formats.hf_io import INDEX_NAME, HFCheckpointReader
from glm45_train.model.hf_config import Glm45Config

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SINGLE_WEIGHTS = "model.safetensors"
CHAT_TEMPLATE = "chat_template.jinja"
LEFTOVER_SUFFIXES = (".partial", ".incomplete")


class ExportKind(enum.Enum):
    HF_CHECKPOINT = "HF checkpoint"
    PEFT_ADAPTER = "PEFT adapter"


class ExportError(UserError, ValueError):
    """A directory that is not a complete export (the message names the missing or damaged file)."""


def check_export(directory: str | Path) -> ExportKind:
    """The kind of the complete export in `directory`; raises `UserError` naming what is missing or damaged."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ExportError(f"{directory}: not a directory")
    _check_no_leftovers(directory)
    if (directory / ADAPTER_CONFIG).exists() or (directory / ADAPTER_WEIGHTS).exists():
        _check_peft_adapter(directory)  # an adapter export carries config.json too: test for it first
        return ExportKind.PEFT_ADAPTER
    if any((directory / name).exists() for name in ("config.json", INDEX_NAME, SINGLE_WEIGHTS)):
        _check_hf_checkpoint(directory)
        return ExportKind.HF_CHECKPOINT
    raise ExportError(
        f"{directory}: neither an HF checkpoint nor a PEFT adapter: missing config.json and {INDEX_NAME} "
        f"(HF checkpoint) or {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (PEFT adapter)"
    )


def _check_no_leftovers(directory: Path) -> None:
    if directory.resolve().name.endswith(LEFTOVER_SUFFIXES):
        raise ExportError(f"{directory}: the staging directory of an unfinished export, not an export")
    leftovers = sorted(
        path.relative_to(directory).as_posix() for path in directory.rglob("*") if path.name.endswith(LEFTOVER_SUFFIXES)
    )
    if leftovers:
        more = f" and {len(leftovers) - 3} more" if len(leftovers) > 3 else ""
        raise ExportError(f"{directory}: left over from an unfinished write: {', '.join(leftovers[:3])}{more}")


def _check_hf_checkpoint(directory: Path) -> None:
    Glm45Config.from_file(directory / "config.json")  # model_type glm4_moe, and convertible as it stands
    _read_json(directory / "generation_config.json")
    _read_json(directory / "tokenizer.json")
    tokenizer_config = _read_json(directory / "tokenizer_config.json")
    if not tokenizer_config.get("chat_template") and not (directory / CHAT_TEMPLATE).is_file():
        raise ExportError(
            f"{directory}: no chat template: neither {CHAT_TEMPLATE} nor a chat_template in tokenizer_config.json"
        )
    _check_hf_weights(directory)


def _check_hf_weights(directory: Path) -> None:
    """Index and shards agree tensor for tensor, and every shard is whole."""
    weight_map = HFCheckpointReader(directory).weight_map  # parses the index; every shard it names exists
    if not weight_map:
        raise ExportError(f"{directory / INDEX_NAME}: lists no tensors")
    indexed: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        indexed.setdefault(shard, set()).add(name)
    for shard, names in sorted(indexed.items()):
        path = directory / shard
        stored = set(_read_whole_safetensors(path))
        if names - stored:
            missing = sorted(names - stored)
            raise ExportError(f"{path}: lacks tensor {missing[0]} listed in {INDEX_NAME} ({len(missing)} missing)")
        if stored - names:
            extra = sorted(stored - names)
            raise ExportError(f"{path}: holds tensor {extra[0]} that {INDEX_NAME} does not list ({len(extra)} such)")
    strays = sorted(path.name for path in directory.glob("*.safetensors") if path.name not in indexed)
    if strays:
        raise ExportError(f"{directory / strays[0]}: a safetensors file that {INDEX_NAME} does not list")


def _check_peft_adapter(directory: Path) -> None:
    path = directory / ADAPTER_CONFIG
    config = _read_json(path)
    if config.get("peft_type") != "LORA":
        raise ExportError(f"{path}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    if not config.get("base_model_name_or_path"):
        raise ExportError(f"{path}: no base_model_name_or_path (the model this adapter applies to)")
    _read_whole_safetensors(directory / ADAPTER_WEIGHTS)


def _read_whole_safetensors(path: Path) -> dict[str, st.Entry]:
    """The tensors of the safetensors file `path`, after checking it is exactly header + data long."""
    if not path.is_file():
        raise ExportError(f"{path}: missing")
    try:
        entries = st.read_header(path)  # also refuses a file shorter than its header announces
    except (st.FormatError, OSError) as err:
        raise ExportError(f"{path}: not a complete safetensors file ({err})") from None
    if not entries:
        raise ExportError(f"{path}: holds no tensors")
    end, size = max(entry.end for entry in entries.values()), path.stat().st_size
    if size != end:
        raise ExportError(f"{path}: {size} bytes, but its header accounts for {end} ({size - end} bytes too many)")
    return entries


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ExportError(f"{path}: not a JSON object")
    return value
