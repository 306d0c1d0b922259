"""The grid through submitit (pipelines/slurm.py): what would go to Slurm, read from the sbatch scripts submitit writes
for a stand-in `sbatch`; and the grid run through submitit's own local executor (its real submission, pickling and
result path), which must give the local grid's numbers, phase after phase."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from submitit.core.utils import DelayedSubmission

from analysis.load import load_runs
from pipelines import grid, slurm
from rlhf.config import PROJECT_ROOT, load_config
from rlhf.errors import UserError
from rlhf.keys import run_key
from tests.test_grid import COMMON, _cli, _evals, _finish

SUBMITIT = ["grid.launcher=slurm", "slurm.executor=local", "grid.threads_per_job=1"]
# A cluster's sbatch that keeps each script it is given and answers with the next job id, 100 first; it refuses
# partition "nope" as Slurm does. submitit finds a cluster where it finds `srun`.
SBATCH = """#!/bin/sh
if grep -q -- '--partition=nope' "$1"; then
    echo 'sbatch: error: invalid partition specified: nope' >&2
    echo 'sbatch: error: Batch job submission failed: Invalid partition name specified' >&2
    exit 1
fi
n=$(ls "$SUBMITTED" | wc -l)
cp "$1" "$SUBMITTED/$n.sh"
echo "Submitted batch job $((100 + n))"
"""


@pytest.fixture
def sbatch(tmp_path, monkeypatch):
    """Stand-ins for sbatch and srun on the PATH; the folder where the submitted scripts land, in order."""
    bin_dir, submitted = tmp_path / "bin", tmp_path / "submitted"
    bin_dir.mkdir()
    submitted.mkdir()
    for name, text in (("sbatch", SBATCH), ("srun", "#!/bin/sh\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SUBMITTED", str(submitted))
    return submitted


def _flags(script) -> dict[str, str | bool]:
    """The #SBATCH options of a script: --name=value as name: value, a bare --flag as flag: True."""
    lines = [line.removeprefix("#SBATCH --") for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    return {name: value for name, _, value in (line.partition("=") for line in lines)} | {
        line: True for line in lines if "=" not in line
    }


def test_each_phase_is_one_array_held_until_the_phase_before_completed(tmp_path, sbatch, capsys):
    overrides = [
        "seeds=[0,1]",
        "grid.launcher=slurm",
        "slurm.partition=gpu",
        "slurm.account=lab",
        "slurm.time_min=30",
        "slurm.cpus_per_job=8",
        "slurm.max_parallel=3",
        "slurm.sbatch=[constraint=h100, exclusive]",
    ]
    cfg = load_config("tiny", [f"runs_dir={tmp_path / 'runs'}", *overrides])
    assert slurm.main(cfg, overrides, wait=False) == 0
    scripts = [_flags(sbatch / f"{n}.sh") for n in range(len(list(sbatch.iterdir())))]
    assert len(scripts) == 3  # pi_ref's evaluation, the two reward models, the four runs
    for flags in scripts:
        assert {
            k: flags.get(k)
            for k in (
                "partition",
                "account",
                "time",
                "gpus-per-node",
                "cpus-per-task",
                "job-name",
                "constraint",
                "exclusive",
                "kill-on-invalid-dep",
            )
        } == {
            "partition": "gpu",
            "account": "lab",
            "time": "30",
            "gpus-per-node": "1",
            "cpus-per-task": "8",
            "job-name": "grid-tiny",
            "constraint": "h100",
            "exclusive": True,
            "kill-on-invalid-dep": "yes",
        }
    assert [flags.get("array") for flags in scripts] == [None, "0-1%2", "0-3%3"]
    assert [flags.get("dependency") for flags in scripts] == [None, "afterok:100", "afterok:101"]
    # every job the local grid's command line, with its log where the local grid writes it
    pickles = sorted((tmp_path / "runs" / "submitit" / "tiny").glob("*/*_submitted.pkl"))
    calls = [DelayedSubmission.load(p) for p in pickles]
    assert {call.function for call in calls} == {slurm.run_job}
    submitted = {os.path.basename(call.args[1]).removesuffix(".log"): call.args[0] for call in calls}
    assert submitted == {
        job.label: grid.command_line(job, "tiny", overrides, []) for phase in grid.phases(cfg) for job in phase
    }
    out = capsys.readouterr().out
    assert "submitted as 101, held until 100 completed" in out and "squeue -u $USER --name grid-tiny" in out


def test_what_slurm_refuses_is_one_line(tmp_path, sbatch, capsys):
    cfg = load_config("tiny", [f"runs_dir={tmp_path}", "grid.launcher=slurm", "slurm.partition=nope"])
    with pytest.raises(
        UserError,
        match=r"^sbatch refused the grid's jobs: sbatch: error: invalid partition "
        r"specified: nope sbatch: error: Batch job submission failed",
    ):
        slurm.main(cfg, [])
    assert capsys.readouterr().err == ""  # said once, by the error
    with pytest.raises(UserError, match=r"'slurm.sbatch\[1\]': '--qos=low' is not an sbatch option without its"):
        load_config("tiny", ["slurm.sbatch=[exclusive, --qos=low]"])
    local = load_config("tiny", [f"runs_dir={tmp_path}", *SUBMITIT])
    with pytest.raises(UserError, match="--no-wait needs slurm.executor=slurm"):
        slurm.main(local, [], wait=False)


def test_without_slurm_here_the_cli_says_so_in_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pipelines", "grid", "--profile", "tiny", f"runs_dir={tmp_path}", "grid.launcher=slurm"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PATH": str(tmp_path)},
    )  # no srun on this PATH
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: slurm.executor=slurm: Could not detect") and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_where_a_run_ran_leaves_its_key_alone():
    plain = load_config("tiny")
    cluster = load_config(
        "tiny", ["grid.launcher=slurm", "slurm.partition=gpu", "slurm.gpus_per_job=8", "slurm.sbatch=[exclusive]"]
    )
    for method in ("reference", "reward_model", "ppo", "dpo"):
        assert run_key(cluster, method, 0, "data", None) == run_key(plain, method, 0, "data", None)


def _times(runs, method: str) -> list[tuple[str, str]]:
    """(started_at, finished_at) of every run of `method` (ISO-8601 UTC: ordered as strings)."""
    return [
        (m["started_at"], m["finished_at"])
        for m in (json.loads(p.read_text()) for p in (runs / "tiny" / method).glob("*/manifest.json"))
    ]


def test_the_grid_through_submitit_equals_the_local_grid_phase_by_phase(tmp_path):
    seconds = {}
    for name, launcher in (("local", ["grid.jobs=2", "grid.threads_per_job=1"]), ("submitit", SUBMITIT)):
        start = time.monotonic()
        out = _finish(_cli("grid", *COMMON, f"runs_dir={tmp_path / name}", *launcher))
        seconds[name] = time.monotonic() - start
        assert "grid: all 7 jobs completed" in out
    print(
        f"the tiny grid, 7 jobs: {seconds['local']:.0f} s locally (2 at a time), {seconds['submitit']:.0f} s "
        "through submitit's local executor (a phase at once)"
    )
    local, submitted = _evals(tmp_path / "local" / "tiny"), _evals(tmp_path / "submitit" / "tiny")
    assert set(submitted) == {(m, 0.1, s) for m in ("reward_model", "ppo", "dpo") for s in (0, 1)}
    assert submitted == local
    # each phase began once the one before it had ended
    runs = tmp_path / "submitit"
    phases = [_times(runs, "reference"), _times(runs, "reward_model"), _times(runs, "ppo") + _times(runs, "dpo")]
    assert [len(p) for p in phases] == [1, 2, 4]
    for before, after in zip(phases, phases[1:]):
        assert max(end for _, end in before) < min(start for start, _ in after)
    assert load_runs(runs / "tiny").runs["included"].all()  # submitit's records are no run to the report
    logs = runs / "tiny" / "grid-logs"
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


def test_a_failed_job_is_named_with_its_log_and_the_next_phase_never_starts(tmp_path):
    missing = tmp_path / "no-such-model"
    process = _cli("grid", *COMMON, f"runs_dir={tmp_path}", f"model.name_or_path={missing}", *SUBMITIT)
    out = process.communicate(timeout=600)[0].decode()
    assert process.returncode == 1, out[-3000:]
    log = tmp_path / "tiny" / "grid-logs" / "reference.log"
    assert f"grid: reference failed (exit status 2); its output is in {log}" in out
    assert f"error: model.name_or_path: '{missing}' is not a local folder" in log.read_text()
    assert "grid: 1 of 1 jobs of this phase failed" in out and "phase 2 of 3" not in out
    assert not (tmp_path / "tiny" / "reward_model").exists()
