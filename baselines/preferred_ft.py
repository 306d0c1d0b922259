"""Preferred-FT (the DPO paper's Fig. 2): supervised fine-tuning of pi_ref on the chosen response of every pair of
the training budget (`budget:`, the pairs the reward model and DPO train on), with TRL's SFTTrainer.

    train_preferred_ft(cfg, prefs, seed) -> PreferredFTResult

The loss is the negative log-likelihood of the chosen response's tokens, averaged over those tokens, with the prompt
as context only (TRL's completion-only loss on prompt / completion rows; EOS appended, as DPO's trainer does). It
reads the labels but never the rejected response: how much of DPO's gain does imitating the preferred half of the
pairs get? The shared evaluator runs at step 0 (pi_ref itself), every `preferred_ft.eval_every` steps and at the
end, into runs/<profile>/preferred-ft/<run-id>/.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trl
from accelerate.utils import set_seed
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from rlhf.config import Config
from rlhf.data import PreferenceSet, budget_pairs, budget_record
from rlhf.evaluate import evaluate, make_eval_context
from rlhf.flops import pass_parameters
from rlhf.models import for_training, load_policy_and_reference, resolve_model_path
from rlhf.reference import reference_model
from rlhf.rundir import RunDir
from rlhf.trl_callbacks import EvalAndLogCallback, save_policy
from sft import sft_trainer

METHOD = "preferred-ft"


@dataclass
class PreferredFTResult:
    run_dir: Path
    steps: int  # optimiser steps taken
    final_metrics: dict[str, float]  # the shared evaluator's metrics at the last step


def build_trainer(
    cfg: Config,
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Dataset,
    seed: int,
    output_dir: Path,
    callbacks: list[TrainerCallback],
) -> trl.SFTTrainer:
    """The SFT trainer (the SFT stage's, sft.sft_trainer) on the pairs' chosen responses. The rows are an in-memory
    copy: TRL's map() calls would otherwise write cache files into the shared preference set's folder, whose sha256
    its manifest guards."""
    rows = Dataset.from_dict({"prompt": pairs["prompt"], "completion": pairs["chosen"]})
    settings = cfg.preferred_ft
    return sft_trainer(
        policy,
        tokenizer,
        rows,
        settings,
        cfg.budget.passes(settings.epochs),
        None,
        cfg.model,
        cfg.weight_decay,
        seed,
        output_dir,
        callbacks,
    )


def run_identity(cfg: Config) -> tuple[str, dict]:
    """The method and extra inputs a Preferred-FT run's directory is keyed by (rlhf.rundir.run_key), as for DPO."""
    return METHOD, {"reference_model": resolve_model_path(reference_model(cfg), cfg.hub_access)}


def train_preferred_ft(cfg: Config, prefs: PreferenceSet, seed: int) -> PreferredFTResult:
    """One Preferred-FT run from pi_ref on the shared preference set's chosen responses."""
    set_seed(seed)  # first: a new scalar head or LoRA adapters drawn below must not depend on the process
    policy, ref, tokenizer = load_policy_and_reference(reference_model(cfg), cfg.hub_access)  # ref: the evaluator's
    policy = for_training(policy, cfg, "CAUSAL_LM", trainer_checkpointing=True)
    device = policy.device
    method, extra = run_identity(cfg)
    # no resume points: a killed run starts again from the start, in its own directory
    run, _ = RunDir.open(cfg, method, seed, device, prefs.sha256, extra=extra)
    with run.running():
        ctx = make_eval_context(cfg, prefs, ref, tokenizer, device)
        callback = EvalAndLogCallback(
            run,
            lambda model, step, _final: evaluate(model, ctx, desc=f"eval step {step}"),
            cfg.preferred_ft.eval_every,
            device,
            pass_parameters(policy),
            name="Preferred-FT step",
        )
        pairs = budget_pairs(cfg, prefs)  # the budget's pairs, as the reward model's and DPO's
        run.manifest["budget"] = budget_record(len(pairs), cfg.budget.passes(cfg.preferred_ft.epochs))
        build_trainer(cfg, policy, tokenizer, pairs, seed, run.path / "checkpoints", [callback]).train()
        save_policy(policy, tokenizer, run, device)
    step, metrics = callback.last_eval
    return PreferredFTResult(run.path, step, metrics)
