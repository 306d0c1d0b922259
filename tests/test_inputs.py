"""Issue #20, item 1: every input the project reads (preference files in each format, YAML profiles, model folders,
checkpoints, run directories) that is not what it should be fails with one line naming the file and what is wrong
(not UTF-8, not valid JSON or YAML, wrong columns, cut short), never a traceback."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch

from pipelines.__main__ import main as cli
from rlhf.atomic import read_jsonl
from rlhf.checkpoints import CHECKPOINT_RECORD, latest_checkpoint
from rlhf.config import load_config
from rlhf.data import load_preferences, preference_dir
from rlhf.errors import UserError
from rlhf.models import resolve_model_path
from rlhf.reference import sft_rows
from rlhf.rundir import RunDir

NOT_UTF8 = b"\xff\xfe\x00bad"  # the file: `printf '\xff\xfe\x00bad' > rows.jsonl`
ROWS = [{"prompt": f"Question {i}?", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"} for i in range(6)]
JSONL = "".join(json.dumps(r) + "\n" for r in ROWS).encode()


def _write(name: str, data: bytes):
    def make(tmp: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name

    return make


def _not_a_datasets_folder(tmp: Path) -> Path:
    (tmp / "pairs").mkdir()
    (tmp / "pairs" / "notes.txt").write_text("hello")
    return tmp / "pairs"


# (task.name, how to make the file, what the one line must say after "error: ")
PREFERENCE_FILES = {
    "jsonl not UTF-8": ("preferences", _write("rows.jsonl", NOT_UTF8), "rows.jsonl line 1: not UTF-8 text"),
    "jsonl not UTF-8 on line 4": (
        "preferences",
        _write("rows.jsonl", b"".join(JSONL.splitlines(True)[:3]) + NOT_UTF8),
        "rows.jsonl line 4: not UTF-8 text",
    ),
    "json not UTF-8": ("preferences", _write("rows.json", NOT_UTF8), "rows.json: not UTF-8 text"),
    "json not JSON": (
        "preferences",
        _write("rows.json", b'[{"prompt": "p", "cho'),
        "rows.json: not valid JSON (Unterminated string starting at: line 1 column 18)",
    ),
    "csv not UTF-8": (
        "preferences",
        _write("rows.csv", b"prompt,chosen,rejected\n" + NOT_UTF8 + b",a,b\n"),
        "rows.csv: not UTF-8 text",
    ),
    "csv not CSV": (
        "preferences",
        _write("rows.csv", b'prompt,chosen,rejected\n"unclosed,a,b\n'),
        "rows.csv: Error tokenizing data",
    ),
    "csv wrong columns": (
        "preferences",
        _write("rows.csv", b"question,answer\n" + b"q,a\n" * 6),
        "rows.csv row 1: field 'chosen' is missing",
    ),
    "parquet not parquet": (
        "preferences",
        _write("rows.parquet", JSONL),
        "rows.parquet: Parquet magic bytes not found in footer",
    ),
    "gzip cut short": (
        "preferences",
        _write("rows.jsonl.gz", gzip.compress(JSONL)[:60]),
        "rows.jsonl.gz: truncated or corrupt (Compressed file ended before the end-of-stream marker",
    ),
    "gzip not gzip": ("preferences", _write("rows.jsonl.gz", JSONL), "rows.jsonl.gz: not a gzip file"),
    "not a datasets folder": ("preferences", _not_a_datasets_folder, "pairs: Directory"),
    "hh not UTF-8": ("hh", _write("hh.jsonl", NOT_UTF8), "hh.jsonl line 1: not UTF-8 text"),
}


def _one_line(err: str) -> str:
    """The CLI's one line for a user mistake (progress bars may surround it); no traceback anywhere."""
    assert "Traceback" not in err, err[-3000:]
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    return line


@pytest.mark.parametrize("case", list(PREFERENCE_FILES))
def test_a_bad_preference_file_is_one_line_naming_it(case, tmp_path, capsys):
    task, make, message = PREFERENCE_FILES[case]
    path = make(tmp_path)
    status = cli(
        ["data", "--profile", "tiny", f"runs_dir={tmp_path / 'runs'}", f"task.name={task}", f"task.path={path}"]
    )
    line = _one_line(capsys.readouterr().err)
    assert status == 2 and line.startswith(f"error: {message}"), line
    data = tmp_path / "runs" / "tiny" / "data"
    assert not data.exists() or not any(data.iterdir())


@pytest.mark.parametrize(
    "text, message",
    [
        (b"beta: 0.1\n" + NOT_UTF8, "not UTF-8 text (invalid start byte)"),
        (b"beta: [0.1\nseeds: [0]\n", "not valid YAML (expected ',' or ']', but got ':': line 2 column 6)"),
        (b"- beta\n", "the top level must be a mapping of config keys"),
    ],
    ids=["not UTF-8", "not YAML", "not a mapping"],
)
def test_a_bad_yaml_profile_is_one_line_naming_it(text, message, tmp_path):
    (tmp_path / "mine.yaml").write_bytes(text)
    with pytest.raises(UserError) as e:
        load_config("mine", config_dir=tmp_path)
    assert str(e.value) == f"{tmp_path / 'mine.yaml'}: {message}"


@pytest.mark.parametrize("file, data", [("corpus.jsonl", b""), ("corpus.json", b"[]")])
def test_an_empty_sft_corpus_is_one_line_naming_its_key(file, data, tmp_path):
    (tmp_path / file).write_bytes(data)
    cfg = load_config("tiny", ["sft_stage.enabled=true", f"sft_stage.path={tmp_path / file}"])
    with pytest.raises(UserError) as e:
        sft_rows(cfg, tokenizer=None)  # a corpus is read without it
    assert str(e.value) == f"sft_stage.path: {file} holds no texts"


@pytest.mark.parametrize(
    "file, data, message",
    [
        ("config.json", NOT_UTF8, "config.json: not UTF-8 text"),
        ("config.json", b"[1, 2]", "config.json: expected a JSON object, got list"),
        ("tokenizer.json", b'{"version": ', "tokenizer.json: not valid JSON (Expecting value: line 1 column 13)"),
        ("tokenizer_config.json", NOT_UTF8, "tokenizer_config.json: not UTF-8 text"),
    ],
    ids=["config not UTF-8", "config not an object", "tokenizer not JSON", "tokenizer config not UTF-8"],
)
def test_a_model_folder_with_a_broken_file_is_one_line_naming_the_file(file, data, message, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(resolve_model_path(load_config("tiny").model), model)
    (model / file).write_bytes(data)
    status = cli(["data", "--profile", "tiny", f"runs_dir={tmp_path / 'runs'}", f"model.name_or_path={model}"])
    line = _one_line(capsys.readouterr().err)
    assert status == 2 and line.startswith(f"error: {model / message}"), line


def test_a_damaged_checkpoint_record_is_named(tmp_path):
    folder = tmp_path / "checkpoints" / "checkpoint-2"
    folder.mkdir(parents=True)
    (folder / CHECKPOINT_RECORD).write_bytes(NOT_UTF8)
    with pytest.raises(UserError, match=rf"^checkpoint {folder}: {CHECKPOINT_RECORD} is unreadable \(.*utf-8"):
        latest_checkpoint(tmp_path / "checkpoints")


@pytest.mark.parametrize(
    "data, message",
    [(NOT_UTF8, "not UTF-8 text"), (b'{"status": ', "not valid JSON"), (b"[]", "expected a JSON object, got list")],
    ids=["not UTF-8", "not JSON", "not an object"],
)
def test_a_damaged_run_manifest_is_named_when_runs_are_looked_up(tiny_cfg, data, message):
    """A run directory whose manifest.json was damaged after its run wrote it (writes are atomic) stops the next
    run's search for a run to resume with one line naming it, and nothing is created."""
    damaged = RunDir.create(tiny_cfg, "dpo", 0, torch.device("cpu"), None)
    damaged.finish("failed")
    (damaged.path / "manifest.json").write_bytes(data)
    with pytest.raises(UserError) as e:
        RunDir.open(tiny_cfg, "dpo", 0, torch.device("cpu"), None)
    assert str(e.value).startswith(f"{damaged.path / 'manifest.json'}: {message}") and "\n" not in str(e.value)
    assert [p.name for p in damaged.path.parent.iterdir()] == [damaged.path.name]


def test_a_damaged_preference_set_manifest_is_named(tiny_cfg):
    folder = preference_dir(tiny_cfg)
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_bytes(NOT_UTF8)
    with pytest.raises(UserError, match=rf"^{folder / 'manifest.json'}: not UTF-8 text .*; delete {folder} to rebuild"):
        load_preferences(tiny_cfg)


def test_a_metrics_line_torn_inside_a_utf8_character_is_skipped_like_any_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2, "note": "caf' + "é".encode()[:1])
    assert read_jsonl(path) == ([{"step": 1}], [2])
