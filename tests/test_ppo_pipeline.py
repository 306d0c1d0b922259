"""`python -m pipelines ppo --profile tiny` end to end, in a subprocess, judged by what it wrote."""

import json
import subprocess
import sys

from pipelines.config import PROJECT_ROOT
from pipelines.rundir import read_jsonl

PPO_TRAIN_KEYS = {"objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward",
                  "objective/kl_coef", "policy/approxkl", "policy/clipfrac", "policy/ratio_mean", "policy/ratio_var",
                  "loss/policy", "loss/value", "val/clipfrac", "val/explained_variance", "grad_norm",
                  "learning_rate", "kind", "step", "wall_seconds", "tokens"}


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=600)


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
    assert {"eval/gold", "eval/proxy", "eval/kl", "heldout/rm_accuracy", "heldout/gold_accuracy"} <= set(evals[-1])
    assert evals[0]["eval/kl"] == 0.0 and evals[-1]["wall_seconds"] == train[-1]["wall_seconds"]
    assert len(list((ppo_dir / "samples").iterdir())) == 3
    assert (ppo_dir / "checkpoints" / "final" / "model.safetensors").exists()
    timings = json.loads((ppo_dir / "timings.json").read_text())
    assert {"train", "eval"} <= set(timings)

    again = _run(["ppo", "--profile", "tiny", f"runs_dir={runs}", "seeds=[1]"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reward model reused" in again.stdout
    assert len(list((runs / "tiny" / "reward_model").iterdir())) == 1 and len(list((runs / "tiny" / "ppo").iterdir())) == 2
