"""pi_ref: the model every method starts from and is measured against (its KL, DPO's log-ratios, the frontier's
origin). This module is the one place that decides which model that is:

* `sft_stage.enabled: false`: the base model, `model.name_or_path`;
* `sft_stage.enabled: true`: the SFT stage's output (sft/train.py) for this base model, these sft_stage settings and
  these texts, found in runs/<profile>/sft/ by its key. The SFT stage is a step the orchestration runs before
  everything else (`make sft`, and `make ppo` / `make dpo` run it first where it is missing); this module only finds
  its model, and names `make sft` where there is none.

Every stage that loads "the policy / reference model" (preference data, reward model, PPO, DPO, Best-of-N,
Preferred-FT, the reference evaluation) loads `reference_model(cfg)`, and its run manifest names the folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from rlhf.config import Config, ModelConfig
from rlhf.errors import UserError
from rlhf.keys import sft_key
from rlhf.models import load_tokenizer, resolve_model_path
from rlhf.rundir import completed
from rlhf.tasks import load_task, read_rows, text_field

SFT_METHOD = "sft"  # the SFT stage's run directories: runs/<profile>/sft/


def sft_rows(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> Dataset:
    """The SFT stage's training rows: `text` rows from the corpus, or `prompt` / `completion` rows from the task's
    pairs (`sft_stage.source`)."""
    s = cfg.sft_stage
    if s.source == "chosen":
        pairs = load_task(cfg.task, tokenizer, cfg.hub_access).train_pairs
        return Dataset.from_dict({"prompt": [p["prompt"] for p in pairs], "completion": [p["chosen"] for p in pairs]})
    name, rows = read_rows(s.path, "sft_stage.path", cfg.hub_access)
    if not rows:  # TRL's SFTTrainer would stop at its first row with a bare StopIteration
        raise UserError(f"sft_stage.path: {name} holds no texts")
    return Dataset.from_dict({"text": text_field(rows, s.text_field, f"{name} (sft_stage.text_field)")})


def find_sft_model(cfg: Config) -> Path | None:
    """The model folder of a completed SFT run with this config's key (`sft_key`), or None."""
    key = sft_key(cfg, sft_rows(cfg, load_tokenizer(resolve_model_path(cfg.model, cfg.hub_access))))
    run = completed(cfg, SFT_METHOD, "sft_key", key)
    return None if run is None else run / "checkpoints" / "final"


def reference_model(cfg: Config) -> ModelConfig:
    """pi_ref as a ModelConfig: `cfg.model` itself, or with the SFT stage on, the same settings pointing at the SFT
    model's folder. Pass it wherever a model is resolved or loaded (resolve_model_path, load_policy_and_reference)."""
    if not cfg.sft_stage.enabled:
        return cfg.model
    path = find_sft_model(cfg)
    if path is None:
        raise UserError(
            f"profile {cfg.profile}: sft_stage.enabled is true but no completed SFT run in "
            f"{cfg.runs_dir}/{cfg.profile}/{SFT_METHOD}/ has this base model, sft_stage config and texts: "
            f"run `make sft PROFILE={cfg.profile}` first"
        )
    return dataclasses.replace(cfg.model, name_or_path=str(path))
