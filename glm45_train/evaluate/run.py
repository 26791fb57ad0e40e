"""`evaluate`: every model × set × thinking mode sampled, scored and summarised; the output written as a whole.

Output directory (written in a staging folder, published complete; nothing half-written keeps the final name):
  samples.jsonl   one row per response (responses.py's fields, plus model, set, thinking)
  summary.json    the summary lines, each set's dropped records (file:line, reason) and the options
  summary.png     pass@1 against mean response tokens
  exports/        runs exported on the fly;  vllm_*.log  the servers' logs

Everything that can be checked is checked before the first engine starts: the sets (read, scorers resolved),
the models (exports checked, runs exported), the options. Prompts are rendered by the data renderer (thinking off
ends with the empty think block), the same ids for every engine; request i of a set has seed `seed + i * k`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from glm45_train.convert.torch_dist.directory import check_output_dir, fresh_staging_dir, publish
from glm45_train.data.chat import load_chat_tokenizer
from glm45_train.errors import UserError
from glm45_train.evaluate.engines import EngineOptions, EvalEngine, engine_kind, open_engine
from glm45_train.evaluate.models import EvalModel, resolve_models, tokenizer_dir
from glm45_train.evaluate.responses import score_group
from glm45_train.evaluate.sets import EvalSet, load_eval_sets
from glm45_train.evaluate.summary import SummaryLine, format_table, plot_summary, summarize, write_summary
from glm45_train.model.tokenizer import stop_token_ids
from glm45_train.rl.prompts import render_prompts
from glm45_train.rl.rollout import Request, SamplingParams

MODES = {"on": (True,), "off": (False,), "both": (False, True)}
CHUNK = {"hf": 64, "vllm": 256}  # responses per generate call: the progress bar's step (vLLM batches within it)


@dataclass(frozen=True)
class EvalOptions:
    thinking: str = "off"  # on | off | both
    samples: int = 1  # k responses per prompt
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0
    engine: EngineOptions = field(default_factory=EngineOptions)

    def check(self) -> None:
        if self.thinking not in MODES:
            raise UserError(f"--thinking {self.thinking!r}: expected on, off or both")
        if self.samples < 1 or self.max_new_tokens < 1:
            raise UserError("--samples and --max-new-tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UserError("--temperature must be >= 0 and --top-p in (0, 1]")
        if self.samples > 1 and self.temperature == 0:
            raise UserError("--samples > 1 needs --temperature > 0 (greedy responses to a prompt are all the same)")


def evaluate(
    model_specs: Sequence[str], set_specs: Sequence[str], output_dir: str | Path, options: EvalOptions, *,
    scorers: Sequence[str] | None = None, tokenizer: str | Path | None = None, overwrite: bool = False,
    progress: bool = True,
) -> list[SummaryLine]:  # fmt: skip
    options.check()
    out = Path(output_dir)
    check_output_dir(out, overwrite)
    sets = load_eval_sets(set_specs, scorers)
    for eval_set in sets:
        print(set_report(eval_set), flush=True)
    staging = fresh_staging_dir(out)
    try:
        models = resolve_models(model_specs, staging / "exports")
        kind = engine_kind(options.engine.kind, models)
        fallback_tokenizer = tokenizer_dir(models, tokenizer)
        longest = _longest_prompt(sets, fallback_tokenizer, options)
        engine_options = replace(options.engine, max_model_len=longest + options.max_new_tokens)
        lines: list[SummaryLine] = []
        with open(staging / "samples.jsonl", "w", encoding="utf-8") as samples_file:
            for model in models:
                model_tokenizer = model.directory or fallback_tokenizer
                engine = open_engine(model, kind, engine_options, staging)
                try:
                    for eval_set in sets:
                        for thinking in MODES[options.thinking]:
                            rows = _run_one(engine, kind, eval_set, model_tokenizer, thinking, options, progress)
                            header = {"model": model.label, "set": eval_set.label, "thinking": _mode(thinking)}
                            for row in rows:
                                samples_file.write(json.dumps({**header, **row}, ensure_ascii=False) + "\n")
                            lines.append(_line(rows, model, eval_set, thinking, options))
                finally:
                    engine.shutdown()
        details = _details(models, sets, kind, options)
        details["models"] = {label: where.replace(str(staging), str(out)) for label, where in details["models"].items()}
        write_summary(lines, details, staging / "summary.json")
        plot_summary(lines, staging / "summary.png")
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, out)
    print(format_table(lines))
    print(f"eval: {len(lines)} lines -> {out / 'summary.json'}, {out / 'samples.jsonl'}, {out / 'summary.png'}")
    return lines


def _run_one(
    engine: EvalEngine, kind: str, eval_set: EvalSet, tokenizer_path: Path, thinking: bool, options: EvalOptions,
    progress: bool,
) -> list[dict[str, Any]]:  # fmt: skip
    from tqdm import tqdm

    tokenizer = load_chat_tokenizer(tokenizer_path)
    prompt_ids = render_prompts(eval_set.prompts.records, tokenizer, thinking=thinking)
    k = options.samples
    requests = [Request(tuple(ids), k, options.seed + i * k) for i, ids in enumerate(prompt_ids)]
    params = SamplingParams(options.temperature, options.top_p, options.max_new_tokens,
                            tuple(stop_token_ids(tokenizer_path)))  # fmt: skip
    per_call = max(1, CHUNK[kind] // k)
    completions = []
    title = f"{eval_set.label} · think {_mode(thinking)}"
    with tqdm(total=len(requests) * k, desc=title, unit="resp", disable=not progress) as bar:
        for start in range(0, len(requests), per_call):
            chunk = requests[start : start + per_call]
            completions += engine.generate(chunk, params)
            bar.update(len(chunk) * k)
    return score_group(eval_set, range(len(requests)), completions, tokenizer, thinking=thinking)


def _line(rows, model: EvalModel, eval_set: EvalSet, thinking: bool, options: EvalOptions) -> SummaryLine:
    return summarize(rows, model=model.label, set_label=eval_set.label, scorer=eval_set.scorer_name,
                     thinking=_mode(thinking), samples=options.samples)  # fmt: skip


def _mode(thinking: bool) -> str:
    return "on" if thinking else "off"


def _longest_prompt(sets: Sequence[EvalSet], tokenizer_path: Path, options: EvalOptions) -> int:
    tokenizer = load_chat_tokenizer(tokenizer_path)
    return max(
        len(ids)
        for eval_set in sets
        for thinking in MODES[options.thinking]
        for ids in render_prompts(eval_set.prompts.records, tokenizer, thinking=thinking)
    )


def set_report(eval_set: EvalSet) -> str:
    """One line per set: records read and kept, and the dropped ones by reason with the first's file:line."""
    report = eval_set.prompts.report
    text = (
        f"eval: set {eval_set.label} ({eval_set.scorer_name}): {report.prompts_kept} of {report.records_read} records"
    )
    if report.problems:
        first = report.problems[0]
        where = ":".join(str(v) for k, v in first.items() if k not in ("reason", "action", "detail"))
        reasons = ", ".join(f"{reason} {n}" for reason, n in report.dropped_by_reason().items())
        text += f"; dropped {len(report.problems)} ({reasons}; first at {where}: {first['detail']})"
    return text


def _details(models: Sequence[EvalModel], sets: Sequence[EvalSet], kind: str, options: EvalOptions) -> dict:
    return {
        "models": {model.label: str(model) for model in models},
        "sets": {s.label: {"source": s.source, "scorer": s.scorer_name, **s.prompts.report.to_json()} for s in sets},
        "engine": kind,
        "options": asdict(options),
    }
