"""`python -m pipelines ppo --profile tiny` end to end, in a subprocess, judged by what it wrote."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.atomic import read_jsonl
from rlhf.config import PROJECT_ROOT

PPO_TRAIN_KEYS = {
    "objective/kl",
    "objective/entropy",
    "objective/scores",
    "objective/rlhf_reward",
    "objective/kl_coef",
    "policy/approxkl",
    "policy/clipfrac",
    "policy/ratio_mean",
    "policy/ratio_var",
    "loss/policy",
    "loss/value",
    "val/clipfrac",
    "val/explained_variance",
    "grad_norm",
    "val/grad_norm",
    "learning_rate",
    "kind",
    "step",
    "wall_seconds",
    "tokens",
    "time/rollout",
    "time/scoring",
    "time/update",
    "tokens/rollout",
    "tokens/scoring",
    "tokens/update",
    "flops",
    "flops/rollout",
    "flops/scoring",
    "flops/update",
}


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600
    )


def test_make_ppo_tiny_end_to_end_and_reward_model_reuse(tmp_path):
    runs = tmp_path / "runs"
    out = _run(["ppo", "--profile", "tiny", f"runs_dir={runs}", "ppo.adaptive_kl=true"])
    assert out.returncode == 0, out.stderr[-3000:]
    (rm_dir,) = (runs / "tiny" / "reward_model").iterdir()
    assert json.loads((rm_dir / "manifest.json").read_text())["status"] == "completed"
    (ppo_dir,) = (runs / "tiny" / "ppo").iterdir()
    manifest = json.loads((ppo_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["reward_model_path"].startswith(str(rm_dir))
    rows, bad = read_jsonl(ppo_dir / "metrics.jsonl")
    assert not bad
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [0, 2, 4]
    assert PPO_TRAIN_KEYS <= set(train[0])
    assert train[-1]["objective/kl_coef"] != train[0]["objective/kl_coef"]  # the adaptive controller moved beta
    assert all(b["tokens"] > a["tokens"] and b["wall_seconds"] > a["wall_seconds"] for a, b in zip(train, train[1:]))
    for a, b in zip(train, train[1:]):  # the phases split an iteration's clock; scoring reads its tokens 4 times
        assert 0 < b["time/rollout"] + b["time/scoring"] + b["time/update"] <= b["wall_seconds"] - a["wall_seconds"]
        assert b["tokens/scoring"] == 4 * (b["tokens"] - a["tokens"]) and b["tokens/update"] > b["tokens/rollout"] > 0
    assert {"eval/gold", "eval/proxy", "eval/kl", "heldout/rm_accuracy", "heldout/gold_accuracy"} <= set(evals[-1])
    assert evals[0]["eval/kl"] == 0.0 and evals[-1]["wall_seconds"] == train[-1]["wall_seconds"]
    samples = ppo_dir / "samples"
    assert len(list(samples.glob("*.jsonl"))) == 3 and len(list(samples.glob("*.prompts.csv"))) == 3
    assert (ppo_dir / "checkpoints" / "final" / "model.safetensors").exists()
    timings = json.loads((ppo_dir / "timings.json").read_text())
    assert {"train", "eval"} <= set(timings)

    # Each PPO seed trains against a reward model trained with its own seed (reward_model.per_seed)
    again = _run(["ppo", "--profile", "tiny", f"runs_dir={runs}", "seeds=[1]"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reward model reused" not in again.stdout

    def manifests(method):
        paths = (runs / "tiny").glob(f"{method}/*/manifest.json")
        return {m["seed"]: m for m in (json.loads(p.read_text()) for p in paths)}

    rms, ppos = manifests("reward_model"), manifests("ppo")
    assert sorted(rms) == [0, 1]
    assert {s: ppos[s]["reward_model_path"] for s in (0, 1)} == {s: rms[s]["reward_model_path"] for s in (0, 1)}
    import torch
    from safetensors.torch import load_file

    heads = [load_file(Path(rms[s]["reward_model_path"]) / "model.safetensors")["score.weight"] for s in (0, 1)]
    assert not torch.equal(*heads)  # two reward models, not one counted twice
    # PPO's data budget is its reward model's, and DPO trains on the same pair presentations
    assert ppos[0]["budget"] == rms[0]["budget"] == {"pairs": 32, "passes": 1, "pair_presentations": 32}
    dpo = _run(["dpo", "--profile", "tiny", f"runs_dir={runs}"])
    assert dpo.returncode == 0, dpo.stderr[-3000:]
    (dpo_manifest,) = [json.loads(p.read_text()) for p in (runs / "tiny").glob("dpo/*/manifest.json")]
    assert dpo_manifest["budget"] == rms[0]["budget"]
    # A finished reward model is reused while its key matches; one shared by every seed where per_seed is off
    shared = _run(
        [
            "ppo",
            "--profile",
            "tiny",
            f"runs_dir={runs}",
            "seeds=[1]",
            "reward_model.per_seed=false",
            "reward_model.seed=0",
            "ppo.iterations=2",
        ]
    )
    assert shared.returncode == 0, shared.stderr[-3000:]
    assert f"reward model reused: {rms[0]['reward_model_path']}" in shared.stdout
    assert len(list((runs / "tiny" / "reward_model").iterdir())) == 2


def test_token_values_are_the_centred_reward_head_read_after_each_response_prefix(tiny_model, tokenizer, tiny_path):
    """V(s_t) must read the state before response token t (prompt + y_<t), centred by r_phi's shift."""
    import torch

    from rlhf.models import autocast, load_scalar_model
    from rlhf.sequences import SequenceBatch, sample, sequence_scores
    from ppo.train import TokenValueModel

    prompts = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>user\na review<|im_end|>\n"]
    torch.manual_seed(3)
    batch = sample(tiny_model, tokenizer, prompts, 5, 1.0, autocast("fp32", torch.device("cpu")))
    rm = load_scalar_model(tiny_path, tokenizer.pad_token_id).eval()
    rm.config.reward_shift = 0.7
    with torch.no_grad():
        values = TokenValueModel(rm)(batch)
        for t in range(batch.response_ids.shape[1]):  # t = 0: the prompt alone
            prefix = SequenceBatch(
                batch.prompt_ids, batch.prompt_mask, batch.response_ids[:, :t], batch.response_mask[:, :t]
            )
            real = batch.response_mask[:, t].bool()
            assert real.any() and torch.allclose(values[real, t], sequence_scores(rm, prefix)[real] - 0.7, atol=1e-5)
    assert (values[batch.response_mask == 0] == 0).all()


def test_ppo_gt_optimises_the_gold_reward_and_never_touches_a_reward_model(tiny_cfg, monkeypatch):
    import ppo.train as ppo_train
    from rlhf.config import load_config
    from pipelines.ppo_pipeline import main
    from rlhf.tasks import load_task

    scored: list[int] = []

    def counting_task(*args, **kwargs):
        task = load_task(*args, **kwargs)
        gold = task.gold_reward
        task.gold_reward = lambda texts: scored.append(len(texts)) or gold(texts)
        return task

    def no_reward_model(*args, **kwargs):
        raise AssertionError("PPO-GT used the reward model")

    monkeypatch.setattr(ppo_train, "load_task", counting_task)
    monkeypatch.setattr(ppo_train, "reward_scores", no_reward_model)
    monkeypatch.setattr("pipelines.stages.train_reward_model", no_reward_model)
    cfg = load_config("tiny", [f"runs_dir={tiny_cfg.runs_dir}", "ppo.reward=gold"])
    assert main(cfg) == 0
    profile = Path(tiny_cfg.runs_dir) / "tiny"
    assert not (profile / "reward_model").exists() and not (profile / "ppo").exists()
    (run_dir,) = (profile / "ppo-gt").iterdir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["method"] == "ppo-gt"
    assert manifest["reward_model_path"] is None
    rows, _ = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    assert scored == [8] * 4  # every rollout (4 iterations x 8 episodes) scored by the gold reward


@pytest.fixture(scope="module")
def ratio_runs(tmp_path_factory) -> Path:
    """One runs directory for the ratio checks: the second run reuses the first one's preference set and pi_ref's
    eval samples."""
    return tmp_path_factory.mktemp("ratio") / "runs"


def _first_minibatch_ratios(runs_dir: Path, monkeypatch) -> tuple[torch.Tensor, float]:
    """pi / pi_old on the real response tokens of the first minibatch of the first PPO epoch of a real tiny run
    (PPO-GT, one iteration, a smaller preference set), and that minibatch's approximate KL, as
    `clipped_policy_loss` saw them."""
    import ppo.train as ppo_train
    from pipelines.ppo_pipeline import main
    from rlhf.config import load_config

    seen: list[tuple[torch.Tensor, float]] = []
    real = ppo_train.clipped_policy_loss

    def spy(logprobs, old_logprobs, advantages, mask, cliprange):
        loss, stats = real(logprobs, old_logprobs, advantages, mask, cliprange)
        seen.append((torch.exp(logprobs - old_logprobs)[mask.bool()].detach(), float(stats["policy/approxkl"])))
        return loss, stats

    monkeypatch.setattr(ppo_train, "clipped_policy_loss", spy)
    assert (
        main(
            load_config(
                "tiny",
                [
                    f"runs_dir={runs_dir}",
                    "ppo.reward=gold",
                    "ppo.iterations=1",
                    "resume=false",
                    "data.n_prompts=8",
                    "data.n_heldout_prompts=4",
                ],
            )
        )
        == 0
    )
    return seen[0]


def test_the_first_minibatch_of_the_first_epoch_has_ratio_1_and_approx_kl_0(ratio_runs, monkeypatch):
    """The ratio check of every RLHF-PPO: before its first step the policy is pi_old, so the update's pass must
    reproduce the scoring pass's log-probs (same temperature, positions, precision; dropout off in both)."""
    ratios, approx_kl = _first_minibatch_ratios(ratio_runs, monkeypatch)
    assert len(ratios) > 0 and (ratios - 1).abs().max() < 1e-6 and approx_kl < 1e-6, (ratios, approx_kl)


def test_the_ratio_check_catches_dropout_left_on(ratio_runs, monkeypatch):
    """Attention dropout on (off only in eval mode, where the rollout is scored): the check fails."""
    import ppo.train as ppo_train

    real = ppo_train.for_training

    def with_dropout(*args, **kwargs):
        model = real(*args, **kwargs)
        for module in model.modules():
            if isinstance(getattr(module, "attention_dropout", None), float):
                module.attention_dropout = 0.5
        return model

    monkeypatch.setattr(ppo_train, "for_training", with_dropout)
    ratios, approx_kl = _first_minibatch_ratios(ratio_runs, monkeypatch)
    assert (ratios - 1).abs().max() > 1e-2 and approx_kl > 1e-6, (ratios, approx_kl)
