"""Eval throughput on CPU: the vllm and hf engines of `glm45-train eval` on the same prompts, in one run.

    .venv/bin/python bench/eval.py [--prompts 96] [--max-new-tokens 64] [--dtype fp32]

Notable:
- The same tiny GLM-4.5-Air (make-tiny), the same prompt set (data/rl_prompts_sample.jsonl repeated to
  `--prompts`), thinking off, greedy decoding; each engine is opened once (vLLM: a server on the export, its
  start timed apart) and then samples every prompt through evaluate/run.py's own `_run_one` (chunks, scoring).
- Rates are response tokens per second of generation + scoring, engine start excluded; the vLLM server's start
  is reported beside it. Greedy responses are compared: in fp32 the two engines answer alike.
- Figures go in docs/benchmarks.md by hand (the section says which machine and load).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from glm45_train.evaluate.engines import EngineOptions, open_engine
from glm45_train.evaluate.models import EvalModel
from glm45_train.evaluate.run import EvalOptions, _run_one
from glm45_train.evaluate.sets import load_eval_sets
from glm45_train.model.tiny import make_tiny

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    model_dir = make_tiny(work / "tiny-air", preset="air", seed=0)
    lines = (REPO / "data/rl_prompts_sample.jsonl").read_text().splitlines()
    data = work / "prompts.jsonl"
    data.write_text("\n".join((lines * (args.prompts // len(lines) + 1))[: args.prompts]) + "\n")
    eval_set = load_eval_sets([str(data)], ["exact"])[0]
    options = EvalOptions(max_new_tokens=args.max_new_tokens)
    engine_options = EngineOptions(dtype=args.dtype, max_model_len=512 + args.max_new_tokens)
    model = EvalModel("tiny-air", model_dir)
    results, responses = {}, {}
    for kind in ("vllm", "hf"):
        started = time.perf_counter()
        engine = open_engine(model, kind, engine_options, work)
        opened = time.perf_counter()
        rows = _run_one(engine, kind, eval_set, model_dir, False, options, progress=False)
        done = time.perf_counter()
        engine.shutdown()
        tokens = sum(row["tokens"] for row in rows)
        results[kind] = {"start_s": opened - started, "eval_s": done - opened, "tokens": tokens,
                         "tokens_per_s": tokens / (done - opened)}  # fmt: skip
        responses[kind] = [row["response"] for row in rows]
    same = sum(a == b for a, b in zip(responses["vllm"], responses["hf"], strict=True))
    print(json.dumps(results, indent=2))
    ratio = results["vllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
    print(f"vllm / hf: {ratio:.2f}x tokens per second; identical greedy responses: {same} of {len(rows)}")


if __name__ == "__main__":
    main()
