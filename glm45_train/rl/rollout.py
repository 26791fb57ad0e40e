"""What a rollout engine is: given prompt token ids, sample responses and their log-probs; take new weights.

Notable:
- Token ids in, token ids out: prompts are rendered once (rl/prompts.py, the data renderer) and the ids the
  engine sampled are the ids trained on; nothing is re-tokenised between rollout and training.
- `logprobs[i]` is log p(response_ids[i] | prefix) under the distribution sampled from: logits / temperature,
  before top-p filtering (what SGLang and vLLM report). The trainer computes the same quantity from the Megatron
  model; the two agree at fp32 rounding on CPU (tests/test_rl_engine.py) and their gap is logged every step.
- The stop token that ended a response is part of it (the policy learns to stop); `finished` is False when
  the response ran into max_new_tokens.
- Every request carries its own seed: a response depends on (weights, prompt, seed) only, not on which rank or
  batch it was sampled in, so a resumed run samples exactly what the uninterrupted run sampled.
- With `rl.routing_replay: rollout` a completion also carries the experts the engine routed every token to
  (`routing`), in HF layer order of the MoE layers: the trainer replays them (rl/routing_replay.py).
- Agent rollouts (rl/agent) chain turns through the same `generate`: a completion then holds the whole
  trajectory, observations included, with `mask` marking the tokens the policy sampled.
- Weights arrive as HF-named full tensors (rl/weight_sync.py, through the converters' mapping table), the
  names `export --to-hf` writes: engines load them as they would load an exported checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_p: float
    max_new_tokens: int
    stop_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    samples: int  # responses wanted for this prompt (the group size)
    seed: int  # the first response's seed; response j uses seed + j


@dataclass(frozen=True)
class Completion:
    response_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  # one per response token, at the sampling temperature
    finished: bool  # ended on a stop token (included in response_ids)
    # with routing replay (rl/routing_replay.py): the experts each MoE layer chose for every token the engine ran,
    # the prompt and every response token but the last: [prompt + response - 1, MoE layers, top-k], sorted per token
    routing: np.ndarray | None = field(default=None, compare=False)
    # agent rollouts (rl/agent/episodes.py): which response tokens the policy sampled (False: an observation the
    # environment returned, no loss, log-prob 0), and the episode as the rewards see it
    mask: tuple[bool, ...] | None = None
    trajectory: Any = field(default=None, compare=False)


def routing_dtype(experts: int) -> type:
    """The smallest integer type holding an expert id (GLM-4.5's 160 and Air's 128 experts: one byte)."""
    return np.uint8 if experts <= 256 else np.int16


def engine_routing(routed: np.ndarray, tokens: int, num_layers: int, first_moe_layer: int, experts: int) -> np.ndarray:
    """An engine's routed-experts record ([tokens run, layers, top-k], every layer or the MoE layers only: vLLM's
    `routed_experts`, SGLang's decoded `meta_info`) as a Completion's `routing`: the MoE layers, `tokens` rows
    (prompt + response - 1), sorted per token; an error naming the shapes when it is not that."""
    moe_layers = num_layers - first_moe_layer
    if routed.ndim != 3 or routed.shape[0] < tokens or routed.shape[1] not in (num_layers, moe_layers):
        raise RuntimeError(
            f"the engine's routed experts have shape {routed.shape}; expected [>= {tokens} tokens, "
            f"{num_layers} or {moe_layers} layers, top-k]"
        )
    if routed.shape[1] == num_layers and num_layers != moe_layers:
        routed = routed[:, first_moe_layer:]
    return np.sort(routed[:tokens], axis=-1).astype(routing_dtype(experts))


def by_request(completions: Sequence[Completion], requests: Sequence[Request]) -> list[list[Completion]]:
    """Completions listed response by response, request after request -> `request.samples` of them per request."""
    expected = sum(request.samples for request in requests)
    if len(completions) != expected:
        raise RuntimeError(f"the engine returned {len(completions)} completions for {expected} responses")
    out, start = [], 0
    for request in requests:
        out.append(list(completions[start : start + request.samples]))
        start += request.samples
    return out


class RolloutEngine(Protocol):
    """An inference engine that samples with the current policy's weights."""

    def update_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the weights with these HF-named full tensors (every tensor of the model, once)."""
        ...

    def generate(self, requests: list[Request], params: SamplingParams) -> list[list[Completion]]:
        """`request.samples` completions per request, in request order."""
        ...

    def sleep(self) -> None:
        """Give back accelerator memory while the trainer runs (colocated engines); no-op elsewhere."""
        ...

    def wake(self) -> None:
        """Take the memory again before the next weight update and rollout."""
        ...

    def shutdown(self) -> None: ...
