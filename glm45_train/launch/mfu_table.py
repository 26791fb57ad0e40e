"""How much of a GPU's peak a training step uses, by GPU kind and training kind, with where each figure comes from.

Two ratios, both over the dense bf16 tensor-core peak (plan.py's GPUS):

    HFU  hardware FLOP utilisation: FLOPs the step executes per second / peak. Executed FLOPs are the
         forward, the input gradients of every matmul, the weight gradients of trained weights only (a
         frozen LoRA base has none), the attention core, and one more forward of every recomputed layer.
    MFU  model FLOP utilisation: the same without the recompute forward, which is work done twice, not
         model work (PaLM's definition; full recompute adds 1/3 to a full-SFT step, 1/2 to a LoRA one).

The table holds HFU: it is what a GPU sustains on a kind of model (dense or MoE) and method (full or LoRA)
whatever the recompute, so recompute enters exactly, through the FLOP count (activations.py), and MFU =
HFU x model FLOPs / executed FLOPs follows. Each entry is a range and a central value; `plan` prints the step
time for the range and the entry's source, and `plan --mfu X` replaces it. "Published" means the figure (or
a direct conversion of it) is in the cited source; "engineering estimate" means it is reasoned, not measured.

Why the H20 sits higher than H100 (of its own, much smaller, peak). H20: 148 TFLOP/s bf16, 4.0 TB/s HBM,
NVLink 900 GB/s; H100 SXM: 989 TFLOP/s, 3.35 TB/s, NVLink 900 GB/s. The H20's ridge point is 148 / 4.0 = 37
FLOP per HBM byte against 989 / 3.35 = 295: a matmul is compute-bound on it from ~37 rows (an expert GEMM
with few routed tokens is memory-bound on H100 below ~300), and every memory-bound kernel (norms, SwiGLU,
permutation, the optimizer) and every NVLink byte (all-to-all, TP collectives) costs 6-8x less time per
FLOP of the step. Less of an H20 step is spent outside the tensor cores, so a larger share of its peak is
used. The only GLM-4.5 timing published (below) agrees.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Utilisation:
    """HFU of one (GPU, model kind, method): a range, the value the step estimate centres on, and why."""

    low: float
    central: float
    high: float
    source: str  # one line, printed by `plan`
    estimate: bool  # True where the figure is an engineering estimate rather than published


# Sources (the figures quoted in reference/training-and-clusters.md unless a paper is named):
#  [seed]  The seed's GLM-4.5-Air LoRA job (ms-swift on Megatron, r32 on linear_qkv + linear_proj, packing
#          8192, global batch 16, full recompute) with TP 4 + EP 4 on 4 x H20: ~40 s/iteration. This
#          planner counts 14.8 PFLOP executed per iteration for it (113 GFLOP/token x 131,072 tokens, attention
#          over the whole packed row), hence HFU 0.62 (MFU 0.43). tests/test_plan.py checks the fit.
#  [ds3]   DeepSeek-V3 technical report (arXiv 2412.19437): 2.664M H800 GPU-hours of pre-training for 14.8T
#          tokens = 1,543 tokens/s/GPU; at ~253 GFLOP/token (6 x 37B active + MLA attention at 4K) that is
#          ~390 TFLOP/s, 0.39 of the bf16 peak (FP8 GEMMs, DualPipe overlap; derived here).
#  [mcore] Megatron-Core MoE on H100 with FP8 and tuned overlap: DeepSeek-V3 on 1,024 GPUs 338 TFLOP/s/GPU
#          (0.34), Qwen3-235B on 256 GPUs 253 TFLOP/s/GPU (0.26). Selective recompute at most: HFU ~ MFU.
#  [mlm]   Megatron-LM README benchmarks (dense GPT, bf16, H100): up to 47% MFU; GPT-3 175B ~390 TFLOP/s
#          per GPU (0.39).
# Engineering estimates used below:
#  - bf16 instead of FP8 costs MoE runs ~1.2x (FP8 speeds up the GEMMs, not the rest): 0.26 / 1.2 = 0.22.
#  - LoRA vs full on the same GPU: the same forward and input-gradient GEMMs run; what LoRA drops are the
#    weight-gradient GEMMs, large and efficient and the ones the data-parallel reduction hides behind, and it
#    adds small adapter kernels: x 0.85-1.0 of the full-SFT HFU.
#  - H200 has H100's peak with 1.43x the bandwidth and 1.76x the memory: H100's figures (no published H200
#    MoE training figure; if anything it does slightly better).
#  - Dense on H20: no figure; the MoE figure (dense GEMMs are larger, so not slower).
_H100_MOE_FULL = (0.22, 0.28, 0.35)  # high: DeepSeek-V3 on H100, 338 / 989 = 0.342
_H100_DENSE_FULL = (0.38, 0.43, 0.47)
_LORA_FACTOR = (0.85, 0.92, 1.0)


def _times(values: tuple[float, float, float], factor: tuple[float, float, float]) -> tuple[float, float, float]:
    return (values[0] * factor[0], values[1] * factor[1], values[2] * factor[2])


_H100 = {
    ("moe", "full"): Utilisation(
        *_H100_MOE_FULL, "Megatron MoE, FP8, H100/H800: 0.26-0.39 (Qwen3-235B, DeepSeek-V3); bf16 low end est.", False
    ),
    ("moe", "lora"): Utilisation(
        *_times(_H100_MOE_FULL, _LORA_FACTOR), "H100 MoE full-SFT figures x 0.85-1.0 for LoRA (estimate)", True
    ),
    ("dense", "full"): Utilisation(*_H100_DENSE_FULL, "Megatron-LM dense GPT, bf16, H100: 0.39-0.47 MFU", False),
    ("dense", "lora"): Utilisation(
        *_times(_H100_DENSE_FULL, _LORA_FACTOR), "H100 dense full-SFT figures x 0.85-1.0 for LoRA (estimate)", True
    ),
}

SEED_HFU = 0.62  # [seed], fitted: Air LoRA TP 4 + EP 4 on 4 x H20 at ~40 s/iteration
_H20_LOW = 0.50  # estimate: other layouts and recipes than the one measured (-20%)
_H20_HIGH_FULL = 0.65  # estimate: full SFT's weight-gradient GEMMs may do a little better than LoRA

TABLE: dict[tuple[str, str, str], Utilisation] = {
    ("h20", "moe", "lora"): Utilisation(
        _H20_LOW,
        SEED_HFU,
        SEED_HFU,
        "seed: GLM-4.5-Air LoRA TP4+EP4 on 4 x H20, ~40 s/iteration (the only GLM-4.5 timing); low end est.",
        False,
    ),
    ("h20", "moe", "full"): Utilisation(
        _H20_LOW, SEED_HFU, _H20_HIGH_FULL, "the H20 LoRA timing, not lower for full SFT (estimate)", True
    ),
    ("h20", "dense", "lora"): Utilisation(
        _H20_LOW, SEED_HFU, SEED_HFU, "the H20 MoE LoRA timing; dense GEMMs are not slower (estimate)", True
    ),
    ("h20", "dense", "full"): Utilisation(
        _H20_LOW, SEED_HFU, _H20_HIGH_FULL, "the H20 MoE LoRA timing, for dense full SFT (estimate)", True
    ),
    **{("h100", kind, method): entry for (kind, method), entry in _H100.items()},
    **{
        ("h200", kind, method): Utilisation(
            entry.low, entry.central, entry.high, f"as H100 (same peak; no H200 figure): {entry.source}", True
        )
        for (kind, method), entry in _H100.items()
    },
}


def utilisation(gpu: str, moe: bool, lora: bool) -> Utilisation:
    """The HFU entry for `gpu` ('h20' | 'h100' | 'h200') training a dense or MoE model, fully or with LoRA."""
    key = (gpu, "moe" if moe else "dense", "lora" if lora else "full")
    if key not in TABLE:
        raise KeyError(f"no utilisation figure for {key}; known GPUs: {sorted({k[0] for k in TABLE})}")
    return TABLE[key]
