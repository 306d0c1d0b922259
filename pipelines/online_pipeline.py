"""`make rloo` and `make online-dpo`: the online methods (docs/online.md). Orchestration only.

1. the shared preference set (built once, reused);
2. the reward model PPO seed s trains against (`reward_model_for`: reused, or trained now and reused by `make ppo`);
3. one run per beta in `beta_sweep` (or just `beta`) and seed in `seeds`, against that reward model.
"""

from __future__ import annotations

from types import ModuleType

import online_dpo
import rloo
from pipelines.stages import build_preference_set, reward_model_for
from rlhf.config import Config
from rlhf.distributed import is_main
from rlhf.evaluate import brief
from rlhf.rundir import completed_run


def run_method(cfg: Config, method: ModuleType, label: str) -> int:
    """Every beta x seed run of `method` (a stage package with `run_identity` and `train`)."""
    prefs = build_preference_set(cfg)
    say = print if is_main() else lambda *args, **kwargs: None  # under DDP the main process reports
    for run_cfg in cfg.betas():  # the reward model does not depend on beta: trained once, reused by every beta
        for seed in cfg.seeds:
            rm_path = reward_model_for(cfg, prefs, seed)  # PPO's for this seed: the same budget of reward
            method_name, extra = method.run_identity(run_cfg, rm_path)
            done = completed_run(run_cfg, method_name, seed, prefs.sha256, extra)
            if done is not None:
                say(f"{label} beta {run_cfg.beta:g} seed {seed}: {done} (completed before: reused; resume=false "
                    "trains it again)")
                continue
            result = method.train(run_cfg, prefs, seed, rm_path)
            say(f"{label} beta {run_cfg.beta:g} seed {seed}: {result.run_dir}\n  {result.steps} steps; final: "
                f"{brief(result.final_metrics)}", flush=True)
    return 0


def rloo_main(cfg: Config) -> int:
    return run_method(cfg, rloo, "RLOO")


def online_dpo_main(cfg: Config) -> int:
    return run_method(cfg, online_dpo, "online DPO")
