"""Each preference / KTO loss against its formula, computed by hand with `math` on fixed log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from tunepipe.train.preference.losses import (
    dpo_hinge_loss,
    dpo_sigmoid_loss,
    ipo_loss,
    kto_kl_estimate,
    kto_loss,
    orpo_loss,
    sequence_log_probs,
    simpo_loss,
)

# One pair: policy and reference log-probs of the chosen and rejected answers.
PC, PR, RC, RR = -4.0, -6.5, -5.0, -6.0
BETA = 0.1
MARGIN = (PC - RC) - (PR - RR)  # 1.0 - (-0.5) = 1.5


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_sigmoid_at_step_zero_is_ln2_with_zero_rewards():
    # Policy equals reference: every log-ratio is 0, whatever the log-probs are.
    policy_c, policy_r = t(-3.0, -10.0, -0.5), t(-7.0, -2.0, -0.1)
    for smoothing in (0.0, 0.2):
        out = dpo_sigmoid_loss(policy_c, policy_r, policy_c.clone(), policy_r.clone(), BETA, smoothing)
        assert torch.allclose(out.losses, torch.full((3,), math.log(2), dtype=torch.float64))
        assert torch.all(out.chosen_rewards == 0) and torch.all(out.rejected_rewards == 0)
        assert torch.all(out.chosen_rewards - out.rejected_rewards == 0)


def test_dpo_sigmoid_matches_formula():
    out = dpo_sigmoid_loss(t(PC), t(PR), t(RC), t(RR), BETA)
    assert out.losses.item() == pytest.approx(-log_sigmoid(BETA * MARGIN), rel=1e-12)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-0.15)), rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(BETA * (PC - RC))
    assert out.rejected_rewards.item() == pytest.approx(BETA * (PR - RR))


def test_dpo_label_smoothing_matches_robust_dpo_formula():
    eps = 0.25
    out = dpo_sigmoid_loss(t(PC), t(PR), t(RC), t(RR), BETA, label_smoothing=eps)
    expected = -(1 - eps) * log_sigmoid(0.15) - eps * log_sigmoid(-0.15)
    assert out.losses.item() == pytest.approx(expected, rel=1e-12)


def test_hinge_matches_formula_and_is_zero_past_the_margin():
    out = dpo_hinge_loss(t(PC), t(PR), t(RC), t(RR), BETA)
    assert out.losses.item() == pytest.approx(1 - 0.15, rel=1e-12)
    past = dpo_hinge_loss(t(PC), t(PR), t(RC), t(RR), beta=1.0)  # 1 - 1.5 < 0
    assert past.losses.item() == 0.0


def test_ipo_matches_formula():
    out = ipo_loss(t(PC), t(PR), t(RC), t(RR), BETA)
    assert out.losses.item() == pytest.approx((1.5 - 1 / (2 * BETA)) ** 2, rel=1e-12)  # (1.5 - 5)^2 = 12.25
    assert out.losses.item() == pytest.approx(12.25, rel=1e-12)


def test_orpo_matches_formula():
    chosen, rejected = -0.5, -1.2  # mean per-token log-probs
    out = orpo_loss(t(chosen), t(rejected), BETA)

    def log_odds(logp: float) -> float:
        p = math.exp(logp)
        return math.log(p / (1 - p))

    expected = -chosen - BETA * log_sigmoid(log_odds(chosen) - log_odds(rejected))
    assert out.losses.item() == pytest.approx(expected, rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(BETA * chosen)
    assert out.rejected_rewards.item() == pytest.approx(BETA * rejected)


def test_simpo_matches_formula():
    chosen, rejected, beta, gamma = -0.8, -1.4, 2.0, 0.5
    out = simpo_loss(t(chosen), t(rejected), beta, gamma)
    assert out.losses.item() == pytest.approx(-log_sigmoid(beta * (chosen - rejected) - gamma), rel=1e-12)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-0.7)), rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(beta * chosen)


def test_kto_kl_estimate_is_clamped_batch_mean():
    assert kto_kl_estimate(t(-3.0, -5.0), t(-4.0, -5.0)).item() == pytest.approx(0.5)
    assert kto_kl_estimate(t(-6.0, -5.0), t(-4.0, -5.0)).item() == 0.0


def test_kto_matches_formula_with_weights():
    policy, ref = t(-4.0, -6.0), t(-5.0, -5.5)  # log-ratios +1.0 (desirable), -0.5 (undesirable)
    desirable = torch.tensor([True, False])
    kl, beta, w_d, w_u = torch.tensor(0.3, dtype=torch.float64), 0.5, 1.0, 1.33
    out = kto_loss(policy, ref, desirable, kl, beta, w_d, w_u)

    def sigmoid(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    expected = [w_d * (1 - sigmoid(beta * (1.0 - 0.3))), w_u * (1 - sigmoid(beta * (0.3 - (-0.5))))]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert out.rewards.tolist() == pytest.approx([0.5, -0.25])


def test_sequence_log_probs_sums_only_trained_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 6, -100, -100]])
    logps, counts = sequence_log_probs(logits, labels)
    log_softmax = logits.log_softmax(-1)
    expected0 = log_softmax[0, 1, 3] + log_softmax[0, 2, 4] + log_softmax[0, 3, 1]
    expected1 = log_softmax[1, 0, 2] + log_softmax[1, 1, 6]
    assert counts.tolist() == [3, 2]
    assert torch.allclose(logps, torch.stack([expected0, expected1]), atol=1e-6)
