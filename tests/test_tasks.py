import gzip
import json

import pytest

from rlhf.config import PROJECT_ROOT, load_config
from rlhf.errors import UserError
from rlhf.tasks import load_hh, load_task, parse_hh_dialogue, sentiment_instructions, split_hh_pair, vader_compound

HH_FILE = PROJECT_ROOT / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def test_vader_ranks_positive_above_negative():
    pos, neg, neutral = vader_compound(
        [
            "A wonderful, moving film with brilliant performances. I loved it.",
            "A dull, painful mess. The acting was terrible and I hated every minute.",
            "The film is ninety minutes long.",
        ]
    )
    assert pos > 0.5 and neg < -0.5 and pos > neutral > neg


def test_sentiment_prompts_deterministic_distinct_disjoint():
    train, eval_ = sentiment_instructions(1000, 200, seed=0)
    assert (train, eval_) == sentiment_instructions(1000, 200, seed=0)
    assert len(set(train)) == 1000 and len(set(eval_)) == 200 and not set(train) & set(eval_)
    assert sentiment_instructions(1000, 200, seed=1)[0] != train
    assert all("review" in t.lower() for t in train + eval_)


def test_sentiment_prompts_use_chat_template_with_empty_system(tokenizer):
    task = load_task(load_config("tiny").task, tokenizer)
    p = task.train_prompts[0]
    assert p.startswith("<|im_start|>system\n<|im_end|>") and p.endswith("<|im_start|>assistant\n")
    assert "SmolLM" not in p  # the template's long default system prompt is not used
    assert task.gold_reward is vader_compound


def test_hh_parsing_on_real_rows(tokenizer):
    with gzip.open(HH_FILE, "rt") as f:
        row = json.loads(f.readline())
    dialogue, chosen, rejected = split_hh_pair(row, "row 1")
    assert dialogue[0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert [m["role"] for m in dialogue] == ["user", "assistant", "user", "assistant", "user"]
    assert chosen.startswith("No, sorry!  All of these involve a pen")
    assert rejected.startswith("There are lots of funny things you can do with pens")

    cfg = load_config("hh").task
    task = load_hh(cfg, tokenizer)
    assert len(task.heldout_pairs) == cfg.n_eval_prompts and len(task.train_pairs) == cfg.n_train_prompts
    assert not {p["prompt"] + p["chosen"] for p in task.train_pairs} & {
        p["prompt"] + p["chosen"] for p in task.heldout_pairs
    }
    first = task.train_pairs[0]
    assert first["prompt"].endswith("<|im_start|>assistant\n") and "<|im_start|>user\n" in first["prompt"]
    assert sum(task.dropped.values()) > 0  # long dialogues are dropped and counted, not crashed on
    assert load_hh(cfg, tokenizer).train_pairs == task.train_pairs  # deterministic split


def test_hh_bad_rows_are_counted_and_dropped(tmp_path, tokenizer):
    rows = [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
        {"chosen": "\n\nHuman: hi\n\nAssistant: same", "rejected": "\n\nHuman: hi\n\nAssistant: same"},
        {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
        {"chosen": "\n\nHuman: hi\n\nAssistant: ok"},
        "not an object",
    ]
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken json\n")
    cfg = load_config("hh", [f"task.path={path}", "task.n_eval_prompts=1"]).task
    task = load_hh(cfg, tokenizer)
    assert len(task.train_pairs) + len(task.heldout_pairs) == 1
    assert task.dropped == {
        "chosen and rejected replies are identical": 1,
        "chosen and rejected do not share the dialogue before the final reply": 1,
        "field 'rejected' is missing or not a string": 1,
        "not a JSON object": 1,
        "invalid JSON": 1,
    }


def test_hh_malformed_dialogue_names_where():
    with pytest.raises(UserError, match="row 7: dialogue does not start with 'Human:'"):
        parse_hh_dialogue("Assistant: hi", "row 7")


def test_hh_file_with_no_usable_rows_is_an_error(tmp_path, tokenizer):
    path = tmp_path / "empty.jsonl"
    path.write_text('{"chosen": 1, "rejected": 2}\n')
    with pytest.raises(UserError, match="no usable preference rows"):
        load_hh(load_config("hh", [f"task.path={path}"]).task, tokenizer)


def _pref_cfg(path, *more):
    return load_config(
        "hh",
        ["task.name=preferences", f"task.path={path}", "task.n_eval_prompts=1", "task.n_validation_prompts=0", *more],
    ).task


def test_any_trl_preference_format_loads(tmp_path, tokenizer):
    from datasets import Dataset

    standard = [{"prompt": f"Q{i}: ", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(6)]
    implicit_conv = [
        {
            "chosen": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "yes"}],
            "rejected": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "no"}],
        }
        for i in range(6)
    ]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in standard))
    (tmp_path / "c.json").write_text(json.dumps(implicit_conv))
    Dataset.from_list(standard).to_parquet(str(tmp_path / "s.parquet"))
    Dataset.from_list(standard).save_to_disk(str(tmp_path / "folder"))
    for source in ("s.jsonl", "s.parquet", "folder"):
        task = load_task(_pref_cfg(tmp_path / source), tokenizer)
        pairs = task.train_pairs + task.heldout_pairs
        assert sorted(p["chosen"] for p in pairs) == sorted(r["chosen"] for r in standard), source
        assert len(task.heldout_pairs) == 1 and task.gold_reward is None
    conv = load_task(_pref_cfg(tmp_path / "c.json"), tokenizer)
    pair = conv.train_pairs[0]
    assert pair["prompt"].endswith("<|im_start|>assistant\n") and (pair["chosen"], pair["rejected"]) == ("yes", "no")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "p", "chosen": "a"}, "rows.jsonl row 2: field 'rejected' is missing"),
        ({"prompt": "p", "chosen": "a", "rejected": 3}, "rows.jsonl row 2: field 'rejected' must be a string"),
        (
            {"prompt": "p", "chosen": "same", "rejected": "same"},
            "rows.jsonl row 2: 'chosen' and 'rejected' are identical",
        ),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "rows.jsonl row 2: field 'chosen' is empty"),
        ({"chosen": [{"role": "user"}], "rejected": [{"role": "user"}]}, "rows.jsonl row 2: malformed conversation"),
    ],
)
def test_malformed_preference_row_is_named(tmp_path, tokenizer, row, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=message):
        load_task(_pref_cfg(path), tokenizer)


def test_preference_dataset_from_hub_needs_hub_access(tokenizer):
    with pytest.raises(UserError, match="'someone/prefs' is not a local file or folder, and this profile is offline"):
        load_task(_pref_cfg("someone/prefs"), tokenizer)
