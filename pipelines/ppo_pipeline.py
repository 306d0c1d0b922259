"""`python -m pipelines ppo`: the InstructGPT pipeline. Orchestration only.

1. the shared preference set (built once, reused);
2. stage 1: the reward model r_phi (eq. 1): trained once and shared by every PPO seed, or one per seed
   (`reward_model.per_seed`); a finished reward model with the same data, config and seed is reused;
3. stage 2: one PPO run (eq. 2) per beta in `beta_sweep` (or just `beta`) and seed in `seeds`.

With `ppo.reward=gold` (`make ppo-gt`) step 2 is skipped and PPO optimises the task's gold reward (PPO-GT).
"""

from __future__ import annotations

from pipelines.stages import build_preference_set, reward_model_for
from ppo.train import run_identity, train_ppo
from rlhf.config import Config
from rlhf.distributed import is_main
from rlhf.evaluate import brief
from rlhf.rundir import completed_run


def main(cfg: Config) -> int:
    prefs = build_preference_set(cfg)
    gold = cfg.ppo.reward == "gold"  # PPO-GT: no reward model at all
    for run_cfg in cfg.betas():  # the reward model does not depend on beta: trained once, reused by every beta
        for seed in cfg.seeds:
            label = f"{'PPO-GT' if gold else 'PPO'} beta {run_cfg.beta:g} seed {seed}"
            rm_path = None if gold else reward_model_for(cfg, prefs, seed)
            method, extra = run_identity(run_cfg, rm_path)
            done = completed_run(run_cfg, method, seed, prefs.sha256, extra)
            if done is not None:
                if is_main():
                    print(f"{label}: {done} (completed before: reused; resume=false trains it again)")
                continue
            result = train_ppo(run_cfg, prefs, rm_path, seed)
            if not is_main():  # under DDP the main process evaluated and reports
                continue
            print(f"{label}: {result.run_dir}\n  final: {brief(result.final_eval)}")
    return 0
