"""PPO's pieces against hand computations (PPO on a discrete bandit against the optimum of eq. (5): test_bandit.py)."""

import math

import pytest
import torch

from ppo.core import (
    AdaptiveKLController,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae_advantages,
    kl_penalized_rewards,
    whiten,
)


def test_kl_penalized_rewards_put_the_score_on_the_last_real_token():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-2.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # second response ended early (EOS at t=1)
    rewards, kl = kl_penalized_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, beta=0.1)
    # row 0: -0.1 * [0.5, -1, 0] + score 2 at t=2; row 1: -0.1 * [1, 0] + score -1 at t=1, padding 0
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 2.0], [-0.1, -1.0, 0.0]]))
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]))


def test_gae_and_returns_by_hand_on_a_padded_episode():
    rewards = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 9.0]])  # the last position is padding: its value must be ignored
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    gamma, lam = 0.9, 0.8
    # by hand, backwards from the last real token (V after it = 0):
    d2 = 2.0 + 0 - 1.5  # 0.5
    d1 = 0.0 + 0.9 * 1.5 - 1.0  # 0.35
    d0 = 1.0 + 0.9 * 1.0 - 0.5  # 1.4
    a2 = d2
    a1 = d1 + 0.9 * 0.8 * a2  # 0.71
    a0 = d0 + 0.9 * 0.8 * a1  # 1.9112
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[a0 + 0.5, a1 + 1.0, a2 + 1.5, 0.0]]))


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.1, -0.2, 0.3]])
    values = torch.tensor([[0.0, 0.5, -0.5]])
    adv, ret = gae_advantages(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    assert torch.allclose(ret, torch.tensor([[0.2, 0.1, 0.3]]))
    assert torch.allclose(adv, ret - values)


def test_whiten_over_real_tokens_only():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    w = whiten(x, mask)
    # real entries 1, 2, 3, 4: mean 2.5, unbiased var 5/3
    want = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / math.sqrt(5 / 3)
    assert torch.allclose(w[mask == 1], want, atol=1e-6) and (w[mask == 0] == 0).all()


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    loss, stats = clipped_policy_loss(new, old, adv, mask, cliprange=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5; token 2: max(2.2, 2.2) = 2.2
    assert math.isclose(loss.item(), (-1.2 - 0.5 + 2.2) / 3, rel_tol=1e-6)
    assert math.isclose(stats["policy/clipfrac"].item(), 1 / 3, rel_tol=1e-6)
    assert math.isclose(stats["policy/ratio_mean"].item(), (1.5 + 0.5 + 1.1) / 3, rel_tol=1e-6)
    assert math.isclose(
        stats["policy/approxkl"].item(),
        0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 3,
        rel_tol=1e-6,
    )


def test_clipped_policy_loss_with_negative_advantages_by_hand():
    """A < 0: a ratio below 1 - eps is clipped (no more pushing down), one above 1 + eps is not (the full
    penalty for raising a bad token's probability)."""
    new = torch.log(torch.tensor([[0.5, 1.5, 0.9]]))  # ratios 0.5, 1.5, 0.9
    loss, stats = clipped_policy_loss(
        new, torch.zeros(1, 3), torch.tensor([[-1.0, -1.0, -1.0]]), torch.ones(1, 3), cliprange=0.2
    )
    # token 0: max(0.5, 0.8) = 0.8 (clipped); token 1: max(1.5, 1.2) = 1.5; token 2: max(0.9, 0.9) = 0.9
    assert math.isclose(loss.item(), (0.8 + 1.5 + 0.9) / 3, rel_tol=1e-6)
    assert math.isclose(stats["policy/clipfrac"].item(), 1 / 3, rel_tol=1e-6)


def test_clipped_value_loss_by_hand():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, -0.1]])
    ret = torch.tensor([[2.0, 1.0]])
    loss, stats = clipped_value_loss(new, old, ret, torch.ones(1, 2), cliprange_value=0.2)
    # token 0: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 3.24; token 1: (-0.1-1)^2 = 1.21 both
    assert math.isclose(loss.item(), 0.5 * (3.24 + 1.21) / 2, rel_tol=1e-6)
    assert stats["val/clipfrac"].item() == 0.5


def test_explained_variance_and_adaptive_kl():
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert explained_variance(ret, ret, torch.ones(1, 4)) == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 4), 2.5), ret, torch.ones(1, 4)) == pytest.approx(0.0)
    ctl = AdaptiveKLController(beta=0.1, target=6.0, horizon=10000)
    assert ctl.update(12.0, 1000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped at +0.2
    assert ctl.update(5.4, 1000) == pytest.approx(0.102 * (1 - 0.1 * 0.1))  # error -0.1
