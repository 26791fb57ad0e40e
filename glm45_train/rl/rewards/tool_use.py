"""`tool_calls`: an agent trajectory's tool use was well formed (rl/agent: `RewardInput.trajectory`).

1.0 when the episode made at least `min_calls` tool calls and none of its calls failed to parse, broke its
schema, named an unknown tool or failed in the tool (`allow_tool_errors` lifts the last: a tool may fail on
good calls); else 0.0. No partial credit, as `glm_format`. A sample without a trajectory (single-turn
rollouts) is a failure reported with its prompt: the reward needs `rl.environment`.
"""

from __future__ import annotations

from glm45_train.rl.rewards.base import RewardInput


def tool_calls(sample: RewardInput, *, min_calls: int = 1, allow_tool_errors: bool = False) -> float:
    trajectory = sample.trajectory
    if trajectory is None:
        raise ValueError("tool_calls judges agent trajectories: set rl.environment")
    if trajectory.tool_calls < min_calls:
        return 0.0
    return float(allow_tool_errors or trajectory.tool_errors == 0)
