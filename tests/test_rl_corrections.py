"""The policy-loss seam and the rollout corrections against hand-computed values: GSPO's sequence ratio, its clip
and gradient beside GRPO's; TIS and MIS at token, sequence and geometric level, the veto; a planted biased engine
(log-probs at another temperature) whose ratios TIS and MIS bound. Each check has a control that fails it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from glm45_train.config.errors import RecipeError
from glm45_train.config.recipe import load_recipe
from glm45_train.config.rl import LOSSES as RECIPE_LOSSES
from glm45_train.config.rl import check_rl_values
from glm45_train.data.prepared import Batch
from glm45_train.rl.batches import MicroBatch
from glm45_train.rl.correction import CorrectionSpec, correct
from glm45_train.rl.losses import LOSSES, LossSpec, TokenTerms, policy_loss
from tests.conftest import REPO_ROOT

GSPO = LossSpec("gspo", clip_low=3e-4, clip_high=4e-4, kl_coeff=0.0, policy_loss=True, temperature=1.0)
GRPO = LossSpec("grpo", clip_low=0.2, clip_high=0.28, kl_coeff=0.0, policy_loss=True, temperature=1.0)


def test_every_loss_a_recipe_may_name_is_registered():
    assert set(RECIPE_LOSSES) == set(LOSSES)


def _loss(spec, log_ratio, adv, mask=None, weights=None, keep=None):
    """Loss, gradient on logp, logged sums; old_logp 0, so logp is the log-ratio."""
    logp = torch.tensor(log_ratio, dtype=torch.float64, requires_grad=True)
    mask = torch.ones_like(logp) if mask is None else torch.tensor(mask, dtype=torch.float64)
    segments = torch.arange(logp.shape[0]).view(-1, 1).expand_as(logp)
    terms = TokenTerms(logp, torch.zeros_like(logp), torch.tensor(adv, dtype=torch.float64), mask, segments,
                       weights=weights, keep=keep)  # fmt: skip
    total, count, sums = policy_loss(spec, terms)
    total.backward()
    return total.item(), logp.grad, sums, count.item()


def test_gspo_one_ratio_per_sequence_where_grpo_clips_a_token():
    """Token ratios 1.5 and 1/1.5 in one sequence: GRPO clips the first (A > 0, above 1.28) and keeps the second;
    GSPO's sequence ratio is exp(mean log ratio) = 1, so both tokens get the on-policy gradient -A."""
    up = math.log(1.5)
    _, grad, sums, _ = _loss(GRPO, [[up, -up]], [[1.0, 1.0]])
    torch.testing.assert_close(grad, torch.tensor([[0.0, -1 / 1.5]], dtype=torch.float64))
    assert sums["clipped"].item() == 1.0
    total, grad, sums, _ = _loss(GSPO, [[up, -up]], [[1.0, 1.0]])
    torch.testing.assert_close(grad, torch.tensor([[-1.0, -1.0]], dtype=torch.float64))
    assert total == pytest.approx(-2.0) and sums["clipped"].item() == 0.0


def test_gspo_gradient_is_the_sequence_ratio_and_padding_is_left_out():
    """s = exp((a + b) / 2) over the two masked tokens (the third, masked, would move it); d loss / d logp_t =
    -A s on each (the sum of the sequence's two terms -A s, each contributing s / 2)."""
    a, b = 1e-4, -2e-4  # inside GSPO's [1 - 3e-4, 1 + 4e-4]
    s = math.exp((a + b) / 2)
    total, grad, _, count = _loss(GSPO, [[a, b, 5.0]], [[0.5, 0.5, 0.5]], mask=[[1, 1, 0]])
    assert total == pytest.approx(-0.5 * s * 2) and count == 2
    torch.testing.assert_close(grad, torch.tensor([[-0.5 * s, -0.5 * s, 0.0]], dtype=torch.float64))


def test_gspo_clips_whole_sequences_with_its_own_narrow_range():
    """A > 0 and s = exp(1e-3) > 1 + 4e-4: every token of the sequence is clipped (no gradient); the second
    sequence (A < 0, s below 1 - 3e-4) too; the same ratios are far inside GRPO's range (control)."""
    total, grad, sums, _ = _loss(GSPO, [[1e-3, 1e-3], [-1e-3, -1e-3]], [[1.0, 1.0], [-1.0, -1.0]])
    assert torch.count_nonzero(grad) == 0 and sums["clipped"].item() == 4.0
    assert total == pytest.approx(-2 * (1 + 4e-4) + 2 * (1 - 3e-4))
    _, grad, sums, _ = _loss(GRPO, [[1e-3, 1e-3], [-1e-3, -1e-3]], [[1.0, 1.0], [-1.0, -1.0]])
    assert torch.count_nonzero(grad) == 4 and sums["clipped"].item() == 0.0


def test_correction_weights_scale_the_policy_term_and_the_mask_leaves_the_count():
    weights = torch.tensor([[2.0, 0.5]], dtype=torch.float64)
    total, grad, _, count = _loss(GRPO, [[0.0, 0.0]], [[1.0, 1.0]], weights=weights)
    assert total == pytest.approx(-2.5) and count == 2
    torch.testing.assert_close(grad, torch.tensor([[-2.0, -0.5]], dtype=torch.float64))
    total, grad, _, count = _loss(GRPO, [[0.0, 0.0]], [[1.0, 1.0]], keep=torch.tensor([[1.0, 0.0]]).double())
    assert total == pytest.approx(-1.0) and count == 1
    torch.testing.assert_close(grad, torch.tensor([[-1.0, 0.0]], dtype=torch.float64))


# -- rollout correction ------------------------------------------------------------------------------------

# Two samples, response tokens on positions 1-3 of the first and 1-2 of the second (position 0: a prompt label).
MASK = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.float32)
# log rho = old - engine per response token
LOG_RHO = torch.tensor([[0.0, math.log(3.0), 0.0, math.log(0.8)], [0.0, math.log(1.5), math.log(1.6), 0.0]])


def _micro(log_rho=LOG_RHO, engine=None) -> MicroBatch:
    rows, length = MASK.shape
    zeros = torch.zeros(rows, length, dtype=torch.int64)
    batch = Batch(zeros, zeros, MASK.clone(), zeros, torch.zeros(2, dtype=torch.int32), None)
    engine_logp = torch.full((rows, length), -1.0) if engine is None else engine
    micro = MicroBatch(batch, torch.ones(rows, length), engine_logp)
    micro.old_logp = engine_logp + log_rho * MASK
    return micro


def _weights(spec: CorrectionSpec) -> tuple[MicroBatch, torch.Tensor]:
    micro = _micro()
    return micro, correct(spec, micro)


def test_tis_token_level_truncates_each_token_at_the_cap():
    micro, sums = _weights(CorrectionSpec("tis", "token", tis_cap=2.0))
    expected = torch.tensor([[0.0, 2.0, 1.0, 0.8], [0.0, 1.5, 1.6, 0.0]])
    torch.testing.assert_close(micro.weights, expected)
    assert micro.keep is None
    assert sums[2].item() == 1.0 and sums[0].item() == 5.0  # one truncated of five trained tokens


def test_tis_sequence_level_uses_the_product_and_geometric_its_mean():
    micro, sums = _weights(CorrectionSpec("tis", "sequence", tis_cap=2.0))
    # row 0: 3 x 1 x 0.8 = 2.4 -> 2.0 (three tokens truncated); row 1: 1.5 x 1.6 = 2.4 -> 2.0
    torch.testing.assert_close(micro.weights, 2.0 * MASK)
    assert sums[2].item() == 5.0
    micro, sums = _weights(CorrectionSpec("tis", "geometric", tis_cap=2.0))
    first, second = 2.4 ** (1 / 3), 2.4 ** (1 / 2)  # 1.339, 1.549: under the cap
    torch.testing.assert_close(micro.weights, torch.tensor([[0, first, first, first], [0, second, second, 0]]))
    assert sums[2].item() == 0.0


def test_mis_masks_tokens_or_whole_sequences_outside_the_range():
    micro, sums = _weights(CorrectionSpec("mis", "token", mis_low=0.5, mis_high=2.0))
    torch.testing.assert_close(micro.keep, torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    assert micro.weights is None and sums[3].item() == 1.0
    micro, sums = _weights(CorrectionSpec("mis", "sequence", mis_low=0.5, mis_high=2.0))
    torch.testing.assert_close(micro.keep, torch.zeros(2, 4))  # both products are 2.4
    assert sums[3].item() == 5.0
    micro, sums = _weights(CorrectionSpec("mis", "geometric", mis_low=0.5, mis_high=1.5))
    torch.testing.assert_close(micro.keep, torch.tensor([[1.0] * 4, [0.0] * 4]))  # 1.339 kept, 1.549 not
    assert sums[3].item() == 2.0


def test_the_veto_drops_a_sequence_holding_a_near_impossible_token_in_any_mode():
    engine = torch.full((2, 4), -1.0)
    engine[1, 2] = -30.0  # the engine gave this sampled token probability e^-30
    engine[0, 0] = -40.0  # a prompt position: not a sampled token, no veto
    micro = _micro(engine=engine)
    sums = correct(CorrectionSpec("none", "token", veto_logprob=-20.0), micro)
    torch.testing.assert_close(micro.keep, torch.tensor([[1.0] * 4, [0.0] * 4]))
    assert micro.weights is None and sums[3].item() == 2.0
    control = _micro(engine=engine)
    correct(CorrectionSpec("none", "token"), control)  # no veto set: nothing masked
    assert control.keep is None and control.weights is None


def test_k3_of_engine_to_trainer_is_logged_and_zero_without_mismatch():
    _, sums = _weights(CorrectionSpec())
    rho = np.array([3.0, 1.0, 0.8, 1.5, 1.6])
    assert sums[1].item() == pytest.approx(float(np.sum(rho - 1 - np.log(rho))))
    _, same = _weights(CorrectionSpec())
    zero = correct(CorrectionSpec(), _micro(log_rho=torch.zeros(2, 4)))
    assert zero[1].item() == 0.0 and same[1].item() > 0


def test_a_biased_engine_is_seen_and_tis_mis_bound_its_ratios():
    """The engine samples at temperature 2 while the trainer's policy is at 1.0 (a planted mismatch). Without a
    correction the ratios pi_old / pi_engine pass 2 and the plain sample mean of a statistic is off its
    value under pi_old; TIS's weights stay <= 2 and bring the weighted mean back; MIS keeps only ratios in range."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(32, generator=generator) * 3.0
    trainer, engine = torch.log_softmax(logits, -1), torch.log_softmax(logits / 2.0, -1)
    tokens = torch.multinomial(engine.exp(), 4096, replacement=True, generator=generator)
    rows = tokens.view(-1, 1)
    batch_mask = torch.ones(rows.shape)
    zeros = torch.zeros(rows.shape, dtype=torch.int64)
    micro = MicroBatch(Batch(zeros, zeros, batch_mask, zeros, zeros[:1, 0].int(), None), torch.ones(rows.shape),
                       engine[rows])  # fmt: skip
    micro.old_logp = trainer[rows]
    ratio = torch.exp(micro.old_logp - micro.engine_logp)
    assert ratio.max() > 2.0 and ratio.min() < 0.5  # the mismatch is real
    top = (rows == logits.argmax()).double()
    truth = trainer.exp()[logits.argmax()].item()  # P(argmax) under the trainer's policy
    plain = top.mean().item()
    assert abs(plain - truth) > 0.1  # uncorrected, the estimate is far off
    correct(CorrectionSpec("tis", "token", tis_cap=2.0), micro)
    assert micro.weights.max().item() == pytest.approx(2.0)
    weighted = (top * micro.weights).sum().item() / micro.weights.sum().item()
    assert abs(weighted - truth) < abs(plain - truth) / 2
    masked = MicroBatch(micro.batch, micro.advantages, micro.engine_logp, old_logp=micro.old_logp)
    correct(CorrectionSpec("mis", "token", mis_low=0.5, mis_high=2.0), masked)
    kept = ratio[masked.keep > 0]
    assert 0 < kept.numel() < ratio.numel() and kept.min() >= 0.5 and kept.max() <= 2.0


# -- recipe keys ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("rl.loss=ppo", "rl.loss"),
        ("rl.gspo.clip_low=0", "rl.gspo.clip_low"),
        ("rl.correction.mode=clip", "rl.correction.mode"),
        ("rl.correction.level=batch", "rl.correction.level"),
        ("rl.correction.tis_cap=0.5", "rl.correction.tis_cap"),
        ("rl.correction.mis_high=0.9", "rl.correction.mis_low"),
        ("rl.correction.veto_logprob=3", "rl.correction.veto_logprob"),
        ("rl.routing_replay=r2", "rl.routing_replay"),
    ],
)
def test_bad_values_are_refused_naming_the_key(override, key):
    recipe = load_recipe(REPO_ROOT / "recipes/tiny_grpo.yaml", ["model.source=unused", override])
    with pytest.raises(RecipeError, match=f"key '{key}'"):
        check_rl_values(recipe)
