"""`make report`: reports/<profile>/index.html, summary.md, the PNGs and CSV tables, from every run of a profile.

The report is a list of sections, each with notes, at most one plot and some tables, in the order a reader asks: the
first screen holds the verdict, the frontier figure and one small table. summary.md is that list in Markdown, and the
page is the same Markdown rendered into a Jinja2 template (analysis/templates/). Every table shown is also written as
CSV (with the numbers unformatted). Whatever runs exist are reported: what is missing is said, never fatal.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import pandas as pd
from markdown_it import MarkdownIt
from markupsafe import Markup

from analysis import metrics as M
from analysis import plots as P
from analysis import stats as S
from analysis.load import Runs, evaluated, load_runs
from rlhf.atomic import atomic_write_text
from rlhf.config import PROJECT_ROOT, Config, ReportConfig
from rlhf.methods import METHODS, with_role

# The two methods the benchmark compares: where no KL level is fixed in the profile, their runs alone set the levels
# the report reads (whatever else ran, running RLOO or online DPO never moves the PPO − DPO comparison)
COMPARED = tuple(with_role("compared"))
ONLINE = tuple(with_role("online"))  # docs/online.md
# Why PPO wins or loses: each pair is read as the verdict reads PPO − DPO, at its primary level, one Holm family.
# Online vs offline: every method that samples from its policy as it trains (PPO, and each method whose role is
# online) against DPO, which learns from the fixed pairs. Critic vs none is a question of two methods, not of a role:
# PPO against RLOO, the same eq. (2) with and without a value model.
SAMPLING = ("ppo", *ONLINE)
CAUSES = (
    *(("online vs offline", m, "dpo") for m in SAMPLING),
    ("critic vs none", "ppo", "rloo"),
)
REFERENCE, BEST_OF_N = "reference", "bon"  # π_ref, every frontier's origin; Best of N, which trains nothing
BASELINES = {m: f"make {m}" for m in with_role("baseline")}  # the DPO paper's controls
SPIKE_SERIES = ["loss", "loss/policy", "loss/value", "grad_norm"]
HEALTH_SERIES = [
    "policy/clipfrac",
    "policy/approxkl",
    "val/clipfrac",
    "loss/value",
    "logps/chosen",
    "logps/rejected",
    "rewards/margins",
]
GOLD_UNITS = {"sentiment": "VADER compound, −1 to 1"}


@dataclass
class Table:
    name: str  # CSV file stem
    frame: pd.DataFrame  # numbers as computed; shown formatted
    caption: str = ""  # how to read a table shown away from the notes that define its columns


@dataclass
class Section:
    title: str
    notes: list[str] = field(default_factory=list)
    plot: P.Plot | None = None
    tables: list[Table] = field(default_factory=list)


def _resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else PROJECT_ROOT / p


def _num(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def display(frame: pd.DataFrame) -> pd.DataFrame:
    """Collapse each `<col> n|mean|std|lo|hi` block into one readable `<col>` cell:
    'mean [lo, hi] sd std (n=N)'; round the other numbers."""
    out = pd.DataFrame(index=frame.index)
    for col in frame.columns:
        stat = col.rsplit(" ", 1)[-1]
        base = col[: -len(stat) - 1]
        if stat in ("n", "std", "lo", "hi") and f"{base} mean" in frame:
            continue
        if stat == "mean" and f"{base} lo" in frame:
            out[base] = [
                f"{_num(m)} [{_num(lo)}, {_num(hi)}] sd {_num(sd)} (n={n})"
                if n > 1
                else f"{_num(m)} (n=1)"
                if n == 1
                else "–"
                for m, lo, hi, sd, n in zip(
                    frame[col], frame[f"{base} lo"], frame[f"{base} hi"], frame[f"{base} std"], frame[f"{base} n"]
                )
            ]
        elif col == "method":
            out[col] = frame[col].map(P.name)  # the legend's names; the CSVs keep the run-directory ids
        elif pd.api.types.is_float_dtype(frame[col]):
            out[col] = frame[col].map(_num)
        else:
            out[col] = frame[col].astype(str)
    return out


def markdown_table(frame: pd.DataFrame) -> str:
    """A table as Markdown, numbers shown as the report shows them."""
    cells = display(frame)
    rows = [list(cells.columns), ["---"] * len(cells.columns), *cells.astype(str).values.tolist()]
    return "\n".join("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows)


# --- the sections -------------------------------------------------------------------------------------------


def policies(runs: Runs) -> list[str]:
    """The included methods that are policies (all but the stages that make the reward model and, with the SFT stage,
    pi_ref itself), in legend order."""
    return sorted((m for m in runs.methods if evaluated(m)), key=lambda m: (P.legend_rank(m), m))


def trained(runs: Runs) -> list[str]:
    """The policies with a training run (not π_ref, not Best of N): the ones with curves and training health."""
    return [m for m in policies(runs) if m not in (REFERENCE, BEST_OF_N)]


def _in_legend_order(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("method", key=lambda col: col.map(P.legend_rank), kind="stable").reset_index(drop=True)


def costed_evals(runs: Runs, methods: list[str] | None = None) -> pd.DataFrame:
    """Eval rows (of `methods`) with each run's cost from the start: M.SECONDS and M.FLOPS (M.with_earlier_stages)."""
    return M.with_earlier_stages(runs.evals(methods), M.earlier_stages(runs.runs, runs.timings))


@dataclass
class Stats:
    """What every section's numbers share: the per-prompt values, one set of bootstrap draws (the plots' bands), and,
    where the runs have a gold reward, every group read at the verdict's KL levels."""

    values: M.PromptValues
    draws: S.Draws
    levels: list[float] = field(default_factory=list)  # the verdict's KL levels, the primary first
    registered: bool = False  # the levels were fixed in the profile before the runs (report.kl_levels)
    at: dict | None = None  # per group, M.AtLevels


def make_stats(runs: Runs, report: ReportConfig | None = None) -> Stats:
    """The shared draws and, where the runs have a gold reward, gold at the verdict's KL levels: the profile's
    `report.kl_levels`, else (no level fixed in advance) the largest KL every PPO and DPO run reaches, ½ and ¼ of it,
    read without words."""
    report = report or ReportConfig()
    values = M.PromptValues(runs.prompts)
    stats = Stats(values, M.make_draws(values, report.bootstrap_reps, report.bootstrap_seed))
    compared = [m for m in COMPARED if m in runs.methods] or trained(runs)
    if has_gold(runs) and not runs.evals(compared).empty:
        if report.kl_levels:
            stats.levels, stats.registered = list(report.kl_levels), True
        else:
            reach = M.common_reach(runs.evals(compared), "eval/kl")
            stats.levels = [reach, reach / 2, reach / 4]
        stats.at = M.gold_at_levels(runs.evals(policies(runs)), values, stats.levels)
    return stats


def has_gold(runs: Runs) -> bool:
    evals = runs.evals()
    return "eval/gold" in evals and bool(evals["eval/gold"].notna().any())


def _level_source(stats: Stats) -> str:
    return (
        "the primary level, fixed in the profile before these runs: report.kl_levels, docs/tuning.md"
        if stats.registered
        else "not fixed in advance: the largest KL every PPO and DPO run reaches"
    )


def _reached(row: pd.Series, names=("PPO", "DPO")) -> str:
    return " and ".join(
        f"{name} {int(row[f'reached {s}'])} of {int(row[f'seeds {s}'])}" for name, s in zip(names, ("a", "b"))
    )


VERDICT_TITLE = "Verdict: PPO vs DPO in gold reward at a fixed KL"


@dataclass
class Verdict:
    """The verdict where a reader looks for it: the sentence and what qualifies it open the page; the detail behind it
    (every level, power, what the interval is made of, why PPO wins or loses) and how it is computed come later."""

    lead: Section
    detail: list[Section] = field(default_factory=list)
    method: list[Section] = field(default_factory=list)


def verdict_sections(runs: Runs, cfg: Config, stats: Stats | None = None) -> Verdict:
    """PPO − DPO in gold at the primary KL level. The lead: its interval and the sentence, and what qualifies it (runs
    short of the level, a level of 0, few eval points). The detail: the secondary levels, power, what the interval is
    made of and what narrows it, why PPO wins or loses."""
    stats = stats or make_stats(runs, cfg.report)
    lead = Section(VERDICT_TITLE)
    a, b = ("ppo", cfg.beta), ("dpo", cfg.beta)
    if stats.at is None or a not in stats.at or b not in stats.at:
        missing = [P.name(g[0]) for g in (a, b) if stats.at is None or g not in stats.at]
        lead.notes.append(
            f"No verdict: no completed {' or '.join(missing)} run at β = {cfg.beta:g} with a gold "
            "reward and a KL (see the headline's notes for what is missing)."
        )
        return Verdict(lead)
    table = M.verdict(stats.at, a, b, stats.levels, stats.registered)
    first = table.iloc[0]
    lead.notes.append(
        f"**PPO − DPO = {_signed(first['difference'])} [{_signed(first['lo'])}, {_signed(first['hi'])}]** in gold "
        f"reward at KL {first['KL level']:.3g} nats ({_level_source(stats)}), {int(first['seeds a'])} PPO and "
        f"{int(first['seeds b'])} DPO seeds, 95% Welch t-interval over the runs with a term for the shared eval "
        f"prompts. {first['verdict']}"
    )
    short = table[(table["reached a"] < table["seeds a"]) | (table["reached b"] < table["seeds b"])]
    if len(short):
        lead.notes.append(
            "Reached by "
            + "; ".join(f"{_reached(r)} seeds at {r['KL level']:.3g} nats" for _, r in short.iterrows())
            + ". A run that stops short of a level counts with the gold of its last eval point, the most it reached "
            "within its budget (no run is dropped): a method whose runs stop short is read low, not left out."
        )
    if first["KL level"] <= 0:
        lead.notes.append(
            "**The KL level is 0**: both methods are read at π_ref and the comparison says nothing; "
            "set report.kl_levels (docs/tuning.md)."
        )
    few = [
        f"{P.name(g[0])} {len(stats.at[g].keys)} run(s)"
        for g in (a, b)
        if any(len(run) < 5 for run in _eval_counts(runs, g, stats.at[g].keys))
    ]
    if few:
        lead.notes.append(
            f"Fewer than 5 eval points in some runs ({', '.join(few)}): their value at a KL level "
            "comes from a long interpolation; set `eval_every` for at least 5 (docs/analysis.md)."
        )

    detail = Section(
        "The verdict in detail: every KL level, power, what the interval is made of", tables=[Table("verdict", table)]
    )
    if len(table) > 1:
        detail.notes.append(
            "Secondary levels, shown without words (one test carries the verdict): "
            + "; ".join(
                f"at {r['KL level']:.3g} nats PPO − DPO = {_signed(r['difference'])} [{_signed(r['lo'])}, "
                f"{_signed(r['hi'])}]"
                for _, r in table.iloc[1:].iterrows()
            )
            + "."
        )
    power = M.power(first)
    detail.notes.append(power_line(first, power))
    detail.tables.append(Table("verdict_power", power))
    split = M.variance_split(stats.at, a, b)
    if not split.empty:
        seconds = [M.seed_seconds(runs.runs, runs.timings, m) for m in COMPARED]  # (a seed's, its evaluation's)
        seed_pair = sum(total for total, _ in seconds)
        evaluation = sum(evals * int(first[f"seeds {s}"]) for (_, evals), s in zip(seconds, ("a", "b")))
        allocation = M.allocation(
            split, int(first["seeds a"]), int(first["seeds b"]), int(first["n prompts"]), seed_pair, evaluation
        )
        detail.notes.append(allocation_line(split, allocation))
        detail.tables += [Table("variance_split", split), Table("allocation", allocation)]
    causes = causes_table(stats, cfg.beta)
    if len(causes) > 1:  # RLOO or online DPO ran: what PPO's difference comes from
        detail.notes.append(causes_paragraph(causes))
        detail.tables.append(Table("verdict_causes", causes))
    method = Section(
        "How the verdict is read",
        notes=[
            "How it is read: each run's gold at a KL level is interpolated from its eval points by a monotone cubic in "
            "√KL (docs/analysis.md); a method's value is the mean over its seeds. The interval is Welch's t over the "
            "per-run values (Welch–Satterthwaite degrees of freedom) with a term for what the shared eval prompts add "
            "beyond the seeds' spread (the prompt × method interaction, from prompt-jackknife pseudo-values); its "
            "coverage is simulated at 2–8 seeds per method (`make coverage`). The KL levels are fixed before the runs "
            "and never recomputed from them."
        ],
    )
    return Verdict(lead, [detail], [method])


def causes_table(stats: Stats, beta: float) -> pd.DataFrame:
    """`CAUSES` at the primary KL level, for the pairs of methods that both have runs at `beta`: each difference with
    its Welch interval (M.verdict), and words from Holm-adjusted p-values over the pairs shown (one family, its
    family-wise error at most 5%)."""
    at = stats.at or {}
    rows = [
        M.verdict(at, (a, beta), (b, beta), stats.levels[:1], stats.registered, (P.name(a), P.name(b))).assign(
            question=question, comparison=f"{P.name(a)} − {P.name(b)}", names=[(P.name(a), P.name(b))]
        )
        for question, a, b in CAUSES
        if (a, beta) in at and (b, beta) in at
    ]
    if not rows:
        return pd.DataFrame()
    table = pd.concat(rows, ignore_index=True)
    table["Holm p"] = S.holm(table["p"].fillna(1.0).to_numpy())
    table["verdict"] = [_holm_words(r) if stats.registered else r["verdict"] for _, r in table.iterrows()]
    table = table.drop(columns=["names", "primary"])
    return table[["question", "comparison", *table.columns.drop(["question", "comparison"])]]


def _holm_words(row: pd.Series) -> str:
    a, b = row["names"]
    at = f"at {int(row['seeds a'])} {a} and {int(row['seeds b'])} {b} seeds"
    if math.isnan(row["p"]):
        return S.verdict_words(math.nan, math.nan, int(row["seeds a"]), int(row["seeds b"]), a, b)
    if row["Holm p"] < 0.05:
        return f"{a if row['difference'] > 0 else b} ahead {at} (Holm-adjusted p = {row['Holm p']:.3g})."
    return f"Not distinguishable {at} (Holm-adjusted p = {row['Holm p']:.3g})."


def causes_paragraph(causes: pd.DataFrame) -> str:
    """One paragraph that reads the methods together at the primary KL level: online vs offline (PPO and each online
    method against DPO), then critic vs none (PPO against RLOO)."""

    def said(question: str) -> str:
        rows = causes[causes["question"] == question]
        return (
            "; ".join(
                f"{r['comparison']} = {_signed(r['difference'])} [{_signed(r['lo'])}, {_signed(r['hi'])}] "
                f"(reached by {_reached(r, r['comparison'].split(' − '))}): {r['verdict'].rstrip('.')}"
                for _, r in rows.iterrows()
            )
            or "not run"
        )

    level = causes["KL level"].iloc[0]
    *others, last = [P.name(m) for m in SAMPLING]
    sampling = f"{', '.join(others)} and {last}"
    return (
        f"**Why PPO wins or loses** (docs/online.md), in gold at the verdict's primary level, {level:.3g} nats; "
        "the words come from Holm-adjusted p-values over these comparisons (one family). Online vs offline "
        f"({sampling} sample from the current policy and are scored by the same reward model; DPO learns "
        f"from the fixed pairs): {said('online vs offline')}. Critic vs none (PPO and RLOO optimise the same eq. "
        f"(2) against the same reward model; only PPO has a value model): {said('critic vs none')}. Where every "
        "online method is ahead of DPO, sampling from the policy is what helps, whatever the loss; where PPO is "
        "ahead of RLOO too, its critic adds to that; where PPO and RLOO are not distinguishable, the critic is "
        "not what PPO's difference comes from at this many seeds."
    )


def _signed(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:+.3f}"


def _eval_counts(runs: Runs, group: tuple, keys: list) -> list[list]:
    evals = runs.evals([group[0]])
    return [evals[(evals["run_id"] == key[3])]["step"].tolist() for key in keys]


def power_line(row: pd.Series, power: pd.DataFrame) -> str:
    """The power line: how many seeds per method the verdict's test needs for 80% power, from the t distribution."""
    if math.isnan(row["sd a"]) or math.isnan(row["sd b"]):
        return (
            "Power: unknown: one seed of a method gives no between-seed variance. With 2 or more seeds each, this "
            "line says how many would resolve a difference of the observed size, 0.1 and 0.05."
        )

    def n(x: float) -> str:
        return "–" if math.isnan(x) else "more than 1,000" if math.isinf(x) else f"{x:.0f}"

    said = "; ".join(
        f"{'the observed ' if r['difference'] == 'observed' else ''}{r['gold']:.3g}: "
        f"{n(r['seeds per method'])} ({n(r['if the sds are at their lower limits'])}–"
        f"{n(r['if at their upper limits'])})"
        for _, r in power.iterrows()
    )
    return (
        f"Power of this test (two-sided 5%, Welch's t, noncentral t): seeds per method for 80% power to resolve a "
        f"difference in gold of {said}; in brackets, the range that the between-seed sds' 80% confidence limits "
        f"give (observed sd PPO {row['sd a']:.3g}, DPO {row['sd b']:.3g}, from {int(row['seeds a'])} and "
        f"{int(row['seeds b'])} seeds). This report has {int(row['seeds a'])} and {int(row['seeds b'])}."
    )


def allocation_line(split: pd.DataFrame, allocation: pd.DataFrame) -> str:
    """The variance split in one sentence, and what one more seed buys against twice the eval prompts."""
    sd = split.set_index("component")["sd"]
    noise = {m: sd[f"{m}: a run's own prompt noise (sd of its mean)"] for m in ("PPO", "DPO")}
    interaction = sd["prompt × method interaction, the difference's mean"]
    now, seed, prompts = allocation.itertuples(index=False)
    return (
        f"What the interval is made of (`variance_split.csv`): true seed-to-seed sd PPO "
        f"{sd['PPO: true seed-to-seed']:.3g}, DPO {sd['DPO: true seed-to-seed']:.3g}; a run's own prompt noise "
        f"(sd of its mean) PPO {noise['PPO']:.3g}, DPO {noise['DPO']:.3g}; prompt × method interaction "
        f"{interaction:.3g} on the difference. Expected half-width now ±{now[1]:.3f}; one more seed per method "
        f"±{seed[1]:.3f} for {seed[2] / 60:.0f} CPU-minutes; twice the eval prompts ±{prompts[1]:.3f} for "
        f"{prompts[2] / 60:.0f} CPU-minutes (`allocation.csv`)."
    )


def headline_section(runs: Runs, cfg: Config, has_gold: bool, stats: Stats | None = None) -> Section:
    """Gold reward at the verdict's KL levels and the time and compute to reach the target gold reward, per method."""
    stats = stats or make_stats(runs, cfg.report)
    evals = costed_evals(runs, policies(runs))
    section = Section("Headline: gold reward at the verdict's KL levels, and the time and compute to reach it")
    gold_level = math.nan
    if has_gold and stats.at is not None:
        if cfg.report.target_gold is not None:
            gold_level, gold_source = cfg.report.target_gold, "set by report.target_gold"
        else:  # from the compared methods' runs, or from every trained run where none exists
            compared = runs.evals([m for m in COMPARED if m in runs.methods])
            level_runs, who = (
                (compared, "PPO and DPO") if not compared.empty else (runs.evals(trained(runs)), "trained")
            )
            gold_level, gold_source = M.common_reach(level_runs, "eval/gold"), f"the highest every {who} run reaches"
        section.notes += [
            f"KL levels {', '.join(f'{level:.3g}' for level in stats.levels)} nats per sequence ({_level_source(stats)}"
            "; the others secondary): each run's gold reward where its eval trajectory first reaches that KL, read "
            "from a monotone cubic interpolation in √KL; a run that never reaches a level counts with its last eval "
            "point (`headline_per_run.csv` says which did).",
            f"Target gold reward = {gold_level:.4g} ({gold_source}): wall-clock seconds and training FLOPs until a "
            "run's eval trajectory first reaches it, each counted from the start of the method's own earlier "
            "stages: PPO's include its own reward model's training, DPO's its pass of pi_ref over its pairs. FLOPs "
            "are 6·N·tokens a training pass and 2·N·tokens a forward pass (docs/analysis.md); evaluation is excluded "
            "from both, and so is the shared preference set (the cost section).",
            "Cells read: mean over runs [95% t-interval] sd between-run std (n = runs). Gold at a KL level: Welch's "
            "t over the runs with the eval prompts' term (docs/analysis.md); the other columns are run-level "
            "numbers, a t-interval over runs. One run gives no interval.",
        ]
    elif not has_gold:
        section.notes.append(
            "This task has no gold reward: the table gives the final KL, the proxy reward (PPO's "
            "learned RM; DPO's samples are scored by the same RM where `make ppo` trained it first) "
            "and the held-out preference accuracy of each method's own scorer (explicit RM for "
            "PPO, implicit reward for DPO) instead. These are not a like-for-like measure of policy "
            "quality: PPO maximises that very RM, so the proxy favours PPO and cannot show its "
            "over-optimisation. Read them with the held-out section below."
        )
    if BEST_OF_N in runs.methods:
        section.notes.append(
            "Best of N: one row per N along its trajectory; its KL is the upper bound log N − (N−1)/N "
            "(docs/baselines.md), so its gold reward at a KL level is read where the bound, not the KL, reaches the "
            "level, which understates it. Its seconds and FLOPs are inference, not training (plus its reward "
            "model's training): sampling and scoring N responses per eval prompt, paid again on every prompt it "
            "serves."
        )
    section.notes.append(budget_note(runs))
    section.notes += beta_notes(runs)
    if evals.empty:
        section.notes.append("No completed reference, PPO, DPO or baseline run: nothing to compare yet.")
        return section
    per_run = _in_legend_order(M.per_run_headline(evals, stats.at, stats.levels, gold_level))
    section.tables.append(Table("headline", _in_legend_order(M.headline_summary(per_run, stats.at, stats.levels))))
    section.tables.append(Table("headline_per_run", per_run))
    section.tables.append(
        Table("budget", _in_legend_order(M.budgets(runs.runs, [m for m in trained(runs) if not METHODS[m].gold])))
    )
    return section


def beta_notes(runs: Runs) -> list[str]:
    """A line for every run whose beta does not mean DPO's: PPO with an adaptive KL coefficient or rollouts at a
    temperature other than 1, and any run evaluated at a temperature other than 1."""
    notes = []
    for _, r in runs.runs[runs.runs["included"]].iterrows():
        adaptive, rollout, evaluation = (
            r.get(k) for k in ("kl_adaptive", "kl_rollout_temperature", "eval_temperature")
        )
        why = ["an adaptive KL coefficient (ppo.adaptive_kl)"] if pd.notna(adaptive) and bool(adaptive) else []
        if pd.notna(rollout) and rollout != 1.0:
            why.append(f"rollouts at temperature {rollout:g} (ppo.temperature)")
        if pd.notna(evaluation) and evaluation != 1.0:
            why.append(f"evaluation at temperature {evaluation:g} (eval.temperature)")
        if why:
            notes.append(
                f"**β not matched**: {P.name(r['method'])} seed {r['seed']:g} (β {r['beta']:g}) ran with "
                f"{' and '.join(why)}, so its β is not DPO's and its KL is not comparable at face value."
            )
    return notes


def budget_note(runs: Runs) -> str:
    """The headline's line on the training budget: equal, or "unequal budget" with every method's numbers."""
    # each trainer's budget once (a variant's is its family's); PPO's is its reward model's
    own = [m.name for m in METHODS.values() if m.trains and m.role != "stage" and not m.gold and not m.family]
    table = M.budgets(runs.runs, [m for m in own if m in runs.methods])
    if table.empty:
        return "Training budget: no completed PPO, DPO or Preferred-FT run records one yet."
    said = "; ".join(
        f"{P.name(r['method'])} {r['pairs']} pairs × {r['passes']} passes = "
        f"{r['pair presentations']} pair presentations"
        for _, r in _in_legend_order(table).iterrows()
    )
    columns = list(M.BUDGET.values())
    if len(table[columns].drop_duplicates()) == 1 and not table[columns].iloc[0].str.contains("/|–").any():
        return (
            f"Equal budget: every method trained on the same pairs for the same passes ({said}; PPO's, RLOO's and "
            "online DPO's are their reward model's, `budget:` in the config)."
        )
    return (
        f"**Unequal budget**: the methods did not train on the same pairs and passes ({said}; PPO's, RLOO's and "
        "online DPO's are their reward model's). A difference below may come from the data each saw, not from the "
        "method."
    )


def frontier_section(runs: Runs, score: str, score_label: str, stats: Stats | None = None) -> Section:
    stats = stats or make_stats(runs)
    methods = [m for m in policies(runs) if m != REFERENCE]
    points = M.frontier(runs.evals(policies(runs)), stats.values, stats.draws, score)
    reference = points[points["method"] == REFERENCE]
    trajectories = points[points["method"] != REFERENCE]
    section = Section(
        "Reward vs KL: the frontier's points",
        plot=P.frontier_plot(
            trajectories, reference, score, score_label, runs.evals(methods), stats.levels[0] if stats.levels else None
        ),
    )
    section.notes.append(
        "Each point is a method's mean over its seeds at one eval point (β apart), with 95% "
        "hierarchical-bootstrap intervals in both reward and KL (seeds, then prompts: a picture of "
        "the spread, not the verdict's test); the points are joined in training order. There is no "
        "envelope over single runs' points: it would pick the luckiest of them and favour the method "
        "with more points or more spread."
    )
    if reference.empty:
        section.notes.append(
            "No reference run (`make reference`) with this score: trajectories start at each method's first eval."
            if runs.evals([REFERENCE]).empty
            else f"The reference run has no {score} (π_ref is evaluated without the reward model): trajectories "
            "start at each method's first eval, which is π_ref itself at step 0."
        )
    if not trajectories.empty:
        section.tables.append(Table("frontier", trajectories[trajectories["method"].isin(methods)]))
    return section


def curves_section(runs: Runs, columns: dict[str, str], stats: Stats | None = None) -> Section:
    stats = stats or make_stats(runs)
    trained_evals = costed_evals(runs, trained(runs))
    bands = {c: M.band(trained_evals, stats.values, stats.draws, c) for c in columns if c in trained_evals}
    section = Section(
        "Reward and KL over training FLOPs and wall-clock", plot=P.curves_plot(bands, trained_evals, columns)
    )
    section.notes.append(
        "Both axes count from the start of each method's own earlier stages (PPO: its reward "
        "model's training; DPO: its pass of pi_ref over its pairs), evaluation excluded, so PPO's "
        "curve starts where its reward model ends."
    )
    return section


def heldout_section(runs: Runs, has_gold: bool, stats: Stats | None = None) -> Section:
    stats = stats or make_stats(runs)
    scores = M.heldout_scores(M.final_evals(runs.evals()), runs.runs)
    summary = M.summarize(scores, [*M.GROUP, "scorer"], ["accuracy", "margin"])
    title = "Held-out pairs: explicit RM vs DPO implicit reward" + (" vs gold ceiling" if has_gold else "")
    section = Section(title, plot=P.heldout_plot(summary))
    section.notes.append(
        "Each run's last eval point. Accuracy counts a tie as half; margin is the mean score of "
        "the chosen minus the rejected response, in the scorer's own units (one panel per unit). A "
        "model scored by several runs counts once: a reward model shared by PPO seeds, and the gold "
        "labels (the same pairs for every run)."
    )
    if not has_gold:
        section.notes.append(
            "No gold reward: the labels are human judgements, so no ceiling from label noise is "
            "known, and accuracy is against those labels. With n held-out pairs an accuracy p has "
            "a standard error of about sqrt(p(1-p)/n): 0.035 at p = 0.6 and n = 200."
        )
    if not scores.empty:
        section.tables.append(Table("heldout", summary))
    return section


def overoptimisation_section(runs: Runs, has_gold: bool) -> Section:
    gains = M.overoptimisation(runs.evals(M.gao_methods()))
    fits = M.gao_fits(gains)
    section = Section(
        "Over-optimisation: proxy and gold reward against √KL (Gao et al. 2022)"
        if has_gold
        else "Proxy reward against √KL (no gold reward: over-optimisation cannot be seen)",
        plot=P.overoptimisation_plot(gains, fits),
    )
    section.notes.append(
        "Gao et al.'s forms, fitted by least squares over every eval point of a method's runs, gains "
        "in units of the first eval's std: RL (PPO) R(d) = d(α − β log d), Best of N "
        "R(d) = d(α − β d), d = √KL (Best of N: of its KL bound). A fitted gold curve that peaks "
        "while the proxy's keeps rising is over-optimisation; the peak of the RL form is at "
        "d = exp(α/β − 1)."
    )
    if not gains.empty:
        section.tables.append(Table("proxy_gold_gap", gains))
    if not fits.empty:
        section.tables.append(Table("gao_fits", fits))
    return section


def stability_sections(
    runs: Runs, cfg: Config, score: str, score_label: str, stats: Stats | None = None
) -> list[Section]:
    stats = stats or make_stats(runs, cfg.report)
    trained_evals = costed_evals(runs, trained(runs))
    final = M.final_evals(trained_evals)
    seeds = Section("Stability across seeds", plot=P.seeds_plot(trained_evals, final, score, score_label))
    # A diverged run is a result about stability, though it is left out of every aggregate.
    for _, run in runs.runs[runs.runs["status"] == "diverged"].iterrows():
        seeds.notes.append(
            f"Diverged: {run['method']} seed {run['seed']:g} (β {run['beta']:g}) stopped at a "
            f"non-finite training quantity: {str(run['error']).removeprefix('Diverged: ')}"
        )
    seeds.notes.append(spread_note(runs))
    if not final.empty:
        columns = [c for c in (score, "eval/kl") if c in final]
        seeds.tables.append(Table("final_spread", M.summarize(final, M.GROUP, columns)))
    train = runs.train(trained(runs))
    flagged = M.flag_spikes(train, SPIKE_SERIES, cfg.report.spike_window, cfg.report.spike_k)
    health = Section("Training health: spikes, PPO clipping, DPO log-probs", plot=P.health_plot(train, flagged))
    health.notes.append(
        f"A spike is a training value above the median of the {cfg.report.spike_window} steps "
        f"before it by more than {cfg.report.spike_k:g} × 1.4826 × their median absolute deviation "
        "(report.spike_window, report.spike_k)."
    )
    if not flagged.empty:
        health.tables.append(Table("spikes", M.spike_counts(flagged)))
    if not train.empty:
        health.tables.append(Table("training_series", M.series_summary(train, HEALTH_SERIES)))
    return [seeds, health]


def spread_note(runs: Runs) -> str:
    """What each method's spread across seeds includes: a seed's own reward model, or one shared by all."""
    shared = M.shared_reward_models(runs.runs)
    ppo = (
        "PPO's spread leaves out stage 1's variance: "
        + "; ".join(f"{n} PPO runs share the reward model {path}" for path, n in shared.items())
        if shared
        else "PPO's spread includes stage 1's: each PPO seed trained against a reward model trained "
        "with that seed (reward_model.per_seed)"
    )
    return (
        f"What a spread includes: {ppo}. DPO's and Preferred-FT's include their training order: every seed "
        "trains on the same pairs (budget.pairs) in its own order."
    )


def cost_section(runs: Runs) -> Section:
    costs = M.stage_costs(runs.timings)
    per_method = M.method_costs(runs.metrics, M.earlier_stages(runs.runs, runs.timings), runs.timings)
    section = Section(
        "Cost: wall-clock, FLOPs and peak memory per stage and method", plot=P.cost_plot(costs, per_method)
    )
    section.notes += [
        "FLOPs: 6·N·tokens a training pass, 2·N·tokens a forward pass, N the non-embedding parameters plus the "
        "output head of the model a pass runs through, tokens its non-padding ones (docs/analysis.md). Per stage "
        "(`cost.csv`): PPO's `train` is its rollouts, scoring passes and updates; DPO's `ref_logps` its pass of "
        "pi_ref, `train` its training; the reward model's `reward_model` its training, `reward_shift` and `eval` "
        "its centring and held-out passes; every `eval` is the shared evaluator, counted apart from training.",
        "Per method (`cost_per_method.csv`): training FLOPs = the own loop's plus the earlier stages' (PPO and "
        "Best of N: the reward model's training; DPO: pi_ref's pass); end-to-end seconds likewise.",
        "Peak memory is the process's resident set size on CPU, the CUDA allocator's peak on GPU.",
    ]
    if not costs.empty:
        section.tables.append(Table("cost", costs))
        section.tables.append(Table("cost_per_method", _in_legend_order(per_method)))
    shas = set(runs.runs.loc[runs.runs["included"], "data_sha256"].dropna()) if runs.methods else set()
    shared = M.preference_set_costs(runs.data_manifests, shas)
    if not shared.empty:
        section.notes.append(
            "The shared preference set, apart (both methods train on it): its build seconds and "
            "the FLOPs of sampling pi_ref's responses for its pairs (`preference_set_cost.csv`)."
        )
        section.tables.append(Table("preference_set_cost", shared))
    return section


def provenance_section(runs: Runs, cfg: Config, profile_dir: Path) -> Section:
    table = runs.runs
    included = table[table["included"]]
    section = Section(
        "Provenance",
        notes=[
            f"Profile `{cfg.profile}`, runs read from `{profile_dir}`, report "
            f"written {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC."
        ],
    )
    excluded = table[~table["included"]]
    if not excluded.empty:
        section.notes.append(
            f"{len(excluded)} run director{'y' if len(excluded) == 1 else 'ies'} left out of "
            "every aggregate (listed below with the reason)."
        )
        section.tables.append(Table("runs_excluded", excluded[["method", "run_id", "status", "reason", "path"]]))
    if not included.empty:
        section.tables.append(Table("runs_included", included[[*M.RUN, "data_sha256", "git_commit"]]))
        machines = included[["host", "device", "device_name"]].drop_duplicates()
        section.tables.append(Table("machines", machines))
        packages = pd.DataFrame([json.loads(p) for p in included["packages"].drop_duplicates()])
        section.tables.append(Table("packages", packages))
        shas = set(included["data_sha256"].dropna())
        if len(shas) > 1:
            section.notes.append(
                f"Warning: the included runs read {len(shas)} different preference sets "
                f"({', '.join(sorted(s[:12] for s in shas))}); their comparison is not like for like."
            )
    if runs.data_manifests:
        section.tables.append(
            Table(
                "data",
                pd.DataFrame(
                    [
                        {
                            "path": d["path"],
                            "sha256": d.get("sha256"),
                            "counts": json.dumps(d.get("counts")),
                            "error": d.get("error", ""),
                        }
                        for d in runs.data_manifests
                    ]
                ),
            )
        )
    return section


def missing_notes(runs: Runs, has_gold: bool) -> list[str]:
    present = set(runs.methods)
    notes = [
        f"No completed {P.name(m)} run: its rows, curves and panels are absent (run `make {m}`)."
        for m in COMPARED
        if m not in present
    ]
    if runs.missing:
        notes.append(
            f"Compared over the seeds every method completed; not completed yet: {', '.join(runs.missing)} "
            "(their seeds' other runs are left out until they are: `make all` again completes them)."
        )
    if REFERENCE not in present:
        notes.append("No completed reference run (`make reference`): π_ref's point is missing from the frontier.")
    absent = [
        f"{P.name(m)} (`{command}`)"
        for m, command in BASELINES.items()
        if m not in present and (has_gold or not METHODS[m].gold)
    ]
    if absent:
        notes.append(f"Baselines not run, so absent from the frontier and the headline: {', '.join(absent)}.")
    return notes


def primary_level_table(headline: Section, stats: Stats) -> Table | None:
    """The first screen's one small table: each method's gold at the primary KL level, as the headline has it."""
    summary = next((t.frame for t in headline.tables if t.name == "headline"), None)
    if summary is None or not stats.levels:
        return None
    gold = f"gold at KL {stats.levels[0]:.3g} "
    return Table(
        "headline_primary",
        summary[["method", "beta", *(c for c in summary if c.startswith(gold))]],
        f"Each method's gold reward at KL {stats.levels[0]:.3g} nats, the primary level: mean over runs [95% "
        "interval: Welch's t with the eval prompts' term] sd between-run std (n = runs). Every level, and the "
        "time and compute to a target gold reward: the headline below.",
    )


def build(runs: Runs, cfg: Config, profile_dir: Path) -> list[Section]:
    """The sections in the order a reader asks. The first screen: the verdict sentence, the frontier figure and each
    method's gold at the primary KL level. Then what it cost, how stable it is across seeds, the verdict in detail,
    every method at every level, the held-out pairs and over-optimisation, training health, the frontier's points,
    how the verdict is read, and where it all came from."""
    gold = has_gold(runs)
    unit = GOLD_UNITS.get(cfg.task.name, "the task's gold score")
    score, score_label = (
        ("eval/gold", f"gold reward [{unit}]") if gold else ("eval/proxy", "proxy reward, learned RM [RM score]")
    )
    stats = make_stats(runs, cfg.report)
    verdict = (
        verdict_sections(runs, cfg, stats)
        if gold
        else Verdict(
            Section(
                VERDICT_TITLE,
                notes=["No verdict: this task has no gold reward (the headline's notes say what it compares instead)."],
            )
        )
    )
    headline = headline_section(runs, cfg, gold, stats)
    headline.notes = missing_notes(runs, gold) + headline.notes
    frontier = frontier_section(runs, score, score_label, stats)
    # The figure opens the page; the notes on how its points are computed stay below with their table.
    verdict.lead.plot, frontier.plot = frontier.plot, None
    glance = primary_level_table(headline, stats)
    if glance is not None:
        verdict.lead.tables.append(glance)
    seeds, health = stability_sections(runs, cfg, score, score_label, stats)
    return [
        verdict.lead,
        cost_section(runs),
        curves_section(runs, {score: score_label, "eval/kl": P.KL_LABEL}, stats),
        seeds,
        *verdict.detail,
        headline,
        heldout_section(runs, gold, stats),
        overoptimisation_section(runs, gold),
        health,
        frontier,
        *verdict.method,
        provenance_section(runs, cfg, profile_dir),
    ]


# --- rendering ----------------------------------------------------------------------------------------------

# summary.md is the report in Markdown; the page is that same Markdown rendered (CommonMark and its tables, any raw
# HTML in a note shown as text) into the template beside this module.
MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")
TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


def _title(profile: str) -> str:
    return f"PPO vs DPO: profile {profile}"


def markdown_parts(section: Section) -> dict[str, str]:
    """A section's Markdown under its heading, in three parts the page lays out: the notes, the figure with the
    sentence on how to read it, and the tables, each under a link to its CSV."""
    plot = section.plot
    figure = (
        ""
        if plot is None
        else f"![{plot.title}]({plot.name}.png)\n\n*{plot.caption}*"
        if plot.figure is not None
        else f"Not drawn: {plot.missing}."
    )
    tables = []
    for t in section.tables:
        tables += [f"[`{t.name}.csv`]({t.name}.csv)", markdown_table(t.frame)]
        tables += [f"*{t.caption}*"] if t.caption else []
    return {"notes": "\n\n".join(section.notes), "plot": figure, "tables": "\n\n".join(tables)}


def render_markdown(sections: list[Section], profile: str) -> str:
    parts = [f"# {_title(profile)}"]
    for s in sections:
        parts += [f"## {s.title}", *(part for part in markdown_parts(s).values() if part)]
    return "\n\n".join(parts) + "\n"


def render_html(sections: list[Section], profile: str) -> str:
    rendered = [
        {"title": s.title, **{key: Markup(MARKDOWN.render(part)) for key, part in markdown_parts(s).items()}}
        for s in sections
    ]
    return TEMPLATES.get_template("report.html.j2").render(title=_title(profile), sections=rendered)


def write(sections: list[Section], out: Path, profile: str) -> None:
    """Every file is written whole (a temporary name, then renamed), the pages last. A figure or table this report no
    longer has must not linger beside the new page, and is deleted only then: a kill midway leaves no file torn and
    none that the page on disk shows missing."""
    out.mkdir(parents=True, exist_ok=True)
    written = set()
    for s in sections:
        if s.plot is not None and s.plot.figure is not None:
            P.save(s.plot, out)
            written.add(f"{s.plot.name}.png")
        for t in s.tables:
            atomic_write_text(out / f"{t.name}.csv", t.frame.to_csv(index=False))
            written.add(f"{t.name}.csv")
    atomic_write_text(out / "summary.md", render_markdown(sections, profile))
    atomic_write_text(out / "index.html", render_html(sections, profile))
    for stale in [*out.glob("*.png"), *out.glob("*.csv")]:
        if stale.name not in written:
            stale.unlink()


def main(cfg: Config) -> int:
    profile_dir = _resolve(cfg.runs_dir) / cfg.profile
    out = _resolve(cfg.report.out_dir) / cfg.profile
    runs = load_runs(profile_dir, cfg.grid.methods)
    for _, bad in runs.runs[~runs.runs["included"]].iterrows():
        print(f"left out: {bad['path']}: {bad['reason']}")
    if runs.missing:
        print(f"missing (run `make all` again to complete them): {', '.join(runs.missing)}")
    sections = build(runs, cfg, profile_dir)
    write(sections, out, cfg.profile)
    verdict = next((t.frame.iloc[0] for s in sections for t in s.tables if t.name == "verdict"), None)
    if verdict is not None:  # the estimate on one line, the words on the next: what a person reads first
        print(
            f"verdict: PPO − DPO = {_signed(verdict['difference'])} [{_signed(verdict['lo'])}, "
            f"{_signed(verdict['hi'])}] in gold at KL {verdict['KL level']:.3g} nats\n  {verdict['verdict']}"
        )
    print(f"report: {out / 'index.html'} ({int(runs.runs['included'].sum())} of {len(runs.runs)} runs included)")
    return 0
