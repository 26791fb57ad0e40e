"""Rows → one summary line per model × set × thinking mode: printed as a table, saved as JSON, plotted.

Columns: `pass@1` (the share of correct responses, averaged over prompts), `pass@k` with k = samples per prompt
(the unbiased estimator 1 - C(n - c, k) / C(n, k) of Chen et al. 2021, here with k = n: a prompt passes when any
of its responses is correct), the mean score, mean and p90 response tokens, mean reasoning tokens, the share of
responses that think (the point of a non-thinking fine-tune: near 0 with thinking off), the share cut at the
token limit, tool-call validity (valid calls among responses that call; blank when none does) and scorer
failures (samples the scorer could not judge; left out of pass@1 and the mean score).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class SummaryLine:
    model: str
    set: str
    thinking: str  # on | off
    scorer: str
    prompts: int
    samples: int  # responses per prompt (k)
    pass_at_1: float
    pass_at_k: float
    mean_score: float
    mean_tokens: float
    p90_tokens: float
    mean_reasoning_tokens: float
    thinks: float
    truncated: float
    tool_call_validity: float | None
    scorer_failures: int


def summarize(rows: Sequence[dict[str, Any]], *, model: str, set_label: str, scorer: str, thinking: str,
              samples: int) -> SummaryLine:  # fmt: skip
    """The line for one model × set × mode (`rows`: every response of it)."""
    judged = [row for row in rows if row["correct"] is not None]
    by_prompt: dict[int, list[bool]] = {}
    for row in judged:
        by_prompt.setdefault(row["index"], []).append(bool(row["correct"]))
    tokens = np.array([row["tokens"] for row in rows], dtype=float)
    calling = [row for row in rows if row["tool_calls"] or row["tool_call_problems"]]
    return SummaryLine(
        model=model,
        set=set_label,
        thinking=thinking,
        scorer=scorer,
        prompts=len({row["index"] for row in rows}),
        samples=samples,
        pass_at_1=_mean([sum(c) / len(c) for c in by_prompt.values()]),
        pass_at_k=_mean([pass_at_k(len(c), sum(c), samples) for c in by_prompt.values()]),
        mean_score=_mean([row["score"] for row in judged]),
        mean_tokens=float(tokens.mean()) if len(tokens) else math.nan,
        p90_tokens=float(np.percentile(tokens, 90)) if len(tokens) else math.nan,
        mean_reasoning_tokens=_mean([row["reasoning_tokens"] for row in rows]),
        thinks=_mean([float(row["thinks"]) for row in rows]),
        truncated=_mean([float(not row["finished"]) for row in rows]),
        tool_call_validity=_mean([float(not row["tool_call_problems"]) for row in calling]) if calling else None,
        scorer_failures=len(rows) - len(judged),
    )


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that k of the n responses drawn without replacement hold at least one of the c correct ones."""
    if k > n:
        k = n
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


COLUMNS = (
    ("model", "model", "{}"), ("set", "set", "{}"), ("thinking", "think", "{}"), ("pass_at_1", "pass@1", "{:.3f}"),
    ("pass_at_k", "pass@k", "{:.3f}"), ("mean_score", "score", "{:.3f}"), ("mean_tokens", "tokens", "{:.1f}"),
    ("p90_tokens", "p90", "{:.0f}"), ("mean_reasoning_tokens", "reason", "{:.1f}"), ("thinks", "thinks", "{:.2f}"),
    ("truncated", "trunc", "{:.2f}"), ("tool_call_validity", "tools ok", "{:.2f}"), ("scorer_failures", "fail", "{}"),
)  # fmt: skip


def format_table(lines: Sequence[SummaryLine]) -> str:
    """A fixed-width table, one row per line (k is the samples column's value: pass@k is pass@1 when k = 1)."""
    cells = [[title for _, title, _ in COLUMNS]]
    for line in lines:
        values = asdict(line)
        cells.append([_cell(values[key], form) for key, _, form in COLUMNS])
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in cells]
    ks = sorted({line.samples for line in lines})
    return "\n".join([*text, f"(k = {', '.join(map(str, ks))} responses per prompt; tokens per response)"])


def _cell(value: Any, form: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return form.format(value)


def write_summary(lines: Sequence[SummaryLine], extra: dict[str, Any], path: Path) -> None:
    payload = {"summary": [_json_safe(asdict(line)) for line in lines], **extra}
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _json_safe(values: dict[str, Any]) -> dict[str, Any]:
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in values.items()}


def plot_summary(lines: Sequence[SummaryLine], out_png: Path) -> Path:
    """pass@1 against mean response tokens: a point per model × set × mode, a marker per mode, a colour per
    model (the non-thinking fine-tune's promise: the same height, further left)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(line.model for line in lines))
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for line in lines:
        colour = colours(models.index(line.model) % 10)
        marker = "o" if line.thinking == "off" else "^"
        ax.scatter(line.mean_tokens, _or_zero(line.pass_at_1), color=colour, marker=marker, s=60)
        ax.annotate(f"{line.model} · {line.set} · think {line.thinking}", (line.mean_tokens, _or_zero(line.pass_at_1)),
                    fontsize=7, xytext=(4, 4), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("mean response tokens")
    ax.set_ylabel("pass@1")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title("accuracy against length (o thinking off, ^ thinking on)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def _or_zero(value: float) -> float:
    return 0.0 if math.isnan(value) else value
