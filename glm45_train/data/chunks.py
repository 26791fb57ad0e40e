"""The inputs of `data prepare` as a stream of `Chunk`s of records, for `prepare_chunk` (workers.py).

Notable:
- Streams: one chunk at a time is read; the caller bounds how many are in flight.
- JSONL lines are passed on undecoded (with their line numbers, blank lines skipped as sources.py does),
  so the JSON parsing happens in the workers. Every other kind of input is read by `sources.iter_records`
  here and its records are passed on parsed.
- Each chunk says how many bytes of its input it covers, for the progress bar: exact for JSONL, by rows
  for Parquet, the whole file at its end for JSON arrays; `progress_total` is None (no ETA) when an input
  has no size (a saved dataset directory, a ModelScope ID).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from glm45_train.data.conversation import DataError, Origin
from glm45_train.data.sources import UTF8_BOM, iter_records, jsonl_lines, source_kind
from glm45_train.data.workers import Chunk


def iter_chunks(inputs: Sequence[str | Path], size: int) -> Iterator[Chunk]:
    """Every record of every input, in order, `size` records per chunk (a chunk never spans two inputs)."""
    for spec in inputs:
        if source_kind(spec) == "jsonl":
            yield from _jsonl_chunks(Path(spec), size)
        else:
            yield from _record_chunks(spec, size)


def progress_total(inputs: Sequence[str | Path]) -> int | None:
    """Bytes the progress bar counts to, or None when some input's size is unknown."""
    kinds = [source_kind(spec) for spec in inputs]
    if any(kind in ("saved_dataset", "modelscope") for kind in kinds):
        return None
    return sum(Path(spec).stat().st_size for spec in inputs)


def _jsonl_chunks(path: Path, size: int) -> Iterator[Chunk]:
    source = str(path)
    lines: list[tuple[int, bytes]] = []
    with path.open("rb") as handle:
        progress = len(UTF8_BOM) if handle.read(len(UTF8_BOM)) == UTF8_BOM else 0  # the bar counts file bytes
    for line_number, raw in jsonl_lines(path):
        progress += len(raw)
        if not raw.strip():
            continue
        lines.append((line_number, raw))
        if len(lines) == size:
            yield Chunk(source, lines=tuple(lines), progress=progress)
            lines, progress = [], 0
    if lines or progress:
        yield Chunk(source, lines=tuple(lines), progress=progress)


def _record_chunks(spec: str | Path, size: int) -> Iterator[Chunk]:
    rows, file_size = _rows_and_size(spec)
    records: list[tuple[Origin, Any] | DataError] = []
    done = 0
    for read, item in enumerate(iter_records(spec), start=1):
        records.append(item)
        if len(records) == size:
            advance = file_size * read // rows - done if rows else 0
            done += advance
            yield Chunk(str(spec), records=tuple(records), progress=advance)
            records = []
    if records or file_size > done:
        yield Chunk(str(spec), records=tuple(records), progress=file_size - done)


def _rows_and_size(spec: str | Path) -> tuple[int, int]:
    """(rows if known without reading the data, else 0; file size, or 0 for directories and hub IDs)."""
    kind = source_kind(spec)
    if kind in ("saved_dataset", "modelscope"):
        return 0, 0
    path = Path(spec)
    if kind != "parquet":
        return 0, path.stat().st_size
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows, path.stat().st_size
