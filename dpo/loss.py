"""The DPO objective, eq. (6) of docs/DPO-derivation.md, and the weight its gradient puts on each pair.

Everything here works on sequence log-probabilities, log pi(y|x) = sum_t log pi(y_t | x, y_<t), shape [B]:
the language model only enters through them (see docs/dpo.md for the gradient derivation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss, the negative of the objective in eq. (6):

        loss = -log sigmoid(beta * log pi(y_w|x)/pi_ref(y_w|x) - beta * log pi(y_l|x)/pi_ref(y_l|x))

    Returns (losses, chosen_rewards, rejected_rewards), each [B]. The rewards are the implicit rewards of
    eq. (5), r_hat(x, y) = beta * log pi(y|x)/pi_ref(y|x), without the beta * log Z(x) term, which is the same
    for both responses of a pair and cancels in the difference; they are detached (for logging only).
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    # logsigmoid rather than log(sigmoid(.)): exact for large negative margins, where sigmoid underflows to 0
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def dpo_gradient_weight(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """sigmoid(r_hat(x, y_l) - r_hat(x, y_w)), the weight of each pair in the gradient of eq. (6):

        grad loss = -beta * weight * (grad log pi(y_w|x) - grad log pi(y_l|x))

    It is the probability the implicit reward model gives to the wrong ranking: near 1 for a pair the policy
    still gets wrong (a full step), near 0 for a pair it already ranks right by a wide margin (no step).
    """
    return torch.sigmoid(rejected_rewards - chosen_rewards)
