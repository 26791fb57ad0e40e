"""The rollout engine that runs everywhere: transformers' Glm4MoeForCausalLM on the policy's live weights.

Notable:
- Built once from the model's config.json (no weights read: they arrive through `update_weights`, the same
  HF-named tensors an SGLang engine is fed, so this engine also exercises the weight sync on CPU).
  transformers >= 5 fuses each MoE layer's experts (`mlp.experts.gate_up_proj` [E, 2I, H], `down_proj`
  [E, H, I]); the per-expert HF tensors are stacked into them as they arrive, and an update that leaves a
  parameter unset, or names one the model lacks, is refused by name.
- Sampling, up to MAX_ROWS responses together: the batch's prompts run once, left-padded (attention mask and
  position ids say where each starts), and each prompt's KV cache is copied to every response of its group
  (GRPO's G responses share a prompt: G - 1 prefills saved); then one token per step for every unfinished
  response; finished responses leave the batch (their cache rows dropped).
- Routing record (`record_routing`, for rl.routing_replay): a forward hook on every MoE layer's router keeps the
  experts it chose; the prompt's rows are copied to each response of its group, each decoding step appends one
  row per response still running (rl/rollout.py `Completion.routing`).
- Each response has its own seeded `torch.Generator`; log-probs are log_softmax(logits / temperature) of the
  sampled token in fp32, before top-p (what the trainer recomputes); top-p keeps the smallest set of tokens
  whose probability reaches p (the most likely token always).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glm45_train.errors import UserError
from glm45_train.rl.rollout import Completion, Request, SamplingParams, by_request, routing_dtype

MAX_ROWS = 64  # responses sampled together (a batch of prompts, left-padded)
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


def model_assets_dir(source: str | Path) -> Path:
    """The directory holding the model's config.json: an HF checkpoint, or a converted one's hf_assets/."""
    path = Path(source)
    for candidate in (path, path / "hf_assets"):
        if (candidate / "config.json").is_file():
            return candidate
    raise UserError(f"{path}: no config.json here or in hf_assets/ (an HF or converted checkpoint?)")


class HFEngine:
    """RolloutEngine on transformers (CPU, or one GPU)."""

    def __init__(
        self, assets_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu", record_routing=False
    ) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(assets_dir)
        with torch.device(device):
            self.model: Any = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        self.config, self.device, self.dtype = config, device, dtype
        # the KV cache's name in and out of the model: `past_key_values` up to transformers 5.19 (which vLLM's CPU
        # build pins), `cache` in later 5.x releases
        forward = inspect.signature(type(self.model).forward).parameters
        self.cache_argument = "past_key_values" if "past_key_values" in forward else "cache"
        self.params = dict(self.model.named_parameters())
        self.params.update(
            (name, buffer) for name, buffer in self.model.named_buffers() if name.endswith("e_score_correction_bias")
        )
        self.loaded = False
        self.router_choices: list[torch.Tensor] | None = None  # per MoE layer, the last forward's [tokens, top-k]
        if record_routing:
            self._record_routing()

    def _record_routing(self) -> None:
        moe_layers = range(self.config.first_k_dense_replace, self.config.num_hidden_layers)
        self.router_choices = [torch.empty(0)] * len(moe_layers)
        self.routing_dtype = routing_dtype(self.config.n_routed_experts)

        def keep(position: int):
            def hook(_module, _inputs, output) -> None:
                self.router_choices[position] = output[2].sort(dim=-1).values.cpu()  # type: ignore[index]

            return hook

        for position, layer in enumerate(moe_layers):
            self.model.model.layers[layer].mlp.gate.register_forward_hook(keep(position))

    def _routed(self, rows: int) -> np.ndarray | None:
        """The last forward's choices as [rows, tokens per row, MoE layers, top-k], or None when not recording."""
        if self.router_choices is None:
            return None
        stacked = torch.stack(self.router_choices, dim=1)  # [rows x tokens, layers, k]
        return stacked.view(rows, -1, *stacked.shape[1:]).numpy().astype(self.routing_dtype)

    # -- weights --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def update_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        unset = set(self.params)
        expert_parts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._experts_done: dict[int, set[int]] = {}
        for name, tensor in tensors:
            if self._ignored(name):
                continue
            expert = _EXPERT.match(name)
            if expert:
                layer, index, part = int(expert[1]), int(expert[2]), expert[3]
                self._expert_part(layer, index, part, tensor, expert_parts, unset)
                continue
            if name not in self.params:
                raise UserError(f"weight update: {name} is not a tensor of {type(self.model).__name__}")
            self._copy(name, self.params[name], tensor)
            unset.discard(name)
        if expert_parts:
            layer, index = next(iter(expert_parts))
            raise UserError(f"weight update: expert {index} of layer {layer} lacks gate, up or down_proj")
        if unset:
            raise UserError(f"weight update left {len(unset)} tensor(s) unset, e.g. {sorted(unset)[:3]}")
        self.loaded = True

    def _ignored(self, name: str) -> bool:
        """MTP layers (index >= num_hidden_layers): transformers does not build them."""
        layer = re.match(r"^model\.layers\.(\d+)\.", name)
        return layer is not None and int(layer[1]) >= self.config.num_hidden_layers

    def _expert_part(self, layer, index, part, tensor, pending, unset) -> None:
        parts = pending.setdefault((layer, index), {})
        parts[part] = tensor
        if len(parts) < 3:
            return
        del pending[(layer, index)]
        prefix = f"model.layers.{layer}.mlp.experts."
        gate_up = torch.cat([parts["gate"], parts["up"]])
        self._copy(f"{prefix}{index}.gate/up_proj", self.params[prefix + "gate_up_proj"][index], gate_up)
        self._copy(f"{prefix}{index}.down_proj", self.params[prefix + "down_proj"][index], parts["down"])
        done = self._experts_done.setdefault(layer, set())
        done.add(index)
        if len(done) == self.config.n_routed_experts:
            unset.discard(prefix + "gate_up_proj")
            unset.discard(prefix + "down_proj")

    @staticmethod
    def _copy(name: str, target: torch.Tensor, tensor: torch.Tensor) -> None:
        if tuple(target.shape) != tuple(tensor.shape):
            raise UserError(f"weight update: {name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
        target.copy_(tensor)

    # -- sampling -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, requests: list[Request], params: SamplingParams) -> list[list[Completion]]:
        if not self.loaded:
            raise RuntimeError("HFEngine.generate before update_weights: the engine has no weights yet")
        per_batch = max(1, MAX_ROWS // max(r.samples for r in requests))  # MAX_ROWS responses at most
        out: list[list[Completion]] = []
        for start in range(0, len(requests), per_batch):
            out.extend(self._batch(requests[start : start + per_batch], params))
        return out

    def _prefill(self, requests: list[Request]) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor, list]:
        """Every prompt once (left-padded), its cache copied to each response: (logits, cache, mask, next positions,
        and per response the list of its routing rows so far)."""
        longest = max(len(r.prompt_ids) for r in requests)
        ids = torch.zeros(len(requests), longest, dtype=torch.long)
        mask = torch.zeros(len(requests), longest, dtype=torch.long)
        for row, request in enumerate(requests):
            ids[row, longest - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            mask[row, longest - len(request.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        rows = torch.tensor([row for row, r in enumerate(requests) for _ in range(r.samples)], device=self.device)
        cache = getattr(out, self.cache_argument)
        cache.batch_select_indices(rows)
        routed = self._routed(len(requests))
        routing = [
            [] if routed is None else [routed[row, longest - len(r.prompt_ids) :]]
            for row, r in enumerate(requests)
            for _ in range(r.samples)
        ]
        return out.logits[rows, -1].float(), cache, mask[rows], positions[rows, -1] + 1, routing

    def _batch(self, requests: list[Request], params: SamplingParams) -> list[list[Completion]]:
        logits, cache, mask, position, routing = self._prefill(requests)
        generators = [_generator(r.seed + j) for r in requests for j in range(r.samples)]
        ids: list[list[int]] = [[] for _ in generators]
        logprobs: list[list[float]] = [[] for _ in generators]
        finished = [False] * len(generators)
        active, stop = list(range(len(generators))), set(params.stop_token_ids)
        for step in range(params.max_new_tokens):
            tokens, token_logprobs = sample(logits, params, [generators[j] for j in active])
            still = []
            for row, j in enumerate(active):
                ids[j].append(int(tokens[row]))
                logprobs[j].append(float(token_logprobs[row]))
                finished[j] = ids[j][-1] in stop
                if not finished[j]:
                    still.append(row)
            if not still or step == params.max_new_tokens - 1:
                break
            if len(still) < len(active):  # finished responses leave the batch
                keep = torch.tensor(still, device=self.device)
                cache.batch_select_indices(keep)
                mask, position, tokens = mask[keep], position[keep], tokens[keep]
            active = [active[row] for row in still]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            logits = (
                self.model(
                    input_ids=tokens.view(-1, 1),
                    attention_mask=mask,
                    position_ids=position.view(-1, 1),
                    use_cache=True,
                    **{self.cache_argument: cache},
                )
                .logits[:, -1]
                .float()
            )
            position = position + 1
            routed = self._routed(len(active))
            for row, j in enumerate(active if routed is not None else ()):
                routing[j].append(routed[row])  # type: ignore[index]
        completions = [
            Completion(tuple(i), tuple(lp), f, np.concatenate(r) if r else None)
            for i, lp, f, r in zip(ids, logprobs, finished, routing, strict=True)
        ]
        return by_request(completions, requests)

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    def shutdown(self) -> None:
        self.model = None


def _generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed % 2**63)
    return generator


def sample(
    logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token per row, its log-prob at the temperature) from fp32 logits [rows, vocab], one generator per row.
    Temperature 0 is greedy decoding: the most likely token (the first of equals, as torch.argmax and vLLM take
    it) and its log-prob at temperature 1."""
    if params.temperature == 0:
        logp = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
        return tokens, logp.gather(-1, tokens[:, None])[:, 0]
    logp = torch.log_softmax(logits / params.temperature, dim=-1)
    probs = logp.exp()
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p  # keeps the first token always
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    tokens = torch.stack(
        [torch.multinomial(probs[row], 1, generator=generator)[0] for row, generator in enumerate(generators)]
    )
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]
