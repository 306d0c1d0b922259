"""Online DPO (Guo et al. 2024): eq. (6)'s loss on pairs sampled from the current policy and ranked by PPO's reward
model, through TRL's OnlineDPOTrainer."""

from online_dpo.trainer import METHOD, build_trainer, run_identity, train

__all__ = ["METHOD", "build_trainer", "run_identity", "train"]
