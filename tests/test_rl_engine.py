"""The CPU rollout engine: seeded, stops where GLM-4.5 stops, and its log-probs are the trainer's.

The central check: responses sampled by the engine (transformers, fed the trainer's weights through the weight
sync) are scored by the Megatron trainer's own forward pass (rl/train_step.py, the path every update takes),
and the two log-probs of every sampled token agree at fp32 rounding. Controls: the same comparison at another
temperature, and with one weight perturbed in the engine, is far off.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from glm45_train.config.recipe import load_recipe
from glm45_train.rl.batches import Sample, micro_batches
from glm45_train.rl.engines.hf import HFEngine, sample
from glm45_train.rl.prompts import load_prompts, render_prompts
from glm45_train.rl.rollout import Request, SamplingParams
from tests.conftest import REPO_ROOT

STOP = (1536, 1543, 1545)  # <|endoftext|>, <|user|>, <|observation|> in the tiny tokenizer


@pytest.fixture(scope="module")
def trainer(tiny_air, megatron_world, tmp_path_factory):
    from glm45_train.rl.weight_sync import SyncLayout
    from glm45_train.train.setup import build_trainer

    overrides = [f"model.source={tiny_air}", "parallel.ep=1", f"checkpoint.dir={tmp_path_factory.mktemp('rl')}"]
    recipe = load_recipe(REPO_ROOT / "recipes/tiny_grpo.yaml", overrides)
    layout = SyncLayout.build(recipe_hf(tiny_air), with_mtp=False)
    return build_trainer(recipe, lambda _dp: 1), recipe, layout


def recipe_hf(source: Path):
    from glm45_train.train.setup import model_config_of

    return model_config_of(source)


@pytest.fixture(scope="module")
def engine(tiny_air, trainer):
    from glm45_train.rl.weight_sync import hf_weights

    policy, _recipe, layout = trainer
    engine = HFEngine(tiny_air)
    engine.update_weights(hf_weights(layout, policy.module, dtype=torch.float32))
    return engine


def _prompt_ids(tiny_air: Path, count: int) -> list[tuple[int, ...]]:
    from glm45_train.data.chat import load_chat_tokenizer

    prompts = load_prompts([REPO_ROOT / "data/rl_prompts_sample.jsonl"])
    ids = render_prompts(prompts.records[:count], load_chat_tokenizer(tiny_air), thinking=False)
    return [tuple(i) for i in ids]


def test_sampling_is_seeded_and_stops_on_glm_stop_tokens(engine, tiny_air):
    params = SamplingParams(1.0, 1.0, 48, STOP)
    prompt = _prompt_ids(tiny_air, 1)[0]
    first = engine.generate([Request(prompt, 4, seed=11)], params)[0]
    again = engine.generate([Request(prompt, 4, seed=11)], params)[0]
    other = engine.generate([Request(prompt, 4, seed=12)], params)[0]
    assert first == again and first != other
    for completion in first:
        assert len(completion.response_ids) == len(completion.logprobs) <= 48
        stops = [i for i, token in enumerate(completion.response_ids) if token in STOP]
        assert stops == ([len(completion.response_ids) - 1] if completion.finished else [])


def test_top_p_keeps_the_most_likely_tokens():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    params = SamplingParams(1.0, 0.5, 1, ())
    picks = {int(sample(logits, params, [torch.Generator().manual_seed(s)])[0]) for s in range(50)}
    assert picks == {0}  # p(token 0) = 0.61 >= 0.5 alone
    wide = {int(sample(logits, SamplingParams(1.0, 0.9, 1, ()), [torch.Generator().manual_seed(s)])[0])
            for s in range(200)}  # fmt: skip
    assert wide == {0, 1, 2}  # control: 0.61 + 0.22 + 0.14 reaches 0.9; the last token never


def _trainer_logprobs(trainer, completions, prompt_ids, temperature: float):
    from glm45_train.rl.train_step import logprob_pass
    from glm45_train.train.loop import collation_for

    policy, recipe, _ = trainer
    samples = [
        Sample(i, j, prompt_ids[i], c.response_ids, c.logprobs, c.finished)
        for i, group in enumerate(completions)
        for j, c in enumerate(group)
    ]
    batches = micro_batches(samples, 0, 1, collation_for(recipe), pad_id=STOP[0])
    logprob_pass(policy, batches, temperature)
    gaps = [(m.engine_logp - m.old_logp).abs()[m.batch.loss_mask > 0] for m in batches]
    return torch.cat(gaps), sum(len(s.response_ids) for s in samples)


def test_engine_logprobs_equal_the_trainers(engine, trainer, tiny_air):
    prompt_ids = _prompt_ids(tiny_air, 3)
    params = SamplingParams(1.0, 1.0, 32, STOP)
    completions = engine.generate([Request(p, 3, seed=i) for i, p in enumerate(prompt_ids)], params)
    gap, tokens = _trainer_logprobs(trainer, completions, prompt_ids, temperature=1.0)
    assert gap.numel() == tokens > 50
    assert float(gap.max()) < 2e-5, float(gap.max())  # fp32 rounding (log-probs are ~ -7)
    # control: the same tokens at another temperature are far off
    wrong_temperature, _ = _trainer_logprobs(trainer, completions, prompt_ids, temperature=0.7)
    assert float(wrong_temperature.max()) > 0.1


def test_a_perturbed_engine_weight_shows_in_the_gap(trainer, tiny_air):
    from glm45_train.rl.weight_sync import hf_weights

    policy, _recipe, layout = trainer
    engine = HFEngine(tiny_air)
    tensors = hf_weights(layout, policy.module, dtype=torch.float32)
    planted = ((n, t * 1.01 if n == "model.layers.1.self_attn.o_proj.weight" else t) for n, t in tensors)
    engine.update_weights(planted)
    prompt_ids = _prompt_ids(tiny_air, 2)
    completions = engine.generate(
        [Request(p, 2, seed=i) for i, p in enumerate(prompt_ids)], SamplingParams(1.0, 1.0, 24, STOP)
    )
    gap, _ = _trainer_logprobs(trainer, completions, prompt_ids, temperature=1.0)
    assert float(gap.max()) > 1e-3
