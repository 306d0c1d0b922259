"""The comparison's metrics as small pure functions of the tidy frames; definitions in docs/analysis.md.

Frames carry RUN (one run) and GROUP (one method at one β: the unit seeds are aggregated over). Every number the
report states with an interval, and every comparison it words, has the 95% t-interval of analysis/stats.py over a
group's runs (seeds), with the eval prompts' term where the value is a mean over them (docs/analysis.md, "The
verdict"). The plots' bands alone are drawn from the hierarchical bootstrap (seeds, then prompts), and say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import stats as S
from rlhf.methods import METHODS

RUN = ["method", "beta", "seed", "run_id"]
GROUP = ["method", "beta"]
# A method's cost from the start, its own earlier stages included (`earlier_stages`): the x axes of the curves and
# the units of the headline's "to target gold" columns
SECONDS, FLOPS = "end-to-end seconds", "training FLOPs"
OWN_EARLIER_STAGES = ("ref_logps",)  # DPO's pass of pi_ref over its pairs, before its loop
MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its standard deviation

# The evaluator's per-prompt column (samples/*.prompts.csv) behind each eval mean: the prompts' term of an interval
PER_PROMPT = {
    "eval/gold": "gold",
    "eval/proxy": "proxy",
    "eval/kl": "kl",
    "eval/kl_k3": "kl_k3",
    "eval/length": "length",
    "eval/eos_rate": "eos",
}
STATS = ("n", "mean", "std", "lo", "hi")


def uses_reward_model(method: str) -> bool:
    """Trains against r_phi or ranks by it: the reward model's training is part of its cost."""
    return method in METHODS and METHODS[method].reward_model == "trains"


def gao_methods() -> list[str]:
    """The methods whose gains follow one of Gao et al.'s forms (`METHODS[m].gao`)."""
    return [m.name for m in METHODS.values() if m.gao]


class PromptValues:
    """Per-prompt values of the included runs (Runs.prompts), as [eval points x prompts] arrays. A run without them
    (written before they were kept), or whose prompts are not the common ones, gives its eval means instead ([E, 1]):
    its intervals are then over seeds alone."""

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


def summarize(frame: pd.DataFrame, by: list[str], columns: list[str]) -> pd.DataFrame:
    """One row per group: for each column, `<col> n|mean|std|lo|hi`: the mean over the group's rows (runs), the
    between-run std and the 95% t-interval over runs (S.t_mean: these are run-level numbers)."""
    rows = []
    for key, group in frame.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        for col in columns:
            row.update({f"{col} {stat}": v for stat, v in S.t_mean(group[col].dropna().to_numpy(float)).items()})
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
    rows = [
        {
            "method": m,
            "beta": b,
            "step": step,
            **{f"{c} {k}": v for c in ("eval/kl", y) for k, v in S.bootstrap_mean(cols[c], draws, (m, b)).items()},
        }
        for (m, b, step), cols in sorted(at.items(), key=lambda kv: (str(kv[0][0]), kv[0][1], kv[0][2]))
    ]
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
    `ref_logps`); 0 for the others. The shared preference set (and the SFT stage) are left out: every method needs
    them alike."""
    cost = timings.set_index(["method", "run_id", "stage"])[["seconds", "flops"]]
    rows = []
    for _, run in runs[runs["included"]].iterrows():
        stages = [(run["method"], run["run_id"], s) for s in OWN_EARLIER_STAGES]
        spent = cost.loc[[s for s in stages if s in cost.index]].sum()
        rm = run.get("reward_model_path")
        if uses_reward_model(run["method"]) and isinstance(rm, str):
            rm_stage = ("reward_model", Path(rm).parent.parent.name, "reward_model")  # <run>/checkpoints/final
            spent = spent + (cost.loc[rm_stage] if rm_stage in cost.index else math.nan)
        rows.append({**run[RUN].to_dict(), "earlier seconds": spent["seconds"], "earlier FLOPs": spent["flops"]})
    return pd.DataFrame(rows, columns=[*RUN, "earlier seconds", "earlier FLOPs"])


def seed_seconds(runs: pd.DataFrame, timings: pd.DataFrame, method: str) -> tuple[float, float]:
    """Mean over `method`'s included runs: every second one seed costs (each stage of its run, evaluation included,
    and, for a method trained against a reward model, each stage of that model's run), and its evaluation's seconds."""
    per_run = timings.groupby(["method", "run_id"])["seconds"].sum()
    evaluation = timings[timings["stage"] == "eval"].groupby(["method", "run_id"])["seconds"].sum()
    total, evals = [], []
    for _, run in runs[runs["included"] & (runs["method"] == method)].iterrows():
        seconds = per_run.get((method, run["run_id"]), math.nan)
        rm = run.get("reward_model_path")
        if uses_reward_model(method) and isinstance(rm, str):
            seconds += per_run.get(("reward_model", Path(rm).parent.parent.name), math.nan)
        total.append(seconds)
        evals.append(evaluation.get((method, run["run_id"]), math.nan))
    return (float(np.mean(total)), float(np.mean(evals))) if total else (math.nan, math.nan)


def with_earlier_stages(frame: pd.DataFrame, earlier: pd.DataFrame) -> pd.DataFrame:
    """Metrics rows with their run's cost from the start: SECONDS = `wall_seconds` + the earlier stages' seconds,
    FLOPS = `flops` (the run's own training FLOPs so far) + theirs (NaN for runs that logged no FLOPs)."""
    out = frame.merge(
        earlier[["method", "run_id", "earlier seconds", "earlier FLOPs"]], on=["method", "run_id"], how="left"
    )
    out[SECONDS] = out["wall_seconds"] + out["earlier seconds"]
    out[FLOPS] = (out["flops"] if "flops" in out else math.nan) + out["earlier FLOPs"]
    return out.drop(columns=["earlier seconds", "earlier FLOPs"])


@dataclass
class AtLevels:
    """One group's runs read at the verdict's KL levels (S.at_levels): `keys` their RUN keys, `values` [n, L], `pseudo`
    [n, L, P] their prompt pseudo-values (None where some run keeps no per-prompt values, or other prompts), `reached`
    [n, L] whether each run's mean KL got to each level."""

    keys: list
    values: np.ndarray
    pseudo: np.ndarray | None
    reached: np.ndarray


def gold_at_levels(evals: pd.DataFrame, values: PromptValues, levels) -> dict[tuple, AtLevels]:
    """Every group with gold and KL, its runs read at `levels` (nats per sequence)."""
    runs: dict[tuple, list] = {}
    for group, key, run in runs_of(evals, "eval/kl", "eval/gold"):
        runs.setdefault(group, []).append((key, values.get(run, "eval/kl"), values.get(run, "eval/gold")))  # [E, P]
    out = {}
    for group, rows in runs.items():
        read = [S.at_levels(kl, gold, levels) for _, kl, gold in rows]
        prompts = {pseudo.shape[-1] for _, pseudo, _ in read}
        pseudo = np.stack([p for _, p, _ in read]) if len(prompts) == 1 and prompts != {1} else None
        out[group] = AtLevels(
            [k for k, _, _ in rows], np.stack([v for v, _, _ in read]), pseudo, np.stack([r for _, _, r in read])
        )
    return out


def kl_column(level: float) -> str:
    """The headline's name for gold at a KL level."""
    return f"gold at KL {level:.3g}"


def per_run_headline(
    evals: pd.DataFrame, at: dict[tuple, AtLevels] | None, levels, gold_level: float | None
) -> pd.DataFrame:
    """One row per run: final eval metrics, and where the task has a gold reward, its gold at each of the verdict's KL
    levels (`gold_at_levels`; a run short of a level counts with its last eval point, and `reached` says whether it
    got there) and the end-to-end seconds and training FLOPs to first reach the target gold reward (`evals` carry
    SECONDS and FLOPS: `with_earlier_stages`)."""
    final = final_evals(evals).set_index(RUN)
    out = pd.DataFrame(index=final.index)
    if at is not None:
        read = pd.DataFrame(
            [
                dict(
                    zip(RUN, key),
                    **{kl_column(level): v for level, v in zip(levels, row)},
                    **{f"reached KL {level:.3g}": bool(r) for level, r in zip(levels, reached)},
                )
                for group in at.values()
                for key, row, reached in zip(group.keys, group.values, group.reached)
            ]
        )
        out = out.join(read.set_index(RUN)) if len(read) else out
        out["seconds to target gold"] = crossings(evals, "eval/gold", SECONDS, gold_level)
        out["training FLOPs to target gold"] = crossings(evals, "eval/gold", FLOPS, gold_level)
    wanted = ["eval/gold", "eval/gold_sem", "eval/kl", "eval/proxy", "heldout/rm_accuracy", "heldout/implicit_accuracy"]
    out = out.join(final[[c for c in wanted if c in final]].add_prefix("final "))
    return out.reset_index()


def headline_summary(per_run: pd.DataFrame, at: dict[tuple, AtLevels] | None, levels) -> pd.DataFrame:
    """Per group, every per-run headline column as `<col> n|mean|std|lo|hi` with its t-interval over runs (`summarize`);
    gold at each KL level with the prompts' term added where the runs keep per-prompt values (S.t_contrast, w = 1)."""
    columns = [c for c in per_run if c not in RUN and not c.startswith("reached ")]
    table = summarize(per_run, GROUP, columns)
    for group, g in (at or {}).items():
        if len(g.keys) < 2 or g.pseudo is None:
            continue
        row = (table["method"] == group[0]) & (table["beta"] == group[1])
        for i, level in enumerate(levels):
            c = S.t_contrast([g.values[:, i]], [g.pseudo[:, i]], weights=(1.0,))
            table.loc[row, [f"{kl_column(level)} lo", f"{kl_column(level)} hi"]] = float(c.lo), float(c.hi)
    return table


def compare(at: dict[tuple, AtLevels], a: tuple, b: tuple, level: int) -> S.Contrast | None:
    """Group a − group b at the `level`-th KL level (S.t_contrast); None where either has fewer than 2 runs."""
    ga, gb = at[a], at[b]
    if min(len(ga.keys), len(gb.keys)) < 2:
        return None
    pseudo = [ga.pseudo[:, level], gb.pseudo[:, level]] if ga.pseudo is not None and gb.pseudo is not None else None
    if pseudo is not None and pseudo[0].shape[-1] != pseudo[1].shape[-1]:
        pseudo = None
    return S.t_contrast([ga.values[:, level], gb.values[:, level]], pseudo)


def verdict(
    at: dict[tuple, AtLevels], a: tuple, b: tuple, levels, worded: bool, names: tuple[str, str] = ("PPO", "DPO")
) -> pd.DataFrame:
    """Group a − group b in gold at each KL level: the difference of means, its 95% Welch interval with the prompts'
    term (S.t_contrast), its p-value, the seeds and how many reached the level, the between-seed sds, and the words:
    only at the first (primary) level, and only where `worded` (the levels were fixed before the runs); the others
    are shown as intervals without words, so one test carries the verdict and its error rate is the test's 5%."""
    rows = []
    for i, level in enumerate(levels):
        c = compare(at, a, b, i)
        va, vb = at[a].values[:, i], at[b].values[:, i]
        row = {
            "KL level": level,
            "primary": i == 0,
            "difference": float(va.mean() - vb.mean()),
            "lo": math.nan,
            "hi": math.nan,
            "p": math.nan,
            "df": math.nan,
            "seeds a": len(va),
            "seeds b": len(vb),
            "reached a": int(at[a].reached[:, i].sum()),
            "reached b": int(at[b].reached[:, i].sum()),
            "sd a": float(va.std(ddof=1)) if len(va) > 1 else math.nan,
            "sd b": float(vb.std(ddof=1)) if len(vb) > 1 else math.nan,
            "prompt term sd": math.nan,
            "n prompts": 1,
        }
        if c is not None:
            row.update(
                lo=float(c.lo),
                hi=float(c.hi),
                p=float(c.p),
                df=float(c.df),
                **{"prompt term sd": float(np.sqrt(c.prompt_var)), "n prompts": c.n_prompts},
            )
        words = S.verdict_words(row["lo"], row["hi"], len(va), len(vb), *names)
        if i > 0:
            words = "A secondary level: shown without words (only the primary level is tested)."
        elif not worded:
            words = (
                "No verdict: no KL level was fixed before these runs (report.kl_levels), so this level was read "
                "from the runs it scores; the interval is shown without words."
            )
        rows.append({**row, "verdict": words})
    return pd.DataFrame(rows)


POWER_AT = (0.1, 0.05)  # gold differences the power table always answers for, beside the observed one


def power(row: pd.Series) -> pd.DataFrame:
    """Seeds per method for 80% power of the verdict's test (S.seeds_for_power) at the observed difference and at
    `POWER_AT`, with the range the between-seed sds' 80% confidence limits give (S.sd_limits)."""
    n_a, n_b = int(row["seeds a"]), int(row["seeds b"])
    prompt_var, P = row["prompt term sd"] ** 2, int(row["n prompts"])
    prompt_var = 0.0 if math.isnan(prompt_var) else prompt_var
    limits = [S.sd_limits(row["sd a"], n_a), S.sd_limits(row["sd b"], n_b)]
    rows = []
    for label, diff in (("observed", abs(row["difference"])), *((f"{d:g}", d) for d in POWER_AT)):
        rows.append(
            {
                "difference": label,
                "gold": diff,
                "seeds per method": S.seeds_for_power(diff, row["sd a"], row["sd b"], prompt_var, P),
                "if the sds are at their lower limits": S.seeds_for_power(
                    diff, limits[0][0], limits[1][0], prompt_var, P
                ),
                "if at their upper limits": S.seeds_for_power(diff, limits[0][1], limits[1][1], prompt_var, P),
            }
        )
    return pd.DataFrame(rows)


def variance_split(
    at: dict[tuple, AtLevels], a: tuple, b: tuple, names: tuple[str, str] = ("PPO", "DPO"), level: int = 0
) -> pd.DataFrame:
    """What the spread of a − b at the primary level is made of, per method: the between-seed sd of per-run values;
    its part that is each run's own prompt-sampling noise (√(noise_ms/P): the sd of a run's mean over its prompts);
    the rest, the true seed-to-seed sd; and the prompt × method interaction (sd per prompt, and of the difference's
    mean over the prompts). Empty without per-prompt values."""
    c = compare(at, a, b, level)
    if c is None or not c.noise_ms:
        return pd.DataFrame()
    rows = []
    for name, group, ms in zip(names, (a, b), c.noise_ms):
        sd = float(at[group].values[:, level].std(ddof=1))
        noise = math.sqrt(float(ms) / c.n_prompts)
        rows.append({"component": f"{name}: between seeds (per-run values)", "sd": sd})
        rows.append({"component": f"{name}: a run's own prompt noise (sd of its mean)", "sd": noise})
        rows.append({"component": f"{name}: true seed-to-seed", "sd": math.sqrt(max(sd**2 - noise**2, 0.0))})
    rows.append({"component": "prompt × method interaction, a prompt", "sd": math.sqrt(c.prompt_var * c.n_prompts)})
    rows.append({"component": "prompt × method interaction, the difference's mean", "sd": math.sqrt(c.prompt_var)})
    return pd.DataFrame(rows)


def allocation(
    split: pd.DataFrame,
    n_a: int,
    n_b: int,
    n_prompts: int,
    seed_pair_seconds: float,
    eval_seconds: float,
    names: tuple[str, str] = ("PPO", "DPO"),
) -> pd.DataFrame:
    """What narrows the verdict's interval for the CPU time: its expected half-width now, with one more seed per
    method, and with twice the eval prompts, from the measured variance split (se² = Σ (σ²_seed + σ²_noise,P/P')/n +
    σ²_interaction/P'), with the CPU seconds each costs: a seed pair's training and evaluation, or every compared
    run's evaluation again."""
    sd = split.set_index("component")["sd"]

    def half(n: tuple[int, int], P: int) -> float:
        parts = [
            (
                sd[f"{m}: true seed-to-seed"] ** 2
                + sd[f"{m}: a run's own prompt noise (sd of its mean)"] ** 2 * n_prompts / P
            )
            / k
            for m, k in zip(names, n)
        ]
        prompt = sd["prompt × method interaction, a prompt"] ** 2 / P
        df = sum(parts) ** 2 / sum(p**2 / (k - 1) for p, k in zip(parts, n))
        return float(S.t_dist.ppf(0.975, df) * math.sqrt(sum(parts) + prompt))

    now = half((n_a, n_b), n_prompts)
    return pd.DataFrame(
        [
            {
                "design": f"now: {n_a} + {n_b} seeds, {n_prompts} prompts",
                "expected half-width": now,
                "CPU seconds": 0.0,
            },
            {
                "design": "one more seed per method",
                "expected half-width": half((n_a + 1, n_b + 1), n_prompts),
                "CPU seconds": seed_pair_seconds,
            },
            {
                "design": "twice the eval prompts",
                "expected half-width": half((n_a, n_b), 2 * n_prompts),
                "CPU seconds": eval_seconds,
            },
        ]
    )


def band(evals: pd.DataFrame, values: PromptValues, draws: S.Draws, column: str) -> pd.DataFrame:
    """Mean and 95% bootstrap interval of `column` across a group's runs at each eval step (over prompts too, where
    it is a mean over them), with the runs' mean SECONDS and FLOPS at that step (`with_earlier_stages`), the axes
    the band is drawn over."""
    at: dict[tuple, list] = {}
    for group, _, run in runs_of(evals, column):
        for i, (step, v) in enumerate(zip(run["step"], values.get(run, column))):
            at.setdefault((*group, step), []).append((v, run[SECONDS].iloc[i], run[FLOPS].iloc[i]))
    rows = [
        {
            "method": m,
            "beta": b,
            "step": step,
            SECONDS: np.mean([p[1] for p in points]),
            FLOPS: np.mean([p[2] for p in points]),
            **S.bootstrap_mean([p[0] for p in points], draws, (m, b)),
        }
        for (m, b, step), points in at.items()
    ]
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
                parts.append(
                    values[[*RUN, "step"]].assign(series=col, value=values[col], spike=spikes(values[col], window, k))
                )
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


def overoptimisation(evals: pd.DataFrame) -> pd.DataFrame:
    """Gao et al.'s (2022) coordinates, per eval point of the PPO and Best-of-N runs: d = √KL (Best of N: of its KL
    bound) and the proxy and gold gains since the run's first eval, each in units of that first eval's sample std
    (so the reward model's logits and the gold scale share an axis). A proxy gain that keeps rising while the gold
    gain bends down is over-optimisation of the reward model."""
    columns = [*RUN, "step", "d", "proxy gain", "gold gain"]
    out = []
    for _, _, run in runs_of(evals[evals["method"].isin(gao_methods())], "eval/kl"):
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
        form = METHODS[method].gao
        for reward in ("proxy", "gold"):
            points = runs.dropna(subset=["d", f"{reward} gain"])
            if len(points) >= 3:  # two coefficients: at least one point beyond them to judge the fit
                alpha, beta = S.fit_gao(points["d"], points[f"{reward} gain"], form)
                rows.append(
                    {
                        "method": method,
                        "reward": reward,
                        "form": S.GAO_FORMS[form],
                        "α": alpha,
                        "β": beta,
                        "points": len(points),
                    }
                )
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
        parts.append(
            rows[RUN].assign(
                scorer=label, accuracy=rows[f"heldout/{key}_accuracy"], margin=rows[f"heldout/{key}_margin"]
            )
        )
    columns = [*RUN, "scorer", "accuracy", "margin"]
    return pd.concat(parts)[columns] if parts else pd.DataFrame(columns=columns)


def stage_costs(timings: pd.DataFrame) -> pd.DataFrame:
    """Per method and stage: runs, mean wall-clock seconds and FLOPs per run, max peak memory."""
    per_stage = timings.groupby(["method", "stage"]).agg(
        runs=("run_id", "nunique"),
        seconds=("seconds", "mean"),
        flops=("flops", "mean"),
        peak_memory_mb=("peak_memory_mb", "max"),
    )
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
    runs = runs.assign(
        **{
            "own loop FLOPs": runs["own_flops"],
            "earlier stages FLOPs": runs["earlier FLOPs"],
            FLOPS: runs["own_flops"] + runs["earlier FLOPs"],
            SECONDS: runs["own_seconds"] + runs["earlier seconds"],
            "evaluation FLOPs": runs["eval_flops"],
        }
    )
    columns = ["own loop FLOPs", "earlier stages FLOPs", FLOPS, SECONDS, "evaluation FLOPs"]
    out = runs.groupby("method")[columns].mean()
    return out.join(runs.groupby("method")["run_id"].nunique().rename("runs")).reset_index()[
        ["method", "runs", *columns]
    ]


def preference_set_costs(data_manifests: list[dict], shas: set[str]) -> pd.DataFrame:
    """The shared preference sets the included runs read (sha256 in `shas`): build seconds and the FLOPs of
    sampling pi_ref's responses (train and held-out pairs; absent where the pairs come from a file)."""
    rows = []
    for d in data_manifests:
        if d.get("sha256") in shas:
            splits = [s for s in (d.get("stats") or {}).values() if isinstance(s, dict) and "sampling_flops" in s]
            rows.append(
                {
                    "preference set": d["sha256"][:12],
                    "seconds": d.get("build_seconds", math.nan),
                    "flops": sum(s["sampling_flops"] for s in splits) if splits else math.nan,
                }
            )
    return pd.DataFrame(rows, columns=["preference set", "seconds", "flops"])


BUDGET = {"budget_pairs": "pairs", "budget_passes": "passes", "budget_pair_presentations": "pair presentations"}


def budgets(runs: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Per method and beta of `methods`: the training pairs, passes and pair presentations its included runs
    recorded (PPO's are its reward model's), each distinct value once ("640 / 320" where runs differ), and the
    number of runs."""
    included = runs[runs["included"] & runs["method"].isin(methods)]
    if included.empty or not set(BUDGET) <= set(included):
        return pd.DataFrame(columns=[*GROUP, *BUDGET.values(), "runs"])
    rows = [
        {
            "method": method,
            "beta": beta,
            "runs": len(group),
            **{
                name: " / ".join(f"{v:g}" for v in sorted(group[c].dropna().unique())) or "–"
                for c, name in BUDGET.items()
            },
        }
        for (method, beta), group in included.groupby(GROUP, sort=False)
    ]
    return pd.DataFrame(rows)[[*GROUP, *BUDGET.values(), "runs"]]


def shared_reward_models(runs: pd.DataFrame, method: str = "ppo") -> dict[str, int]:
    """Reward models that more than one included run of `method` trained against: path -> runs."""
    if "reward_model_path" not in runs:
        return {}
    paths = runs.loc[runs["included"] & (runs["method"] == method), "reward_model_path"].dropna()
    counts = paths.value_counts()
    return {path: int(n) for path, n in counts.items() if n > 1}
