"""Routing replay (rl/routing_replay.py) on the real Megatron trainer and the transformers engine, one process.

The engine records the experts every MoE layer chose for every token it ran (rl/engines/hf.py); with the
trainer's weights its record equals the trainer's own routing (the record is aligned with the trainer's
positions). Then a planted perturbation of the engine's router (its `e_score_correction_bias`, which moves
expert selection and nothing else) makes engine and trainer route differently: without replay the trainer's
choices and log-probs differ from the engine's (negative control); with replay its choices equal the engine's
exactly in every layer, and its log-probs equal the engine's again at fp32 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glm45_train.rl.batches import Sample, micro_batches
from glm45_train.rl.engines.hf import HFEngine
from glm45_train.rl.rollout import Request, SamplingParams, engine_routing
from tests.test_pipeline import tiny_air_4_layers  # noqa: F401 - the 4-layer model (PP 2)
from tests.test_rl_engine import STOP, _prompt_ids, trainer  # noqa: F401 - the module's trainer fixture


def _engine(tiny_air, trainer, bias_noise: float) -> HFEngine:  # noqa: F811
    from glm45_train.rl.weight_sync import hf_weights

    policy, _recipe, layout = trainer
    engine = HFEngine(tiny_air, record_routing=True)
    generator = torch.Generator().manual_seed(0)

    def planted(stream):
        for name, tensor in stream:
            if name.endswith("e_score_correction_bias"):
                tensor = tensor + torch.randn(tensor.shape, generator=generator) * bias_noise
            yield name, tensor

    engine.update_weights(planted(hf_weights(layout, policy.module, dtype=torch.float32)))
    return engine


def _micro_batches(engine, trainer, tiny_air):  # noqa: F811
    from glm45_train.train.loop import collation_for

    prompts = _prompt_ids(tiny_air, 2)
    groups = engine.generate([Request(p, 3, seed=i) for i, p in enumerate(prompts)], SamplingParams(1.0, 1.0, 24, STOP))
    samples = [
        Sample(i, j, prompts[i], c.response_ids, c.logprobs, c.finished, routing=c.routing)
        for i, group in enumerate(groups)
        for j, c in enumerate(group)
    ]
    hf = trainer[0].hf
    shape = (hf.num_hidden_layers - hf.first_k_dense_replace, hf.num_experts_per_tok)
    for sample in samples:
        assert sample.routing.shape == (len(sample.prompt_ids) + len(sample.response_ids) - 1, *shape)
    return micro_batches(samples, 0, 1, collation_for(trainer[1]), pad_id=STOP[0])


class ChosenExperts:
    """The experts each trainer router actually dispatched to (its routing map), per MoE layer position."""

    def __init__(self, routers) -> None:
        self.maps: dict[int, list[torch.Tensor]] = {position: [] for position, _ in routers}
        self.handles = [router.register_forward_hook(self._keep(position)) for position, router in routers]

    def _keep(self, position):
        def hook(_module, _inputs, output):
            self.maps[position].append(output[1].detach().clone())  # [s * b, experts] bool, per forward

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _expected_maps(batches, experts: int) -> dict[int, torch.Tensor]:
    """The engine's choices as routing maps, micro-batch after micro-batch in the router's token order ([s, b])."""
    maps: dict[int, list[torch.Tensor]] = {}
    for micro in batches:
        routing = micro.routing.transpose(0, 1)
        for position in range(routing.shape[2]):
            chosen = routing[:, :, position].reshape(-1, routing.shape[-1])
            empty = torch.zeros(chosen.shape[0], experts, dtype=torch.bool)
            maps.setdefault(position, []).append(empty.scatter(1, chosen, True))
    return {position: torch.cat(parts) for position, parts in maps.items()}


def _real(batches) -> torch.Tensor:
    from glm45_train.rl.train_step import _real_tokens

    return torch.cat([_real_tokens(micro).transpose(0, 1).reshape(-1) for micro in batches])


@pytest.fixture(scope="module")
def replay(trainer):  # noqa: F811
    from glm45_train.rl.routing_replay import RoutingReplay

    policy = trainer[0]
    replay = RoutingReplay([policy.model], policy.hf.first_k_dense_replace, sequence_parallel=False)
    yield replay
    for _, router in replay.routers:
        router.router_replay = None


def _passes(trainer, replay, batches):  # noqa: F811
    """old_logp without replay, then with it: (per pass) the routers' maps and the gap to the engine."""
    from glm45_train.rl.train_step import logprob_pass

    policy = trainer[0]
    out = {}
    for name, given in (("free", None), ("replayed", replay)):
        chosen = ChosenExperts(replay.routers)
        try:
            logprob_pass(policy, batches, temperature=1.0, replay=given)
        finally:
            chosen.close()
        gap = torch.cat([(m.engine_logp - m.old_logp).abs()[m.batch.loss_mask > 0] for m in batches])
        maps = {position: torch.cat(parts) for position, parts in chosen.maps.items()}
        first = replay.routers[0][1].router_replay  # the first MoE layer's counts (its inputs are the same)
        first_layer = first.agreed / first.counted if given is not None else None
        out[name] = (maps, gap, (first_layer, replay.agreement()) if given is not None else None)
    return out


def test_the_engine_record_is_the_trainers_own_routing(tiny_air, trainer, replay):  # noqa: F811
    batches = _micro_batches(_engine(tiny_air, trainer, bias_noise=0.0), trainer, tiny_air)
    passes = _passes(trainer, replay, batches)
    maps, gap, _ = passes["free"]
    real = _real(batches)
    for position, expected in _expected_maps(batches, trainer[0].hf.n_routed_experts).items():
        assert torch.equal(maps[position][real], expected[real]), position
    assert float(gap.max()) < 2e-5
    assert passes["replayed"][2] == (1.0, 1.0)  # measured agreement: first layer, all layers


def test_replay_makes_the_trainer_route_as_a_perturbed_engine_did(tiny_air, trainer, replay):  # noqa: F811
    batches = _micro_batches(_engine(tiny_air, trainer, bias_noise=0.1), trainer, tiny_air)
    passes = _passes(trainer, replay, batches)
    real = _real(batches)
    expected = _expected_maps(batches, trainer[0].hf.n_routed_experts)
    free_maps, free_gap, _ = passes["free"]
    replayed_maps, replayed_gap, agreement = passes["replayed"]
    disagreeing = [int((free_maps[p][real] != expected[p][real]).any(-1).sum()) for p in expected]
    assert min(disagreeing) > 0, disagreeing  # negative control: every layer routes some tokens otherwise
    assert float(free_gap.max()) > 1e-2
    for position in expected:  # with replay: the engine's experts, exactly, in every MoE layer
        assert torch.equal(replayed_maps[position][real], expected[position][real]), position
    assert float(replayed_gap.max()) < 2e-5, float(replayed_gap.max())
    # the logged agreement: each router's own top-k beside the replayed one; in the first MoE layer its inputs are
    # the free pass's, so it equals the free pass's overlap there (deeper layers see the engine's routing upstream)
    top_k = trainer[0].hf.num_experts_per_tok
    first_free = float((free_maps[0][real] & expected[0][real]).sum()) / (top_k * int(real.sum()))
    first_layer, overall = agreement
    assert first_layer == pytest.approx(first_free) and first_layer < 0.95 and overall < 0.95


def test_after_a_replayed_pass_the_routers_choose_for_themselves(tiny_air, trainer, replay):  # noqa: F811
    """The probe's samples carry no routing: a pass after a replayed one must not reuse its targets."""
    for _, router in replay.routers:
        assert router.router_replay.router_replay_action is None
        assert router.router_replay.target_topk_idx is None


def test_an_engine_record_of_the_wrong_shape_is_refused():
    routed = np.zeros((10, 4, 2), dtype=np.int32)  # every layer (4), first one dense
    kept = engine_routing(routed, tokens=9, num_layers=4, first_moe_layer=1, experts=8)
    assert kept.shape == (9, 3, 2) and kept.dtype == np.uint8
    with pytest.raises(RuntimeError, match="expected"):
        engine_routing(routed, tokens=11, num_layers=4, first_moe_layer=1, experts=8)
    with pytest.raises(RuntimeError, match="routing"):
        sample = Sample(0, 0, (1, 2), (3, 4), (-1.0, -1.0), True, routing=np.zeros((2, 3, 2), dtype=np.uint8))
        micro_batches([sample], 0, 1, _collation(), pad_id=0)  # 3 positions ran, the record holds 2


def _collation():
    from glm45_train.train.batches import Collation

    return Collation(2, 1, True)


def test_routing_replay_with_vllm_on_cpu_is_refused_before_any_process_starts(tiny_air, tmp_path, capsys):
    from glm45_train.cli.main import main
    from tests.test_rl_loop import RECIPE

    code = main(["rl", RECIPE, f"model.source={tiny_air}", f"checkpoint.dir={tmp_path}", "rl.rollout.engine=vllm",
                 "rl.routing_replay=rollout"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "key 'rl.routing_replay': vLLM's CPU build cannot return the experts" in err, err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_sglang_routed_experts_are_decoded_per_token_and_layer():
    import base64

    from glm45_train.model.hf_config import Glm45Config
    from glm45_train.model.tiny import tiny_config
    from glm45_train.rl.engines.sglang import routed_experts

    hf = Glm45Config.from_dict(tiny_config("air", 2048, [1536]))
    layers, top_k = hf.num_hidden_layers, hf.num_experts_per_tok
    ids = np.arange(7 * layers * top_k, dtype=np.int32)[::-1].copy() % hf.n_routed_experts  # 7 tokens run
    meta = {"routed_experts": base64.b64encode(ids.tobytes()).decode()}
    routing = routed_experts(meta, 7, hf)
    expected = np.sort(ids.reshape(7, layers, top_k)[:, hf.first_k_dense_replace :], axis=-1)
    np.testing.assert_array_equal(routing, expected)
    with pytest.raises(RuntimeError, match="routed_experts"):
        routed_experts({}, 7, hf)  # the engine was started without enable_return_routed_experts
    with pytest.raises(RuntimeError, match="ids"):
        routed_experts({"routed_experts": base64.b64encode(ids[:5].tobytes()).decode()}, 7, hf)


def _fresh_trainer(tiny_air, tmp_path, *overrides):
    from glm45_train.config.recipe import load_recipe
    from glm45_train.train.setup import build_trainer
    from tests.conftest import REPO_ROOT

    recipe = load_recipe(
        REPO_ROOT / "recipes/tiny_grpo.yaml",
        [f"model.source={tiny_air}", "parallel.ep=1", f"checkpoint.dir={tmp_path}", *overrides],
    )
    return build_trainer(recipe, lambda _dp: 1)


def test_full_recomputation_replays_the_same_routing_in_the_backward_pass(tiny_air, trainer, tmp_path):  # noqa: F811
    """One update with replay on a trainer that recomputes every layer in the backward pass equals the same update
    without recomputation (loss, gradient norm): the recomputed routers take the replayed experts too. Control:
    the update routing freely differs, so a recomputation that routed for itself would be seen."""
    from glm45_train.rl.losses import LossSpec
    from glm45_train.rl.routing_replay import RoutingReplay
    from glm45_train.rl.train_step import logprob_pass, update

    batches = _micro_batches(_engine(tiny_air, trainer, bias_noise=0.1), trainer, tiny_air)
    loss = LossSpec("grpo", 0.2, 0.28, 0.0, True, 1.0)
    results = {}
    for name, recompute, replayed in (("plain", "none", True), ("recomputed", "full", True), ("free", "none", False)):
        policy = _fresh_trainer(tiny_air, tmp_path / name, f"train.recompute={recompute}")
        replay = RoutingReplay([policy.model], policy.hf.first_k_dense_replace, False, recompute == "full")
        if not replayed:
            replay.end()
            for _, router in replay.routers:
                router.router_replay = None
            replay = None
        for micro in batches:
            micro.old_logp = None
            signs = torch.tensor([1.0 - 2.0 * (row % 2) for row in range(micro.advantages.shape[0])]).view(-1, 1)
            micro.advantages = (micro.batch.loss_mask > 0).float() * signs  # a gradient on every response token
        logprob_pass(policy, batches, 1.0, replay=replay)
        results[name] = update(policy, batches, loss, replay)
    plain, recomputed, free = results["plain"], results["recomputed"], results["free"]
    assert plain["tokens"] == recomputed["tokens"] > 0
    assert recomputed["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert recomputed["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5) and plain["grad_norm"] > 0
    assert abs(free["grad_norm"] - plain["grad_norm"]) > 1e-3 * plain["grad_norm"]


@pytest.mark.slow
def test_pipeline_stages_replay_and_recompute_in_schedule_order(tiny_air_4_layers, tmp_path):  # noqa: F811
    """2 processes, PP 2 (each stage its own MoE layers), 2 micro-batches per update: the 1F1B schedule runs the
    second micro-batch's forward before the first one's backward, so a recomputation that took the latest targets
    would route the first micro-batch with the second's experts. Replayed with full recomputation, the run's
    losses and gradient norms equal the run without recomputation; the engine's routing is the trainer's."""
    from tests.test_rl_loop import run_rl

    common = ("parallel.pp=2", "parallel.ep=1", "rl.routing_replay=rollout", "train.steps=2", "logging.plot=false")
    plain = run_rl(tiny_air_4_layers, tmp_path / "plain", *common)
    recomputed = run_rl(tiny_air_4_layers, tmp_path / "full", *common, "train.recompute=full")
    for one, two in zip(plain, recomputed, strict=True):
        assert one["routing_agreement"] == two["routing_agreement"] == 1.0
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7), (one["step"], one["loss"], two["loss"])
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4), one["step"]
