"""The grid runner (issue #22, item 2): independent runs side by side give the numbers they give one by one, never
share a run directory, and a killed grid resumes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from analysis.load import load_runs
from pipelines import clock, grid
from rlhf.checkpoints import CHECKPOINT_RECORD
from rlhf.config import PROJECT_ROOT, load_config
from rlhf.errors import UserError

COMMON = ["--profile", "tiny", "seeds=[0,1]"]


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines", *args],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **kw,
    )


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
    cfg = load_config("tiny", ["seeds=[0,1]", "beta_sweep=[0.1,0.5]", "grid.methods=[ppo-gt,dpo,bon,preferred-ft]"])
    reference, reward_models, runs = grid.phases(cfg)
    assert [j.command for j in reference] == ["reference"]
    assert [j.label for j in reward_models] == ["reward_model-seed0", "reward_model-seed1"]
    assert [j.label for j in runs] == (
        [f"ppo-gt-beta{b}-seed{s}" for b in (0.1, 0.5) for s in (0, 1)]
        + [f"dpo-beta{b}-seed{s}" for b in (0.1, 0.5) for s in (0, 1)]
        + ["bon", "preferred-ft-beta0.1-seed0", "preferred-ft-beta0.1-seed1"]
    )  # neither has a beta to sweep
    assert runs[0].command == "ppo" and "ppo.reward=gold" in runs[0].overrides
    assert len({j.label for j in runs}) == len(runs)  # one job, one log file
    # PPO-GT and Preferred-FT alone need no reward model: no phase for it
    only = load_config("tiny", ["grid.methods=[ppo-gt,preferred-ft]"])
    assert [len(p) for p in grid.phases(only)] == [1, 2]
    # one shared reward model (reward_model.per_seed false): one job trains it
    shared = load_config("tiny", ["seeds=[0,1]", "reward_model.per_seed=false"])
    assert [j.label for j in grid.phases(shared)[1]] == [f"reward_model-seed{shared.reward_model.seed}"]


def test_a_local_grid_runs_seed_by_seed_and_a_job_waits_for_what_it_needs():
    cfg = load_config("tiny", ["seeds=[0,1]", "beta_sweep=[0.1,0.5]", "grid.methods=[ppo-gt,dpo,bon,preferred-ft]"])
    order = grid.in_order(cfg)
    assert [j.label for j in order] == [
        "reference",
        "reward_model-seed0",
        "ppo-gt-beta0.1-seed0",
        "ppo-gt-beta0.5-seed0",
        "dpo-beta0.1-seed0",
        "dpo-beta0.5-seed0",
        "bon",
        "preferred-ft-beta0.1-seed0",
        "reward_model-seed1",
        "ppo-gt-beta0.1-seed1",
        "ppo-gt-beta0.5-seed1",
        "dpo-beta0.1-seed1",
        "dpo-beta0.5-seed1",
        "preferred-ft-beta0.1-seed1",
    ]
    by_label = {j.label: j for j in order}
    assert by_label["dpo-beta0.5-seed1"].needs == ("reference", "reward_model-seed1")
    assert by_label["bon"].needs == ("reference", "reward_model-seed0")  # ranked by the first seed's reward model
    assert by_label["ppo-gt-beta0.1-seed1"].needs == ("reference",)  # trains against the gold reward itself
    # every job's needs come before it: a local grid one job at a time never waits for a later job
    assert all(set(j.needs) <= {k.label for k in order[:i]} for i, j in enumerate(order))
    # the same jobs as the phases a cluster submits
    assert sorted(j.label for j in order) == sorted(j.label for p in grid.phases(cfg) for j in p)
    # one reward model shared by every seed: trained first, whatever its seed
    shared = grid.in_order(load_config("tiny", ["seeds=[0,1]", "reward_model.per_seed=false", "reward_model.seed=1"]))
    assert [j.label for j in shared][:3] == ["reference", "reward_model-seed1", "ppo-beta0.1-seed0"]


def test_jobs_go_round_robin_over_the_gpus_and_split_the_cpu(monkeypatch):
    cfg = load_config("tiny", ["grid.jobs=4"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [grid.job_environment(cfg, slot, 4)["CUDA_VISIBLE_DEVICES"] for slot in range(4)] == ["0", "1", "0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # the user's own choice of devices is kept
    assert grid.job_environment(cfg, 1, 4)["CUDA_VISIBLE_DEVICES"] == "5"
    # one job at a time (what NPROC > 1 requires): `accelerate launch` gets every visible device, not slot 0's
    assert grid.job_environment(cfg, 0, 1)["CUDA_VISIBLE_DEVICES"] == "3,5"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert "CUDA_VISIBLE_DEVICES" not in grid.job_environment(cfg, 0, 1)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert grid.job_environment(cfg, 0, 4)["OMP_NUM_THREADS"] == "4"
    assert "OMP_NUM_THREADS" not in grid.job_environment(cfg, 0, 1)  # one job alone: torch's own choice


def test_training_jobs_go_through_makes_launcher_one_at_a_time(monkeypatch):
    launcher = ["accelerate", "launch", "--num_processes", "2", "-m", "pipelines"]
    reference, reward_models, runs = grid.phases(load_config("tiny"))
    assert grid.command_line(runs[0], "tiny", ["beta=0.3"], launcher) == [
        *launcher,
        "ppo",
        "--profile",
        "tiny",
        "beta=0.3",
        "beta=0.1",
        "beta_sweep=[]",
        "seeds=[0]",
    ]
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
        [
            "reference",
            "reward_model-seed0",
            "reward_model-seed1",
            "ppo-beta0.1-seed0",
            "ppo-beta0.1-seed1",
            "dpo-beta0.1-seed0",
            "dpo-beta0.1-seed1",
        ]
    )


# tests/test_slurm.py has the rest of the submitit launcher's tests
@pytest.mark.parametrize("launcher", [[], ["grid.launcher=slurm", "slurm.executor=local"]], ids=["local", "submitit"])
def test_a_killed_grid_resumes(tmp_path, launcher):
    args = [
        "grid",
        *COMMON,
        f"runs_dir={tmp_path / 'runs'}",
        "grid.jobs=2",
        "ppo.iterations=8",
        "ppo.checkpoint_every=2",
        *launcher,
    ]
    process = _cli(*args, start_new_session=True)  # its own process group: kill -9 reaches every job at once
    ppo = tmp_path / "runs" / "tiny" / "ppo"
    deadline = time.time() + 600
    while not list(ppo.glob(f"*/checkpoints/checkpoint-*/{CHECKPOINT_RECORD}")) and time.time() < deadline:
        assert process.poll() is None, process.communicate()[0].decode()[-3000:]
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed = {p.name for p in ppo.iterdir()}
    assert killed and all(
        json.loads((ppo / name / "manifest.json").read_text())["status"] == "running" for name in killed
    )
    out = _finish(_cli(*args))
    assert "grid: all 7 jobs completed" in out
    runs = _evals(tmp_path / "runs" / "tiny")  # asserts one completed run per method x beta x seed, none left over
    assert set(runs) == {(m, 0.1, s) for m in ("reward_model", "ppo", "dpo") for s in (0, 1)}
    assert killed <= {p.name for p in ppo.iterdir()}  # the killed runs continued in their own directories
    resumed = [json.loads((ppo / name / "manifest.json").read_text())["resumed"] for name in killed]
    assert any(resumed), resumed


def test_a_grid_stopped_part_way_is_reported_over_its_complete_seeds(tmp_path):
    """Stopped as the second seed's DPO run starts, the grid has left seed 0 of both methods and seed 1 of PPO only:
    the report compares seed 0 and names the DPO run seed 1 still needs, rather than pooling PPO over two seeds and
    DPO over one."""
    runs_dir = tmp_path / "runs"
    estimate = _finish(_cli("clock", *COMMON, f"runs_dir={runs_dir}"))  # `make all`'s first line
    assert re.search(r"take about \d+ (s|min|h \d+ min):", estimate), estimate
    process = _cli("grid", *COMMON, f"runs_dir={runs_dir}", start_new_session=True)
    out, deadline = b"", time.time() + 900
    while b"grid: started dpo-beta0.1-seed1" not in out and time.time() < deadline:
        line = process.stdout.readline()
        assert line or process.poll() is None, out.decode()[-3000:]
        out += line
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    started = [line.split()[-1] for line in out.decode().splitlines() if line.startswith("grid: started")]
    assert started == [j.label for j in grid.in_order(load_config("tiny", ["seeds=[0,1]"]))][: len(started)]
    assert started[-1] == "dpo-beta0.1-seed1"
    runs = load_runs(runs_dir / "tiny", ["ppo", "dpo"])
    included = runs.runs[runs.runs["included"] & runs.runs["method"].isin(["ppo", "dpo"])]
    assert sorted(zip(included["method"], included["seed"])) == [("dpo", 0), ("ppo", 0)]
    left_out = runs.runs[(runs.runs["method"] == "ppo") & (runs.runs["seed"] == 1)]
    assert left_out["status"].tolist() == ["completed"] and "seed 1 is not complete" in left_out["reason"].iloc[0]
    assert runs.missing == ["dpo β 0.1 seed 1"]
    # without the rule both PPO seeds would be pooled against one DPO seed
    assert sorted(load_runs(runs_dir / "tiny").runs.query("method == 'ppo' and included")["seed"]) == [0, 1]
    # `make all`'s last lines: every job that completed, its estimate and what it took, as numbers
    took = _finish(_cli("clock", "--took", *COMMON, f"runs_dir={runs_dir}"))
    for label in ("reference", "reward_model-seed0", "ppo-beta0.1-seed0", "dpo-beta0.1-seed0", "ppo-beta0.1-seed1"):
        assert re.search(rf"^  {label} +\d+ (s|min) +\d+ (s|min)$", took, re.M), took
    assert re.search(r"estimate off by [+-]\d+%", took), took


def test_the_clock_counts_the_flops_the_runs_record(tmp_path):
    """The estimate's work is each job's FLOPs, counted from the profile's sizes: it agrees with what each stage's run
    records of itself (rlhf/flops.py) within 10% on tiny, whose prompts are shorter than the default's."""
    cfg = load_config("tiny", [f"runs_dir={tmp_path}"])
    for command in ("reference", "ppo", "dpo"):
        _finish(_cli(command, "--profile", "tiny", f"runs_dir={tmp_path}"))
    sizes, _ = clock.measure_sizes(cfg)
    recorded = {}
    for timings in (tmp_path / "tiny").glob("*/*/timings.json"):
        method = timings.parent.parent.name.replace("_", "-")
        recorded[method] = sum(t.get("flops", 0) or 0 for t in json.loads(timings.read_text()).values())
    for job in grid.in_order(cfg):
        command = job.command
        estimated = sum(clock.job_flops(cfg, command, job.overrides, sizes).values())
        assert estimated == pytest.approx(recorded[command], rel=0.1), (command, estimated, recorded[command])


def test_the_grid_clock_takes_the_pace_of_the_jobs_that_ran():
    tick = clock.Clock({"a": 100.0, "b": 100.0, "c": 300.0})
    assert tick.left(["b", "c"]) == 400.0  # nothing finished: the estimates as they are
    tick.finished("a", 150.0)  # 1.5x slower than estimated here
    assert tick.left(["b", "c"]) == 600.0
    tick.finished("b", 2.0)  # reused: says nothing of the machine's pace
    assert tick.left(["c"]) == 450.0
