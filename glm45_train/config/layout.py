"""Parallel layout (TP/PP/EP/ETP/CP/SP) shared by model building, conversion and recipes."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelLayout:
    """How one model replica is split over processes.

    tp: tensor parallel, pp: pipeline parallel, ep: expert parallel, etp: expert tensor parallel,
    cp: context parallel, sp: sequence parallel (needs tp > 1 to mean anything).
    """

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    cp: int = 1
    sp: bool = False

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep", "etp", "cp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel.{name} must be a positive integer, got {value!r}")

    @property
    def model_parallel_size(self) -> int:
        """Processes holding one copy of the dense (non-expert) weights."""
        return self.tp * self.pp * self.cp

    @property
    def smallest_world(self) -> int:
        """The fewest processes the layout runs on: model-parallel groups and expert groups both fill whole stages."""
        return math.lcm(self.model_parallel_size, self.ep * self.etp * self.pp)

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp = "
                f"{self.tp}*{self.pp}*{self.cp} = {self.model_parallel_size}"
            )
        dp = world_size // self.model_parallel_size
        expert_group = self.ep * self.etp
        if (dp * self.tp * self.cp) % expert_group:
            raise ValueError(
                f"ep*etp = {expert_group} does not divide the {dp * self.tp * self.cp} ranks of a pipeline stage"
            )
        return dp
