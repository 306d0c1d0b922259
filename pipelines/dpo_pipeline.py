"""`make dpo`: build (or reuse) the shared preference set, then one DPO run (eq. 6) per configured seed."""

from __future__ import annotations

import dpo
from pipelines.config import Config
from pipelines.stages import build_preference_set


def main(cfg: Config) -> int:
    prefs = build_preference_set(cfg)
    for i, seed in enumerate(cfg.seeds, start=1):
        print(f"DPO run {i}/{len(cfg.seeds)}: seed {seed}, beta {cfg.beta:g}", flush=True)
        result = dpo.train(cfg, prefs, seed)
        shown = ("eval/gold", "eval/gold_sem", "eval/kl", "heldout/implicit_accuracy", "heldout/gold_accuracy")
        print(f"  {result.steps} steps, {result.train_seconds:.0f} s of training: "
              + "  ".join(f"{k}={result.final_metrics[k]:.4g}" for k in shown if k in result.final_metrics))
        print(f"  run directory: {result.run_dir}", flush=True)
    return 0
