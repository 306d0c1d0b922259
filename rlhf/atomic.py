"""Files written whole or not at all: a reader sees the old version or the whole new one, never a part.

Each is written under a temporary name beside it and renamed over it; a JSONL file is appended one whole line a
write, so a crash leaves at most a torn last line, which `read_jsonl` skips. `cached` keeps a computed value in such
a file for whoever asks next: the caches of pi_ref's passes that every run of a profile reads.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import secrets
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from rlhf.errors import UserError

T = TypeVar("T")


def temporary_name(path: Path) -> Path:
    """A fresh hidden name beside `path`, to write under and then rename to `path`. Unlike mkstemp's and mkdtemp's
    files (mode 0600, 0700, which the rename would keep), what is created under it gets the permissions the
    user's umask gives an ordinary file or folder: a report or run directory others may read."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old version or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0666 less the umask, as open() gives
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    """Rows of a JSONL file and the line numbers that could not be parsed (a crash's truncated last line)."""
    rows, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:  # a torn line may end inside a UTF-8 character
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                bad.append(i)
    return rows, bad


def cached(path: Path | None, compute: Callable[[], T], device: torch.device | str = "cpu") -> tuple[T, bool]:
    """The value a torch file at `path` keeps, and True; or `compute()`'s, kept there for whoever asks next, and
    False. `path` None keeps nothing. Its name is the value's key (rlhf/keys.py): a file there holds the same
    numbers as computing them again would."""
    if path is not None and path.exists():
        try:
            return torch.load(path, map_location=device, weights_only=True), True
        except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # written whole, so damaged afterwards
            raise UserError(
                f"{path}: not a whole torch file ({type(e).__name__}); delete it (what it caches of "
                "pi_ref is computed again)"
            ) from None
    value = compute()
    if path is not None:
        buffer = io.BytesIO()
        torch.save(value, buffer)
        atomic_write_bytes(path, buffer.getvalue())
    return value, False
