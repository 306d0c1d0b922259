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

from rlhf.config import PROJECT_ROOT, Config
from rlhf.flops import matmul_limit, pass_parameters
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
    return Sizes(
        n_lm, n_scalar, prompt, pair, prompt_tokens(task.eval_prompts) + cfg.eval.max_new_tokens, not task.train_pairs
    ), model


def _points(steps: int, every: int) -> int:
    """Eval points of a run of `steps` evaluated every `every` and at its end, the one at step 0 left out: it reads
    pi_ref's samples and log-probs from the cache and only scores them."""
    return math.ceil(steps / every)


def job_flops(cfg: Config, command: str, overrides: tuple[str, ...], s: Sizes) -> dict[str, float]:
    """FLOPs of one grid job (`pipelines/grid.py`'s command and overrides), by kind of work."""
    n, ns, seq, ev = s.n_lm, s.n_scalar, s.pair_tokens, s.eval_tokens
    e = cfg.eval.n_prompts
    heldout = cfg.eval.n_heldout_pairs or cfg.task.n_eval_prompts - cfg.task.n_validation_prompts
    pairs = cfg.budget.pairs or cfg.data.n_prompts * math.comb(cfg.data.responses_per_prompt, 2)
    passes = cfg.budget.epochs
    sample_and_kl = 2 * 3 * n * e * ev  # an eval point: sample, then log pi and log pi_ref of the samples
    proxy = 2 * ns * e * ev  # the reward model's score of the samples (step 0's too)
    implicit = 2 * n * heldout * 2 * seq  # the policy's log-probs of the held-out pairs, at the last point only
    if command == "reference":  # pi_ref samples (one pass both ways) and scores the held-out pairs once a profile
        return {"evaluation": 2 * 2 * n * e * ev + implicit}
    if command == "reward-model":
        return {
            "training": 6 * ns * pairs * 2 * seq * passes,
            "forward": 2 * ns * heldout * 2 * seq + 2 * (n + ns) * cfg.reward_model.center_prompts * seq,
        }
    if command == "ppo":
        p = cfg.ppo
        gold = "ppo.reward=gold" in overrides
        per_token = 2 * n + 2 * (2 * n + ns + (0 if gold else ns)) + p.ppo_epochs * 6 * (n + ns)
        return {
            "training": per_token * p.rollout_batch_size * p.iterations * (s.prompt_tokens + p.max_new_tokens),
            "evaluation": (_points(p.iterations, p.eval_every) + 1) * (0 if gold else proxy)
            + _points(p.iterations, p.eval_every) * sample_and_kl,
        }
    if command == "dpo":
        d = cfg.dpo
        steps = pairs * passes // d.batch_size
        return {
            "forward": 2 * n * pairs * 2 * seq,
            "training": 6 * n * pairs * 2 * seq * passes,
            "evaluation": (_points(steps, d.eval_every) + 1) * proxy
            + _points(steps, d.eval_every) * sample_and_kl
            + implicit,
        }
    if command == "preferred-ft":
        f = cfg.preferred_ft
        steps = pairs * passes // f.batch_size
        return {"training": 6 * n * pairs * seq * passes, "evaluation": _points(steps, f.eval_every) * sample_and_kl}
    if command == "rloo":
        r = cfg.rloo
        per_token = 2 * n + 2 * (2 * n + ns) + 6 * n * r.num_iterations
        return {
            "training": per_token * r.rollout_batch_size * r.iterations * (s.prompt_tokens + r.max_new_tokens),
            "evaluation": (_points(r.iterations, r.eval_every) + 1) * proxy
            + _points(r.iterations, r.eval_every) * sample_and_kl,
        }
    if command == "online-dpo":
        o = cfg.online_dpo
        per_token = 2 * n + 2 * (n + ns) + 6 * n
        return {
            "training": per_token * o.batch_size * 2 * o.iterations * (s.prompt_tokens + o.max_new_tokens),
            "evaluation": (_points(o.iterations, o.eval_every) + 1) * proxy
            + _points(o.iterations, o.eval_every) * sample_and_kl
            + implicit,
        }
    if command == "bon":
        return {"sampling": max(cfg.bon.n) * e * ev * 2 * (n + ns)}
    raise ValueError(f"no estimate for the grid's command {command!r}")


def data_flops(cfg: Config, s: Sizes) -> dict[str, float]:
    """FLOPs of building the preference set: K responses sampled from pi_ref for every train, held-out and
    validation prompt (the gold reward that labels them is a classifier outside the count, inside `sampling`'s
    fraction). Nothing to sample where the pairs are read from a data set."""
    heldout = cfg.data.n_heldout_prompts or cfg.task.n_eval_prompts - cfg.task.n_validation_prompts
    prompts = cfg.data.n_prompts + heldout + cfg.task.n_validation_prompts
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
    work = {job.label: job_flops(cfg, job.command, job.overrides, sizes) for job in jobs}
    dpo = [job.label for job in jobs if job.command == "dpo"]
    for label in dpo[1:]:  # pi_ref's log-probs of the pairs: the first DPO run caches them (dpo/trainer.py)
        work[label].pop("forward")
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
