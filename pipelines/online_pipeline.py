"""`make rloo` and `make online-dpo`: the online methods (docs/online.md). Orchestration only.

1. the shared preference set (built once, reused);
2. the reward model PPO seed s trains against (`reward_model_for`: reused, or trained now and reused by `make ppo`);
3. one run per beta in `beta_sweep` (or just `beta`) and seed in `seeds`, against that reward model.

Also each method's FLOPs for `make all`'s clock, and online DPO's second knob in `make sweep` (rlhf/methods.py).
"""

from __future__ import annotations

import online_dpo
import rloo
from pipelines.clock import Work
from pipelines.stages import run_each
from rlhf.config import Config
from rlhf.errors import UserError
from rlhf.methods import METHODS


def rloo_main(cfg: Config) -> int:
    return run_each(cfg, METHODS[rloo.METHOD], rloo.run_identity, rloo.train)


def online_dpo_main(cfg: Config) -> int:
    return run_each(cfg, METHODS[online_dpo.METHOD], online_dpo.run_identity, online_dpo.train)


def online_dpo_steps(cfg: Config, factor: int) -> dict:
    """Online DPO's grid point in `make sweep` (its `Sweep` knob): `factor` times the profile's steps of 1/factor its
    prompts, the same pairs sampled, and as many eval points. TRL's trainer samples one pair a prompt, so steps, not
    pairs per prompt, are its second knob."""
    o = cfg.online_dpo
    if o.batch_size % factor:
        raise UserError(
            f"sweep.online_dpo_step_factors: {factor} does not divide online_dpo.batch_size ({o.batch_size}), "
            "so its points would not sample the profile's pairs"
        )
    return {
        "online_dpo.batch_size": o.batch_size // factor,
        "online_dpo.iterations": o.iterations * factor,
        "online_dpo.eval_every": o.eval_every * factor,
    }


def rloo_flops(w: Work) -> dict[str, float]:
    """One RLOO job's FLOPs for the clock. Per token of a rollout: the policy samples it (2N), pi_old, pi_ref and the
    reward model score it, and each of `num_iterations` passes trains the policy on it (6N; no value model)."""
    r, n, ns = w.cfg.rloo, w.s.n_lm, w.s.n_scalar
    per_token = 2 * n + 2 * (2 * n + ns) + 6 * n * r.num_iterations
    return {
        "training": per_token * r.rollout_batch_size * r.iterations * (w.s.prompt_tokens + r.max_new_tokens),
        "evaluation": w.evaluation(r.iterations, r.eval_every),
    }


def online_dpo_flops(w: Work) -> dict[str, float]:
    """One online DPO job's FLOPs for the clock. Per token of each of a prompt's two samples: the policy samples it
    (2N), pi_ref and the reward model score it, and one pass trains the policy on it (6N)."""
    o, n, ns = w.cfg.online_dpo, w.s.n_lm, w.s.n_scalar
    per_token = 2 * n + 2 * (n + ns) + 6 * n
    return {
        "training": per_token * o.batch_size * 2 * o.iterations * (w.s.prompt_tokens + o.max_new_tokens),
        "evaluation": w.evaluation(o.iterations, o.eval_every, implicit=True),
    }
