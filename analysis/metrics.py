"""The comparison's metrics as small pure functions of the tidy frames; definitions in docs/analysis.md.

Frames carry RUN (one run) and GROUP (one method at one β: the unit seeds are aggregated over). Every interval is
the 95% hierarchical bootstrap of analysis/stats.py: over a group's runs (seeds), then over the eval prompts where the
value is a mean over them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import stats as S

RUN = ["method", "beta", "seed", "run_id"]
GROUP = ["method", "beta"]
# A method's cost from the start, its own earlier stages included (`earlier_stages`): the x axes of the curves and
# the units of the headline's "to target gold" columns
SECONDS, FLOPS = "end-to-end seconds", "training FLOPs"
# trains against r_phi or ranks by it: the reward model's training is its cost
USES_REWARD_MODEL = ("ppo", "rloo", "online-dpo", "bon")
OWN_EARLIER_STAGES = ("ref_logps",)  # DPO's pass of pi_ref over its pairs, before its loop
MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its standard deviation

# The evaluator's per-prompt column (samples/*.prompts.csv) behind each eval mean: these are bootstrapped over prompts
PER_PROMPT = {"eval/gold": "gold", "eval/proxy": "proxy", "eval/kl": "kl", "eval/kl_k3": "kl_k3",
              "eval/length": "length", "eval/eos_rate": "eos"}
STATS = ("n", "mean", "std", "lo", "hi")


class PromptValues:
    """Per-prompt values of the included runs (Runs.prompts), as [eval points x prompts] arrays. A run without them
    (written before they were kept), or whose prompts are not the common ones, gives its eval means instead ([E, 1]):
    the bootstrap then resamples it over seeds alone."""

    def __init__(self, prompts: pd.DataFrame):
        self.n_prompts = int(prompts["prompt_index"].nunique()) if "prompt_index" in prompts else 0
        self._runs = dict(iter(prompts.groupby(["method", "run_id"]))) if len(prompts) else {}
        self._tables: dict[tuple, pd.DataFrame | None] = {}

    def get(self, run: pd.DataFrame, column: str) -> np.ndarray:
        """`run`'s eval rows (one run, in step order) -> [E, P] values of `column` per prompt, or [E, 1] its means."""
        means = run[column].to_numpy(float)[:, None]
        key = (run["method"].iloc[0], run["run_id"].iloc[0], column)
        if key not in self._tables:
            rows, name = self._runs.get(key[:2]), PER_PROMPT.get(column)
            ok = rows is not None and name in rows and rows[name].notna().all()
            table = rows.pivot(index="step", columns="prompt_index", values=name) if ok else None
            self._tables[key] = table if table is not None and table.shape[1] == self.n_prompts else None
        table = self._tables[key]
        if table is None or not set(run["step"]) <= set(table.index):
            return means
        return table.loc[run["step"]].to_numpy(float)


def make_draws(values: PromptValues, reps: int, seed: int) -> S.Draws:
    return S.Draws.make(max(values.n_prompts, 1), reps, seed)


def summarize(frame: pd.DataFrame, by: list[str], columns: list[str], draws: S.Draws) -> pd.DataFrame:
    """One row per group: for each column, `<col> n|mean|std|lo|hi`: the mean over the group's rows (runs), the
    between-run std and the 95% bootstrap interval over runs (S.bootstrap_mean, seeds only: these are run-level
    numbers)."""
    rows = []
    for key, group in frame.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        for col in columns:
            values = [np.array([v]) for v in group[col].dropna()]
            row.update({f"{col} {stat}": v for stat, v in S.bootstrap_mean(values, draws, key).items()})
        rows.append(row)
    return pd.DataFrame(rows, columns=by + [f"{c} {s}" for c in columns for s in STATS])


def final_evals(evals: pd.DataFrame) -> pd.DataFrame:
    """Each run's last eval point (largest step)."""
    return evals.sort_values("step", kind="stable").groupby(RUN, dropna=False).tail(1).reset_index(drop=True)


def runs_of(evals: pd.DataFrame, *columns: str):
    """(group, RUN key, the run's eval rows with every one of `columns`, in step order), run by run."""
    rows = evals.dropna(subset=list(columns)) if set(columns) <= set(evals) else evals.iloc[0:0]
    for key, run in rows.sort_values("step", kind="stable").groupby(RUN, dropna=False, sort=True):
        yield key[:2], key, run


def frontier(evals: pd.DataFrame, values: PromptValues, draws: S.Draws, y: str = "eval/gold") -> pd.DataFrame:
    """Per group and eval step: the mean over its runs of KL and of `y`, each with its 95% hierarchical bootstrap
    interval (`<col> n|mean|std|lo|hi`), in step order: the group's trajectory through the reward-KL plane, drawn
    joined along training. No envelope over single noisy points, which would pick the luckiest of them."""
    at: dict[tuple, dict[str, list]] = {}
    for group, _, run in runs_of(evals, "eval/kl", y):
        kl, score = values.get(run, "eval/kl"), values.get(run, y)
        for i, step in enumerate(run["step"]):
            point = at.setdefault((*group, step), {"eval/kl": [], y: []})
            point["eval/kl"].append(kl[i])
            point[y].append(score[i])
    rows = [{"method": m, "beta": b, "step": step,
             **{f"{c} {k}": v for c in ("eval/kl", y) for k, v in S.bootstrap_mean(cols[c], draws, (m, b)).items()}}
            for (m, b, step), cols in sorted(at.items(), key=lambda kv: (str(kv[0][0]), kv[0][1], kv[0][2]))]
    return pd.DataFrame(rows, columns=[*GROUP, "step", *(f"{c} {k}" for c in ("eval/kl", y) for k in STATS)])


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
    """Per included run: seconds and FLOPs of what its method ran before its own loop. PPO, RLOO, online DPO and
    Best of N: the training of the reward model their manifest names (stage `reward_model` of that run; NaN where
    that run is not among the included ones); DPO and its variants: their pass of pi_ref over the pairs (stage
    `ref_logps`); 0 for the others. The shared preference set (and the SFT stage) are left out: every method needs them alike."""
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


def matched_gold(evals: pd.DataFrame, values: PromptValues, draws: S.Draws, compared: list[str],
                 fractions: list[float], fixed_level: float | None) -> tuple[S.MatchedKL, dict[tuple, list]]:
    """Gold at fractions of the matched KL for every group with gold and KL (S.matched_kl), its level set by the
    groups of the `compared` methods; and each group's RUN keys, in the order of its `per_run` rows."""
    curves: dict[tuple, list] = {}
    keys: dict[tuple, list] = {}
    for group, key, run in runs_of(evals, "eval/kl", "eval/gold"):
        curves.setdefault(group, []).append((values.get(run, "eval/kl"), values.get(run, "eval/gold")))  # [E, P]
        keys.setdefault(group, []).append(key)
    levels_from = [g for g in curves if g[0] in compared] or list(curves)
    return S.matched_kl(curves, levels_from, fractions, draws, fixed_level), keys


def kl_column(fraction: float) -> str:
    """The headline's name for gold at a fraction of the matched KL."""
    return "gold at matched KL" if fraction == 1 else f"gold at {fraction:g} × matched KL"


def per_run_headline(evals: pd.DataFrame, matched: S.MatchedKL | None, keys: dict[tuple, list],
                     gold_level: float | None) -> pd.DataFrame:
    """One row per run: final eval metrics, and where the task has a gold reward, its gold at each fraction of the
    matched KL (`matched_gold`) and the end-to-end seconds and training FLOPs to first reach the target gold reward
    (`evals` carry SECONDS and FLOPS: `with_earlier_stages`)."""
    final = final_evals(evals).set_index(RUN)
    out = pd.DataFrame(index=final.index)
    if matched is not None:
        read = pd.DataFrame([dict(zip(RUN, key), **{kl_column(f): v for f, v in zip(matched.fractions, row)})
                             for group, rows in matched.per_run.items() for key, row in zip(keys[group], rows)])
        out = out.join(read.set_index(RUN)) if len(read) else out
        out["seconds to target gold"] = crossings(evals, "eval/gold", SECONDS, gold_level)
        out["training FLOPs to target gold"] = crossings(evals, "eval/gold", FLOPS, gold_level)
    wanted = ["eval/gold", "eval/gold_sem", "eval/kl", "eval/proxy", "heldout/rm_accuracy",
              "heldout/implicit_accuracy"]
    out = out.join(final[[c for c in wanted if c in final]].add_prefix("final "))
    return out.reset_index()


def headline_summary(per_run: pd.DataFrame, matched: S.MatchedKL | None, draws: S.Draws) -> pd.DataFrame:
    """Per group, every per-run headline column as `<col> n|mean|std|lo|hi`; gold at matched KL with the interval of
    the hierarchical bootstrap (seeds, then prompts, the matched KL recomputed in each replicate), the others over
    seeds."""
    columns = [c for c in per_run if c not in RUN]
    table = summarize(per_run, GROUP, columns, draws)
    if matched is None:
        return table
    for i, f in enumerate(matched.fractions):
        for group, replicates in matched.replicates.items():
            row = (table["method"] == group[0]) & (table["beta"] == group[1])
            table.loc[row, [f"{kl_column(f)} lo", f"{kl_column(f)} hi"]] = S.interval(replicates[:, i])
    return table


def verdict(matched: S.MatchedKL, a: tuple, b: tuple, names: tuple[str, str] = ("PPO", "DPO")) -> pd.DataFrame:
    """Group a − group b in gold reward at each fraction of the matched KL: the KL level, the observed difference of
    means, its 95% hierarchical bootstrap interval, the seeds of each, their between-seed std, the seeds per method a
    difference of this size needs (S.seeds_for_power) and the sentence (S.verdict_words, the groups called `names`)."""
    rows = []
    for i, f in enumerate(matched.fractions):
        va, vb = matched.per_run[a][:, i], matched.per_run[b][:, i]
        na, nb = int(np.sum(~np.isnan(va))), int(np.sum(~np.isnan(vb)))
        sd = [float(np.nanstd(v, ddof=1)) if n > 1 else math.nan for v, n in ((va, na), (vb, nb))]
        diff = float(np.nanmean(va) - np.nanmean(vb))
        lo, hi = S.interval(matched.replicates[a][:, i] - matched.replicates[b][:, i])
        rows.append({"KL level": matched.level * f, "fraction of matched KL": f, "difference": diff, "lo": lo,
                     "hi": hi, "seeds a": na, "seeds b": nb, "sd a": sd[0], "sd b": sd[1],
                     "seeds per method for 80% power": S.seeds_for_power(diff, *sd),
                     "verdict": S.verdict_words(lo, hi, na, nb, *names)})
    return pd.DataFrame(rows)


def band(evals: pd.DataFrame, values: PromptValues, draws: S.Draws, column: str) -> pd.DataFrame:
    """Mean and 95% bootstrap interval of `column` across a group's runs at each eval step (over prompts too, where
    it is a mean over them), with the runs' mean SECONDS and FLOPS at that step (`with_earlier_stages`), the axes
    the band is drawn over."""
    at: dict[tuple, list] = {}
    for group, _, run in runs_of(evals, column):
        for i, (step, v) in enumerate(zip(run["step"], values.get(run, column))):
            at.setdefault((*group, step), []).append((v, run[SECONDS].iloc[i], run[FLOPS].iloc[i]))
    rows = [{"method": m, "beta": b, "step": step, SECONDS: np.mean([p[1] for p in points]),
             FLOPS: np.mean([p[2] for p in points]), **S.bootstrap_mean([p[0] for p in points], draws, (m, b))}
            for (m, b, step), points in at.items()]
    return pd.DataFrame(rows, columns=[*GROUP, "step", SECONDS, FLOPS, *STATS])


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


GAO_FORM = {"ppo": "rl", "ppo-gt": "rl", "bon": "bon"}  # which of Gao et al.'s forms a method's gains follow


def overoptimisation(evals: pd.DataFrame) -> pd.DataFrame:
    """Gao et al.'s (2022) coordinates, per eval point of the PPO and Best-of-N runs: d = √KL (Best of N: of its KL
    bound) and the proxy and gold gains since the run's first eval, each in units of that first eval's sample std
    (so the reward model's logits and the gold scale share an axis). A proxy gain that keeps rising while the gold
    gain bends down is over-optimisation of the reward model."""
    columns = [*RUN, "step", "d", "proxy gain", "gold gain"]
    out = []
    for _, _, run in runs_of(evals[evals["method"].isin(list(GAO_FORM))], "eval/kl"):
        run = run.assign(d=np.sqrt(run["eval/kl"].clip(lower=0)))
        first = run.iloc[0]
        for name in ("proxy", "gold"):
            if f"eval/{name}" in run and run[f"eval/{name}"].notna().all():
                run[f"{name} gain"] = (run[f"eval/{name}"] - first[f"eval/{name}"]) / first[f"eval/{name}_std"]
        out.append(run)
    return pd.concat(out).reindex(columns=columns) if out else pd.DataFrame(columns=columns)


def gao_fits(gains: pd.DataFrame) -> pd.DataFrame:
    """Per method and reward (proxy, gold): Gao et al.'s form fitted by least squares over every eval point of its
    runs (S.fit_gao): RL R(d) = d(α − β log d) for PPO, R(d) = d(α − β d) for Best of N."""
    rows = []
    for method, runs in gains.groupby("method", sort=False):
        form = GAO_FORM[method]
        for reward in ("proxy", "gold"):
            points = runs.dropna(subset=["d", f"{reward} gain"])
            if len(points) >= 3:  # two coefficients: at least one point beyond them to judge the fit
                alpha, beta = S.fit_gao(points["d"], points[f"{reward} gain"], form)
                rows.append({"method": method, "reward": reward, "form": S.GAO_FORMS[form], "α": alpha, "β": beta,
                             "points": len(points)})
    return pd.DataFrame(rows, columns=["method", "reward", "form", "α", "β", "points"])


SCORERS = {"rm": "explicit RM r_φ", "implicit": "DPO implicit β·log π/π_ref", "gold": "gold (label-noise ceiling)"}


def heldout_scores(final: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Long frame: per run and scorer present in its final eval, held-out accuracy and mean margin. A model scored
    by several runs counts once: the explicit RM of PPO seeds that share one reward model, and the gold labels, the
    same pairs for every run (one row per group)."""
    rm_of = runs.set_index(["method", "run_id"])["reward_model_path"] if "reward_model_path" in runs else None
    parts = []
    for key, label in SCORERS.items():
        if f"heldout/{key}_accuracy" not in final:
            continue
        rows = final.dropna(subset=[f"heldout/{key}_accuracy"])
        if key == "gold":
            rows = rows.drop_duplicates(GROUP)
        elif key == "rm" and rm_of is not None:
            model = [rm_of.get((m, r)) for m, r in zip(rows["method"], rows["run_id"])]
            rows = rows.assign(model=[m if isinstance(m, str) else r for m, r in zip(model, rows["run_id"])])
            rows = rows.drop_duplicates([*GROUP, "model"])
        parts.append(rows[RUN].assign(scorer=label, accuracy=rows[f"heldout/{key}_accuracy"],
                                      margin=rows[f"heldout/{key}_margin"]))
    columns = [*RUN, "scorer", "accuracy", "margin"]
    return pd.concat(parts)[columns] if parts else pd.DataFrame(columns=columns)


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
