"""`make sweep METHOD=reward_model|dpo|ppo|rloo|online-dpo`: the tuning protocol (docs/tuning.md). Orchestration
only.

One training run per point of a grid over the method's decisive knobs, with `sweep.seed`, evaluated on the
validation prompts and pairs only (`eval.split=validation`, `task.n_validation_prompts`), never on the test prompts
the report shows. The runs go to <runs_dir>/sweep/<profile>/, a runs directory of their own, on the profile's shared
preference set; the table goes to reports/<profile>/sweep-<method>.csv and .md, the chosen point marked.

    reward model  learning rate x budget.epochs        judged by validation pair accuracy
    DPO           learning rate x budget.epochs        judged by final validation gold reward (no gold: the proxy),
    PPO           learning rate x ppo.ppo_epochs       among the points whose final KL is at most sweep.max_kl
    RLOO          learning rate x rloo.num_generations
    online DPO    learning rate x steps (batch_size / f prompts a step, iterations x f steps: the same pairs)

Every method's grid has the same number of points (the config insists), each a whole training run of the profile's
length: the same tuning budget; RLOO's and online DPO's points sample as many completions as the profile's run. The
points of the methods that train against PPO's reward model (PPO, RLOO, online DPO) use its seed-`sweep.seed` model
of the profile's settings.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd

from analysis import stats as S
from analysis.load import read_prompts
from analysis.report import markdown_table
from pipelines import named
from pipelines.stages import build_preference_set, find_reward_model, reward_model_for, reward_model_seed
from reward_model.train import train_reward_model
from rlhf.atomic import atomic_write_text, read_jsonl
from rlhf.config import PROJECT_ROOT, Config
from rlhf.data import PreferenceSet
from rlhf.methods import METHODS
from rlhf.rundir import completed_run

SHOWN = ("eval/gold", "eval/gold_sem", "eval/proxy", "eval/kl", "heldout/rm_accuracy", "heldout/implicit_accuracy")


def grid(cfg: Config) -> list[dict]:
    """The grid points of `sweep.method` (its `Sweep` in rlhf/methods.py), as dotted config keys and values."""
    s = cfg.sweep
    m = METHODS[s.method]
    knob, values, _ = m.sweep
    point = named(knob) if ":" in knob else lambda _, value: {knob: value}  # a function: one value sets several keys
    return [{f"{m.section}.learning_rate": lr, **point(cfg, n)} for lr in s.learning_rates for n in getattr(s, values)]


def runs(method: str) -> ModuleType:
    """The module of a policy method's `run_identity` and `train` (its `Sweep.runs`): a point's key, and its run."""
    return importlib.import_module(METHODS[method].sweep.runs)


def point_config(cfg: Config, values: dict) -> Config:
    """One grid point's config: its values, one seed, judged on the validation split, in the sweep's runs dir."""
    return cfg.with_values(
        {
            **values,
            "eval.split": "validation",
            "seeds": [cfg.sweep.seed],
            "beta_sweep": [],
            "runs_dir": str(Path(cfg.runs_dir) / "sweep"),
        }
    )


def train_point(cfg: Config, prefs: PreferenceSet) -> tuple[Path, dict[str, float]]:
    """Train one grid point, or reuse its completed run (a sweep run again, or killed, goes on from the first point
    not yet done; a killed point resumes from its last checkpoint): its run directory and its final validation
    metrics."""
    seed = cfg.sweep.seed
    done = completed_point(cfg, prefs)
    if done is not None:
        print(f"  completed before, reused: {done}", flush=True)
        return done, final_eval(done)
    if cfg.sweep.method == "reward_model":
        result = train_reward_model(cfg, prefs, seed)
        return result.run_dir, result.heldout
    trains_against = METHODS[cfg.sweep.method].reward_model == "trains"  # DPO's points report no proxy
    rm_path = reward_model_for(cfg, prefs, seed) if trains_against else None
    result = runs(cfg.sweep.method).train(cfg, prefs, seed, rm_path)
    return result.run_dir, result.final_metrics


def completed_point(cfg: Config, prefs: PreferenceSet) -> Path | None:
    """The completed run of this grid point's config and seed, if there is one (the key its training would use)."""
    seed = cfg.sweep.seed
    if cfg.sweep.method == "reward_model":
        final = find_reward_model(cfg, prefs, seed)
        return None if final is None else final.parents[1]  # <run>/checkpoints/final
    rm_path = None
    if METHODS[cfg.sweep.method].reward_model == "trains":
        rm_path = find_reward_model(cfg, prefs, reward_model_seed(cfg, seed))
        if rm_path is None:  # its reward model not trained yet: nor is the point
            return None
    method, extra = runs(cfg.sweep.method).run_identity(cfg, rm_path)
    return completed_run(cfg, method, seed, prefs.sha256, extra)


def point_row(run_dir: Path, metrics: dict[str, float], cfg: Config) -> dict:
    """A point's columns: its training FLOPs and seconds (the run's training clock, which stops while it is
    evaluated), its final validation metrics and, for a policy, whether any of its eval points reached the verdict's
    primary KL level (the level the report reads the test runs at)."""
    records = read_jsonl(run_dir / "metrics.jsonl")[0]
    row = {
        "train FLOPs": float(max((r.get("flops", 0) for r in records if r["kind"] == "train"), default=0)),
        "train seconds": max((r["wall_seconds"] for r in records if "wall_seconds" in r), default=math.nan),
        **{k: metrics[k] for k in SHOWN if k in metrics},
    }
    if cfg.sweep.method != "reward_model" and cfg.report.kl_levels:
        level = cfg.report.kl_levels[0]
        row[f"reaches KL {level:g}"] = max(r["eval/kl"] for r in records if r["kind"] == "eval") >= level
    return {**row, "run_dir": str(run_dir)}


def final_eval(run_dir: Path) -> dict[str, float]:
    """A completed run's last eval row: what its training returned as its final validation metrics."""
    return [r for r in read_jsonl(run_dir / "metrics.jsonl")[0] if r["kind"] == "eval"][-1]


def choose(table: pd.DataFrame, cfg: Config) -> int | None:
    """The row the protocol picks: the best validation accuracy (reward model), or the best final validation gold
    reward (proxy where there is no gold) among the points within sweep.max_kl (PPO, DPO); None if none qualifies."""
    if cfg.sweep.method == "reward_model":
        return int(table["heldout/rm_accuracy"].idxmax())
    score = "eval/gold" if "eval/gold" in table else "eval/proxy"
    within = table[competing(table, cfg)]
    return None if within.empty else int(within[score].idxmax())


def competing(table: pd.DataFrame, cfg: Config) -> pd.Series:
    """Which points compete: all for the reward model; for PPO and DPO those within `sweep.max_kl` (all without it)."""
    if cfg.sweep.method == "reward_model" or cfg.sweep.max_kl is None:
        return pd.Series(True, index=table.index)
    return table["eval/kl"] <= cfg.sweep.max_kl


def compare_with_chosen(table: pd.DataFrame, chosen: int | None, cfg: Config, n_pairs: int) -> pd.DataFrame:
    """Each point's difference from the chosen one in the score the protocol chose by, with a 95% interval and its
    reading: the reward model's accuracies on the validation pairs (`proportion_difference`), PPO's and DPO's final
    gold (proxy) paired over the validation prompts (`paired_difference`). One training seed a point: the intervals
    hold the validation set's variation only, not the seeds'."""
    if chosen is None:
        return table
    if cfg.sweep.method == "reward_model":
        acc = table["heldout/rm_accuracy"]
        diffs = [S.proportion_difference(a, acc[chosen], n_pairs) for a in acc]
    else:
        score = "gold" if "eval/gold" in table else "proxy"
        values = [final_prompt_values(Path(d), score) for d in table["run_dir"]]
        draws = S.Draws.make(len(values[chosen]), cfg.report.bootstrap_reps, cfg.report.bootstrap_seed)
        diffs = [S.paired_difference(v, values[chosen], draws) for v in values]
    within = competing(table, cfg)
    words = [
        "chosen"
        if i == chosen
        else f"KL over {cfg.sweep.max_kl:g}"
        if not within[i]
        else "below"
        if hi < 0
        else "not distinguishable"
        for i, (_, _, hi) in enumerate(diffs)
    ]
    return table.assign(
        **{
            "Δ vs chosen": [d for d, _, _ in diffs],
            "Δ lo": [lo for _, lo, _ in diffs],
            "Δ hi": [hi for _, _, hi in diffs],
            "vs chosen": words,
        }
    )


def final_prompt_values(run_dir: Path, score: str) -> np.ndarray:
    """A run's per-prompt `score` at its last eval point, in prompt order (samples/eval_step*.prompts.csv)."""
    prompts = read_prompts(run_dir)
    return prompts[prompts["step"] == prompts["step"].max()].sort_values("prompt_index")[score].to_numpy(float)


def shared_budget(tables: dict[str, pd.DataFrame], cfg: Config) -> dict[str, float] | None:
    """The protocol's values for the budget the reward model and DPO share (docs/tuning.md): the passes both sweeps
    chose, or the smaller of the two, and each method's best learning rate at those passes by its own rule. None
    where DPO has no point at those passes within the KL cap."""
    chosen = {m: choose(t, cfg.with_values({"sweep.method": m})) for m, t in tables.items()}
    passes = min(int(tables[m]["budget.epochs"][i]) for m, i in chosen.items() if i is not None)
    values: dict[str, float] = {"budget.epochs": passes}
    for m, t in tables.items():
        at = t[t["budget.epochs"] == passes].reset_index(drop=True)
        best = choose(at, cfg.with_values({"sweep.method": m}))
        if best is None:
            return None
        values[f"{m}.learning_rate"] = float(at[f"{m}.learning_rate"][best])
    return values


def verdict_levels(tables: dict[str, pd.DataFrame], cfg: Config) -> list[float] | None:
    """The verdict's KL levels by docs/tuning.md's rule, from PPO's and DPO's sweeps on the validation prompts: the
    largest KL both chosen points reach (the smaller of their final validation KLs), rounded down to a whole nat (to
    0.1 below 1 nat), then ½ and ¼ of it. None where a sweep chose no point."""
    chosen = {m: choose(t, cfg.with_values({"sweep.method": m})) for m, t in tables.items()}
    if any(i is None for i in chosen.values()):
        return None
    reach = min(float(tables[m]["eval/kl"][i]) for m, i in chosen.items())
    primary = math.floor(reach) if reach >= 1 else math.floor(reach * 10) / 10
    return [float(primary), primary / 2, primary / 4]


def main(cfg: Config) -> int:
    prefs = build_preference_set(cfg)  # the profile's own set: every point trains on the pairs the report's runs do
    points = grid(cfg)
    configs = [point_config(cfg, values) for values in points]  # every point checked before the first trains
    rows = []
    for i, (values, point_cfg) in enumerate(zip(points, configs, strict=True), start=1):
        print(
            f"sweep {cfg.sweep.method} {i}/{len(points)}: " + ", ".join(f"{k}={v:g}" for k, v in values.items()),
            flush=True,
        )
        run_dir, metrics = train_point(point_cfg, prefs)
        rows.append({**values, **point_row(run_dir, metrics, cfg)})
    table = pd.DataFrame(rows)
    chosen = choose(table, cfg)
    n_pairs = len(prefs.scored_pairs("validation"))
    table = compare_with_chosen(table, chosen, cfg, n_pairs)
    table.insert(0, "chosen", ["←" if i == chosen else "" for i in range(len(table))])
    out = PROJECT_ROOT / cfg.report.out_dir / cfg.profile / f"sweep-{cfg.sweep.method}"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".csv"), table.to_csv(index=False))
    shown = table.drop(columns="run_dir")
    how = (
        f"accuracy on the {n_pairs} validation pairs; Δ: a difference of two "
        "accuracies, the normal 95% interval as if unpaired"
        if cfg.sweep.method == "reward_model"
        else "final gold reward (proxy without gold) on the validation prompts"
        + (f", among the points within KL {cfg.sweep.max_kl:g} nats" if cfg.sweep.max_kl else "")
        + "; Δ: paired by prompt, the report's prompt bootstrap, 95%"
    )
    atomic_write_text(
        out.with_suffix(".md"),
        markdown_table(shown) + f"\n\nJudged by {how}. One training seed "
        f"({cfg.sweep.seed}) a point: the intervals hold the validation set's variation only, not the "
        "seeds' (docs/tuning.md).\n",
    )
    print(shown.to_string(index=False))
    print(
        f"chosen: {', '.join(f'{k}={points[chosen][k]:g}' for k in points[chosen])}"
        if chosen is not None
        else f"chosen: none (no grid point ended within sweep.max_kl={cfg.sweep.max_kl})"
    )
    print(f"sweep table: {out.with_suffix('.csv')}")
    tables = {
        m: pd.read_csv(out.with_name(f"sweep-{m}.csv"))
        for m in ("reward_model", "dpo")
        if out.with_name(f"sweep-{m}.csv").exists()
    }
    if cfg.sweep.method in tables and len(tables) == 2:
        values = shared_budget(tables, cfg)
        print(
            "the shared budget by docs/tuning.md's rule: "
            + (
                ", ".join(f"{k}={v:g}" for k, v in values.items())
                if values is not None
                else f"none (DPO has no point within sweep.max_kl={cfg.sweep.max_kl} at the chosen passes)"
            )
        )
    tables = {
        m: pd.read_csv(out.with_name(f"sweep-{m}.csv"))
        for m in ("ppo", "dpo")
        if out.with_name(f"sweep-{m}.csv").exists()
    }
    if cfg.sweep.method in tables and len(tables) == 2:
        levels = verdict_levels(tables, cfg)
        print(
            "the verdict's KL levels by docs/tuning.md's rule, for the profile before its runs: "
            + (
                f"report.kl_levels: [{', '.join(f'{level:g}' for level in levels)}]"
                if levels is not None
                else f"none (a sweep has no point within sweep.max_kl={cfg.sweep.max_kl})"
            )
        )
    return 0
