"""Rewards for RL: built-in verifiable rewards, user `module:function` rewards, and batch scoring with failures
accounted for. `RewardSet(specs).score(inputs)` is the entry point; the built-ins are listed in `registry.py`."""

from glm45_train.rl.rewards.base import RewardFn, RewardInput, final_answer
from glm45_train.rl.rewards.registry import BUILTINS, resolve_reward
from glm45_train.rl.rewards.scoring import RewardFailure, RewardFailureError, RewardScores, RewardSet
from glm45_train.rl.rewards.spec import RewardSpec

__all__ = [
    "BUILTINS",
    "RewardFailure",
    "RewardFailureError",
    "RewardFn",
    "RewardInput",
    "RewardScores",
    "RewardSet",
    "RewardSpec",
    "final_answer",
    "resolve_reward",
]
