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
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from rlhf import distributed
from rlhf.checkpoints import commit_checkpoint
from rlhf.config import PROJECT_ROOT, load_config
from rlhf.errors import UserError
from rlhf.models import load_causal_lm
from rlhf.rundir import RunDir

ABORT_AT_EXIT = "terminate called without an active exception"


def _accelerate_launch(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    """`accelerate launch` in 2 processes with the shipped CPU config."""
    launcher = Path(sys.executable).parent / "accelerate"
    return subprocess.run(
        [
            str(launcher),
            "launch",
            "--config_file",
            str(PROJECT_ROOT / "configs" / "accelerate" / "cpu-ddp.yaml"),
            "--num_processes",
            "2",
            *args,
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        # one thread per process: 2 processes on 2 cores; this checkout's packages for a script outside it
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)},
    )


def _launch(runs: Path, command: str, last_line: str, *overrides: str) -> None:
    """`accelerate launch` the CLI in 2 processes; fail on any real error."""
    proc = _accelerate_launch("-m", "pipelines", command, "--profile", "tiny", f"runs_dir={runs}", *overrides)
    statuses = [
        json.loads(m.read_text()).get("status")
        for m in runs.glob("tiny/*/*/manifest.json")
        if m.parent.parent.name != "data"
    ]
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
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        f"eval_step{s:06d}{suffix}" for s in sorted(eval_steps) for suffix in (".jsonl", ".prompts.csv")
    ]
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
        assert distributed.parameter_digest(saved) == manifest["replicas"]["param_sha256"][0], (
            f"{method}: the saved policy is not the replicas' parameters"
        )


def test_a_batch_that_does_not_split_over_the_processes_is_an_error_naming_the_key(monkeypatch):
    assert distributed.per_process(8, "dpo.batch_size") == 8  # one process: the whole batch
    monkeypatch.setattr(distributed, "num_processes", lambda: 3)
    with pytest.raises(UserError, match=r"dpo.batch_size=8 does not split evenly over 3 processes"):
        distributed.per_process(8, "dpo.batch_size")
    assert distributed.per_process(9, "dpo.batch_size") == 3


RESUMES = """
import json, sys
from pathlib import Path
from ppo import checkpoint
from rlhf.config import load_config
from rlhf.models import resolve_model_path
from tests.test_ppo_checkpoint import Run

tiny_path = resolve_model_path(load_config("tiny").model)
whole = Run(tiny_path, seed=0)
for _ in range(2):
    whole.iteration()
folder = checkpoint.save(Path(sys.argv[1]), 2, whole.accelerator, {})
numbers = [whole.iteration() for _ in range(2)]
resumed = Run(tiny_path, seed=1)
checkpoint.restore(folder, resumed.accelerator)
rank = whole.accelerator.process_index
Path(sys.argv[2], f"process{rank}.json").write_text(json.dumps({
    "files": sorted(p.name for p in folder.iterdir()), "whole": numbers,
    "resumed": [resumed.iteration() for _ in range(2)]}))
"""


def test_each_process_resumes_from_its_own_random_state(tmp_path):
    """tests/test_ppo_checkpoint.py's learner in 2 processes, each drawing its own random numbers: every process
    calls save_state, which writes the weights once and each process's RNG; restored, each process goes on with the
    numbers it would have drawn. Judged by what each process wrote (a gloo run may abort at interpreter exit after
    its work is done)."""
    (tmp_path / "script.py").write_text(RESUMES)
    out = _accelerate_launch(str(tmp_path / "script.py"), str(tmp_path / "checkpoints"), str(tmp_path), timeout=600)
    seen = [tmp_path / f"process{rank}.json" for rank in (0, 1)]
    assert all(p.exists() for p in seen), f"exit {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    first, second = (json.loads(p.read_text()) for p in seen)
    assert first["files"] == second["files"] and {"random_states_0.pkl", "random_states_1.pkl"} <= set(first["files"])
    assert first["whole"] != second["whole"]  # the processes drew different numbers
    assert first["resumed"] == first["whole"] and second["resumed"] == second["whole"]


STOPS = """
import json, sys
from pathlib import Path
import torch
from rlhf import distributed
from rlhf.config import load_config
from rlhf.errors import Diverged, UserError
from rlhf.rundir import RunDir

rank, seen = distributed.state().process_index, {}


def attempt(case, stop):
    try:
        stop()
        seen[case] = None
    except (UserError, Diverged) as e:
        seen[case] = f"{type(e).__name__}: {e}"


def main_process_fails():
    with distributed.stop_together():
        if distributed.is_main():
            raise UserError("evaluation on the main process: no eval prompts")


attempt("NaN on process 1 only", lambda: distributed.check_finite_everywhere(
    "PPO iteration 3", reward=float("nan") if rank == 1 else 0.5))
attempt("error on the main process only", main_process_fails)
attempt("corrupt checkpoint", lambda: RunDir.open(load_config("tiny", [f"runs_dir={sys.argv[1]}"]), "dpo", 0,
                                                  torch.device("cpu"), None))
attempt("nothing wrong", lambda: distributed.check_finite_everywhere("PPO iteration 4", reward=0.5))
Path(sys.argv[2], f"process{rank}.json").write_text(json.dumps(seen))
"""


def test_what_one_process_meets_stops_every_process_with_the_same_message(tmp_path):
    """Issue #20, item 6: a NaN seen by one process, an error on the main process alone, a corrupt checkpoint: every
    process stops there with the same message, none left waiting at a collective the others never reach. Judged by
    what each process wrote (a gloo run may abort at interpreter exit after its work is done)."""
    cfg = load_config("tiny", [f"runs_dir={tmp_path / 'runs'}"])
    crashed = RunDir.create(cfg, "dpo", 0, torch.device("cpu"), None)  # failed after its checkpoint at step 2
    checkpoint = crashed.path / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.pt").write_bytes(b"weights")
    commit_checkpoint(checkpoint, 2)
    (checkpoint / "state.pt").write_bytes(b"torn")
    crashed.finish("failed")
    (tmp_path / "script.py").write_text(STOPS)
    out = _accelerate_launch(str(tmp_path / "script.py"), str(tmp_path / "runs"), str(tmp_path), timeout=600)

    seen = [tmp_path / f"process{rank}.json" for rank in (0, 1)]
    assert all(p.exists() for p in seen), f"exit {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    first, second = (json.loads(p.read_text()) for p in seen)
    assert first == second
    assert first == {
        "NaN on process 1 only": "Diverged: PPO iteration 3: reward is nan",
        "error on the main process only": "UserError: evaluation on the main process: no eval prompts",
        "corrupt checkpoint": f"UserError: checkpoint {checkpoint} is corrupt: state.pt differs from what was saved "
        "(sha256); delete that folder to resume from an earlier checkpoint (or from the start), "
        "or set resume=false to leave this run as it is and start a new one",
        "nothing wrong": None,
    }


NAN_ON_PROCESS_1 = """
import os, sys
import rlhf.tasks
if os.environ["LOCAL_RANK"] == "1":  # process 1's rollouts alone get a NaN gold reward
    rlhf.tasks.vader_compound = lambda texts: [float("nan")] * len(texts)
from pipelines.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_nan_in_one_process_rollouts_stops_both_and_marks_the_run_diverged(tmp_path):
    """PPO-GT (no reward model to train first) in 2 processes where process 1's rewards are NaN: both processes stop
    at iteration 1 with the same message and the run says `diverged`, rather than process 0 waiting in the gradient
    all-reduce for a process that has stopped."""
    (tmp_path / "nan.py").write_text(NAN_ON_PROCESS_1)
    out = _accelerate_launch(
        str(tmp_path / "nan.py"),
        "ppo",
        "--profile",
        "tiny",
        f"runs_dir={tmp_path / 'runs'}",
        "ppo.reward=gold",
        timeout=600,
    )
    # both processes write to one stderr: one's message may follow the other's progress bar on its line
    stops = re.findall(r"diverged: [^\n]*", out.stderr)
    assert len(stops) == 2 and all(s.startswith("diverged: PPO iteration 1: reward is nan") for s in stops), (
        f"exit {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    )
    (run,) = (tmp_path / "runs" / "tiny" / "ppo-gt").iterdir()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "diverged" and manifest["error"] == "Diverged: PPO iteration 1: reward is nan"
