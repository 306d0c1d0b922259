"""Run directories (the schema is in docs/run-directory.md).

    runs/<profile>/<method>/<run-id>/
        config.yaml      resolved config
        manifest.json    versions, git commit, data sha256, seed, host, device, status, error
        metrics.jsonl    one JSON object a line: {"kind": "train"|"eval", "step", "wall_seconds", "tokens", ...}
        samples/         every eval prompt's sample at each eval point (eval_stepN.jsonl) and its numbers alone
                         (eval_stepN.prompts.csv: PROMPT_COLUMNS)
        timings.json     wall-clock seconds and peak memory per stage
        checkpoints/     final/ (the trained model) and checkpoint-<step>/ (resume points, removed on success)
        tracker/         TensorBoard's event files, with `report_to: [tensorboard]` (rlhf/trackers.py)
        .lock            held (flock) by the process writing the run; the kernel drops it when that process dies

Every file is written whole or not at all (rlhf/atomic.py); a metrics line is appended in one write and flushed,
so a crash leaves at most a truncated last line, which readers skip. A run id is claimed with an exclusive mkdir,
so two runs started at once never share a directory.

A run is named by its identity (rlhf/keys.py): a method's run by its run key, a reward model or the SFT stage's
model by its artefact key. Resume (docs/reliability.md): a run killed (status `running`, lock free) or `failed` is
continued by the next run with the same identity from its last checkpoint (rlhf/checkpoints.py; or from its start,
where it had none), in the same directory: metrics rows and samples after the checkpoint's step are dropped and
written again; a completed run with the same identity is reused as it is (`completed`), never run twice.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import platform
import resource
import socket
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch
import yaml

from rlhf.atomic import atomic_write_json, atomic_write_text
from rlhf.checkpoints import checkpoint_step, committed, latest_checkpoint, prune_checkpoints
from rlhf.config import PROJECT_ROOT, Config
from rlhf.distributed import from_main, is_main
from rlhf.errors import Diverged, UserError, read_json
from rlhf.keys import eval_settings, run_keys
from rlhf.models import resolve_precision
from rlhf.trackers import open_trackers, scalars

# Per eval prompt, what the report's bootstrap and pairing read (rlhf.evaluate.per_prompt); a task without a gold
# reward, or an evaluation without a reward model, leaves its column out
PROMPT_COLUMNS = ("prompt_index", "gold", "proxy", "kl", "kl_k3", "length", "eos")
PROMPTS_SUFFIX = ".prompts.csv"
# what computes a run's numbers (peft: its LoRA layers), recorded in its manifest
PACKAGES = ["torch", "transformers", "trl", "peft", "datasets", "accelerate", "pandas", "seaborn", "vaderSentiment"]


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (so a stage's peak is its own, not the process's so far): the CUDA
    allocator's peak on GPU; on Linux CPUs the resident-set high-water mark, via /proc/self/clear_refs."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: the window stays the process's lifetime
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since the last `reset_peak_memory`: GPU allocator peak on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024  # kB
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


_RESUMABLE = ("running", "failed")  # `diverged` is not: it would diverge again at the same step


def method_dir(cfg: Config, method: str) -> Path:
    """runs/<profile>/<method>/: every run of `method` under this config's runs directory."""
    return PROJECT_ROOT / cfg.runs_dir / cfg.profile / method


Identity = tuple[str, list[tuple[str, Any]]]  # (manifest entry, [(run directory's method, value), ...])


def identity(
    cfg: Config, method: str, seed: int, data_sha256: str | None, extra: dict[str, Any] | None, key: str = "run_key"
) -> Identity:
    """The manifest entry that names a run and the values it may hold: its `run_key` (today's, then those older
    versions of the keys gave the same run, each with the directory it went to: `run_keys`), or (`key`) the entry
    of `extra` that holds the artefact key of a model later runs reuse (`reward_model_key`, `sft_key`): what decides
    its reuse decides its resume. A new run is written under the first."""
    return key, run_keys(cfg, method, seed, data_sha256, extra) if key == "run_key" else [(method, extra[key])]


def _runs_of(cfg: Config, named: Identity) -> Iterator[tuple[Path, dict]]:
    """(run directory, manifest) of every run with this identity, newest first within each version."""
    name, values = named
    for method, value in values:
        yield from ((path, m) for path, m in run_manifests(method_dir(cfg, method)) if m.get(name) == value)


def completed(cfg: Config, method: str, name: str, value: Any) -> Path | None:
    """The newest completed run of `method` whose manifest holds `value` under `name` (its identity)."""
    return _completed(cfg, (name, [(method, value)]))


def _completed(cfg: Config, named: Identity) -> Path | None:
    return next((path for path, m in _runs_of(cfg, named) if m.get("status") == "completed"), None)


def completed_run(
    cfg: Config, method: str, seed: int, data_sha256: str | None, extra: dict[str, Any] | None
) -> Path | None:
    """With `cfg.resume`, the newest completed run of `method` with this run key (the arguments `RunDir.open` gets):
    a command run again reuses it rather than add a second run of the same seed, which would count twice. Under
    several processes each reads the same manifests before any of them writes one, so all get the same answer."""
    return _completed(cfg, identity(cfg, method, seed, data_sha256, extra)) if cfg.resume else None


def _try_lock(path: Path):
    """flock `path/.lock` without waiting: the open file (the lock lives as long as it stays open, and dies
    with the process, even on kill -9), or None when another process holds it."""
    f = open(path / ".lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def process_alive(path: Path) -> bool | None:
    """Is a live process writing the run at `path`? None for a directory without a lock file."""
    if not (path / ".lock").exists():
        return None
    lock = _try_lock(path)
    if lock is None:
        return True
    lock.close()
    return False


class RunDir:
    """One run's directory: created exclusively (or an interrupted one resumed), locked while written, written
    atomically, status kept in the manifest."""

    def __init__(self, path: Path, manifest: dict[str, Any], lock=None):
        self.path = path
        self.manifest = manifest
        self.timings: dict[str, dict[str, float]] = {}
        self.last_step: int | None = None  # step of the last metrics row written
        self.trackers: list = []  # `report_to`'s, fed every metrics row (rlhf/trackers.py)
        self._lock = lock

    @classmethod
    def create(
        cls,
        cfg: Config,
        method: str,
        seed: int,
        device: torch.device,
        data_sha256: str | None,
        extra: dict[str, Any] | None = None,
        key: str = "run_key",
    ) -> RunDir:
        """A new run directory (under several processes, a collective call: see `open`)."""
        named = identity(cfg, method, seed, data_sha256, extra, key)
        return cls._shared(lambda: (cls._create(cfg, method, seed, device, data_sha256, extra, named), None))[0]

    @classmethod
    def _create(
        cls,
        cfg: Config,
        method: str,
        seed: int,
        device: torch.device,
        data_sha256: str | None,
        extra: dict[str, Any] | None,
        named: Identity,
    ) -> RunDir:
        root = method_dir(cfg, method)
        root.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        base = f"{stamp}-beta{cfg.beta:g}-seed{seed}"
        for n in range(1000):
            path = root / (base if n == 0 else f"{base}-{n}")
            try:
                path.mkdir()  # exclusive: fails if another run claimed this id first
                break
            except FileExistsError:
                continue
        else:
            raise RuntimeError(f"could not claim a run directory under {root}")
        manifest = {
            "method": method,
            "profile": cfg.profile,
            "seed": seed,
            "beta": cfg.beta,
            "run_id": path.name,
            "status": "running",
            "started_at": dt.datetime.now(dt.UTC).isoformat(),
            "finished_at": None,
            "error": None,
            "data_sha256": data_sha256,
            "packages": package_versions(),
            "git_commit": git_commit(),
            "host": socket.gethostname(),
            "platform": platform.platform(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads(),
            "argv": sys.argv,
            "precision": resolve_precision(cfg.model.precision, device),  # what `auto` became on this machine
            "resumed": [],
            "eval_settings": eval_settings(cfg),
            **(extra or {}),
            named[0]: named[1][0][1],
        }
        run = cls(path, manifest, _try_lock(path))  # a fresh directory: nobody else holds its lock
        atomic_write_text(path / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        run.write_manifest()
        run.trackers = open_trackers(cfg.report_to, path, cfg.profile, cfg.to_dict())
        return run

    @classmethod
    def open(
        cls,
        cfg: Config,
        method: str,
        seed: int,
        device: torch.device,
        data_sha256: str | None,
        extra: dict[str, Any] | None = None,
        key: str = "run_key",
    ) -> tuple[RunDir, Path | None]:
        """The run to write and the checkpoint to continue from. With `cfg.resume`: the newest interrupted run
        with the same identity (`identity`: its run key, or the artefact key in `extra[key]`), rewound to its last
        checkpoint (or to its start, and None, where it has none). Otherwise (or if there is none) a new run, and
        None. A corrupt checkpoint raises UserError before anything in its run directory changes.

        Under several processes every process calls it: the main process opens the run, the others get a
        `ReplicaRunDir` on the same path (and the same checkpoint, or the same error)."""
        named = identity(cfg, method, seed, data_sha256, extra, key)
        return cls._shared(lambda: cls._open(cfg, method, seed, device, data_sha256, extra, named))

    @staticmethod
    def _shared(open_on_main) -> tuple[RunDir, Path | None]:
        if is_main():
            try:
                run, checkpoint = open_on_main()
            except UserError as e:
                from_main(None, None, str(e))  # the other processes raise it too, rather than wait forever
                raise
            from_main(run.path, checkpoint, None)
            return run, checkpoint
        path, checkpoint, error = from_main(None, None, None)
        if error is not None:
            raise UserError(error)
        return ReplicaRunDir(path), checkpoint

    @classmethod
    def _open(
        cls,
        cfg: Config,
        method: str,
        seed: int,
        device: torch.device,
        data_sha256: str | None,
        extra: dict[str, Any] | None,
        named: Identity,
    ) -> tuple[RunDir, Path | None]:
        run = next(cls._interrupted(cfg, named), None) if cfg.resume else None  # the newest
        if run is None:
            return cls._create(cfg, method, seed, device, data_sha256, extra, named), None
        checkpoint = run._rewind()
        run.trackers = open_trackers(
            cfg.report_to,
            run.path,
            cfg.profile,
            cfg.to_dict(),
            rewritten_from=0 if checkpoint is None else checkpoint_step(checkpoint) + 1,
        )
        return run, checkpoint

    def _rewind(self) -> Path | None:
        """Rewind this interrupted run to its last checkpoint, returned; or, where it stopped before its first, to its
        start (None), so that it runs again in its own directory rather than stay behind as a dead run."""
        try:
            checkpoint = latest_checkpoint(self.path / "checkpoints")
        except UserError:
            self.release()
            raise
        step = None if checkpoint is None else checkpoint_step(checkpoint)
        print(
            f"resuming {self.path} (status {self.manifest['status']}) "
            + (
                "from the start: it stopped before its first checkpoint"
                if step is None
                else f"from its checkpoint at step {step}"
            )
        )
        self.resume(step)
        return checkpoint

    @classmethod
    def _interrupted(cls, cfg: Config, named: Identity) -> Iterator[RunDir]:
        """Runs with this identity that were killed (status running, nobody holds the lock) or failed, newest first,
        each locked for the caller as it is yielded."""
        for path, manifest in _runs_of(cfg, named):
            if manifest.get("status") not in _RESUMABLE:
                continue
            lock = _try_lock(path)
            if lock is None:
                continue  # a live process is writing it
            manifest = read_json(path / "manifest.json")  # again under the lock: it may have just finished
            if manifest.get("status") in _RESUMABLE:
                yield cls(path, manifest, lock)
            else:
                lock.close()

    def resume(self, step: int | None) -> list[dict]:
        """Continue this interrupted run after its checkpoint at `step`, or from its start (None): metrics rows and
        eval samples after that step are dropped (the resumed run writes them again), timings keep adding up (they
        are the real cost, lost work included), and the manifest says `running` again and records the resume.
        Returns the rows kept."""
        last = -1 if step is None else step  # from the start: step 0's eval is written again too
        kept, rows = [], []
        metrics = self.path / "metrics.jsonl"
        if metrics.exists():
            # a torn last line may end inside a UTF-8 character: undecodable bytes fail to parse, like the rest of it
            for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the truncated last line of a killed run
                if row.get("step", 0) <= last:
                    kept.append(line if line.endswith("\n") else line + "\n")
                    rows.append(row)
                    self.last_step = row.get("step")
        atomic_write_text(metrics, "".join(kept))
        for sample in (self.path / "samples").glob("eval_step*"):
            if int(sample.name.removeprefix("eval_step")[:6]) > last:
                sample.unlink()
        try:
            self.timings = json.loads((self.path / "timings.json").read_text())
        except (OSError, json.JSONDecodeError):
            self.timings = {}
        m = self.manifest
        m.setdefault("resumed", []).append(
            {
                "at": dt.datetime.now(dt.UTC).isoformat(),
                "from_step": step,
                "previous_status": m["status"],
                "previous_error": m.get("error"),
                "host": socket.gethostname(),
                "git_commit": git_commit(),
            }
        )
        m.update(status="running", finished_at=None, error=None)
        m.pop("traceback", None)
        self.write_manifest()
        return rows

    def write_manifest(self) -> None:
        atomic_write_json(self.path / "manifest.json", self.manifest)

    def log(self, row: dict[str, Any]) -> None:
        """Append one metrics row (a single write of a whole line, flushed)."""
        line = json.dumps(row, sort_keys=True, allow_nan=True) + "\n"
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
        self.last_step = row.get("step")
        for tracker in self.trackers:
            tracker.log(scalars(row), step=row.get("step"))

    def write_samples(self, step: int, samples: list[dict]) -> None:
        """Every eval prompt's record (rlhf.evaluate.per_prompt) at eval point `step`: the samples with their text
        as JSONL, and beside them their numbers alone (PROMPT_COLUMNS) as a compact CSV, what the report reads."""
        stem = self.path / "samples" / f"eval_step{step:06d}"
        atomic_write_text(
            stem.with_suffix(".jsonl"), "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        )
        columns = [c for c in PROMPT_COLUMNS if samples and c in samples[0]]
        if "prompt_index" not in columns:
            return  # records without the evaluator's numbers
        atomic_write_text(
            stem.with_suffix(PROMPTS_SUFFIX),
            ",".join(columns)
            + "\n"
            + "".join(
                ",".join(
                    repr(float(s[c])) if c not in ("prompt_index", "length", "eos") else str(int(s[c])) for c in columns
                )
                + "\n"
                for s in samples
            ),
        )

    @contextmanager
    def stage(self, name: str, device: torch.device) -> Iterator[dict[str, float]]:
        """Time a stage (wall-clock) and record its peak memory in timings.json. Stages do not nest. A stage
        entered again adds its seconds and keeps the larger peak; the caller may add counters (e.g. `tokens`)
        to the entry it gets."""
        entry = self.timings.setdefault(name, {"seconds": 0.0, "peak_memory_mb": 0.0})
        reset_peak_memory(device)
        start = time.perf_counter()
        try:
            yield entry
        finally:
            entry["seconds"] += time.perf_counter() - start
            entry["peak_memory_mb"] = max(entry["peak_memory_mb"], peak_memory_mb(device))
            atomic_write_json(self.path / "timings.json", self.timings)

    def finish(self, status: str = "completed", error: BaseException | None = None) -> None:
        self.manifest["status"] = status
        self.manifest["finished_at"] = dt.datetime.now(dt.UTC).isoformat()
        if error is not None:
            self.manifest["error"] = f"{type(error).__name__}: {error}"
            self.manifest["traceback"] = "".join(traceback.format_exception(error))[-4000:]
        self.write_manifest()
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
        self.release()

    def release(self) -> None:
        """Give up the run's lock (a later process may then resume it, if it is resumable)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    @contextmanager
    def running(self) -> Iterator[RunDir]:
        """Mark the run completed on success (its resume checkpoints are then removed: checkpoints/final
        stays), diverged on a non-finite training quantity (its last checkpoint stays), failed (with the error)
        on any other exception; re-raise."""
        try:
            yield self
        except Diverged as e:
            self.finish("diverged", e)
            last = max(committed(self.path / "checkpoints"), key=checkpoint_step, default=None)
            raise Diverged(
                f"{e} [last metrics row: step {self.last_step}; run marked diverged: {self.path}; last "
                f"good checkpoint: {last or 'none (no checkpoint was due yet)'}]"
            ) from e
        except BaseException as e:
            self.finish("failed", e)
            raise
        self.finish("completed")
        prune_checkpoints(self.path / "checkpoints", keep=None)


class ReplicaRunDir(RunDir):
    """The run directory as a process other than the main one holds it under DDP: its path (to load checkpoints
    from) without write access. Every write is dropped, so stage code reads the same on every process and the
    main process alone writes the run, once."""

    def __init__(self, path: Path):
        super().__init__(path, manifest={})

    def write_manifest(self) -> None:
        pass

    def log(self, row: dict[str, Any]) -> None:
        self.last_step = row.get("step")

    def write_samples(self, step: int, samples: list[dict]) -> None:
        pass

    @contextmanager
    def stage(self, name: str, device: torch.device) -> Iterator[dict[str, float]]:
        yield {}

    @contextmanager
    def running(self) -> Iterator[RunDir]:
        yield self


def manifest_of_model(folder: Path) -> dict:
    """The manifest of the run that saved the model in `folder` (<run-dir>/checkpoints/final), or {} for a model
    that no run of this project saved."""
    path = Path(folder).parent.parent / "manifest.json"
    return read_json(path) if path.is_file() else {}


def run_manifests(root: Path) -> Iterator[tuple[Path, dict]]:
    """(run directory, manifest) of every run under `root` (runs/<profile>/<method>), newest first. Manifests are
    written atomically, so one that does not parse was damaged afterwards: an error naming it."""
    for manifest_path in sorted(root.glob("*/manifest.json"), reverse=True):
        try:
            yield manifest_path.parent, read_json(manifest_path)
        except UserError as e:
            raise UserError(f"{e}; move that run directory out of {root}, or delete it") from None
