"""Read every run directory of a profile into tidy pandas frames (schema: docs/run-directory.md).

A run enters the aggregates only if its manifest says `completed` and its three files (manifest.json,
metrics.jsonl, timings.json) are whole, as are the per-prompt files of its eval points (samples/*.prompts.csv, which
runs written before they existed lack: the report then has their eval means only). Anything else is kept in the
`runs` frame with the reason, so the
report can list it by name; one bad directory never stops the report.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable

import pandas as pd

from rlhf.atomic import read_jsonl
from rlhf.errors import UserError
from rlhf.keys import name_now
from rlhf.methods import METHODS
from rlhf.rundir import PROMPT_COLUMNS, PROMPTS_SUFFIX, process_alive

RUN_KEYS = ["method", "beta", "seed", "run_id"]  # identify a run; every frame carries them
ROW_KEYS = ("kind", "step", "wall_seconds", "tokens")  # every metrics row has these (the schema's promise)
DATA_DIR = "data"  # runs/<profile>/data holds the preference set, not a method


@dataclass
class Runs:
    """Everything the report reads from one profile's runs directory."""

    runs: pd.DataFrame  # one row per run directory: RUN_KEYS, status, included, reason, path, provenance
    metrics: pd.DataFrame  # one row per metrics line of the included runs: RUN_KEYS, kind, step, ... metrics
    timings: pd.DataFrame  # one row per (included run, stage): RUN_KEYS, stage, seconds, flops, peak_memory_mb
    prompts: pd.DataFrame = field(default_factory=pd.DataFrame)  # per (included run, eval step, prompt): RUN_KEYS,
    # step, PROMPT_COLUMNS (rlhf.rundir): what the bootstrap resamples
    data_manifests: list[dict] = field(default_factory=list)  # runs/<profile>/data/*/manifest.json
    missing: list[str] = field(default_factory=list)  # the compared runs of a started seed that have not completed

    @property
    def methods(self) -> list[str]:
        """Methods with at least one included run."""
        return sorted(set(self.runs.loc[self.runs["included"], "method"])) if not self.runs.empty else []

    def evals(self, methods: Iterable[str] | None = None) -> pd.DataFrame:
        """Eval rows of the included runs (of `methods` only, when given: an empty list selects none), ordered by
        run and step."""
        return self._rows("eval", methods)

    def train(self, methods: Iterable[str] | None = None) -> pd.DataFrame:
        return self._rows("train", methods)

    def _rows(self, kind: str, methods: Iterable[str] | None) -> pd.DataFrame:
        """Rows of one kind with only the metric columns they fill: "is `eval/gold` in the frame" then means
        "does this task log a gold reward"."""
        rows = self.metrics[self.metrics["kind"] == kind]
        if methods is not None:
            rows = rows[rows["method"].isin(list(methods))]
        keep = [c for c in rows if c in RUN_KEYS or c in ROW_KEYS or rows[c].notna().any()]
        return rows[keep].reset_index(drop=True)


def evaluated(method: str) -> bool:
    """Do the method's runs have policy eval points to pool (not the reward model's, nor the SFT stage's)?"""
    return method not in METHODS or METHODS[method].evaluated


class BadRunDir(Exception):
    """A run directory the analysis cannot use; the message says which file and why."""


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise BadRunDir(f"missing {path.name}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRunDir(f"{path.name} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise BadRunDir(f"{path.name} is not a JSON object")
    return value


def _read_metrics(path: Path) -> list[dict]:
    """Rows of metrics.jsonl; a truncated line or a row without the common keys rejects the whole run,
    because a run with a hole in its log cannot be trusted to give comparable numbers."""
    if not path.exists():
        raise BadRunDir(f"missing {path.name}")
    rows, bad = read_jsonl(path)
    if bad:
        raise BadRunDir(f"{path.name} has unreadable (truncated) line(s) {', '.join(map(str, bad))}")
    for i, row in enumerate(rows, start=1):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise BadRunDir(f"{path.name} row {i} lacks {', '.join(missing)}")
    if not rows:
        raise BadRunDir(f"{path.name} is empty")
    return rows


def read_prompts(path: Path) -> pd.DataFrame:
    """Every eval point's per-prompt values (samples/eval_stepN.prompts.csv) of one run, with its step; empty for a
    run written before they were kept."""
    frames = []
    for csv in sorted((path / "samples").glob(f"eval_step*{PROMPTS_SUFFIX}")):
        try:
            frame = pd.read_csv(csv)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise BadRunDir(f"samples/{csv.name} is not a readable CSV ({e})") from None
        unknown = set(frame) - set(PROMPT_COLUMNS)
        if "prompt_index" not in frame or unknown:
            raise BadRunDir(
                f"samples/{csv.name} has columns {list(frame)}, expected some of {list(PROMPT_COLUMNS)} "
                "with prompt_index"
            )
        frames.append(frame.assign(step=int(csv.name.removeprefix("eval_step")[:6])))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _identity(path: Path, manifest: dict) -> dict:
    """The run's keys and provenance from its manifest (method falls back to the parent folder's name; a run of a
    method since renamed is read under today's name)."""
    return {
        "method": name_now(manifest.get("method", path.parent.name)),
        "beta": manifest.get("beta"),
        "seed": manifest.get("seed"),
        "run_id": manifest.get("run_id", path.name),
        "status": manifest.get("status", "unknown"),
        "error": manifest.get("error"),
        "finished_at": manifest.get("finished_at"),
        "data_sha256": manifest.get("data_sha256"),
        "git_commit": manifest.get("git_commit"),
        "host": manifest.get("host"),
        "device": manifest.get("device"),
        "device_name": manifest.get("device_name"),
        "reward_model_path": manifest.get("reward_model_path"),  # whose training a PPO run's cost includes
        "packages": json.dumps(manifest.get("packages", {}), sort_keys=True),
        "path": str(path),
        # the data a run trained on (PPO: its reward model's); absent for runs that train on no pairs
        **{f"budget_{k}": (manifest.get("budget") or {}).get(k) for k in ("pairs", "passes", "pair_presentations")},
        **{f"eval_{k}": (manifest.get("eval_settings") or {}).get(k) for k in ("hash", "split", "temperature")},
        **{f"kl_{k}": (manifest.get("kl_control") or {}).get(k) for k in ("adaptive", "rollout_temperature")},
    }


def read_run(path: Path) -> tuple[dict, list[dict], list[dict], pd.DataFrame]:
    """One run directory -> (run record, metrics rows, timings rows, per-prompt values). Never raises for a bad
    directory: the record's `included` is False and `reason` says why."""
    nothing = pd.DataFrame()
    try:
        manifest = _read_json(path / "manifest.json")
    except BadRunDir as e:
        record = {"method": name_now(path.parent.name), "run_id": path.name, "status": "unknown", "path": str(path)}
        return {**record, "included": False, "reason": str(e)}, [], [], nothing
    record = _identity(path, manifest)
    if record["status"] != "completed":
        # A failed or diverged run says why in `error`. A run still `running` whose lock nobody holds was killed
        # (directories written before run locks existed cannot tell, and say only "status running").
        reason = f"status {record['status']}" + (f": {record['error']}" if record["error"] else "")
        alive = process_alive(path) if record["status"] == "running" else None
        if alive is not None:
            reason += ", still being written" if alive else ", killed (no live process; run it again to resume it)"
        return {**record, "included": False, "reason": reason}, [], [], nothing
    if record["eval_split"] == "validation":
        reason = (
            "evaluated on the validation prompts (eval.split=validation, a sweep's run): the report shows the "
            "test prompts only"
        )
        return {**record, "included": False, "reason": reason}, [], [], nothing
    try:
        rows = _read_metrics(path / "metrics.jsonl")
        stages = _read_json(path / "timings.json")
        prompts = read_prompts(path)
    except BadRunDir as e:
        return {**record, "included": False, "reason": str(e)}, [], [], nothing
    keys = {k: record[k] for k in RUN_KEYS}
    metrics = [{**keys, **row} for row in rows]
    timings = [
        {
            **keys,
            "stage": stage,
            "seconds": t.get("seconds"),
            "flops": t.get("flops", math.nan),
            "peak_memory_mb": t.get("peak_memory_mb"),
        }
        for stage, t in stages.items()
    ]
    prompts = prompts.assign(**keys)[[*RUN_KEYS, "step", *prompts.columns.drop("step")]] if len(prompts) else prompts
    return {**record, "included": True, "reason": ""}, metrics, timings, prompts


def keep_latest(records: list[dict]) -> None:
    """Two included runs of one method, beta and seed are one seed run twice (a command rerun with resume=false):
    pooled, they would count as two seeds and narrow every interval. Keep the latest to finish; leave the others
    out, saying why. (Reward-model and SFT runs are not pooled as seeds; PPO's cost reads its own reward model.)"""
    latest: dict[tuple, dict] = {}
    for r in records:
        if r["included"] and evaluated(r["method"]):
            key = (r["method"], r["beta"], r["seed"])
            if key not in latest or (r["finished_at"] or "", r["run_id"]) > (
                latest[key]["finished_at"] or "",
                latest[key]["run_id"],
            ):
                latest[key] = r
    for r in records:
        kept = latest.get((r["method"], r["beta"], r["seed"])) if r["included"] else None
        if kept is not None and kept is not r:
            r.update(
                included=False,
                reason=f"superseded by {kept['run_id']}, a later complete run of {r['method']} "
                f"with β {r['beta']} and seed {r['seed']}: one run a seed is kept, "
                "the latest, so that no seed counts twice",
            )


def keep_complete_seeds(records: list[dict], compared: Iterable[str]) -> list[str]:
    """Compare methods over the same seeds. A seed counts once every compared method (of those with any included
    run) has completed it at every beta it was run at; the runs of a seed still incomplete are left out, saying what
    it lacks, so that a grid stopped part-way (it runs seed by seed, pipelines/grid.py) is reported over its
    complete seeds and nothing half-counted. Returns the missing runs as "method β b seed s"."""
    runs = [r for r in records if r["included"] and r["method"] in set(compared)]
    groups = sorted({(r["method"], r["beta"]) for r in runs})
    have = {(r["method"], r["beta"], r["seed"]) for r in runs}
    missing = []
    for seed in sorted({r["seed"] for r in runs}):
        lacks = [f"{m} β {b:g} seed {seed}" for m, b in groups if (m, b, seed) not in have]
        missing += lacks
        for r in runs:
            if lacks and r["seed"] == seed:
                r.update(
                    included=False,
                    reason=f"seed {seed} is not complete ({', '.join(lacks)} not completed "
                    "yet): methods are compared over the seeds they all completed",
                )
    return missing


def check_pooling(records: list[dict]) -> None:
    """Refuse to pool eval points measured differently: every included policy run must carry the same eval
    settings hash (pi_ref, prompts, pairs, eval settings; rlhf.config.Config.eval_settings). Runs written before
    manifests recorded it carry none and are not checked."""
    seen: dict[str, dict] = {}
    for r in records:
        if r["included"] and evaluated(r["method"]) and r.get("eval_hash"):
            seen.setdefault(r["eval_hash"], r)
    if len(seen) > 1:
        (a, b) = list(seen.values())[:2]
        raise UserError(
            f"runs {a['path']} and {b['path']} were evaluated with different settings (eval hash "
            f"{a['eval_hash']} vs {b['eval_hash']}: pi_ref, the task, the preference set or the eval "
            "section differ), and the report never pools them: move one set of runs out of "
            f"{Path(a['path']).parent.parent}, or rerun it with the other's config"
        )


def load_runs(profile_dir: Path, compared: Iterable[str] = ()) -> Runs:
    """Every run directory under runs/<profile>/<method>/ plus the preference sets' manifests; the `compared`
    methods (the grid's) are kept to the seeds they all completed (`keep_complete_seeds`)."""
    read, metrics, timings, data_manifests, prompts = [], [], [], [], []
    for method_dir in sorted(p for p in profile_dir.glob("*") if p.is_dir()):
        if method_dir.name == DATA_DIR:
            # a set being built (or whose build a kill stopped) is under a hidden temporary name: not one yet
            for manifest in sorted(m for m in method_dir.glob("*/manifest.json") if not m.parent.name.startswith(".")):
                try:
                    data_manifests.append({"path": str(manifest.parent), **_read_json(manifest)})
                except BadRunDir as e:
                    data_manifests.append({"path": str(manifest.parent), "error": str(e)})
            continue
        read += [read_run(run_dir) for run_dir in sorted(p for p in method_dir.iterdir() if p.is_dir())]
    records = [record for record, *_ in read]
    keep_latest(records)
    missing = keep_complete_seeds(records, compared)
    for record, rows, stages, values in read:
        if record["included"]:
            metrics += rows
            timings += stages
            prompts.append(values)
    check_pooling(records)
    metrics_frame = pd.DataFrame(metrics, columns=None if metrics else [*RUN_KEYS, *ROW_KEYS])
    return Runs(
        runs=pd.DataFrame(records, columns=None if records else [*RUN_KEYS, "status", "included", "reason", "path"]),
        metrics=metrics_frame.sort_values([*RUN_KEYS, "kind", "step"], kind="stable").reset_index(drop=True),
        timings=pd.DataFrame(timings, columns=[*RUN_KEYS, "stage", "seconds", "flops", "peak_memory_mb"]),
        data_manifests=data_manifests,
        missing=missing,
        prompts=pd.concat(
            [p for p in prompts if len(p)] or [pd.DataFrame(columns=[*RUN_KEYS, "step"])], ignore_index=True
        ),
    )
