"""Run directories (SPEC §6; the schema is in docs/run-directory.md).

    runs/<profile>/<method>/<run-id>/
        config.yaml      resolved config
        manifest.json    versions, git commit, data sha256, seed, host, device, status, error
        metrics.jsonl    one JSON object a line: {"kind": "train"|"eval", "step", "wall_seconds", "tokens", ...}
        samples/         eval samples, one file per eval point
        timings.json     wall-clock seconds and peak memory per stage
        checkpoints/     model checkpoints

Every file is written whole or not at all (temporary file, then rename); a metrics line is appended in one
write and flushed, so a crash leaves at most a truncated last line, which readers skip. A run id is claimed
with an exclusive mkdir, so two runs started at once never share a directory.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from pipelines.config import PROJECT_ROOT, Config

PACKAGES = ["torch", "transformers", "trl", "datasets", "accelerate", "pandas", "seaborn", "vaderSentiment"]


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see the old version or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


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
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
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


class RunDir:
    """One run's directory: created exclusively, written atomically, status kept in the manifest."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest
        self.timings: dict[str, dict[str, float]] = {}

    @classmethod
    def create(cls, cfg: Config, method: str, seed: int, device: torch.device, data_sha256: str | None,
               extra: dict[str, Any] | None = None) -> "RunDir":
        root = PROJECT_ROOT / cfg.runs_dir / cfg.profile / method
        root.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
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
            "method": method, "profile": cfg.profile, "seed": seed, "beta": cfg.beta, "run_id": path.name,
            "status": "running", "started_at": dt.datetime.now(dt.timezone.utc).isoformat(), "finished_at": None,
            "error": None, "data_sha256": data_sha256, "packages": package_versions(), "git_commit": git_commit(),
            "host": socket.gethostname(), "platform": platform.platform(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(), "cpu_threads": torch.get_num_threads(), "argv": sys.argv, **(extra or {}),
        }
        run = cls(path, manifest)
        atomic_write_text(path / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        run.write_manifest()
        return run

    def write_manifest(self) -> None:
        atomic_write_json(self.path / "manifest.json", self.manifest)

    def log(self, row: dict[str, Any]) -> None:
        """Append one metrics row (a single write of a whole line, flushed)."""
        line = json.dumps(row, sort_keys=True, allow_nan=True) + "\n"
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()

    def write_samples(self, step: int, samples: list[dict]) -> None:
        atomic_write_text(self.path / "samples" / f"eval_step{step:06d}.jsonl",
                          "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))

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
        self.manifest["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat()
        if error is not None:
            self.manifest["error"] = f"{type(error).__name__}: {error}"
            self.manifest["traceback"] = "".join(traceback.format_exception(error))[-4000:]
        self.write_manifest()

    @contextmanager
    def running(self) -> Iterator["RunDir"]:
        """Mark the run completed on success, failed (with the error) on any exception, then re-raise."""
        try:
            yield self
        except BaseException as e:
            self.finish("failed", e)
            raise
        self.finish("completed")


def read_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    """Rows of a JSONL file and the line numbers that could not be parsed (a crash's truncated last line)."""
    rows, bad = [], []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                bad.append(i)
    return rows, bad
