"""The prepared dataset on disk: written by `data prepare`, read by the trainer.

Layout of a prepared directory:
    metadata.json       format, mode, seed, max_length, packed, tokenizer (path, sha256, vocab size), counts,
                        fingerprint (blake2b of the token, mask, offset and bin files, hashed as written)
    report.json         what prepare read, dropped and changed (see prepare.py)
    tokens.bin          int32, every kept sample's input_ids end to end
    trained.bin         uint8, 1 where the token is a training target (same length as tokens.bin)
    sample_offsets.npy  int64 [n + 1], sample i is tokens[offsets[i]:offsets[i + 1]]
    bin_offsets.npy     int64 [b + 1] (packed only): bin j is bin_samples[bin_offsets[j]:bin_offsets[j + 1]]
    bin_samples.npy     int64 [n] (packed only), sample indices grouped by bin

Notable:
- The token files are streamed while preparing and memory-mapped while reading: a 110k-conversation set
  never sits in memory as Python lists.
- The fingerprint is what a training checkpoint records of its data (train/run_inputs.py): a dataset replaced
  under a run is noticed on resume without reading the files again.
- `TrainingExample` is already shifted: `labels[t]` is the token after `t` in the same sample and
  `loss_mask[t]` says whether that token is trained; the last position of every sample predicts nothing (so
  nothing leaks across samples).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

from glm45_train.data.pack import block_causal_mask, cu_seqlens, position_ids
from glm45_train.errors import UserError

FORMAT = "glm45-train/prepared"
FORMAT_VERSION = 1
TOKENS_FILE = "tokens.bin"
TRAINED_FILE = "trained.bin"


@dataclass(frozen=True)
class TrainingExample:
    """One training row: a sample, or several packed ones."""

    input_ids: np.ndarray  # [s] int64
    labels: np.ndarray  # [s] int64, the next token within the same sample (pad id where there is none)
    loss_mask: np.ndarray  # [s] float32, 1.0 where labels[t] is a trained token
    position_ids: np.ndarray  # [s] int64, restarting at 0 for each sample
    seq_lengths: tuple[int, ...]  # the samples in this row, in order


@dataclass(frozen=True)
class Batch:
    """Examples padded to one length; `attention_mask` only when asked for (CPU attention)."""

    tokens: torch.Tensor  # [b, s] int64
    labels: torch.Tensor  # [b, s] int64
    loss_mask: torch.Tensor  # [b, s] float32
    position_ids: torch.Tensor  # [b, s] int64
    cu_seqlens: torch.Tensor  # [k + 1] int32, all rows end to end (THD)
    attention_mask: torch.Tensor | None  # [b, 1, s, s] bool, True = masked


class PreparedWriter:
    """Appends rendered samples to a directory being prepared; `finish` writes offsets, bins and metadata."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._tokens = (directory / TOKENS_FILE).open("wb")
        self._trained = (directory / TRAINED_FILE).open("wb")
        self.lengths: list[int] = []
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._hashes = {name: hashlib.blake2b(digest_size=16) for name in (TOKENS_FILE, TRAINED_FILE)}

    def add(self, input_ids: np.ndarray, loss_mask: np.ndarray) -> None:
        """Queue one sample (written at the next `flush`)."""
        self._pending.append((np.asarray(input_ids, dtype=np.int32), np.asarray(loss_mask, dtype=np.uint8)))
        self.lengths.append(len(input_ids))

    def flush(self) -> None:
        """Append the queued samples to the token files in one write each."""
        if self._pending:
            for name, part, file in (
                (TOKENS_FILE, np.concatenate([ids for ids, _ in self._pending]), self._tokens),
                (TRAINED_FILE, np.concatenate([mask for _, mask in self._pending]), self._trained),
            ):
                file.write(part.data)  # not tofile: a short write raises OSError with its errno
                self._hashes[name].update(part.data)
            self._pending = []

    def finish(self, bins: Sequence[Sequence[int]] | None, metadata: dict[str, Any]) -> None:
        self.flush()
        self._tokens.close()
        self._trained.close()
        arrays = {"sample_offsets.npy": np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])}
        if bins is not None:
            arrays["bin_offsets.npy"] = np.concatenate([[0], np.cumsum([len(b) for b in bins])])
            arrays["bin_samples.npy"] = np.asarray([i for b in bins for i in b])
        fingerprint = hashlib.blake2b(digest_size=16)
        for name, array in arrays.items():
            array = array.astype(np.int64)
            np.save(self.directory / name, array)
            fingerprint.update(name.encode() + array.tobytes())
        for name, file_hash in self._hashes.items():
            fingerprint.update(name.encode() + file_hash.digest())
        fingerprint.update(f"pad {metadata['pad_token_id']}".encode())  # what is trained; not where it came from
        header = {"format": FORMAT, "version": FORMAT_VERSION, **metadata, "fingerprint": fingerprint.hexdigest()}
        write_json(self.directory / "metadata.json", header)

    def abort(self) -> None:
        self._tokens.close()
        self._trained.close()


class PreparedDataset(Sequence[TrainingExample]):
    """Read side: `dataset[i]` is row i (a bin when packed, else a sample), ready to collate."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.metadata = read_metadata(self.directory)
        self.pad_token_id = int(self.metadata["pad_token_id"])
        tokens = int(self.metadata["num_tokens"])
        self._tokens = _memmap(self.directory / TOKENS_FILE, np.int32, tokens)
        self._trained = _memmap(self.directory / TRAINED_FILE, np.uint8, tokens)
        self._offsets = _offsets(self.directory / "sample_offsets.npy", int(self.metadata["num_samples"]), tokens)
        self._bins: tuple[np.ndarray, np.ndarray] | None = None
        if self.metadata["packed"]:
            samples = self.num_samples
            bin_samples = _array(self.directory / "bin_samples.npy")
            bin_offsets = _offsets(self.directory / "bin_offsets.npy", int(self.metadata["num_rows"]), len(bin_samples))
            if len(bin_samples) and (bin_samples.min() < 0 or bin_samples.max() >= samples):
                raise DatasetError(f"{self.directory / 'bin_samples.npy'}: sample indices outside [0, {samples})")
            self._bins = (bin_offsets, bin_samples)
        vocab_size = self.metadata.get("tokenizer", {}).get("vocab_size")
        if vocab_size is not None:
            _check_token_ids(self._tokens, int(vocab_size), self.directory / TOKENS_FILE)

    @property
    def fingerprint(self) -> str:
        """What was trained, as recorded by `data prepare`; datasets prepared before it was, by their metadata."""
        recorded = self.metadata.get("fingerprint")
        if recorded:
            return str(recorded)
        return "metadata " + hashlib.blake2b(json.dumps(self.metadata).encode(), digest_size=16).hexdigest()

    @property
    def num_samples(self) -> int:
        return len(self._offsets) - 1

    def __len__(self) -> int:
        return self.num_samples if self._bins is None else len(self._bins[0]) - 1

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids int64 [n], trained bool [n]) of sample `index`, unshifted."""
        start, end = int(self._offsets[index]), int(self._offsets[index + 1])
        return self._tokens[start:end].astype(np.int64), self._trained[start:end].astype(bool)

    def samples_in_row(self, index: int) -> list[int]:
        if self._bins is None:
            return [index]
        bin_offsets, bin_samples = self._bins
        return [int(i) for i in bin_samples[bin_offsets[index] : bin_offsets[index + 1]]]

    def __getitem__(self, index: int) -> TrainingExample:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.directory}: row {index} out of range ({len(self)} rows)")
        parts = [self.sample(i) for i in self.samples_in_row(index % len(self))]
        return shift_for_training([ids for ids, _ in parts], [trained for _, trained in parts], self.pad_token_id)


def shift_for_training(ids: Sequence[np.ndarray], trained: Sequence[np.ndarray], pad_id: int) -> TrainingExample:
    """Concatenate samples into one row with next-token labels that never cross a sample boundary."""
    input_ids = np.concatenate(ids).astype(np.int64)
    labels = np.full_like(input_ids, pad_id)
    loss_mask = np.zeros(len(input_ids), dtype=np.float32)
    start = 0
    for sample_ids, sample_trained in zip(ids, trained, strict=True):
        end = start + len(sample_ids)
        labels[start : end - 1] = sample_ids[1:]
        loss_mask[start : end - 1] = sample_trained[1:]
        start = end
    lengths = tuple(len(x) for x in ids)
    return TrainingExample(input_ids, labels, loss_mask, position_ids(lengths), lengths)


def collate(
    examples: Sequence[TrainingExample], row_length: int, pad_id: int, with_attention_mask: bool = False
) -> Batch:
    """Pad examples to `row_length` and stack them; padding is never trained."""
    import torch  # here, not at import: `data prepare`'s worker processes never need it

    def padded(values: np.ndarray, fill: float) -> np.ndarray:
        if len(values) > row_length:
            raise ValueError(f"an example of {len(values)} tokens does not fit row_length {row_length}")
        return np.concatenate([values, np.full(row_length - len(values), fill, dtype=values.dtype)])

    rows = [e.seq_lengths for e in examples]
    return Batch(
        tokens=torch.from_numpy(np.stack([padded(e.input_ids, pad_id) for e in examples])),
        labels=torch.from_numpy(np.stack([padded(e.labels, pad_id) for e in examples])),
        loss_mask=torch.from_numpy(np.stack([padded(e.loss_mask, 0.0) for e in examples])),
        position_ids=torch.from_numpy(np.stack([position_ids(r, row_length) for r in rows])),
        cu_seqlens=cu_seqlens(rows, row_length),
        attention_mask=block_causal_mask(rows, row_length) if with_attention_mask else None,
    )


class DatasetError(UserError):
    """A prepared dataset whose files are damaged: truncated, inconsistent with metadata.json, or out of range."""


def _memmap(path: Path, dtype: type[np.generic], count: int) -> np.ndarray:
    expected = count * np.dtype(dtype).itemsize
    size = path.stat().st_size if path.is_file() else None
    if size != expected:
        found = "missing" if size is None else f"{size:,} bytes"
        raise DatasetError(f"{path}: {found}, metadata.json's num_tokens {count:,} needs {expected:,} (damaged?)")
    return np.memmap(path, dtype=dtype, mode="r") if count else np.zeros(0, dtype=dtype)


def _array(path: Path) -> np.ndarray:
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DatasetError(f"{path}: unreadable ({err})") from None
    if values.ndim != 1 or values.dtype.kind not in "iu":
        raise DatasetError(f"{path}: expected a 1-d integer array, found {values.dtype} {values.shape}")
    return values


def _offsets(path: Path, count: int, end: int) -> np.ndarray:
    """`count` + 1 non-decreasing offsets from 0 to `end`."""
    values = _array(path)
    if len(values) != count + 1 or values[0] != 0 or values[-1] != end or (np.diff(values) < 0).any():
        raise DatasetError(f"{path}: not {count + 1} non-decreasing offsets from 0 to {end:,} (damaged?)")
    return values


def _check_token_ids(tokens: np.ndarray, vocab_size: int, path: Path, block: int = 2**26) -> None:
    """Every id in [0, vocab_size): one pass in blocks (no copy of the file), at ~GB/s."""
    for start in range(0, len(tokens), block):
        part = tokens[start : start + block]
        low, high = int(part.min()), int(part.max())
        if low < 0 or high >= vocab_size:
            bad = start + int(np.flatnonzero((part < 0) | (part >= vocab_size))[0])
            raise DatasetError(
                f"{path}: token id {int(tokens[bad])} at position {bad:,} is outside the tokenizer's vocabulary "
                f"[0, {vocab_size}) (damaged?)"
            )


def load_prepared(directory: str | Path) -> PreparedDataset:
    """Open a directory written by `glm45-train data prepare`."""
    return PreparedDataset(Path(directory))


def is_prepared_dir(directory: Path) -> bool:
    try:
        return read_metadata(directory).get("format") == FORMAT
    except (FileNotFoundError, UserError):
        return False


def read_metadata(directory: Path) -> dict[str, Any]:
    path = Path(directory) / "metadata.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a prepared dataset (run `glm45-train data prepare`)")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if metadata.get("format") != FORMAT or metadata.get("version") != FORMAT_VERSION:
        raise UserError(f"{path}: format {metadata.get('format')!r} v{metadata.get('version')}, expected {FORMAT} v1")
    return dict(metadata)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
