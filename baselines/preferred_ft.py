"""Preferred-FT (the DPO paper's Fig. 2): supervised fine-tuning of pi_ref on the chosen response of every pair of
the shared preference set, with TRL's SFTTrainer.

    train_preferred_ft(cfg, prefs, seed) -> PreferredFTResult

The loss is the negative log-likelihood of the chosen response's tokens, averaged over those tokens, with the prompt
as context only (TRL's completion-only loss on prompt / completion rows; EOS appended, as DPO's trainer does). It
reads the labels but never the rejected response: how much of DPO's gain does imitating the preferred half of the
pairs get? The shared evaluator runs at step 0 (pi_ref itself), every `sft.eval_every` steps and at the end, into
runs/<profile>/sft-chosen/<run-id>/.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import trl
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from pipelines.config import Config
from pipelines.data import PreferenceSet
from pipelines.evaluate import evaluate
from pipelines.models import for_training, load_policy_and_reference, save_model
from pipelines.rundir import RunDir
from pipelines.stages import make_eval_context
from pipelines.trl_callbacks import EvalAndLogCallback, quiet_progress_bar, run_dir_args

METHOD = "sft-chosen"


@dataclass
class PreferredFTResult:
    run_dir: Path
    steps: int                        # optimiser steps taken
    final_metrics: dict[str, float]   # the shared evaluator's metrics at the last step


def trainer_args(cfg: Config, seed: int, output_dir: Path, device: torch.device) -> trl.SFTConfig:
    s = cfg.sft
    return trl.SFTConfig(
        output_dir=str(output_dir),
        completion_only_loss=True,       # the prompt is context, not a target
        packing=False,                   # one pair's prompt and chosen response a row, as DPO sees them
        learning_rate=s.learning_rate, lr_scheduler_type="constant", per_device_train_batch_size=s.batch_size,
        num_train_epochs=s.epochs, max_steps=s.max_steps or -1, max_length=s.max_length,
        **run_dir_args(cfg.model, seed, device),  # sets gradient checkpointing (TRL's default is on)
    )


def build_trainer(cfg: Config, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: Dataset,
                  seed: int, output_dir: Path, callbacks: list[TrainerCallback]) -> trl.SFTTrainer:
    """The SFT trainer on the pairs' chosen responses. The rows are an in-memory copy: TRL's map() calls would
    otherwise write cache files into the shared preference set's folder, whose sha256 its manifest guards."""
    rows = Dataset.from_dict({"prompt": pairs["prompt"], "completion": pairs["chosen"]})
    return quiet_progress_bar(trl.SFTTrainer(
        model=policy, args=trainer_args(cfg, seed, output_dir, policy.device), train_dataset=rows,
        processing_class=tokenizer, callbacks=callbacks))


def train_preferred_ft(cfg: Config, prefs: PreferenceSet, seed: int) -> PreferredFTResult:
    """One Preferred-FT run from pi_ref on the shared preference set's chosen responses."""
    policy, ref, tokenizer = load_policy_and_reference(cfg.model, cfg.hub_access)  # ref: the evaluator's only
    policy = for_training(policy, cfg, "CAUSAL_LM", trainer_checkpointing=True)
    device = policy.device
    run = RunDir.create(cfg, METHOD, seed, device, prefs.sha256)
    with run.running():
        ctx = make_eval_context(cfg, prefs, ref, tokenizer, device)
        callback = EvalAndLogCallback(run, lambda model, step: evaluate(model, ctx, desc=f"eval step {step}"),
                                      cfg.sft.eval_every, device, name="Preferred-FT step")
        build_trainer(cfg, policy, tokenizer, prefs.train, seed, run.path / "checkpoints", [callback]).train()
        with run.stage("save", device):
            save_model(policy, tokenizer, run.path / "checkpoints" / "final")
    step, metrics = callback.last_eval
    return PreferredFTResult(run.path, step, metrics)
