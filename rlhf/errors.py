"""The two exceptions a run ends with on purpose; the CLI prints either as one line, without a traceback.

* `UserError`: bad input the user can fix (exit status 2).
* `Diverged`: training produced a NaN or infinite loss, reward, KL or gradient norm (exit status 3). The run
  stops at that step, its manifest says `diverged`, and its last checkpoint (saved before the bad step) stays.
"""

from __future__ import annotations

import math


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
