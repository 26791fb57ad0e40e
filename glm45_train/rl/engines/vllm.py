"""The vLLM rollout engine, in two placements with one behaviour: in-process (vLLM's offline `LLM`, colocated
with the trainer) and server (a `vllm serve` process the run starts, or a running one at a URL).

Notable (vLLM 0.32's source, read and measured; docs/architecture.md shows how the engines share the sync):
- Started from a weightless model directory (model_files.prepare_model_dir, `load_format="dummy"`): the first
  `update_weights` brings the policy. Updates: the HF-named stream checked and written as bucket files
  (weight_files.py) -> the worker's layerwise reload + the CPU expert repack (serve/vllm_worker.py, through
  `collective_rpc`) -> the prefix cache reset (its KV was computed with the old weights and survives a reload).
  The run then verifies the engine on a probe (rl/probe.py); a skipped repack or reset fails that check.
- Sampling: one vLLM request per response with `seed = request.seed + j` (a response depends on weights, prompt
  and seed only); `logprobs_mode="processed_logprobs"`, so the reported log-prob of a sampled token is
  log_softmax(logits / temperature), the trainer's quantity. vLLM applies top-p before that softmax, so with
  top_p < 1 it would report log-probs renormalised over the nucleus: the recipe check refuses top_p < 1 here.
  The stop token that ended a response is part of its ids (vLLM keeps it in `token_ids`).
- CPU: eager mode without chunked prefill (runtime/vllm_cpu.py row 4), a KV cache of `rl.rollout.cpu_kv_cache_gib`;
  engine processes start without torchrun's variables, each on its own core (row 3).
  GPUs: compiled, `gpu_memory_fraction` of each GPU, `rl.rollout.tp` GPUs per engine.
- Server placement: requests go out concurrently (a thread pool), one HTTP call per response; weight updates
  and the cache reset use the dev-mode endpoints (`/collective_rpc`, `/reset_prefix_cache`), so a server the run
  did not start must run with VLLM_SERVER_DEV_MODE=1 and `--worker-extension-cls` set to serve/vllm_worker.py's
  class, and must read this machine's files.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from glm45_train.errors import UserError
from glm45_train.model.hf_config import Glm45Config
from glm45_train.rl.engines.model_files import WeightCheck, prepare_model_dir
from glm45_train.rl.engines.weight_files import write_buckets
from glm45_train.rl.rollout import Completion, Request, SamplingParams, by_request, engine_routing
from glm45_train.runtime.vllm_cpu import CPU_ENGINE_ARGS, engine_environment, is_installed
from glm45_train.serve.server import INSTALL_HINT, VLLMServer
from glm45_train.serve.vllm_worker import EXTENSION, LOAD_METHOD

MODEL_DIR_NAME = "vllm_model"
LOGPROBS_MODE = "processed_logprobs"
VLLM_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
MAX_CONCURRENT_REQUESTS = 64  # server placement: HTTP calls in flight


class Backend(Protocol):
    """Where the engine runs: the two placements."""

    def load(self, files: list[Path], repack_experts: bool) -> dict[str, Any]: ...

    def reset_prefix_cache(self) -> None: ...

    def sample(self, prompts: list[tuple[tuple[int, ...], int]], params: SamplingParams) -> list[Completion]: ...

    def shutdown(self) -> None: ...


def engine_args(dtype: torch.dtype, seed: int, max_model_len: int, rollout: Any) -> dict[str, Any]:
    """vLLM engine arguments shared by both placements (as keyword arguments of `LLM`)."""
    args: dict[str, Any] = {
        "dtype": VLLM_DTYPES[dtype],
        "seed": seed,
        "max_model_len": max_model_len,
        "logprobs_mode": LOGPROBS_MODE,
        "enable_prefix_caching": True,
        "worker_extension_cls": EXTENSION,
        "tensor_parallel_size": rollout.tp,
    }
    if torch.cuda.is_available():
        args["gpu_memory_utilization"] = rollout.gpu_memory_fraction
    else:
        args.update(CPU_ENGINE_ARGS, kv_cache_memory_bytes=int(rollout.cpu_kv_cache_gib * 2**30))
    return args


def as_cli_flags(args: dict[str, Any]) -> list[str]:
    """`engine_args` as `vllm serve` flags; a False switch is said (`--no-...`), never left to vLLM's default:
    leaving out `enable_chunked_prefill=False` would start the server with chunked prefill on (row 4's crash)."""
    flags = []
    for key, value in args.items():
        name = key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--no-{name}")
        else:
            flags += [f"--{name}", str(value)]
    return flags


class VLLMEngine:
    """RolloutEngine on vLLM; `backend` is an InProcess or a Server. `loaded`: the backend already holds the weights
    it samples from (a server started on an export, for eval), so no `update_weights` must come first."""

    def __init__(self, backend: Backend, hf: Glm45Config | None, weights_dir: Path, loaded: bool = False) -> None:
        self.backend, self.hf, self.weights_dir = backend, hf, weights_dir
        self.loaded = loaded
        self.last_load: dict[str, Any] = {}

    def update_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.hf is None:
            raise RuntimeError("VLLMEngine.update_weights: a server at a URL only samples (no model config given)")
        files = write_buckets(tensors, WeightCheck(self.hf), self.weights_dir)
        try:
            self.last_load = self._load(files)
        finally:
            for path in files:
                path.unlink(missing_ok=True)
        self._reset_prefix_cache()
        self.loaded = True

    def _load(self, files: list[Path]) -> dict[str, Any]:
        return self.backend.load(files, repack_experts=True)

    def _reset_prefix_cache(self) -> None:
        self.backend.reset_prefix_cache()

    def generate(self, requests: list[Request], params: SamplingParams) -> list[list[Completion]]:
        if not self.loaded:
            raise RuntimeError("VLLMEngine.generate before update_weights: the engine has no weights yet")
        prompts = [(r.prompt_ids, r.seed + j) for r in requests for j in range(r.samples)]
        return by_request(self.backend.sample(prompts, params) if prompts else [], requests)

    def sleep(self) -> None:
        pass  # vLLM's sleep mode is a no-op on CPU; on GPUs the colocated memory hand-over is the scale work

    def wake(self) -> None:
        pass

    def shutdown(self) -> None:
        self.backend.shutdown()


def completion_of(
    token_ids: Iterable[int], logprobs: Iterable[float], finish_reason: str | None, routing: Any = None
) -> Completion:
    ids, values = tuple(int(t) for t in token_ids), tuple(float(v) for v in logprobs)
    if len(ids) != len(values):
        raise RuntimeError(f"vLLM returned {len(ids)} tokens but {len(values)} log-probs")
    if finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM ended a response with finish_reason {finish_reason!r}")
    return Completion(ids, values, finished=finish_reason == "stop", routing=routing)


# -- in-process ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _engine_environment(index: int) -> Iterator[None]:
    """vLLM spawns its engine core with this process's environment: runtime/vllm_cpu.py's meanwhile."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(engine_environment(saved, index))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class InProcess:
    """vLLM's offline engine (`vllm.LLM`) in this process; vLLM runs its engine core in a child process."""

    def __init__(self, model_dir: Path, args: dict[str, Any], index: int, routing_of: Glm45Config | None) -> None:
        self.routing_of = routing_of  # the model whose routed experts are returned (routing replay), or None
        if not is_installed():
            raise UserError(INSTALL_HINT)
        from vllm import LLM

        with _engine_environment(index):
            self.llm: Any = LLM(model=str(model_dir), load_format="dummy", **args)

    def load(self, files: list[Path], repack_experts: bool) -> dict[str, Any]:
        flag = "true" if repack_experts else "false"
        return dict(self.llm.collective_rpc(LOAD_METHOD, args=(json.dumps([str(f) for f in files]), flag))[0])

    def reset_prefix_cache(self) -> None:
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache")

    def sample(self, prompts: list[tuple[tuple[int, ...], int]], params: SamplingParams) -> list[Completion]:
        from vllm import SamplingParams as VLLMSampling
        from vllm.inputs import TokensPrompt

        inputs = [TokensPrompt(prompt_token_ids=list(ids)) for ids, _ in prompts]
        sampling = [VLLMSampling(seed=seed, logprobs=0, detokenize=False, **_sampling(params)) for _, seed in prompts]
        outputs = self.llm.generate(inputs, sampling, use_tqdm=False)
        completions = []
        for output in outputs:
            sample = output.outputs[0]
            steps: Any = sample.logprobs  # one {token: Logprob} per sampled token (logprobs=0)
            logprobs = [step[token].logprob for step, token in zip(steps, sample.token_ids, strict=True)]
            routing = self._routing(sample, len(output.prompt_token_ids) + len(sample.token_ids) - 1)
            completions.append(completion_of(sample.token_ids, logprobs, sample.finish_reason, routing))
        return completions

    def _routing(self, sample: Any, tokens: int) -> Any:
        hf = self.routing_of
        if hf is None:
            return None
        if sample.routed_experts is None:
            raise RuntimeError("vLLM returned no routed experts although enable_return_routed_experts is on")
        routed = np.asarray(sample.routed_experts)
        return engine_routing(routed, tokens, hf.num_hidden_layers, hf.first_k_dense_replace, hf.n_routed_experts)

    def shutdown(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()


def _sampling(params: SamplingParams) -> dict[str, Any]:
    return {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_new_tokens,
        "stop_token_ids": list(params.stop_token_ids),
        "skip_special_tokens": False,
    }


# -- server ---------------------------------------------------------------------------------------------------


class Server:
    """A `vllm serve` process (started and stopped by the run) or a running server at a URL."""

    def __init__(self, server: VLLMServer) -> None:
        self.server = server
        models = server.get("/v1/models")["data"]
        self.model = models[0]["id"]

    @classmethod
    def start(cls, model_dir: Path, args: dict[str, Any], log_path: Path, index: int) -> Server:
        server = VLLMServer(
            model_dir,
            extra_args=as_cli_flags({"load_format": "dummy", **args}),
            dev_mode=True,
            log_path=log_path,
            engine_index=index,
        )
        return cls(server.start())

    def load(self, files: list[Path], repack_experts: bool) -> dict[str, Any]:
        args = [json.dumps([str(f) for f in files]), "true" if repack_experts else "false"]
        answer = self.server.post("/collective_rpc", {"method": LOAD_METHOD, "args": args})
        return dict(answer["results"][0])

    def reset_prefix_cache(self) -> None:
        self.server.post("/reset_prefix_cache")

    def sample(self, prompts: list[tuple[tuple[int, ...], int]], params: SamplingParams) -> list[Completion]:
        body = {"model": self.model, "logprobs": 0, "return_token_ids": True, **_sampling(params)}
        body["include_stop_str_in_output"] = True

        def one(prompt: tuple[tuple[int, ...], int]) -> Completion:
            answer = self.server.post("/v1/completions", {**body, "prompt": list(prompt[0]), "seed": prompt[1]})
            choice = answer["choices"][0]
            return completion_of(choice["token_ids"], choice["logprobs"]["token_logprobs"], choice["finish_reason"])

        with ThreadPoolExecutor(min(MAX_CONCURRENT_REQUESTS, len(prompts))) as pool:
            return list(pool.map(one, prompts))

    def shutdown(self) -> None:
        self.server.stop()


def build_vllm_engine(
    assets_dir: Path, rollout: Any, *, dtype: torch.dtype, seed: int, max_model_len: int, work_dir: Path,
    index: int = 0, url: str | None = None, record_routing: bool = False,
) -> VLLMEngine:  # fmt: skip
    """This rank's engine, the run's `index`-th: `work_dir` holds its weight buckets and server log."""
    model_dir = prepare_model_dir(assets_dir, work_dir.parent / MODEL_DIR_NAME)
    hf = Glm45Config.from_file(model_dir / "config.json")
    args = engine_args(dtype, seed, max_model_len, rollout)
    if record_routing:  # GPUs, in-process only (rl/setup.py refuses the rest)
        args["enable_return_routed_experts"] = True
    backend: Backend
    if url is not None:
        backend = Server(VLLMServer(url=url).start(timeout=60))
    elif rollout.placement == "server":
        backend = Server.start(model_dir, args, work_dir / "vllm_server.log", index)
    else:
        backend = InProcess(model_dir, args, index, hf if record_routing else None)
    return VLLMEngine(backend, hf, work_dir / "weights")
