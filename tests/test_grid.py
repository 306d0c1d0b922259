"""The grid runner (issue #22, item 2): independent runs side by side give the numbers they give one by one, never
share a run directory, and a killed grid resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pipelines import grid
from rlhf.checkpoints import CHECKPOINT_RECORD
from rlhf.config import PROJECT_ROOT, load_config
from rlhf.errors import UserError

COMMON = ["--profile", "tiny", "seeds=[0,1]"]


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipelines", *args], cwd=PROJECT_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def _finish(process: subprocess.Popen) -> str:
    out = process.communicate(timeout=900)[0].decode()
    assert process.returncode == 0, out[-3000:]
    return out


def _evals(runs) -> dict[tuple, list[dict]]:
    """Every completed run's eval rows by (method, beta, seed), wall-clock fields dropped."""
    found = {}
    for manifest_path in sorted(runs.glob("*/*/manifest.json")):
        m = json.loads(manifest_path.read_text())
        if m.get("method", "reference") == "reference":  # the preference set's manifest has no method
            continue
        assert m["status"] == "completed", manifest_path
        key = (m["method"], m["beta"], m["seed"])
        assert key not in found, f"two completed runs of {key}"
        rows = [json.loads(line) for line in (manifest_path.parent / "metrics.jsonl").read_text().splitlines()]
        found[key] = [{k: v for k, v in r.items() if "seconds" not in k} for r in rows if r["kind"] == "eval"]
    return found


def test_phases_reference_and_reward_models_first_then_method_x_beta_x_seed():
    cfg = load_config("tiny", ["seeds=[0,1]", "beta_sweep=[0.1,0.5]", "grid.methods=[ppo-gt,dpo,bon,sft-chosen]"])
    reference, reward_models, runs = grid.phases(cfg)
    assert [j.command for j in reference] == ["reference"]
    assert [j.label for j in reward_models] == ["reward_model-seed0", "reward_model-seed1"]
    assert [j.label for j in runs] == (
        [f"ppo-gt-beta{b}-seed{s}" for b in (0.1, 0.5) for s in (0, 1)]
        + [f"dpo-beta{b}-seed{s}" for b in (0.1, 0.5) for s in (0, 1)]
        + ["bon", "sft-chosen-beta0.1-seed0", "sft-chosen-beta0.1-seed1"])  # neither has a beta to sweep
    assert runs[0].command == "ppo" and "ppo.reward=gold" in runs[0].overrides
    assert len({j.label for j in runs}) == len(runs)  # one job, one log file
    # PPO-GT and Preferred-FT alone need no reward model: no phase for it
    only = load_config("tiny", ["grid.methods=[ppo-gt,sft-chosen]"])
    assert [len(p) for p in grid.phases(only)] == [1, 2]
    # one shared reward model (reward_model.per_seed false): one job trains it
    shared = load_config("tiny", ["seeds=[0,1]", "reward_model.per_seed=false"])
    assert [j.label for j in grid.phases(shared)[1]] == [f"reward_model-seed{shared.reward_model.seed}"]


def test_jobs_go_round_robin_over_the_gpus_and_split_the_cpu(monkeypatch):
    cfg = load_config("tiny", ["grid.jobs=4"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [grid.job_environment(cfg, slot, 4)["CUDA_VISIBLE_DEVICES"] for slot in range(4)] == ["0", "1", "0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # the user's own choice of devices is kept
    assert grid.job_environment(cfg, 1, 4)["CUDA_VISIBLE_DEVICES"] == "5"
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert grid.job_environment(cfg, 0, 4)["OMP_NUM_THREADS"] == "4"
    assert "OMP_NUM_THREADS" not in grid.job_environment(cfg, 0, 1)  # one job alone: torch's own choice


def test_training_jobs_go_through_makes_launcher_one_at_a_time(monkeypatch):
    launcher = ["accelerate", "launch", "--num_processes", "2", "-m", "pipelines"]
    reference, reward_models, runs = grid.phases(load_config("tiny"))
    assert grid.command_line(runs[0], "tiny", ["beta=0.3"], launcher) == [
        *launcher, "ppo", "--profile", "tiny", "beta=0.3", "beta=0.1", "beta_sweep=[]", "seeds=[0]"]
    assert grid.command_line(reference[0], "tiny", [], launcher)[:3] == [sys.executable, "-m", "pipelines"]
    monkeypatch.setenv("GRID_TRAIN_CLI", " ".join(launcher))
    with pytest.raises(UserError, match=r"grid.jobs=2 with NPROC > 1"):
        grid.main(load_config("tiny", ["grid.jobs=2"]), [])


def test_the_grid_side_by_side_equals_the_runs_one_by_one(tmp_path):
    # The same thread count both ways: on a CPU a run's numbers depend on it (summation order)
    one_thread = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    alone = [*COMMON, f"runs_dir={tmp_path / 'alone'}"]
    for command in ("reference", "ppo", "dpo"):  # `make all`'s order before the grid
        _finish(_cli(command, *alone, env=one_thread))
    out = _finish(_cli("grid", *COMMON, f"runs_dir={tmp_path / 'grid'}", "grid.jobs=2", "grid.threads_per_job=1"))
    assert "grid: all 7 jobs completed" in out
    sequential, side_by_side = _evals(tmp_path / "alone" / "tiny"), _evals(tmp_path / "grid" / "tiny")
    assert set(side_by_side) == {(m, 0.1, s) for m in ("reward_model", "ppo", "dpo") for s in (0, 1)}
    assert side_by_side == sequential
    # each job's output in its own log
    logs = tmp_path / "grid" / "tiny" / "grid-logs"
    assert sorted(p.stem for p in logs.glob("*.log")) == sorted(
        ["reference", "reward_model-seed0", "reward_model-seed1", "ppo-beta0.1-seed0", "ppo-beta0.1-seed1",
         "dpo-beta0.1-seed0", "dpo-beta0.1-seed1"])


def test_a_killed_grid_resumes(tmp_path):
    args = ["grid", *COMMON, f"runs_dir={tmp_path / 'runs'}", "grid.jobs=2", "ppo.iterations=8",
            "ppo.checkpoint_every=2"]
    process = _cli(*args, start_new_session=True)  # its own process group: kill -9 reaches every job at once
    ppo = tmp_path / "runs" / "tiny" / "ppo"
    deadline = time.time() + 600
    while not list(ppo.glob(f"*/checkpoints/checkpoint-*/{CHECKPOINT_RECORD}")) and time.time() < deadline:
        assert process.poll() is None, process.communicate()[0].decode()[-3000:]
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed = {p.name for p in ppo.iterdir()}
    assert killed and all(json.loads((ppo / name / "manifest.json").read_text())["status"] == "running"
                          for name in killed)
    out = _finish(_cli(*args))
    assert "grid: all 7 jobs completed" in out
    runs = _evals(tmp_path / "runs" / "tiny")  # asserts one completed run per method x beta x seed, none left over
    assert set(runs) == {(m, 0.1, s) for m in ("reward_model", "ppo", "dpo") for s in (0, 1)}
    assert killed <= {p.name for p in ppo.iterdir()}  # the killed runs continued in their own directories
    resumed = [json.loads((ppo / name / "manifest.json").read_text())["resumed"] for name in killed]
    assert any(resumed), resumed
