"""`make rloo` and `make online-dpo`: the online methods (docs/online.md). Orchestration only.

1. the shared preference set (built once, reused);
2. the reward model PPO seed s trains against (`reward_model_for`: reused, or trained now and reused by `make ppo`);
3. one run per beta in `beta_sweep` (or just `beta`) and seed in `seeds`, against that reward model.
"""

from __future__ import annotations

import online_dpo
import rloo
from pipelines.stages import run_each
from rlhf.config import Config
from rlhf.methods import METHODS


def rloo_main(cfg: Config) -> int:
    return run_each(cfg, METHODS[rloo.METHOD], rloo.run_identity, rloo.train)


def online_dpo_main(cfg: Config) -> int:
    return run_each(cfg, METHODS[online_dpo.METHOD], online_dpo.run_identity, online_dpo.train)
