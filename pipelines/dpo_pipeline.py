"""`make dpo`: build (or reuse) the shared preference set, then one DPO run (eq. 6) per beta (`beta_sweep`, or just
`beta`) and seed."""

from __future__ import annotations

import dpo
from pipelines.stages import build_preference_set, find_reward_model, reward_model_seed
from rlhf.config import Config
from rlhf.distributed import is_main
from rlhf.rundir import completed_run


def main(cfg: Config) -> int:
    prefs = build_preference_set(cfg)
    say = print if is_main() else lambda *args, **kwargs: None  # under DDP the main process reports
    runs = [(run_cfg, seed) for run_cfg in cfg.betas() for seed in cfg.seeds]
    for i, (run_cfg, seed) in enumerate(runs, start=1):
        say(f"{dpo.method_name(cfg)} run {i}/{len(runs)}: seed {seed}, beta {run_cfg.beta:g}", flush=True)
        # The proxy reward of DPO's samples: scored by PPO's reward model where `make ppo` has trained it (the
        # only reward there is on a task without gold); DPO never trains against it.
        rm_path = find_reward_model(cfg, prefs, reward_model_seed(cfg, seed))
        method, extra = dpo.run_identity(run_cfg, rm_path)
        done = completed_run(run_cfg, method, seed, prefs.sha256, extra)
        if done is not None:
            say(f"  {done} (completed before: reused; resume=false trains it again)")
            continue
        say(f"  proxy reward: {rm_path or 'none (no reward model trained on this preference set yet: make ppo)'}")
        result = dpo.train(run_cfg, prefs, seed, rm_path)  # prints the eval metrics at each eval point
        stages = ", ".join(f"{name} {t['seconds']:.0f} s" for name, t in result.timings.items())
        say(f"  {result.steps} steps; wall-clock per stage: {stages}")
        say(f"  run directory: {result.run_dir}", flush=True)
    return 0
