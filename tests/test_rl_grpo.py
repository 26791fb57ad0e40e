"""GRPO's arithmetic against hand-computed values: advantages, the clipped loss and its gradient, k3 KL, and
the vocab-parallel log-probs and entropy against torch's own. Each check has a planted-error control."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glm45_train.rl.grpo import group_advantages, token_logprobs, vocab_parallel_entropy
from glm45_train.rl.losses import LossSpec, TokenTerms, policy_loss


def GrpoLoss(clip_low, clip_high, kl_coeff, policy_loss, temperature):
    return LossSpec("grpo", clip_low, clip_high, kl_coeff, policy_loss, temperature)


def test_group_advantages_normalise_within_each_group():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    failed = np.zeros_like(rewards, dtype=bool)
    adv = group_advantages(rewards, failed, std_normalize=True)
    std = np.std([1, 0, 0, 1], ddof=1)
    np.testing.assert_allclose(adv[0], np.array([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6))
    np.testing.assert_array_equal(adv[1], 0.0)  # no signal in a group of equal rewards
    np.testing.assert_allclose(group_advantages(rewards, failed, std_normalize=False)[0], [0.5, -0.5, -0.5, 0.5])


def test_failed_rewards_get_no_advantage_and_leave_the_group_statistics():
    rewards = np.array([[1.0, 0.0, 0.0, 0.0]])
    failed = np.array([[False, False, True, True]])
    adv = group_advantages(rewards, failed, std_normalize=False)
    np.testing.assert_allclose(adv, [[0.5, -0.5, 0.0, 0.0]])  # mean of the two scored samples only
    lone = group_advantages(rewards, np.array([[False, True, True, True]]), std_normalize=True)
    np.testing.assert_array_equal(lone, 0.0)


LOSS = GrpoLoss(clip_low=0.2, clip_high=0.28, kl_coeff=0.0, policy_loss=True, temperature=1.0)


def _loss(logp, old, adv, ref=None, loss=LOSS):
    logp = torch.tensor(logp, requires_grad=True)
    mask = torch.ones_like(logp)
    segments = torch.arange(logp.shape[0]).view(-1, 1).expand_as(logp)
    terms = TokenTerms(logp, torch.tensor(old), torch.tensor(adv), mask, segments,
                       None if ref is None else torch.tensor(ref))  # fmt: skip
    total, _count, sums = policy_loss(loss, terms)
    total.backward()
    return total.item(), logp.grad, sums


def test_on_policy_gradient_is_reinforce():
    """ratio = 1: d loss / d logp = -A (the policy-gradient estimator)."""
    total, grad, sums = _loss([[-1.0, -2.0]], [[-1.0, -2.0]], [[0.7, -0.3]])
    assert total == pytest.approx(-(0.7 - 0.3))
    torch.testing.assert_close(grad, torch.tensor([[-0.7, 0.3]]))
    assert sums["clipped"].item() == 0.0


def test_clip_higher_and_lower_stop_the_gradient():
    up, down = float(np.log(1.5)), float(np.log(0.5))  # ratios 1.5 and 0.5: outside [0.8, 1.28]
    total, grad, sums = _loss([[up, down, up, down]], [[0.0] * 4], [[1.0, -1.0, -1.0, 1.0]])
    # A > 0, ratio 1.5: clipped at 1.28 (no gradient); A < 0, ratio 0.5: clipped at 0.8 (no gradient);
    # A < 0, ratio 1.5 and A > 0, ratio 0.5: the unclipped term is the larger loss and keeps its gradient.
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, 1.5, -0.5]]))
    assert total == pytest.approx(-1.28 + 0.8 + 1.5 - 0.5)
    assert sums["clipped"].item() == 2.0
    # control: a symmetric clip (the original PPO's 0.2) would cap the first ratio at 1.2
    symmetric = GrpoLoss(0.2, 0.2, 0.0, True, 1.0)
    assert _loss([[up]], [[0.0]], [[1.0]], loss=symmetric)[0] == pytest.approx(-1.2)


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    with_kl = GrpoLoss(0.2, 0.28, kl_coeff=0.5, policy_loss=False, temperature=1.0)
    total, _grad, sums = _loss([[-1.0]], [[-1.0]], [[3.0]], ref=[[-1.0]], loss=with_kl)
    assert total == 0.0 and sums["kl"].item() == 0.0  # policy loss off: the advantage does not enter
    total, _, sums = _loss([[-1.0]], [[-1.0]], [[3.0]], ref=[[-1.5]], loss=with_kl)
    d = -0.5  # ref - logp
    assert sums["kl"].item() == pytest.approx(np.exp(d) - d - 1)
    assert total == pytest.approx(0.5 * (np.exp(d) - d - 1))


def test_vocab_parallel_logprobs_and_entropy_match_torch(megatron_world):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=generator) * 3
    labels = torch.randint(0, 11, (2, 5), generator=generator)
    for temperature in (1.0, 0.7):
        reference = torch.log_softmax(logits / temperature, -1)
        expected = reference.gather(-1, labels[..., None])[..., 0]
        torch.testing.assert_close(token_logprobs(logits, labels, temperature), expected)
        entropy = -(reference.exp() * reference).sum(-1)
        torch.testing.assert_close(vocab_parallel_entropy(logits, temperature), entropy)
    # control: the temperature matters (log-probs at T = 1 are not those at 0.7)
    assert not torch.allclose(token_logprobs(logits, labels, 1.0), token_logprobs(logits, labels, 0.7))
