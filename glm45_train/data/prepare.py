"""`data prepare`: sources → checks → mode → render + tokenize → over-length policy → pack → dataset + report.

Notable:
- Streams in chunks (chunks.py): each chunk of records is parsed, checked, rendered, tokenized and masked by
  `prepare_chunk` (workers.py), in this process (`workers=1`) or in `workers` spawned processes with at most
  `IN_FLIGHT_PER_WORKER` chunks each in flight; results are taken in input order and appended to the token
  files, so the output and the report are the same bytes for any number of workers, and memory does not grow
  with the corpus (only sample lengths stay, for packing).
- Nothing is dropped silently. Every dropped or changed sample is listed in report.json with its reason and
  line, in file order; `on_error="fail"` stops at the first bad record, `overlong="error"` at the first sample
  over `max_length` (the first in file order, whichever worker met it). Truncation is a change the report
  lists (with the trained tokens cut), never a silent cut of labels.
- Packing is first-fit decreasing over every sample of the set, after the last chunk.
- With `workers > 1` the caller's `__main__` module is imported by each worker (multiprocessing's spawn):
  a script calling `prepare_dataset` needs the usual `if __name__ == "__main__":` guard.
- The output is written to a hidden temporary directory beside the target and renamed at the end. An
  existing target is replaced only if it is itself a prepared dataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from collections import Counter, deque
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

import glm45_train
from glm45_train.data.chat import (
    END_OF_TEXT,
    KEEP,
    Mode,
    RenderedSample,
    RenderOptions,
    check_trainable,
    load_chat_tokenizer,
    render_conversation,
    without_reasoning,
)
from glm45_train.data.chunks import iter_chunks, progress_total
from glm45_train.data.conversation import DataError
from glm45_train.data.pack import pack_first_fit_decreasing, packing_efficiency
from glm45_train.data.prepared import PreparedWriter, is_prepared_dir, write_json
from glm45_train.data.sources import check_inputs, iter_conversations
from glm45_train.data.workers import (
    ChunkOptions,
    ChunkPreparer,
    ChunkResult,
    frozen_heap,
    init_worker,
    prepare_chunk,
    problem_entry,
)
from glm45_train.errors import UserError
from glm45_train.model.tokenizer import chat_template_text

ON_ERROR_CHOICES = ("skip", "fail")
OVERLONG_CHOICES = ("drop", "truncate", "error")
CHUNK_SIZE = 256  # records per chunk: ~50 ms of work, small enough to balance the workers' load
IN_FLIGHT_PER_WORKER = 2  # chunks submitted and not yet taken, per worker: one running, one queued
MAX_DEFAULT_WORKERS = 32


def default_workers() -> int:
    """The CPUs this process may run on, at most MAX_DEFAULT_WORKERS."""
    return max(1, min(available_cpus(), MAX_DEFAULT_WORKERS))


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class PrepareOptions:
    max_length: int
    mode: Mode = KEEP
    pack: bool = False
    on_error: str = "skip"
    overlong: str = "drop"
    seed: int = 0
    train_empty_think: bool = True
    show_progress: bool = True
    workers: int = 1  # processes; 1 = in this process
    chunk_size: int = CHUNK_SIZE
    overwrite: bool = False  # replace an existing prepared dataset (a resumed run would train on the new one)

    def check(self) -> None:
        if self.max_length < 8:
            raise UserError(f"max_length {self.max_length}: must be at least 8")
        if self.workers < 1:
            raise UserError(f"workers {self.workers}: must be at least 1")
        if self.chunk_size < 1:
            raise UserError(f"chunk_size {self.chunk_size}: must be at least 1")
        if self.on_error not in ON_ERROR_CHOICES:
            raise UserError(f"on_error {self.on_error!r}: expected one of {', '.join(ON_ERROR_CHOICES)}")
        if self.overlong not in OVERLONG_CHOICES:
            raise UserError(f"overlong {self.overlong!r}: expected one of {', '.join(OVERLONG_CHOICES)}")


@dataclass
class PrepareReport:
    """Counts and every problem; `to_json` is what lands in report.json."""

    records_read: int = 0
    samples_kept: int = 0
    samples_changed: int = 0
    non_thinking_samples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    max_sample_tokens: int = 0
    bins: int = 0
    real_token_fraction: float = 0.0
    problems: list[dict[str, Any]] = field(default_factory=list)

    def add(self, result: ChunkResult) -> None:
        """Account for one chunk's kept samples and problems."""
        self.records_read += result.records_read
        self.samples_kept += len(result.lengths)
        self.samples_changed += result.samples_changed
        self.non_thinking_samples += result.non_thinking_samples
        self.tokens += len(result.input_ids)
        self.trained_tokens += int(result.loss_mask.sum(dtype=np.int64))
        if len(result.lengths):
            self.max_sample_tokens = max(self.max_sample_tokens, int(result.lengths.max()))
        self.problems.extend(result.problems)

    def note(self, action: str, error: DataError) -> None:
        self.problems.append(problem_entry(action, error))

    def count(self, action: str) -> dict[str, int]:
        return dict(Counter(p["reason"] for p in self.problems if p["action"] == action))

    def to_json(self, options: PrepareOptions) -> dict[str, Any]:
        dropped, changed = self.count("dropped"), self.count("changed")
        return {
            "records": {
                "read": self.records_read,
                "kept": self.samples_kept,
                "dropped": sum(dropped.values()),
                "changed": self.samples_changed,
            },
            "dropped_by_reason": dropped,
            "changed_by_reason": changed,
            "mode": {
                "name": str(options.mode),
                "seed": options.seed,
                "non_thinking_samples": self.non_thinking_samples,
            },
            "tokens": {
                "total": self.tokens,
                "trained": self.trained_tokens,
                "mean_per_sample": self.tokens / self.samples_kept if self.samples_kept else 0.0,
                "max_per_sample": self.max_sample_tokens,
            },
            "packing": {
                "enabled": options.pack,
                "max_length": options.max_length,
                "rows": self.bins,
                "real_token_fraction": self.real_token_fraction,
            },
            "problems": self.problems,
        }


def prepare_dataset(
    inputs: Sequence[str | Path], tokenizer_dir: str | Path, output_dir: str | Path, options: PrepareOptions
) -> PrepareReport:
    """Run the whole pipeline; returns the report (also written to output_dir/report.json)."""
    options.check()
    check_inputs(inputs)
    tokenizer_dir, output_dir = Path(tokenizer_dir), Path(output_dir)
    _check_output_dir(output_dir, options.overwrite)
    tokenizer = load_chat_tokenizer(tokenizer_dir)
    temp_dir = output_dir.parent / f".{output_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(temp_dir, ignore_errors=True)
    temp_dir.mkdir(parents=True)
    writer = PreparedWriter(temp_dir)
    report = PrepareReport()
    try:
        with (
            contextlib.closing(_results(inputs, tokenizer_dir, tokenizer, options)) as results,
            _progress(inputs, options) as bar,
        ):
            for result in results:
                _write(writer, report, result)
                bar.update(result.progress)
                bar.set_postfix_str(f"{report.records_read:,} records", refresh=False)
        if not writer.lengths:
            dropped = ", ".join(f"{reason} {n}" for reason, n in report.count("dropped").items())
            read = f"{report.records_read} record(s) read" if report.records_read else "no record: only blank lines"
            why = f"{read}, dropped: {dropped}" if dropped else read
            raise UserError(f"no usable samples in {', '.join(map(str, inputs))} ({why})")
        bins = pack_first_fit_decreasing(writer.lengths, options.max_length) if options.pack else None
        report.bins = len(bins) if bins is not None else len(writer.lengths)
        rows = bins if bins is not None else [[i] for i in range(len(writer.lengths))]
        report.real_token_fraction = packing_efficiency(writer.lengths, rows, options.max_length)
        writer.finish(bins, _metadata(inputs, tokenizer_dir, tokenizer, options, report))
        write_json(temp_dir / "report.json", report.to_json(options))
    except BaseException:
        writer.abort()
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    _replace_dir(temp_dir, output_dir)
    return report


def render_samples(
    inputs: Sequence[str | Path], tokenizer_dir: str | Path, options: RenderOptions
) -> Iterator[RenderedSample]:
    """What training sees for each record (`data render`); stops with `DataError` at the first bad record.

    Thinking off means the non-thinking mode: reasoning is removed as well as `/nothink` appended. Without a
    generation prompt the conversation must be trainable (same checks as prepare).
    """
    check_inputs(inputs)
    tokenizer = load_chat_tokenizer(tokenizer_dir)
    for item in iter_conversations(inputs):
        if isinstance(item, DataError):
            raise item
        if not options.add_generation_prompt:
            check_trainable(item)
        conversation = item if options.thinking else without_reasoning(item)[0]
        yield render_conversation(conversation, tokenizer, options)


def _results(
    inputs: Sequence[str | Path], tokenizer_dir: Path, tokenizer: Tokenizer, options: PrepareOptions
) -> Generator[ChunkResult, None, None]:
    """Every chunk prepared, in input order: here, or in worker processes."""
    chunks = iter_chunks(inputs, options.chunk_size)
    chunk_options = ChunkOptions(
        max_length=options.max_length,
        mode=options.mode,
        on_error=options.on_error,
        overlong=options.overlong,
        seed=options.seed,
        train_empty_think=options.train_empty_think,
    )
    if options.workers == 1:
        with frozen_heap():
            yield from map(ChunkPreparer(tokenizer, chunk_options), chunks)
        return
    # spawn: workers start clean (no torch / Megatron / tokenizer thread state of the caller's process).
    context = multiprocessing.get_context("spawn")
    initargs = (str(tokenizer_dir), chunk_options)
    pool = ProcessPoolExecutor(options.workers, mp_context=context, initializer=init_worker, initargs=initargs)
    in_flight: deque[Future[ChunkResult]] = deque()
    try:
        for chunk in chunks:
            in_flight.append(pool.submit(prepare_chunk, chunk))
            if len(in_flight) >= IN_FLIGHT_PER_WORKER * options.workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _write(writer: PreparedWriter, report: PrepareReport, result: ChunkResult) -> None:
    """Append one chunk's samples, or raise the error that stops the run."""
    if result.stop is not None:
        raise DataError(*result.stop)
    bounds = [0, *np.cumsum(result.lengths).tolist()]  # a chunk may keep no sample: no bounds then
    for start, end in pairwise(bounds):
        writer.add(result.input_ids[start:end], result.loss_mask[start:end])
    writer.flush()
    report.add(result)


def _progress(inputs: Sequence[str | Path], options: PrepareOptions) -> tqdm:
    """A bar over the input bytes (rate and ETA; no ETA when an input has no known size)."""
    total = progress_total(inputs)
    return tqdm(
        total=total,
        desc="prepare",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not options.show_progress,
        file=sys.stderr,
    )


def _metadata(
    inputs: Sequence[str | Path],
    tokenizer_dir: Path,
    tokenizer: Tokenizer,
    options: PrepareOptions,
    report: PrepareReport,
) -> dict[str, Any]:
    tokenizer_json = Path(tokenizer_dir) / "tokenizer.json"
    return {
        "created_by": f"glm45-train {glm45_train.__version__}",
        "inputs": [str(i) for i in inputs],
        "mode": str(options.mode),
        "seed": options.seed,
        "max_length": options.max_length,
        "packed": options.pack,
        "train_empty_think": options.train_empty_think,
        "tokenizer": {
            "path": str(Path(tokenizer_dir).resolve()),
            "tokenizer_json_sha256": hashlib.sha256(tokenizer_json.read_bytes()).hexdigest(),
            "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
            # The renderer writes the official GLM-4.5 format whatever template the directory holds.
            "chat_template_is_official": _template_of(Path(tokenizer_dir)) == chat_template_text(),
        },
        "pad_token_id": tokenizer.token_to_id(END_OF_TEXT),
        "num_samples": report.samples_kept,
        "num_rows": report.bins,
        "num_tokens": report.tokens,
        "num_trained_tokens": report.trained_tokens,
    }


def _template_of(tokenizer_dir: Path) -> str | None:
    """The chat template a tokenizer directory ships: chat_template.jinja, else tokenizer_config.json's."""
    jinja = tokenizer_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = tokenizer_dir / "tokenizer_config.json"
    if not config.is_file():
        return None
    template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    return template if isinstance(template, str) else None


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """An absent or empty output, or (with `overwrite`) a prepared dataset; never anything else."""
    if not output_dir.exists() or (output_dir.is_dir() and not any(output_dir.iterdir())):
        return
    if not (output_dir.is_dir() and is_prepared_dir(output_dir)):
        raise FileExistsError(f"{output_dir}: exists and is not a prepared dataset; refusing to replace it")
    if not overwrite:
        raise FileExistsError(
            f"{output_dir}: already holds a prepared dataset (a run may be training on it); "
            "pass --overwrite to replace it, or choose another --output-dir"
        )


def _replace_dir(new: Path, target: Path) -> None:
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)
