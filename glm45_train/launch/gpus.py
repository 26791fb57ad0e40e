"""The GPUs the planner knows: memory as nvidia-smi reports it and the dense bf16 tensor-core peak.

Its own module (no torch, no model) so that the CLI can offer `--gpu` choices and train/mfu.py can look up a
peak without loading the planner.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuSpec:
    key: str  # the --gpu name, which mfu_table.py is keyed by
    name: str
    memory_gib: float  # total memory as nvidia-smi reports it
    peak_tflops: float  # dense bf16 tensor-core peak


GPUS = {
    "h20": GpuSpec("h20", "H20 96GB", 95.6, 148.0),
    "h100": GpuSpec("h100", "H100 80GB SXM", 79.6, 989.0),
    "h200": GpuSpec("h200", "H200 141GB", 140.4, 989.0),
}
