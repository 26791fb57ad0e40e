"""Megatron-LM's checkpoint directory layout, our metadata next to it, and all-or-nothing output directories.

    OUT/latest_checkpointed_iteration.txt   "release" (a converted model) or an iteration number (training)
    OUT/release/ (or iter_0000100/)         the torch_dist checkpoint: metadata.json, common.pt, .metadata, *.distcp
    OUT/glm45_train.json                    source config.json, carried files, conversion dtype/layout, versions,
                                            the source's per-tensor dtypes (to restore them on export)
    OUT/hf_assets/                          config.json, generation_config.json, tokenizer and template files

Outputs are written under `.OUT.partial` (next to OUT) and renamed when complete, so a directory with the final
name is always a complete checkpoint; a stale `.partial` from an interrupted run is removed on the next run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from glm45_train.errors import UserError

TRACKER_NAME = "latest_checkpointed_iteration.txt"
RELEASE = "release"
METADATA_NAME = "glm45_train.json"
ASSETS_DIR = "hf_assets"
FORMAT = "glm45-train/mcore-checkpoint"
# Files of an HF directory that are weights (not carried as assets).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class OutputExistsError(UserError, FileExistsError):
    """The output directory exists and is not empty, and overwriting was not asked for."""


class NotAnMcoreCheckpoint(UserError, FileNotFoundError):
    """A directory that is not a (glm45-train) Megatron checkpoint."""


def check_output_dir(out_dir: Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuse an output directory that is a file, non-empty (unless overwriting) or would replace the source."""
    if source is not None:
        out, src = out_dir.resolve(), source.resolve()
        if out == src or out in src.parents:
            raise OutputExistsError(f"{out_dir}: the output directory would replace the source {source}")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out_dir} is not empty (pass --overwrite to replace it)")


def staging_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.partial"


def fresh_staging_dir(out_dir: Path) -> Path:
    staging = staging_dir(out_dir)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, out_dir: Path) -> None:
    """Give the complete `staging` directory its final name, replacing an existing `out_dir`."""
    old = out_dir.parent / f".{out_dir.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def carried_files(hf_dir: Path) -> list[Path]:
    """Top-level files of an HF directory other than weights: config, generation config, tokenizer, template."""
    return sorted(
        path
        for path in hf_dir.iterdir()
        if path.is_file()
        and not path.name.startswith(".")
        and not path.name.endswith(WEIGHT_SUFFIXES)
        and path.name not in WEIGHT_INDEXES
    )


def copy_assets(hf_dir: Path, assets_dir: Path) -> dict[str, str]:
    """Copy the carried files into `assets_dir`; returns {file name: sha256}."""
    assets_dir.mkdir(parents=True, exist_ok=True)
    digests = {}
    for path in carried_files(hf_dir):
        shutil.copy2(path, assets_dir / path.name)
        digests[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def write_metadata(root: Path, metadata: dict[str, Any]) -> None:
    (root / METADATA_NAME).write_text(json.dumps({"format": FORMAT, **metadata}, indent=2) + "\n")


def write_tracker(root: Path, iteration: str = RELEASE) -> None:
    (root / TRACKER_NAME).write_text(iteration + "\n")


def iteration_dir_name(iteration: str) -> str:
    return RELEASE if iteration == RELEASE else f"iter_{int(iteration):07d}"


class McoreCheckpointDir:
    """A Megatron checkpoint directory: OUT (with the tracker file) or the torch_dist directory itself."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_dir():
            raise NotAnMcoreCheckpoint(f"{path}: no such directory")
        tracker = path / TRACKER_NAME
        if tracker.exists():
            self.root = path
            iteration = tracker.read_text(errors="replace").strip()
            if iteration != RELEASE and not iteration.isdigit():
                raise NotAnMcoreCheckpoint(f"{tracker}: holds {iteration[:40]!r}, not {RELEASE!r} or an iteration")
            self.checkpoint = path / iteration_dir_name(iteration)
            if not (self.checkpoint / "metadata.json").exists():
                raise NotAnMcoreCheckpoint(
                    f"{tracker}: points at {self.checkpoint.name}, which is missing or incomplete (no metadata.json)"
                )
        else:
            self.root, self.checkpoint = path.parent, path
        if not (self.checkpoint / "metadata.json").exists():
            raise NotAnMcoreCheckpoint(
                f"{path}: not a Megatron torch_dist checkpoint (no {TRACKER_NAME}, no metadata.json)"
            )
        self.metadata = self._read_metadata()

    def _read_metadata(self) -> dict[str, Any]:
        for candidate in (self.root / METADATA_NAME, self.checkpoint / METADATA_NAME):
            if candidate.exists():
                try:
                    return json.loads(candidate.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise NotAnMcoreCheckpoint(f"{candidate}: damaged, not JSON ({err})") from None
        raise NotAnMcoreCheckpoint(
            f"{self.root}: no {METADATA_NAME}; it records the HF config needed to export "
            "(convert with `glm45-train export --to-mcore`)"
        )

    @property
    def hf_config(self) -> dict[str, Any]:
        return self.metadata["source"]["config"]

    @property
    def assets(self) -> Path:
        return self.root / ASSETS_DIR
