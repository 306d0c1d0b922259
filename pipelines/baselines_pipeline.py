"""`make bon` and `make preferred-ft`: the DPO paper's baselines on the shared preference set. Orchestration only;
the algorithms are in baselines/ (docs/baselines.md). PPO-GT is `make ppo-gt` (pipelines/ppo_pipeline.py)."""

from __future__ import annotations

from baselines import best_of_n, train_preferred_ft
from baselines.best_of_n import run_identity as bon_identity
from baselines.preferred_ft import METHOD
from baselines.preferred_ft import run_identity as preferred_ft_identity
from pipelines.clock import Work
from pipelines.stages import build_preference_set, reward_model_for, run_each
from rlhf.config import Config
from rlhf.methods import METHODS
from rlhf.evaluate import brief
from rlhf.rundir import completed_run


def bon(cfg: Config) -> int:
    prefs = build_preference_set(cfg)
    # Ranked by the reward model PPO trains against (the first seed's, where each seed has its own): reused when
    # it exists, else trained once here and reused by `make ppo` in turn.
    rm_path = reward_model_for(cfg, prefs, cfg.seeds[0])
    method, seed, extra = bon_identity(cfg, rm_path)
    done = completed_run(cfg, method, seed, prefs.sha256, extra)
    if done is not None:
        print(f"Best of N: {done} (completed before: reused; resume=false runs it again)")
        return 0
    result = best_of_n(cfg, prefs, rm_path)
    for n, metrics in result.evals.items():
        print(f"best of {n}: {brief(metrics)} (KL: the upper bound)")
    print(f"run directory: {result.run_dir}")
    return 0


def preferred_ft(cfg: Config) -> int:
    return run_each(
        cfg,
        METHODS[METHOD],
        lambda run_cfg, _: preferred_ft_identity(run_cfg),
        lambda run_cfg, prefs, seed, _: train_preferred_ft(run_cfg, prefs, seed),
    )


def bon_flops(w: Work) -> dict[str, float]:
    """Best-of-N's FLOPs for the clock: the largest N samples from pi_ref for every eval prompt, each scored by the
    reward model (the smaller N are its first samples)."""
    s = w.s
    return {"sampling": max(w.cfg.bon.n) * w.eval_prompts * s.eval_tokens * 2 * (s.n_lm + s.n_scalar)}


def preferred_ft_flops(w: Work) -> dict[str, float]:
    """One Preferred-FT job's FLOPs for the clock: training on the chosen response of every pair, every pass, and
    its evaluation (no reward model: no proxy)."""
    f, passes = w.cfg.preferred_ft, w.cfg.budget.epochs
    return {
        "training": 6 * w.s.n_lm * w.pairs * w.s.pair_tokens * passes,
        "evaluation": w.evaluation(w.pairs * passes // f.batch_size, f.eval_every, proxy=False),
    }
