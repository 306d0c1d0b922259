"""The pieces of PPO for RLHF as small pure functions on [batch, response-token] tensors.

Conventions: `mask` is 1 on real response tokens (up to and including EOS) and 0 on padding; every
function leaves padded positions at 0 and never lets them into a mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked entries."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalise to mean 0 and variance 1 over the masked entries; padding stays 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def kl_penalized_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of the KL-penalised objective, eq. (2):

        r_t = -beta * (log pi(y_t) - log pi_ref(y_t))            for every response token t
        r_T += r_phi(x, y)                                        on the last real token T (EOS if any)

    so the episode return is r_phi(x, y) - beta * sum_t log pi/pi_ref, a one-sample estimate of eq. (2)'s
    r_phi - beta KL. Returns (rewards [B, R], per-token KL estimate [B, R]).
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -beta * kl
    last = (mask.sum(dim=1) - 1).clamp(min=0).long()  # index of the last real token of each response
    rewards[torch.arange(rewards.shape[0]), last] += scores
    return rewards * mask, kl


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (Schulman et al. 2016, eq. 16,
    A_t = sum_l (gamma lam)^l delta_{t+l}, computed backwards):

        delta_t = r_t + gamma V(s_{t+1}) - V(s_t),   A_t = delta_t + gamma lam A_{t+1}

    with V = 0 and A = 0 past the last real token (the episode ends at EOS or at the length cap).
    Returns (advantages, returns = advantages + values), both zero on padding.
    """
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value, next_advantage = values[:, t], advantages[:, t]
    return advantages, (advantages + values) * mask


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise (per-token, masked mean):

    L = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)),   rho_t = pi(y_t) / pi_old(y_t)
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "policy/clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "policy/approxkl": 0.5 * masked_mean(log_ratio**2, mask),
            "policy/ratio_mean": masked_mean(ratio, mask),
            "policy/ratio_var": masked_var(ratio, mask),
        }
    return loss, stats


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (as in OpenAI's baselines and Huang et al. 2024's PPO):
    0.5 * mean_t max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, +-eps)."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        stats = {"val/clipfrac": masked_mean((clipped_err > unclipped_err).float(), mask)}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over real tokens: 1 = perfect value function, <= 0 = no better than a constant."""
    var_returns = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var_returns) if var_returns > 0 else float("nan")


@dataclass
class AdaptiveKLController:
    """Ziegler et al. (2019): nudge beta so the observed KL tracks `target`.

    e = clip(KL / target - 1, -0.2, 0.2),   beta <- beta * (1 + e * n_episodes / horizon)
    """

    beta: float
    target: float
    horizon: int

    def update(self, observed_kl: float, n_episodes: int) -> float:
        error = min(max(observed_kl / self.target - 1, -0.2), 0.2)
        self.beta *= 1 + error * n_episodes / self.horizon
        return self.beta
