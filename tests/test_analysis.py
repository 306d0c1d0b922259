"""analysis/: every metric against a hand computation on synthetic run directories, and the report end to end
(gold task, no-gold task, bad and unfinished runs, one method missing). Offline, no model, a few seconds."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from analysis import metrics as M
from analysis import stats as S
from analysis.load import load_runs
from analysis.report import headline_section, stability_sections
from analysis.report import main as report_main
from rlhf.config import load_config
from rlhf.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(
    profile_dir,
    method,
    seed,
    evals,
    train=(),
    beta=0.1,
    status="completed",
    timings=None,
    run_id=None,
    **manifest_extra,
):
    """A run directory as the pipelines write it (docs/run-directory.md). `evals` / `train` are lists of
    metric dicts; step i gets step 10*i, wall_seconds 100*i, tokens 1000*i and flops 1e9*i unless the dict sets
    them."""
    run_id = run_id or f"20261125T000000-beta{beta:g}-seed{seed}"
    path = profile_dir / method / run_id
    path.mkdir(parents=True)
    manifest = {
        "method": method,
        "profile": profile_dir.name,
        "seed": seed,
        "beta": beta,
        "run_id": run_id,
        "status": status,
        "error": "RuntimeError: loss is nan" if status == "failed" else None,
        "data_sha256": "f" * 64,
        "packages": {"python": "3.11", "pandas": "3.1"},
        "git_commit": "abc",
        "host": "box",
        "device": "cpu",
        "device_name": "x86_64",
        **manifest_extra,
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    rows = [
        {"kind": kind, "step": 10 * i, "wall_seconds": 100.0 * i, "tokens": 1000 * i, "flops": 1e9 * i, **m}
        for kind, series in (("train", train), ("eval", evals))
        for i, m in enumerate(series)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "timings.json").write_text(
        json.dumps(
            timings
            or {
                "train": {"seconds": 200.0, "peak_memory_mb": 900.0},
                "eval": {"seconds": 20.0, "peak_memory_mb": 950.0},
            }
        )
    )
    return path


def ev(kl, gold=None, **extra):
    row = {"eval/kl": kl, **extra}
    if gold is not None:
        row.update(
            {
                "eval/gold": gold,
                "eval/gold_std": 0.5,
                "eval/gold_sem": 0.1,
                "heldout/gold_accuracy": 0.9,
                "heldout/gold_margin": 0.4,
            }
        )
    return row


def gold_profile(root):
    """reference, RM, PPO x2 seeds (against that RM: 50 s and 5e8 FLOPs of training), DPO x2 seeds (pi_ref's pass:
    10 s, 2e8 FLOPs), with numbers the tests compute by hand."""
    p = root / "runs" / "synthetic"
    write_run(p, "reference", 1234, [ev(0.0, 0.1)])
    rm = write_run(
        p,
        "reward_model",
        0,
        [{"heldout/rm_accuracy": 0.7, "heldout/rm_margin": 1.5, **ev(0.0, 0.1)}],
        timings={"reward_model": {"seconds": 50.0, "flops": 5e8, "peak_memory_mb": 700.0}},
    )
    ppo_train = [
        {"grad_norm": g, "loss/value": 1.0, "policy/clipfrac": 0.1, "policy/approxkl": 0.01} for g in [1, 2] * 6 + [50]
    ]
    for seed, kls, golds, proxies in (
        (0, [0, 1, 3], [0.1, 0.3, 0.5], [0, 1, 3]),
        (1, [0, 2, 4], [0.1, 0.4, 0.4], [0, 2, 4]),
    ):
        write_run(
            p,
            "ppo",
            seed,
            [
                ev(
                    k,
                    g,
                    **{"eval/proxy": x, "eval/proxy_std": 2.0, "heldout/rm_accuracy": 0.7, "heldout/rm_margin": 1.5},
                )
                for k, g, x in zip(kls, golds, proxies)
            ],
            train=ppo_train,
            reward_model_path=str(rm / "checkpoints" / "final"),
        )
    dpo_train = [
        {"loss": 0.69, "grad_norm": 1.0, "logps/chosen": -10.0 - i, "logps/rejected": -10.0 - 2 * i} for i in range(5)
    ]
    for seed, kls, golds in ((0, [0, 2, 6], [0.1, 0.6, 0.8]), (1, [0, 1, 2], [0.1, 0.2, 0.7])):
        write_run(
            p,
            "dpo",
            seed,
            [
                ev(k, g, **{"heldout/implicit_accuracy": 0.6 + 0.1 * seed, "heldout/implicit_margin": 0.3})
                for k, g in zip(kls, golds)
            ],
            train=dpo_train,
            timings={
                "ref_logps": {"seconds": 10.0, "flops": 2e8, "peak_memory_mb": 800.0},
                "train": {"seconds": 200.0, "flops": 2e9, "peak_memory_mb": 900.0},
                "eval": {"seconds": 20.0, "flops": 3e7, "peak_memory_mb": 950.0},
            },
        )
    (p / "data" / "preferences-abc").mkdir(parents=True)
    (p / "data" / "preferences-abc" / "manifest.json").write_text(
        json.dumps({"sha256": "f" * 64, "counts": {"train": 8}})
    )
    return p


def with_baselines(p):
    """The gold profile plus every baseline and a DPO variant, as `make ppo-gt`, `make bon`, `make preferred-ft` and
    `make dpo ARGS=dpo.loss_type=ipo` write them. Best of N: one run, step = N, KL = the bound log N - (N-1)/N."""
    write_run(
        p,
        "ppo-gt",
        0,
        [ev(k, g) for k, g in ((0, 0.1), (1, 0.5), (2, 0.9))],
        train=[{"grad_norm": 1.0, "loss/value": 1.0, "policy/clipfrac": 0.1}] * 3,
    )
    bound = {n: math.log(n) - (n - 1) / n for n in (1, 4, 16, 64)}
    write_run(
        p,
        "bon",
        1234,
        [
            {
                **ev(bound[n], g),
                "eval/gold_sem": 0.05,
                "eval/proxy": n / 10,
                "step": n,
                "wall_seconds": 2.0 * n,
                "tokens": 100 * n,
            }
            for n, g in ((1, 0.1), (4, 0.3), (16, 0.5), (64, 0.6))
        ],
        timings={"sample_and_score": {"seconds": 128.0, "peak_memory_mb": 800.0}},
    )
    write_run(
        p,
        "preferred-ft",
        0,
        [ev(k, g) for k, g in ((0, 0.1), (0.5, 0.2), (3, 0.3))],
        train=[{"loss": 2.0, "grad_norm": 1.0}] * 3,
    )
    write_run(p, "dpo-ipo", 0, [ev(k, g) for k, g in ((0, 0.1), (2, 0.45))], train=[{"loss": 1.0}] * 2)
    return p


def run_report(tmp_path, profile_dir, base_profile="tiny", overrides=()):
    """Run `make report`'s entry point on runs/<name>/; returns the output folder."""
    cfg = load_config(
        base_profile, [f"runs_dir={tmp_path / 'runs'}", f"report.out_dir={tmp_path / 'reports'}", *overrides]
    )
    cfg.profile = profile_dir.name
    assert report_main(cfg) == 0
    return tmp_path / "reports" / profile_dir.name


# --- metrics, by hand -----------------------------------------------------------------------------------------


def test_frontier_is_seed_means_joined_along_training(tmp_path):
    runs = load_runs(gold_profile(tmp_path))
    values = M.PromptValues(runs.prompts)
    front = M.frontier(runs.evals(["ppo", "dpo"]), values, M.make_draws(values, 200, 0)).set_index(["method", "step"])
    # PPO at step 10: KL (1 + 2) / 2, gold (0.3 + 0.4) / 2, an interval over its 2 seeds between them (run-level
    # values: these synthetic runs keep no per-prompt files); every step of both methods, in order
    assert front.loc[("ppo", 10), ["eval/kl mean", "eval/gold mean", "eval/gold n"]].tolist() == pytest.approx(
        [1.5, 0.35, 2]
    )
    assert 0.3 <= front.loc[("ppo", 10), "eval/gold lo"] <= 0.35 <= front.loc[("ppo", 10), "eval/gold hi"] <= 0.4
    assert front.index.tolist() == [("dpo", 0), ("dpo", 10), ("dpo", 20), ("ppo", 0), ("ppo", 10), ("ppo", 20)]


def test_first_crossing_interpolates_the_first_reach():
    assert M.first_crossing([0, 1, 3], [0.1, 0.3, 0.5], 2) == pytest.approx(0.4)  # halfway from KL 1 to 3
    assert M.first_crossing([0, 1, 3], [0.1, 0.3, 0.5], 0) == pytest.approx(0.1)  # starts there
    assert math.isnan(M.first_crossing([0, 1, 3], [0.1, 0.3, 0.5], 3.5))  # never reached
    # Not monotone: the first time the track reaches 1.5 is between points 0 and 1, not 2 and 3.
    assert M.first_crossing([0, 2, 1, 3], [0, 10, 20, 30], 1.5) == pytest.approx(7.5)


def test_spikes_against_rolling_median_and_mad():
    x = [1, 2] * 5 + [10, 2, 1.5]
    # At index 10 the previous 10 values have median 1.5 and MAD 0.5: threshold 1.5 + 5 * 1.4826 * 0.5 = 5.21.
    # At 11 the window holds the 10 itself: median 2, MAD 0.5 -> threshold 5.71, and 2 is below it.
    assert np.flatnonzero(M.spikes(x, window=10, k=5)).tolist() == [10]
    assert not M.spikes([100, 1, 1, 1], window=3, k=5).any()  # no full window before index 3's check of 1


def test_headline_metrics_by_hand(tmp_path):
    runs = load_runs(gold_profile(tmp_path))
    trained = runs.evals(["ppo", "dpo"])
    assert M.common_reach(trained, "eval/kl") == 2  # max KLs 3, 4, 6, 2
    assert M.common_reach(trained, "eval/gold") == pytest.approx(0.4)  # max golds 0.5, 0.4, 0.8, 0.7
    trained = M.with_earlier_stages(trained, M.earlier_stages(runs.runs, runs.timings))
    values = M.PromptValues(runs.prompts)
    at = M.gold_at_levels(trained, values, [2.0, 1.0])
    per_run = M.per_run_headline(trained, at, [2.0, 1.0], 0.4).set_index(["method", "seed"])
    # gold at KL 2: ppo1 .4, dpo0 .6, dpo1 .7 at measured points; ppo0 read between (1, .3) and (3, .5) by the cubic
    ppo0 = float(S.gold_at_kl([0, 1, 3], [0.1, 0.3, 0.5], 2.0))
    assert per_run["gold at KL 2"].to_dict() == pytest.approx(
        {("dpo", 0): 0.6, ("dpo", 1): 0.7, ("ppo", 0): ppo0, ("ppo", 1): 0.4}
    )
    assert 0.4 < ppo0 < 0.5 and per_run.loc[("dpo", 1), "gold at KL 1"] == pytest.approx(
        S.gold_at_kl([0, 1, 2], [0.1, 0.2, 0.7], 1.0)
    )
    assert per_run["reached KL 2"].all()
    # seconds to gold .4, from the start of the earlier stages (PPO: the RM's 50 s; DPO: pi_ref's pass, 10 s): ppo0
    # halfway 100..200 s -> 150 + 50; ppo1 at 100 + 50; dpo0 0.1->0.6 over 0..100 -> 60 + 10; dpo1 0.2->0.7 over
    # 100..200 -> 140 + 10.
    assert per_run["seconds to target gold"].to_dict() == pytest.approx(
        {("dpo", 0): 70, ("dpo", 1): 150, ("ppo", 0): 200, ("ppo", 1): 150}
    )
    # FLOPs likewise: ppo0 halfway 1e9..2e9 + the RM's 5e8; dpo1 1.4e9 + pi_ref's 2e8
    assert per_run.loc[("ppo", 0), "training FLOPs to target gold"] == pytest.approx(2.0e9)
    assert per_run.loc[("dpo", 1), "training FLOPs to target gold"] == pytest.approx(1.6e9)
    head = M.headline_summary(per_run.reset_index(), at, [2.0, 1.0]).set_index("method")
    # DPO: mean 0.65 of (.6, .7), sd √0.005; its t-interval over 2 runs: 0.65 ± t(0.975; 1)·0.05 = ± 12.706·0.05
    dpo = head.loc["dpo"]
    assert (dpo["gold at KL 2 mean"], dpo["gold at KL 2 std"]) == pytest.approx((0.65, math.sqrt(0.005)))
    assert (dpo["gold at KL 2 lo"], dpo["gold at KL 2 hi"]) == pytest.approx((0.65 - 0.6353, 0.65 + 0.6353), abs=1e-4)
    verdict = M.verdict(at, ("ppo", 0.1), ("dpo", 0.1), [2.0, 1.0], worded=True)
    first = verdict.iloc[0]
    from scipy.stats import ttest_ind  # without per-prompt values: Welch's test of the per-run values

    ref = ttest_ind([ppo0, 0.4], [0.6, 0.7], equal_var=False)
    assert (first["difference"], first["lo"], first["hi"], first["p"]) == pytest.approx(
        ((ppo0 + 0.4) / 2 - 0.65, *ref.confidence_interval(0.95), ref.pvalue)
    )
    # 2 seeds each: a difference of −0.22 is not resolved (the percentile bootstrap called it "DPO ahead")
    assert first["verdict"].startswith("Not distinguishable at 2 PPO and 2 DPO seeds")
    assert verdict.iloc[1]["verdict"].startswith("A secondary level: shown without words")
    assert (first["seeds a"], first["reached a"], first["seeds b"], first["reached b"]) == (2, 2, 2, 2)
    unregistered = M.verdict(at, ("ppo", 0.1), ("dpo", 0.1), [2.0, 1.0], worded=False).iloc[0]
    assert unregistered["verdict"].startswith("No verdict: no KL level was fixed before these runs")
    power = M.power(first).set_index("difference")
    assert power.loc["0.1", "seeds per method"] == S.seeds_for_power(0.1, first["sd a"], first["sd b"])
    assert power.loc["0.05", "seeds per method"] >= power.loc["0.1", "seeds per method"]
    lower = power.loc["0.1", "if the sds are at their lower limits"]
    upper = power.loc["0.1", "if at their upper limits"]
    assert lower <= power.loc["0.1", "seeds per method"] <= upper


def test_overoptimisation_heldout_and_costs_by_hand(tmp_path):
    runs = load_runs(gold_profile(tmp_path))
    gains = M.overoptimisation(runs.evals(["ppo"])).set_index(["seed", "step"])
    # ppo0 at step 20: d = √3, proxy (3 - 0) / 2 = 1.5 std, gold (0.5 - 0.1) / 0.5 = 0.8 std.
    assert gains.loc[(0, 20), ["d", "proxy gain", "gold gain"]].tolist() == pytest.approx([math.sqrt(3), 1.5, 0.8])
    fits = M.gao_fits(gains).set_index("reward")
    assert fits.loc["gold", "points"] == 6 and fits.loc["gold", "form"] == "R(d) = d(α − β log d)"
    scores = M.heldout_scores(M.final_evals(runs.evals()), runs.runs)
    # the two PPO seeds share one reward model: its held-out accuracy counts once
    assert len(scores[(scores["method"] == "ppo") & (scores["scorer"] == M.SCORERS["rm"])]) == 1
    by = scores.groupby(["method", "scorer"])["accuracy"].mean()
    assert by[("dpo", M.SCORERS["implicit"])] == pytest.approx(0.65) and by[("ppo", M.SCORERS["rm"])] == 0.7
    assert by[("reference", M.SCORERS["gold"])] == 0.9
    costs = M.stage_costs(runs.timings).set_index(["method", "stage"])
    assert costs.loc[("reward_model", "reward_model"), ["seconds", "flops"]].tolist() == [50, 5e8]
    assert costs.loc[("dpo", "ref_logps"), "flops"] == 2e8
    per_method = M.method_costs(runs.metrics, M.earlier_stages(runs.runs, runs.timings), runs.timings)
    per_method = per_method.set_index("method")
    # PPO: 13 train rows, the last with 1e9 * 12 FLOPs, plus the RM's training; DPO: its 5 train rows' 4e9 (eval
    # rows reach 2e9) plus pi_ref's pass; evaluation apart
    assert per_method.loc["ppo", ["own loop FLOPs", "earlier stages FLOPs", "training FLOPs"]].tolist() == [
        12e9,
        5e8,
        12.5e9,
    ]
    assert per_method.loc["ppo", "end-to-end seconds"] == 1200 + 50
    assert per_method.loc["dpo", ["training FLOPs", "evaluation FLOPs"]].tolist() == [4.2e9, 3e7]
    assert per_method.loc["reward_model", "training FLOPs"] == 0  # its own loop logged 0; nothing before it


def test_spike_counts_and_series_summary(tmp_path):
    runs = load_runs(gold_profile(tmp_path))
    flagged = M.flag_spikes(runs.train(["ppo", "dpo"]), ["grad_norm", "loss"], window=10, k=5)
    counts = M.spike_counts(flagged).set_index(["method", "seed", "series"])["spikes"]
    assert counts[("ppo", 0, "grad_norm")] == 1 and counts[("dpo", 0, "loss")] == 0  # the 50 after 1,2,1,2...
    summary = M.series_summary(runs.train(["dpo"]), ["logps/chosen", "logps/rejected"]).set_index(["seed", "series"])
    assert summary.loc[(0, "logps/rejected"), ["first", "last"]].tolist() == [-10, -18]


# --- the report end to end ----------------------------------------------------------------------------------


def assert_page_complete(out):
    page = (out / "index.html").read_text()
    images = re.findall(r"<img src=\"([^\"]+)\"", page)
    assert images, "the page shows no plot"
    for name in images:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name
    assert (out / "summary.md").read_text().startswith("# PPO vs DPO")
    return page, images


def test_report_on_a_gold_task(tmp_path):
    out = run_report(tmp_path, gold_profile(tmp_path))
    page, images = assert_page_complete(out)
    assert {
        "frontier.png",
        "curves.png",
        "heldout.png",
        "overoptimisation.png",
        "seeds.png",
        "health.png",
        "cost.png",
    } == set(images)
    assert page.index("Verdict: PPO vs DPO") < page.index("frontier.png") < page.index("Headline")  # the verdict first
    head = pd.read_csv(out / "headline.csv")
    assert set(head["method"]) == {"reference", "ppo", "dpo"}
    assert head.set_index("method").loc["dpo", "gold at KL 2 mean"] == pytest.approx(0.65)
    # no level fixed in the profile: the largest KL every PPO and DPO run reaches, and no words
    assert "KL levels 2, 1, 0.5 nats per sequence (not fixed in advance" in page
    assert "Target gold reward = 0.4 (" in page
    assert "No verdict: no KL level was fixed before these runs" in page
    assert {"seconds to target gold mean", "training FLOPs to target gold mean"} <= set(head)
    assert not any("tokens" in column for column in head)  # compute is counted in FLOPs, alike for every method
    cost = pd.read_csv(out / "cost.csv").set_index(["method", "stage"])
    assert cost.loc[("dpo", "ref_logps"), "flops"] == 2e8 and cost.loc[("reward_model", "reward_model"), "flops"] == 5e8
    assert pd.read_csv(out / "cost_per_method.csv").set_index("method").loc["ppo", "training FLOPs"] == 12.5e9
    assert "f" * 64 in page and "x86_64" in page  # provenance: data sha256 and machine
    assert pd.read_csv(out / "spikes.csv")["spikes"].sum() == 2  # one grad-norm spike per PPO seed


def test_report_puts_the_baselines_on_the_frontier_and_in_the_headline(tmp_path):
    out = run_report(tmp_path, with_baselines(gold_profile(tmp_path)))
    page, _ = assert_page_complete(out)
    every = {"reference", "ppo", "ppo-gt", "dpo", "dpo-ipo", "bon", "preferred-ft"}
    assert set(pd.read_csv(out / "frontier.csv")["method"]) == every - {"reference"}  # π_ref is each one's origin
    head = pd.read_csv(out / "headline.csv")
    assert head["method"].tolist() == ["reference", "ppo", "ppo-gt", "dpo", "dpo-ipo", "bon", "preferred-ft"]
    head = head.set_index("method")
    # The level stays 2 (no level in the profile: the PPO and DPO runs' common reach). Best of N's bound passes 2
    # between N = 16 (1.830, gold 0.5) and N = 64 (3.175, gold 0.6); Preferred-FT between (0.5, 0.2) and (3, 0.3).
    b16, b64 = math.log(16) - 15 / 16, math.log(64) - 63 / 64
    assert "KL levels 2, 1, 0.5 nats" in page
    bound = [math.log(n) - (n - 1) / n for n in (1, 4, 16, 64)]
    assert head.loc["bon", "gold at KL 2 mean"] == pytest.approx(S.gold_at_kl(bound, [0.1, 0.3, 0.5, 0.6], 2))
    assert b16 < 2 < b64 and 0.5 < head.loc["bon", "gold at KL 2 mean"] < 0.6
    assert head.loc["preferred-ft", "gold at KL 2 mean"] == pytest.approx(S.gold_at_kl([0, 0.5, 3], [0.1, 0.2, 0.3], 2))
    assert head.loc["ppo-gt", "gold at KL 2 mean"] == pytest.approx(0.9)
    assert head.loc["bon", "final eval/gold_sem mean"] == 0.05  # a single run's interval is its sampling error
    assert "upper bound log N − (N−1)/N" in page and "Baselines not run" not in page
    # Legend names in the tables; the CSVs keep the run-directory ids. Best of N has no training curve.
    summary = (out / "summary.md").read_text()
    for label in ("PPO-GT", "IPO", "Best of N (KL: upper bound)", "Preferred-FT", "π_ref"):
        assert f"| {label} |" in summary, label
    assert set(pd.read_csv(out / "final_spread.csv")["method"]) == {"ppo", "ppo-gt", "dpo", "dpo-ipo", "preferred-ft"}


def test_frontier_figure_has_legend_names_intervals_and_the_origin(tmp_path):
    from analysis import plots as P
    from analysis.report import frontier_section

    runs = load_runs(with_baselines(gold_profile(tmp_path)))
    plot = frontier_section(runs, "eval/gold", "gold reward [VADER]").plot
    (ax,) = plot.figure.axes
    handles, labels = ax.get_legend_handles_labels()
    assert labels == ["PPO", "PPO-GT", "DPO", "IPO", "Best of N (KL: upper bound)", "Preferred-FT", "π_ref (origin)"]
    bars = {c.get_label(): c for c in ax.containers}
    assert bars["Best of N (KL: upper bound)"].lines[0].get_linestyle() == "--"
    assert bars["DPO"].lines[0].get_linestyle() == "-"
    # PPO: seed means joined along training, at steps 0, 10, 20: KL (0, 1.5, 3.5), gold (0.1, 0.35, 0.45), with bars
    # in both directions (2 seeds: KL 1 and 2 at step 10)
    ppo = bars["PPO"]
    assert ppo.has_xerr and ppo.has_yerr
    assert ppo.lines[0].get_xydata().ravel().tolist() == pytest.approx([0, 0.1, 1.5, 0.35, 3.5, 0.45])
    x_bars, y_bars = (collection.get_segments() for collection in ppo.lines[2])
    assert x_bars[1][1][0] - x_bars[1][0][0] > 0 and y_bars[1][1][1] - y_bars[1][0][1] > 0
    assert bars["π_ref (origin)"].lines[0].get_xydata().tolist() == [[0.0, 0.1]]  # one run-level point: no bar
    P.plt.close(plot.figure)


def test_configured_comparison_levels_and_their_validation(tmp_path):
    out = run_report(
        tmp_path, gold_profile(tmp_path), overrides=["report.kl_levels=[1, 0.5]", "report.target_gold=0.3"]
    )
    head = pd.read_csv(out / "headline.csv").set_index("method")
    # At KL 1: ppo0 0.3 (a point), ppo1 between (0, .1) and (2, .4) by the cubic in √KL. Gold .3: ppo0 at 100 s,
    # ppo1 two thirds of the way from 0 to 100 s.
    assert head.loc["ppo", "gold at KL 1 mean"] == pytest.approx(
        (0.3 + S.gold_at_kl([0, 2, 4], [0.1, 0.4, 0.4], 1)) / 2
    )
    assert head.loc["ppo", "seconds to target gold mean"] == pytest.approx((100 + 200 / 3) / 2 + 50)  # + the RM
    page = (out / "index.html").read_text()
    assert "KL levels 1, 0.5 nats per sequence (the primary level, fixed in the profile before these runs" in page
    verdict = pd.read_csv(out / "verdict.csv")
    assert verdict["KL level"].tolist() == [1, 0.5] and verdict["primary"].tolist() == [True, False]
    assert verdict["verdict"].iloc[0].startswith(("PPO ahead", "DPO ahead", "Not distinguishable"))
    with pytest.raises(UserError, match="report.spike_window"):
        load_config("tiny", ["report.spike_window=2"])
    with pytest.raises(UserError, match="report.matched_kl.*it is now 'report.kl_levels"):
        load_config("tiny", ["report.matched_kl=4"])  # an old config is told where the key went


def test_report_on_a_task_without_gold(tmp_path):
    p = tmp_path / "runs" / "nogold"
    write_run(p, "reference", 1234, [ev(0.0)])
    write_run(
        p,
        "ppo",
        0,
        [
            ev(k, **{"eval/proxy": x, "eval/proxy_std": 1.0, "heldout/rm_accuracy": 0.6, "heldout/rm_margin": 0.2})
            for k, x in ((0, 0), (1, 1), (2, 1.5))
        ],
    )
    write_run(
        p,
        "dpo",
        0,
        [ev(k, **{"heldout/implicit_accuracy": a, "heldout/implicit_margin": 0.1}) for k, a in ((0, 0.5), (1, 0.6))],
    )
    write_run(
        p,
        "bon",
        1234,
        [
            {"eval/kl": math.log(n) - (n - 1) / n, "eval/proxy": x, "eval/proxy_sem": 0.1, "step": n}
            for n, x in ((1, 0.0), (4, 0.8))
        ],
    )
    out = run_report(tmp_path, p, base_profile="hh")
    page, _ = assert_page_complete(out)
    assert "no gold reward" in page and "Best of N: one row per N" in page
    assert set(pd.read_csv(out / "frontier.csv")["method"]) == {"ppo", "bon"}  # by the proxy: DPO has none
    assert (
        "Baselines not run, so absent from the frontier and the headline: Preferred-FT "
        "(<code>make preferred-ft</code>)."
    ) in page
    head = pd.read_csv(out / "headline.csv").set_index("method")
    assert set(head.index) == {"reference", "ppo", "dpo", "bon"} and not any(c.startswith("gold at KL") for c in head)
    assert head.loc["dpo", "final heldout/implicit_accuracy mean"] == pytest.approx(0.6)


def test_bad_and_unfinished_runs_are_named_and_left_out(tmp_path):
    p = gold_profile(tmp_path)
    huge = [ev(k, 99.0) for k in (0, 1, 2)]  # would move every aggregate if it were mixed in
    truncated = write_run(p, "dpo", 7, huge, run_id="truncated-run")
    with open(truncated / "metrics.jsonl", "a") as f:
        f.write('{"kind": "eval", "step": 30, "eval/g')
    (write_run(p, "dpo", 8, huge, run_id="no-timings-run") / "timings.json").unlink()
    (write_run(p, "ppo", 9, huge, run_id="no-manifest-run") / "manifest.json").unlink()
    write_run(p, "dpo", 10, huge, status="failed", run_id="failed-run")
    write_run(p, "ppo", 11, huge, status="running", run_id="killed-run")
    diverged = write_run(p, "ppo", 12, huge, status="diverged", run_id="diverged-run")
    manifest = json.loads((diverged / "manifest.json").read_text())
    error = "Diverged: PPO iteration 3: reward is nan"
    (diverged / "manifest.json").write_text(json.dumps({**manifest, "error": error}))
    out = run_report(tmp_path, p)
    assert_page_complete(out)
    excluded = pd.read_csv(out / "runs_excluded.csv").set_index("run_id")["reason"]
    assert "truncated" in excluded["truncated-run"] and "line(s) 4" in excluded["truncated-run"]
    assert excluded["no-timings-run"] == "missing timings.json"
    assert excluded["no-manifest-run"] == "missing manifest.json"
    assert excluded["failed-run"] == "status failed: RuntimeError: loss is nan"
    assert excluded["killed-run"] == "status running"
    assert excluded["diverged-run"] == "status diverged: Diverged: PPO iteration 3: reward is nan"
    page = (out / "index.html").read_text()
    assert all(name in page for name in excluded.index)
    assert (
        "Diverged: ppo seed 12 (β 0.1) stopped at a non-finite training quantity: PPO iteration 3: reward is nan"
        in page
    )  # named under stability, not only in the provenance table
    head = pd.read_csv(out / "headline.csv").set_index("method")
    assert head.loc["dpo", "final eval/gold mean"] == pytest.approx(0.75)  # (0.8 + 0.7) / 2: only good runs
    assert head.loc["dpo", "final eval/gold n"] == 2


def test_a_seed_run_twice_counts_once_the_latest_kept_and_said(tmp_path):
    """Issue #20, item 0: two complete runs of one method, beta and seed (a rerun with resume=false) are one seed, not
    two: the latest to finish is kept, the other left out naming it."""
    p = gold_profile(tmp_path)
    write_run(
        p,
        "dpo",
        0,
        [ev(0, 0.1), ev(2, 0.9)],
        run_id="20261126T000000-beta0.1-seed0",
        finished_at="2026-11-26T01:00:00+00:00",
    )
    write_run(
        p,
        "reference",
        1234,
        [ev(0.0, 0.3)],
        run_id="20261126T000000-beta0.1-seed1234",
        finished_at="2026-11-26T01:00:00+00:00",
    )
    out = run_report(tmp_path, p)
    head = pd.read_csv(out / "headline.csv").set_index("method")
    dpo = head.loc["dpo"]
    assert dpo["final eval/gold n"] == 2 and dpo["final eval/gold mean"] == pytest.approx(0.8)  # (0.9 + 0.7) / 2
    assert head.loc["reference", "final eval/gold mean"] == pytest.approx(0.3)  # pi_ref's rerun alone
    excluded = pd.read_csv(out / "runs_excluded.csv").set_index(["method", "run_id"])["reason"]
    for method, seed, kept in (
        ("dpo", 0, "20261126T000000-beta0.1-seed0"),
        ("reference", 1234, "20261126T000000-beta0.1-seed1234"),
    ):
        assert excluded[(method, f"20261125T000000-beta0.1-seed{seed}")].startswith(
            f"superseded by {kept}, a later complete run of {method} with β 0.1 and seed {seed}"
        )
    assert len(excluded) == 2 and "superseded by" in (out / "index.html").read_text()


def test_report_with_only_dpo_says_what_is_missing(tmp_path):
    p = tmp_path / "runs" / "onlydpo"
    write_run(p, "dpo", 0, [ev(0, 0.1), ev(1, 0.3)], train=[{"loss": 0.6, "grad_norm": 1.0}])
    stale = tmp_path / "reports" / "onlydpo" / "overoptimisation.png"  # from an earlier report with PPO runs
    stale.parent.mkdir(parents=True)
    stale.write_bytes(PNG_MAGIC)
    out = run_report(tmp_path, p)
    assert not stale.exists()
    page, images = assert_page_complete(out)
    assert "No completed PPO run" in page and "No completed reference run" in page
    assert (
        "Baselines not run, so absent from the frontier and the headline: PPO-GT (<code>make ppo-gt</code>), Best of N"
    ) in page
    assert "overoptimisation.png" not in images and "Not drawn: no PPO or Best-of-N eval points" in page
    assert pd.read_csv(out / "headline.csv")["method"].tolist() == ["dpo"]


class _Text(HTMLParser):
    """The words a browser shows: every text node outside <style> and <script>."""

    def __init__(self):
        super().__init__()
        self.hidden, self.words = 0, []

    def handle_starttag(self, tag, attrs):
        self.hidden += tag in ("style", "script")

    def handle_endtag(self, tag):
        self.hidden -= tag in ("style", "script")

    def handle_data(self, data):
        if not self.hidden:
            self.words.append(data)


def shown_text(page: str) -> str:
    reader = _Text()
    reader.feed(page)
    return "".join(reader.words)


@pytest.mark.parametrize("overrides", [["report.kl_levels=[1, 0.5]"], []], ids=["verdict", "no verdict"])
def test_the_page_shows_rendered_markdown_and_opens_with_the_verdict_the_frontier_and_one_table(tmp_path, overrides):
    out = run_report(tmp_path, with_baselines(gold_profile(tmp_path)), overrides=overrides)
    page = (out / "index.html").read_text()
    text = shown_text(page)
    # Markdown's marks are rendered, never shown: bold, code, table rules, headings
    assert "**" not in text and "`" not in text
    assert not re.search(r"\|\s*:?-{3}", text) and not re.search(r"^\s*#", text, re.M)
    assert "<strong>PPO − DPO = " in page and "<code>make coverage</code>" in page and "<th>method</th>" in page
    # The first screen: the verdict sentence, then the frontier figure, then one small table, and nothing else drawn
    start = page.index("<h2")
    first = page[start : page.index("<h2", start + 1)]
    verdict = first.index("PPO − DPO = ")
    assert re.findall(r"<img[^>]+src=['\"]([^'\"]+)['\"]", first) == ["frontier.png"] and first.count("<table") == 1
    assert verdict < first.index("<img") < first.index("<table")
    assert ("No verdict" in first[verdict : first.index("<img")]) == (not overrides)


def test_report_with_no_runs_at_all_still_writes_the_page(tmp_path):
    out = run_report(tmp_path, tmp_path / "runs" / "empty")
    assert "nothing to compare yet" in (out / "index.html").read_text()


def _budget_profile(root, dpo_passes, rm_paths):
    """PPO x2 seeds against `rm_paths`, DPO x2 seeds: PPO with its reward model's budget of 8 pairs x 2 passes,
    DPO with 8 pairs x `dpo_passes`."""
    p = root / "runs" / "budget"
    write_run(p, "reference", 1234, [ev(0.0, 0.1)])
    for seed, rm in enumerate(rm_paths):
        write_run(
            p,
            "ppo",
            seed,
            [ev(0, 0.1), ev(2, 0.4)],
            reward_model_path=rm,
            budget={"pairs": 8, "passes": 2, "pair_presentations": 16},
        )
        write_run(
            p,
            "dpo",
            seed,
            [ev(0, 0.1), ev(2, 0.5)],
            budget={"pairs": 8, "passes": dpo_passes, "pair_presentations": 8 * dpo_passes},
        )
    return load_runs(p)


def test_headline_says_equal_budget_and_what_each_spread_includes(tmp_path):
    runs = _budget_profile(tmp_path, 2, ["rm/seed0", "rm/seed1"])
    cfg = load_config("tiny", [])
    headline = headline_section(runs, cfg, has_gold=True)
    (note,) = [n for n in headline.notes if "budget" in n.lower()]
    assert note.startswith("Equal budget") and "PPO 8 pairs × 2 passes = 16 pair presentations" in note
    budget = {t.name: t.frame for t in headline.tables}["budget"]
    assert budget[["method", "pair presentations", "runs"]].values.tolist() == [["ppo", "16", 2], ["dpo", "16", 2]]
    (seeds, _) = stability_sections(runs, cfg, "eval/gold", "gold")
    assert any("PPO's spread includes stage 1's" in n for n in seeds.notes)


def test_an_unequal_budget_and_a_shared_reward_model_are_flagged(tmp_path):
    runs = _budget_profile(tmp_path, 1, ["rm/shared", "rm/shared"])
    cfg = load_config("tiny", [])
    (note,) = [n for n in headline_section(runs, cfg, has_gold=True).notes if "budget" in n.lower()]
    assert note.startswith("**Unequal budget**")
    assert "PPO 8 pairs × 2 passes = 16 pair presentations; DPO 8 pairs × 1 passes = 8 pair presentations" in note
    (seeds, _) = stability_sections(runs, cfg, "eval/gold", "gold")
    assert any("leaves out stage 1's variance: 2 PPO runs share the reward model rm/shared" in n for n in seeds.notes)


def test_sweep_runs_are_left_out_and_differently_evaluated_runs_are_never_pooled(tmp_path):
    p = tmp_path / "runs" / "pool"
    same = {"hash": "a" * 16, "split": "test", "temperature": 1.0}
    write_run(p, "ppo", 0, [ev(0, 0.1), ev(2, 0.4)], eval_settings=same)
    write_run(p, "dpo", 0, [ev(0, 0.1), ev(2, 0.5)], eval_settings=same)
    write_run(p, "dpo", 1, [ev(0, 0.1), ev(2, 0.9)], eval_settings={**same, "split": "validation"})
    runs = load_runs(p)
    (swept,) = runs.runs[runs.runs["seed"] == 1].to_dict("records")
    assert not swept["included"] and "validation prompts" in swept["reason"]
    assert set(runs.evals()["seed"]) == {0}  # the report reads only runs evaluated on the test prompts
    other = write_run(p, "dpo", 2, [ev(0, 0.1), ev(2, 0.5)], eval_settings={**same, "hash": "b" * 16})
    with pytest.raises(
        UserError,
        match=rf"runs .*seed0 and {other} were evaluated with different settings "
        rf"\(eval hash a{{16}} vs b{{16}}",
    ):
        load_runs(p)


def test_a_beta_that_does_not_mean_dpos_is_flagged(tmp_path):
    p = tmp_path / "runs" / "beta"
    write_run(p, "ppo", 0, [ev(0, 0.1), ev(2, 0.4)], kl_control={"adaptive": True, "rollout_temperature": 1.0})
    write_run(p, "ppo", 1, [ev(0, 0.1), ev(2, 0.4)], kl_control={"adaptive": False, "rollout_temperature": 0.7})
    write_run(p, "dpo", 0, [ev(0, 0.1), ev(2, 0.5)], eval_settings={"hash": None, "split": "test", "temperature": 0.9})
    write_run(p, "dpo", 1, [ev(0, 0.1), ev(2, 0.5)])
    notes = [
        n for n in headline_section(load_runs(p), load_config("tiny", []), has_gold=True).notes if "β not matched" in n
    ]
    assert [n.split(" ran with ")[1].split(", so")[0] for n in notes] == [
        "evaluation at temperature 0.9 (eval.temperature)",
        "an adaptive KL coefficient (ppo.adaptive_kl)",
        "rollouts at temperature 0.7 (ppo.temperature)",
    ]


def test_curves_are_drawn_over_flops_and_seconds_from_the_start_never_over_steps(tmp_path):
    from matplotlib.colors import same_color

    from analysis import plots as P
    from analysis.report import curves_section
    from rlhf.methods import METHODS

    plot = curves_section(load_runs(gold_profile(tmp_path)), {"eval/gold": "gold reward [VADER]"}).plot
    flops_ax, seconds_ax = plot.figure.axes
    assert (flops_ax.get_xlabel(), seconds_ax.get_xlabel()) == (P.COST_AXES[M.FLOPS], P.COST_AXES[M.SECONDS])

    # PPO's first eval point sits where its reward model's training ends, DPO's after pi_ref's pass
    def start(ax, method):
        colour = METHODS[method].colour
        return min(x for line in ax.lines if same_color(line.get_color(), colour) for x in line.get_xdata())

    for ax, ppo_start, dpo_start in ((flops_ax, 5e8, 2e8), (seconds_ax, 50, 10)):
        assert (start(ax, "ppo"), start(ax, "dpo")) == (ppo_start, dpo_start)
    P.plt.close(plot.figure)


def test_an_online_method_that_stops_short_never_moves_the_verdict(tmp_path):
    """RLOO stopping short of the primary level counts with its last eval point in `verdict_causes` (reached by 0 of
    2); the PPO − DPO verdict does not move; the four-way table's words come from Holm-adjusted p-values."""
    p = gold_profile(tmp_path)
    levels = ["report.kl_levels=[2, 1]"]
    before = pd.read_csv(run_report(tmp_path, p, overrides=levels) / "verdict.csv")
    for seed in (0, 1):
        write_run(p, "rloo", seed, [ev(k, g) for k, g in ((0, 0.1), (0.5, 0.2), (1, 0.3 + 0.05 * seed))])
    out = run_report(tmp_path, p, overrides=levels)
    after = pd.read_csv(out / "verdict.csv")
    pd.testing.assert_frame_equal(before, after)
    causes = pd.read_csv(out / "verdict_causes.csv").set_index("comparison")
    assert set(causes["KL level"]) == {2} and {"PPO − DPO", "RLOO − DPO", "PPO − RLOO"} == set(causes.index)
    rloo = causes.loc["RLOO − DPO"]
    assert (rloo["reached a"], rloo["seeds a"]) == (0, 2)
    assert rloo["difference"] == pytest.approx((0.3 + 0.35) / 2 - 0.65)  # RLOO at its last points
    assert causes["Holm p"].tolist() == pytest.approx(S.holm(causes["p"].to_numpy()).tolist())
    assert all("Holm-adjusted p = " in words for words in causes["verdict"])
    assert "reached by RLOO 0 of 2" in (out / "summary.md").read_text()
