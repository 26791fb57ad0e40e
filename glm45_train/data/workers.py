"""The work of `data prepare` on one chunk of records: parse, check, mode, render, tokenize, mask, over-length.

Notable:
- `prepare_chunk` is a pure function of the chunk, the options and the tokenizer: run in this process
  (`--workers 1`) or in worker processes, it gives the same bytes, so the output does not depend on the
  number of workers. Results come back in input order (prepare.py), so problems are listed in file order.
- Worker processes are started with `spawn` (no torch, Megatron or tokenizer thread-pool state inherited
  from the caller), load the tokenizer once from its directory (`init_worker`) and ignore SIGINT: Ctrl-C
  reaches the parent, which shuts them down.
- One process, one core: a worker's tokenizer runs single-threaded (its Rust thread pool is switched off
  with the library's own setting, TOKENIZERS_PARALLELISM, inside the worker only); parallelism comes from
  the number of workers.
- JSONL lines travel as bytes and are decoded here, so JSON parsing is parallel too; other sources
  (Parquet, JSON arrays, saved datasets) arrive as parsed records.
- Over-length by its text alone: under `overlong` drop or error, a sample whose rendered text has more bytes than
  `max_length` tokens can cover (each token covers at most `max_token_bytes`, the longest vocabulary entry in
  UTF-8, doubled as a margin for normalizers) is refused before it is tokenized. A 42 MB line once took 5.9 GB
  of tokenizer memory before being dropped for its length.
- Nothing here raises for bad data: problems come back as report entries, and the first stop
  (`on_error="fail"`, `overlong="error"`) as `ChunkResult.stop`, so the parent raises it in file order.
  (`DataError` itself does not pickle: its constructor takes three arguments.)
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from glm45_train.data.chat import (
    Mode,
    RenderedText,
    RenderOptions,
    check_trainable,
    load_chat_tokenizer,
    render_text,
    without_reasoning,
)
from glm45_train.data.conversation import Conversation, DataError, Origin, Reason
from glm45_train.data.sources import parse_record


@dataclass(frozen=True)
class ChunkOptions:
    """What a worker needs of `PrepareOptions` (prepare.py)."""

    max_length: int
    mode: Mode
    on_error: str
    overlong: str
    seed: int
    train_empty_think: bool


@dataclass(frozen=True)
class Chunk:
    """Consecutive records of one input: JSONL lines as (line number, bytes), or parsed records / errors."""

    source: str
    lines: tuple[tuple[int, bytes], ...] = ()
    records: tuple[tuple[Origin, Any] | DataError, ...] = ()
    progress: int = 0  # input bytes this chunk accounts for (progress bar)


@dataclass
class ChunkResult:
    """Kept samples end to end, with the chunk's share of the report."""

    input_ids: np.ndarray  # int32 [tokens], kept samples end to end
    loss_mask: np.ndarray  # uint8 [tokens]
    lengths: np.ndarray  # int64 [kept samples]
    records_read: int = 0
    samples_changed: int = 0
    non_thinking_samples: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)  # in record order
    stop: tuple[Reason, str, Origin | None] | None = None  # the first error that stops the run
    progress: int = 0


def problem_entry(action: str, error: DataError) -> dict[str, Any]:
    """One report.json `problems` entry."""
    origin = error.origin or Origin("<unknown>", 0)
    entry = {"source": origin.source, origin.unit: origin.line, "reason": error.reason.value}
    return {**entry, "action": action, "detail": error.detail}


@dataclass(frozen=True)
class _Accepted:
    index: int  # position in the chunk (orders the problems)
    origin: Origin
    non_thinking: bool
    change: DataError | None  # reasoning removed by the mode


class ChunkPreparer:
    """`prepare_chunk` bound to a tokenizer and options; callable in this process or in a worker."""

    def __init__(self, tokenizer: Tokenizer, options: ChunkOptions) -> None:
        self.tokenizer = tokenizer
        self.options = options
        self._render = {
            thinking: RenderOptions(thinking=thinking, train_empty_think=options.train_empty_think)
            for thinking in (True, False)
        }
        longest = max(len(token.encode()) for token in tokenizer.get_vocab(with_added_tokens=True))
        self.max_text_bytes = options.max_length * 2 * longest  # more bytes than this: over max_length tokens

    def __call__(self, chunk: Chunk) -> ChunkResult:
        accepted, rendered, problems, stop = self._render_chunk(chunk)
        ids, mask, piece_lengths = _tokenize(rendered, self.tokenizer)
        result = self._keep(accepted, rendered, ids, mask, piece_lengths, problems)
        result.records_read = len(chunk.lines) + len(chunk.records)
        result.progress = chunk.progress
        if result.stop is None:
            result.stop = stop
        result.problems = [entry for _, entry in sorted(problems, key=lambda p: p[0])]
        return result

    def _render_chunk(
        self, chunk: Chunk
    ) -> tuple[list[_Accepted], list[RenderedText], list[tuple[int, dict[str, Any]]], tuple | None]:
        """Parse, check, apply the mode and render every record; stops at the first bad one under `fail`."""
        accepted: list[_Accepted] = []
        rendered: list[RenderedText] = []
        problems: list[tuple[int, dict[str, Any]]] = []
        fail = self.options.on_error == "fail"
        for index, item in enumerate(_conversations(chunk)):
            try:
                if isinstance(item, DataError):
                    raise item
                check_trainable(item)
            except DataError as error:
                if fail:
                    return accepted, rendered, problems, (error.reason, error.detail, error.origin)
                problems.append((index, problem_entry("dropped", error)))
                continue
            conversation, pending = self._apply_mode(index, item)
            text = render_text(conversation, self._render[not pending.non_thinking])
            too_long = self._too_long_to_tokenize(text, pending.origin)
            if too_long is not None:
                if self.options.overlong == "error":
                    return accepted, rendered, problems, (too_long.reason, too_long.detail, too_long.origin)
                problems.append((index, problem_entry("dropped", too_long)))
                continue
            accepted.append(pending)
            rendered.append(text)
        return accepted, rendered, problems, None

    def _too_long_to_tokenize(self, text: RenderedText, origin: Origin) -> DataError | None:
        if self.options.overlong == "truncate":
            return None  # its first max_length tokens are kept: tokenized as usual
        nbytes = sum(len(piece.encode()) for piece, _ in text.segments)
        if nbytes <= self.max_text_bytes:
            return None
        detail = f"{nbytes:,} bytes of text: more than max_length {self.options.max_length} tokens (not tokenized)"
        return DataError(Reason.OVERLONG, detail, origin)

    def _apply_mode(self, index: int, conversation: Conversation) -> tuple[Conversation, _Accepted]:
        options = self.options
        change = None
        non_thinking = options.mode.picks_non_thinking(conversation.origin, options.seed)
        if non_thinking:
            conversation, removed = without_reasoning(conversation)
            if removed:
                detail = f"mode {options.mode}: reasoning removed, trained as non-thinking"
                change = DataError(Reason.REASONING_REMOVED, detail, conversation.origin)
        return conversation, _Accepted(index, conversation.origin, non_thinking, change)

    def _keep(
        self,
        accepted: list[_Accepted],
        rendered: list[RenderedText],
        ids: np.ndarray,
        mask: np.ndarray,
        piece_lengths: np.ndarray,
        problems: list[tuple[int, dict[str, Any]]],
    ) -> ChunkResult:
        """Apply the over-length policy and account for the kept samples; only samples with something to
        report are visited one by one."""
        piece_ends = np.cumsum([len(item.segments) for item in rendered], dtype=np.int64)
        token_ends = np.cumsum(piece_lengths)[piece_ends - 1] if rendered else np.zeros(0, dtype=np.int64)
        lengths = np.diff(token_ends, prepend=0)
        kept_lengths = lengths.copy()
        keep_tokens = np.ones(len(ids), dtype=bool)
        result = ChunkResult(ids, mask, lengths)
        changed = [sample for sample, pending in enumerate(accepted) if pending.change is not None]
        overlong = np.flatnonzero(lengths > self.options.max_length).tolist()
        for sample in sorted(set(changed) | set(overlong)):
            end = int(token_ends[sample])
            start = end - int(lengths[sample])
            kept = self._account(accepted[sample], mask[start:end], result, problems)
            if result.stop is not None:  # overlong="error": the run stops, nothing of this chunk is written
                return ChunkResult(ids[:0], mask[:0], lengths[:0], stop=result.stop)
            keep_tokens[start + kept : end] = False
            kept_lengths[sample] = kept
        if not keep_tokens.all():
            result.input_ids, result.loss_mask = ids[keep_tokens], mask[keep_tokens]
        kept_samples = kept_lengths > 0
        result.lengths = kept_lengths[kept_samples]
        non_thinking = np.fromiter((p.non_thinking for p in accepted), dtype=bool, count=len(accepted))
        result.non_thinking_samples = int((non_thinking & kept_samples).sum())
        return result

    def _account(
        self, pending: _Accepted, mask: np.ndarray, result: ChunkResult, problems: list[tuple[int, dict[str, Any]]]
    ) -> int:
        """Tokens kept of a sample that is changed or over-long (0: dropped), its problems noted in order."""
        limit = self.options.max_length
        changes = [pending.change] if pending.change is not None else []
        kept = len(mask)
        if kept > limit:
            error = DataError(Reason.OVERLONG, f"{kept} tokens > max_length {limit}", pending.origin)
            cut = int(mask[limit:].sum())
            if self.options.overlong == "error":
                result.stop = (error.reason, error.detail, error.origin)
                return 0
            if self.options.overlong == "drop" or cut == int(mask.sum()):
                problems.append((pending.index, problem_entry("dropped", error)))
                return 0
            detail = f"{error.detail}: cut to {limit}, {cut} trained tokens removed"
            changes.append(DataError(Reason.TRUNCATED, detail, pending.origin))
            kept = limit
        problems.extend((pending.index, problem_entry("changed", change)) for change in changes)
        result.samples_changed += bool(changes)
        return kept


def _conversations(chunk: Chunk) -> list[Conversation | DataError]:
    """The chunk's records parsed, as `sources.iter_conversations` would yield them."""
    items: list[Conversation | DataError] = []
    for line_number, raw in chunk.lines:
        origin = Origin(chunk.source, line_number)
        try:
            items.append(parse_record(_json_line(raw, origin), origin))
        except DataError as error:
            items.append(error)
    for item in chunk.records:
        if isinstance(item, DataError):
            items.append(item)
            continue
        try:
            items.append(parse_record(item[1], item[0]))
        except DataError as error:
            items.append(error)
    return items


# json.loads' own scanner without its per-call checks: ~20% less time per line (typeshed lacks the attribute).
_SCAN: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _json_line(raw: bytes, origin: Origin) -> Any:
    """One JSONL line, decoded exactly as `sources._jsonl_records` does (tests compare the two).

    The fast path takes a value that starts the line and ends it; anything else (leading whitespace, a
    BOM, extra data, an error) goes through `json.loads`, which gives its own result or message."""
    try:
        text = raw.decode("utf-8").rstrip()
        with contextlib.suppress(ValueError, StopIteration):
            value, end = _SCAN(text, 0)
            if end == len(text):
                return value
        return json.loads(text)
    except UnicodeDecodeError as exc:
        raise DataError(Reason.MALFORMED_JSON, f"not valid UTF-8 ({exc.reason})", origin) from None
    except json.JSONDecodeError as exc:
        raise DataError(Reason.MALFORMED_JSON, f"{exc.msg} at column {exc.colno}", origin) from None


def _tokenize(rendered: list[RenderedText], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids int32, loss_mask uint8, tokens per segment) of the rendered samples end to end.

    One batched call over every segment; segment-wise ids equal whole-text ids (chat.py)."""
    pieces = [text for item in rendered for text, _ in item.segments]
    trained = np.fromiter((t for item in rendered for _, t in item.segments), dtype=np.uint8, count=len(pieces))
    encodings = tokenizer.encode_batch_fast(pieces, add_special_tokens=False) if pieces else []
    piece_lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
    count = int(piece_lengths.sum())
    ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=count)
    return ids, np.repeat(trained, piece_lengths), piece_lengths


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Objects that exist now are left out of garbage collection until the block ends.

    Preparing allocates and frees millions of small objects, which triggers full collections; each one
    walks every object of the process (torch's modules included, ~5% of prepare's time in this process).
    The chunk's own objects are freed by reference counting; nothing here is lost, only not re-examined.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# --- worker processes ----------------------------------------------------------------------------------------

_WORKER: ChunkPreparer | None = None


def init_worker(tokenizer_dir: str, options: ChunkOptions) -> None:
    """Worker process start: single-threaded tokenizer, loaded once; Ctrl-C is the parent's to handle."""
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # this worker process only: one process, one core
    _WORKER = ChunkPreparer(load_chat_tokenizer(Path(tokenizer_dir)), options)
    gc.freeze()  # what is loaded now stays: the collector then skips it (see `frozen_heap`)


def prepare_chunk(chunk: Chunk) -> ChunkResult:
    """The worker-process entry: `ChunkPreparer` of `init_worker` on one chunk."""
    if _WORKER is None:
        raise RuntimeError("prepare_chunk called in a process where init_worker did not run")
    return _WORKER(chunk)
