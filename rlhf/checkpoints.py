"""Resume points: checkpoints/checkpoint-<step>/ folders, whatever a method puts in them (PPO: ppo/checkpoint.py; the
TRL stages: transformers' Trainer). A folder counts once `commit_checkpoint` has recorded every file's sha256 in its
checkpoint.json, written last: a half-written one is ignored, a corrupt one is an error naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rlhf.atomic import atomic_write_json
from rlhf.errors import UserError
from rlhf.models import sha256_file

CHECKPOINT_RECORD = "checkpoint.json"


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.removeprefix("checkpoint-"))


def commit_checkpoint(folder: Path, step: int) -> None:
    """Make a fully written checkpoint folder count: its step and every file's sha256 go into checkpoint.json,
    written last and atomically. A folder without that record is half-written and never resumed from."""
    files = {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != CHECKPOINT_RECORD
    }
    atomic_write_json(folder / CHECKPOINT_RECORD, {"step": step, "files": files})


def committed(root: Path) -> list[Path]:
    return [f for f in root.glob("checkpoint-*") if (f / CHECKPOINT_RECORD).exists()]


def latest_checkpoint(root: Path) -> Path | None:
    """The committed checkpoint folder under `root` with the highest step, its files checked against their
    recorded sha256. Half-written folders are skipped; a corrupt committed one raises UserError naming it."""
    done = committed(root)
    for folder in set(root.glob("checkpoint-*")) - set(done):
        print(f"ignoring half-written checkpoint {folder} (no {CHECKPOINT_RECORD})")
    if not done:
        return None
    folder = max(done, key=checkpoint_step)
    advice = (
        "delete that folder to resume from an earlier checkpoint (or from the start), or set resume=false "
        "to leave this run as it is and start a new one"
    )
    try:
        record = json.loads((folder / CHECKPOINT_RECORD).read_text())
        files = record["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint {folder}: {CHECKPOINT_RECORD} is unreadable ({e}); {advice}") from None
    for name, sha in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            raise UserError(f"checkpoint {folder} is incomplete: {name} is missing; {advice}")
        if sha256_file(path) != sha:
            raise UserError(f"checkpoint {folder} is corrupt: {name} differs from what was saved (sha256); {advice}")
    return folder


def prune_checkpoints(root: Path, keep: Path | None) -> None:
    """Delete every checkpoint-<step> folder under `root` but `keep` (final/ is never touched)."""
    for folder in root.glob("checkpoint-*"):
        if folder != keep:
            (folder / CHECKPOINT_RECORD).unlink(missing_ok=True)  # first: a kill mid-delete leaves no "whole" one
            shutil.rmtree(folder, ignore_errors=True)
