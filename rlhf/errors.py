"""The two exceptions a run ends with on purpose; the CLI prints either as one line, without a traceback.

* `UserError`: bad input the user can fix (exit status 2). `unreadable` and `read_json` turn a file that is not
  what it should be (not UTF-8, not JSON or YAML, cut short) into one naming the file.
* `Diverged`: training produced a NaN or infinite loss, reward, KL or gradient norm (exit status 3). The run
  stops at that step, its manifest says `diverged`, and its last checkpoint (saved before the bad step) stays.
"""

from __future__ import annotations

import gzip
import json
import math
import zlib
from pathlib import Path

import yaml


class UserError(Exception):
    """Bad input the user can fix: a config key, a data row, a missing model. The message names the culprit."""


class Diverged(FloatingPointError):
    """A non-finite training quantity; the message names the step and the quantity."""


def check_finite(where: str, **values: object) -> None:
    """Raise `Diverged` naming every value (a float or a one-element tensor) that is NaN or infinite."""
    numbers = {name: float(v.detach() if hasattr(v, "detach") else v) for name, v in values.items() if v is not None}
    bad = {name: v for name, v in numbers.items() if not math.isfinite(v)}
    if bad:
        raise Diverged(f"{where}: {', '.join(f'{name} is {v}' for name, v in bad.items())}")


def unreadable(path: Path | str, error: BaseException) -> UserError:
    """A file that could not be read as what it should be, as one line naming the file and what is wrong with it
    (not UTF-8 text, not valid JSON or YAML, not gzip or cut short, or what the reader said)."""
    if isinstance(error, UnicodeDecodeError):
        what = f"not UTF-8 text ({error.reason})"
    elif isinstance(error, json.JSONDecodeError):
        what = f"not valid JSON ({error.msg}: line {error.lineno} column {error.colno})"
    elif isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        what = f"not valid YAML ({error.problem}: line {mark.line + 1} column {mark.column + 1})"
    elif isinstance(error, yaml.YAMLError):
        what = f"not valid YAML ({error})"
    elif isinstance(error, gzip.BadGzipFile):
        what = "not a gzip file"
    elif isinstance(error, (EOFError, zlib.error)):
        what = f"truncated or corrupt ({error})"
    else:
        what = str(error).strip() or type(error).__name__
    return UserError(" ".join(f"{path}: {what}".split()))  # one line, whatever the reader's message held


def read_json(path: Path) -> dict:
    """A JSON file that must hold an object (a manifest, a model's config); anything else is a UserError naming it."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: not UTF-8 or not JSON
        raise unreadable(path, e) from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
