"""Preferred-FT (the DPO paper's Fig. 2): supervised fine-tuning of pi_ref on the chosen response of every pair of
the training budget (`budget:`, the pairs the reward model and DPO train on), with TRL's SFTTrainer.

    train_preferred_ft(cfg, prefs, seed) -> TrlStageResult

The loss is the negative log-likelihood of the chosen response's tokens, averaged over those tokens, with the prompt
as context only (TRL's completion-only loss on prompt / completion rows; EOS appended, as DPO's trainer does). It
reads the labels but never the rejected response: how much of DPO's gain does imitating the preferred half of the
pairs get? The shared evaluator runs at step 0 (pi_ref itself), every `preferred_ft.eval_every` steps and at the
end, into runs/<profile>/preferred-ft/<run-id>/.
"""

from __future__ import annotations

from pathlib import Path

import trl
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from rlhf.config import Config
from rlhf.data import PreferenceSet, budget_pairs, budget_record
from rlhf.models import resolve_model_path
from rlhf.reference import reference_model
from rlhf.trl_stage import TrlStage, TrlStageResult, run_trl_stage
from sft import sft_trainer

METHOD = "preferred-ft"


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


def train_preferred_ft(cfg: Config, prefs: PreferenceSet, seed: int) -> TrlStageResult:
    """One Preferred-FT run from pi_ref on the shared preference set's chosen responses. It saves no resume points: a
    killed run starts again from the start, in its own directory."""

    def build(stage: TrlStage) -> trl.SFTTrainer:
        pairs = budget_pairs(cfg, prefs)  # the budget's pairs, as the reward model's and DPO's
        stage.run.manifest["budget"] = budget_record(len(pairs), cfg.budget.passes(cfg.preferred_ft.epochs))
        return build_trainer(cfg, stage.policy, stage.tokenizer, pairs, seed, stage.output_dir, stage.callbacks)

    return run_trl_stage(cfg, prefs, seed, run_identity(cfg), "Preferred-FT", cfg.preferred_ft.eval_every, build)
