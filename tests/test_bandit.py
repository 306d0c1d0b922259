"""PPO (eq. 2) and DPO (eq. 6) on one discrete bandit head for the same KL-regularised optimum, eq. (5):
pi* = pi_ref exp(r / beta) / Z (tests/bandit.py)."""

import pytest

from tests import bandit


@pytest.fixture(scope="module")
def policies():
    return bandit.ppo(seed=0), bandit.dpo(seed=0)


def test_the_bandit_tells_the_optimum_from_wrong_answers():
    """So that landing near pi* means something: pi_ref (the reward ignored), argmax r (the KL ignored) and the
    optima for beta/2 and 2 beta are all far from pi*."""
    pi_star = bandit.optimum()
    assert bandit.tv(bandit.PI_REF, pi_star) > 0.35
    assert 1 - pi_star[bandit.REWARD.argmax()] > 0.35
    for wrong_beta in (bandit.BETA / 2, 2 * bandit.BETA):
        assert bandit.tv(bandit.optimum(beta=wrong_beta), pi_star) > 0.2


def test_ppo_on_a_bandit_reaches_the_kl_regularised_optimum(policies):
    # Tolerance: the last iterates are driven by 512-episode batches; the per-action sampling noise of the
    # advantage, sqrt(p(1-p)/n) <= 0.022, keeps the iterate wandering by about that much around pi* (3 seeds:
    # TV 0.004-0.005).
    ppo, _ = policies
    assert bandit.tv(ppo, bandit.optimum()) < 0.05, (ppo, bandit.optimum())


def test_dpo_on_a_bandit_reaches_the_kl_regularised_optimum(policies):
    # Tolerance. The minimiser is the Bradley-Terry maximum-likelihood reward estimate (up to a constant) mapped
    # through eq. (5), so it misses pi* only by the sampling error of the labels. The delta method (Fisher
    # information sum_ij n_ij p_ij (1 - p_ij) of the BT likelihood, for these pair counts, through
    # d pi / d r = (diag(pi*) - pi* pi*^T) / beta) gives standard errors of pi(y) of 0.003-0.014, so E[TV] ~ 0.013
    # and 0.5 * sum_y sd(pi(y)) = 0.017; 40 label seeds gave TV 0.013 +- 0.006, at most 0.029.
    _, (dpo, grad_norm) = policies
    assert grad_norm < 1e-8  # at the minimiser of the sampled objective
    assert bandit.tv(dpo, bandit.optimum()) < 0.05, (dpo, bandit.optimum())


def test_ppo_and_dpo_head_for_the_same_optimum(policies):
    """The seed's claim: the RL objective (PPO against the true reward) and DPO's loss on preferences labelled by
    it share one optimum. The two policies agree within both methods' noise (3 seeds: TV 0.003-0.021), ten times
    closer than either is to pi_ref."""
    ppo, (dpo, _) = policies
    assert bandit.tv(ppo, dpo) < 0.04, (ppo, dpo)
