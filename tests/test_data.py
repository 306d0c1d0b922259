import random
import shutil
from pathlib import Path

import pytest

from analysis.load import load_runs
from rlhf.config import load_config
from rlhf.data import build_preferences, label_pair, load_preferences, preference_dir
from rlhf.errors import UserError
from rlhf.keys import preference_set_key
from rlhf.tasks import check_pair


def test_same_seed_gives_byte_identical_preference_set(tmp_path):
    sets = []
    for name in ("a", "b"):
        cfg = load_config("tiny", [f"runs_dir={tmp_path / name}"])
        prefs = build_preferences(cfg)
        files = sorted(prefs.path.joinpath("dataset").rglob("*.arrow"))
        sets.append((prefs.sha256, [f.read_bytes() for f in files], prefs.train.to_list()))
    assert sets[0][0] == sets[1][0] and sets[0][1] == sets[1][1]
    other = build_preferences(load_config("tiny", [f"runs_dir={tmp_path / 'c'}", "data.seed=1"]))
    assert other.sha256 != sets[0][0] and other.train.to_list() != sets[0][2]


def test_preference_set_format_manifest_and_reuse(tiny_cfg):
    prefs = build_preferences(tiny_cfg)
    row = prefs.train[0]
    assert {"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected", "p_chosen"} <= set(row)
    m = prefs.manifest
    assert m["counts"] == {"train": len(prefs.train), "heldout": len(prefs.heldout), "validation": 0}
    assert m["config_hash"] == preference_set_key(tiny_cfg) and len(m["sha256"]) == 64
    assert m["model"] == "tiny" and m["seed"] == tiny_cfg.data.seed
    assert -1 <= m["stats"]["train"]["gold_mean"] <= 1
    assert len(prefs.train) == tiny_cfg.data.n_prompts - sum(
        m["stats"]["train"][k] for k in ("empty", "identical", "tie_dropped")
    )
    # every pair's prompt is one of the train prompts; held-out pairs come from eval prompts only
    assert not {r["prompt"] for r in prefs.train} & {r["prompt"] for r in prefs.heldout}
    mtime = (prefs.path / "manifest.json").stat().st_mtime_ns
    again = build_preferences(tiny_cfg)  # reused, not rebuilt
    assert again.sha256 == prefs.sha256 and (prefs.path / "manifest.json").stat().st_mtime_ns == mtime


def test_changed_config_builds_a_new_folder_and_keeps_the_old(tiny_cfg):
    old = build_preferences(tiny_cfg)
    new_cfg = load_config("tiny", [f"runs_dir={tiny_cfg.runs_dir}", "data.bt_temperature=0.5"])
    assert preference_dir(new_cfg) != old.path
    build_preferences(new_cfg)
    assert load_preferences(tiny_cfg).sha256 == old.sha256


def test_tampered_preference_set_is_detected(tiny_cfg):
    prefs = build_preferences(tiny_cfg)
    arrow = next(prefs.path.joinpath("dataset", "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-10])
    with pytest.raises(UserError, match="does not match its manifest"):
        load_preferences(tiny_cfg)


def test_a_build_a_kill_stopped_is_never_taken_for_a_set(tiny_cfg):
    """Issue #20, item 5: a kill mid-build leaves a hidden temporary folder, which the report never lists as a set; a
    stale folder under the set's own name (its manifest gone) is replaced whole, nothing of it left beside."""
    prefs = build_preferences(tiny_cfg)
    half = prefs.path.with_name(f".{prefs.path.name}.123.abcd")  # killed after its manifest, before the rename
    shutil.copytree(prefs.path, half)
    (prefs.path / "manifest.json").unlink()
    again = build_preferences(tiny_cfg)
    assert again.sha256 == prefs.sha256
    assert sorted(p.name for p in prefs.path.parent.iterdir()) == [half.name, prefs.path.name]
    profile = Path(tiny_cfg.runs_dir) / tiny_cfg.profile
    assert [d["path"] for d in load_runs(profile).data_manifests] == [str(prefs.path)]


def test_bradley_terry_labels_follow_sigmoid():
    rng = random.Random(0)
    n = 20000
    wins = sum(label_pair(0.3, 0.1, "bradley_terry", 0.1, rng)[0] for _ in range(n))
    p = 1 / (1 + pow(2.718281828459045, -2.0))  # sigmoid((0.3 - 0.1) / 0.1)
    assert abs(wins / n - p) < 4 * (p * (1 - p) / n) ** 0.5
    assert label_pair(0.3, 0.1, "argmax", 0.1, rng) == (True, 1.0)
    assert label_pair(0.1, 0.3, "argmax", 0.1, rng) == (False, 0.0)
    assert label_pair(0.2, 0.2, "argmax", 0.1, rng)[0] is None  # ties carry no preference: dropped


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "p", "chosen": "a"}, "row 3: field 'rejected' is missing"),
        ({"prompt": "p", "chosen": 1, "rejected": "b"}, "row 3: field 'chosen' must be a string, got int"),
        ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "row 3: field 'chosen' is empty"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "row 3: 'chosen' and 'rejected' are identical"),
        (["p", "a", "b"], "row 3: expected a row with fields"),
    ],
)
def test_malformed_pairs_are_rejected_with_the_row_named(row, message):
    with pytest.raises(UserError, match=message):
        check_pair(row, "row 3")


def test_validation_prompts_are_set_aside_and_never_scored_by_a_test_evaluation(tmp_path, tokenizer, tiny_model):
    """task.n_validation_prompts: the last eval prompts (and their pairs) are for sweeps; test evaluations, and the
    held-out pairs the report scores, never see them."""
    import torch

    from rlhf.evaluate import make_eval_context
    from rlhf.tasks import load_task

    base = load_config("tiny", [f"runs_dir={tmp_path}"])
    cfg = load_config("tiny", [f"runs_dir={tmp_path}", "task.n_validation_prompts=6"])
    everything = load_task(base.task, tokenizer).eval_prompts
    task = load_task(cfg.task, tokenizer)
    assert task.eval_prompts == everything[:-6] and task.validation_prompts == everything[-6:]
    prefs = build_preferences(cfg)
    assert {r["prompt"] for r in prefs.heldout} <= set(task.eval_prompts)
    assert {r["prompt"] for r in prefs.validation} <= set(task.validation_prompts) and len(prefs.validation) > 0
    assert prefs.manifest["counts"]["validation"] == len(prefs.validation)
    test = make_eval_context(cfg, prefs, tiny_model, tokenizer, torch.device("cpu"))
    assert not set(test.prompts) & set(task.validation_prompts)
    assert not {p["prompt"] for p in test.heldout_pairs} & set(task.validation_prompts)
    validation = make_eval_context(
        load_config("tiny", [f"runs_dir={tmp_path}", "task.n_validation_prompts=6", "eval.split=validation"]),
        prefs,
        tiny_model,
        tokenizer,
        torch.device("cpu"),
    )
    assert set(validation.prompts) <= set(task.validation_prompts)
    assert {p["prompt"] for p in validation.heldout_pairs} <= set(task.validation_prompts)
    with pytest.raises(UserError, match="'task.n_validation_prompts': 16, but the task has only 16 eval prompts"):
        load_task(load_config("tiny", ["task.n_validation_prompts=16"]).task, tokenizer)
    with pytest.raises(UserError, match="'eval.split': 'validation' needs validation prompts"):
        make_eval_context(
            load_config("tiny", [f"runs_dir={tmp_path}", "eval.split=validation"]),
            build_preferences(base),
            tiny_model,
            tokenizer,
            torch.device("cpu"),
        )
