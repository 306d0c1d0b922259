"""RLOO (REINFORCE leave-one-out; Ahmadian et al. 2024): TRL's RLOOTrainer against PPO's reward model, eq. (2)."""

from rloo.trainer import METHOD, build_trainer, run_identity, train

__all__ = ["METHOD", "build_trainer", "run_identity", "train"]
