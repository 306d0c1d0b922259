"""`make grid` (and so `make all`): the profile's grid of independent runs, `grid.jobs` processes at a time.

The grid is `grid.methods` x every beta (`beta_sweep`, or just `beta`) x every seed. Each job is the command line
`make <method>` would run for that one beta and seed, in a process of its own: it writes its own run directory, and
it computes what it would compute run alone (every run seeds itself; a job's device and thread count are the same
whatever `grid.jobs` is, see `job_environment`). The shared preference set is built (or found) first, in this
process. A job starts once the jobs it needs have completed: pi_ref's evaluation (`reference`) first, whose samples
every run's first eval point reads from the cache rather than draw them again; a seed's reward model before the runs
of that seed that read it (PPO trains against it, DPO reports its proxy reward), so that two PPO jobs of one seed at
two betas never both train it.

The jobs run seed by seed: seed 0 of every method (its reward model, then every method x beta), then seed 1, and so on
(`in_order`). A grid stopped after k seeds' worth of time has k complete seeds of every method to compare, not every
seed of PPO and none of DPO; `make report` compares the complete seeds and names the runs still missing. On a
cluster, where every job of a phase runs at once, the same jobs are submitted by phase (`phases`): pi_ref's
evaluation, the reward models, then the method runs.

Under `make all NPROC=8` the training jobs run under `accelerate launch` (make's launcher, in `GRID_TRAIN_CLI`), one at
a time: a run's processes then take every device. A killed grid resumes when run again: completed runs are reused by
their keys, and a killed run continues from its last checkpoint (each job is an ordinary command,
docs/reliability.md). A job that fails is named with its log; the jobs that need it are not started, every other job
goes on, and the grid exits non-zero.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from pipelines.clock import JOBS_LOG, Clock, grid_clock, minutes
from pipelines.stages import build_preference_set, reward_model_seed
from rlhf.config import PROJECT_ROOT, Config
from rlhf.errors import UserError
from rlhf.methods import METHODS, commands

# What the grid reads of each method (rlhf/methods.py): whether its runs need PPO's reward model (trained in phase 1;
# DPO reads it only for its proxy reward); whether it has a run per beta (Best-of-N samples pi_ref, Preferred-FT is
# supervised fine-tuning: each runs at the profile's `beta` once) and per seed (Best-of-N: one run, ranked by the
# first seed's reward model); whether its command trains (under NPROC > 1 make runs it through `accelerate launch`,
# and so does the grid).


@dataclass(frozen=True)
class Job:
    label: str  # what the progress lines and the log file are called
    command: str  # a `python -m pipelines` command
    overrides: tuple[str, ...]  # key=value, after the user's own
    needs: tuple[str, ...] = ()  # the labels of the jobs that must complete before this one starts
    seed: int | None = None  # the run seed it belongs to (None: pi_ref's evaluation, Best-of-N)


def phases(cfg: Config) -> list[list[Job]]:
    """The grid's jobs by phase, each phase needing only the ones before it: pi_ref's evaluation, the reward models,
    then method x beta x seed."""
    betas = [c.beta for c in cfg.betas()]
    reference = Job("reference", "reference", ())
    reward_models: dict[int, Job] = {}
    if any(METHODS[m].reward_model for m in cfg.grid.methods):
        for s in dict.fromkeys(reward_model_seed(cfg, s) for s in cfg.seeds):
            reward_models[s] = Job(f"reward_model-seed{s}", "reward-model", (f"seeds=[{s}]",), (reference.label,), s)

    def needs(method: str, seed: int) -> tuple[str, ...]:
        rm = reward_models.get(reward_model_seed(cfg, seed)) if METHODS[method].reward_model else None
        return (reference.label, *([rm.label] if rm else []))

    runs = []
    for m in map(METHODS.get, cfg.grid.methods):
        if not m.per_seed:  # ranked by the first seed's reward model
            runs.append(Job(m.name, m.cli, m.overrides, needs(m.name, cfg.seeds[0])))
            continue
        for beta in betas if m.per_beta else [cfg.beta]:
            for seed in cfg.seeds:
                overrides = (*m.overrides, f"beta={beta}", "beta_sweep=[]", f"seeds=[{seed}]")
                runs.append(Job(f"{m.name}-beta{beta:g}-seed{seed}", m.cli, overrides, needs(m.name, seed), seed))
    return [p for p in ([reference], list(reward_models.values()), runs) if p]


def in_order(cfg: Config) -> list[Job]:
    """The grid's jobs in the order a local grid starts them: pi_ref's evaluation, then seed by seed (in `seeds`'
    order) that seed's reward model and every method x beta, so that the first k seeds complete before seed k+1
    begins. Best-of-N, which has no seed, comes with the first seed it is ranked by."""
    jobs = [job for phase in phases(cfg) for job in phase]
    rank = {seed: i for i, seed in enumerate(cfg.seeds)}

    def place(job: Job) -> int:
        if job.command == "reference" or (job.command == "reward-model" and not cfg.reward_model.per_seed):
            return -1  # pi_ref's evaluation, and the one reward model every seed shares, come first
        return rank.get(job.seed, 0)

    return sorted(jobs, key=place)


def job_environment(cfg: Config, slot: int, jobs: int) -> dict[str, str]:
    """The environment of the job in worker slot `slot`: on GPUs, several jobs' slots go round-robin over the visible
    devices (at most ceil(jobs / GPUs) processes a GPU); several jobs split the CPU's threads evenly
    (`grid.threads_per_job` fixes the count: on a CPU a run's numbers depend on it, through the order of its sums).
    One job alone keeps every device and torch's own thread count, as `make ppo` does."""
    import torch

    env = dict(os.environ)
    if torch.cuda.is_available() and jobs > 1:  # one job alone (under NPROC > 1, `accelerate launch`) takes them all
        visible = env.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        env["CUDA_VISIBLE_DEVICES"] = devices[slot % len(devices)]
    threads = cfg.grid.threads_per_job or (jobs > 1 and max(1, (os.cpu_count() or 1) // jobs))
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def command_line(job: Job, profile: str, overrides: list[str], launcher: list[str]) -> list[str]:
    """`job`'s argv: the user's overrides, then the job's own (the later wins); a training job through `launcher`
    where there is one."""
    trains = job.command in commands() and commands()[job.command].trains
    cli = launcher if launcher and trains else [sys.executable, "-m", "pipelines"]
    return [*cli, job.command, "--profile", profile, *overrides, *job.overrides]


def main(cfg: Config, overrides: list[str]) -> int:
    """Run the grid; `overrides` are the user's key=value (every job gets them, then its own)."""
    launcher = shlex.split(os.environ.get("GRID_TRAIN_CLI", ""))
    if launcher and cfg.grid.jobs > 1:
        raise UserError(
            f"grid.jobs={cfg.grid.jobs} with NPROC > 1: a run under `accelerate launch` takes every "
            "device; run the grid one job at a time (JOBS=1), or each job on one device (NPROC=1)"
        )
    build_preference_set(cfg)  # before any job: jobs side by side would each build it
    log_dir = PROJECT_ROOT / cfg.runs_dir / cfg.profile / "grid-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    jobs = in_order(cfg)
    logs = f"; logs in {log_dir}" if cfg.grid.jobs > 1 else ""
    print(
        f"grid: {len(jobs)} jobs (pi_ref's evaluation, then seed by seed: its reward model and "
        f"{', '.join(cfg.grid.methods)} x {len(cfg.betas())} beta; {len(cfg.seeds)} seeds), "
        f"{cfg.grid.jobs} at a time{logs}",
        flush=True,
    )
    clock = grid_clock(cfg, jobs)
    print(
        f"grid: about {minutes(clock.left([job.label for job in jobs]) / cfg.grid.jobs)} on this machine "
        "(pipelines/clock.py), less where completed runs are reused",
        flush=True,
    )
    with tqdm(total=len(jobs), desc="grid", unit="job", dynamic_ncols=True, disable=cfg.grid.jobs == 1) as bar:
        failed, skipped = _run(cfg, jobs, overrides, launcher, log_dir, bar, clock)
    if not failed:
        print(f"grid: all {len(jobs)} jobs completed")
        return 0
    for job, code in failed:
        where = "above" if cfg.grid.jobs == 1 else f"in {log_dir / (job.label + '.log')}"
        print(f"grid: {job.label} failed (exit {code}); its output is {where}", file=sys.stderr)
    if skipped:
        print(f"grid: not started, as they need a failed job: {', '.join(j.label for j in skipped)}", file=sys.stderr)
    print(
        f"grid: {len(failed)} of {len(jobs)} jobs failed; run it again to resume (completed runs are reused, killed "
        "ones continue from their last checkpoint)",
        file=sys.stderr,
    )
    return 1


def _run(
    cfg: Config, jobs: list[Job], overrides: list[str], launcher: list[str], log_dir: Path, bar: tqdm, clock: Clock
) -> tuple[list[tuple[Job, int]], list[Job]]:
    """Run `jobs`, at most `grid.jobs` at once, each as soon as the jobs it needs have completed, in the order given
    otherwise; returns the jobs that failed (with their exit codes) and those not started because they need one.
    With one job at a time its output goes to the terminal (and its progress bars with it); with several, each to its
    log file. Each job's seconds go to grid-logs/jobs.jsonl (the clock's closing table reads them), and the time left
    is said as each job finishes."""
    pending, running, failed, skipped, done = list(jobs), {}, [], [], set()
    free = list(range(cfg.grid.jobs))
    try:
        while pending or running:
            lost = {job.label for job, _ in failed}
            for job in list(pending):  # in order, so a job that needs a skipped one is skipped too
                if lost.intersection(job.needs):
                    pending.remove(job)
                    skipped.append(job)
                    lost.add(job.label)
                    bar.update(1)
            while free and (job := next((j for j in pending if done.issuperset(j.needs)), None)):
                pending.remove(job)
                slot = free.pop(0)
                argv = command_line(job, cfg.profile, overrides, launcher)
                # appended to: a resumed job's log keeps what its killed attempt wrote
                log = None if cfg.grid.jobs == 1 else open(log_dir / f"{job.label}.log", "a")
                process = subprocess.Popen(
                    argv,
                    env=job_environment(cfg, slot, cfg.grid.jobs),
                    stdout=log,
                    stderr=subprocess.STDOUT if log else None,
                )
                running[process] = (job, slot, log, time.monotonic())
                tqdm.write(f"grid: started {job.label}")
            if pending and not running:
                raise RuntimeError(f"grid: {pending[0].label} needs {pending[0].needs}, which no job provides")
            time.sleep(0.2)
            for process in [p for p in running if p.poll() is not None]:
                job, slot, log, began = running.pop(process)
                if log:
                    log.close()
                free.append(slot)
                bar.update(1)
                secs = time.monotonic() - began
                clock.finished(job.label, secs)
                with open(log_dir / JOBS_LOG, "a") as record:
                    record.write(
                        json.dumps(
                            {
                                "label": job.label,
                                "seconds": secs,
                                "exit": process.returncode,
                                "finished": dt.datetime.now(dt.UTC).isoformat(),
                            }
                        )
                        + "\n"
                    )
                if process.returncode:
                    failed.append((job, process.returncode))
                    tqdm.write(f"grid: {job.label} failed (exit {process.returncode})", file=sys.stderr)
                else:
                    done.add(job.label)
                    left = clock.left([j.label for j in pending] + [j.label for j, *_ in running.values()])
                    tqdm.write(
                        f"grid: done {job.label} in {minutes(secs)} (estimated "
                        f"{minutes(clock.estimates[job.label])}); about {minutes(left / cfg.grid.jobs)} left"
                    )
    finally:  # the grid interrupted (Ctrl-C, SIGTERM): stop its jobs too; each marks its run failed, to resume
        for process in running:
            process.terminate()
        for process in running:
            process.wait()
    return failed, skipped
