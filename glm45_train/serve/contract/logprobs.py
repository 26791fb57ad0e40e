"""Items (a) and (d): the server's prompt log-probs against transformers' on the same token ids.

Notable:
- Served: `/v1/completions` with the prompt as token ids, `echo: true, logprobs: 0, max_tokens: 1`; the answer's
  `token_logprobs` hold one entry per prompt token (the first is null: nothing predicts it) and one for the
  sampled token, which is dropped.
- Reference: transformers' `AutoModelForCausalLM` in fp32 on the export (for (d): the base with the HF-PEFT
  adapter merged by peft, or any model the caller hands in, e.g. the merged export), log_softmax of the logits
  at each position gathered at the next token.
- Pass: max |served - reference| <= 1e-4 over every token, which only an fp32 server can meet (bf16 differs
  by ~0.01 on average). A failure names the sequence and the position of the largest difference.
- (d) also reports how far the adapter moves the served log-probs from the base's: a tiny number there would
  make the match vacuous (an adapter vLLM ignored would pass).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from glm45_train.serve.contract.cases import LogprobCase
from glm45_train.serve.contract.result import FAIL, PASS, CheckResult
from glm45_train.serve.server import ServerError, VLLMServer

LOGPROB_TOLERANCE = 1e-4


def served_prompt_logprobs(server: VLLMServer, model: str, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, as the server computes it (fp64 from its JSON)."""
    body = {"model": model, "prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 1, "temperature": 0.0}
    answer = server.post("/v1/completions", body)
    values = answer["choices"][0]["logprobs"]["token_logprobs"]
    if len(values) < len(ids) or values[0] is not None:
        raise ServerError(f"{server.url}: echo returned {len(values)} log-probs for a {len(ids)}-token prompt")
    return torch.tensor(values[1 : len(ids)], dtype=torch.float64)


@torch.no_grad()
def reference_prompt_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    """The same quantity from a transformers causal LM."""
    input_ids = torch.tensor([ids])
    logits = model(input_ids).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, input_ids[0, 1:, None])[:, 0].double()


def load_reference(model_dir: str | Path, adapter_dir: str | Path | None = None) -> Any:
    """transformers' fp32 model of an export; with an HF-PEFT adapter merged into it by peft."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return model.eval()


def check_prompt_logprobs(
    server: VLLMServer,
    model: str,
    reference: Any,
    cases: Sequence[LogprobCase],
    *,
    item: str = "a",
    title: str = "/v1/completions prompt log-probs = transformers fp32",
    baseline_model: str | None = None,
) -> CheckResult:
    """Every case's served log-probs against the reference's; with `baseline_model`, also the largest change
    from that served model (the adapter's effect, item d)."""
    worst, where, tokens, effect = 0.0, "", 0, 0.0
    for case in cases:
        served = served_prompt_logprobs(server, model, case.ids)
        diff = (served - reference_prompt_logprobs(reference, case.ids)).abs().nan_to_num(nan=float("inf"))
        tokens += diff.numel()
        if diff.numel() and diff.max().item() > worst:
            position = int(diff.argmax()) + 1
            worst, where = diff.max().item(), f"{case.origin} token {position} (id {case.ids[position]})"
        if baseline_model is not None:
            baseline = served_prompt_logprobs(server, baseline_model, case.ids)
            effect = max(effect, (served - baseline).abs().max().item())
    numbers = f"{len(cases)} sequences, {tokens} tokens, max |diff| {worst:.1e} (tolerance {LOGPROB_TOLERANCE:.0e})"
    if baseline_model is not None:
        numbers += f"; the adapter moves log-probs by up to {effect:.2g}"
    passed = tokens > 0 and worst <= LOGPROB_TOLERANCE
    detail = "" if passed else f"largest difference at {where}" if where else "no tokens to compare"
    measured = {"max_abs_diff": worst, "tokens": float(tokens)}
    if baseline_model is not None:
        measured["adapter_effect"] = effect
    return CheckResult(item, title, PASS if passed else FAIL, numbers, detail, measured)
