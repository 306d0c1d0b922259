"""The imdb-gpt2 profile's code path offline: IMDb review prefixes, the classifier's P(positive) as gold reward, the SFT
stage as pi_ref of every stage, the beta sweep, and the fail-fast message when the hub is unreachable. The profile
runs here with overrides: the tiny model, a generated IMDb-format file and a tiny random sentiment classifier."""

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from analysis.load import load_runs
from analysis.report import frontier_section
from pipelines import dpo_pipeline, ppo_pipeline, stages
from pipelines.stages import build_preference_set, evaluate_reference
from rlhf.atomic import read_jsonl
from rlhf.config import PROJECT_ROOT, TaskConfig, load_config
from rlhf.errors import UserError
from rlhf.hub import require_hub
from rlhf.keys import sft_key
from rlhf.models import load_causal_lm
from rlhf.reference import reference_model, sft_rows
from rlhf.tasks import PREFIX_TOKENS, load_imdb, load_task, positive_probability, review_prefix
from sft import sft_trainer

_WORDS = (
    "the film was a quiet and moving story about two brothers who never speak and the acting is superb "
    "but the plot drags badly in the middle while the music carries every scene to a loud ending"
).split()


def _reviews(n: int, seed: int, first_word: str | None = None) -> list[dict]:
    """IMDb-format rows (text, label): 20-40 words each, drawn from a fixed vocabulary."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(20, 40))]
        if first_word:
            words[0] = first_word
        rows.append({"text": " ".join(words).capitalize() + ".", "label": i % 2})
    return rows


@pytest.fixture(scope="module")
def imdb_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("imdb") / "imdb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _reviews(48, seed=0)))
    return path


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_path) -> Path:
    """A tiny randomly initialised sentiment classifier (labels NEGATIVE / POSITIVE) with the embedded tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # a head that spreads the probabilities: the random one sits near 0.5 everywhere
        model.score.weight.mul_(50)
    path = tmp_path_factory.mktemp("classifier") / "sentiment"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _imdb_cfg(runs: Path, imdb_file: Path, classifier: Path, *extra: str):
    """The imdb-gpt2 profile, offline and sized for seconds: tiny model, local data and classifier."""
    return load_config(
        "imdb-gpt2",
        [
            f"runs_dir={runs}",
            "hub_access=false",
            "seeds=[0]",
            "beta_sweep=[0.1, 0.2]",
            "model.name_or_path=tiny",
            "model.precision=fp32",
            f"sft_stage.path={imdb_file}",
            "sft_stage.learning_rate=1e-3",
            "sft_stage.batch_size=8",
            "sft_stage.max_steps=3",
            "sft_stage.max_length=64",
            f"task.path={imdb_file}",
            f"task.gold_model={classifier}",
            "task.n_train_prompts=16",
            "task.n_eval_prompts=8",
            "task.n_validation_prompts=0",
            "task.gold_batch_size=8",
            "data.responses_per_prompt=2",
            "data.max_new_tokens=8",
            "data.batch_size=16",
            "eval.n_prompts=8",
            "eval.max_new_tokens=8",
            "eval.batch_size=8",
            "reward_model.batch_size=8",
            "reward_model.max_length=64",
            "reward_model.center_prompts=8",
            "ppo.iterations=2",
            "ppo.rollout_batch_size=8",
            "ppo.mini_batch_size=4",
            "ppo.ppo_epochs=1",
            "ppo.max_new_tokens=8",
            "ppo.eval_every=2",
            "ppo.checkpoint_every=null",
            "dpo.learning_rate=1e-3",
            "dpo.warmup_steps=0",
            "dpo.batch_size=4",
            "budget.pairs=8",
            "dpo.max_length=64",
            "dpo.eval_every=2",
            "dpo.checkpoint_every=null",
            *extra,
        ],
    )


# --- prompts ------------------------------------------------------------------------------------------------------


def test_review_prefix_is_the_text_of_the_first_tokens(tokenizer):
    text = "This movie was great fun to watch."  # one token a word in the embedded tokenizer, '.' its own
    assert review_prefix(tokenizer, text, 2) == "This movie"
    assert review_prefix(tokenizer, text, 3) == "This movie was"
    assert review_prefix(tokenizer, text, 8) == text
    assert review_prefix(tokenizer, text, 20) == text  # a review shorter than the draw is the whole review


def test_imdb_prompts_are_2_to_8_token_prefixes_drawn_per_review(tokenizer, imdb_file, classifier):
    cfg = TaskConfig(name="imdb", path=str(imdb_file), gold_model=str(classifier), n_train_prompts=24, n_eval_prompts=8)
    task = load_imdb(cfg, tokenizer, hub_access=False)
    assert (len(task.train_prompts), len(task.eval_prompts)) == (24, 8)
    texts = [r["text"] for r in _reviews(48, seed=0)]
    lengths = []
    for prompt in task.train_prompts + task.eval_prompts:
        n = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        assert PREFIX_TOKENS[0] <= n <= PREFIX_TOKENS[1], prompt
        assert any(t.startswith(prompt) for t in texts), prompt  # a prefix of a review, no template around it
        lengths.append(n)
    assert len(set(lengths)) >= 4  # the count is drawn per review, not fixed
    assert load_imdb(cfg, tokenizer, hub_access=False).train_prompts == task.train_prompts  # seeded
    other = load_imdb(TaskConfig(**{**vars(cfg), "prompt_seed": 1}), tokenizer, hub_access=False)
    assert other.train_prompts != task.train_prompts


def test_imdb_eval_prompts_come_from_the_test_split_where_there_is_one(tokenizer, tmp_path, classifier):
    folder = tmp_path / "imdb-dataset"
    DatasetDict(
        {
            "train": Dataset.from_list(_reviews(20, seed=1)),
            "test": Dataset.from_list(_reviews(10, seed=2, first_word="Zebra")),
        }
    ).save_to_disk(str(folder))
    task = load_imdb(
        TaskConfig(name="imdb", path=str(folder), gold_model=str(classifier), n_train_prompts=20, n_eval_prompts=10),
        tokenizer,
        hub_access=False,
    )
    assert len(task.eval_prompts) == 10 and all(p.startswith("Zebra") for p in task.eval_prompts)
    assert len(task.train_prompts) == 20 and not any(p.startswith("Zebra") for p in task.train_prompts)


def test_imdb_bad_rows_and_settings_are_named(tokenizer, tmp_path, classifier, imdb_file):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "Fine.", "label": 1}) + "\n" + json.dumps({"review": "x", "label": 0}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl train row 2: field 'text'"):
        load_imdb(TaskConfig(name="imdb", path=str(bad), gold_model=str(classifier)), tokenizer, hub_access=False)
    with pytest.raises(UserError, match="task.gold_model"):
        load_config("imdb-gpt2", ["task.gold_model=null"])
    with pytest.raises(UserError, match="sft_stage.source.*'chosen' needs a task that ships its preference pairs"):
        load_config("imdb-gpt2", ["sft_stage.source=chosen"])


# --- gold reward --------------------------------------------------------------------------------------------------


def test_gold_reward_is_the_softmax_probability_of_the_positive_label(classifier, tokenizer):
    gold = positive_probability(
        TaskConfig(name="imdb", path="x", gold_model=str(classifier), gold_batch_size=2), hub_access=False
    )
    texts = ["A wonderful, moving film.", "Dull.", "The plot drags badly in the middle of a long film", "It was fine"]
    scores = gold(texts)  # batches of 2, padded: must equal each text scored alone
    model = LlamaForSequenceClassification.from_pretrained(classifier).eval()
    for text, score in zip(texts, scores, strict=True):
        with torch.no_grad():
            negative, positive = model(**tokenizer(text, return_tensors="pt")).logits[0].tolist()
        assert score == pytest.approx(math.exp(positive) / (math.exp(negative) + math.exp(positive)), abs=1e-5)
        assert 0 <= score <= 1
    assert max(scores) - min(scores) > 0.05  # the texts are told apart: not a constant
    negative = positive_probability(
        TaskConfig(name="imdb", path="x", gold_model=str(classifier), gold_positive_label="NEGATIVE"), hub_access=False
    )
    assert negative(texts) == pytest.approx([1 - s for s in scores], abs=1e-5)


def test_gold_positive_label_missing_from_the_classifier_names_both_keys(classifier):
    with pytest.raises(UserError, match=r"task.gold_positive_label: 'HAPPY' .*task.gold_model.*NEGATIVE.*POSITIVE"):
        positive_probability(
            TaskConfig(name="imdb", path="x", gold_model=str(classifier), gold_positive_label="HAPPY"), hub_access=False
        )


# --- the profile end to end ---------------------------------------------------------------------------------------


def _manifests(root: Path, method: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / method).glob("*/manifest.json"))]


def test_pi_ref_without_its_sft_model_names_make_sft(tmp_path, imdb_file, classifier):
    """The foundation only finds the SFT stage's model; it never trains it (that is `make sft`'s step)."""
    cfg = _imdb_cfg(tmp_path / "runs", imdb_file, classifier)
    with pytest.raises(UserError, match=r"no completed SFT run .* run `make sft PROFILE=imdb-gpt2` first"):
        reference_model(cfg)
    assert not (tmp_path / "runs").exists()  # nothing was trained or written


def test_imdb_gpt2_profile_sft_then_data_ppo_dpo_offline(
    tmp_path, imdb_file, classifier, tiny_path, tokenizer, monkeypatch
):
    cfg = _imdb_cfg(tmp_path / "runs", imdb_file, classifier)
    root = tmp_path / "runs" / "imdb-gpt2"

    # The SFT stage: trained once from the base model on the corpus; its weights moved.
    assert stages.sft_main(cfg) == 0
    (sft_run,) = _manifests(root, "sft")
    assert sft_run["status"] == "completed" and sft_run["base_model_path"] == tiny_path and sft_run["texts"] == 48
    sft_path = sft_run["sft_model_path"]
    rows, _ = read_jsonl(Path(sft_path).parent.parent / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["kind"] == "train" for r in rows)
    assert not torch.equal(load_causal_lm(sft_path).lm_head.weight, load_causal_lm(tiny_path).lm_head.weight)

    # Reused while its key matches: every later stage asks for pi_ref, none trains it again.
    def no_retraining(*args, **kwargs):
        raise AssertionError("the SFT stage was trained again")

    monkeypatch.setattr("pipelines.stages.train_sft", no_retraining)
    assert reference_model(cfg).name_or_path == sft_path

    # The preference set is sampled from pi_ref = the SFT model, on 2-8-token prompts, scored with P(positive).
    prefs = build_preference_set(cfg)
    assert prefs.manifest["model_path"] == sft_path
    for pair in prefs.train.to_list() + prefs.heldout.to_list():
        assert 2 <= len(tokenizer(pair["prompt"], add_special_tokens=False).input_ids) <= 8
        assert 0 <= pair["gold_chosen"] <= 1 and 0 <= pair["gold_rejected"] <= 1

    # PPO and DPO, one run per beta of the sweep, each with pi_ref = the SFT model.
    assert ppo_pipeline.main(cfg) == 0 and dpo_pipeline.main(cfg) == 0
    evaluate_reference(cfg)
    for method in ("ppo", "dpo"):
        runs = _manifests(root, method)
        assert sorted(m["beta"] for m in runs) == [0.1, 0.2]
        assert all(m["status"] == "completed" and m["reference_model"] == sft_path for m in runs)
        for m in runs:
            evals = [r for r in read_jsonl(root / method / m["run_id"] / "metrics.jsonl")[0] if r["kind"] == "eval"]
            assert evals[0]["eval/kl"] == 0 and evals[-1]["eval/kl"] != 0  # step 0 is pi_ref itself
            assert all(0 <= r["eval/gold"] <= 1 for r in evals)
    for method in ("reward_model", "reference"):
        assert [m["reference_model"] for m in _manifests(root, method)] == [sft_path]
    assert len(_manifests(root, "sft")) == 1

    # The report tells the betas apart, and the SFT stage is not a policy on the frontier.
    loaded = load_runs(root)
    frontier = frontier_section(loaded, "eval/gold", "gold").tables[0].frame
    assert set(frontier["method"]) <= {"ppo", "dpo"} and "beta" in frontier
    assert set(loaded.runs.loc[loaded.runs["method"] == "dpo", "beta"]) == {0.1, 0.2}


# --- the hub ------------------------------------------------------------------------------------------------------


def test_imdb_gpt2_fails_fast_naming_what_needs_the_unreachable_hub():
    """The real CLI, with the hub endpoint pointed at a closed local port: unreachable wherever the test runs."""
    env = {"PATH": "/usr/bin:/bin", "HF_ENDPOINT": "http://127.0.0.1:9", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "pipelines", "sft", "--profile", "imdb-gpt2"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 2 and out.stdout == ""
    (line,) = out.stderr.strip().splitlines()  # one line, before any model or data loads
    assert "http://127.0.0.1:9" in line and "is unreachable" in line and "needs network access to the hub" in line
    for needed in (
        "model.name_or_path 'gpt2-large'",
        "task.path 'stanfordnlp/imdb'",
        "task.gold_model 'siebert/sentiment-roberta-large-english'",
        "sft_stage.path 'stanfordnlp/imdb'",
    ):
        assert needed in line


def test_require_hub_probes_only_when_something_must_come_from_the_hub(monkeypatch, imdb_file, classifier, tmp_path):
    probes = []
    monkeypatch.setattr("rlhf.hub.hub_reachable", lambda: probes.append(1) or False)
    local = _imdb_cfg(tmp_path, imdb_file, classifier, "hub_access=true")
    require_hub(local)  # everything is on this machine: no probe, no error
    assert probes == []
    with pytest.raises(UserError, match=r"needs it for task.gold_model 'siebert/sentiment-roberta-large-english'"):
        require_hub(
            _imdb_cfg(
                tmp_path,
                imdb_file,
                classifier,
                "hub_access=true",
                "task.gold_model=siebert/sentiment-roberta-large-english",
            )
        )
    assert probes == [1]


# --- the SFT stage's other source, and the sweep ------------------------------------------------------------------


def test_sft_stage_on_chosen_trains_on_the_responses_of_the_task_pairs_only(tokenizer, tiny_path, tmp_path):
    cfg = load_config(
        "hh",
        [
            f"runs_dir={tmp_path}",
            "model.name_or_path=tiny",
            "task.n_train_prompts=6",
            "sft_stage.enabled=true",
            "sft_stage.source=chosen",
            "sft_stage.max_length=512",
        ],
    )
    rows = sft_rows(cfg, tokenizer)
    pairs = load_task(cfg.task, tokenizer).train_pairs
    assert rows["prompt"] == [p["prompt"] for p in pairs] and rows["completion"] == [p["chosen"] for p in pairs]
    trainer = sft_trainer(
        load_causal_lm(tiny_path),
        tokenizer,
        rows,
        cfg.sft_stage,
        1,
        None,
        cfg.model,
        cfg.weight_decay,
        0,
        tmp_path / "out",
        [],
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    # The loss covers each chosen reply and the EOS TRL appends, never the dialogue before it.
    targets = sum(len(tokenizer(p["chosen"], add_special_tokens=False).input_ids) + 1 for p in pairs)
    assert int((batch["labels"] != -100).sum()) == targets
    assert int((batch["labels"] != -100).sum()) < int(batch["attention_mask"].sum()) / 2
    # The key follows the texts: another corpus is another SFT model.
    assert sft_key(cfg, rows) != sft_key(cfg, rows.select(range(5))) and sft_key(cfg, rows) == sft_key(cfg, rows)


def test_beta_sweep_gives_one_config_per_beta():
    cfg = load_config("tiny", ["beta_sweep=[0.05, 1]"])
    assert [(c.beta, c.beta_sweep) for c in cfg.betas()] == [(0.05, []), (1.0, [])]
    assert [c.beta for c in load_config("tiny").betas()] == [0.1]  # empty sweep: just beta
    with pytest.raises(UserError, match="beta_sweep"):
        load_config("tiny", ["beta_sweep=[0.1, 0]"])
