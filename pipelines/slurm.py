"""`make all LAUNCHER=slurm` (and `make grid`): the grid's phases as Slurm job arrays, submitted through submitit.

The jobs are the local grid's (pipelines/grid.py): the same phases, each job the same command line, writing into the
same runs directory, which must be on a filesystem every node sees. Locks, reuse and resume are the commands' own
(docs/reliability.md), so where a job runs changes nothing. Each phase is one `sbatch --array`, held by Slurm until
every job of the phase before it completed (`--dependency=afterok`); should one fail, Slurm cancels the phases after
it (`--kill-on-invalid-dep=yes`). Every phase is submitted at once, so the grid goes on without this process
(`--no-wait`). Waiting, it shows one bar over the jobs, names each failed job with its log, and stops after that
phase, as the local grid does. Run it again to resume: completed runs are reused, killed ones continue from their
last checkpoint.

Nothing heavy runs on the submitting machine: pi_ref's evaluation, the first job, builds the SFT model and the
preference set where they are missing. With `slurm.executor=local` submitit runs each job as a process of this
machine instead; there is no scheduler to hold a phase back, so each is submitted once the one before it completed.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from rlhf.config import PROJECT_ROOT, Config
from rlhf.errors import UserError

# Each job's node unpickles `run_job` from this module, so the module imports nothing heavy: pipelines.grid brings the
# stages (torch, transformers, TRL), which only the job's own command needs. The submitting side imports it in main.
if TYPE_CHECKING:
    from pipelines.grid import Job


def run_job(argv: list[str], log: str, threads: int | None) -> None:
    """One job, on its node: `argv`, its output appended to `log` (where the local grid writes it: a resumed job's log
    keeps its killed attempt's lines), on the devices and cores Slurm gave the job; `threads` (grid.threads_per_job)
    fixes its CPU thread count, on which a run's numbers depend on a CPU. A failed command fails the Slurm job, so
    that the next phase never starts (afterok)."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    with open(log, "a") as out:
        code = subprocess.call(argv, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if code:
        raise RuntimeError(f"exit status {code}")


def make_executor(cfg: Config, folder: Path):
    """submitit's executor with the `slurm` section's settings. submitit keeps its records (the sbatch script, the
    pickled call and its result, what Slurm itself printed) in `folder`/<job id>/."""
    import submitit

    s = cfg.slurm
    try:
        executor = submitit.AutoExecutor(folder / "%j", cluster=s.executor)
    except RuntimeError as e:  # submitit found no `srun`
        raise UserError(
            f"slurm.executor=slurm: {e} Submit from a Slurm login node, or run the jobs on this machine "
            "with slurm.executor=local"
        ) from None
    sbatch = dict(option.split("=", 1) if "=" in option else (option, True) for option in s.sbatch)
    # None leaves a setting to the cluster's defaults; the slurm_ ones mean nothing to the local executor
    executor.update_parameters(
        name=f"grid-{cfg.profile}",
        timeout_min=s.time_min,
        gpus_per_node=s.gpus_per_job,
        cpus_per_task=s.cpus_per_job,
        mem_gb=s.mem_gb,
        stderr_to_stdout=True,
        slurm_partition=s.partition,
        slurm_account=s.account,
        slurm_qos=s.qos,
        slurm_array_parallelism=s.max_parallel,
        slurm_additional_parameters={"kill-on-invalid-dep": "yes", **sbatch},
    )
    return executor


def submit(
    executor, cfg: Config, phase: list[Job], overrides: list[str], launcher: list[str], log_dir: Path, after: list
) -> list:
    """`phase` as one job array (a plain job if it has one job), held until every job of `after` completed; its
    submitit jobs, in `phase`'s order."""
    from submitit.core.utils import FailedJobError

    from pipelines.grid import command_line

    if after:
        executor.update_parameters(slurm_dependency="afterok:" + ":".join(_array_ids(after)))
    argvs = [command_line(job, cfg.profile, overrides, launcher) for job in phase]
    logs = [str(log_dir / f"{job.label}.log") for job in phase]
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's refusal too: the error says it once
            return executor.map_array(run_job, argvs, logs, [cfg.grid.threads_per_job] * len(phase))
    except FailedJobError as e:  # sbatch said no: an unknown partition or account, a time over the partition's limit
        raise UserError(f"sbatch refused the grid's jobs: {' '.join(str(e).split())}") from None


def _array_ids(handles: list) -> list[str]:
    """The Slurm job ids of submitit jobs: an array's tasks (<id>_<task>) are one job to a dependency."""
    return list(dict.fromkeys(h.job_id.split("_")[0] for h in handles))


def main(cfg: Config, overrides: list[str], wait: bool = True) -> int:
    """Submit the grid; `overrides` are the user's key=value (every job gets them, then its own). With `wait`, watch
    it to its end; else return once it is submitted."""
    try:
        import submitit  # noqa: F401 (an optional dependency: the `slurm` extra)
    except ImportError:
        raise UserError("grid.launcher=slurm needs submitit: pip install -e '.[slurm]'") from None
    from pipelines.grid import phases

    held = cfg.slurm.executor == "slurm"  # Slurm holds each phase back until the one before it completed
    if not wait and not held:
        raise UserError(
            "--no-wait needs slurm.executor=slurm: without a scheduler to hold a phase back, this process "
            "submits each phase once the one before it completed"
        )
    launcher = shlex.split(os.environ.get("GRID_TRAIN_CLI", ""))
    log_dir = PROJECT_ROOT / cfg.runs_dir / cfg.profile / "grid-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    # not under runs/<profile>/, where every folder of a folder is a run to the report
    executor = make_executor(cfg, PROJECT_ROOT / cfg.runs_dir / "submitit" / cfg.profile)
    all_jobs = phases(cfg)
    total = sum(len(p) for p in all_jobs)
    print(
        f"grid: {total} jobs in {len(all_jobs)} phases (pi_ref's evaluation, the reward models, then "
        f"{', '.join(cfg.grid.methods)} x {len(cfg.betas())} beta x {len(cfg.seeds)} seeds) through submitit's "
        f"{cfg.slurm.executor} executor; logs in {log_dir}",
        flush=True,
    )
    handles: list[list] = []  # each phase's submitit jobs, once submitted

    def submit_next() -> None:
        phase, after = all_jobs[len(handles)], handles[-1] if handles and held else []
        handles.append(submit(executor, cfg, phase, overrides, launcher, log_dir, after))
        what = phase[0].label if len(phase) == 1 else f"{len(phase)} jobs"
        held_by = f", held until {', '.join(_array_ids(after))} completed" if after else ""
        tqdm.write(
            f"grid: phase {len(handles)} of {len(all_jobs)} ({what}) submitted as "
            f"{', '.join(_array_ids(handles[-1]))}{held_by}"
        )

    if held:  # every phase now; stopping to watch (Ctrl-C) stops none of them
        while len(handles) < len(all_jobs):
            submit_next()
        if not wait:
            print(
                f"grid: submitted; the jobs go on without this command.\n"
                f"  watch them: squeue -u $USER --name grid-{cfg.profile}\n"
                f"  each job's output: {log_dir}/<job>.log\n"
                f"  once all are done: make report PROFILE={cfg.profile}"
            )
            return 0
    with tqdm(total=total, desc="grid", unit="job", dynamic_ncols=True) as bar:
        for number, phase in enumerate(all_jobs):
            if len(handles) == number:
                submit_next()
            failed = _wait(phase, handles[number], bar)
            if failed:
                for job, why in failed:
                    tqdm.write(
                        f"grid: {job.label} failed ({why}); its output is in {log_dir / (job.label + '.log')}",
                        file=sys.stderr,
                    )
                later = sum(len(p) for p in all_jobs[number + 1 :])
                cancelled = f"; Slurm cancels the {later} jobs of the phases after it" if held and later else ""
                tqdm.write(
                    f"grid: {len(failed)} of {len(phase)} jobs of this phase failed{cancelled}; run it again "
                    "to resume (completed runs are reused, killed ones continue from their last checkpoint)",
                    file=sys.stderr,
                )
                return 1
    print(f"grid: all {total} jobs completed")
    return 0


def _wait(phase: list[Job], handles: list, bar: tqdm) -> list[tuple[Job, str]]:
    """Wait until every job of `phase` has ended; those that failed, with why."""
    running, failed = list(zip(phase, handles)), []
    while running:
        time.sleep(1)  # submitit asks Slurm (sacct) no more often than its own schedule, however often it is asked
        for job, handle in [r for r in running if r[1].done()]:
            running.remove((job, handle))
            bar.update(1)
            error = handle.exception()
            if error is None:
                tqdm.write(f"grid: done {job.label}")
                continue
            # in the traceback submitit kept: run_job's error, or submitit's own at the time limit (it stops the job
            # shortly before Slurm would); neither: Slurm ended the job (out of memory, cancelled, node failure)
            status = re.search(r"exit status -?\d+|timed-out", str(error))
            failed.append((job, status.group() if status else f"ended {handle.state}"))
    return failed
