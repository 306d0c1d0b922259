"""The steps every method's orchestration shares: pi_ref (the optional SFT stage), the preference set, the reward
model a PPO seed (or a control) uses, and pi_ref's own evaluation.

Stage packages (sft, reward_model, ppo, dpo, baselines) take a typed config and return a result; this module only
runs them in order and reuses what is already trained.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.clock import Work
from reward_model.train import train_reward_model
from rlhf.config import Config
from rlhf.data import PreferenceSet, build_preferences, load_preferences
from rlhf.distributed import is_main, main_process_first
from rlhf.evaluate import brief, evaluate, make_eval_context
from rlhf.keys import reward_model_key
from rlhf.methods import Method
from rlhf.models import default_device, freeze, load_causal_lm, load_tokenizer, resolve_model_path
from rlhf.reference import find_sft_model, reference_model
from rlhf.rundir import RunDir, completed, completed_run
from sft import train_sft


def sft_step(cfg: Config) -> Path | None:
    """The optional SFT stage (`sft_stage.enabled`): its model, reused when trained before, else trained now (once).
    Under DDP every process calls this, and together they train it (if need be), or all find it."""
    if not cfg.sft_stage.enabled:
        return None
    path = find_sft_model(cfg)
    if path is not None:
        print(f"pi_ref: the SFT stage's model {path} (reused)", flush=True)
        return path
    print("SFT stage: no completed run with this base model, sft_stage config and texts; training pi_ref", flush=True)
    result = train_sft(cfg)
    print(f"pi_ref: the SFT stage's model {result.path} ({result.steps} steps)", flush=True)
    return result.path


def sft_main(cfg: Config) -> int:
    """`make sft`: train (or reuse) pi_ref; with the stage off, say so (`make all` runs this step on every profile)."""
    if not cfg.sft_stage.enabled:
        print(f"SFT stage off (sft_stage.enabled: false): pi_ref is model.name_or_path = {cfg.model.name_or_path}")
        return 0
    sft_step(cfg)
    return 0


def build_preference_set(cfg: Config) -> PreferenceSet:
    """Build or reuse the shared preference set and print what it holds. Under several processes the main one
    builds it and the others then load it."""
    sft_step(cfg)  # pi_ref first: it samples the pairs
    with main_process_first():
        prefs = load_preferences(cfg)
        reused = "reused" if prefs is not None else "built"
        prefs = prefs or build_preferences(cfg)
    if not is_main():
        return prefs
    m = prefs.manifest
    print(
        f"preference set {reused}: {m['counts']['train']} train / {m['counts']['heldout']} held-out pairs, "
        f"sha256 {m['sha256'][:12]}, built in {m['build_seconds']:.0f} s"
    )
    if reused == "reused":  # what it holds was said when it was built (`make data`)
        return prefs
    dropped = m["stats"].get("dropped_while_parsing")
    if dropped:
        print(f"  rows dropped while reading {m['config']['task'].get('path')}: {dropped}")
    for split in ("train", "heldout"):
        s = m["stats"].get(split)
        if s:
            agree = s["label_agrees_with_gold_argmax"]
            print(
                f"  {split}: pi_ref gold mean {s['gold_mean']:.3f} (std {s['gold_std']:.3f}, {s['samples']} "
                f"samples); label agrees with gold argmax {agree if agree is None else f'{agree:.3f}'}; "
                f"dropped: empty {s['empty']}, identical {s['identical']}, ties {s['tie_dropped']}"
            )
    return prefs


def find_reward_model(cfg: Config, prefs: PreferenceSet, seed: int) -> Path | None:
    """A completed reward-model run with the same key (data, model, RM config, seed), or None."""
    run = completed(cfg, "reward_model", "reward_model_key", reward_model_key(cfg, prefs.sha256, seed))
    return None if run is None else run / "checkpoints" / "final"


def reward_model_seed(cfg: Config, seed: int) -> int:
    """The seed of the reward model that run seed `seed` uses (one shared RM unless `reward_model.per_seed`)."""
    return seed if cfg.reward_model.per_seed else cfg.reward_model.seed


def reward_model_for(cfg: Config, prefs: PreferenceSet, seed: int) -> Path:
    """The reward model PPO seed `seed` trains against: reused if already trained, else trained now."""
    rm_seed = reward_model_seed(cfg, seed)
    rm_path = find_reward_model(cfg, prefs, rm_seed)
    if rm_path is None:
        return train_reward_model(cfg, prefs, rm_seed).path
    print(f"reward model reused: {rm_path}")
    return rm_path


def run_each(
    cfg: Config,
    method: Method,
    identity: Callable[[Config, Path | None], tuple[str, dict]],
    train: Callable[[Config, PreferenceSet, int, Path | None], Any],
) -> int:
    """Every run of `method`: one per beta (`beta_sweep`, or just `beta`; a method without one, at `beta` alone) and
    seed, each reused where a run with its key completed before. As `method.reward_model` says, the seed's reward
    model is trained where it is missing ("trains"), read where it exists ("reports"), or not passed (""). The
    method's `identity(cfg, reward model)` gives its run directory and extra inputs (its key's), `train(cfg, prefs,
    seed, reward model)` one run, returning its `run_dir`, `steps` and `final_metrics`."""
    prefs = build_preference_set(cfg)
    say = print if is_main() else lambda *args, **kwargs: None  # under DDP the main process reports
    reward_model = method.reward_model
    for run_cfg in cfg.betas() if method.per_beta else [cfg]:  # the reward model does not depend on beta: trained once
        for seed in cfg.seeds:
            heading = f"{method.legend} beta {run_cfg.beta:g} seed {seed}"
            rm_path = (
                reward_model_for(cfg, prefs, seed)
                if reward_model == "trains"
                else find_reward_model(cfg, prefs, reward_model_seed(cfg, seed))
                if reward_model == "reports"
                else None
            )
            name, extra = identity(run_cfg, rm_path)
            done = completed_run(run_cfg, name, seed, prefs.sha256, extra)
            if done is not None:
                say(f"{heading}: {done} (completed before: reused; resume=false trains it again)")
                continue
            if reward_model == "reports":  # the proxy reward of its samples, where `make ppo` has trained r_phi
                say(f"{heading}: proxy reward {rm_path or 'none (no reward model on these pairs yet: make ppo)'}")
            result = train(run_cfg, prefs, seed, rm_path)
            say(
                f"{heading}: {result.steps} steps; final: {brief(result.final_metrics)}\n"
                f"  run directory: {result.run_dir}",
                flush=True,
            )
    return 0


def reward_model_main(cfg: Config) -> int:
    """`make reward-model`: the reward model every seed's PPO run trains against, reused or trained now."""
    prefs = build_preference_set(cfg)
    for seed in cfg.seeds:
        print(f"seed {seed}: {reward_model_for(cfg, prefs, seed)}", flush=True)
    return 0


def reward_model_flops(w: Work) -> dict[str, float]:
    """`make reward-model`'s FLOPs for the clock: training on both responses of every pair, every pass; then its
    scores of the held-out pairs, and pi_ref's samples of the prompts it is centred on, scored by it."""
    ns, seq = w.s.n_scalar, w.s.pair_tokens
    return {
        "training": 6 * ns * w.pairs * 2 * seq * w.cfg.budget.epochs,
        "forward": 2 * ns * w.heldout * 2 * seq + 2 * (w.s.n_lm + ns) * w.cfg.reward_model.center_prompts * seq,
    }


def reference_main(cfg: Config) -> int:
    """`make reference`: pi_ref's own evaluation, reused or run now."""
    print(f"reference evaluation: {evaluate_reference(cfg)}")
    return 0


def reference_flops(w: Work) -> dict[str, float]:
    """`make reference`'s FLOPs for the clock: pi_ref samples the eval prompts and scores its samples (one pass both
    ways), and scores the held-out pairs, once a profile (every run's step 0 reads them from the cache)."""
    return {"evaluation": 2 * 2 * w.s.n_lm * w.eval_prompts * w.s.eval_tokens + w.implicit}


def evaluate_reference(cfg: Config) -> Path:
    """Evaluate pi_ref with the shared evaluator into runs/<profile>/reference/ (KL 0 by construction); the run
    directory (an earlier one with the same key, reused where there is one)."""
    prefs = build_preference_set(cfg)
    path = resolve_model_path(reference_model(cfg), cfg.hub_access)
    done = completed_run(cfg, "reference", cfg.eval.seed, prefs.sha256, {"reference_model": path})
    if done is not None:
        print(f"pi_ref's evaluation reused: {done} (resume=false evaluates it again)")
        return done
    device = default_device()
    tokenizer = load_tokenizer(path)
    ref = freeze(load_causal_lm(path, cfg.model.attention).to(device))
    # nothing to resume from: a killed evaluation is done again in its own directory
    run, _ = RunDir.open(cfg, "reference", cfg.eval.seed, device, prefs.sha256, extra={"reference_model": path})
    with run.running():
        ctx = make_eval_context(cfg, prefs, ref, tokenizer, device)
        with run.stage("eval", device) as timing:
            # with beta, pi_ref's log-probs of the held-out pairs are computed here, once, into the profile's cache:
            # every DPO run's last eval point reads them, so its cost does not depend on which seed ran first
            metrics, samples = evaluate(ref, ctx, implicit_beta=cfg.beta, desc="eval pi_ref")
            timing["flops"] = metrics["eval/flops"]
        run.log({"kind": "eval", "step": 0, "wall_seconds": 0.0, "tokens": 0, "flops": 0, **metrics})
        run.write_samples(0, samples)
        print(f"pi_ref: {brief(metrics)}")
    return run.path
