"""Hugging Face checkpoint files: sharded safetensors reading and writing, one tensor at a time.

Reading opens a shard per tensor and closes it again (memory-mapped pages of a kept-open file count toward RSS).
Writing fills size-limited shards, writes them under temporary names and produces the final
`model-0000i-of-0000N.safetensors` names plus `model.safetensors.index.json` only in `finish()`, so an
interrupted write never leaves something that looks like a complete checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glm45_train.errors import UserError

INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint directory that is incomplete, inconsistent or unreadable."""


class HFCheckpointReader:
    """Tensor names, shapes and data of a (sharded) safetensors checkpoint directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.weight_map = self._read_weight_map()

    def _read_weight_map(self) -> dict[str, str]:
        index = self.directory / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
            missing = sorted({f for f in weight_map.values() if not (self.directory / f).exists()})
            if missing:
                raise CheckpointError(f"{index}: lists shard(s) that do not exist: {', '.join(missing)}")
            return dict(weight_map)
        single = self.directory / "model.safetensors"
        if not single.exists():
            raise CheckpointError(f"{self.directory}: no {INDEX_NAME} and no model.safetensors")
        with self._open(single.name) as handle:
            return {name: single.name for name in handle.keys()}  # noqa: SIM118  (safe_open has no __iter__)

    def _open(self, filename: str):
        path = self.directory / filename
        try:
            return safe_open(str(path), framework="pt")
        except Exception as err:  # safetensors raises its own error types for truncated/corrupt headers
            raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None

    def names(self) -> list[str]:
        return list(self.weight_map)

    def tensor_specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Shape and dtype of every tensor, reading each shard's header once (no tensor data).

        Opening a shard also validates it: safetensors refuses a truncated file. A tensor the index lists
        but its shard lacks is an error naming both.
        """
        by_file: dict[str, list[str]] = {}
        for name, filename in self.weight_map.items():
            by_file.setdefault(filename, []).append(name)
        specs: dict[str, tuple[tuple[int, ...], str]] = {}
        for filename, names in sorted(by_file.items()):
            with self._open(filename) as handle:
                stored = set(handle.keys())
                for name in names:
                    if name not in stored:
                        raise CheckpointError(
                            f"{self.directory / filename}: lacks tensor {name} listed in {INDEX_NAME}"
                        )
                    sl = handle.get_slice(name)
                    specs[name] = (tuple(sl.get_shape()), sl.get_dtype())
        return specs

    def shape_and_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        with self._open(self.weight_map[name]) as handle:
            sl = handle.get_slice(name)
            return tuple(sl.get_shape()), sl.get_dtype()

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.directory}: no tensor named {name}")
        filename = self.weight_map[name]
        with self._open(filename) as handle:
            try:
                return handle.get_tensor(name)
            except Exception as err:
                raise CheckpointError(f"{self.directory / filename}: cannot read tensor {name} ({err})") from None

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.weight_map:
            yield name, self.get(name)


class HFCheckpointWriter:
    """Writes tensors into size-limited safetensors shards; `finish()` names them and writes the index."""

    def __init__(self, directory: str | Path, max_shard_bytes: int = 5 * 1024**3) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._shards):
            raise CheckpointError(f"tensor {name} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if not self._pending:
            return
        path = self.directory / f".shard-{len(self._shards):05d}.safetensors.partial"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Final shard names plus the index. Returns the shard file names."""
        self._flush()
        count = len(self._shards)
        weight_map: dict[str, str] = {}
        filenames = []
        for i, (path, names) in enumerate(self._shards, start=1):
            filename = f"model-{i:05d}-of-{count:05d}.safetensors"
            os.chmod(path, 0o644)  # safetensors writes 0600 temp files; checkpoints are shared read-only
            os.replace(path, self.directory / filename)
            weight_map.update(dict.fromkeys(names, filename))
            filenames.append(filename)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return filenames
