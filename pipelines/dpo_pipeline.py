"""`make dpo`: build (or reuse) the shared preference set, then one DPO run (eq. 6) per beta (`beta_sweep`, or just
`beta`) and seed."""

from __future__ import annotations

import dpo
from pipelines.config import Config
from pipelines.stages import build_preference_set


def main(cfg: Config) -> int:
    prefs = build_preference_set(cfg)
    runs = [(run_cfg, seed) for run_cfg in cfg.betas() for seed in cfg.seeds]
    for i, (run_cfg, seed) in enumerate(runs, start=1):
        print(f"{dpo.method_name(cfg)} run {i}/{len(runs)}: seed {seed}, beta {run_cfg.beta:g}", flush=True)
        result = dpo.train(run_cfg, prefs, seed)  # prints the eval metrics at each eval point
        stages = ", ".join(f"{name} {t['seconds']:.0f} s" for name, t in result.timings.items())
        print(f"  {result.steps} steps; wall-clock per stage: {stages}")
        print(f"  run directory: {result.run_dir}", flush=True)
    return 0
