"""`make sweep`: the tuning protocol runs its grid on the validation prompts only, in a runs directory of its own."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from analysis import stats as S
from pipelines.sweep import choose, compare_with_chosen, grid, shared_budget, verdict_levels
from rlhf.config import PROJECT_ROOT, load_config
from rlhf.errors import UserError
from rlhf.tasks import load_task


def test_dpo_sweep_on_tiny_judges_every_point_on_validation_prompts_only(tmp_path, tokenizer):
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    overrides = [
        f"runs_dir={runs}",
        f"report.out_dir={reports}",
        "task.n_validation_prompts=6",
        "sweep.learning_rates=[1e-4,1e-3]",
        "sweep.epochs=[1]",
        "sweep.ppo_epochs=[1]",
        "sweep.rloo_generations=[2]",
        "sweep.online_dpo_step_factors=[1]",
    ]
    _sweep("dpo", overrides)
    table = pd.read_csv(reports / "tiny" / "sweep-dpo.csv")
    assert table["dpo.learning_rate"].tolist() == [1e-4, 1e-3] and (table["chosen"] == "←").sum() == 1
    assert table.loc[table["chosen"] == "←", "eval/gold"].item() == table["eval/gold"].max()
    task = load_task(load_config("tiny", overrides).task, tokenizer)
    for run_dir in table["run_dir"]:
        manifest = json.loads((tmp_path / run_dir / "manifest.json").read_text())
        assert manifest["eval_settings"]["split"] == "validation" and str(runs / "sweep") in run_dir
        prompts = {
            json.loads(line)["prompt"]
            for f in (tmp_path / run_dir / "samples").glob("*.jsonl")
            for line in f.read_text().splitlines()
        }
        assert prompts and prompts <= set(task.validation_prompts)  # never a test prompt
    assert not (runs / "tiny" / "dpo").exists()  # the profile's own runs directory holds no sweep run

    again = _sweep("dpo", overrides)  # run again (or after a kill): completed points are reused, not trained twice
    assert again.stdout.count("completed before, reused") == 2
    pd.testing.assert_frame_equal(pd.read_csv(reports / "tiny" / "sweep-dpo.csv"), table)


def _sweep(method: str, overrides: list[str]) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "pipelines", "sweep", "--profile", "tiny", f"sweep.method={method}", *overrides],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.parametrize("method", ["reward_model", "ppo", "rloo", "online-dpo"])
def test_a_sweep_run_again_reuses_its_completed_points(tmp_path, method):
    overrides = [
        f"runs_dir={tmp_path / 'runs'}",
        f"report.out_dir={tmp_path / 'reports'}",
        "task.n_validation_prompts=6",
        "sweep.learning_rates=[1e-4]",
        "sweep.epochs=[1]",
        "sweep.ppo_epochs=[1]",
        "sweep.rloo_generations=[2]",
        "sweep.online_dpo_step_factors=[2]",
    ]
    _sweep(method, overrides)
    runs = sorted((tmp_path / "runs" / "sweep" / "tiny").glob("*/*/manifest.json"))
    table = pd.read_csv(tmp_path / "reports" / "tiny" / f"sweep-{method}.csv")
    assert "completed before, reused" in _sweep(method, overrides).stdout
    assert sorted((tmp_path / "runs" / "sweep" / "tiny").glob("*/*/manifest.json")) == runs  # nothing trained again
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "reports" / "tiny" / f"sweep-{method}.csv"), table)


def test_grids_have_equal_sizes_and_the_choice_respects_max_kl():
    cfg = load_config(
        "tiny",
        [
            "sweep.method=ppo",
            "sweep.learning_rates=[1e-5,3e-5]",
            "sweep.ppo_epochs=[1,2,4]",
            "sweep.epochs=[1,2,3]",
            "sweep.rloo_generations=[2,4,8]",
            "sweep.online_dpo_step_factors=[1,2,4]",
        ],
    )
    assert grid(cfg) == [{"ppo.learning_rate": lr, "ppo.ppo_epochs": n} for lr in (1e-5, 3e-5) for n in (1, 2, 4)]
    dpo = cfg.with_values({"sweep.method": "dpo"})
    assert len(grid(dpo)) == len(grid(cfg)) and {"budget.epochs", "dpo.learning_rate"} == set(grid(dpo)[0])
    with pytest.raises(UserError, match="sweep.ppo_epochs.*same number of points"):
        load_config("tiny", ["sweep.ppo_epochs=[1]", "sweep.epochs=[1,2]"])
    with pytest.raises(UserError, match="sweep.rloo_generations.*same number of points"):
        load_config("tiny", ["sweep.rloo_generations=[2]", "sweep.epochs=[1,2]", "sweep.ppo_epochs=[1,2]"])
    table = pd.DataFrame({"eval/gold": [0.2, 0.9, 0.5], "eval/kl": [1.0, 9.0, 3.0]})
    assert choose(table, cfg) == 1 and choose(table, cfg.with_values({"sweep.max_kl": 5.0})) == 2
    assert choose(table, cfg.with_values({"sweep.max_kl": 0.5})) is None


def test_every_point_is_compared_with_the_chosen_one_by_a_stated_interval(tmp_path):
    """The reward model's accuracies by the unpaired normal interval, PPO's and DPO's final gold paired over the
    validation prompts; a point over the KL cap is named as such, not compared."""
    cfg = load_config("tiny", ["sweep.method=reward_model"])
    table = compare_with_chosen(pd.DataFrame({"heldout/rm_accuracy": [0.5, 0.75, 0.25]}), 1, cfg, n_pairs=16)
    se = (0.5 * 0.5 / 16 + 0.75 * 0.25 / 16) ** 0.5  # by hand: sqrt(p1 q1 / n + p2 q2 / n)
    assert table["Δ vs chosen"].tolist() == [-0.25, 0.0, -0.5]
    assert table["Δ lo"][0] == pytest.approx(-0.25 - 1.959964 * se)
    assert table["vs chosen"].tolist() == ["not distinguishable", "chosen", "below"]  # 0.25 below: se(0.25, 0.75)

    runs = []
    for i, gold in enumerate(([0.5, 0.6, 0.7, 0.8], [0.9, 0.8, 1.0, 0.9], [1.2, 0.4, 1.2, 0.6], [1.0, 1.0, 1.0, 1.0])):
        (tmp_path / str(i) / "samples").mkdir(parents=True)
        for step, scale in ((0, 0.0), (8, 1.0)):  # the last eval point is the one compared
            order = [3, 2, 1, 0] if i % 2 else [0, 1, 2, 3]  # rows in another order: paired by prompt_index
            pd.DataFrame({"prompt_index": order, "gold": [scale * gold[j] for j in order]}).to_csv(
                tmp_path / str(i) / "samples" / f"eval_step{step:06d}.prompts.csv", index=False
            )
        runs.append(str(tmp_path / str(i)))
    points = pd.DataFrame({"eval/gold": [0.65, 0.9, 0.85, 1.0], "eval/kl": [1.0, 2.0, 3.0, 9.0], "run_dir": runs})
    dpo = load_config("tiny", ["sweep.method=dpo", "sweep.max_kl=5"])
    table = compare_with_chosen(points, choose(points, dpo), dpo, n_pairs=0)
    assert table["vs chosen"].tolist() == ["below", "chosen", "not distinguishable", "KL over 5"]
    assert table["Δ vs chosen"].tolist() == pytest.approx([-0.25, 0.0, -0.05, 0.1])
    draws = S.Draws.make(4, dpo.report.bootstrap_reps, dpo.report.bootstrap_seed)
    difference = S.paired_difference([1.2, 0.4, 1.2, 0.6], [0.9, 0.8, 1.0, 0.9], draws)
    assert (table["Δ lo"][2], table["Δ hi"][2]) == difference[1:]
    assert table["Δ hi"][2] > 0 > table["Δ hi"][0]  # point 2's prompts disagree: its interval spans 0


def test_the_shared_budget_takes_the_smaller_chosen_passes_and_each_methods_best_rate_there():
    cfg = load_config("tiny", ["sweep.max_kl=10"])
    rm = pd.DataFrame(
        {
            "reward_model.learning_rate": [1e-5, 1e-5, 1e-4, 1e-4],
            "budget.epochs": [1, 2, 1, 2],
            "heldout/rm_accuracy": [0.6, 0.55, 0.5, 0.7],
        }
    )  # chooses 2 passes; at 1 pass: 1e-5
    dpo = pd.DataFrame(
        {
            "dpo.learning_rate": [1e-5, 1e-5, 1e-4, 1e-4],
            "budget.epochs": [1, 2, 1, 2],
            "eval/gold": [0.3, 0.4, 0.9, 0.95],
            "eval/kl": [2.0, 3.0, 8.0, 20.0],
        }
    )  # 1e-4 x 2: over 10
    assert shared_budget({"reward_model": rm, "dpo": dpo}, cfg) == {
        "budget.epochs": 1,
        "reward_model.learning_rate": 1e-5,
        "dpo.learning_rate": 1e-4,
    }
    both_two = dpo.assign(**{"eval/kl": [2.0, 3.0, 8.0, 9.0]})  # both choose 2 passes: each its best there
    assert shared_budget({"reward_model": rm, "dpo": both_two}, cfg) == {
        "budget.epochs": 2,
        "reward_model.learning_rate": 1e-4,
        "dpo.learning_rate": 1e-4,
    }
    assert shared_budget(
        {"reward_model": rm, "dpo": dpo.assign(**{"eval/kl": [20.0, 20.0, 20.0, 3.0]})},
        cfg.with_values({"sweep.max_kl": 5.0}),
    ) == {"budget.epochs": 2, "reward_model.learning_rate": 1e-4, "dpo.learning_rate": 1e-4}


def test_the_verdicts_levels_come_from_the_chosen_sweep_points():
    """The smaller final validation KL of PPO's and DPO's chosen points, rounded down to a whole nat, then ½ and ¼:
    on the default's sweep tables (docs/tuning.md: PPO 5.36, DPO 9.85 nats) the profile's [5, 2.5, 1.25]."""
    cfg = load_config("tiny", ["sweep.max_kl=16"])
    ppo = pd.DataFrame(
        {
            "ppo.learning_rate": [1e-5, 3e-5, 1e-4],
            "ppo.ppo_epochs": [2, 2, 2],
            "eval/gold": [0.286, 0.374, 0.355],
            "eval/kl": [2.28, 5.36, 14.03],
        }
    )
    dpo = pd.DataFrame(
        {
            "dpo.learning_rate": [1e-5, 3e-5, 1e-4],
            "budget.epochs": [1, 1, 1],
            "eval/gold": [0.370, 0.640, 0.711],
            "eval/kl": [2.68, 9.85, 27.06],
        }
    )  # 1e-4: over 16
    assert verdict_levels({"ppo": ppo, "dpo": dpo}, cfg) == [5.0, 2.5, 1.25]
    assert load_config("default").report.kl_levels == [5.0, 2.5, 1.25]  # what the profile holds
    assert verdict_levels({"ppo": ppo.assign(**{"eval/kl": [0.1, 0.74, 0.9]}), "dpo": dpo}, cfg) == [0.7, 0.35, 0.175]
    assert verdict_levels({"ppo": ppo.assign(**{"eval/kl": [20.0, 20.0, 20.0]}), "dpo": dpo}, cfg) is None


def test_the_online_methods_grids_sample_as_many_completions_at_every_point():
    """RLOO's points vary completions per prompt at the profile's completions a step; online DPO's trade prompts a
    step for steps (TRL samples one pair a prompt): every point samples what the profile's run samples, and online
    DPO's is evaluated as many times."""
    cfg = load_config("default", ["sweep.method=rloo"])
    points = grid(cfg)
    assert len(points) == len(grid(cfg.with_values({"sweep.method": "ppo"}))) == 6
    assert {p["rloo.num_generations"] for p in points} == {2, 4} and all(len(p) == 2 for p in points)
    o = cfg.online_dpo  # 16 steps of 8 prompts, eval every 4
    points = grid(cfg.with_values({"sweep.method": "online-dpo"}))
    assert len(points) == 6
    assert {(p["online_dpo.batch_size"], p["online_dpo.iterations"], p["online_dpo.eval_every"]) for p in points} == {
        (8, 16, 4),
        (4, 32, 8),
    }
    for p in points:
        assert p["online_dpo.batch_size"] * p["online_dpo.iterations"] == o.batch_size * o.iterations
        assert p["online_dpo.iterations"] // p["online_dpo.eval_every"] == o.iterations // o.eval_every
    with pytest.raises(UserError, match="sweep.online_dpo_step_factors: 3 does not divide online_dpo.batch_size"):
        grid(cfg.with_values({"sweep.method": "online-dpo", "sweep.online_dpo_step_factors": [1, 3]}))
