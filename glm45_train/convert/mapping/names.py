"""Megatron tensor names across shards: a rank's local expert or pipeline-stage layer index -> the global one.

Checkpoints and the mapping table name tensors at TP=PP=EP=1 (global indices); a built model names its experts
and layers from 0 on every EP rank and pipeline stage.
"""

from __future__ import annotations

import re

_LOCAL_EXPERT = re.compile(r"(local_experts\.|linear_fc[12]\.weight)(\d+)")


def global_expert_name(name: str, ep_rank: int, local_experts: int) -> str:
    """Local expert index -> global one (global = local + ep_rank * experts per rank)."""
    if ".mlp.experts." not in name:
        return name
    return _LOCAL_EXPERT.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + ep_rank * local_experts}", name, count=1)


def global_layer_name(name: str, first_layer: int) -> str:
    """A pipeline stage's local decoder layer index -> the global one (global = local + the stage's first)."""
    prefix = "decoder.layers."
    if not first_layer or not name.startswith(prefix):
        return name
    index, rest = name[len(prefix) :].split(".", 1)
    return f"{prefix}{int(index) + first_layer}.{rest}"
