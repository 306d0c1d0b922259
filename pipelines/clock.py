"""`make all`'s clock: before the work, how long the profile will take on this machine; after it, what each stage took.

The estimate is the profile's work over this machine's speed. The work is each job's FLOPs, counted from the
profile's sizes (prompts, new tokens, steps, eval points) by the same rules the runs count their own
(rlhf/flops.py): forward passes 2·N·tokens, training 6·N·tokens. The speed is one calibration: the machine's dense
matmul FLOP/s at the model's own shapes (`matmul_limit`, a few seconds), times the fraction of it each kind of stage
achieves (`EFFICIENCY`: measured on the default profile's real runs, docs/performance.md), plus a job's start-up.
So the estimate follows the machine (a box without native bf16 runs its matmuls at half the rate, and every stage
with them) and the profile (twice the seeds, twice the work); what it cannot see is another job sharing the CPU.
The grid refines it as jobs finish (`Clock.left`): what remains is scaled by how the finished jobs compared with
their estimates.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines import named
from rlhf.config import PROJECT_ROOT, Config
from rlhf.flops import matmul_limit, pass_parameters
from rlhf.methods import commands
from rlhf.models import (
    AUTOCAST_DTYPES,
    default_device,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
    resolve_precision,
)
from rlhf.sequences import tokenize_prompts
from rlhf.tasks import load_task

# The fraction of the machine's matmul limit each kind of work achieves: the default profile's stages on the
# avx512_bf16 box (their recorded FLOPs over their recorded seconds, over the limit measured there), with SDPA
# attention, each divided by the same-box time ratio of the changes made since (`model.attention: split`, the bf16
# weight cast in `generate`); the derivation is docs/performance.md's "The clock". Everything a stage does besides
# matmuls (sampling's step-by-step decoding, elementwise kernels, the gold reward's classifier, logging) is inside.
EFFICIENCY = {"sampling": 0.30, "training": 0.47, "forward": 0.57, "evaluation": 0.50}
START_SECONDS = 18.0  # a job's process before its first step: imports, the models and the preference set loaded
REPORT_SECONDS = 60.0  # `make report` on the default profile's runs
CLOCK_FILE = "clock.json"  # runs/<profile>/clock.json: what `make all` estimated, for its closing table
JOBS_LOG = "jobs.jsonl"  # runs/<profile>/grid-logs/jobs.jsonl: each grid job's seconds, as it finishes


@dataclass(frozen=True)
class Sizes:
    """What a job's FLOPs are counted from: N of the policy's pass and of a scalar-headed model's (reward and value
    models), and the mean tokens of a train prompt, of a preference pair's sequence (prompt + one response) and of an
    eval sequence (prompt + sampled response)."""

    n_lm: int
    n_scalar: int
    prompt_tokens: float
    pair_tokens: float
    eval_tokens: float
    sampled_pairs: bool  # the preference set is sampled from pi_ref (a gold-reward task), not read from a data set
    train_prompts: int  # the train prompts the preference set is built from (`data.n_prompts`, null: all)
    train_pairs: int  # the pairs it holds: K/2 a prompt, paired (0,1), (2,3), ... (rlhf/data.py), or the data set's
    eval_prompts: int  # the prompts of the split an evaluation scores (`eval.split`), for `eval.n_prompts` null


def measure_sizes(cfg: Config) -> tuple[Sizes, torch.nn.Module]:
    """The profile's `Sizes`, and its model (for the calibration)."""
    path = resolve_model_path(cfg.model, cfg.hub_access)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, cfg.model.attention)
    n_lm = pass_parameters(model, "lm")
    n_scalar = pass_parameters(model, "scalar")
    task = load_task(cfg.task, tokenizer, cfg.hub_access)

    def prompt_tokens(prompts: list[str]) -> float:
        return float(tokenize_prompts(tokenizer, prompts[:256])[1].sum(1).float().mean())

    prompt = prompt_tokens(task.train_prompts)
    if task.train_pairs:  # real preference pairs: their own responses' lengths
        pairs = task.train_pairs[:256]
        pair = prompt_tokens([p["prompt"] for p in pairs]) + sum(
            len(tokenizer(p["chosen"]).input_ids) for p in pairs
        ) / len(pairs)
    else:  # pairs sampled from pi_ref: responses run to the cap (32 of 32 tokens, nearly always, on the default)
        pair = prompt + cfg.data.max_new_tokens
    train_prompts = cfg.data.n_prompts or len(task.train_prompts)
    eval_prompts = task.validation_prompts if cfg.eval.split == "validation" else task.eval_prompts
    return Sizes(
        n_lm,
        n_scalar,
        prompt,
        pair,
        prompt_tokens(task.eval_prompts) + cfg.eval.max_new_tokens,
        sampled_pairs=not task.train_pairs,
        train_prompts=train_prompts,
        train_pairs=len(task.train_pairs) if task.train_pairs else train_prompts * (cfg.data.responses_per_prompt // 2),
        eval_prompts=len(eval_prompts),
    ), model


@dataclass(frozen=True)
class Work:
    """What one grid job's FLOPs are counted from: the profile, the job's overrides, the sizes, and whether an earlier
    job of its command ran before it in the grid (`repeat`: what that one cached for the profile is read, not
    computed again). Each method counts its own training beside its command (its `flops` in rlhf/methods.py); the
    terms every method's evaluation and pairs share are here, once."""

    cfg: Config
    overrides: tuple[str, ...]
    s: Sizes
    repeat: bool = False

    @property
    def pairs(self) -> int:
        """The training pairs of the budget every stage shares."""
        return self.cfg.budget.pairs or self.s.train_pairs

    @property
    def eval_prompts(self) -> int:
        return self.cfg.eval.n_prompts or self.s.eval_prompts

    @property
    def heldout(self) -> int:
        return self.cfg.eval.n_heldout_pairs or self.cfg.task.n_eval_prompts - self.cfg.task.n_validation_prompts

    @property
    def implicit(self) -> float:
        """The policy's log-probs of the held-out pairs (DPO's implicit reward), at the last eval point only."""
        return 2 * self.s.n_lm * self.heldout * 2 * self.s.pair_tokens

    def evaluation(self, steps: int, every: int, proxy: bool = True, implicit: bool = False) -> float:
        """A run's evaluation: at each eval point the samples drawn, then log pi and log pi_ref of them, and the
        reward model's score of them where it has one (`proxy`; step 0's too); the held-out pairs' log-probs at the
        last point where it has an implicit reward. The point at step 0 reads pi_ref's samples and log-probs from the
        cache and only scores them."""
        e, ev = self.eval_prompts, self.s.eval_tokens
        sample_and_kl = 2 * 3 * self.s.n_lm * e * ev
        scores = 2 * self.s.n_scalar * e * ev if proxy else 0
        points = math.ceil(steps / every)  # evaluated every `every` and at its end, step 0 left out
        return (points + 1) * scores + points * sample_and_kl + (self.implicit if implicit else 0)


def job_flops(
    cfg: Config, command: str, overrides: tuple[str, ...], s: Sizes, repeat: bool = False
) -> dict[str, float]:
    """FLOPs of one grid job (`pipelines/grid.py`'s command and overrides), by kind of work, as its method's estimate
    (rlhf/methods.py) counts them."""
    method = commands()[command]
    if method.flops is None:
        raise ValueError(
            f"no FLOPs estimate for the grid's command {command!r}: name its function in the `flops` of "
            f"'{method.name}' in rlhf/methods.py"
        )
    return named(method.flops)(Work(cfg, overrides, s, repeat))


def grid_work(cfg: Config, jobs: list, s: Sizes) -> dict[str, dict[str, float]]:
    """Every grid job's FLOPs by label, each job after the first of its command counted as a repeat."""
    seen: set[str] = set()
    work = {}
    for job in jobs:
        work[job.label] = job_flops(cfg, job.command, job.overrides, s, repeat=job.command in seen)
        seen.add(job.command)
    return work


def data_flops(cfg: Config, s: Sizes) -> dict[str, float]:
    """FLOPs of building the preference set: K responses sampled from pi_ref for every train, held-out and
    validation prompt (the gold reward that labels them is a classifier outside the count, inside `sampling`'s
    fraction). Nothing to sample where the pairs are read from a data set."""
    heldout = cfg.data.n_heldout_prompts or cfg.task.n_eval_prompts - cfg.task.n_validation_prompts
    prompts = s.train_prompts + heldout + cfg.task.n_validation_prompts
    return {"sampling": 2 * s.n_lm * prompts * cfg.data.responses_per_prompt * s.pair_tokens} if s.sampled_pairs else {}


def seconds(flops: dict[str, float], limit: float) -> float:
    """Seconds of a job's work at this machine's `limit` (matmul FLOP/s), each kind at its measured fraction of it."""
    return START_SECONDS + sum(f / (EFFICIENCY[kind] * limit) for kind, f in flops.items())


@dataclass
class Estimate:
    """The profile's estimate on this machine: seconds by grid job label, and for the stages around the grid."""

    machine: str
    limit: float  # dense matmul FLOP/s at the model's shapes, in the profile's precision
    flops: float  # the whole profile's work
    jobs: dict[str, float]  # grid job label -> seconds
    data: float
    report: float = REPORT_SECONDS

    @property
    def total(self) -> float:
        return self.data + sum(self.jobs.values()) + self.report


def machine(device: torch.device) -> str:
    """The processor's (or GPU's) name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        name = cpuinfo.split("model name")[1].split(":", 1)[1].splitlines()[0].strip()
        return f"{name} ({cpuinfo.count('processor')} cores)"
    except (OSError, IndexError):
        return "cpu"


def estimate(cfg: Config, jobs: list) -> Estimate:
    """Calibrate on this machine (the model's matmul limit in the profile's precision) and estimate every stage of
    the profile, the grid's `jobs` (pipelines/grid.py's) among them."""
    device = default_device()
    precision = resolve_precision(cfg.model.precision, device)
    sizes, model = measure_sizes(cfg)
    limit = matmul_limit(model.to(device), AUTOCAST_DTYPES.get(precision, torch.float32), device, repeats=5)
    data = data_flops(cfg, sizes)
    work = grid_work(cfg, jobs, sizes)
    return Estimate(
        machine=f"{machine(device)}, {torch.get_num_threads()} threads, {precision}",
        limit=limit,
        flops=sum(data.values()) + sum(sum(w.values()) for w in work.values()),
        jobs={label: seconds(w, limit) for label, w in work.items()},
        data=seconds(data, limit) if data else START_SECONDS,
    )


def minutes(secs: float) -> str:
    """'1 h 38 min', '12 min', '40 s'."""
    if secs < 90:
        return f"{secs:.0f} s"
    m = round(secs / 60)
    return f"{m // 60} h {m % 60} min" if m >= 60 else f"{m} min"


def _seed_line(cfg: Config, est: Estimate) -> str:
    """The first seed's jobs, which every later seed repeats."""
    seed = cfg.seeds[0]
    first = {label: s for label, s in est.jobs.items() if label.endswith(f"-seed{seed}")}
    parts = ", ".join(f"{label.rsplit('-seed', 1)[0]} {minutes(s)}" for label, s in first.items())
    return f"{len(cfg.seeds)} seed{'s' if len(cfg.seeds) > 1 else ''} of {minutes(sum(first.values()))} ({parts})"


def path(cfg: Config) -> Path:
    return PROJECT_ROOT / cfg.runs_dir / cfg.profile / CLOCK_FILE


def start(cfg: Config, jobs: list) -> int:
    """`make all`'s first line: the estimate of the profile with the grid's `jobs`, written to
    runs/<profile>/clock.json for the closing table."""
    est = estimate(cfg, jobs)
    other = {label: s for label, s in est.jobs.items() if not any(label.endswith(f"-seed{x}") for x in cfg.seeds)}
    around = ", ".join(f"{label} {minutes(s)}" for label, s in other.items())
    print(
        f"clock: on {est.machine} (matmul limit {est.limit / 1e12:.3g} TFLOP/s at the model's shapes), the profile's "
        f"{est.flops / 1e15:.3g} PFLOP take about {minutes(est.total)}: preference set {minutes(est.data)}, "
        f"{around}, {_seed_line(cfg, est)}, report {minutes(est.report)}. Completed runs are reused and take "
        "seconds; the grid refines the estimate as its jobs finish.",
        flush=True,
    )
    if cfg.sft_stage.enabled:
        print("clock: the SFT stage (sft_stage.enabled) is not in the estimate", flush=True)
    target = path(cfg)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(
        json.dumps(
            {
                "started": dt.datetime.now(dt.UTC).isoformat(),
                "machine": est.machine,
                "limit": est.limit,
                "data": est.data,
                "report": est.report,
                "jobs": est.jobs,
            },
            indent=1,
        )
    )
    return 0


class Clock:
    """The grid's running estimate: each job's estimated seconds, corrected by how long the jobs that finished took
    against their own estimates (jobs done in a quarter of their estimate or less were reused, and say nothing of
    this machine's speed)."""

    def __init__(self, estimates: dict[str, float]):
        self.estimates, self.took = estimates, {}

    def finished(self, label: str, secs: float) -> None:
        self.took[label] = secs

    def left(self, labels: list[str]) -> float:
        """Seconds the jobs `labels` should take, at the pace of the jobs so far."""
        ran = [label for label, secs in self.took.items() if secs > 0.25 * self.estimates[label]]
        pace = sum(self.took[x] for x in ran) / sum(self.estimates[x] for x in ran) if ran else 1.0
        return pace * sum(self.estimates[label] for label in labels)


def grid_clock(cfg: Config, jobs: list) -> Clock:
    """The estimates `make all`'s clock wrote (runs/<profile>/clock.json) for the grid's `jobs`, or a calibration of
    its own for a grid run alone (`make grid`)."""
    try:
        estimates = json.loads(path(cfg).read_text())["jobs"]
        if {job.label for job in jobs} <= set(estimates):
            return Clock(estimates)
    except (OSError, ValueError, KeyError):
        pass
    return Clock(estimate(cfg, jobs).jobs)


def took(cfg: Config) -> int:
    """`make all`'s last lines: what each stage took against its estimate, and the whole against the total."""
    try:
        clock = json.loads(path(cfg).read_text())
    except (OSError, ValueError):
        print(f"clock: no estimate at {path(cfg)} (`make all` writes one first)")
        return 0
    started = dt.datetime.fromisoformat(clock["started"])
    rows = []
    for manifest in sorted((PROJECT_ROOT / cfg.runs_dir / cfg.profile / "data").glob("*/manifest.json")):
        built = json.loads(manifest.read_text())
        if dt.datetime.fromtimestamp(manifest.stat().st_mtime, dt.UTC) >= started:
            rows.append(("preference set", clock["data"], built.get("build_seconds", math.nan)))
    log = PROJECT_ROOT / cfg.runs_dir / cfg.profile / "grid-logs" / JOBS_LOG
    for line in log.read_text().splitlines() if log.exists() else []:
        job = json.loads(line)
        if dt.datetime.fromisoformat(job["finished"]) >= started and job["label"] in clock["jobs"]:
            rows.append(
                (
                    job["label"] + ("" if job["exit"] == 0 else f" (failed, exit {job['exit']})"),
                    clock["jobs"][job["label"]],
                    job["seconds"],
                )
            )
    total = (dt.datetime.now(dt.UTC) - started).total_seconds()
    estimated = clock["data"] + sum(clock["jobs"].values()) + clock["report"]
    width = max([len(r[0]) for r in rows] + [len("make all")])
    print(f"\nclock: what each stage of this `make all` took on {clock['machine']}")
    print(f"  {'stage':<{width}}  {'estimated':>10}  {'took':>10}")
    for name, est, secs in rows:
        print(f"  {name:<{width}}  {minutes(est):>10}  {minutes(secs):>10}")
    print(
        f"  {'make all':<{width}}  {minutes(estimated):>10}  {minutes(total):>10}   "
        f"(estimate off by {100 * (estimated - total) / total:+.0f}%; setup, the report and reused runs included)"
    )
    return 0
