"""`plan`: every shipped recipe validates and fits its stated hardware; the memory model and the step time against
the published GLM-4.5-Air figures (each constant fitted on one, checked on the other), against what Megatron really
allocates (tiny model; 1 and 2 processes) and against Korthikanti et al.'s attention term; the sourced MFU table."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from glm45_train.cli.main import main as glm45_train
from glm45_train.config.recipe import LORA_TARGETS, load_recipe, validate_layout
from glm45_train.errors import UserError
from glm45_train.launch import activations as act
from glm45_train.launch.mfu_table import SEED_HFU, utilisation
from glm45_train.launch.model_parts import KNOWN_MODELS, resolve_model_config
from glm45_train.launch.plan import CONSTANT_RESERVE_GIB, CONTEXT_GIB, GIB, GPUS, RESERVE_FRACTION, plan
from glm45_train.model.hf_config import Glm45Config
from tests.conftest import REPO_ROOT
from tests.dist.plan_allocations import (
    LAYOUTS,
    ddp_padding_bytes,
    grad_buffer_bytes,
    optimizer_state_bytes,
    parameter_bytes,
)

RECIPES = sorted((REPO_ROOT / "recipes").glob("*.yaml"))
GPU_HARDWARE = re.compile(r"^# Hardware:\s+(\d+) x (H200|H100|H20)\b.*?\((\d+) nodes? x (\d+) GPUs\)", re.M)
CPU_HARDWARE = re.compile(r"^# Hardware:\s+CPU, (\d+) processes", re.M)
PLAN_LINE = re.compile(r"^# Plan:\s+([\d.]+) GiB per GPU on (H200|H100|H20)\b", re.M)
GPU_RECIPES = [p for p in RECIPES if GPU_HARDWARE.search(p.read_text())]
CPU_RECIPES = [p for p in RECIPES if CPU_HARDWARE.search(p.read_text())]


def test_every_recipe_states_its_hardware():
    assert len(GPU_RECIPES) >= 4
    assert set(GPU_RECIPES) | set(CPU_RECIPES) == set(RECIPES)
    for path in RECIPES:
        assert path.read_text().startswith(f"# {path.name} — "), path.name  # the comment header opens the file


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.stem)
def test_gpu_recipe_validates_and_fits_its_hardware(path):
    text = path.read_text()
    world, gpu, nodes, per_node = GPU_HARDWARE.search(text).groups()  # type: ignore[union-attr]
    assert int(nodes) * int(per_node) == int(world)
    model = re.search(r"--config (air|glm45)\b", text).group(1)  # type: ignore[union-attr]
    recipe = load_recipe(path)
    result = plan(recipe, resolve_model_config(recipe.model.source, model), gpu.lower(), int(world))
    assert result.fits, f"{path.name}: {result.worst.total / GIB:.1f} GiB on {gpu}"
    constant_reserve = result.worst.allocated + (CONTEXT_GIB + CONSTANT_RESERVE_GIB) * GIB
    assert constant_reserve <= result.gpu.memory_gib * GIB  # fits under the other calibration too
    stated = PLAN_LINE.search(text)
    assert stated and stated.group(2) == gpu
    assert abs(float(stated.group(1)) - result.worst.total / GIB) < 0.1  # the header says what plan says
    assert f"--nodes {nodes} --gpus-per-node {per_node}" in text
    keys = [line for line in text.splitlines() if re.match(r"^  \w+:", line)]
    assert all("#" in line for line in keys), "every key is commented (its ms-swift flag where there is one)"
    assert sum("# --" in line for line in keys) >= 0.75 * len(keys)


@pytest.mark.parametrize("path", CPU_RECIPES, ids=lambda p: p.stem)
def test_cpu_recipe_validates_its_layout(path, tiny_air):
    processes = int(CPU_HARDWARE.search(path.read_text()).group(1))  # type: ignore[union-attr]
    recipe = load_recipe(path)
    validate_layout(recipe, processes, Glm45Config.from_file(tiny_air))


AIR_LORA_EP4 = ["parallel.ep=4"]  # the seed's layout: ~95 GiB per H20 (nvidia-smi)
AIR_LORA_TP4_EP4 = ["parallel.tp=4", "parallel.ep=4", "parallel.sp=true"]  # ~70 GiB per H20, ~40 s/iteration


def _air_lora(overrides, gpu="h20"):
    recipe = load_recipe(REPO_ROOT / "recipes/air_lora.yaml", overrides)
    return plan(recipe, resolve_model_config("", "air"), gpu, 4)


def test_reserve_fraction_is_fitted_on_ep4_and_predicts_tp4_ep4():
    """RESERVE_FRACTION: fitted on Air LoRA EP 4 (~95 GiB), predicts TP 4 + EP 4 (~70 GiB). CONTEXT_GIB and
    BACKWARD_TRANSIENT_LAYERS are assumed, fitted on neither."""
    ep4, tp4 = _air_lora(AIR_LORA_EP4).worst, _air_lora(AIR_LORA_TP4_EP4).worst
    fitted = (95.0 - CONTEXT_GIB - ep4.allocated / GIB) / (ep4.allocated / GIB)
    assert round(fitted, 2) == RESERVE_FRACTION  # 0.247: the constant is this fit, rounded
    assert abs(ep4.total / GIB - 95.0) / 95.0 < 0.005
    assert abs(tp4.total / GIB - 70.0) / 70.0 < 0.02  # predicted: 69.2 GiB (-1.2%)
    # The TP 4 + EP 4 reading is below capacity, so it needs at least the EP 4 fraction (EP 4 sits at 99% of
    # the H20, where the reserve stops growing): 26.5% against 24.7%.
    assert (70.0 - CONTEXT_GIB - tp4.allocated / GIB) / (tp4.allocated / GIB) > fitted
    assert 95.0 / ep4.total * GIB <= 1.0 < _air_lora(AIR_LORA_EP4).gpu.memory_gib / 95.0


def test_other_reserve_forms_fitted_on_ep4_predict_tp4_ep4_worse():
    """Negative controls: the check above is not vacuous; a constant reserve or one in proportion to activations,
    fitted on the same EP 4 figure, miss the TP 4 + EP 4 figure by more than the proportional form."""
    ep4, tp4 = _air_lora(AIR_LORA_EP4).worst, _air_lora(AIR_LORA_TP4_EP4).worst
    reserve = 95.0 * GIB - CONTEXT_GIB * GIB - ep4.allocated
    assert abs(reserve / GIB - CONSTANT_RESERVE_GIB) < 0.05
    constant = (tp4.allocated + CONTEXT_GIB * GIB + reserve) / GIB
    per_activation = (tp4.allocated + CONTEXT_GIB * GIB + reserve * tp4.activations / ep4.activations) / GIB
    proportional_error = abs(tp4.total / GIB - 70.0)
    assert abs(constant - 70.0) > 3 * proportional_error  # 74.2 GiB: +6%
    assert abs(per_activation - 70.0) > 8 * proportional_error  # 60.3 GiB: -14%


def test_h20_utilisation_is_fitted_on_the_seed_timing():
    """SEED_HFU: fitted on the one GLM-4.5 timing (Air LoRA TP 4 + EP 4, 4 x H20, ~40 s/iteration); the same
    entry predicts the seed's EP 4 recipe (same FLOPs per GPU) and its range holds the measurement."""
    tp4 = _air_lora(AIR_LORA_TP4_EP4)
    fitted = tp4.tokens_per_step * tp4.flops_per_token / (40.0 * 4 * 148e12)
    assert round(fitted, 2) == SEED_HFU == tp4.utilisation.central and not tp4.utilisation.estimate
    assert abs(tp4.step_seconds() - 40.0) / 40.0 < 0.01
    fast, slow = tp4.step_range()
    assert fast <= 40.0 * 1.01 and slow > 1.2 * fast
    seed = load_recipe(REPO_ROOT / "recipes/air_lora_h100.yaml")  # the same job as a shipped recipe
    assert plan(seed, resolve_model_config("", "air"), "h20", 4).step_seconds() == pytest.approx(tp4.step_seconds())
    assert 0.40 < tp4.utilisation.central * tp4.recompute_share < 0.45  # MFU 0.43: recompute not counted


def test_mfu_table_covers_every_gpu_and_training_kind():
    for gpu in GPUS:
        for moe in (True, False):
            for lora in (True, False):
                entry = utilisation(gpu, moe=moe, lora=lora)
                assert 0 < entry.low <= entry.central <= entry.high < 1 and entry.source
    # Published H100 MoE figures (TFLOP/s per GPU over the 989 peak) lie inside the full-SFT range.
    moe_full = utilisation("h100", moe=True, lora=False)
    assert moe_full.low <= 253 / 989 <= moe_full.high and moe_full.low <= 338 / 989 <= moe_full.high
    dense_full = utilisation("h100", moe=False, lora=False)
    assert dense_full.low <= 390 / 989 <= dense_full.high and dense_full.high == 0.47
    assert utilisation("h100", moe=True, lora=True).estimate  # LoRA on H100: reasoned, not measured
    with pytest.raises(KeyError, match="a100"):
        utilisation("a100", moe=True, lora=False)


def test_recompute_is_counted_as_executed_not_model_flops():
    """Full recompute adds one forward of every layer: for a LoRA run (forward + input gradients = 2 forwards'
    work) that is +1/2 of the model FLOPs, minus what the output layer (never recomputed) dilutes."""
    full = _air_lora(AIR_LORA_TP4_EP4)
    none = _air_lora([*AIR_LORA_TP4_EP4, "train.recompute=none"])
    assert none.model_flops_per_token == none.flops_per_token == full.model_flops_per_token
    assert 1.35 < full.flops_per_token / full.model_flops_per_token < 1.5
    assert none.step_seconds() < full.step_seconds()  # the same HFU does more model work per second
    sft = plan(load_recipe(REPO_ROOT / "recipes/air_sft.yaml"), resolve_model_config("", "air"), "h20", 32)
    assert 1.25 < sft.flops_per_token / sft.model_flops_per_token < 1.34  # full SFT: +1/3 at most


def test_mfu_override_replaces_the_table():
    result = dataclasses.replace(_air_lora(AIR_LORA_EP4), mfu_override=0.3)
    rate = 4 * 148e12 * 0.3
    assert result.step_seconds() == pytest.approx(result.tokens_per_step * result.model_flops_per_token / rate)
    assert result.step_range() == (result.step_seconds(),) * 2


def test_frozen_lora_base_is_bf16_weights_only():
    recipe = load_recipe(REPO_ROOT / "recipes/air_lora.yaml")
    stage = plan(recipe, resolve_model_config("", "air"), "h20", 4).worst
    assert 55 * GIB < stage.frozen_weights < 62 * GIB  # ~64 GB of frozen bf16 weights (reference)
    assert stage.trained_weights < 0.2 * GIB and stage.gradients < 0.5 * GIB and stage.optimizer < 0.5 * GIB


def test_attention_term_reproduces_korthikanti():
    """Multi-head attention, no dropout masks, flash attention: 12·s·b·h bytes (+ fp32 LSE), split by TP under SP."""
    hf = Glm45Config.from_dict({**KNOWN_MODELS["air"], "num_attention_heads": 32, "num_key_value_heads": 32})
    h, a = hf.hidden_size, hf.num_attention_heads
    assert a * hf.head_dim == h
    assert act.attention_bytes(act.LayerShape(hf, tokens=8192, tp=1, sp=False, etp=1)) == 8192 * (12 * h + 4 * a)
    with_sp = act.attention_bytes(act.LayerShape(hf, tokens=8192, tp=4, sp=True, etp=1))
    assert with_sp == 8192 * (12 * h + 4 * a) / 4


def tiny_recipe(tmp_path, tiny_dir, *overrides: str):
    path = tmp_path / "tiny.yaml"
    path.write_text(
        f"model: {{source: {tiny_dir}}}\ndata: {{prepared: /d}}\ntrain: {{steps: 1, mtp_loss_weight: 0.3}}\n"
        "checkpoint: {dir: /c}\n"
    )
    return load_recipe(path, list(overrides))


ALLOCATION_CASES = {
    "fp32-full": ["model.dtype=fp32", "lora.enabled=false", "train.distributed_optimizer=false"],
    "bf16-full": ["model.dtype=bf16", "lora.enabled=false", "train.distributed_optimizer=false"],
    "bf16-full-distopt": ["model.dtype=bf16", "lora.enabled=false"],
    "bf16-lora": ["model.dtype=bf16", "lora.rank=8", "train.distributed_optimizer=false"],
    "fp32-lora-every-target": ["model.dtype=fp32", "lora.rank=4", f"lora.targets=[{','.join(LORA_TARGETS)}]"],
}


@pytest.mark.parametrize("case", ALLOCATION_CASES)
def test_tiny_bytes_equal_what_megatron_allocates(megatron_world, tiny_air, tmp_path, case):
    """Weights, DDP grad buffer and optimizer states after one real step (Megatron's DDP + optimizer on CPU)."""
    from glm45_train.runtime import cpu

    if not hasattr(cpu, "on_cpu_device"):
        pytest.skip("Megatron's DDP/optimizer on CPU needs runtime/cpu.on_cpu_device (sft side)")
    recipe = tiny_recipe(tmp_path, tiny_air, *ALLOCATION_CASES[case])
    hf = Glm45Config.from_file(tiny_air)
    expected = plan(recipe, hf, "h20", 1).stages[0]
    model, ddp, optimizer = _one_megatron_step(recipe, hf)
    weight_padding, grad_padding = ddp_padding_bytes(ddp)  # alignment, only with the distributed optimizer
    assert (weight_padding == grad_padding == 0) or recipe.train.distributed_optimizer
    assert parameter_bytes(model) == expected.weights + weight_padding
    assert grad_buffer_bytes(ddp) == expected.gradients + grad_padding
    assert optimizer_state_bytes(optimizer, model) == expected.optimizer


def _one_megatron_step(recipe, hf):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from glm45_train.model.build import build_model
    from glm45_train.model.hf_config import to_transformer_config
    from glm45_train.runtime import cpu

    dtype = torch.bfloat16 if recipe.model.dtype == "bf16" else torch.float32
    config = to_transformer_config(hf, params_dtype=dtype, mtp_loss_scaling_factor=recipe.train.mtp_loss_weight)
    model = build_model(hf, config)
    if recipe.lora.enabled:
        lora = pytest.importorskip("glm45_train.lora", reason="LoRA layers not written yet (sft side)")
        lora.apply_lora(model, recipe.lora)
    distributed = recipe.train.distributed_optimizer
    with cpu.on_cpu_device():
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=distributed
        )
        ddp = DistributedDataParallel(config, ddp_config, model)
        optimizer_config = OptimizerConfig(
            optimizer="adam", lr=1e-3, bf16=dtype == torch.bfloat16, params_dtype=dtype,
            use_distributed_optimizer=distributed,
        )  # fmt: skip
        optimizer = get_megatron_optimizer(optimizer_config, [ddp])
        tokens = torch.randint(0, hf.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        ddp(tokens, torch.arange(16)[None], None, labels=tokens).mean().backward()
        ddp.finish_grad_sync()
        optimizer.step()
    return model, ddp, optimizer


@pytest.mark.slow
def test_sharding_and_optimizer_split_match_two_process_runs(megatron_world, tiny_air, tmp_path):
    """TP/PP/EP/ETP parameter sharding per rank, and the distributed optimizer's split over data parallel."""
    from glm45_train.runtime import cpu
    from tests.test_expert_parallel import torchrun

    if not hasattr(cpu, "on_cpu_device"):
        pytest.skip("Megatron's DDP/optimizer on CPU needs runtime/cpu.on_cpu_device (sft side)")
    torchrun(str(REPO_ROOT / "tests/dist/plan_allocations.py"), str(tiny_air), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    four_layers = Glm45Config.from_dict({**json.loads((tiny_air / "config.json").read_text()), "num_hidden_layers": 4})
    for name, layout in LAYOUTS.items():
        overrides = ["model.dtype=bf16", "lora.enabled=false", *(f"parallel.{k}={v}" for k, v in layout.items())]
        stages = plan(tiny_recipe(tmp_path, tiny_air, *overrides), four_layers, "h20", 2).stages
        for rank in ranks:
            assert rank[name]["bytes"] == stages[rank[name]["stage"]].weights, (name, rank[name])
    full_sft = tiny_recipe(tmp_path, tiny_air, "parallel.ep=2", "model.dtype=bf16", "lora.enabled=false")
    expected = plan(full_sft, _hf(tiny_air), "h20", 2)
    stage = expected.stages[0]
    trained = [rank["trained_ep2"] for rank in ranks]
    for rank in trained:  # DDP's buffers pad for alignment under the distributed optimizer
        assert rank["weights"] == stage.weights + rank["weight_padding"]
        assert rank["gradients"] == stage.gradients + rank["grad_padding"]
    assert sum(rank["optimizer"] for rank in trained) == 2 * stage.optimizer  # each shard owned by one rank


def _hf(tiny_dir) -> Glm45Config:
    return Glm45Config.from_file(tiny_dir)


def test_plan_cli_reports_fit_and_exit_code(capsys):
    recipe = str(REPO_ROOT / "recipes/air_lora.yaml")
    assert glm45_train(["plan", recipe, "--config", "air", "--nodes", "1", "--gpus-per-node", "4"]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "GPUs needed: 4" in out and "step time" in out and "HFU source (published): seed" in out
    assert glm45_train(["plan", recipe, "--mfu", "0.3", *one_node_args()]) == 0
    assert "at MFU 0.30 (--mfu)" in capsys.readouterr().out
    one_node = ["--config", "air", "--nodes", "1", "--gpus-per-node", "4"]
    assert glm45_train(["plan", recipe, "parallel.ep=2", *one_node]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert glm45_train(["plan", recipe, "--config", "air", "--gpu", "h200"]) == 0  # fewest GPUs that fit
    assert "4 GPUs = tp 1" in capsys.readouterr().out


def one_node_args() -> list[str]:
    return ["--config", "air", "--nodes", "1", "--gpus-per-node", "4"]


def test_plan_cli_without_model_config_names_the_fix(capsys):
    assert glm45_train(["plan", str(REPO_ROOT / "recipes/air_lora.yaml")]) == 2
    assert "--config air|glm45" in capsys.readouterr().err


def test_model_config_from_known_name_or_directory(tiny_air):
    assert resolve_model_config("/nowhere", "glm45").num_hidden_layers == 92
    assert resolve_model_config(str(tiny_air)) == Glm45Config.from_file(tiny_air)
    assert resolve_model_config("/nowhere", str(tiny_air / "config.json")) == Glm45Config.from_file(tiny_air)
    with pytest.raises(UserError, match=r"model\.source"):
        resolve_model_config("/nowhere")
