"""Pure tensor transforms between HF and Megatron-Core layouts. The only module that knows tensor layouts.

Legend: H hidden, d head_dim, nq query heads, ng KV heads (query groups), r = nq // ng, I ffn size.

- `qkv`: HF q [nq*d, ...], k [ng*d, ...], v [ng*d, ...] <-> mcore linear_qkv [ng*(r+2)*d, ...] where each group g
  holds [its r query heads; k_g; v_g]. Works for weights [*, H] and biases [*]. Tensor parallelism splits the
  fused tensor on dim 0 into whole groups, so the full tensor is layout-independent.
- `gate_up`: HF gate [I, H], up [I, H] <-> mcore linear_fc1 [2I, H] = [gate; up] (Megatron's SwiGLU takes the
  first half as the gate). Megatron's sharded state dict stores the two halves separately, so TP ranks'
  [gate_r; up_r] interleave never reaches the checkpoint.
- `identity`: same tensor, same name semantics.
All functions return new tensors (or views) and never change dtype.

Every transform only moves whole rows (slices along dim 0). `row_runs` derives, from a merge function itself,
where each part's rows land in the merged tensor, as a few contiguous runs: streaming conversion then reads
each run from disk straight into its place (and writes each back from its place) with no intermediate tensor,
while the layout knowledge stays in the functions above.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Run = tuple[int, int, int]  # (row in the part, row in the merged tensor, number of rows)


def qkv_merge(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    ng = num_query_groups
    if k.shape != v.shape or q.shape[0] % ng or k.shape[0] % ng or q.shape[1:] != k.shape[1:]:
        raise ValueError(
            f"qkv shapes do not form {ng} groups: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    rest = q.shape[1:]
    grouped = [t.reshape(ng, t.shape[0] // ng, *rest) for t in (q, k, v)]
    return torch.cat(grouped, dim=1).reshape(-1, *rest)


def qkv_split(
    qkv: torch.Tensor, num_heads: int, num_query_groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ng, r, d = num_query_groups, num_heads // num_query_groups, head_dim
    expected = ng * (r + 2) * d
    if qkv.shape[0] != expected:
        raise ValueError(f"linear_qkv has {qkv.shape[0]} rows, expected {ng}*({r}+2)*{d} = {expected}")
    rest = qkv.shape[1:]
    grouped = qkv.reshape(ng, (r + 2) * d, *rest)
    q, k, v = torch.split(grouped, [r * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def gate_up_merge(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    return torch.cat([gate, up], dim=0)


def gate_up_split(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if fc1.shape[0] % 2:
        raise ValueError(f"linear_fc1 has an odd number of rows ({fc1.shape[0]})")
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate, up


def row_runs(merge: Callable[..., torch.Tensor], part_rows: Sequence[int]) -> list[list[Run]]:
    """For each part of `merge(*parts)` (parts of `part_rows` rows), the runs of rows it occupies in the result.

    Computed by merging row tags ([part, row] pairs) instead of data, so it holds for any trailing shape.
    """
    tags = [torch.stack([torch.full((n,), i), torch.arange(n)], dim=1) for i, n in enumerate(part_rows)]
    merged = merge(*tags)
    part, row = merged[:, 0], merged[:, 1]
    breaks = (part[1:] != part[:-1]) | (row[1:] != row[:-1] + 1)
    starts = [0, *(torch.nonzero(breaks).flatten() + 1).tolist()]
    ends = [*starts[1:], len(merged)]
    runs: list[list[Run]] = [[] for _ in part_rows]
    for start, end in zip(starts, ends, strict=True):
        runs[int(part[start])].append((int(row[start]), start, end - start))
    if [sum(n for _, _, n in r) for r in runs] != list(part_rows):
        raise ValueError("merge does not move whole rows of every part exactly once")
    return runs
