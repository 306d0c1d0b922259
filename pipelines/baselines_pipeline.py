"""`make bon` and `make sft-chosen`: the DPO paper's baselines on the shared preference set. Orchestration only;
the algorithms are in baselines/ (docs/baselines.md). PPO-GT is `make ppo-gt` (pipelines/ppo_pipeline.py)."""

from __future__ import annotations

from baselines import best_of_n, train_preferred_ft
from pipelines.stages import build_preference_set, reward_model_for
from rlhf.config import Config
from rlhf.trl_callbacks import brief


def bon(cfg: Config) -> int:
    prefs = build_preference_set(cfg)
    # Ranked by the reward model PPO trains against (the first seed's, where each seed has its own): reused when
    # it exists, else trained once here and reused by `make ppo` in turn.
    result = best_of_n(cfg, prefs, reward_model_for(cfg, prefs, cfg.seeds[0]))
    for n, metrics in result.evals.items():
        print(f"best of {n}: {brief(metrics)} (KL: the upper bound)")
    print(f"run directory: {result.run_dir}")
    return 0


def sft_chosen(cfg: Config) -> int:
    prefs = build_preference_set(cfg)
    for i, seed in enumerate(cfg.seeds, start=1):
        print(f"Preferred-FT run {i}/{len(cfg.seeds)}: seed {seed}", flush=True)
        result = train_preferred_ft(cfg, prefs, seed)
        print(f"  {result.steps} steps; final: {brief(result.final_metrics)}\n  run directory: {result.run_dir}",
              flush=True)
    return 0
