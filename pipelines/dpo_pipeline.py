"""`make dpo`: build (or reuse) the shared preference set, then one DPO run (eq. 6) per beta (`beta_sweep`, or just
`beta`) and seed. The proxy reward of DPO's samples is scored by PPO's reward model where `make ppo` has trained it
(the only reward there is on a task without gold); DPO never trains against it."""

from __future__ import annotations

import dpo
from pipelines.clock import Work
from pipelines.stages import run_each
from rlhf.config import Config
from rlhf.methods import METHODS


def main(cfg: Config) -> int:
    return run_each(cfg, METHODS[dpo.method_name(cfg)], dpo.run_identity, dpo.train)


def flops(w: Work) -> dict[str, float]:
    """One DPO job's FLOPs for the clock: pi_ref's log-probs of both responses of every pair (the first DPO job of
    the grid caches them, dpo/trainer.py, and the later ones read them), training on both, every pass, and its
    evaluation (its implicit reward's accuracy at the last point)."""
    d, n, seq, pairs, passes = w.cfg.dpo, w.s.n_lm, w.s.pair_tokens, w.pairs, w.cfg.budget.epochs
    return {
        **({} if w.repeat else {"forward": 2 * n * pairs * 2 * seq}),
        "training": 6 * n * pairs * 2 * seq * passes,
        "evaluation": w.evaluation(pairs * passes // d.batch_size, d.eval_every, implicit=True),
    }
