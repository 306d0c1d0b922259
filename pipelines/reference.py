"""pi_ref: the model every method starts from and is measured against (its KL, DPO's log-ratios, the frontier's
origin). This module is the one place that decides which model that is:

* `sft_stage.enabled: false`: the base model, `model.name_or_path`;
* `sft_stage.enabled: true`: the SFT stage's output (sft/train.py) for this base model, these sft_stage settings and
  these texts: reused from runs/<profile>/sft/ when a completed run has that key, else trained now.

Every stage that loads "the policy / reference model" (preference data, reward model, PPO, DPO, Best-of-N,
Preferred-FT, the reference evaluation) loads `reference_model(cfg)`, and its run manifest names the folder.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipelines.config import PROJECT_ROOT, Config, ModelConfig
from pipelines.models import load_tokenizer, resolve_model_path
from sft import sft_key, train_sft
from sft.train import METHOD, sft_rows


def find_sft_model(cfg: Config) -> Path | None:
    """The model folder of a completed SFT run with this config's key (sft.sft_key), or None."""
    key = sft_key(cfg, sft_rows(cfg, load_tokenizer(resolve_model_path(cfg.model, cfg.hub_access))))
    for manifest_path in sorted((PROJECT_ROOT / cfg.runs_dir / cfg.profile / METHOD).glob("*/manifest.json"),
                                reverse=True):
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("status") == "completed" and manifest.get("sft_key") == key:
            return Path(manifest["sft_model_path"])
    return None


def sft_model(cfg: Config) -> Path:
    """The SFT stage's model for `cfg`: reused when trained before, else trained now (once)."""
    path = find_sft_model(cfg)
    if path is not None:
        print(f"pi_ref: the SFT stage's model {path} (reused)", flush=True)
        return path
    print("SFT stage: no completed run with this base model, sft_stage config and texts; training pi_ref", flush=True)
    result = train_sft(cfg)
    print(f"pi_ref: the SFT stage's model {result.path} ({result.steps} steps)", flush=True)
    return result.path


def reference_model(cfg: Config) -> ModelConfig:
    """pi_ref as a ModelConfig: `cfg.model` itself, or with the SFT stage on, the same settings pointing at the SFT
    model's folder. Pass it wherever a model is resolved or loaded (resolve_model_path, load_policy_and_reference)."""
    if not cfg.sft_stage.enabled:
        return cfg.model
    # Under DDP every process calls this, and together they train the SFT model (if need be), or all find it.
    return dataclasses.replace(cfg.model, name_or_path=str(sft_model(cfg)))


def main(cfg: Config) -> int:
    """`make sft`: train (or reuse) pi_ref; with the stage off, say so (`make all` runs this step on every profile)."""
    if not cfg.sft_stage.enabled:
        print(f"SFT stage off (sft_stage.enabled: false): pi_ref is model.name_or_path = {cfg.model.name_or_path}")
        return 0
    sft_model(cfg)
    return 0
