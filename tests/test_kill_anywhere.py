"""Issue #20, item 5: `make all PROFILE=tiny` killed anywhere, run again, ends with an uninterrupted run's report.

The uninterrupted run is timed stage by stage. Then `make all` is started again and again in a second folder, each time
killed (SIGKILL to make and the stage it runs, as a power cut would) a seeded random fraction of one stage's duration
after that stage began, or at its end if it comes sooner (a busy machine times stages differently): the preference
set's build, pi_ref's evaluation, the reward model, PPO, DPO, the report, in turn. A last run goes to the end. Its
report must hold the uninterrupted run's numbers (wall-clock aside), its models the same weights, and nothing a kill
left half-written may count as whole. `make test-kill` runs it alone (several minutes).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from rlhf.config import PROJECT_ROOT

SEED = 20
# A resume point at every step of every stage that saves them, so that kills land between resume points
CHECKPOINTS = "reward_model.checkpoint_every=1 ppo.checkpoint_every=1 dpo.checkpoint_every=1"
# Each stage of `make all` that a kill aims at, with the console text that says it has begun and the last it shows
# before its run completes, in their order
STAGES = [
    ("preference set", "preference pairs (train)", "preference set built"),
    ("pi_ref's evaluation", "eval pi_ref", "pi_ref: gold"),
    ("reward model", "reward model seed 0", "reward model: held-out accuracy"),
    ("PPO", "PPO seed 0", "eval @ 4"),
    ("DPO", "pi_ref log-probs", "eval step 4"),
    ("report", "-m pipelines report", "runs included)"),
]
# Not results: what differs from run to run (wall-clock: every column named "... seconds ..."; peak memory), what counts
# the work a kill threw away (the evaluator's FLOPs: timings.json adds them up, docs/reliability.md) and run names
UNCOMPARED = ("peak_memory_mb", "evaluation FLOPs", "run_id", "path")
PNG_END = b"IEND\xaeB`\x82"  # the last chunk of a whole PNG file


def _start(out: Path, log: Path) -> subprocess.Popen:
    """`make all PROFILE=tiny` into `out`, in a process group of its own (to kill with everything it started)."""
    args = f"runs_dir={out / 'runs'} report.out_dir={out / 'reports'} {CHECKPOINTS}"
    # never the flags of a `make test` that runs this test (-j would run the stages side by side)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    with open(log, "w") as f:
        # -o: the virtual environment is the one running this test, never rebuilt here
        return subprocess.Popen(
            [
                "make",
                "--no-print-directory",
                "-o",
                ".venv/.installed",
                "all",
                "PROFILE=tiny",
                f"PY={sys.executable}",
                f"ARGS={args}",
            ],
            cwd=PROJECT_ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**env, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )


def _wait_for(proc: subprocess.Popen, log: Path, text: str, after: int = 0, seconds: float = 600) -> int | None:
    """Where `text` shows in the log after position `after`, as soon as it does; None if `seconds` pass or the command
    ends first."""
    deadline = time.monotonic() + seconds
    while (at := log.read_text(errors="replace").find(text, after)) < 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            return None
        time.sleep(0.05)
    return at


def _finish(proc: subprocess.Popen, log: Path) -> None:
    assert proc.wait(timeout=900) == 0, log.read_text(errors="replace")[-3000:]


def _timed_run(out: Path, log: Path) -> list[float]:
    """Run `make all` to its end; the seconds each of STAGES lasted."""
    proc, at, seconds = _start(out, log), 0, []
    for _, *texts in STAGES:
        times = []
        for text in texts:
            at = _wait_for(proc, log, text, at)
            assert at is not None, f"no {text!r}:\n{log.read_text()[-3000:]}"
            times.append(time.monotonic())
        seconds.append(times[1] - times[0])
    _finish(proc, log)
    return seconds


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the whole process group, and wait until every process in it is gone (its locks with it)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)


def _killed_run(out: Path, log: Path, stage: int, delay: float) -> str | None:
    """Start `make all`, kill it `delay` seconds after STAGES[stage] began, or when that stage ends if sooner, and say
    when; None if the command ended first."""
    proc = _start(out, log)
    _, begins, ends = STAGES[stage]
    began = _wait_for(proc, log, begins)
    ended = began is not None and _wait_for(proc, log, ends, began, seconds=delay) is not None
    if proc.poll() is not None:
        _finish(proc, log)
        return None
    _kill(proc)
    return "at its end" if ended else f"{delay:.1f} s in"


def _numbers(reports: Path) -> dict[str, pd.DataFrame]:
    """Every table of the report, without the UNCOMPARED columns (and cost.csv without its `eval` stages)."""
    tables = {}
    for path in sorted(reports.glob("*.csv")):
        frame = pd.read_csv(path)
        if "stage" in frame:
            frame = frame[frame["stage"] != "eval"].reset_index(drop=True)
        tables[path.stem] = frame.drop(columns=[c for c in frame if c in UNCOMPARED or "seconds" in c])
    return tables


def _weights(runs: Path) -> list[tuple[str, str]]:
    """(method, sha256 of the weights) of every completed run's final model."""
    return sorted(
        (p.parts[-5], hashlib.sha256(p.read_bytes()).hexdigest())
        for p in runs.glob("tiny/*/*/checkpoints/final/model.safetensors")
        if json.loads((p.parents[2] / "manifest.json").read_text())["status"] == "completed"
    )


def _resumes(runs: Path) -> list[tuple[str, int]]:
    """(method, times resumed) of every run (the preference set's folder is none)."""
    manifests = [p for p in runs.glob("tiny/*/*/manifest.json") if p.parts[-3] != "data"]
    return sorted((p.parts[-3], len(json.loads(p.read_text())["resumed"])) for p in manifests)


def test_make_all_killed_at_random_moments_ends_with_the_uninterrupted_report(tmp_path):
    durations = _timed_run(tmp_path / "a", tmp_path / "uninterrupted.log")
    rng = random.Random(SEED)
    out = tmp_path / "b"
    kills = [
        _killed_run(out, tmp_path / f"kill-{stage}.log", stage, rng.uniform(0.1, 0.9) * seconds)
        for stage, seconds in enumerate(durations)
    ]
    final = tmp_path / "final.log"
    _finish(_start(out, final), final)
    landed = [f"{name} ({seconds:.1f} s): {when}" for (name, *_), seconds, when in zip(STAGES, durations, kills)]
    print("killed during " + "; ".join(landed))
    assert None not in kills, landed  # each kill found the run still going
    # one run a method: a killed run is gone on with (a kill at a stage's end may come just after its run completed)
    resumes = _resumes(out / "runs")
    assert [method for method, _ in resumes] == ["dpo", "ppo", "reference", "reward_model"], resumes
    assert sum(n for _, n in resumes) >= 1, resumes

    reports = [tmp_path / run / "reports" / "tiny" for run in ("a", "b")]
    expected, got = (_numbers(r) for r in reports)
    assert got.keys() == expected.keys()
    for table, frame in expected.items():
        pd.testing.assert_frame_equal(got[table], frame, obj=f"{table}.csv")
    assert _weights(out / "runs") == _weights(tmp_path / "a" / "runs")
    assert sorted(p.name for p in reports[1].iterdir()) == sorted(p.name for p in reports[0].iterdir())
    assert all(p.read_bytes().endswith(PNG_END) for p in reports[1].glob("*.png"))
