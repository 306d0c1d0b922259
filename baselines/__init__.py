"""The DPO paper's controls for the reward-KL frontier (its Fig. 2), beside PPO-GT (`ppo.reward=gold`, in ppo/):
Best-of-N from pi_ref under the learned reward model, and Preferred-FT (docs/baselines.md)."""

from baselines.best_of_n import BestOfNResult, best_of_n, kl_bound, pick_best
from baselines.preferred_ft import train_preferred_ft

__all__ = ["BestOfNResult", "best_of_n", "kl_bound", "pick_best", "train_preferred_ft"]
