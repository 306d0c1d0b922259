import json
import os
import shutil
import threading

import pytest
import torch
import yaml

from rlhf import rundir
from rlhf.atomic import atomic_write_text, read_jsonl
from rlhf.checkpoints import CHECKPOINT_RECORD, commit_checkpoint, latest_checkpoint
from rlhf.config import load_config
from rlhf.errors import Diverged, UserError, check_finite
from rlhf.keys import reward_model_key, run_key
from rlhf.rundir import RunDir, completed, completed_run


def test_run_directory_contents_and_status(tiny_cfg):
    run = RunDir.create(tiny_cfg, "dpo", 0, torch.device("cpu"), "abc")
    with run.running():
        run.log({"kind": "train", "step": 1, "wall_seconds": 0.5, "tokens": 10, "loss": 0.7})
        with run.stage("train", torch.device("cpu")):
            pass
        run.write_samples(1, [{"prompt": "p", "response": "r"}])
    m = json.loads((run.path / "manifest.json").read_text())
    assert m["status"] == "completed" and m["data_sha256"] == "abc" and m["seed"] == 0 and m["method"] == "dpo"
    assert {"torch", "transformers", "trl", "peft"} <= set(m["packages"]) and m["finished_at"]
    assert yaml.safe_load((run.path / "config.yaml").read_text())["beta"] == tiny_cfg.beta
    rows, bad = read_jsonl(run.path / "metrics.jsonl")
    assert rows == [{"kind": "train", "step": 1, "wall_seconds": 0.5, "tokens": 10, "loss": 0.7}] and bad == []
    t = json.loads((run.path / "timings.json").read_text())
    assert t["train"]["seconds"] >= 0 and t["train"]["peak_memory_mb"] > 0
    assert (run.path / "samples" / "eval_step000001.jsonl").exists()


def test_the_package_versions_a_run_records_count_in_no_key(tiny_cfg, monkeypatch):
    """The manifest records what computed the run (peft: LoRA's layers), for the reader: a run completed under other
    versions is found by its key all the same."""
    monkeypatch.setattr(rundir, "package_versions", lambda: {"torch": "0.0", "peft": "0.0"})
    run = RunDir.create(tiny_cfg, "dpo", 0, torch.device("cpu"), "abc")
    with run.running():
        pass
    monkeypatch.undo()
    assert completed_run(tiny_cfg, "dpo", 0, "abc", None) == run.path


def test_crashed_run_says_failed_with_the_error(tiny_cfg):
    run = RunDir.create(tiny_cfg, "ppo", 0, torch.device("cpu"), None)
    with pytest.raises(RuntimeError):
        with run.running():
            raise RuntimeError("loss is nan at step 3")
    m = json.loads((run.path / "manifest.json").read_text())
    assert m["status"] == "failed" and m["error"] == "RuntimeError: loss is nan at step 3"


def test_runs_started_at_once_never_share_a_directory(tiny_cfg):
    paths = []
    threads = [
        threading.Thread(target=lambda: paths.append(RunDir.create(tiny_cfg, "dpo", 0, torch.device("cpu"), None).path))
        for _ in range(8)
    ]
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

    monkeypatch.setattr("rlhf.atomic.os.replace", crash)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


# --- resume: which run is continued, from which checkpoint, and what is dropped (docs/reliability.md) ---------


def _interrupted_run(cfg, steps=(0, 1, 2, 3), checkpoints=(2,)):
    """A run as a kill leaves it: rows up to step 3 (and half a line), samples, committed checkpoint(s)."""
    run = RunDir.create(cfg, "ppo", 0, torch.device("cpu"), "abc")
    for step in steps:
        run.log({"kind": "train", "step": step, "wall_seconds": float(step), "tokens": 10 * step})
        run.write_samples(step, [{"prompt_index": 0, "prompt": "p", "response": f"r{step}", "kl": 0.5}])
    with open(run.path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "eval", "step": 4, "wall')
    for step in checkpoints:
        folder = run.path / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "state.pt").write_bytes(bytes([step]) * 100)
        commit_checkpoint(folder, step)
    return run


def _open(cfg, seed=0):
    return RunDir.open(cfg, "ppo", seed, torch.device("cpu"), "abc")


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_killed_run_is_resumed_once_from_its_checkpoint_and_a_live_one_never(tiny_cfg):
    run = _interrupted_run(tiny_cfg)
    live, checkpoint = _open(tiny_cfg)  # `run` still holds its lock: its process is alive
    assert live.path != run.path and checkpoint is None
    live.finish()
    run.release()  # what the kernel does when kill -9 ends the process; the manifest still says running

    resumed, checkpoint = _open(tiny_cfg)
    assert resumed.path == run.path and checkpoint == run.path / "checkpoints" / "checkpoint-2"
    rows, bad = read_jsonl(run.path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2] and bad == []  # rows after the checkpoint (and the torn line) go
    assert sorted(p.name for p in (run.path / "samples").iterdir()) == [
        f"eval_step00000{s}{suffix}" for s in (0, 1, 2) for suffix in (".jsonl", ".prompts.csv")
    ]
    m = json.loads((run.path / "manifest.json").read_text())
    assert m["status"] == "running" and m["resumed"][0]["from_step"] == 2
    assert m["resumed"][0]["previous_status"] == "running"

    other, checkpoint = _open(tiny_cfg)  # started at the same time: the resumed run is taken
    assert other.path not in (run.path, live.path) and checkpoint is None
    other.finish()
    resumed.finish("failed", RuntimeError("power cut"))
    assert _open(tiny_cfg)[0].path == run.path  # a failed run resumes too


def test_a_tracker_sees_a_resumed_run_once(tiny_cfg):
    """`report_to: [tensorboard]`: the rows a resume drops and writes again are hidden from TensorBoard too
    (purge_step), so each step shows once, with the value the resumed run wrote."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg.with_values({"report_to": ["tensorboard"]})
    run = _interrupted_run(cfg)  # rows 0..3 (tracked as train/wall_seconds), a checkpoint at 2
    run.release()
    resumed, _ = _open(cfg)
    resumed.log({"kind": "train", "step": 3, "wall_seconds": 30.0, "loss": 0.5})
    resumed.finish()
    events = EventAccumulator(str(run.path / "tracker"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/wall_seconds")] == [(0, 0), (1, 1), (2, 2), (3, 30)]
    assert [e.step for e in events.Scalars("train/loss")] == [3]


def test_a_methods_own_section_keys_its_runs_alone(tiny_cfg):
    """DPO's settings key DPO's runs, not PPO's (and the reward model's settings key the reward model, whatever the
    beta, which keys PPO through its path alone): tuning one method leaves the others' completed runs reusable. A
    shared key (beta, the budget) keys them all; trackers and resume intervals key none."""

    def key(method, **values):
        return run_key(tiny_cfg.with_values(values), method, 0, "abc", None)

    def rm_key(**values):
        return reward_model_key(tiny_cfg.with_values(values), "abc", 0)

    assert (
        key(
            "ppo",
            **{
                "rloo.learning_rate": 0.123,
                "dpo.learning_rate": 0.123,
                "reward_model.learning_rate": 0.123,
                "preferred_ft.learning_rate": 0.123,
                "bon.n": [1],
            },
        )
        == key("ppo")
        != key("ppo", beta=0.2)
    )
    assert key("ppo-gt", **{"ppo.learning_rate": 0.123}) != key("ppo-gt")
    assert key("dpo", **{"ppo.learning_rate": 0.123, "reward_model.learning_rate": 0.123}) == key("dpo")
    assert key("dpo", **{"dpo.learning_rate": 0.123}) != key("dpo") != key("dpo", **{"budget.epochs": 3})
    assert (
        key("dpo-ipo", **{"dpo.learning_rate": 0.123})
        != key("dpo-ipo")
        == key("dpo-ipo", **{"ppo.learning_rate": 0.123})
    )
    assert (
        rm_key(**{"dpo.learning_rate": 0.123, "beta": 0.2})
        == rm_key()
        != rm_key(**{"reward_model.learning_rate": 0.123})
    )
    assert (
        key("preferred-ft", **{"preferred_ft.learning_rate": 0.123})
        != key("preferred-ft")
        == key("preferred-ft", **{"dpo.learning_rate": 0.123})
    )
    assert key("rloo", **{"rloo.learning_rate": 0.123}) != key("rloo") and key("rloo") != key("ppo")
    assert (
        key("online-dpo", **{"online_dpo.batch_size": 6})
        != key("online-dpo")
        == key("online-dpo", **{"rloo.learning_rate": 0.123, "dpo.learning_rate": 0.123})
    )
    assert key("dpo", report_to=["tensorboard"]) == key("dpo") == key("dpo", **{"dpo.checkpoint_every": 3})
    assert key("ppo", **{"ppo.checkpoint_every": 3}) == key("ppo")


def test_only_a_run_with_the_same_config_and_seed_is_resumed(tiny_cfg):
    run = _interrupted_run(tiny_cfg)
    run.release()
    for cfg, seed in (
        (tiny_cfg, 1),
        (load_config("tiny", [f"runs_dir={tiny_cfg.runs_dir}", "beta=0.2"]), 0),
        (load_config("tiny", [f"runs_dir={tiny_cfg.runs_dir}", "resume=false"]), 0),
    ):
        new, checkpoint = _open(cfg, seed)
        assert new.path != run.path and checkpoint is None
        new.finish()
    # keys that do not change what a run computes (the report's, the seed list) do not matter
    same = load_config("tiny", [f"runs_dir={tiny_cfg.runs_dir}", "seeds=[0, 5]", "report.spike_k=3"])
    assert _open(same)[0].path == run.path


def test_a_model_later_runs_reuse_is_resumed_and_reused_by_one_key(tiny_cfg):
    """A reward model is named by its artefact key alone: a killed one is continued by the next run with that key
    whatever settings it does not depend on (beta), the completed one is what later runs find by the same key, and
    another key is another model."""

    def open_reward_model(cfg):
        return RunDir.open(
            cfg,
            "reward_model",
            0,
            torch.device("cpu"),
            "abc",
            key="reward_model_key",
            extra={"reward_model_key": reward_model_key(cfg, "abc", 0)},
        )

    killed, _ = open_reward_model(tiny_cfg)
    killed.release()
    other_beta = tiny_cfg.with_values({"beta": 0.2})
    resumed, checkpoint = open_reward_model(other_beta)
    assert resumed.path == killed.path and checkpoint is None and "run_key" not in resumed.manifest
    resumed.finish()
    key = reward_model_key(other_beta, "abc", 0)
    assert completed(tiny_cfg, "reward_model", "reward_model_key", key) == killed.path
    other, _ = open_reward_model(tiny_cfg.with_values({"reward_model.learning_rate": 0.123}))
    assert other.path != killed.path


def test_half_written_checkpoint_is_ignored_and_corrupt_one_is_named_with_nothing_changed(tiny_cfg, capsys):
    run = _interrupted_run(tiny_cfg, checkpoints=(2, 3))
    run.release()
    half = run.path / "checkpoints" / "checkpoint-3"
    (half / CHECKPOINT_RECORD).unlink()  # killed while saving: no record yet
    assert latest_checkpoint(run.path / "checkpoints") == run.path / "checkpoints" / "checkpoint-2"
    assert f"ignoring half-written checkpoint {half}" in capsys.readouterr().out

    state = run.path / "checkpoints" / "checkpoint-2" / "state.pt"
    state.write_bytes(b"\x00" + state.read_bytes()[1:])
    before = _files(run.path)
    with pytest.raises(
        UserError,
        match=rf"checkpoint {run.path}/checkpoints/checkpoint-2 is corrupt: state\.pt "
        r"differs from what was saved \(sha256\); delete that folder",
    ):
        _open(tiny_cfg)
    assert _files(run.path) == before  # nothing rewound, manifest untouched
    state.unlink()
    with pytest.raises(UserError, match=r"checkpoint-2 is incomplete: state\.pt is missing"):
        _open(tiny_cfg)
    shutil.rmtree(run.path / "checkpoints" / "checkpoint-2")  # what the message advises
    again, checkpoint = _open(tiny_cfg)  # no whole checkpoint left: the run starts again from its start
    assert again.path == run.path and checkpoint is None


def test_a_run_killed_before_its_first_checkpoint_starts_again_in_its_own_directory(tiny_cfg, capsys):
    """Not left behind as a dead run beside a new one, which the report would list as killed for ever (issue #20,
    item 5): everything it wrote but its timings (the real cost) goes, and it runs again from step 0."""
    run = _interrupted_run(tiny_cfg, checkpoints=())
    run.release()
    again, checkpoint = _open(tiny_cfg)
    assert again.path == run.path and checkpoint is None
    assert (
        f"resuming {run.path} (status running) from the start: it stopped before its first checkpoint"
        in capsys.readouterr().out
    )
    assert read_jsonl(run.path / "metrics.jsonl") == ([], []) and not list((run.path / "samples").iterdir())
    m = json.loads((run.path / "manifest.json").read_text())
    assert m["status"] == "running" and m["resumed"][0]["from_step"] is None


def test_diverged_run_keeps_its_last_checkpoint_and_is_not_resumed(tiny_cfg):
    run = _interrupted_run(tiny_cfg, steps=(0, 1, 2))
    with pytest.raises(Diverged) as e:
        with run.running():
            raise Diverged("PPO iteration 3: reward is nan")
    assert str(e.value).startswith("PPO iteration 3: reward is nan [last metrics row: step 2; run marked diverged")
    assert f"last good checkpoint: {run.path / 'checkpoints' / 'checkpoint-2'}]" in str(e.value)
    m = json.loads((run.path / "manifest.json").read_text())
    assert m["status"] == "diverged" and m["error"] == "Diverged: PPO iteration 3: reward is nan"
    assert (run.path / "checkpoints" / "checkpoint-2" / "state.pt").exists()
    assert _open(tiny_cfg)[0].path != run.path  # it would diverge again at the same step


def test_completed_run_drops_its_resume_points_and_keeps_the_final_model(tiny_cfg):
    run = _interrupted_run(tiny_cfg)
    (run.path / "checkpoints" / "final").mkdir()
    (run.path / "checkpoints" / "final" / "model.safetensors").write_bytes(b"weights")
    with run.running():
        pass
    assert [p.name for p in (run.path / "checkpoints").iterdir()] == ["final"]
    assert json.loads((run.path / "manifest.json").read_text())["status"] == "completed"


def test_check_finite_names_each_bad_value():
    check_finite("step 1", loss=0.5, kl=torch.tensor(2.0), reward=None)
    with pytest.raises(Diverged, match=r"^DPO step 3: loss is nan, rewards/chosen is inf$"):
        check_finite("DPO step 3", loss=float("nan"), **{"rewards/chosen": torch.tensor(float("inf")), "ok": 1.0})


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


@pytest.fixture
def umask_027():
    """Run under umask 027 (group may read, others nothing): neither the usual 022 nor mkstemp's private 0600."""
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_what_people_read_gets_the_permissions_the_umask_gives(umask_027, tmp_path, tiny_path, tokenizer):
    """Issue #20, item 2: the report (page, summary, tables, images), a run directory, the preference set and a
    saved model are written with 0666 / 0777 less the umask, atomic writes kept (no temporary file left)."""
    from rlhf.data import build_preferences
    from rlhf.models import load_causal_lm, save_model
    from tests.test_analysis import gold_profile, run_report

    out = run_report(tmp_path, gold_profile(tmp_path))
    cfg = load_config("tiny", [f"runs_dir={tmp_path / 'runs'}"])
    run = RunDir.create(cfg, "dpo", 0, torch.device("cpu"), None)
    run.finish()
    save_model(load_causal_lm(tiny_path), tokenizer, run.path / "checkpoints" / "final")
    pairs = tmp_path / "pairs.jsonl"  # a task with its own pairs: nothing to sample, so the set is built in a blink
    pairs.write_text(
        "".join(json.dumps({"prompt": f"Q{i}?", "chosen": f"yes {i}", "rejected": f"no {i}"}) + "\n" for i in range(10))
    )
    prefs = build_preferences(
        load_config("tiny", [f"runs_dir={tmp_path / 'runs'}", "task.name=preferences", f"task.path={pairs}"])
    )

    written = [out, run.path, prefs.path]
    files = [p for root in written for p in root.rglob("*") if p.is_file() and p.name != ".lock"]
    assert {
        "index.html",
        "summary.md",
        "headline.csv",
        "frontier.png",
        "manifest.json",
        "config.yaml",
        "model.safetensors",
        "dataset_dict.json",
    } <= {p.name for p in files}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o640" for p in files}
    folders = [*written, *(p for root in written for p in root.rglob("*") if p.is_dir())]
    assert {str(p): oct(p.stat().st_mode & 0o777) for p in folders} == {str(p): "0o750" for p in folders}
    assert not [p for root in written for p in root.rglob(".*") if p.name != ".lock"], "a temporary file was left"
