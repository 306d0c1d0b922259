"""RLOO and online DPO (docs/online.md) on the tiny profile: `make rloo` and `make online-dpo` write run directories
the analysis reads, train against the reward model PPO's seed uses (never the gold reward), and carry the top-level
beta into TRL's KL term. RLOO's optimum is checked on the bandit (tests/test_bandit.py)."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

import online_dpo
import rlhf.online
import rloo
from analysis.load import load_runs
from pipelines import online_pipeline
from pipelines.stages import build_preference_set, find_reward_model, reward_model_seed
from rlhf.atomic import read_jsonl
from rlhf.config import PROJECT_ROOT, load_config
from rlhf.flops import forward_flops, pass_parameters, train_flops
from rlhf.models import load_causal_lm, load_scalar_model

METHODS = {"rloo": online_pipeline.rloo_main, "online-dpo": online_pipeline.online_dpo_main}
# The reward the trainer logged for each step's samples: TRL's names
LOGGED_REWARD = {"rloo": "rewards/reward_model/mean", "online-dpo": "objective/scores"}


@pytest.fixture(scope="module")
def online_runs(tmp_path_factory):
    """Both pipelines on tiny, into one runs directory, with every score of r_phi the trainers asked for recorded:
    (method, the reward model's folder, the scores)."""
    cfg = load_config("tiny", [f"runs_dir={tmp_path_factory.mktemp('online') / 'runs'}"])
    calls: list[tuple[str, str, torch.Tensor]] = []
    real = rlhf.online.reward_scores
    with pytest.MonkeyPatch.context() as patch:
        for method, main in METHODS.items():

            def spy(model, batch, tokenizer, method=method):
                scores = real(model, batch, tokenizer)
                calls.append((method, model.name_or_path, scores))
                return scores

            patch.setattr(rlhf.online, "reward_scores", spy)
            assert main(cfg) == 0
    return cfg, calls


def _run_dir(cfg, method):
    (path,) = (PROJECT_ROOT / cfg.runs_dir / "tiny" / method).iterdir()
    return path


def test_both_write_run_directories_the_analysis_reads(online_runs):
    cfg, _ = online_runs
    runs = load_runs(PROJECT_ROOT / cfg.runs_dir / "tiny")
    assert {"rloo", "online-dpo"} <= set(runs.methods)
    for method in METHODS:
        evals = runs.evals([method])
        assert evals["step"].tolist() == [0, 2, 4]  # eval_every 2 over 4 steps, as DPO's on tiny
        assert {"eval/gold", "eval/kl", "eval/proxy", "heldout/rm_accuracy"} <= set(evals)
        assert evals["eval/kl"].iloc[0] == 0 and evals["eval/kl"].iloc[-1] != 0  # pi_ref at step 0, then it moved
        train = runs.train([method])
        assert train["step"].tolist() == [1, 2, 3, 4]
        assert (train["tokens"].diff().dropna() > 0).all() and (train["flops"].diff().dropna() > 0).all()
        assert not runs.prompts[runs.prompts["method"] == method].empty  # per-prompt values: the bootstrap's input
    # DPO's implicit reward, on its policy too, at the last eval point (where the report reads it)
    assert runs.evals(["online-dpo"])["heldout/implicit_accuracy"].notna().tolist() == [False, False, True]


def test_flops_count_sampling_scoring_and_training(online_runs, tiny_path):
    """Every sampled token pays for its sampling pass, the scoring passes and the training passes (as PPO's)."""
    cfg, _ = online_runs
    policy = pass_parameters(load_causal_lm(tiny_path))
    for method, per_token in {
        "rloo": forward_flops(3 * policy, 1) + train_flops(policy, 1),
        "online-dpo": forward_flops(2 * policy, 1) + train_flops(policy, 1),
    }.items():
        run = _run_dir(cfg, method)
        rm = load_scalar_model(json.loads((run / "manifest.json").read_text())["reward_model_path"], 0)
        last = [r for r in read_jsonl(run / "metrics.jsonl")[0] if r["kind"] == "train"][-1]
        assert last["flops"] == last["tokens"] * (per_token + forward_flops(pass_parameters(rm, "scalar"), 1))


def test_each_seed_trains_against_ppos_reward_model_for_that_seed(online_runs):
    """The reward every step's samples were scored with is r_phi of the run's reward model, the one PPO's seed
    uses (`reward_model_for`), and that is what the trainer optimised: its logged reward is the mean of those
    scores, step by step (the gold reward would give other numbers)."""
    cfg, calls = online_runs
    ppo_rm = find_reward_model(cfg, build_preference_set(cfg), reward_model_seed(cfg, cfg.seeds[0]))
    for method in METHODS:
        run = _run_dir(cfg, method)
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["reward_model_path"] == str(ppo_rm)
        scored = [scores for m, path, scores in calls if m == method]
        assert {path for m, path, _ in calls if m == method} == {str(ppo_rm)}
        train = [r for r in read_jsonl(run / "metrics.jsonl")[0] if r["kind"] == "train"]
        assert len(scored) == len(train)  # one rollout a step, all of it scored by r_phi
        for row, scores in zip(train, scored):
            assert row[LOGGED_REWARD[method]] == pytest.approx(scores.mean().item(), abs=1e-6)


@pytest.mark.parametrize("stage", [rloo, online_dpo], ids=lambda m: m.METHOD)
def test_the_top_level_beta_is_their_kl_coefficient(stage, tiny_path, tokenizer, tmp_path):
    """TRL's config object and the trainer built from it carry the top-level beta (RLOO: the coefficient of the
    sequence KL in the reward; online DPO: eq. 6's beta), sampling at temperature 1."""
    cfg = load_config("tiny", ["beta=0.37"])
    prompts = Dataset.from_dict({"prompt": ["a prompt"] * 8})
    trainer = stage.build_trainer(
        cfg,
        load_causal_lm(tiny_path),
        tokenizer,
        prompts,
        lambda prompts, **_: [0.0] * len(prompts),
        0,
        tmp_path,
        callbacks=[],
    )
    assert trainer.beta == 0.37 and trainer.args.beta == 0.37
    assert trainer.args.temperature == 1.0 and trainer.args.top_k == 0 and trainer.args.top_p == 1.0
