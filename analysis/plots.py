"""The report's figures, drawn with seaborn on matplotlib's Agg backend (no display needed).

Each function returns a `Plot`: a figure (or the reason there is none) and the sentence printed under it
on how to read it. Colours are fixed per method so every figure reads the same way.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: the report must render on a headless box

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from analysis import stats as S  # noqa: E402
from analysis.metrics import FLOPS, RUN, SECONDS  # noqa: E402
from rlhf.atomic import atomic_write_bytes  # noqa: E402
from rlhf.methods import METHODS  # noqa: E402

KL_LABEL = "KL(π‖π_ref) [nats per sequence]"
# the x axes of progress: a method's cost from the start of its own earlier stages (analysis.metrics.earlier_stages)
COST_AXES = {
    FLOPS: "training FLOPs, earlier stages included [FLOPs]",
    SECONDS: "wall-clock, earlier stages included [s]",
}

# name -> (title, the sentence under the figure on how to read it)
TEXT = {
    "frontier": (
        "{reward} vs KL: each method's trajectory, seed means with intervals",
        "Up and to the left is better: each point is a method's mean over seeds at one eval point, joined in training "
        "order, with 95% hierarchical-bootstrap bars in both reward and KL (a picture of the spread, not the verdict's "
        "test; thin lines: each seed, where a method has fewer than 5); π_ref is the origin, and Best of N "
        "(dashed) stands at the upper bound log N − (N−1)/N of its KL, so its true points lie at or left of them.",
    ),
    "curves": (
        "Training curves: seed means, with each seed or a 95% band",
        "Each thick line is a method's mean over seeds at each eval point; with fewer than 5 seeds the thin lines are "
        "the seeds themselves, with 5 or more the shaded band is the 95% bootstrap interval (a picture, not a test); x "
        "is training FLOPs (left) and wall-clock seconds (right) from the start of the method's own earlier stages, "
        "evaluation excluded, so a curve further left got there with less compute or sooner.",
    ),
    "heldout": (
        "Held-out preference pairs: accuracy, and margin in each scorer's units",
        "Bars are means over runs with 95% t-intervals (over seeds; a model several runs share counts "
        "once) of each scorer's final accuracy (left; the gold bar is the ceiling the labels' noise allows) and "
        "margin, one panel per unit, so margins are compared only within a panel.",
    ),
    "overoptimisation": (
        "Over-optimisation: proxy and gold gains against √KL, with Gao et al.'s fitted forms",
        "Dots are eval points of every run (gains since the run's first eval, in that eval's std units), lines the "
        "fitted forms (PPO: d(α − β log d); Best of N: d(α − β d)); a gold line that bends down while the proxy "
        "line keeps rising is the reward model being over-optimised; without a gold reward only the proxy is drawn.",
    ),
    "seeds": (
        "Stability across seeds: per-seed curves and spread of final values",
        "Left: one line per run over its training FLOPs (earlier stages included), so diverging lines of one "
        "colour mean seed-sensitive training; right: each dot is one run's final value, and a wide spread of dots "
        "makes a difference of means weak.",
    ),
    "health": (
        "Training health: gradient norm, losses, PPO clipping, DPO log-probs",
        "One line per run; red crosses are spikes (a value above the median of the preceding window by "
        "more than k robust std); in the last panel solid lines are chosen and dashed rejected "
        "log-probs, and both falling together is DPO's known failure mode.",
    ),
    "cost": (
        "Cost: wall-clock and FLOPs per stage, training FLOPs per method, peak memory",
        "Bars are per-run means (no interval: costs are measured, not compared by a test) of each stage's wall-clock "
        "and FLOPs (eval is counted apart from training), each "
        "method's training FLOPs from the start (dark: its earlier stages, the reward model's training for PPO and "
        "Best of N, π_ref's pass for DPO; light: its own loop), and the largest peak memory seen; Best of N's own "
        "cost is inference: sampling and scoring N responses per prompt.",
    ),
}


@dataclass
class Plot:
    name: str  # PNG file stem
    title: str
    caption: str  # one sentence: how to read it
    figure: Figure | None = None
    missing: str = ""  # why nothing was drawn


def name(method: str) -> str:
    """The legend's name of a method (rlhf/methods.py); a method id stays in the CSVs."""
    return METHODS[method].legend if method in METHODS else method


def legend_rank(method: str) -> int:
    """Position in the legend: the methods table's order, any other method after."""
    order = list(METHODS)
    return order.index(method) if method in order else len(order)


def _named(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with method ids replaced by legend names (what seaborn puts in the legend)."""
    return frame.assign(method=frame["method"].map(name))


def _palette(methods) -> dict[str, str]:
    """Legend name -> colour for the given method ids."""
    extra = iter(sns.color_palette("tab10", 10)[7:])  # methods with no fixed colour
    return {name(m): METHODS[m].colour if m in METHODS else next(extra) for m in methods}


def _label(frame: pd.DataFrame) -> pd.Series:
    """'DPO' when the frame has one β for that method, 'DPO β=0.1' in a sweep."""
    betas = frame.groupby("method")["beta"].nunique()
    return frame.apply(lambda r: name(r["method"]) + (f" β={r['beta']:g}" if betas[r["method"]] > 1 else ""), axis=1)


def _plot(name: str, fig: Figure | None = None, axes=(), missing: str = "", **title_fields: str) -> Plot:
    """The Plot for figure `name`: title it, keep one legend per axis that has labelled artists, tighten."""
    title, caption = TEXT[name]
    title = title.format(**title_fields)
    if fig is not None:
        fig.suptitle(title)
        for ax in axes:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
    return Plot(name, title, caption, fig, missing)


SEEDS_FOR_A_BAND = 5  # fewer seeds: draw them, not a band (a bootstrap over 2-4 values is about their range)


def _errors(frame: pd.DataFrame, column: str):
    """Asymmetric error bars [2, n] from `<column> mean|lo|hi` (0 where there is no interval)."""
    mean = frame[f"{column} mean"]
    return [
        (mean - frame[f"{column} lo"]).fillna(0).clip(lower=0),
        (frame[f"{column} hi"] - mean).fillna(0).clip(lower=0),
    ]


def frontier_plot(
    trajectories: pd.DataFrame,
    reference: pd.DataFrame,
    y: str,
    y_label: str,
    evals: pd.DataFrame,
    level: float | None = None,
) -> Plot:
    """Per method and β, the seed means of every eval point joined in step order, with bootstrap bars in reward
    and KL (analysis.metrics.frontier), and each seed's own trajectory (thin) where there are fewer than
    SEEDS_FOR_A_BAND; π_ref's point at KL 0 with its interval; the primary KL `level`, where the verdict reads the
    methods, as a vertical line."""
    reward = y_label.split(" [")[0]  # the label without its unit
    if trajectories.empty:
        return _plot("frontier", missing=f"no eval point has both {y} and eval/kl", reward=reward)
    fig, ax = plt.subplots(figsize=(8, 5))
    palette = _palette([*trajectories["method"].unique(), "reference"])
    trajectories = trajectories.sort_values("method", key=lambda m: m.map(legend_rank), kind="stable")
    labels = _label(trajectories)
    for label, group in trajectories.groupby(labels, sort=False):
        method = group["method"].iloc[0]
        group = group.sort_values("step")
        color = palette[name(method)]
        ax.errorbar(
            group["eval/kl mean"],
            group[f"{y} mean"],
            xerr=_errors(group, "eval/kl"),
            yerr=_errors(group, y),
            color=color,
            ls="--" if method == "bon" else "-",
            marker="o",
            ms=4,
            capsize=2,
            lw=1.5,
            label=label,
        )
        if 1 < group[f"{y} n"].max() < SEEDS_FOR_A_BAND:
            runs = evals[(evals["method"] == method) & (evals["beta"] == group["beta"].iloc[0])]
            for _, run in runs.dropna(subset=["eval/kl", y]).sort_values("step").groupby("run_id"):
                ax.plot(run["eval/kl"], run[y], color=color, lw=0.7, alpha=0.4)
    if not reference.empty:
        color = palette[name("reference")]
        ax.axhline(reference[f"{y} mean"].iloc[-1], color=color, ls=":", lw=1)
        ax.errorbar(
            [0.0],
            reference[f"{y} mean"].iloc[-1:],
            yerr=_errors(reference.tail(1), y),
            color=color,
            fmt="o",
            capsize=3,
            label=f"{name('reference')} (origin)",
            zorder=3,
        )
    if level is not None:  # unlabelled: the legend names methods only
        ax.axvline(level, color="#888888", ls="-.", lw=1)
        ax.annotate(
            f"primary KL level, {level:.3g} nats",
            (level, 1),
            xycoords=("data", "axes fraction"),
            xytext=(4, -4),
            textcoords="offset points",
            va="top",
            fontsize=8,
            color="#555555",
        )
    ax.set(xlabel=KL_LABEL, ylabel=y_label)
    return _plot("frontier", fig, [ax], reward=reward)


def curves_plot(bands: dict[str, pd.DataFrame], evals: pd.DataFrame, labels: dict[str, str]) -> Plot:
    """Rows: metrics; columns: over training FLOPs and over wall-clock seconds, earlier stages included (never over
    steps: a PPO iteration and a DPO step are not the same work). Thick line = mean over seeds; thin lines = the
    seeds (fewer than SEEDS_FOR_A_BAND), or band = 95% bootstrap interval."""
    bands = {k: b for k, b in bands.items() if not b.empty}
    if not bands:
        return _plot("curves", missing="no PPO or DPO eval points")
    fig, axes = plt.subplots(len(bands), 2, figsize=(11, 3.4 * len(bands)), squeeze=False)
    for row, (column, frame) in zip(axes, bands.items()):
        palette = _palette(frame["method"].unique())
        frame = frame.assign(label=_label(frame))
        for ax, (x, x_label) in zip(row, COST_AXES.items()):
            for label, g in frame.dropna(subset=[x]).groupby("label", sort=False):  # runs before FLOPs have none
                method = g["method"].iloc[0]
                color = palette[name(method)]
                if g["n"].min() >= SEEDS_FOR_A_BAND:
                    ax.fill_between(g[x], g["lo"], g["hi"], alpha=0.2, color=color)
                else:
                    runs = evals[(evals["method"] == method) & (evals["beta"] == g["beta"].iloc[0])]
                    for _, run in runs.dropna(subset=[x, column]).groupby("run_id"):
                        ax.plot(run[x], run[column], color=color, lw=0.7, alpha=0.5)
                ax.plot(g[x], g["mean"], color=color, lw=2, marker="o", ms=4, label=f"{label} (n={g['n'].max()})")
            ax.set(
                xlabel=x_label,
                ylabel=labels[column],
                title=f"{labels[column].split(' [')[0]} over {x_label.split(',')[0]}",
            )
        row[0].xaxis.set_major_formatter(EngFormatter())  # FLOPs ticks as 20 G, 3 T: no offset over the label
    return _plot("curves", fig, axes.ravel())


# scorer -> (short name, margin unit)
SCORER_AXES = {
    "explicit RM r_φ": ("RM r_φ", "r_φ logits"),
    "DPO implicit β·log π/π_ref": ("DPO implicit", "β · nats"),
    "gold (label-noise ceiling)": ("gold labels", "gold units"),
}
GOLD_SCORER = "gold (label-noise ceiling)"


def heldout_plot(summary: pd.DataFrame) -> Plot:
    """Accuracy of every scorer in one panel; margins one panel per scorer, each in its own units. The gold labels
    are the same for every run: one grey bar, not one per method."""
    if summary.empty:
        return _plot("heldout", missing="no eval row carries held-out accuracies")
    gold = summary[summary["scorer"] == GOLD_SCORER].head(1).assign(method="gold labels")
    summary = pd.concat([summary[summary["scorer"] != GOLD_SCORER], gold])
    scorers = [s for s in SCORER_AXES if s in set(summary["scorer"])]
    fig, axes = plt.subplots(1, 1 + len(scorers), figsize=(4 + 3.5 * len(scorers), 4), squeeze=False)
    axes = axes.ravel()
    palette = {**_palette(summary["method"].unique()), "gold labels": "#999999"}
    methods = sorted(summary["method"].unique(), key=legend_rank)
    labelled = set()  # one legend entry per method
    for panel, (ax, scorer) in enumerate(zip(axes, [None, *scorers])):
        column = "accuracy" if scorer is None else "margin"
        rows = summary if scorer is None else summary[summary["scorer"] == scorer]
        ticks = scorers if scorer is None else [scorer]
        for tick, scorer_rows in rows.groupby("scorer", sort=False):
            present = [m for m in methods if m in set(scorer_rows["method"])]
            width = 0.8 / len(present)
            for j, method in enumerate(present):
                at = scorer_rows[scorer_rows["method"] == method]
                ax.bar(
                    ticks.index(tick) + (j - (len(present) - 1) / 2) * width,
                    at[f"{column} mean"],
                    width,
                    yerr=_errors(at, column),
                    color=palette.get(name(method), palette.get(method)),
                    capsize=3,
                    label=name(method) if panel == 0 and method not in labelled else None,
                )
                labelled.add(method)
        ax.set_xticks(range(len(ticks)), [SCORER_AXES[t][0] for t in ticks], fontsize=8)
        unit = "fraction of pairs" if scorer is None else SCORER_AXES[scorer][1]
        ax.set(
            xlabel="scorer",
            ylabel=f"held-out {column} [{unit}]",
            title="held-out accuracy" if scorer is None else f"margin: {SCORER_AXES[scorer][0]}",
        )
    axes[0].axhline(0.5, color="black", ls=":", lw=1, label="chance")
    return _plot("heldout", fig, axes)


def overoptimisation_plot(gains: pd.DataFrame, fits: pd.DataFrame) -> Plot:
    """One panel per method (PPO, Best of N): proxy and gold gains against d = √KL and the fitted Gao forms."""
    if gains.empty:
        return _plot("overoptimisation", missing="no PPO or Best-of-N eval points")
    methods = sorted(gains["method"].unique(), key=legend_rank)
    # room for the title
    fig, axes = plt.subplots(1, len(methods), figsize=(max(9, 6 * len(methods)), 4), squeeze=False)
    colors = {"proxy": "#2ca02c", "gold": "#d4a017"}
    for ax, method in zip(axes.ravel(), methods):
        points = gains[gains["method"] == method]
        grid = np.linspace(0, points["d"].max(), 100)
        for reward, color in colors.items():
            drawn = points.dropna(subset=[f"{reward} gain"])
            if drawn.empty:
                continue
            ax.scatter(
                drawn["d"], drawn[f"{reward} gain"], color=color, s=14, alpha=0.6, label=f"{reward} (eval points)"
            )
            fit = fits[(fits["method"] == method) & (fits["reward"] == reward)]
            if not fit.empty:
                f = fit.iloc[0]
                ax.plot(
                    grid,
                    S.gao_curve(grid, f["α"], f["β"], METHODS[method].gao),
                    color=color,
                    lw=1.5,
                    label=f"{reward} fit: α={f['α']:.3g}, β={f['β']:.3g}",
                )
        ax.axhline(0, color="black", lw=0.5)
        ax.set(
            xlabel="d = √KL [√nats]" + (" (of the KL bound)" if method == "bon" else ""),
            ylabel="gain since first eval [first-eval std units]",
            title=name(method),
        )
    return _plot("overoptimisation", fig, axes.ravel())


def seeds_plot(evals: pd.DataFrame, final: pd.DataFrame, y: str, y_label: str) -> Plot:
    if evals.empty:
        return _plot("seeds", missing="no PPO or DPO eval points")
    palette = _palette(evals["method"].unique())
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    sns.lineplot(
        data=_named(evals.dropna(subset=[FLOPS])),
        x=FLOPS,
        y=y,
        hue="method",
        units="run_id",
        estimator=None,
        palette=palette,
        marker="o",
        ax=axes[0],
    )
    axes[0].set(xlabel=COST_AXES[FLOPS], ylabel=y_label, title="per-seed curves")
    axes[0].xaxis.set_major_formatter(EngFormatter())
    for ax, column, label in ((axes[1], y, y_label), (axes[2], "eval/kl", KL_LABEL)):
        sns.stripplot(
            data=_named(final.assign(label=_label(final))),
            x="label",
            y=column,
            hue="method",
            palette=palette,
            size=7,
            ax=ax,
        )
        ax.set(xlabel="method", ylabel=f"final {label}", title=f"final {label.split(' [')[0]} per run")
    return _plot("seeds", fig, axes)


def family(method: str) -> str:
    """Which trainer's series a method logs: PPO-GT logs PPO's, DPO's variants DPO's."""
    return METHODS[method].trainer if method in METHODS else method


# (method families, column, axis label) of each training-health panel: the panels the report draws, each one series
# in its own units and the trainers it is read for. A list of panels, not of methods: a new method's series join a
# panel here, or get one of their own, once the report reads them.
HEALTH_PANELS = [
    (("ppo", "dpo", "preferred-ft"), "grad_norm", "gradient norm [L2, before clipping]"),
    (("dpo", "preferred-ft"), "loss", "DPO / Preferred-FT loss [nats]"),
    (("ppo",), "loss/value", "PPO value loss [squared reward units]"),
    (("ppo",), "policy/clipfrac", "PPO clip fraction [fraction of tokens]"),
    (("ppo",), "policy/approxkl", "PPO approx-KL per update [nats per token]"),
    (("dpo",), "logps/chosen", "DPO log π(y|x) [nats per sequence]"),
]


def health_plot(train: pd.DataFrame, flagged: pd.DataFrame) -> Plot:
    """Per-run training series against each run's own training FLOPs (a PPO iteration and a DPO step are not the
    same unit of work; optimizer steps where a run logged no FLOPs); red crosses mark spikes
    (analysis.metrics.spikes)."""
    if train.empty:
        return _plot("health", missing="no training rows")
    x = "flops" if "flops" in train and train["flops"].notna().all() else "step"
    x_label = "training FLOPs of the run's own loop" if x == "flops" else "optimizer step"
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    palette = _palette(train["method"].unique())
    for ax, (families, column, label) in zip(axes.ravel(), HEALTH_PANELS):
        rows = train[train["method"].map(family).isin(families)]
        ax.set(title=label.split(" [")[0], xlabel=x_label, ylabel=label)
        if column not in rows or rows[column].isna().all():
            ax.text(
                0.5,
                0.5,
                f"no {' or '.join(name(f) for f in families)} rows with {column}",
                ha="center",
                transform=ax.transAxes,
            )
            continue
        rows = _named(rows.dropna(subset=[column]))
        sns.lineplot(
            data=rows, x=x, y=column, hue="method", units="run_id", estimator=None, palette=palette, lw=1, ax=ax
        )
        if column == "logps/chosen":
            sns.lineplot(
                data=rows,
                x=x,
                y="logps/rejected",
                hue="method",
                units="run_id",
                estimator=None,
                palette=palette,
                lw=1,
                ls="--",
                legend=False,
                ax=ax,
            )
        marks = flagged[(flagged["series"] == column) & flagged["spike"].astype(bool)]
        if not marks.empty:
            if x != "step":  # where each spike's step lies on the FLOPs axis
                marks = marks.merge(train[[*RUN, "step", x]], on=[*RUN, "step"], how="left")
            ax.scatter(marks[x], marks["value"], color="red", marker="x", zorder=3, label="spike")
    return _plot("health", fig, axes.ravel())


def cost_plot(costs: pd.DataFrame, per_method: pd.DataFrame) -> Plot:
    """Per stage: seconds, FLOPs, peak memory; per method: training FLOPs from the start, stacked (earlier stages,
    own loop)."""
    if costs.empty:
        return _plot("cost", missing="no timings.json in any included run")
    palette = _palette(costs["method"].unique())
    costs = _named(costs)
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    (seconds, flops), (stacked, memory) = axes
    sns.barplot(data=costs, x="stage", y="seconds", hue="method", palette=palette, errorbar=None, ax=seconds)
    seconds.set(xlabel="stage", ylabel="wall-clock per run [s]", title="wall-clock per stage")
    sns.barplot(data=costs, x="stage", y="flops", hue="method", palette=palette, errorbar=None, ax=flops)
    flops.set(xlabel="stage", ylabel="FLOPs per run [FLOPs]", title="FLOPs per stage (eval: counted apart)")
    per_method = _named(per_method.dropna(subset=[FLOPS]))
    colors = [palette.get(m, "grey") for m in per_method["method"]]
    stacked.bar(per_method["method"], per_method["earlier stages FLOPs"], color=colors, edgecolor="black")
    stacked.bar(
        per_method["method"],
        per_method["own loop FLOPs"],
        bottom=per_method["earlier stages FLOPs"],
        color=colors,
        alpha=0.45,
        edgecolor="black",
    )
    stacked.set(
        xlabel="method",
        ylabel="training FLOPs per run [FLOPs]",
        title="training FLOPs from the start: earlier stages (dark) + own loop",
    )
    stacked.tick_params(axis="x", labelsize=7)
    sns.barplot(data=costs, x="stage", y="peak_memory_mb", hue="method", palette=palette, errorbar=None, ax=memory)
    memory.set(xlabel="stage", ylabel="peak memory [MiB]", title="peak memory after each stage")
    for ax in (seconds, flops, memory):
        ax.tick_params(axis="x", labelsize=7)
    return _plot("cost", fig, axes.ravel())


def save(plot: Plot, folder: Path) -> None:
    """Write the figure as <folder>/<name>.png, whole or not at all, and free it (a report draws many figures in one
    process)."""
    png = io.BytesIO()
    plot.figure.savefig(png, format="png", dpi=100)
    atomic_write_bytes(folder / f"{plot.name}.png", png.getvalue())
    plt.close(plot.figure)
