"""Data preparation throughput: `data prepare` against the raw fast tokenizer on the same text, and packing density.

    .venv/bin/python bench/data.py [--conversations 10000] [--repeats 3] [--tokenizer DIR] [--update-docs]

Notable:
- The input is synthesised from data/sample_distill.jsonl: each copy gets a numbered user turn and its answer
  repeated 1–24 times, so lengths spread from a few dozen to a few thousand tokens (seeded, same set every run).
- "raw tokenizer" = `Tokenizer.encode_batch_fast` over the fully rendered texts of the same conversations: the
  ceiling for prepare, which also parses JSON, checks, renders, builds masks, writes files and packs.
- Without --tokenizer the tiny tokenizer is built in a temporary directory (its small vocabulary makes ~2× more
  tokens per character than the release's, so tokens/s are comparable, characters/s are not).
- Each path runs `--repeats` times, interleaved: rates are the fastest run, the ratio the median of per-repeat
  ratios, so that other jobs sharing the cores distort the figures less.
- --update-docs rewrites the `## Data preparation` section of docs/benchmarks.md with the table printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import tempfile
import time
from pathlib import Path

from glm45_train.data.chat import RenderOptions, load_chat_tokenizer, render_text
from glm45_train.data.prepare import PrepareOptions, prepare_dataset
from glm45_train.data.sources import iter_conversations
from glm45_train.model.tokenizer import write_tokenizer

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample_distill.jsonl"
DOCS = REPO / "docs" / "benchmarks.md"
PACK_LENGTH = 8192


def synthesise(count: int, out: Path, seed: int = 0) -> None:
    """`count` conversations derived from the sample set, lengths spread by repeating answers."""
    rng = random.Random(seed)
    records = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    with out.open("w", encoding="utf-8") as handle:
        for index in range(count):
            record = json.loads(json.dumps(records[index % len(records)]))
            messages = record["messages"]
            user = next(m for m in messages if m["role"] == "user")
            user["content"] = f"[{index}] {user['content']}"
            last = messages[-1]
            last["content"] = "\n\n".join([last["content"]] * rng.randint(1, 24))
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def time_raw_tokenizer(texts: list[str], tokenizer_dir: Path) -> tuple[float, int]:
    """Seconds and tokens of encode_batch_fast over the rendered texts (rendering not timed)."""
    tokenizer = load_chat_tokenizer(tokenizer_dir)
    start = time.perf_counter()
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    tokens = sum(len(e.ids) for e in encodings)
    return time.perf_counter() - start, tokens


def time_prepare(data: Path, tokenizer_dir: Path, out: Path, pack: bool) -> tuple[float, dict]:
    options = PrepareOptions(max_length=PACK_LENGTH, pack=pack, show_progress=False)
    start = time.perf_counter()
    prepare_dataset([data], tokenizer_dir, out, options)
    seconds = time.perf_counter() - start
    return seconds, json.loads((out / "report.json").read_text(encoding="utf-8"))


def run(conversations: int, repeats: int, tokenizer_dir: Path | None) -> str:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        if tokenizer_dir is None:
            tokenizer_dir = root / "tokenizer"
            write_tokenizer(tokenizer_dir)
        data = root / "synthetic.jsonl"
        synthesise(conversations, data)
        texts = [render_text(c, RenderOptions()).text for c in iter_conversations([data])]  # stop included
        times: dict[str, list[float]] = {"raw": [], "plain": [], "packed": []}
        for _ in range(repeats):  # interleaved, so each repeat's three runs see the same machine load
            seconds, tokens = time_raw_tokenizer(texts, tokenizer_dir)
            times["raw"].append(seconds)
            seconds, plain = time_prepare(data, tokenizer_dir, root / "plain", pack=False)
            times["plain"].append(seconds)
            seconds, packed = time_prepare(data, tokenizer_dir, root / "packed", pack=True)
            times["packed"].append(seconds)
    if plain["tokens"]["total"] != tokens:
        raise RuntimeError(f"prepare wrote {plain['tokens']['total']} tokens, the raw tokenizer made {tokens}")
    return _table(conversations, len(texts), tokens, times, plain, packed)


def _table(conversations: int, samples: int, tokens: int, times: dict[str, list[float]], plain, packed) -> str:
    def row(name: str, key: str) -> str:
        best = min(times[key])
        ratio = statistics.median(r / t for r, t in zip(times["raw"], times[key], strict=True))
        return f"| {name} | {samples / best:,.0f} | {tokens / best:,.0f} | {ratio:.2f} |"

    packing = packed["packing"]
    unpacked = plain["packing"]["real_token_fraction"]
    repeats = len(times["raw"])
    return "\n".join(
        [
            "## Data preparation",
            "",
            f"`bench/data.py --conversations {conversations} --repeats {repeats}` on {os.cpu_count()} CPU cores "
            f"({platform.machine()}), tiny tokenizer: {samples:,} synthesised conversations, {tokens:,} tokens "
            f"(mean {tokens / samples:,.0f}, max {plain['tokens']['max_per_sample']:,} per sample). Rates are the "
            "fastest repeat; the ratio is the median over repeats of raw time / path time, each repeat running "
            "the three paths back to back.",
            "",
            "| path | samples/s | tokens/s | × raw tokenizer |",
            "|---|---:|---:|---:|",
            row("raw fast tokenizer (`encode_batch_fast`, rendered text)", "raw"),
            row("`data prepare` (parse, check, render, mask, write)", "plain"),
            row("`data prepare --pack` (+ first-fit decreasing)", "packed"),
            "",
            f"Real-token fraction at {PACK_LENGTH}: {packing['real_token_fraction']:.4f} packed into "
            f"{packing['rows']:,} rows (target ≥ 0.98); {unpacked:.4f} if every sample were padded to {PACK_LENGTH}.",
            "Targets: prepare ≥ 0.5 × raw tokenizer, ≥ 98% real tokens.",
            "",
        ]
    )


def update_docs(section: str) -> None:
    text = DOCS.read_text(encoding="utf-8") if DOCS.exists() else "# Benchmarks\n\n"
    pattern = re.compile(r"^## Data preparation\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    DOCS.write_text(text.rstrip() + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3, help="runs per path; the fastest counts")
    parser.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer dir (default: the tiny one)")
    parser.add_argument("--update-docs", action="store_true", help="rewrite the section in docs/benchmarks.md")
    args = parser.parse_args()
    section = run(args.conversations, args.repeats, args.tokenizer)
    print(section)
    if args.update_docs:
        update_docs(section)


if __name__ == "__main__":
    main()
