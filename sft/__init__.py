"""The optional SFT stage before everything: the base model fine-tuned into pi_ref (sft/train.py)."""

from sft.train import SFTResult, sft_trainer, train_sft

__all__ = ["SFTResult", "sft_trainer", "train_sft"]
