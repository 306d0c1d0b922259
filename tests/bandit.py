"""The seed's eq. (5) on a discrete bandit: one prompt, five one-token responses, a tabular policy. The
KL-regularised optimum pi* = pi_ref exp(r / beta) / Z is exact here, so PPO (eq. 2) and DPO (eq. 6) can both be
checked against it, and against each other."""

import torch

from dpo import dpo_loss
from ppo.core import clipped_policy_loss, clipped_value_loss, gae_advantages, kl_penalized_rewards, whiten

PI_REF = torch.tensor([0.40, 0.25, 0.15, 0.12, 0.08], dtype=torch.float64)  # not uniform: pi_ref must matter
REWARD = torch.tensor([-1.0, 0.0, 1.0, 0.5, 2.0], dtype=torch.float64)
BETA = 1.0


def optimum(pi_ref: torch.Tensor = PI_REF, reward: torch.Tensor = REWARD, beta: float = BETA) -> torch.Tensor:
    """Eq. (5): pi_ref exp(r / beta) / Z."""
    return torch.softmax(pi_ref.log() + reward / beta, dim=0)


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    """Total-variation distance between two distributions over the responses."""
    return 0.5 * (p - q).abs().sum().item()


def ppo(seed: int = 0, pi_ref: torch.Tensor = PI_REF, reward: torch.Tensor = REWARD, beta: float = BETA,
        iterations: int = 600, episodes: int = 512) -> torch.Tensor:
    """PPO with the KL-penalised reward of eq. (2), from pi_ref, through ppo.core's pieces as ppo/train.py uses
    them (per-token KL penalty, GAE, whitened advantages, clipped policy and value losses, 2 epochs a batch)."""
    torch.manual_seed(seed)
    log_ref = pi_ref.log().float()
    logits = log_ref.clone().requires_grad_(True)
    value = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([logits, value], lr=0.02)
    mask = torch.ones(episodes, 1)
    for _ in range(iterations):
        with torch.no_grad():
            old_logp_all = torch.log_softmax(logits, 0)
            actions = torch.multinomial(old_logp_all.exp(), episodes, replacement=True)
            old_logp = old_logp_all[actions][:, None]
            rewards, _ = kl_penalized_rewards(reward.float()[actions], old_logp, log_ref[actions][:, None], mask,
                                              beta)
            old_values = value.detach().expand(episodes, 1)
            adv, ret = gae_advantages(rewards, old_values, mask, 1.0, 0.95)
            adv = whiten(adv, mask)
        for _ in range(2):  # two PPO epochs on the same batch
            new_logp = torch.log_softmax(logits, 0)[actions][:, None]
            pg, _ = clipped_policy_loss(new_logp, old_logp, adv, mask, 0.2)
            vf, _ = clipped_value_loss(value.expand(episodes, 1), old_values, ret, mask, 10.0)
            opt.zero_grad()
            (pg + 0.5 * vf).backward()
            opt.step()
    return torch.softmax(logits.detach().double(), 0)


def dpo(seed: int = 0, pi_ref: torch.Tensor = PI_REF, reward: torch.Tensor = REWARD, beta: float = BETA,
        n_pairs: int = 20_000) -> tuple[torch.Tensor, float]:
    """DPO's loss (eq. 6) minimised by full-batch gradient descent from pi_ref, on pairs drawn from pi_ref (as the
    preference set is; pairs of one response twice dropped) labelled by Bradley-Terry on the true reward,
    P(y1 > y2) = sigmoid(r1 - r2). Returns the policy and the final gradient norm."""
    torch.manual_seed(seed)
    pairs = torch.multinomial(pi_ref, 2 * n_pairs, replacement=True).view(-1, 2)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    first_wins = torch.rand(len(pairs), dtype=pi_ref.dtype) < torch.sigmoid(reward[pairs[:, 0]] - reward[pairs[:, 1]])
    winner = torch.where(first_wins, pairs[:, 0], pairs[:, 1])
    loser = torch.where(first_wins, pairs[:, 1], pairs[:, 0])
    # The loss is convex in the logits (a logistic regression on logit differences): step 5 converges in a few
    # hundred steps.
    ref_logps = pi_ref.log()
    logits = ref_logps.clone().requires_grad_(True)
    for _ in range(300):
        logps = torch.log_softmax(logits, dim=0)
        loss = dpo_loss(logps[winner], logps[loser], ref_logps[winner], ref_logps[loser], beta)[0].mean()
        (grad,) = torch.autograd.grad(loss, logits)
        with torch.no_grad():
            logits -= 5.0 * grad
    return torch.softmax(logits.detach(), dim=0), grad.norm().item()
