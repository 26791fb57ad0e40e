"""Expert parallel 2 over gloo, 2 processes: one training step equals the same step in one process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from glm45_train.convert.sources import HFTensorSource, load_weights
from glm45_train.model.build import build_model
from glm45_train.model.hf_config import to_transformer_config
from tests.conftest import REPO_ROOT
from tests.dist.ep_train_step import LR, batch_for


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 300) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        script,
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.mark.slow
def test_ep2_training_step_matches_single_process(megatron_world, tiny_glm45, tmp_path):
    torchrun(str(REPO_ROOT / "tests/dist/ep_train_step.py"), str(tiny_glm45), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    source = HFTensorSource(tiny_glm45)
    model = build_model(source.hf, to_transformer_config(source.hf, mtp_loss_scaling_factor=0.3))
    load_weights(model, source)
    tokens = torch.cat([batch_for(r, source.hf.vocab_size) for r in range(2)])
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    loss = model(tokens, positions, None, labels=tokens).mean()
    loss.backward()
    with torch.no_grad():
        for param in model.parameters():
            param -= LR * param.grad

    assert abs((ranks[0]["loss"] + ranks[1]["loss"]) / 2 - loss.item()) < 1e-5
    expected = dict(model.named_parameters())
    seen = set()
    for rank in ranks:
        for name, value in rank["params"].items():
            torch.testing.assert_close(value, expected[name].detach(), rtol=0, atol=2e-6, msg=name)
            seen.add(name)
    assert seen == set(expected)  # the two ranks together hold every parameter, experts split between them
    rank1_experts = [n for n in ranks[1]["params"] if ".local_experts." in n]
    assert rank1_experts and not set(rank1_experts) & set(ranks[0]["params"])
    assert any((expected[n] - source.get(n)).abs().max() > 0 for n in rank1_experts)  # rank 1's experts trained
