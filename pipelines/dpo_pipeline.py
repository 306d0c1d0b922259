"""`make dpo`: build (or reuse) the shared preference set, then one DPO run (eq. 6) per configured seed."""

from __future__ import annotations

import dpo
from pipelines.config import Config
from pipelines.stages import build_preference_set


def main(cfg: Config) -> int:
    prefs = build_preference_set(cfg)
    for i, seed in enumerate(cfg.seeds, start=1):
        print(f"{dpo.method_name(cfg)} run {i}/{len(cfg.seeds)}: seed {seed}, beta {cfg.beta:g}", flush=True)
        result = dpo.train(cfg, prefs, seed)  # prints the eval metrics at each eval point
        stages = ", ".join(f"{name} {t['seconds']:.0f} s" for name, t in result.timings.items())
        print(f"  {result.steps} steps; wall-clock per stage: {stages}")
        print(f"  run directory: {result.run_dir}", flush=True)
    return 0
