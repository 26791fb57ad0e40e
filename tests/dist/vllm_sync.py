"""Under torchrun (2 processes): a real Trainer at EP 2 or TP 2 + SP feeds a running vLLM server, tensor group by
tensor group, and after every sync the engine equals transformers fed the same stream; then planted errors.

    python -m torch.distributed.run --nproc-per-node 2 tests/dist/vllm_sync.py TAG SOURCE URL OUT_JSON

For each group the trainer's own parameters (this rank's shards) are perturbed, the weights synced (rl/weight_sync.py
-> VLLMEngine with the server placement, and the same stream into HFEngine, transformers), and rank 0 compares the
engine's log-probs of a seeded probe response with transformers' on the same tokens; rl/probe.py's check (engine
against the Megatron trainer) runs too. `sensitivity` is how far transformers' log-probs of a fixed sequence moved:
it proves each group's perturbation is visible at all. Planted: a stream without the routed experts, an update
whose experts are not repacked, and one without the prefix-cache reset.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

REPO_ROOT = Path(__file__).resolve().parents[2]
STOP = (1536, 1543, 1545)
GROUPS: dict[str, tuple[str, ...]] = {  # label -> substrings of Megatron parameter / buffer names
    "embeddings": ("embedding.word_embeddings.weight",),
    "lm_head": ("output_layer.weight",),
    "final_norm": ("decoder.final_layernorm.weight",),
    "layer_norms": ("input_layernorm.weight", "pre_mlp_layernorm.weight"),
    "attention_weights": ("linear_qkv.weight", "linear_proj.weight"),
    "attention_biases": ("linear_qkv.bias",),
    "qk_norm": ("q_layernorm.weight", "k_layernorm.weight"),
    "dense_mlp": ("decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.0.mlp.linear_fc2.weight"),
    "routed_experts": ("mlp.experts.",),
    "shared_expert": ("mlp.shared_experts.",),
    "router_gate": ("mlp.router.weight",),
    "e_score_correction_bias": ("mlp.router.expert_bias",),
}
SCALE = {"e_score_correction_bias": 1.0, "layer_norms": 0.3, "final_norm": 0.3, "qk_norm": 0.3}


def overrides(tag: str, source: str, run_dir: Path) -> list[str]:
    common = [f"model.source={source}", f"checkpoint.dir={run_dir}", "lora.enabled=false"]
    if tag == "ep2":
        return [*common, "parallel.ep=2"]
    return [*common, "parallel.ep=1", "parallel.tp=2", "parallel.etp=2", "parallel.sp=true"]


def perturb(module: Any, label: str, seed: int) -> int:
    """Add seeded noise to this rank's shards of the group's tensors; how many tensors were touched."""
    generator = torch.Generator().manual_seed(seed)
    touched = 0
    named = [*module.named_parameters(), *module.named_buffers()]
    for name, tensor in named:
        if any(part in name for part in GROUPS[label]):
            noise = torch.randn(tensor.shape, generator=generator) * SCALE.get(label, 0.05)
            tensor.data.add_(noise.to(tensor.dtype))
            touched += 1
    return touched


class PlantedEngine:
    """The production VLLMEngine, with the two planted errors switchable: no expert repack, no cache reset."""

    @staticmethod
    def build(url: str, hf: Any, weights_dir: Path) -> Any:
        from glm45_train.rl.engines.vllm import Server, VLLMEngine
        from glm45_train.serve.server import VLLMServer

        class Planted(VLLMEngine):
            repack, reset = True, True

            def _load(self, files):
                return self.backend.load(files, repack_experts=self.repack)

            def _reset_prefix_cache(self):
                if self.reset:
                    super()._reset_prefix_cache()

        return Planted(Server(VLLMServer(url=url).start(timeout=600)), hf, weights_dir)


def hf_logprobs(reference: Any, ids: list[int], start: int) -> torch.Tensor:
    """transformers' log-probs of ids[start:] given what precedes them (fp32, temperature 1)."""
    with torch.no_grad():
        logits = reference.model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, -1)[start - 1 : -1]
    return logp.gather(-1, torch.tensor(ids[start:])[:, None])[:, 0]


def main(tag: str, source: str, url: str, out_json: str) -> None:
    from glm45_train.config.layout import ParallelLayout
    from glm45_train.config.recipe import load_recipe
    from glm45_train.rl.engines.hf import HFEngine, model_assets_dir
    from glm45_train.rl.probe import EngineMismatchError, probe_prompt, probe_request, verify_engine
    from glm45_train.rl.batches import Sample
    from glm45_train.rl.rollout import Request, SamplingParams
    from glm45_train.rl.setup import NullEngine
    from glm45_train.rl.weight_sync import SyncLayout, hf_weights
    from glm45_train.runtime import distributed
    from glm45_train.train.setup import build_trainer, model_config_of

    out = Path(out_json)
    distributed.initialize(ParallelLayout())
    hf = model_config_of(source)
    layout = SyncLayout.build(hf, with_mtp=False)
    recipe = load_recipe(REPO_ROOT / "recipes/tiny_grpo.yaml", overrides(tag, source, out.parent / f"run-{tag}"))
    trainer = build_trainer(recipe, lambda _dp: 1)
    rank = dist.get_rank()
    assets = model_assets_dir(source)
    engine = PlantedEngine.build(url, hf, out.parent / f"weights-{tag}") if rank == 0 else NullEngine()
    reference = HFEngine(assets) if rank == 0 else None
    prompt = probe_prompt([tuple(range(100, 400))], recipe.data.max_length, 16)
    params = SamplingParams(1.0, 1.0, 16, STOP)
    run = SimpleNamespace(
        engine=engine, engine_owners=[0], params=params, probe_ids=prompt, trainer=trainer, recipe=recipe,
        pad_id=STOP[0], engine_dtype=torch.float32,
    )  # fmt: skip
    fixed: list[int] = []
    last: list[torch.Tensor] = []
    results: dict[str, Any] = {"groups": {}, "planted": {}}

    def sync(drop: str | None = None) -> None:
        tensors = {n: t.clone() for n, t in hf_weights(layout, trainer.model, dtype=torch.float32)}
        if rank == 0:
            assert reference is not None
            reference.update_weights(tensors.items())
            engine.update_weights((n, t) for n, t in tensors.items() if drop is None or drop not in n)

    def probe_samples() -> list[Any]:
        """The engine's probe response, gathered as the rollout gathers it (rl/steps.py)."""
        local = []
        if rank == 0:
            (probe,) = engine.generate([probe_request(prompt)], params)[0]
            local.append(Sample(0, 0, prompt, probe.response_ids, probe.logprobs, True))
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        return [s for part in gathered for s in part]

    def compare() -> dict[str, float]:
        """Rank 0: engine vs transformers on the engine's probe response; every rank: the production check."""
        row: dict[str, float] = {}
        if rank == 0:
            assert reference is not None
            completion = engine.generate([Request(prompt, 1, 7)], params)[0][0]
            expected = hf_logprobs(reference, [*prompt, *completion.response_ids], len(prompt))
            row["engine_vs_hf"] = float((torch.tensor(completion.logprobs) - expected).abs().max())
            if not fixed:
                fixed.extend([*prompt, *completion.response_ids])
            now = hf_logprobs(reference, fixed, len(prompt))
            row["sensitivity"] = float((now - last[-1]).abs().max()) if last else 0.0
            last.append(now)
        try:
            row["probe_gap_max"] = verify_engine(run, 0, probe_samples())["probe_gap_max"]
            row["caught"] = 0.0
        except EngineMismatchError:
            row["caught"] = 1.0
        return row

    sync()
    results["initial"] = compare()
    for index, label in enumerate(GROUPS):
        touched = perturb(trainer.module, label, seed=1000 * index)  # replicas stay equal
        if not touched:
            continue
        sync()
        results["groups"][label] = {**compare(), "tensors": touched}

    # planted 1: a stream without the routed experts is refused by name before the engine loads anything
    try:
        sync(drop=".mlp.experts.")
        results["planted"]["experts_dropped"] = "not refused"
    except ValueError as err:
        results["planted"]["experts_dropped"] = str(err)
    # planted 2 and 3: the experts not repacked, the prefix cache not reset -> the probe check stops the run
    for label, attribute, group in (
        ("no_repack", "repack", "routed_experts"),
        ("no_reset", "reset", "attention_weights"),
    ):
        if rank == 0:
            setattr(engine, attribute, False)
        perturb(trainer.module, group, seed=77)
        sync()
        results["planted"][label] = compare()
        if rank == 0:
            setattr(engine, attribute, True)
        sync()
        results["planted"][f"{label}_fixed"] = compare()
    if rank == 0:
        out.write_text(json.dumps(results, indent=1))
    dist.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
