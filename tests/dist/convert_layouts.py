"""What every rank of a parallel layout writes (and reads) for the full-size GLM-4.5 / Air, without allocating.

    python tests/dist/convert_layouts.py OUT.pkl MODEL:TP:PP:EP:WORLD [...]      (MODEL: air | glm45)

For each layout, every rank is built on `meta` in a forked process that joins a *fake* process group of the
layout's world size as that rank (torch's FakeProcessGroup: collectives do nothing), so Megatron sets up exactly
the parallel state that rank would have. Each rank reports its sharded state dict (what the converter writes:
main-replica chunks; what a loader reads: every chunk) after checking every chunk names a model tensor that has
a rule in the mapping table and lies inside that tensor's full (HF-derived) shape, as the writer slices it.
OUT.pkl gets {layout: [per-rank report]} for tests/test_convert_scale.py.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import pickle
import sys
import time

import torch

CONFIGS: dict[str, dict] = {}
MAPPINGS: dict[str, object] = {}  # built once in the parent, shared by the forked ranks


def _configs() -> dict[str, dict]:
    from tests.test_build import GLM45_RELEASE
    from tests.test_hf_config import AIR_RELEASE

    return {"air": AIR_RELEASE, "glm45": GLM45_RELEASE}


def rank_report(model: str, tp: int, pp: int, ep: int, world: int, rank: int) -> dict:
    """Build `rank` of the layout on meta and describe its chunks (runs in a forked child)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from glm45_train.convert.torch_dist.chunks import chunk_region
    from glm45_train.convert.mapping.table import Glm45Mapping
    from glm45_train.convert.torch_dist.layout import TensorIndex, build_meta_model, sharded_tensors, te_style_sharded_state_dict
    from glm45_train.model.hf_config import Glm45Config
    from glm45_train.runtime import cpu

    started = time.perf_counter()
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=1,  # our layouts' default (ParallelLayout.etp)
        create_gloo_process_groups=False,
    )
    hf = Glm45Config.from_dict(CONFIGS[model])
    mapping = MAPPINGS[model]
    assert isinstance(mapping, Glm45Mapping)
    # At pp > 1 the MTP stage's copy of the embedding is moved with .cuda() (then all-reduced): keep it on meta.
    with cpu.on_cpu_device() if pp > 1 else contextlib.nullcontext():
        meta_model = build_meta_model(hf, torch.bfloat16)
    index = TensorIndex(meta_model)
    chunks, names = [], set()
    for sharded in sharded_tensors(te_style_sharded_state_dict(meta_model, for_save=True)):
        name = index.name_of(sharded.data)
        names.add(name)
        sizes = (1,) * sharded.prepend_axis_num + tuple(sharded.local_shape)
        full = torch.empty(mapping.mcore_shape(name), device="meta")  # MappingError if no rule makes `name`
        region = chunk_region(full, sharded.global_offset, sizes, sharded.global_shape, name)
        assert region.numel() == sharded.data.numel(), name
        replica = sharded.replica_id if isinstance(sharded.replica_id, tuple) else (sharded.replica_id,)
        main = all(r == 0 for r in replica)
        chunks.append((sharded.key, tuple(sharded.global_shape), tuple(sharded.global_offset), sizes, main))
    return {"rank": rank, "names": names, "chunks": chunks, "seconds": time.perf_counter() - started}


def _run(args: tuple) -> dict:
    return rank_report(*args)


def main(out_path: str, *layouts: str) -> None:
    from glm45_train.convert.mapping.table import Glm45Mapping
    from glm45_train.model.hf_config import Glm45Config
    from glm45_train.runtime import cpu

    CONFIGS.update(_configs())
    MAPPINGS.update({model: Glm45Mapping(Glm45Config.from_dict(c), "local") for model, c in CONFIGS.items()})
    cpu.apply()
    import megatron.core.models.gpt  # noqa: F401  (imported once, before forking)

    reports = {}
    context = multiprocessing.get_context("fork")
    for layout in layouts:
        model, *sizes = layout.split(":")
        tp, pp, ep, world = (int(s) for s in sizes)
        with context.Pool(2, maxtasksperchild=1) as pool:
            reports[layout] = pool.map(_run, [(model, tp, pp, ep, world, r) for r in range(world)], chunksize=1)
    with open(out_path, "wb") as handle:
        pickle.dump(reports, handle)


if __name__ == "__main__":
    main(*sys.argv[1:])
