"""`python -m pipelines ppo`: the InstructGPT pipeline. Orchestration only.

1. the shared preference set (built once, reused);
2. stage 1: the reward model r_phi (eq. 1): trained once and shared by every PPO seed, or one per seed
   (`reward_model.per_seed`); a finished reward model with the same data, config and seed is reused;
3. stage 2: one PPO run (eq. 2) per beta in `beta_sweep` (or just `beta`) and seed in `seeds`.

With `ppo.reward=gold` (`make ppo-gt`) step 2 is skipped and PPO optimises the task's gold reward (PPO-GT).
"""

from __future__ import annotations

from pathlib import Path

from pipelines.clock import Work
from pipelines.stages import run_each
from ppo.train import PPOResult, run_identity, train_ppo  # run_identity and train: one run (`run_each`, the sweep)
from rlhf.config import Config
from rlhf.data import PreferenceSet
from rlhf.methods import METHODS


def main(cfg: Config) -> int:
    gold = cfg.ppo.reward == "gold"  # PPO-GT: no reward model at all
    return run_each(cfg, METHODS["ppo-gt" if gold else "ppo"], run_identity, train)


def train(cfg: Config, prefs: PreferenceSet, seed: int, reward_model_path: Path | None) -> PPOResult:
    """One PPO run in the shape every method's training takes (`run_each`, the sweep)."""
    return train_ppo(cfg, prefs, reward_model_path, seed)


def flops(w: Work) -> dict[str, float]:
    """One PPO job's FLOPs for the clock. Per token of a rollout: the policy samples it (2N), then pi_old, pi_ref, the
    value model and the reward model score it (none under PPO-GT: the gold reward is outside the count), then each of
    `ppo_epochs` passes trains the policy and the value model on it (6N each)."""
    p, n, ns = w.cfg.ppo, w.s.n_lm, w.s.n_scalar
    gold = "ppo.reward=gold" in w.overrides
    per_token = 2 * n + 2 * (2 * n + ns + (0 if gold else ns)) + p.ppo_epochs * 6 * (n + ns)
    return {
        "training": per_token * p.rollout_batch_size * p.iterations * (w.s.prompt_tokens + p.max_new_tokens),
        "evaluation": w.evaluation(p.iterations, p.eval_every, proxy=not gold),
    }
