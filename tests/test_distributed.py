"""Several processes on one run: `accelerate launch` with 2 CPU processes (DDP over gloo) runs the reward model and
PPO, then DPO, on `tiny`. The replicas must end with identical parameters (the saved policy's), and each run
directory must be complete and written once.

About 1 run in 8 of two gloo processes on this kind of machine aborts at interpreter exit ("terminate called
without an active exception") after all of its work is done. The test judges what the run wrote: such an exit
passes only when the pipeline printed its last line and every run directory says `completed`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from rlhf import distributed
from rlhf.config import PROJECT_ROOT
from rlhf.errors import UserError
from rlhf.models import load_causal_lm

ABORT_AT_EXIT = "terminate called without an active exception"


def _launch(runs: Path, command: str, last_line: str, *overrides: str) -> None:
    """`accelerate launch` the CLI in 2 processes with the shipped CPU config; fail on any real error."""
    launcher = Path(sys.executable).parent / "accelerate"
    proc = subprocess.run(
        [str(launcher), "launch", "--config_file", str(PROJECT_ROOT / "configs" / "accelerate" / "cpu-ddp.yaml"),
         "--num_processes", "2", "-m", "pipelines", command, "--profile", "tiny", f"runs_dir={runs}", *overrides],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=1200,
        env={**os.environ, "OMP_NUM_THREADS": "1"})  # one thread per process: 2 processes on 2 cores
    statuses = [json.loads(m.read_text()).get("status") for m in runs.glob("tiny/*/*/manifest.json")
                if m.parent.parent.name != "data"]
    finished = last_line in proc.stdout and statuses and all(s == "completed" for s in statuses)
    if proc.returncode != 0 and not (ABORT_AT_EXIT in proc.stderr and finished):
        pytest.fail(f"{command} in 2 processes exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    assert finished, f"{command}: statuses {statuses}\n{proc.stdout[-2000:]}"


def _only_run(runs: Path, method: str) -> Path:
    found = sorted((runs / "tiny" / method).iterdir())
    assert len(found) == 1, f"{method}: expected one run directory, found {[p.name for p in found]}"
    return found[0]


def _check_run(run: Path, train_steps: int, eval_steps: set[int]) -> dict:
    """A complete run, written once: completed, 2 equal replicas, every metrics row and sample file exactly once."""
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    replicas = manifest["replicas"]
    assert replicas["num_processes"] == 2 and len(replicas["param_sha256"]) == 2
    assert replicas["param_sha256"][0] == replicas["param_sha256"][1], "the two DDP replicas differ"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    counts = Counter((r["kind"], r["step"]) for r in rows)
    assert max(counts.values()) == 1, f"rows written more than once: {[k for k, n in counts.items() if n > 1]}"
    assert sorted(s for k, s in counts if k == "train") == list(range(1, train_steps + 1))
    assert {s for k, s in counts if k == "eval"} == eval_steps
    assert sorted(p.name for p in (run / "samples").iterdir()) == [f"eval_step{s:06d}{suffix}" for s in sorted(eval_steps)
                                                                   for suffix in (".jsonl", ".prompts.csv")]
    assert not list((run / "checkpoints").glob("checkpoint-*")), "resume points are removed on completion"
    return manifest


def test_ppo_and_dpo_in_two_processes_keep_identical_replicas_and_write_each_run_once(tmp_path):
    runs = tmp_path / "runs"
    _launch(runs, "ppo", "PPO beta 0.1 seed 0:", "ppo.checkpoint_every=2")
    _launch(runs, "dpo", "run directory:", "dpo.checkpoint_every=2")

    assert len(list((runs / "tiny" / "data").iterdir())) == 1, "the preference set is built once"
    rm = _only_run(runs, "reward_model")
    rm_manifest = json.loads((rm / "manifest.json").read_text())
    assert rm_manifest["status"] == "completed" and rm_manifest["replicas"]["num_processes"] == 2
    assert len(set(rm_manifest["replicas"]["param_sha256"])) == 1
    # tiny: PPO 4 iterations, eval every 2; DPO 32 pairs in global batches of 8 (4 a process), eval every 2
    ppo = _check_run(_only_run(runs, "ppo"), train_steps=4, eval_steps={0, 2, 4})
    assert ppo["num_processes"] == 2 and ppo["reward_model_path"] == str(rm / "checkpoints" / "final")
    for method in ("ppo", "dpo"):
        run = _only_run(runs, method)
        manifest = _check_run(run, train_steps=4, eval_steps={0, 2, 4})
        saved = load_causal_lm(str(run / "checkpoints" / "final"))
        assert distributed.parameter_digest(saved) == manifest["replicas"]["param_sha256"][0], \
            f"{method}: the saved policy is not the replicas' parameters"


def test_a_batch_that_does_not_split_over_the_processes_is_an_error_naming_the_key(monkeypatch):
    assert distributed.per_process(8, "dpo.batch_size") == 8  # one process: the whole batch
    monkeypatch.setattr(distributed, "num_processes", lambda: 3)
    with pytest.raises(UserError, match=r"dpo.batch_size=8 does not split evenly over 3 processes"):
        distributed.per_process(8, "dpo.batch_size")
    assert distributed.per_process(9, "dpo.batch_size") == 3
