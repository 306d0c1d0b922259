import json
import threading

import pytest
import torch
import yaml

from pipelines.rundir import RunDir, atomic_write_text, read_jsonl


def test_run_directory_contents_and_status(tiny_cfg):
    run = RunDir.create(tiny_cfg, "dpo", 0, torch.device("cpu"), "abc")
    with run.running():
        run.log({"kind": "train", "step": 1, "wall_seconds": 0.5, "tokens": 10, "loss": 0.7})
        with run.stage("train", torch.device("cpu")):
            pass
        run.write_samples(1, [{"prompt": "p", "response": "r"}])
    m = json.loads((run.path / "manifest.json").read_text())
    assert m["status"] == "completed" and m["data_sha256"] == "abc" and m["seed"] == 0 and m["method"] == "dpo"
    assert {"torch", "transformers", "trl"} <= set(m["packages"]) and m["finished_at"]
    assert yaml.safe_load((run.path / "config.yaml").read_text())["beta"] == tiny_cfg.beta
    rows, bad = read_jsonl(run.path / "metrics.jsonl")
    assert rows == [{"kind": "train", "step": 1, "wall_seconds": 0.5, "tokens": 10, "loss": 0.7}] and bad == []
    t = json.loads((run.path / "timings.json").read_text())
    assert t["train"]["seconds"] >= 0 and t["train"]["peak_memory_mb"] > 0
    assert (run.path / "samples" / "eval_step000001.jsonl").exists()


def test_crashed_run_says_failed_with_the_error(tiny_cfg):
    run = RunDir.create(tiny_cfg, "ppo", 0, torch.device("cpu"), None)
    with pytest.raises(RuntimeError):
        with run.running():
            raise RuntimeError("loss is nan at step 3")
    m = json.loads((run.path / "manifest.json").read_text())
    assert m["status"] == "failed" and m["error"] == "RuntimeError: loss is nan at step 3"


def test_runs_started_at_once_never_share_a_directory(tiny_cfg):
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(
        RunDir.create(tiny_cfg, "dpo", 0, torch.device("cpu"), None).path)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(paths) == 8 and len(set(paths)) == 8


def test_truncated_metrics_line_is_reported_not_fatal(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    rows, bad = read_jsonl(path)
    assert rows == [{"step": 1}, {"step": 2}] and bad == [3]


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    atomic_write_text(path, "old")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr("pipelines.rundir.os.replace", crash)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_each_stage_records_its_own_peak_memory(tiny_cfg):
    device = torch.device("cpu")
    run = RunDir.create(tiny_cfg, "ppo", 0, device, None)
    with run.stage("big", device) as big:
        x = torch.ones(64 * 2**20)  # 256 MB, released before the next stage
        big["tokens"] = 7
    del x
    with run.stage("small", device):
        pass
    t = json.loads((run.path / "timings.json").read_text())
    assert t["big"]["tokens"] == 7
    assert t["big"]["peak_memory_mb"] - t["small"]["peak_memory_mb"] > 200  # not the process's peak so far
