"""The comparison's metrics as small pure functions of the tidy frames; definitions in docs/analysis.md.

Frames carry RUN (one run) and GROUP (one method at one β: the unit seeds are aggregated over). Intervals are
across runs (seeds) of a group: Student t, 95%, two-sided.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

RUN = ["method", "beta", "seed", "run_id"]
GROUP = ["method", "beta"]
# A method's cost from the start, its own earlier stages included (`earlier_stages`): the x axes of the curves and
# the units of the headline's "to target gold" columns
SECONDS, FLOPS = "end-to-end seconds", "training FLOPs"
USES_REWARD_MODEL = ("ppo", "bon")  # trains against r_phi or ranks by it: the reward model's training is its cost
OWN_EARLIER_STAGES = ("ref_logps",)  # DPO's pass of pi_ref over its pairs, before its loop
MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its standard deviation

# t_{0.975, df} for df = 1..30 (scipy is not a dependency); larger df use a Cornish-Fisher expansion, which
# is within 1e-3 of the exact quantile from df = 30 on.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
         2.042]


def t_critical(df: int) -> float:
    """Two-sided 95% critical value of Student's t with `df` degrees of freedom."""
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_interval(values) -> dict[str, float]:
    """n, mean, sample std and the 95% t-interval of the mean (NaN where n is too small to say)."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "lo": math.nan, "hi": math.nan}
    mean = float(x.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": math.nan, "lo": math.nan, "hi": math.nan}
    std = float(x.std(ddof=1))
    half = t_critical(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "lo": mean - half, "hi": mean + half}


def summarize(frame: pd.DataFrame, by: list[str], columns: list[str]) -> pd.DataFrame:
    """One row per group: for each column, `<col> n|mean|std|lo|hi` across the group's rows (runs)."""
    rows = []
    for key, group in frame.groupby(by, sort=True, dropna=False):
        row = dict(zip(by, key))
        for col in columns:
            row.update({f"{col} {stat}": v for stat, v in t_interval(group[col]).items()})
        rows.append(row)
    return pd.DataFrame(rows, columns=by + [f"{c} {s}" for c in columns for s in ("n", "mean", "std", "lo", "hi")])


def final_evals(evals: pd.DataFrame) -> pd.DataFrame:
    """Each run's last eval point (largest step)."""
    return evals.sort_values("step", kind="stable").groupby(RUN, dropna=False).tail(1).reset_index(drop=True)


def frontier(points: pd.DataFrame, x: str = "eval/kl", y: str = "eval/gold") -> pd.DataFrame:
    """Upper envelope F(k) = max{y_i : x_i <= k} of a cloud of eval points, as the points where F steps up.

    F is a non-decreasing step function of k; the returned points (ordered by x, with all their columns) are
    exactly those not dominated by another point with lower-or-equal x and higher-or-equal y.
    """
    pts = points.dropna(subset=[x, y]).sort_values([x, y], ascending=[True, False], kind="stable")
    previous_best = pts[y].cummax().shift(1, fill_value=-np.inf)
    return pts[pts[y] > previous_best].reset_index(drop=True)


def first_crossing(track, values, level: float) -> float:
    """`values` at the first point where the ordered trajectory `track` reaches `level` (track >= level),
    linearly interpolated between the last point below the level and that one; the first value if the
    trajectory starts at or above it; NaN if it never gets there."""
    track, values = np.asarray(track, dtype=float), np.asarray(values, dtype=float)
    hits = np.flatnonzero(track >= level)
    if hits.size == 0:
        return math.nan
    i = hits[0]
    if i == 0:
        return float(values[0])
    frac = (level - track[i - 1]) / (track[i] - track[i - 1])
    return float(values[i - 1] + frac * (values[i] - values[i - 1]))


def crossings(evals: pd.DataFrame, track: str, value: str, level: float) -> pd.Series:
    """first_crossing of every run's eval trajectory (ordered by step), indexed by RUN."""
    def one(run: pd.DataFrame) -> float:
        run = run.sort_values("step").dropna(subset=[track, value])
        return first_crossing(run[track], run[value], level)
    return evals.groupby(RUN, dropna=False)[[track, value, "step"]].apply(one)


def common_reach(evals: pd.DataFrame, column: str) -> float:
    """The highest level of `column` that every run reaches: min over runs of each run's maximum."""
    return float(evals.groupby(RUN, dropna=False)[column].max().min())


def earlier_stages(runs: pd.DataFrame, timings: pd.DataFrame) -> pd.DataFrame:
    """Per included run: seconds and FLOPs of what its method ran before its own loop. PPO and Best of N: the
    training of the reward model their manifest names (stage `reward_model` of that run; NaN where that run is not
    among the included ones); DPO and its variants: their pass of pi_ref over the pairs (stage `ref_logps`); 0 for
    the others. The shared preference set (and the SFT stage) are left out: every method needs them alike."""
    cost = timings.set_index(["method", "run_id", "stage"])[["seconds", "flops"]]
    rows = []
    for _, run in runs[runs["included"]].iterrows():
        stages = [(run["method"], run["run_id"], s) for s in OWN_EARLIER_STAGES]
        spent = cost.loc[[s for s in stages if s in cost.index]].sum()
        rm = run.get("reward_model_path")
        if run["method"] in USES_REWARD_MODEL and isinstance(rm, str):
            rm_stage = ("reward_model", Path(rm).parent.parent.name, "reward_model")  # <run>/checkpoints/final
            spent = spent + (cost.loc[rm_stage] if rm_stage in cost.index else math.nan)
        rows.append({**run[RUN].to_dict(), "earlier seconds": spent["seconds"], "earlier FLOPs": spent["flops"]})
    return pd.DataFrame(rows, columns=[*RUN, "earlier seconds", "earlier FLOPs"])


def with_earlier_stages(frame: pd.DataFrame, earlier: pd.DataFrame) -> pd.DataFrame:
    """Metrics rows with their run's cost from the start: SECONDS = `wall_seconds` + the earlier stages' seconds,
    FLOPS = `flops` (the run's own training FLOPs so far) + theirs (NaN for runs that logged no FLOPs)."""
    out = frame.merge(earlier[["method", "run_id", "earlier seconds", "earlier FLOPs"]], on=["method", "run_id"],
                      how="left")
    out[SECONDS] = out["wall_seconds"] + out["earlier seconds"]
    out[FLOPS] = (out["flops"] if "flops" in out else math.nan) + out["earlier FLOPs"]
    return out.drop(columns=["earlier seconds", "earlier FLOPs"])


def per_run_headline(evals: pd.DataFrame, kl_level: float | None, gold_level: float | None) -> pd.DataFrame:
    """One row per run: final eval metrics, and where the task has a gold reward, the gold reward at the matched KL
    and the end-to-end seconds and training FLOPs to first reach the target gold reward (`evals` carry SECONDS and
    FLOPS: `with_earlier_stages`)."""
    final = final_evals(evals).set_index(RUN)
    out = pd.DataFrame(index=final.index)
    if "eval/gold" in evals:
        out["gold at matched KL"] = crossings(evals, "eval/kl", "eval/gold", kl_level)
        out["seconds to target gold"] = crossings(evals, "eval/gold", SECONDS, gold_level)
        out["training FLOPs to target gold"] = crossings(evals, "eval/gold", FLOPS, gold_level)
    wanted = ["eval/gold", "eval/gold_sem", "eval/kl", "eval/proxy", "heldout/rm_accuracy",
              "heldout/implicit_accuracy"]
    out = out.join(final[[c for c in wanted if c in final]].add_prefix("final "))
    return out.reset_index()


def band(evals: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean and 95% t-interval of `column` across a group's runs at each eval step, with the runs' mean SECONDS and
    FLOPS at that step (`with_earlier_stages`), the axes the band is drawn over."""
    rows = []
    for (method, beta, step), at in evals.dropna(subset=[column]).groupby([*GROUP, "step"], dropna=False):
        rows.append({"method": method, "beta": beta, "step": step, SECONDS: at[SECONDS].mean(),
                     FLOPS: at[FLOPS].mean(), **t_interval(at[column])})
    return pd.DataFrame(rows, columns=[*GROUP, "step", SECONDS, FLOPS, "n", "mean", "std", "lo", "hi"])


def spikes(values, window: int, k: float) -> np.ndarray:
    """True where a value exceeds the median of the `window` values before it by more than k robust
    standard deviations (1.4826 x their median absolute deviation). The first `window` points are never
    spikes (no full window yet); a flat window (MAD 0) makes any rise a spike."""
    x = pd.Series(np.asarray(values, dtype=float))
    before = x.shift(1).rolling(window, min_periods=window)
    median = before.median()
    mad = before.apply(lambda w: np.median(np.abs(w - np.median(w))), raw=True)
    return (x > median + k * MAD_TO_STD * mad).to_numpy()


def flag_spikes(train: pd.DataFrame, columns: list[str], window: int, k: float) -> pd.DataFrame:
    """Long frame, one row per run, series and training step: RUN, series, step, value, spike (see `spikes`)."""
    parts = []
    for _, run in train.groupby(RUN, dropna=False):
        run = run.sort_values("step")
        for col in columns:
            if col in run and run[col].notna().any():
                values = run.dropna(subset=[col])
                parts.append(values[[*RUN, "step"]].assign(series=col, value=values[col],
                                                            spike=spikes(values[col], window, k)))
    columns_out = [*RUN, "step", "series", "value", "spike"]
    return pd.concat(parts)[columns_out] if parts else pd.DataFrame(columns=columns_out)


def spike_counts(flagged: pd.DataFrame) -> pd.DataFrame:
    """Per run and series: training points and how many of them are spikes."""
    counts = flagged.groupby([*RUN, "series"], dropna=False)["spike"].agg(points="size", spikes="sum")
    return counts.reset_index()


def series_summary(train: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Per run and training series: first, last, mean and max over training (clip fraction, log-probs...)."""
    present = [c for c in columns if c in train]
    long = train.melt(id_vars=[*RUN, "step"], value_vars=present, var_name="series").dropna(subset=["value"])
    long = long.sort_values("step", kind="stable")
    out = long.groupby([*RUN, "series"], dropna=False)["value"].agg(["first", "last", "mean", "max"])
    return out.reset_index()


def overoptimisation(ppo_evals: pd.DataFrame) -> pd.DataFrame:
    """Per PPO eval point: proxy and gold gains since the run's first eval, each in units of that first
    eval's sample std (so the RM's logit scale and the gold scale are comparable), and their gap
    proxy gain - gold gain. A gap that grows over training is over-optimisation of the reward model."""
    columns = [*RUN, "step", "proxy gain", "gold gain", "gap"]
    if "eval/proxy" not in ppo_evals:
        return pd.DataFrame(columns=columns)
    out = []
    for _, run in ppo_evals.dropna(subset=["eval/proxy"]).groupby(RUN, dropna=False):
        run = run.sort_values("step").copy()
        for name in ("proxy", "gold"):
            if f"eval/{name}" in run:
                first = run.iloc[0]
                run[f"{name} gain"] = (run[f"eval/{name}"] - first[f"eval/{name}"]) / first[f"eval/{name}_std"]
        run["gap"] = run["proxy gain"] - run["gold gain"] if "gold gain" in run else math.nan
        out.append(run)
    return pd.concat(out).reindex(columns=columns) if out else pd.DataFrame(columns=columns)


SCORERS = {"rm": "explicit RM r_φ", "implicit": "DPO implicit β·log π/π_ref", "gold": "gold (label-noise ceiling)"}


def heldout_scores(final: pd.DataFrame) -> pd.DataFrame:
    """Long frame: per run and scorer present in its final eval, held-out accuracy and mean margin."""
    parts = [final[RUN].assign(scorer=label, accuracy=final[f"heldout/{key}_accuracy"],
                               margin=final[f"heldout/{key}_margin"])
             for key, label in SCORERS.items() if f"heldout/{key}_accuracy" in final]
    columns = [*RUN, "scorer", "accuracy", "margin"]
    return pd.concat(parts).dropna(subset=["accuracy"])[columns] if parts else pd.DataFrame(columns=columns)


def stage_costs(timings: pd.DataFrame) -> pd.DataFrame:
    """Per method and stage: runs, mean wall-clock seconds and FLOPs per run, max peak memory."""
    per_stage = timings.groupby(["method", "stage"]).agg(
        runs=("run_id", "nunique"), seconds=("seconds", "mean"), flops=("flops", "mean"),
        peak_memory_mb=("peak_memory_mb", "max"))
    return per_stage.reset_index()


def method_costs(metrics: pd.DataFrame, earlier: pd.DataFrame, timings: pd.DataFrame) -> pd.DataFrame:
    """Per method, means over its runs: the own loop's FLOPs and seconds (a run's largest logged `flops` and
    `wall_seconds`), the earlier stages' (`earlier_stages`), their sums (training FLOPs, end-to-end seconds), and
    the evaluation's FLOPs (stage `eval`), counted apart."""
    metrics = metrics if "flops" in metrics else metrics.assign(flops=math.nan)  # runs from before FLOPs were logged
    own = metrics.groupby(RUN, dropna=False).agg(own_flops=("flops", "max"), own_seconds=("wall_seconds", "max"))
    evaluation = timings[timings["stage"] == "eval"].groupby(RUN, dropna=False)["flops"].sum(min_count=1)
    evaluation = evaluation.rename("eval_flops")
    runs = own.join(evaluation).reset_index().merge(earlier, on=RUN, how="left")
    runs = runs.assign(**{"own loop FLOPs": runs["own_flops"], "earlier stages FLOPs": runs["earlier FLOPs"],
                          FLOPS: runs["own_flops"] + runs["earlier FLOPs"],
                          SECONDS: runs["own_seconds"] + runs["earlier seconds"],
                          "evaluation FLOPs": runs["eval_flops"]})
    columns = ["own loop FLOPs", "earlier stages FLOPs", FLOPS, SECONDS, "evaluation FLOPs"]
    out = runs.groupby("method")[columns].mean()
    return out.join(runs.groupby("method")["run_id"].nunique().rename("runs")).reset_index()[
        ["method", "runs", *columns]]


def preference_set_costs(data_manifests: list[dict], shas: set[str]) -> pd.DataFrame:
    """The shared preference sets the included runs read (sha256 in `shas`): build seconds and the FLOPs of
    sampling pi_ref's responses (train and held-out pairs; absent where the pairs come from a file)."""
    rows = []
    for d in data_manifests:
        if d.get("sha256") in shas:
            splits = [s for s in (d.get("stats") or {}).values() if isinstance(s, dict) and "sampling_flops" in s]
            rows.append({"preference set": d["sha256"][:12], "seconds": d.get("build_seconds", math.nan),
                         "flops": sum(s["sampling_flops"] for s in splits) if splits else math.nan})
    return pd.DataFrame(rows, columns=["preference set", "seconds", "flops"])


BUDGET = {"budget_pairs": "pairs", "budget_passes": "passes", "budget_pair_presentations": "pair presentations"}


def budgets(runs: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Per method and beta of `methods`: the training pairs, passes and pair presentations its included runs
    recorded (PPO's are its reward model's), each distinct value once ("640 / 320" where runs differ), and the
    number of runs."""
    included = runs[runs["included"] & runs["method"].isin(methods)]
    if included.empty or not set(BUDGET) <= set(included):
        return pd.DataFrame(columns=[*GROUP, *BUDGET.values(), "runs"])
    rows = [{"method": method, "beta": beta, "runs": len(group),
             **{name: " / ".join(f"{v:g}" for v in sorted(group[c].dropna().unique())) or "–"
                for c, name in BUDGET.items()}}
            for (method, beta), group in included.groupby(GROUP, sort=False)]
    return pd.DataFrame(rows)[[*GROUP, *BUDGET.values(), "runs"]]


def shared_reward_models(runs: pd.DataFrame, method: str = "ppo") -> dict[str, int]:
    """Reward models that more than one included run of `method` trained against: path -> runs."""
    if "reward_model_path" not in runs:
        return {}
    paths = runs.loc[runs["included"] & (runs["method"] == method), "reward_model_path"].dropna()
    counts = paths.value_counts()
    return {path: int(n) for path, n in counts.items() if n > 1}
