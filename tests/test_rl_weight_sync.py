"""RL weight sync (glm45_train/rl/weight_sync.py): the HF tensors streamed from a live model are the checkpoint's.

- World 1: the freshly loaded tiny Air syncs to its own HF safetensors bit for bit (with and without the MTP block).
- Two processes (torchrun, gloo), in one launch: EP 2 and TP 2 + sequence parallel (etp 2), each a real Trainer
  with LoRA (B seeded nonzero) on attention, dense/shared fc1 and, at EP 2, every routed expert's fc1 (at TP 2
  the router and fc2 instead: LoRA on experts needs etp 1). Both ranks' streams equal, tensor for tensor and bit
  for bit, what `glm45-train export --to-hf --merge-lora` writes from a checkpoint of the same trainer state.
- Negative controls: a dropped expert, a layout with MTP against a model without it (and the reverse), a
  duplicate name, and swapped gate/up halves, each caught with the tensor named.

This file is also the torchrun worker of the two-process test (`python tests/test_rl_weight_sync.py ...`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT

EP2_TARGETS = "[linear_qkv,linear_proj,linear_fc1,experts.linear_fc1]"
TP2_TARGETS = "[linear_qkv,linear_proj,linear_fc1,linear_fc2,router]"
ATTENTION = {f"self_attn.{p}_proj.weight" for p in "qkvo"}
DENSE_FC1 = {f"mlp.{p}_proj.weight" for p in ("gate", "up")} | {
    f"mlp.shared_experts.{p}_proj.weight" for p in ("gate", "up")
}
MERGED = {  # HF names (after `model.layers.L.`) whose tensors the adapters change
    "ep2": ATTENTION | DENSE_FC1 | {f"mlp.experts.{e}.{p}_proj.weight" for e in range(8) for p in ("gate", "up")},
    "tp2": ATTENTION | DENSE_FC1 | {"mlp.down_proj.weight", "mlp.shared_experts.down_proj.weight", "mlp.gate.weight"},
}


def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def assert_same_bits(synced: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same names, and per tensor the same dtype, shape and bytes; the first difference is named."""
    assert sorted(synced) == sorted(expected), sorted(set(synced) ^ set(expected))[:5]
    for name, tensor in expected.items():
        got = synced[name]
        assert (got.dtype, got.shape) == (tensor.dtype, tensor.shape), f"{name}: {got.dtype} {tuple(got.shape)}"
        if not torch.equal(got.contiguous().view(torch.uint8), tensor.contiguous().view(torch.uint8)):
            diff = (got.double() - tensor.double()).abs().max().item()
            raise AssertionError(f"{name} differs from the reference (max abs difference {diff:.3g})")


# -- world 1 -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def air(tiny_air, megatron_world):
    from glm45_train.convert.sources import HFTensorSource
    from glm45_train.rl.weight_sync import SyncLayout

    source = HFTensorSource(tiny_air)
    layouts = {mtp: SyncLayout.build(source.hf, with_mtp=mtp) for mtp in (False, True)}
    return source, layouts, hf_tensors(tiny_air)


def loaded_model(source, with_mtp: bool):
    from glm45_train.convert.sources import load_weights
    from glm45_train.model.build import build_model
    from glm45_train.model.hf_config import to_transformer_config

    model = build_model(source.hf, to_transformer_config(source.hf, mtp_num_layers=1 if with_mtp else None))
    load_weights(model, source)
    return model


def sync(model, layout, **kwargs) -> dict[str, torch.Tensor]:
    from glm45_train.rl.weight_sync import hf_weights

    return dict(hf_weights(layout, model, dtype=torch.bfloat16, **kwargs))


@pytest.mark.parametrize("with_mtp", [False, True])
def test_the_loaded_model_syncs_to_its_hf_checkpoint_bit_for_bit(air, with_mtp):
    from glm45_train.rl.weight_sync import SyncSummary

    source, layouts, reference = air
    summary = SyncSummary()
    synced = sync(loaded_model(source, with_mtp), layouts[with_mtp], summary=summary)
    mtp_names = {n for n in reference if n.startswith(f"model.layers.{source.hf.num_hidden_layers}.")}
    expected = reference if with_mtp else {n: t for n, t in reference.items() if n not in mtp_names}
    assert_same_bits(synced, expected)
    assert set(summary.skipped) == (set() if with_mtp else mtp_names) and len(mtp_names) == 44
    assert summary.tensors == len(expected) and summary.bytes == sum(t.nbytes for t in expected.values())
    assert summary.seconds >= summary.gather_seconds > 0 and summary.metrics()["sync_tensors"] == len(expected)


def test_lora_is_merged_like_merge_lora_and_the_model_is_left_alone(air):
    """Every LoRA target, B nonzero: the sync equals the model after lora.merge_lora (which does write the weights)."""
    from glm45_train.lora import apply_lora, merge_lora
    from tests.dist.lora_common import lora_section, randomize_lora

    source, layouts, reference = air
    model = loaded_model(source, False)
    apply_lora(model, lora_section())
    randomize_lora(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    synced = sync(model, layouts[False])
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert merge_lora(model) > 0
    assert_same_bits(synced, sync(model, layouts[False]))
    changed = [n for n, t in synced.items() if not torch.equal(t, reference[n])]
    assert any(".experts.7.up_proj" in n for n in changed) and any(".mlp.gate.weight" in n for n in changed)


def test_a_dropped_expert_is_named(air):
    from glm45_train.rl.weight_sync import WeightSyncError

    source, layouts, _ = air
    dropped = "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"
    pieces = {name: parts for name, parts in layouts[False].pieces.items() if name != dropped}
    planted = dataclasses.replace(layouts[False], pieces=pieces)
    with pytest.raises(WeightSyncError, match=r"2 HF tensor\(s\) never produced: model\.layers\.1\.mlp\.experts\.3"):
        sync(loaded_model(source, False), planted)


def test_an_mtp_mismatch_fails_before_any_tensor_moves(air):
    from glm45_train.rl.weight_sync import hf_weights

    source, layouts, _ = air
    with pytest.raises(TypeError, match="first argument is a GPTModel"):
        hf_weights(loaded_model(source, False), layouts[False])
    stream = hf_weights(layouts[True], loaded_model(source, False))
    with pytest.raises(RuntimeError, match=r"key mtp\.layers\.0\.\S+ is held for 0 of its"):
        next(stream)
    stream = hf_weights(layouts[False], loaded_model(source, True))
    with pytest.raises(RuntimeError, match=r"keys the sync layout lacks \(e\.g\. mtp\.layers\.0\."):
        next(stream)


def test_coverage_refuses_duplicates_unknown_and_skipped_names(air):
    from glm45_train.convert.mapping.table import Glm45Mapping
    from glm45_train.rl.weight_sync import HFCoverage, WeightSyncError

    source, _, _ = air
    coverage = HFCoverage(Glm45Mapping(source.hf, "local"), with_mtp=False)
    coverage.add("model.embed_tokens.weight")
    with pytest.raises(WeightSyncError, match=r"model\.embed_tokens\.weight produced twice"):
        coverage.add("model.embed_tokens.weight")
    with pytest.raises(WeightSyncError, match=r"model\.layers\.3\.eh_proj\.weight produced, but .* no MTP"):
        coverage.add("model.layers.3.eh_proj.weight")
    with pytest.raises(WeightSyncError, match=r"model\.layers\.1\.mlp\.experts\.8\.up_proj\.weight is no tensor"):
        coverage.add("model.layers.1.mlp.experts.8.up_proj.weight")


def test_swapped_gate_and_up_halves_are_caught_by_name(air):
    """A planted layout error the coverage cannot see (every name is produced once): the equality check does."""
    source, layouts, reference = air
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    gate, up = layouts[False].pieces[name]
    swapped = (dataclasses.replace(gate, offset=up.offset), dataclasses.replace(up, offset=gate.offset))
    planted = dataclasses.replace(layouts[False], pieces={**layouts[False].pieces, name: swapped})
    synced = sync(loaded_model(source, False), planted)
    expected = {n: reference[n] for n in synced}
    with pytest.raises(AssertionError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight differs"):
        assert_same_bits(synced, expected)


# -- two processes: EP 2 and TP 2 + SP, with LoRA, against the merged export -------------------------------------


def run_overrides(tag: str, tiny_air: Path, mcore_air: Path, run_dir: Path) -> list[str]:
    common = [
        f"checkpoint.dir={run_dir}",
        "checkpoint.save_optimizer=false",
        f"data.inputs=[{REPO_ROOT / 'data/sample_distill.jsonl'}]",
    ]
    if tag == "ep2":
        return [*common, f"model.source={tiny_air}", f"lora.targets={EP2_TARGETS}"]
    # an HF source cannot be loaded at tp > 1: the converted (TP=1, bf16) checkpoint is the base
    layout = ["parallel.ep=1", "parallel.tp=2", "parallel.etp=2", "parallel.sp=true"]
    return [*common, f"model.source={mcore_air}", f"lora.targets={TP2_TARGETS}", *layout]


@pytest.mark.slow
def test_ep2_and_tp2_sp_lora_syncs_equal_the_merged_export(megatron_world, tiny_air, mcore_dirs, tmp_path):
    from glm45_train.cli.main import main
    from tests.test_expert_parallel import torchrun

    base = hf_tensors(tiny_air)
    started = time.perf_counter()
    torchrun(__file__, str(tiny_air), str(mcore_dirs["air"]), str(tmp_path), timeout=240)
    launched = time.perf_counter()
    for tag in ("ep2", "tp2"):
        ranks = [torch.load(tmp_path / f"{tag}-rank{r}.pt") for r in range(2)]
        assert ranks[0]["lora_b_nonzero"] and ranks[0]["params_unchanged"] and ranks[1]["params_unchanged"]
        out = tmp_path / f"{tag}-merged"
        args = ["export", "--to-hf", "--model", str(tmp_path / tag), "--output-dir", str(out)]
        assert main([*args, "--merge-lora", "--dtype", "fp32", "--no-progress"]) == 0
        exported = hf_tensors(out)
        expected = {n: t for n, t in exported.items() if not n.startswith("model.layers.3.")}  # no MTP block
        assert len(exported) - len(expected) == 44 and set(ranks[0]["summary"]["skipped"]) == set(exported) - set(
            expected
        )
        for rank in ranks:
            assert_same_bits(rank["synced"], expected)
        changed = {n.split(".", 3)[-1] for n, t in expected.items() if not torch.equal(t, base[n].float())}
        assert changed == MERGED[tag], changed ^ MERGED[tag]  # exactly the adapted weights carry a delta
    print(f"torchrun {launched - started:.1f} s, exports + comparisons {time.perf_counter() - launched:.1f} s")


def worker(tiny_air: str, mcore_air: str, out_dir: str) -> None:
    """Under torchrun: per layout, SyncLayout at TP=PP=EP=1, a real Trainer, nonzero LoRA B, sync, checkpoint."""
    import torch.distributed as dist

    from glm45_train.config.layout import ParallelLayout
    from glm45_train.config.recipe import load_recipe
    from glm45_train.lora import iter_adapters
    from glm45_train.rl.weight_sync import SyncLayout, SyncSummary, hf_weights
    from glm45_train.runtime import distributed
    from glm45_train.train import checkpoint
    from glm45_train.train.batches import DataPosition
    from glm45_train.train.run_dir import write_run_metadata
    from glm45_train.train.run_inputs import sft_inputs
    from glm45_train.train.setup import build_trainer, model_config_of
    from tests.dist.lora_common import randomize_lora

    out = Path(out_dir)
    for tag in ("ep2", "tp2"):
        distributed.initialize(ParallelLayout())  # the order the RL loop uses
        layout = SyncLayout.build(model_config_of(tiny_air), with_mtp=False)
        recipe = load_recipe(
            REPO_ROOT / "recipes/tiny_lora.yaml", run_overrides(tag, Path(tiny_air), Path(mcore_air), out / tag)
        )
        trainer = build_trainer(recipe, lambda _dp: 1)
        randomize_lora(trainer.module)
        before = {name: p.detach().clone() for name, p in trainer.module.named_parameters()}
        summary = SyncSummary()
        synced = {name: t.clone() for name, t in hf_weights(layout, trainer.model, summary=summary)}
        unchanged = all(torch.equal(before[n], p) for n, p in trainer.module.named_parameters())
        nonzero = all(a.lora_B.any() for a in iter_adapters(trainer.module) if hasattr(a, "lora_B"))
        result = {"synced": synced, "summary": dataclasses.asdict(summary), "params_unchanged": unchanged}
        torch.save({**result, "lora_b_nonzero": nonzero}, out / f"{tag}-rank{dist.get_rank()}.pt")
        if dist.get_rank() == 0:
            write_run_metadata(recipe, out / tag)
            print(f"{tag}: {summary.tensors} tensors, {summary.bytes} bytes, {summary.seconds:.3f} s", flush=True)
        dist.barrier()
        checkpoint.save(trainer, out / tag, 1, DataPosition(), sft_inputs(recipe, "no data: a sync test", 1))
    distributed.shutdown()


if __name__ == "__main__":
    worker(*sys.argv[1:4])
