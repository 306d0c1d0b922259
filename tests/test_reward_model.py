import dataclasses
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from trl import RewardConfig, RewardTrainer

from reward_model.train import bradley_terry_loss, train_reward_model
from rlhf.atomic import read_jsonl
from rlhf.config import PROJECT_ROOT, load_config
from rlhf.data import PreferenceSet, build_preferences
from rlhf.keys import reward_model_key, run_key
from rlhf.models import load_scalar_model
from rlhf.sequences import encode_completions, sequence_scores


def test_bradley_terry_loss_by_hand():
    loss = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    want = -(math.log(1 / (1 + math.exp(-1))) + math.log(1 / (1 + math.exp(1)))) / 2
    assert math.isclose(loss.item(), want, rel_tol=1e-6)


def _planted(prompts: list[str], seed: int) -> list[dict]:
    """Pairs whose only difference is the last word: 'wonderful' is always preferred to 'terrible'."""
    rng = random.Random(seed)
    words = ["the", "film", "was", "long", "plot", "actor", "scene", "music", "ending", "cast"]
    rows = []
    for p in prompts:
        body = " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
        rows.append(
            {
                "prompt": p,
                "chosen": f"{body} wonderful",
                "rejected": f"{body} terrible",
                "gold_chosen": 1.0,
                "gold_rejected": -1.0,
                "p_chosen": 1.0,
            }
        )
    return rows


def test_our_scoring_matches_reward_trainer_loss(tiny_path, tokenizer):
    """RewardTrainer's loss on a batch equals eq. (1) applied to scores from rlhf.sequences: the explicit
    reward used at evaluation and in PPO is the very function RewardTrainer optimises."""
    rows = _planted([f"<|im_start|>user\nreview {i}<|im_end|>\n<|im_start|>assistant\n" for i in range(4)], 0)
    model = load_scalar_model(tiny_path, tokenizer.pad_token_id)
    args = RewardConfig(
        output_dir="/tmp/rm-test", per_device_train_batch_size=4, report_to=[], use_cpu=True, max_length=128
    )
    trainer = RewardTrainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]),
    )
    inputs = next(iter(trainer.get_train_dataloader()))
    model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, dict(inputs)).item()
        prompts = [r["prompt"] for r in rows]
        chosen = sequence_scores(model, encode_completions(tokenizer, prompts, [r["chosen"] for r in rows]))
        rejected = sequence_scores(model, encode_completions(tokenizer, prompts, [r["rejected"] for r in rows]))
    # the dataloader shuffles rows, but the loss is a mean over pairs: order does not matter
    assert math.isclose(trl_loss, bradley_terry_loss(chosen, rejected).item(), rel_tol=1e-4)


def test_reward_model_learns_a_planted_preference(tiny_cfg, tokenizer):
    from rlhf.tasks import load_task

    task = load_task(tiny_cfg.task, tokenizer)
    prefs = PreferenceSet(
        path=None,
        manifest={"sha256": "planted"},
        train=Dataset.from_list(_planted(task.train_prompts, 1)),
        heldout=Dataset.from_list(_planted(task.eval_prompts * 2, 2)),
        validation=Dataset.from_list([]),
    )
    cfg = load_config(
        "tiny", [f"runs_dir={tiny_cfg.runs_dir}", "reward_model.learning_rate=0.002", "reward_model.epochs=3"]
    )
    result = train_reward_model(cfg, prefs, seed=0)
    assert result.heldout["heldout/rm_accuracy"] >= 0.9 and result.heldout["heldout/rm_margin"] > 0.5
    assert result.heldout["heldout/gold_accuracy"] == 1.0
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["reward_model_path"] == str(result.path)
    saved = load_scalar_model(str(result.path), tokenizer.pad_token_id)
    assert saved.config.reward_shift == result.shift  # the centring shift travels with the model
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kind"] == "train" and rows[-1]["kind"] == "eval" and rows[-1]["heldout/rm_accuracy"] >= 0.9


TRAIN_ONE = """
import sys
from pipelines.stages import build_preference_set
from reward_model.train import train_reward_model
from rlhf.config import load_config
cfg = load_config("tiny", sys.argv[1:])
print(train_reward_model(cfg, build_preference_set(cfg), 0).path)
"""


def test_same_seed_same_reward_model_in_two_fresh_processes(tmp_path):
    """Issue #20, item 0: the scalar head `from_pretrained` adds is drawn from torch's global generator, which a fresh
    process seeds at random; seeded first, two processes (two runs directories) train bit-identical reward models."""
    from safetensors.torch import load_file

    pairs = tmp_path / "pairs.jsonl"  # the task's own pairs: nothing to sample before training
    pairs.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": f"Review film {i}.",
                    "chosen": f"A fine film, {i} stars.",
                    "rejected": f"Dull, {i} minutes too long.",
                }
            )
            + "\n"
            for i in range(40)
        )
    )
    saved = []
    for name in ("runs_a", "runs_b"):
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                TRAIN_ONE,
                f"runs_dir={tmp_path / name}",
                "task.name=preferences",
                f"task.path={pairs}",
            ],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        saved.append(out.stdout.strip().splitlines()[-1])
    a, b = (load_file(f"{path}/model.safetensors") for path in saved)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [
        k for k in a if not torch.equal(a[k], b[k])
    ]
    shifts = [json.loads((Path(path) / "config.json").read_text())["reward_shift"] for path in saved]
    assert shifts[0] == shifts[1]


def test_a_reward_model_cut_mid_training_resumes_and_ends_as_an_uninterrupted_one(
    tiny_cfg, tmp_path, monkeypatch, power_cut
):
    """Issue #20, item 5: a crash at step 3 of 4 leaves the resume point of step 2; run again, the reward model goes on
    from it in the same directory, trains steps 3 and 4 only, and ends with an uninterrupted run's weights, metrics
    and held-out numbers."""
    cfg = tiny_cfg.with_values({"reward_model.checkpoint_every": 1})
    prefs = build_preferences(cfg)

    def train(runs: Path):
        return train_reward_model(dataclasses.replace(cfg, runs_dir=str(runs)), prefs, seed=0)

    uninterrupted = train(tmp_path / "a")
    power_cut(RewardTrainer, "compute_loss", 3)
    with pytest.raises(RuntimeError, match="power cut"):
        train(tmp_path / "b")
    monkeypatch.undo()
    (cut,) = (tmp_path / "b" / "tiny" / "reward_model").iterdir()
    real, steps = RewardTrainer.compute_loss, []
    monkeypatch.setattr(RewardTrainer, "compute_loss", lambda self, *a, **kw: steps.append(1) or real(self, *a, **kw))
    resumed = train(tmp_path / "b")

    assert resumed.run_dir == cut and len(steps) == 2  # steps 3 and 4, in the run that was cut
    manifest = json.loads((cut / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert [(r["from_step"], r["previous_status"]) for r in manifest["resumed"]] == [(2, "failed")]
    assert (resumed.path / "model.safetensors").read_bytes() == (uninterrupted.path / "model.safetensors").read_bytes()
    assert (resumed.shift, resumed.heldout) == (uninterrupted.shift, uninterrupted.heldout)
    numbers = [
        [{k: v for k, v in row.items() if k != "wall_seconds"} for row in read_jsonl(run / "metrics.jsonl")[0]]
        for run in (uninterrupted.run_dir, cut)
    ]
    assert numbers[0] == numbers[1] and [r["step"] for r in numbers[0]] == [1, 2, 3, 4, 4]  # 4 train rows, 1 eval


def test_the_checkpoint_interval_is_in_no_key(tiny_cfg):
    """It changes no result: a reward model killed under one interval resumes under another, a completed one is
    reused, and every reward model trained before `reward_model.checkpoint_every` existed keeps its key."""
    other = tiny_cfg.with_values({"reward_model.checkpoint_every": 3})
    assert reward_model_key(tiny_cfg, "pairs", 0) == reward_model_key(other, "pairs", 0)
    for method in ("ppo", "dpo", "reference"):
        assert run_key(tiny_cfg, method, 0, "pairs", None) == run_key(other, method, 0, "pairs", None)
