"""Orchestration shared by every method: the preference set, the evaluation context, the reference point.

Stage packages (reward_model, ppo, dpo) take a typed config and return a result; this module only wires
the shared pieces together and times them.
"""

from __future__ import annotations

import torch

from pipelines.config import PROJECT_ROOT, Config
from pipelines.data import PreferenceSet, build_preferences, load_preferences
from pipelines.distributed import is_main, main_process_first
from pipelines.evaluate import EvalContext, evaluate
from pipelines.models import (autocast, default_device, freeze, load_causal_lm, load_tokenizer, resolve_model_path,
                              resolve_precision)
from pipelines.reference import reference_model
from pipelines.rundir import RunDir
from pipelines.tasks import load_task


def build_preference_set(cfg: Config) -> PreferenceSet:
    """Build or reuse the shared preference set and print what it holds. Under several processes the main one
    builds it and the others then load it."""
    if cfg.sft_stage.enabled:  # pi_ref first: under DDP all processes train the SFT stage together, if need be
        reference_model(cfg)
    with main_process_first():
        prefs = load_preferences(cfg)
        reused = "reused" if prefs is not None else "built"
        prefs = prefs or build_preferences(cfg)
    if not is_main():
        return prefs
    m = prefs.manifest
    print(f"preference set {reused}: {m['counts']['train']} train / {m['counts']['heldout']} held-out pairs, "
          f"sha256 {m['sha256'][:12]}, built in {m['build_seconds']:.0f} s")
    dropped = m["stats"].get("dropped_while_parsing")
    if dropped:
        print(f"  rows dropped while reading {m['config']['task'].get('path')}: {dropped}")
    for split in ("train", "heldout"):
        s = m["stats"].get(split)
        if s:
            agree = s["label_agrees_with_gold_argmax"]
            print(f"  {split}: pi_ref gold mean {s['gold_mean']:.3f} (std {s['gold_std']:.3f}, {s['samples']} "
                  f"samples); label agrees with gold argmax {agree if agree is None else f'{agree:.3f}'}; "
                  f"dropped: empty {s['empty']}, identical {s['identical']}, ties {s['tie_dropped']}")
    return prefs


def make_eval_context(cfg: Config, prefs: PreferenceSet, ref_model, tokenizer, device: torch.device) -> EvalContext:
    """The fixed evaluation setting of a profile: eval prompts, held-out pairs, pi_ref, gold reward."""
    task = load_task(cfg.task, tokenizer, cfg.hub_access)
    n = cfg.eval.n_prompts or len(task.eval_prompts)
    heldout = prefs.heldout.to_list()[:cfg.eval.n_heldout_pairs or None]
    # pi_ref's own eval samples depend on the model, the prompts and the eval settings only, and on the arithmetic:
    # `precision: auto` is fp32 on this CPU and bf16 on a GPU sharing the runs directory
    arithmetic = f"{device.type}-{resolve_precision(cfg.model.precision, device)}"
    cache = (PROJECT_ROOT / cfg.runs_dir / cfg.profile / "eval-cache" /
             f"pi_ref-{cfg.section_hash(*cfg.reference_sections(), 'task', 'eval')[:12]}-{arithmetic}.pt")
    return EvalContext(prompts=task.eval_prompts[:n], ref_model=ref_model, tokenizer=tokenizer, cfg=cfg.eval,
                       autocast=lambda: autocast(cfg.model.precision, device), gold_reward=task.gold_reward,
                       heldout_pairs=heldout, reference_cache=cache)


def evaluate_reference(cfg: Config) -> RunDir:
    """Evaluate pi_ref with the shared evaluator into runs/<profile>/reference/ (KL 0 by construction)."""
    prefs = build_preference_set(cfg)
    device = default_device()
    path = resolve_model_path(reference_model(cfg), cfg.hub_access)
    tokenizer = load_tokenizer(path)
    ref = freeze(load_causal_lm(path).to(device))
    run = RunDir.create(cfg, "reference", cfg.eval.seed, device, prefs.sha256, extra={"reference_model": path})
    with run.running():
        ctx = make_eval_context(cfg, prefs, ref, tokenizer, device)
        with run.stage("eval", device):
            metrics, samples = evaluate(ref, ctx, desc="eval pi_ref")
        run.log({"kind": "eval", "step": 0, "wall_seconds": 0.0, "tokens": 0, **metrics})
        run.write_samples(0, samples)
        print("  ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return run
