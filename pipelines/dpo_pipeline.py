"""`make dpo`: build (or reuse) the shared preference set, then one DPO run (eq. 6) per beta (`beta_sweep`, or just
`beta`) and seed. The proxy reward of DPO's samples is scored by PPO's reward model where `make ppo` has trained it
(the only reward there is on a task without gold); DPO never trains against it."""

from __future__ import annotations

import dpo
from pipelines.stages import run_each
from rlhf.config import Config
from rlhf.methods import METHODS


def main(cfg: Config) -> int:
    return run_each(cfg, METHODS[dpo.method_name(cfg)], dpo.run_identity, dpo.train)
