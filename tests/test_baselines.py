"""The DPO paper's baselines (baselines/): Best-of-N's pick and KL bound by hand and by brute force, Preferred-FT's
loss against TRL's, and `make bon` / `make preferred-ft` on tiny, judged by the run directories the analysis reads."""

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis.load import load_runs
from analysis.report import frontier_section
from baselines import kl_bound, pick_best
from baselines.preferred_ft import build_trainer
from pipelines import baselines_pipeline
from pipelines.stages import evaluate_reference
from rlhf.atomic import read_jsonl
from rlhf.config import load_config
from rlhf.data import build_preferences, load_preferences
from rlhf.errors import UserError
from rlhf.models import load_causal_lm
from rlhf.sequences import encode_completions, response_logprobs


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """One tiny preference set and pi_ref's evaluation for the module, as `make data` and `make reference` leave."""
    cfg = load_config("tiny", [f"runs_dir={tmp_path_factory.mktemp('runs')}"])
    prefs = build_preferences(cfg)
    reference = evaluate_reference(cfg)
    rows, _ = read_jsonl(reference / "metrics.jsonl")
    return cfg, prefs, rows[0]


def test_pi_refs_evaluation_run_again_is_reused_not_added(tiny_runs, capsys):
    """Issue #20, item 0: `make reference` run again adds no second pi_ref run (the report would pool both)."""
    cfg, _, _ = tiny_runs
    (first,) = (Path(cfg.runs_dir) / "tiny" / "reference").iterdir()
    assert evaluate_reference(cfg) == first
    assert f"pi_ref's evaluation reused: {first}" in capsys.readouterr().out
    assert list((Path(cfg.runs_dir) / "tiny" / "reference").iterdir()) == [first]
    again = evaluate_reference(cfg.with_values({"resume": False}))  # asked for: a new run
    assert sorted((Path(cfg.runs_dir) / "tiny" / "reference").iterdir()) == sorted([first, again])
    shutil.rmtree(again)  # the module's other tests expect one pi_ref run


def _rows(run: Path, kind: str) -> list[dict]:
    rows, bad = read_jsonl(run / "metrics.jsonl")
    assert not bad
    return [r for r in rows if r["kind"] == kind]


# --- Best-of-N ---------------------------------------------------------------------------------------------------


def test_pick_best_is_the_first_highest_score_among_the_first_n_by_brute_force():
    torch.manual_seed(0)
    scores = torch.randint(0, 5, (200, 16)).float()  # few values: many ties, which the first candidate must win
    for n in range(1, 17):
        picked = pick_best(scores, n).tolist()
        for row, j in zip(scores.tolist(), picked):
            best = max(range(n), key=lambda k: (row[k], -k))  # highest score, then the earliest
            assert j == best, (row[:n], j)


def _best_of_n_kl(cdf: torch.Tensor, n: int) -> float:
    """Exact KL(pi_BoN || pi_ref) for outcomes sorted by a reward with no ties: pi_BoN(y_i) = F_i^n - F_(i-1)^n."""
    below = torch.cat([torch.zeros(1, dtype=cdf.dtype), cdf[:-1]])
    bon, ref = cdf**n - below**n, cdf - below
    return float((bon * (bon / ref).log()).sum())


def test_kl_bound_is_log_n_minus_n_minus_1_over_n_and_bounds_the_exact_kl():
    assert kl_bound(1) == 0 and kl_bound(4) == pytest.approx(math.log(4) - 0.75)
    assert kl_bound(16) == pytest.approx(1.8350887222)
    for n in (2, 4, 16, 64):
        # A near-continuous pi_ref (10,000 equally likely responses): the bound is the KL itself.
        assert _best_of_n_kl(torch.arange(1, 10_001, dtype=torch.float64) / 10_000, n) == pytest.approx(
            kl_bound(n), abs=1e-3
        )
        # Heavy atoms (Beirami et al. 2024): two responses of mass 1/2 each. KL <= log 2, far below the bound.
        coarse = _best_of_n_kl(torch.tensor([0.5, 1.0], dtype=torch.float64), n)
        assert coarse <= math.log(2) + 1e-12 and coarse < kl_bound(n)


def test_pick_best_samples_the_best_of_n_distribution():
    """pick_best over n draws from pi_ref is the policy whose KL the bound is about: P(y_i) = F_i^n - F_(i-1)^n."""
    torch.manual_seed(1)
    pi_ref = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)  # response i has reward i: no ties
    n, draws = 3, 200_000
    candidates = torch.multinomial(pi_ref, draws * n, replacement=True).view(draws, n)
    chosen = candidates[torch.arange(draws), pick_best(candidates.double(), n)]
    cdf = pi_ref.cumsum(0)
    expected = cdf**n - torch.cat([torch.zeros(1, dtype=cdf.dtype), cdf[:-1]]) ** n
    observed = torch.bincount(chosen, minlength=4).double() / draws
    assert torch.allclose(observed, expected, atol=4e-3), (observed, expected)  # 4 standard errors at most


def test_bon_config_is_checked():
    with pytest.raises(UserError, match="bon.n"):
        load_config("tiny", ["bon.n=[4, 0]"])
    with pytest.raises(UserError, match="bon.n"):
        load_config("tiny", ["bon.n=[]"])


def test_make_bon_on_tiny(tiny_runs, monkeypatch):
    cfg, prefs, reference = tiny_runs
    rm_path = baselines_pipeline.reward_model_for(cfg, prefs, cfg.seeds[0])  # as `make ppo` leaves it

    def retrain(*args, **kwargs):
        raise AssertionError("Best-of-N retrained the reward model")

    monkeypatch.setattr("pipelines.stages.train_reward_model", retrain)
    assert baselines_pipeline.bon(cfg) == 0
    (run,) = (Path(cfg.runs_dir) / "tiny" / "bon").iterdir()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["reward_model_path"] == str(rm_path)
    evals = _rows(run, "eval")
    assert [r["step"] for r in evals] == cfg.bon.n == [1, 2, 4]
    assert [r["eval/kl"] for r in evals] == [kl_bound(n) for n in cfg.bon.n]
    # Round 0 is the evaluator's own sample of pi_ref: best of 1 is the reference's eval point.
    assert evals[0]["eval/gold"] == pytest.approx(reference["eval/gold"], abs=1e-9)
    assert evals[0]["eval/length"] == reference["eval/length"]
    # Brute force over every candidate written: per prompt the highest r_phi among the first n wins.
    candidates, _ = read_jsonl(run / "samples" / "candidates.jsonl")
    by_prompt: dict[int, list[dict]] = {}
    for c in sorted(candidates, key=lambda c: (c["prompt_index"], c["candidate"])):
        by_prompt.setdefault(c["prompt_index"], []).append(c)
    assert len(by_prompt) == cfg.eval.n_prompts and {len(c) for c in by_prompt.values()} == {4}
    for row in evals:
        winners = []
        for cands in by_prompt.values():
            best = cands[0]
            for c in cands[1 : row["step"]]:
                if c["proxy"] > best["proxy"]:
                    best = c
            winners.append(best)
        assert row["eval/gold"] == pytest.approx(sum(w["gold"] for w in winners) / len(winners), abs=1e-6)
        assert row["eval/proxy"] == pytest.approx(sum(w["proxy"] for w in winners) / len(winners), abs=1e-6)
    assert evals[-1]["eval/proxy"] > evals[0]["eval/proxy"]  # the maximum of more draws of the same scores
    assert all(a["wall_seconds"] < b["wall_seconds"] and a["tokens"] < b["tokens"] for a, b in zip(evals, evals[1:]))
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "candidates.jsonl",
        *(f"eval_step{n:06d}{suffix}" for n in cfg.bon.n for suffix in (".jsonl", ".prompts.csv")),
    ]
    # the per-prompt file of N: every prompt's chosen response, its KL the bound
    chosen = pd.read_csv(run / "samples" / f"eval_step{cfg.bon.n[-1]:06d}.prompts.csv")
    assert len(chosen) == cfg.eval.n_prompts and chosen["kl"].nunique() == 1
    assert chosen["gold"].mean() == pytest.approx(evals[-1]["eval/gold"], abs=1e-6)
    assert "sample_and_score" in json.loads((run / "timings.json").read_text())
    # The analysis reads it as its own series on the frontier.
    runs = load_runs(Path(cfg.runs_dir) / "tiny")
    assert "bon" in runs.methods
    frontier = frontier_section(runs, "eval/gold", "gold").tables[0].frame
    assert "bon" in set(frontier["method"])


# --- Preferred-FT ------------------------------------------------------------------------------------------------


def test_preferred_ft_loss_is_the_mean_nll_of_the_chosen_response_tokens(tiny_runs, tiny_path, tokenizer, tmp_path):
    cfg, prefs, _ = tiny_runs
    policy = load_causal_lm(tiny_path)
    trainer = build_trainer(cfg, policy, tokenizer, prefs.train, seed=0, output_dir=tmp_path, callbacks=[])
    n = 4
    rows = prefs.train.select(range(n)).to_dict()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    with torch.no_grad():
        loss = trainer.compute_loss(policy.eval(), batch).item()
        chosen = encode_completions(tokenizer, rows["prompt"], rows["chosen"])  # EOS appended, as TRL does
        logps = response_logprobs(policy, chosen)[0]
    assert (batch["labels"] != -100).sum() == chosen.response_mask.sum()  # the prompt is never a target
    assert loss == pytest.approx((-logps.sum() / chosen.response_mask.sum()).item(), abs=1e-4)
    assert load_preferences(cfg).sha256 == prefs.sha256  # TRL's tokenisation cache stayed out of the shared set


def test_make_preferred_ft_on_tiny(tiny_runs, tiny_path):
    cfg, _, reference = tiny_runs
    assert baselines_pipeline.preferred_ft(cfg) == 0
    (run,) = (Path(cfg.runs_dir) / "tiny" / "preferred-ft").iterdir()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["method"] == "preferred-ft"
    train, evals = _rows(run, "train"), _rows(run, "eval")
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [0, 2, 4]
    assert all(r["loss"] > 0 for r in train)
    # Step 0 is pi_ref, evaluated exactly as `make reference` does.
    assert evals[0]["eval/kl"] == 0 and evals[0]["eval/gold"] == pytest.approx(reference["eval/gold"], abs=1e-9)
    assert evals[-1]["eval/kl"] != 0
    final, ref = load_causal_lm(str(run / "checkpoints" / "final")), load_causal_lm(tiny_path)
    assert not torch.equal(final.lm_head.weight, ref.lm_head.weight)
    assert {"train", "eval", "save"} <= set(json.loads((run / "timings.json").read_text()))
    runs = load_runs(Path(cfg.runs_dir) / "tiny")
    assert "preferred-ft" in runs.methods and not runs.evals(["preferred-ft"]).empty
