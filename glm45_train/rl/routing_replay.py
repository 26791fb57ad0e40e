"""Routing replay (`rl.routing_replay: rollout`, R3): the trainer's MoE layers route every token to the experts the
engine chose for it, in the old-log-prob pass and in every update, through Megatron-Core's own `RouterReplay`.

Why: in an MoE model a tiny logit difference between engine and trainer flips a token's top-k experts, and a
flipped token's log-prob differs by far more than kernel noise (the R3 paper measures about 10% of choices on
Qwen3-30B-A3B); importance ratios then carry that noise into the update. Replaying the engine's choices makes
the trainer score the tokens with the computation that sampled them; the router's probabilities (and so its
gradient) are still the trainer's, gathered at the replayed experts (megatron/core/transformer/moe/router_replay.py).

Notable:
- Only the decoder's MoE layers replay: dense layers have no router, and the MTP block (not trained in RL, not
  run by the engines) keeps its own routing. Replay is switched on per router after the build (the config flag
  would give the MTP router one too). The fused router kernel bypasses replay; it is off here (megatron's default).
- Layouts: a micro-batch's routing is [b, s, MoE layers, top-k] per input position; each router is given its
  layer's slice in its own token order: sequence first ([s, b] flattened, as the router flattens its logits),
  only this rank's sequence chunk under sequence parallelism, rows end to end ([1, b * s]) on GPUs; a pipeline
  stage holds only its layers. Expert ids are global (the router scores every expert; dispatch does the rest),
  so expert parallelism changes nothing.
- Agreement before replay (`routing_agreement`, logged every step): in the old-log-prob pass each router also
  computes its own top-k from the scores it has, and the overlap with the engine's (|own & engine| / k per
  token, real tokens only) is summed over ranks. Upstream layers have replayed by then, so this counts each
  layer's own flips given the engine's inputs (in the first MoE layer: exactly the unreplayed agreement).
- A forward without routing (the probe's samples) clears the replay: the routers then choose for themselves.
- Full activation recomputation re-runs every router in the backward pass: the training pass queues each
  micro-batch's targets and the recomputation takes them in order (AgreementReplay), so the recomputed forward
  is the replayed one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction


class AgreementReplay(RouterReplay):
    """Megatron's RouterReplay with two additions: while `measuring`, it counts how many of the replayed experts
    the router would have chosen itself; with full recomputation, the training pass's targets are queued in
    forward order and each recomputation in the backward pass (grad enabled; the checkpointed forward runs
    without) takes the oldest: pipeline schedules run backwards in the order of their forwards."""

    def __init__(self) -> None:
        super().__init__()
        RouterReplay.global_router_replay_instances.remove(self)  # ours, not the process-wide list
        self.measuring = False
        self.valid: torch.Tensor | None = None  # [tokens] bool: real (not padding) tokens of the target
        self.agreed = 0.0
        self.counted = 0.0
        self.recomputed: list[torch.Tensor] | None = None  # targets awaiting their backward recomputation

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        if self.router_replay_action != RouterReplayAction.REPLAY_FORWARD:
            return super().get_replay_topk(scores, topk, num_groups, group_topk, default_compute_topk)
        target = self.target_topk_idx
        if self.recomputed is not None and torch.is_grad_enabled():
            if not self.recomputed:
                raise RuntimeError("routing replay: a recomputation in the backward pass without a queued target")
            target = self.recomputed.pop(0)
        assert target is not None and default_compute_topk is not None
        if self.measuring:
            own = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)[1]
            hits = (own.unsqueeze(-1) == target.to(own.device).unsqueeze(-2)).any(-1).sum(-1).float()
            valid = self.valid.to(own.device) if self.valid is not None else torch.ones_like(hits, dtype=torch.bool)
            self.agreed += float(hits[valid].sum())
            self.counted += float(valid.sum()) * topk
        top_indices = target.to(scores.device)
        return scores.gather(1, top_indices), top_indices


class RoutingReplay:
    """The trainer's decoder MoE routers (every model chunk of this rank), each with an AgreementReplay."""

    def __init__(
        self, chunks: list[Any], first_moe_layer: int, sequence_parallel: bool, recompute: bool = False
    ) -> None:
        from megatron.core import parallel_state
        from megatron.core.transformer.moe.moe_layer import MoELayer

        self.routers: list[tuple[int, Any]] = []  # (MoE layer position in the engine's record, router)
        for chunk in chunks:
            for layer in _unwrap(chunk).decoder.layers:
                if isinstance(layer.mlp, MoELayer):
                    layer.mlp.router.router_replay = AgreementReplay()
                    self.routers.append((layer.layer_number - 1 - first_moe_layer, layer.mlp.router))
        self.sequence_parallel, self.recompute = sequence_parallel, recompute
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()

    def begin(self, backward: bool) -> None:
        """Before a schedule: with full recomputation and a backward pass, targets are queued for it."""
        for _, router in self.routers:
            router.router_replay.recomputed = [] if backward and self.recompute else None

    def end(self) -> None:
        """After a schedule: nothing is left for later forwards (the probe's route for themselves)."""
        for _, router in self.routers:
            replay: AgreementReplay = router.router_replay
            replay.clear_indices()
            replay.clear_router_replay_action()
            replay.recomputed = None
            replay.valid = None

    def apply(self, routing: torch.Tensor | None, valid: torch.Tensor | None, flat: bool) -> None:
        """Before a forward pass: replay `routing` ([b, s, layers, k]; None: route freely). `valid` [b, s] marks
        real tokens (for the agreement count); `flat`: the batch runs as one [1, b * s] row (THD, GPUs)."""
        for position, router in self.routers:
            replay: AgreementReplay = router.router_replay
            if routing is None:
                replay.clear_router_replay_action()
                replay.target_topk_idx = None
                continue
            target = self._tokens(routing[:, :, position], flat).contiguous()
            replay.target_topk_idx = target  # not set_target_indices: its backward list is Megatron's, unused
            if replay.recomputed is not None:
                replay.recomputed.append(target)
            replay.valid = None if valid is None else self._tokens(valid, flat)
            replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)

    def _tokens(self, per_position: torch.Tensor, flat: bool) -> torch.Tensor:
        """[b, s, ...] -> this rank's tokens in the router's order: [s, b] flattened, its sequence chunk under SP."""
        rows = per_position.reshape(1, -1, *per_position.shape[2:]) if flat else per_position
        sequence_first = rows.transpose(0, 1)
        if self.sequence_parallel and self.tp_size > 1:
            sequence_first = sequence_first.chunk(self.tp_size, dim=0)[self.tp_rank]
        return sequence_first.reshape(-1, *per_position.shape[2:])

    def measure(self, on: bool) -> None:
        for _, router in self.routers:
            router.router_replay.measuring = on

    def agreement(self) -> float:
        """Overlap of the trainer's own choices with the engine's since the last call, over every rank."""
        import torch.distributed as dist

        sums = torch.zeros(2, dtype=torch.float64)
        for _, router in self.routers:
            replay = router.router_replay
            sums += torch.tensor([replay.agreed, replay.counted], dtype=torch.float64)
            replay.agreed = replay.counted = 0.0
        dist.all_reduce(sums)
        return float(sums[0] / sums[1]) if sums[1] else math.nan


def _unwrap(chunk: Any) -> Any:
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk
