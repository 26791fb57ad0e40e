"""The rollout engine on GPUs: SGLang's offline engine (`sglang.Engine`), an optional dependency (`[rl-gpu]`).

Notable (SGLang's source, python/sglang/srt/...; read at 0.5.x):
- Token ids in and out: `skip_tokenizer_init=True`, `generate(input_ids=..., sampling_params=[...],
  return_logprob=True)` (entrypoints/engine.py). A response's ids and log-probs are read from
  `meta_info["output_token_logprobs"]`, one `(logprob, token_id, text)` per sampled token. The stop token that
  ended it is among them (managers/schedule_batch.py `_check_token_based_finish`: finished_len includes it);
  the detokenizer's stop trimming touches text only, and `no_stop_trim` is set anyway.
- `finish_reason` is `{"type": "stop", "matched": id}` or `{"type": "length", ...}`. Length is checked first
  (`update_finish_state`), so a response whose last allowed token is a stop token reports "length": it counts
  as finished here. "abort", or "stop" on a string (SGLang's "NaN happened"), is an error.
- Log-probs: log_softmax(logits / temperature), before top-p (layers/logprob_processor.py,
  `OutputLogprobProcessor`): the protocol's quantity, unless the SGLANG_RETURN_ORIGINAL_LOGPROB env is set.
- Seeds: a request's `sampling_seed` is honoured only with `enable_deterministic_inference` (sampling/
  sampling_batch_info.py builds the seed tensor only then; layers/sampler.py's flashinfer path asserts it is
  None; deterministic mode switches to the pytorch sampler and batch-invariant kernels: slower, but a response
  depends on (weights, prompt, seed) only). With `n` > 1 the copies would share one seed, so a group of G is
  sent as G requests with seeds seed + j (as slime does). Without `deterministic` no seed is sent.
- Weights: `update_weights_from_tensor(named_tensors, flush_cache=...)` hands HF names to the model's
  `load_weights` (models/glm4_moe.py: q/k/v -> qkv_proj, gate/up -> gate_up_proj, experts through FusedMoE's
  expert mapping, shared experts fused by a rename, layers >= num_hidden_layers (MTP) skipped). It skips a
  name it does not know without a word, so every name and shape is checked here against the checkpoint's
  tensor list (model/hf_layout.py), and a missing tensor fails after the last. Tensors go in buckets of
  BUCKET_BYTES (held until sent: the iterator must not reuse their storage), serialised once per TP rank
  (CUDA IPC for GPU tensors): the caller must be on the engine's node; an engine spanning nodes is not
  supported here.
- Memory: `enable_memory_saver`. `sleep()` releases weights, KV cache and CUDA graphs
  (`release_memory_occupation`); `wake()` takes back all but the KV cache, resumed at the next `generate`,
  after the weight update (slime's order: a lower peak while the update runs).
- Started with `load_format="dummy"` from a directory holding config.json, generation_config.json and the
  tokenizer files but no weights (`prepare_model_dir`): the weights come from the first `update_weights`.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glm45_train.errors import UserError
from glm45_train.model.hf_config import Glm45Config
from glm45_train.rl.engines.model_files import WeightCheck, prepare_model_dir
from glm45_train.rl.rollout import Completion, Request, SamplingParams, by_request, engine_routing

INSTALL_HINT = (
    "rl.rollout.engine sglang needs SGLang: pip install 'glm45-train[rl-gpu]' (GPUs only); "
    "`rl.rollout.engine: hf` runs everywhere"
)
BUCKET_BYTES = 1 << 30  # weights per update_weights_from_tensor call
KV_CACHE_TAG = "kv_cache"  # sglang.srt.constants.GPU_MEMORY_TYPE_KV_CACHE
SEED_RANGE = 2**31  # sampling_seed was an int32 tensor in some SGLang 0.5 releases
MODEL_DIR_NAME = "sglang_model"


def import_sglang() -> Any:
    """The sglang module, or a UserError saying how to install it and what runs without it."""
    try:
        import sglang
    except ImportError as err:
        raise UserError(f"{INSTALL_HINT} ({err})") from None
    return sglang


def sampling_requests(
    requests: Sequence[Request], params: SamplingParams, seeded: bool
) -> tuple[list[list[int]], list[dict[str, Any]]]:
    """SGLang's `input_ids` and `sampling_params`: one entry per response, request by request, seed + j."""
    input_ids, sampling = [], []
    base = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_new_tokens": params.max_new_tokens,
        "stop_token_ids": list(params.stop_token_ids),
        "no_stop_trim": True,
    }
    for request in requests:
        for j in range(request.samples):
            input_ids.append(list(request.prompt_ids))
            seed = {"sampling_seed": (request.seed + j) % SEED_RANGE} if seeded else {}
            sampling.append({**base, **seed})
    return input_ids, sampling


def completion_from_output(
    output: Mapping[str, Any], stop_token_ids: Iterable[int], routing_of: tuple[int, Glm45Config] | None = None
) -> Completion:
    """One SGLang output dict -> a Completion (ids and log-probs from meta_info's output_token_logprobs); with
    `routing_of` (prompt length, model) also the routed experts SGLang returned (routing replay)."""
    meta = output["meta_info"]
    pairs = meta.get("output_token_logprobs")
    if pairs is None:
        raise ValueError("SGLang output without meta_info.output_token_logprobs (return_logprob was not set)")
    finish = meta.get("finish_reason") or {}
    kind, matched = finish.get("type"), finish.get("matched")
    if kind not in ("stop", "length"):
        raise RuntimeError(f"SGLang ended a response with finish_reason {finish!r}")
    ids = tuple(int(entry[1]) for entry in pairs)
    logprobs = tuple(float(entry[0]) for entry in pairs)
    if kind == "stop" and (not isinstance(matched, int) or not ids or ids[-1] != matched):
        raise RuntimeError(f"SGLang stopped on {matched!r}, not on the last response token ({ids[-1:]})")
    finished = kind == "stop" or (bool(ids) and ids[-1] in set(stop_token_ids))
    routing = None if routing_of is None else routed_experts(meta, routing_of[0] + len(ids) - 1, routing_of[1])
    return Completion(response_ids=ids, logprobs=logprobs, finished=finished, routing=routing)


def routed_experts(meta: Mapping[str, Any], tokens: int, hf: Glm45Config) -> np.ndarray:
    """`meta_info["routed_experts"]` (base64 of int32 [tokens run, layers, top-k], with `return_routed_experts`)
    -> a Completion's routing of `tokens` rows."""
    encoded = meta.get("routed_experts")
    if encoded is None:
        raise RuntimeError("SGLang returned no routed_experts (the engine needs enable_return_routed_experts)")
    flat = np.frombuffer(base64.b64decode(encoded), dtype=np.int32)
    top_k, moe_layers = hf.num_experts_per_tok, hf.num_hidden_layers - hf.first_k_dense_replace
    for layers in (hf.num_hidden_layers, moe_layers):  # every layer, or the MoE layers only
        if flat.size % (layers * top_k) == 0 and flat.size // (layers * top_k) >= tokens:
            routed = flat.reshape(-1, layers, top_k)
            break
    else:
        raise RuntimeError(f"SGLang's routed_experts hold {flat.size} ids: not {tokens} tokens x layers x {top_k}")
    return engine_routing(routed, tokens, hf.num_hidden_layers, hf.first_k_dense_replace, hf.n_routed_experts)


def group_completions(
    outputs: Sequence[Mapping[str, Any]],
    requests: Sequence[Request],
    stop_token_ids: Iterable[int],
    routing_of: Glm45Config | None = None,
) -> list[list[Completion]]:
    """SGLang's outputs (in input order, `sampling_requests`' layout) -> `request.samples` completions each."""
    expected = sum(request.samples for request in requests)
    if len(outputs) != expected:
        raise RuntimeError(f"SGLang returned {len(outputs)} outputs for {expected} responses")
    stops = set(stop_token_ids)
    prompts = [len(r.prompt_ids) for r in requests for _ in range(r.samples)]
    return by_request(
        [
            completion_from_output(output, stops, None if routing_of is None else (prompt, routing_of))
            for output, prompt in zip(outputs, prompts, strict=True)
        ],
        requests,
    )


class SGLangEngine:
    """RolloutEngine on `sglang.Engine`: rl.rollout.tp GPUs from `base_gpu_id` on this node."""

    def __init__(
        self,
        assets_dir: str | Path,
        rollout: Any,
        *,
        seed: int,
        run_dir: str | Path,
        base_gpu_id: int | None = None,
        deterministic: bool = True,
        record_routing: bool = False,
    ) -> None:
        """`rollout` is the recipe's rl.rollout section (tp, gpu_memory_fraction); `deterministic` makes every
        response depend on (weights, prompt, seed) only, at some speed (SGLang's deterministic inference).
        SGLang's Engine spawns its scheduler processes and sets this process's multiprocessing start method
        to spawn."""
        sglang = import_sglang()
        model_dir = prepare_model_dir(assets_dir, Path(run_dir) / MODEL_DIR_NAME)
        self.hf = Glm45Config.from_file(model_dir / "config.json")
        self.deterministic, self.record_routing = deterministic, record_routing
        routing = {"enable_return_routed_experts": True} if record_routing else {}  # routing replay (R3)
        self.engine = sglang.Engine(
            model_path=str(model_dir),
            tp_size=rollout.tp,
            mem_fraction_static=rollout.gpu_memory_fraction,
            load_format="dummy",  # random weights until the first update_weights
            random_seed=seed,
            base_gpu_id=torch.cuda.current_device() if base_gpu_id is None else base_gpu_id,
            enable_memory_saver=True,
            enable_deterministic_inference=deterministic,
            skip_tokenizer_init=True,
            **routing,
        )
        self.weights_asleep = self.kv_asleep = False
        self.weights_loaded = False  # dummy weights until update_weights; released ones are not kept

    def update_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.weights_asleep:
            raise RuntimeError("SGLangEngine.update_weights while asleep: call wake() first")
        check = WeightCheck(self.hf)
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        for name, tensor in tensors:
            if check.is_mtp(name):
                continue
            check.take(name, tuple(tensor.shape))
            bucket.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            if size >= BUCKET_BYTES:
                self.engine.update_weights_from_tensor(named_tensors=bucket, flush_cache=False)
                bucket, size = [], 0
        check.finish()
        if bucket:  # the last bucket flushes the prefix cache: its KV was computed with the old weights
            self.engine.update_weights_from_tensor(named_tensors=bucket, flush_cache=True)
        else:
            self.engine.flush_cache()
        self.weights_loaded = True

    def generate(self, requests: list[Request], params: SamplingParams) -> list[list[Completion]]:
        if self.weights_asleep or not self.weights_loaded:
            raise RuntimeError("SGLangEngine.generate needs wake() and then update_weights() (weights are not kept)")
        if not requests:
            return []
        if self.kv_asleep:
            self.engine.resume_memory_occupation(tags=[KV_CACHE_TAG])
            self.kv_asleep = False
        input_ids, sampling = sampling_requests(requests, params, seeded=self.deterministic)
        routing = {"return_routed_experts": True} if self.record_routing else {}
        outputs = self.engine.generate(input_ids=input_ids, sampling_params=sampling, return_logprob=True, **routing)
        outputs = outputs if isinstance(outputs, list) else [outputs]
        routing_of = self.hf if self.record_routing else None
        return group_completions(outputs, requests, params.stop_token_ids, routing_of)

    def sleep(self) -> None:
        if not self.weights_asleep:
            self.engine.release_memory_occupation(tags=_memory_tags())  # weights, KV cache, CUDA graphs
            self.weights_asleep = self.kv_asleep = True
            self.weights_loaded = False

    def wake(self) -> None:
        if self.weights_asleep:
            self.engine.resume_memory_occupation(tags=[tag for tag in _memory_tags() if tag != KV_CACHE_TAG])
            self.weights_asleep = False

    def shutdown(self) -> None:
        self.engine.shutdown()


def _memory_tags() -> list[str]:
    """SGLang's memory-saver tags: weights, KV cache and, where the version has it, CUDA graphs
    (sglang.srt.constants.GPU_MEMORY_ALL_TYPES; releases without it knew the first two only)."""
    try:
        from sglang.srt.constants import GPU_MEMORY_ALL_TYPES
    except ImportError:
        return ["weights", KV_CACHE_TAG]
    return list(GPU_MEMORY_ALL_TYPES)
