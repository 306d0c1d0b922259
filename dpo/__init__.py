"""DPO, eq. (6) of docs/DPO-derivation.md: the loss, its gradient weight, and one training run (docs/dpo.md)."""

from dpo.loss import dpo_gradient_weight, dpo_loss
from dpo.trainer import method_name, run_identity, train

__all__ = ["dpo_gradient_weight", "dpo_loss", "method_name", "run_identity", "train"]
