"""`python -m pipelines ppo`: the InstructGPT pipeline. Orchestration only.

1. the shared preference set (built once, reused);
2. stage 1: the reward model r_phi (eq. 1): trained once and shared by every PPO seed, or one per seed
   (`reward_model.per_seed`); a finished reward model with the same data, config and seed is reused;
3. stage 2: one PPO run (eq. 2) per seed in `seeds`.
"""

from __future__ import annotations

import json

from pipelines.config import PROJECT_ROOT, Config
from pipelines.data import PreferenceSet
from pipelines.stages import build_preference_set
from ppo.train import train_ppo
from reward_model.train import reward_model_key, train_reward_model


def find_reward_model(cfg: Config, prefs: PreferenceSet, seed: int):
    """A completed reward-model run with the same key (data, model, RM config, seed), or None."""
    key = reward_model_key(cfg, prefs, seed)
    root = PROJECT_ROOT / cfg.runs_dir / cfg.profile / "reward_model"
    for manifest_path in sorted(root.glob("*/manifest.json"), reverse=True):
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("status") == "completed" and manifest.get("reward_model_key") == key:
            return manifest_path.parent / "checkpoints" / "final"
    return None


def main(cfg: Config) -> int:
    prefs = build_preference_set(cfg)
    for seed in cfg.seeds:
        rm_seed = seed if cfg.reward_model.per_seed else cfg.reward_model.seed
        rm_path = find_reward_model(cfg, prefs, rm_seed)
        if rm_path is None:
            rm_path = train_reward_model(cfg, prefs, rm_seed).path
        else:
            print(f"reward model reused: {rm_path}")
        result = train_ppo(cfg, prefs, rm_path, seed)
        e = result.final_eval
        print(f"PPO seed {seed}: {result.run_dir}\n  final: gold {e.get('eval/gold', float('nan')):.3f} "
              f"(±{e.get('eval/gold_sem', float('nan')):.3f}), proxy {e.get('eval/proxy', float('nan')):.3f}, "
              f"KL {e['eval/kl']:.3f}")
    return 0
