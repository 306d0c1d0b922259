"""`python -m pipelines ppo`: the InstructGPT pipeline. Orchestration only.

1. the shared preference set (built once, reused);
2. stage 1: the reward model r_phi (eq. 1): trained once and shared by every PPO seed, or one per seed
   (`reward_model.per_seed`); a finished reward model with the same data, config and seed is reused;
3. stage 2: one PPO run (eq. 2) per beta in `beta_sweep` (or just `beta`) and seed in `seeds`.

With `ppo.reward=gold` (`make ppo-gt`) step 2 is skipped and PPO optimises the task's gold reward (PPO-GT).
"""

from __future__ import annotations

import json

from pipelines.config import PROJECT_ROOT, Config
from pipelines.data import PreferenceSet
from pipelines.distributed import is_main
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


def reward_model_seed(cfg: Config, seed: int) -> int:
    """The seed of the reward model that run seed `seed` uses (one shared RM unless `reward_model.per_seed`)."""
    return seed if cfg.reward_model.per_seed else cfg.reward_model.seed


def reward_model_for(cfg: Config, prefs: PreferenceSet, seed: int):
    """The reward model PPO seed `seed` trains against: reused if already trained, else trained now."""
    rm_seed = reward_model_seed(cfg, seed)
    rm_path = find_reward_model(cfg, prefs, rm_seed)
    if rm_path is None:
        return train_reward_model(cfg, prefs, rm_seed).path
    print(f"reward model reused: {rm_path}")
    return rm_path


def main(cfg: Config) -> int:
    prefs = build_preference_set(cfg)
    gold = cfg.ppo.reward == "gold"  # PPO-GT: no reward model at all
    for run_cfg in cfg.betas():  # the reward model does not depend on beta: trained once, reused by every beta
        for seed in cfg.seeds:
            result = train_ppo(run_cfg, prefs, None if gold else reward_model_for(cfg, prefs, seed), seed)
            if not is_main():  # under DDP the main process evaluated and reports
                continue
            e = result.final_eval
            shown = [f"{name} {e[key]:.3f}" for name, key in (("gold", "eval/gold"), ("±", "eval/gold_sem"),
                                                               ("proxy", "eval/proxy"), ("KL", "eval/kl")) if key in e]
            print(f"{'PPO-GT' if gold else 'PPO'} beta {run_cfg.beta:g} seed {seed}: {result.run_dir}\n"
                  f"  final: {', '.join(shown)}")
    return 0
