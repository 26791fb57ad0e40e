"""The serving contract: what must hold for an export served by vLLM to behave as the model was trained.

    results = run_contract(server, model_dir, served_name="glm45", adapter=Adapter(...))
    print(format_table(results))

Items, each a function returning a `CheckResult` with its numbers (`glm45-train serve --check` runs them all):
  (a) logprobs.py  /v1/completions prompt log-probs = transformers fp32 on the export (<= 1e-4; an fp32 server)
  (b) prompts.py   the chat endpoint's prompt token ids = our renderer's generation prompt, thinking on and off
  (c) parsers.py   vLLM's glm45 reasoning + tool parsers give back each trained turn's reasoning and tool calls
  (d) logprobs.py  an HF-PEFT adapter served with --enable-lora = the base with the adapter merged (<= 1e-4);
                   SKIP when no adapter is served
Cases come from chat data (cases.py; data/sample_distill.jsonl by default): system prompts, tools, multi-turn,
parallel and chained tool calls, reasoning given as a field and inline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from glm45_train.data.chat import load_chat_tokenizer
from glm45_train.serve.contract.cases import load_conversations, logprob_cases, prompt_cases, turn_cases
from glm45_train.serve.contract.logprobs import check_prompt_logprobs, load_reference
from glm45_train.serve.contract.parsers import check_parsers
from glm45_train.serve.contract.prompts import check_chat_prompts
from glm45_train.serve.contract.result import SKIP, CheckResult, all_hold, format_table
from glm45_train.serve.options import Adapter
from glm45_train.serve.server import VLLMServer

__all__ = ["CheckResult", "all_hold", "format_table", "run_contract"]

ADAPTER_TITLE = "LoRA adapter (--enable-lora) = merged, log-probs"


def run_contract(
    server: VLLMServer,
    model_dir: str | Path,
    *,
    served_name: str,
    adapter: Adapter | None = None,
    data: str | Path | None = None,
    reference: Any = None,
) -> list[CheckResult]:
    """Items (a)-(d) against a running server on `model_dir` (`reference`: transformers' fp32 model of it,
    loaded here when not given)."""
    conversations = load_conversations(data)
    tokenizer = load_chat_tokenizer(model_dir)
    sequences = logprob_cases(conversations, tokenizer)
    reference = reference if reference is not None else load_reference(model_dir)
    results = [
        check_prompt_logprobs(server, served_name, reference, sequences),
        check_chat_prompts(server, served_name, prompt_cases(conversations, tokenizer), tokenizer),
        check_parsers(model_dir, turn_cases(conversations, tokenizer)),
    ]
    if adapter is None:
        results.append(CheckResult("d", ADAPTER_TITLE, SKIP, "no adapter served (serve --adapter DIR)"))
        return results
    merged = load_reference(model_dir, adapter.directory)
    results.append(
        check_prompt_logprobs(
            server, adapter.name, merged, sequences, item="d", title=ADAPTER_TITLE, baseline_model=served_name
        )
    )
    return results
